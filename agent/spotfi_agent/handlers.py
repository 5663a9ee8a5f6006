"""Operator handlers: RPC methods that run commands declared in files.

Each `*.json` file (and `*.yaml` / `*.yml` file when PyYAML imports) in the
handlers directory declares one handler object, or an object with a
`handlers` list of them:

    {"handlers": [{"path": "ops", "method": "greet",
                   "command": ["/bin/echo", "hello {args.name}"],
                   "timeout": 10, "description": "Print a greeting"}]}

`{args.NAME}` inside a command element is replaced by the string form of the
request's scalar argument NAME, and `{{` and `}}` stand for literal braces.
The command runs as an argument vector, never through a shell, so an argument
value cannot add words to the command.

A file is loaded whole or not at all: an invalid file is logged on one line
and skipped, and the other files still load.
"""

import os

from spotfi_agent import jsoncodec
from spotfi_agent.compat import is_file, path_join
from spotfi_agent.log import get_logger

log = get_logger(__name__)

_NOT_LOADED = object()
# PyYAML is imported when the first YAML file is found, because it adds about
# 2 MB of RSS on CPython. None means it is not installed (always so on
# MicroPython): JSON files only.
yaml = _NOT_LOADED


def _yaml():
    global yaml
    if yaml is _NOT_LOADED:
        try:
            import yaml as module
        except ImportError:
            module = None
        yaml = module
    return yaml

RESERVED_PATH = "spotfi.agent"
MAX_FILE_SIZE = 256 * 1024
MAX_NAME_LENGTH = 256
JSON_SUFFIXES = (".json",)
YAML_SUFFIXES = (".yaml", ".yml")
HANDLER_KEYS = ("path", "method", "command", "timeout", "description")
_ARG_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
_ARG_PREFIX = "args."


class HandlerError(Exception):
    """Base class of the errors raised by this module."""


class HandlerFileError(HandlerError):
    """Raised when a handlers file cannot be read or does not follow the format."""


class HandlerArgumentError(HandlerError):
    """Raised when a request's args do not fill a handler's placeholders."""


def parse_template(text):
    """Split a command element into ("text", str) and ("arg", name) segments.

    Raises ValueError naming the problem when a brace is unmatched or a
    placeholder is not of the form `{args.NAME}`.
    """
    segments = []
    literal = []
    index = 0
    length = len(text)
    while index < length:
        char = text[index]
        pair = text[index:index + 2]
        if pair == "{{" or pair == "}}":
            literal.append(char)
            index += 2
        elif char == "{":
            end = text.find("}", index)
            if end < 0:
                raise ValueError("unmatched '{' at character %d (write '{{' for a literal brace)"
                                 % index)
            name = _placeholder_name(text[index + 1:end])
            if literal:
                segments.append(("text", "".join(literal)))
                literal = []
            segments.append(("arg", name))
            index = end + 1
        elif char == "}":
            raise ValueError("unmatched '}' at character %d (write '}}' for a literal brace)"
                             % index)
        else:
            literal.append(char)
            index += 1
    if literal:
        segments.append(("text", "".join(literal)))
    return segments


def _placeholder_name(inner):
    if not inner.startswith(_ARG_PREFIX):
        raise ValueError("placeholder {%s} is not of the form {args.NAME}" % inner)
    name = inner[len(_ARG_PREFIX):]
    if not name:
        raise ValueError("placeholder {%s} has no argument name" % inner)
    for char in name:
        if char not in _ARG_NAME_CHARS:
            raise ValueError("placeholder {%s}: argument names contain only letters, digits,"
                             " '_' and '-'" % inner)
    return name


def format_scalar(value):
    """Return the command-line form of a JSON scalar, or None for other values."""
    # bool before int: True is an int in Python.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return None


