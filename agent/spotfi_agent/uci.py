"""Read UCI configuration: through the `uci` command, or by parsing the file.

The file parser follows the syntax libuci reads and writes:

    config <type> ['<name>']
        option <key> '<value>'
        list <key> '<value>'

Values may be single-quoted, double-quoted or bare. Adjacent quoted and bare
parts join into one word, which is how `uci commit` writes a single quote
inside a value: 'it'\\''s' reads as it's. A `#` at the start of a word
starts a comment. Statements that cannot be read are logged and skipped, so
one bad line does not hide the rest of the file.
"""

from spotfi_agent.compat import is_executable, is_file, read_text
from spotfi_agent.log import get_logger

log = get_logger(__name__)

UCI_TIMEOUT = 10
_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_"
_DEFAULT_CONFIG_DIR = "/etc/config"


class UciSection:
    """One `config` section: `type`, `name` (None when unnamed) and `options`.

    `options` maps each key to a string, or to a list of strings for `list` keys.
    """

    def __init__(self, section_type, name=None):
        self.type = section_type
        self.name = name
        self.options = {}

    def set_option(self, key, value):
        self.options[key] = value

    def add_list_item(self, key, value):
        current = self.options.get(key)
        if current is None:
            self.options[key] = [value]
        elif isinstance(current, list):
            current.append(value)
        else:
            # libuci turns an option into a list when a `list` line adds to it.
            self.options[key] = [current, value]

    def __repr__(self):
        return "UciSection(%r, %r, %r)" % (self.type, self.name, self.options)


def _is_name(text):
    if not text:
        return False
    for char in text:
        if char not in _NAME_CHARS:
            return False
    return True


def split_statements(text):
    """Split UCI text into (line number, words, error) for each statement.

    `error` is None, or a reason when the statement ended inside a quote.
    """
    statements = []
    words = []
    word = None
    quote = None
    line = 1
    start_line = 1
    in_comment = False
    index = 0
    length = len(text)

    while index < length:
        char = text[index]
        index += 1
        if in_comment:
            if char == "\n":
                in_comment = False
                if words:
                    statements.append((start_line, words, None))
                words = []
                line += 1
            continue

        if quote == "'":
            if char == "'":
                quote = None
            else:
                word.append(char)
                if char == "\n":
                    line += 1
            continue
        if quote == '"':
            if char == '"':
                quote = None
            elif char == "\\" and index < length:
                escaped = text[index]
                index += 1
                if escaped == "\n":
                    line += 1
                else:
                    word.append(escaped)
            else:
                word.append(char)
                if char == "\n":
                    line += 1
            continue

        if char == "\n" or char == " " or char == "\t" or char == "\r":
            if word is not None:
                words.append("".join(word))
                word = None
            if char == "\n":
                if words:
                    statements.append((start_line, words, None))
                words = []
                line += 1
            continue
        if not words and word is None:
            start_line = line
        if char == "#" and word is None:
            in_comment = True
            continue
        if word is None:
            word = []
        if char == "'" or char == '"':
            quote = char
        elif char == "\\" and index < length:
            escaped = text[index]
            index += 1
            if escaped == "\n":
                line += 1
            else:
                word.append(escaped)
        else:
            word.append(char)

    if quote is not None:
        statements.append((start_line, words, "unterminated quote"))
        return statements
    if word is not None:
        words.append("".join(word))
    if words:
        statements.append((start_line, words, None))
    return statements


def parse_config(text, source="UCI file"):
    """Parse the text of a UCI config file into a list of UciSection.

    Sections with the same name are merged, as libuci does. Problems are
    logged with `source` and the line number, and the statement is skipped.
    """
    sections = []
    named = {}
    current = None

    for line, words, error in split_statements(text):
        keyword = words[0] if words else ""
        if error is not None:
            log.warning("%s line %d: %s, statement ignored", source, line, error)
            continue

        if keyword == "package":
            continue

        if keyword == "config":
            if len(words) < 2 or len(words) > 3 or not _is_name(words[1]):
                log.warning("%s line %d: expected `config <type> ['<name>']`, "
                            "section ignored", source, line)
                current = None
                continue
            name = words[2] if len(words) == 3 else None
            if name is not None and not _is_name(name):
                log.warning("%s line %d: invalid section name '%s' (use letters, digits "
                            "and _), section ignored", source, line, name)
                current = None
                continue
            current = named.get(name) if name is not None else None
            if current is None:
                current = UciSection(words[1], name)
                sections.append(current)
                if name is not None:
                    named[name] = current
            elif current.type != words[1]:
                log.warning("%s line %d: section '%s' declared again with type '%s' "
                            "instead of '%s'", source, line, name, words[1], current.type)
            continue

        if keyword == "option" or keyword == "list":
            if current is None:
                log.warning("%s line %d: %s outside a valid section, ignored",
                            source, line, keyword)
                continue
            if len(words) != 3 or not _is_name(words[1]):
                log.warning("%s line %d: expected `%s <key> '<value>'`, line ignored",
                            source, line, keyword)
                continue
            if keyword == "option":
                current.set_option(words[1], words[2])
            else:
                current.add_list_item(words[1], words[2])
            continue

        log.warning("%s line %d: unknown statement '%s', ignored", source, line, keyword)
    return sections


