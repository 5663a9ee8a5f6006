"""Operator handler files: loading, validation and placeholders."""

import json
import logging
import os

import pytest

from spotfi_agent import handlers
from spotfi_agent.handlers import Handler, HandlerArgumentError, HandlerRegistry, parse_template

GOOD = {"path": "ops", "method": "good", "command": ["/bin/echo", "ok"]}


@pytest.fixture
def handlers_dir(tmp_path):
    directory = tmp_path / "handlers.d"
    directory.mkdir()
    return directory


def write(directory, name, content):
    text = content if isinstance(content, str) else json.dumps(content)
    (directory / name).write_text(text)
    return str(directory / name)


def load(directory):
    registry = HandlerRegistry(str(directory))
    registry.load()
    return registry


# Loading.


def test_load_json_list_and_single_object(handlers_dir, logs):
    write(handlers_dir, "a.json", {"handlers": [
        {"path": "ops", "method": "one", "command": ["/bin/echo", "1"], "timeout": 5,
         "description": "First"},
        {"path": "ops", "method": "two", "command": ["/bin/echo", "2"]},
    ]})
    write(handlers_dir, "b.json", {"path": "net", "method": "three", "command": ["/bin/true"]})
    registry = load(handlers_dir)
    assert [(h.path, h.method) for h in registry.handlers] == [
        ("net", "three"), ("ops", "one"), ("ops", "two")]
    one = registry.find("ops", "one")
    assert one.command == ["/bin/echo", "1"]
    assert one.timeout == 5
    assert one.description == "First"
    assert one.source == str(handlers_dir / "a.json")
    assert registry.find("ops", "two").timeout is None
    assert registry.find("ops", "two").description == ""
    assert registry.find("ops", "missing") is None
    assert logs.messages(logging.ERROR) == []


def test_load_yaml_files(handlers_dir, logs):
    write(handlers_dir, "a.yaml", (
        "handlers:\n"
        "  - path: ops\n"
        "    method: greet\n"
        "    command: [/bin/echo, \"hello {args.name}\"]\n"
        "    timeout: 2.5\n"
        "    description: Print a greeting\n"))
    write(handlers_dir, "b.yml", "path: ops\nmethod: uptime\ncommand:\n  - /usr/bin/uptime\n")
    registry = load(handlers_dir)
    greet = registry.find("ops", "greet")
    assert greet.build_argv({"name": "ann"}) == ["/bin/echo", "hello ann"]
    assert greet.timeout == 2.5
    assert registry.find("ops", "uptime").command == ["/usr/bin/uptime"]
    assert logs.messages(logging.ERROR) == []


def test_yaml_skipped_without_pyyaml(handlers_dir, logs, monkeypatch):
    monkeypatch.setattr(handlers, "yaml", None)
    first = write(handlers_dir, "a.yaml", "path: ops\nmethod: a\ncommand: [/bin/true]\n")
    second = write(handlers_dir, "b.yml", "path: ops\nmethod: b\ncommand: [/bin/true]\n")
    write(handlers_dir, "c.json", GOOD)
    registry = load(handlers_dir)
    assert [(h.path, h.method) for h in registry.handlers] == [("ops", "good")]
    warnings = logs.messages(logging.WARNING)
    assert len(warnings) == 1
    assert first in warnings[0]
    assert second in warnings[0]
    assert "python3-yaml" in warnings[0]


def test_other_files_ignored(handlers_dir, logs):
    write(handlers_dir, "notes.txt", "not a handler")
    write(handlers_dir, ".hidden.json", "{broken")
    write(handlers_dir, "ops.json.bak", "{broken")
    write(handlers_dir, "ops.json", GOOD)
    registry = load(handlers_dir)
    assert len(registry.handlers) == 1
    assert logs.messages(logging.ERROR) == []


def test_missing_directory_loads_nothing(tmp_path, logs):
    registry = load(tmp_path / "absent")
    assert registry.handlers == []
    assert logs.messages(logging.ERROR) == []
    assert logs.messages(logging.WARNING) == []


def test_reload_adds_and_removes(handlers_dir):
    registry = load(handlers_dir)
    assert registry.handlers == []
    path = write(handlers_dir, "ops.json", GOOD)
    assert registry.reload() == 1
    assert registry.find("ops", "good") is not None
    os.remove(path)
    assert registry.reload() == 0
    assert registry.find("ops", "good") is None