def _json_type_name(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return type(value).__name__


class Handler:
    """One operator handler: the command to run for (path, method)."""

    def __init__(self, path, method, command, timeout, description, source):
        self.path = path
        self.method = method
        self.command = command
        self.timeout = timeout
        self.description = description
        self.source = source
        self._templates = [parse_template(element) for element in command]

    @property
    def label(self):
        return "%s %s" % (self.path, self.method)

    def arg_names(self):
        """Return the argument names the command's placeholders refer to, in order."""
        names = []
        for segments in self._templates:
            for kind, value in segments:
                if kind == "arg" and value not in names:
                    names.append(value)
        return names

    def build_argv(self, args):
        """Return the command with placeholders filled from `args`.

        Raises HandlerArgumentError naming the argument when one is missing,
        is not a scalar, or contains a NUL character (argv cannot carry one).
        """
        argv = []
        for segments in self._templates:
            parts = []
            for kind, value in segments:
                if kind == "text":
                    parts.append(value)
                else:
                    parts.append(self._format_arg(args, value))
            argv.append("".join(parts))
        return argv

    def _format_arg(self, args, name):
        if name not in args:
            raise HandlerArgumentError(
                "argument '%s' is missing; handler %s needs args: %s"
                % (name, self.label, ", ".join(self.arg_names())))
        text = format_scalar(args[name])
        if text is None:
            raise HandlerArgumentError(
                "argument '%s' must be a string, number or boolean for handler %s, got %s"
                % (name, self.label, _json_type_name(args[name])))
        if "\0" in text:
            raise HandlerArgumentError(
                "argument '%s' contains a NUL character, which a command argument cannot carry"
                % name)
        return text

    def describe(self, default_timeout):
        """Return the handler as listed by the `spotfi.agent handlers` method."""
        timeout = self.timeout if self.timeout is not None else default_timeout
        return {"path": self.path, "method": self.method, "timeout": timeout,
                "description": self.description}


class HandlerRegistry:
    """The operator handlers loaded from one directory, looked up by (path, method)."""

    def __init__(self, directory):
        self.directory = directory
        self._handlers = {}

    @property
    def handlers(self):
        """The loaded handlers, sorted by path and method."""
        keys = sorted(self._handlers)
        return [self._handlers[key] for key in keys]

    def find(self, path, method):
        return self._handlers.get((path, method))

    def describe(self, default_timeout):
        return [handler.describe(default_timeout) for handler in self.handlers]

    def reload(self):
        """Read the directory again and return the number of handlers loaded."""
        return self.load()

    def load(self):
        """Replace the loaded handlers with those of the directory's valid files.

        Returns the number of handlers loaded.
        """
        names = self._list_directory()
        loaded = {}
        skipped_yaml = []
        file_count = 0
        for name in names:
            path = path_join(self.directory, name)
            is_yaml = _has_suffix(name, YAML_SUFFIXES)
            if is_yaml and _yaml() is None:
                skipped_yaml.append(path)
                continue
            try:
                handlers = _load_file(path, is_yaml)
                _check_duplicates(handlers, loaded)
            except HandlerFileError as error:
                log.error("handlers file %s skipped: %s; fix the file and restart the agent",
                          path, error)
                continue
            for handler in handlers:
                loaded[(handler.path, handler.method)] = handler
            file_count += 1
        if skipped_yaml:
            log.warning("handlers files skipped because PyYAML is not installed: %s; install"
                        " python3-yaml (opkg install python3-yaml) or rewrite them as JSON",
                        ", ".join(skipped_yaml))
        self._handlers = loaded
        if loaded:
            log.info("loaded %d operator handlers from %d files in %s",
                     len(loaded), file_count, self.directory)
        return len(loaded)

    def _list_directory(self):
        try:
            entries = os.listdir(self.directory)
        except OSError as error:
            # ENOENT: no handlers directory is the normal case on a new router.
            if getattr(error, "errno", None) == 2:
                log.debug("handlers directory %s does not exist; no operator handlers",
                          self.directory)
            else:
                log.error("cannot list handlers directory %s: %s; no operator handlers loaded",
                          self.directory, error)
            return []
        names = []
        for name in entries:
            # Editors and package managers leave hidden files such as
            # `.x.json.swp` or `.x.json-opkg` next to the real ones.
            if name.startswith("."):
                continue
            if _has_suffix(name, JSON_SUFFIXES) or _has_suffix(name, YAML_SUFFIXES):
                names.append(name)
        names.sort()
        return names


def _has_suffix(name, suffixes):
    # MicroPython's str.endswith takes no tuple.
    for suffix in suffixes:
        if name.endswith(suffix):
            return True
    return False


def _load_file(path, is_yaml):
    document = _parse_file(path, is_yaml)
    if not isinstance(document, dict):
        raise HandlerFileError("the file must contain an object, found %s"
                               % _json_type_name(document))
    if "handlers" in document:
        extra = [key for key in document if key != "handlers"]
        if extra:
            raise HandlerFileError("unknown top-level key '%s' next to 'handlers'" % extra[0])
        entries = document["handlers"]
        if not isinstance(entries, list):
            raise HandlerFileError("'handlers' must be a list of objects, found %s"
                                   % _json_type_name(entries))
        in_list = True
    else:
        entries = [document]
        in_list = False
    handlers = []
    seen = {}
    for index, entry in enumerate(entries):
        label = "handlers[%d]" % index if in_list else "handler"
        handler = _build_handler(entry, label, path)
        key = (handler.path, handler.method)
        if key in seen:
            raise HandlerFileError("%s repeats path '%s' method '%s' of %s"
                                   % (label, handler.path, handler.method, seen[key]))
        seen[key] = label
        handlers.append(handler)
    return handlers


def _parse_file(path, is_yaml):
    if not is_file(path):
        raise HandlerFileError("it is not a regular file")
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_FILE_SIZE + 1)
    except OSError as error:
        raise HandlerFileError("the file cannot be read: %s" % error)
    if len(data) > MAX_FILE_SIZE:
        raise HandlerFileError("the file is larger than %d bytes" % MAX_FILE_SIZE)
    try:
        text = data.decode("utf-8")
    except UnicodeError:
        raise HandlerFileError("the file is not valid UTF-8")
    if is_yaml:
        try:
            return _yaml().safe_load(text)
        except _yaml().YAMLError as error:
            # PyYAML messages span several lines; the log line must stay one line.
            raise HandlerFileError("invalid YAML: %s" % " ".join(str(error).split()))
    try:
        return jsoncodec.loads(text)
    except ValueError as error:
        raise HandlerFileError("invalid JSON: %s" % error)


