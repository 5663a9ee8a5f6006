"""JSON loads() and dumps() for the agent, without the cost of CPython's json package.

CPython's json package imports re (and with it enum, functools and
collections) for the pure-Python fallbacks it keeps beside its C accelerator,
which costs about 1.2 MB of RSS on CPython 3.11. The accelerator module
_json does the parsing and encoding by itself, so on CPython this module
drives it directly. On MicroPython, on interpreters without _json, and
whenever the json package is already loaded anyway, it hands over to json.

Both functions behave as json.loads() and json.dumps() with default
arguments: errors are ValueError (bad JSON) and TypeError (a value JSON
cannot hold).
"""

import sys

loads = None
dumps = None

_WHITESPACE = " \t\n\r"


def _skip_whitespace(text, index):
    end = len(text)
    while index < end and text[index] in _WHITESPACE:
        index += 1
    return index


def _raise_unserializable(value):
    raise TypeError("Object of type %s is not JSON serializable" % type(value).__name__)


def _build_accelerated():
    import _json

    class ScannerSettings:
        # The attributes _json.make_scanner reads, with json.loads()'s defaults.
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"NaN": float("nan"), "Infinity": float("inf"),
                          "-Infinity": float("-inf")}.__getitem__

    scan = _json.make_scanner(ScannerSettings())
    make_encoder = _json.make_encoder
    escape = _json.encode_basestring_ascii
    # Called once here so that a _json taking other arguments fails at import.
    make_encoder({}, _raise_unserializable, escape, None, ": ", ", ", False, False, True)

    def fast_loads(text):
        if not isinstance(text, str):
            text = bytes(text).decode("utf-8")
        start = _skip_whitespace(text, 0)
        try:
            value, end = scan(text, start)
        except StopIteration as error:
            raise ValueError("Expecting value: char %d" % error.value)
        except SystemError:
            # _json raises its errors inside strings, objects and arrays as
            # json.decoder.JSONDecodeError, looked up in sys.modules only, so
            # until the json package is loaded it fails without an exception.
            # The first such payload loads it, which also gives the usual
            # message for this one.
            import json

            return json.loads(text)
        end = _skip_whitespace(text, end)
        if end != len(text):
            raise ValueError("Extra data: char %d" % end)
        return value

    def fast_dumps(value):
        if isinstance(value, str):
            return escape(value)
        # A new encoder each time, as json.dumps() makes one: the encoder
        # keeps the ids of the containers it is inside in its markers dict,
        # and an error half-way leaves them there.
        encode = make_encoder({}, _raise_unserializable, escape, None, ": ", ", ", False, False, True)
        return "".join(encode(value, 0))

    return fast_loads, fast_dumps


if "json" not in sys.modules:
    try:
        loads, dumps = _build_accelerated()
    except (ImportError, AttributeError, TypeError):
        # MicroPython, or a CPython whose _json takes other arguments.
        loads = None

if loads is None:
    import json

    loads = json.loads
    dumps = json.dumps