def test_describe_uses_default_timeout(handlers_dir):
    write(handlers_dir, "ops.json", {"handlers": [
        dict(GOOD, description="Say ok"),
        {"path": "ops", "method": "t", "command": ["/bin/true"], "timeout": 3},
    ]})
    described = load(handlers_dir).describe(30)
    assert described == [
        {"path": "ops", "method": "good", "timeout": 30, "description": "Say ok"},
        {"path": "ops", "method": "t", "timeout": 3, "description": ""},
    ]


# Invalid files: each is skipped with one error line naming it; others still load.

BAD_FILES = [
    ("syntax.json", "{\"path\": ", "invalid JSON"),
    ("syntax.yaml", "path: [unclosed\n", "invalid YAML"),
    ("array.json", [GOOD], "must contain an object"),
    ("empty.yaml", "", "must contain an object"),
    ("handlers-object.json", {"handlers": GOOD}, "'handlers' must be a list"),
    ("extra-top.json", {"handlers": [], "version": 1}, "unknown top-level key 'version'"),
    ("entry-string.json", {"handlers": ["ops"]}, "handlers[0] must be an object"),
    ("unknown-key.json", dict(GOOD, shell=True), "unknown key 'shell'"),
    ("no-path.json", {"method": "m", "command": ["/bin/true"]}, "path must be a non-empty"),
    ("empty-method.json", {"path": "p", "method": "", "command": ["/bin/true"]},
     "method must be a non-empty"),
    ("long-path.json", {"path": "p" * 257, "method": "m", "command": ["/bin/true"]},
     "at most 256"),
    ("reserved.json", {"path": "spotfi.agent", "method": "ping", "command": ["/bin/true"]},
     "reserved"),
    ("no-command.json", {"path": "p", "method": "m"}, "command must be a non-empty list"),
    ("command-string.json", {"path": "p", "method": "m", "command": "/bin/true"},
     "command must be a non-empty list"),
    ("command-empty.json", {"path": "p", "method": "m", "command": []},
     "command must be a non-empty list"),
    ("command-number.json", {"path": "p", "method": "m", "command": ["/bin/echo", 5]},
     "command[1] must be a string"),
    ("program-empty.json", {"path": "p", "method": "m", "command": [""]},
     "command[0] must name a program"),
    ("program-placeholder.json", {"path": "p", "method": "m", "command": ["{args.prog}"]},
     "command[0] must not contain placeholders"),
    ("bad-placeholder.json", {"path": "p", "method": "m", "command": ["/bin/echo", "{name}"]},
     "not of the form {args.NAME}"),
    ("empty-placeholder.json", {"path": "p", "method": "m", "command": ["/bin/echo", "{args.}"]},
     "no argument name"),
    ("unmatched-open.json", {"path": "p", "method": "m", "command": ["/bin/echo", "{args.x"]},
     "unmatched '{'"),
    ("unmatched-close.json", {"path": "p", "method": "m", "command": ["/bin/echo", "x}"]},
     "unmatched '}'"),
    ("timeout-zero.json", dict(GOOD, timeout=0), "timeout must be a positive number"),
    ("timeout-bool.json", dict(GOOD, timeout=True), "timeout must be a positive number"),
    ("timeout-string.json", dict(GOOD, timeout="10"), "timeout must be a positive number"),
    ("description-number.json", dict(GOOD, description=1), "description must be a string"),
    ("duplicate.json", {"handlers": [dict(GOOD, method="x"), dict(GOOD, method="x")]},
     "handlers[1] repeats path 'ops' method 'x' of handlers[0]"),
    ("not-utf8.json", None, "not valid UTF-8"),
]