def _build_handler(entry, label, source):
    if not isinstance(entry, dict):
        raise HandlerFileError("%s must be an object, found %s" % (label, _json_type_name(entry)))
    for key in entry:
        if key not in HANDLER_KEYS:
            raise HandlerFileError("%s has unknown key '%s' (allowed: %s)"
                                   % (label, key, ", ".join(HANDLER_KEYS)))
    path = _check_name(entry, "path", label)
    if path == RESERVED_PATH:
        raise HandlerFileError("%s uses path '%s', which is reserved for the agent's own methods"
                               % (label, RESERVED_PATH))
    method = _check_name(entry, "method", label)
    command = _check_command(entry.get("command"), label)
    timeout = _check_timeout(entry.get("timeout"), label)
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise HandlerFileError("%s.description must be a string, found %s"
                               % (label, _json_type_name(description)))
    return Handler(path, method, command, timeout, description, source)


def _check_name(entry, key, label):
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise HandlerFileError("%s.%s must be a non-empty string, found %s"
                               % (label, key, _json_type_name(value)))
    if len(value) > MAX_NAME_LENGTH or "\0" in value:
        raise HandlerFileError("%s.%s must be at most %d characters without NUL"
                               % (label, key, MAX_NAME_LENGTH))
    return value


def _check_command(command, label):
    if not isinstance(command, list) or not command:
        raise HandlerFileError("%s.command must be a non-empty list of strings, found %s"
                               % (label, _json_type_name(command)))
    for index, element in enumerate(command):
        if not isinstance(element, str):
            raise HandlerFileError("%s.command[%d] must be a string, found %s"
                                   % (label, index, _json_type_name(element)))
        if "\0" in element:
            raise HandlerFileError("%s.command[%d] contains a NUL character" % (label, index))
        try:
            segments = parse_template(element)
        except ValueError as error:
            raise HandlerFileError("%s.command[%d]: %s" % (label, index, error))
        if index == 0:
            if not element:
                raise HandlerFileError("%s.command[0] must name a program" % label)
            # A request must never choose which program runs.
            for kind, value in segments:
                if kind == "arg":
                    raise HandlerFileError("%s.command[0] must not contain placeholders" % label)
    return command


def _check_timeout(timeout, label):
    if timeout is None:
        return None
    # `timeout != timeout` is True only for NaN.
    if (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
            or timeout != timeout or timeout <= 0 or timeout == float("inf")):
        raise HandlerFileError("%s.timeout must be a positive number of seconds, found %r"
                               % (label, timeout))
    return timeout


def _check_duplicates(handlers, loaded):
    for handler in handlers:
        other = loaded.get((handler.path, handler.method))
        if other is not None:
            raise HandlerFileError("path '%s' method '%s' is already declared in %s"
                                   % (handler.path, handler.method, other.source))
