"""Read /etc/spotfi.env, the settings file of the Go bridge the agent replaces.

The file contains shell variable assignments, one a line:

    # comment
    SPOTFI_TOKEN="..."
    export SPOTFI_MQTT_BROKER=tcp://broker.example.com:1883
    SPOTFI_ROUTER_ID='router-1'

Quoting follows the shell: single quotes keep every character, double quotes
take a backslash before ", \\, $ and ` literally, and bare values end at
whitespace. Variable expansion ($NAME) is not performed. Lines that are not
assignments are logged by line number and skipped. Values are never logged,
because the file contains the token.
"""

from spotfi_agent.compat import read_text
from spotfi_agent.log import get_logger

log = get_logger(__name__)

_KEY_START = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_KEY_CHARS = _KEY_START + "0123456789"
_DOUBLE_QUOTE_ESCAPES = '"\\$`'


def _is_key(text):
    if not text or text[0] not in _KEY_START:
        return False
    for char in text:
        if char not in _KEY_CHARS:
            return False
    return True


def _read_value(text):
    """Return (value, rest of line, error) for the shell word at the start of `text`."""
    value = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        if char == " " or char == "\t":
            break
        if char == "'":
            end = text.find("'", index + 1)
            if end < 0:
                return None, "", "unterminated single quote"
            value.append(text[index + 1:end])
            index = end + 1
            continue
        if char == '"':
            index += 1
            while index < length and text[index] != '"':
                if text[index] == "\\" and index + 1 < length \
                        and text[index + 1] in _DOUBLE_QUOTE_ESCAPES:
                    index += 1
                value.append(text[index])
                index += 1
            if index >= length:
                return None, "", "unterminated double quote"
            index += 1
            continue
        if char == "\\" and index + 1 < length:
            index += 1
            char = text[index]
        value.append(char)
        index += 1
    return "".join(value), text[index:].strip(), None


def parse_env_file(text, source="env file"):
    """Parse shell assignments into a dict. Bad lines are logged and skipped."""
    values = {}
    line_number = 0
    for raw_line in text.split("\n"):
        line_number += 1
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export ") or line.startswith("export\t"):
            line = line[7:].strip()

        equals = line.find("=")
        key = line[:equals] if equals > 0 else ""
        if not _is_key(key):
            log.warning("%s line %d: not a KEY=value assignment, ignored", source, line_number)
            continue

        value, rest, error = _read_value(line[equals + 1:])
        if error is not None:
            log.warning("%s line %d: %s in the value of %s, ignored",
                        source, line_number, error, key)
            continue
        if rest and not rest.startswith("#"):
            log.warning("%s line %d: text after the value of %s ignored. Quote the value "
                        "if it contains spaces", source, line_number, key)
        values[key] = value
    return values


def read_env_file(path):
    """Return the assignments in file `path`, or None when it does not exist."""
    text = read_text(path)
    if text is None:
        return None
    return parse_env_file(text, path)