@pytest.mark.parametrize("name, content, problem", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_file_skipped(handlers_dir, logs, name, content, problem):
    if content is None:
        (handlers_dir / name).write_bytes(b'{"path": "\xff"}')
        bad_path = str(handlers_dir / name)
    else:
        bad_path = write(handlers_dir, name, content)
    write(handlers_dir, "zz-good.json", GOOD)
    registry = load(handlers_dir)
    assert [(h.path, h.method) for h in registry.handlers] == [("ops", "good")]
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1
    assert bad_path in errors[0]
    assert problem in errors[0]
    assert "\n" not in errors[0]


def test_file_with_one_bad_handler_skipped_whole(handlers_dir, logs):
    write(handlers_dir, "mixed.json", {"handlers": [
        dict(GOOD, method="fine"), {"path": "ops", "method": "broken"}]})
    registry = load(handlers_dir)
    assert registry.handlers == []
    assert len(logs.messages(logging.ERROR)) == 1


def test_duplicate_across_files_skips_later(handlers_dir, logs):
    first = write(handlers_dir, "a.json", GOOD)
    second = write(handlers_dir, "b.json", {"handlers": [
        dict(GOOD, command=["/bin/echo", "other"]), dict(GOOD, method="extra")]})
    registry = load(handlers_dir)
    assert registry.find("ops", "good").command == ["/bin/echo", "ok"]
    assert registry.find("ops", "extra") is None
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1
    assert second in errors[0]
    assert first in errors[0]


def test_oversized_file_skipped(handlers_dir, logs):
    path = write(handlers_dir, "big.json", dict(GOOD, description="d" * (300 * 1024)))
    assert load(handlers_dir).handlers == []
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1
    assert path in errors[0]
    assert "larger than" in errors[0]


def test_directory_named_json_skipped(handlers_dir, logs):
    (handlers_dir / "sub.json").mkdir()
    assert load(handlers_dir).handlers == []
    errors = logs.messages(logging.ERROR)
    assert len(errors) == 1
    assert "not a regular file" in errors[0]


# Placeholders.


def test_parse_template_segments():
    assert parse_template("plain") == [("text", "plain")]
    assert parse_template("") == []
    assert parse_template("a{args.x}b{args.y-z}") == [
        ("text", "a"), ("arg", "x"), ("text", "b"), ("arg", "y-z")]
    assert parse_template("{{literal}}") == [("text", "{literal}")]
    assert parse_template("{{{args.x}}}") == [("text", "{"), ("arg", "x"), ("text", "}")]


@pytest.mark.parametrize("template, problem", [
    ("{args.a b}", "only letters"),
    ("{args.a.b}", "only letters"),
    ("{ args.x }", "not of the form"),
    ("{}", "not of the form"),
    ("}", "unmatched '}'"),
    ("{", "unmatched '{'"),
])
def test_parse_template_errors(template, problem):
    with pytest.raises(ValueError) as raised:
        parse_template(template)
    assert problem in str(raised.value)


def make_handler(*command):
    return Handler("ops", "run", list(command), None, "", "test")


def test_build_argv_scalars():
    handler = make_handler("/bin/echo", "{args.s}", "n={args.n}", "{args.f}", "{args.yes}",
                           "{args.no}", "{{{args.s}}}")
    argv = handler.build_argv({"s": "a b", "n": 42, "f": 1.5, "yes": True, "no": False})
    assert argv == ["/bin/echo", "a b", "n=42", "1.5", "true", "false", "{a b}"]


def test_build_argv_keeps_shell_syntax_literal():
    handler = make_handler("/bin/echo", "{args.s}")
    assert handler.build_argv({"s": "$(reboot); `id` && rm -rf /"}) == [
        "/bin/echo", "$(reboot); `id` && rm -rf /"]


def test_build_argv_missing_arg():
    handler = make_handler("/bin/cp", "{args.source}", "{args.target}")
    with pytest.raises(HandlerArgumentError) as raised:
        handler.build_argv({"source": "a"})
    message = str(raised.value)
    assert "'target'" in message
    assert "missing" in message
    assert "source, target" in message


@pytest.mark.parametrize("value, type_name", [
    ([1], "array"), ({"a": 1}, "object"), (None, "null")])
def test_build_argv_non_scalar_arg(value, type_name):
    handler = make_handler("/bin/echo", "{args.x}")
    with pytest.raises(HandlerArgumentError) as raised:
        handler.build_argv({"x": value})
    assert "'x'" in str(raised.value)
    assert type_name in str(raised.value)


def test_build_argv_rejects_nul():
    handler = make_handler("/bin/echo", "{args.x}")
    with pytest.raises(HandlerArgumentError) as raised:
        handler.build_argv({"x": "a\0b"})
    assert "NUL" in str(raised.value)


def test_arg_names_in_order():
    handler = make_handler("/bin/x", "{args.b}", "{args.a}-{args.b}")
    assert handler.arg_names() == ["b", "a"]