def parse_show(text, package):
    """Parse the output of `uci show <package>` into a list of UciSection.

    `uci show` prints `pkg.section=type` and `pkg.section.key='value'`, with
    list items as several quoted words on one line. Unnamed sections appear
    as `@type[N]` and get name None.
    """
    sections = []
    by_key = {}
    prefix = package + "."

    for raw_line in text.split("\n"):
        line = raw_line.strip()
        equals = line.find("=")
        if not line.startswith(prefix) or equals < 0:
            continue
        path = line[len(prefix):equals]
        statements = split_statements(line[equals + 1:])
        words = statements[0][1] if statements else []
        dot = path.find(".")

        if dot < 0:
            if len(words) != 1:
                continue
            name = None if path.startswith("@") else path
            section = UciSection(words[0], name)
            sections.append(section)
            by_key[path] = section
            continue

        section = by_key.get(path[:dot])
        key = path[dot + 1:]
        if section is None or not _is_name(key) or not words:
            continue
        # NOTE: a list with one item prints like an option, so it reads as a string.
        if len(words) == 1:
            section.set_option(key, words[0])
        else:
            section.options[key] = words
    return sections


def find_command(name, search_path):
    """Return the path of executable `name` in the ":"-separated `search_path`, or None.

    Unlike compat.find_executable, an unset or empty `search_path` finds
    nothing: the caller passes the environment it was given, not this process's.
    """
    if not search_path:
        return None
    for directory in search_path.split(":"):
        if not directory:
            continue
        candidate = directory.rstrip("/") + "/" + name
        if is_executable(candidate):
            return candidate
    return None


def run_subprocess(argv):
    """Run `argv` (CPython only) and return (exit status, standard output as text).

    Raises OSError when the command cannot start or runs past UCI_TIMEOUT seconds.
    """
    from spotfi_agent import procrun

    status, output = procrun.run_capture(argv, UCI_TIMEOUT)
    return status, output.decode("utf-8", "replace")


def _split_config_path(config_path):
    slash = config_path.rfind("/")
    if slash < 0:
        return ".", config_path
    return config_path[:slash] or "/", config_path[slash + 1:]


def _show_sections(config_path, run_command):
    """Read sections through `uci show`; return None when the command fails."""
    directory, package = _split_config_path(config_path)
    argv = ["uci"]
    if directory != _DEFAULT_CONFIG_DIR:
        argv += ["-c", directory]
    argv += ["-q", "show", package]
    command = " ".join(argv)

    try:
        status, output = run_command(argv)
    except OSError as error:
        log.warning("could not run `%s` (%s), reading %s directly", command, error, config_path)
        return None
    if status == 0:
        return parse_show(output, package)
    # `uci -q show` exits with status 1 when the package has no file, which
    # is normal, so only a failure on an existing file is logged.
    if is_file(config_path):
        log.warning("`%s` failed with exit status %d, reading %s directly",
                    command, status, config_path)
    return None


def read_sections(config_path, run_command=None):
    """Return the sections of UCI file `config_path`, or None when it does not exist.

    With `run_command(argv) -> (status, output)`, `uci show` is tried first
    and the file is parsed only when the command fails.
    """
    if run_command is not None:
        sections = _show_sections(config_path, run_command)
        if sections is not None:
            return sections
    text = read_text(config_path)
    if text is None:
        return None
    return parse_config(text, config_path)


def read_section(config_path, name, section_type=None, run_command=None):
    """Return section `name` of UCI file `config_path`, or None when absent.

    When no section has that name but an unnamed section of `section_type`
    exists, the first one is returned with a warning, so that a hand-written
    `config <type>` without a name still works.
    """
    sections = read_sections(config_path, run_command)
    if not sections:
        return None
    for section in sections:
        if section.name == name:
            if section_type is not None and section.type != section_type:
                log.warning("%s: section '%s' has type '%s' instead of '%s', used anyway",
                            config_path, name, section.type, section_type)
            return section
    if section_type is None:
        return None
    for section in sections:
        if section.name is None and section.type == section_type:
            log.warning("%s: no section named '%s', so the first unnamed '%s' section is "
                        "used. Write `config %s '%s'` so that `uci set` can address it",
                        config_path, name, section_type, section_type, name)
            return section
    return None
