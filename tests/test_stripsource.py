"""tools/stripsource.py: comments and docstrings removed, every line and every other string kept."""

import ast
import io
import os
import subprocess
import sys
import tokenize

import pytest

import stripsource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AGENT_DIR = os.path.join(ROOT, "agent")
STRIPSOURCE = os.path.join(ROOT, "tools", "stripsource.py")


def agent_modules():
    modules = []
    for directory, subdirectories, files in os.walk(os.path.join(AGENT_DIR, "spotfi_agent")):
        subdirectories[:] = [name for name in subdirectories if name != "__pycache__"]
        for name in files:
            if name.endswith(".py"):
                modules.append(os.path.relpath(os.path.join(directory, name), AGENT_DIR))
    return sorted(modules)


def read_source(module):
    with open(os.path.join(AGENT_DIR, module), encoding="utf-8", newline="") as handle:
        return handle.read()


def comments(text):
    return [token.string for token in tokenize.generate_tokens(io.StringIO(text).readline)
            if token.type == tokenize.COMMENT]


def docstring_spans(tree):
    """Return the (start, end) of each docstring as ((line, byte column), (line, byte column))."""
    spans = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                and ast.get_docstring(node, clean=False) is not None:
            value = node.body[0].value
            spans.append(((value.lineno, value.col_offset),
                          (value.end_lineno, value.end_col_offset)))
    return spans


def other_strings(text):
    """Return the string tokens of `text` that are not part of a docstring, in order."""
    spans = docstring_spans(ast.parse(text))
    lines = text.splitlines(keepends=True)
    kept = []
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type != tokenize.STRING:
            continue
        row, column = token.start
        position = (row, len(lines[row - 1][:column].encode("utf-8")))
        if not any(start <= position < end for start, end in spans):
            kept.append(token.string)
    return kept


def test_agent_modules_found():
    modules = agent_modules()

    assert "spotfi_agent/__init__.py" in modules
    assert "spotfi_agent/paho_transport.py" in modules


@pytest.mark.parametrize("module", agent_modules())
def test_strip_agent_module(module):
    source = read_source(module)
    stripped = stripsource.strip(source)

    compile(stripped, module, "exec")
    assert len(stripped.splitlines()) == len(source.splitlines())
    assert stripped.count("\n") == source.count("\n")
    expected = ast.dump(stripsource.blank_docstrings(ast.parse(source)))
    assert ast.dump(ast.parse(stripped)) == expected
    assert comments(stripped) == []
    assert len(stripped) <= len(source)


@pytest.mark.parametrize("module", agent_modules())
def test_strip_agent_module_keeps_other_strings(module):
    source = read_source(module)
    stripped = stripsource.strip(source)

    assert other_strings(stripped) == other_strings(source)


SAMPLE = '''#!/usr/bin/env python3
# -*- coding: utf-8 -*-
"""Module docstring,
on two lines."""  # trailing comment

import os  # reason

TABLE = {"hash": "# not a comment", 'quote': """a
multi-line value""", "empty": ""}
PATTERN = r"\\d+  # also not a comment"


class Example:
    \'\'\'Class docstring.\'\'\'

    def method(self):
        """Docstring."""; value = 1
        return value

    def parenthesized(self):
        ("first part "
         "second part")
        "a second statement, not a docstring"
        return b"bytes"


async def coroutine():
    # a whole-line comment
    return "Ünïcode # text"


def undocumented():
    return f"{TABLE['hash']}"
'''


def test_strip_sample_keeps_strings_byte_for_byte():
    stripped = stripsource.strip(SAMPLE)

    assert other_strings(stripped) == other_strings(SAMPLE)

    assert 'TABLE = {"hash": "# not a comment", \'quote\': """a\nmulti-line value""", ' \
        '"empty": ""}\n' in stripped
    assert 'PATTERN = r"\\d+  # also not a comment"\n' in stripped
    assert '"a second statement, not a docstring"' in stripped
    assert 'return "Ünïcode # text"' in stripped
    assert 'return b"bytes"' in stripped
    assert "return f\"{TABLE['hash']}\"" in stripped


def test_strip_sample_removes_comments_and_docstrings():
    stripped = stripsource.strip(SAMPLE)
    lines = stripped.split("\n")

    assert comments(stripped) == ["#!/usr/bin/env python3", "# -*- coding: utf-8 -*-"]
    assert lines[0] == "#!/usr/bin/env python3"
    assert lines[1] == "# -*- coding: utf-8 -*-"
    assert lines[2] == '""'
    assert lines[3] == ""
    assert lines[5] == "import os"
    assert lines[13] == '    ""'
    assert lines[16] == '        ""; value = 1'
    assert "Module docstring" not in stripped
    assert "Class docstring" not in stripped
    assert "Docstring." not in stripped
    assert "first part" not in stripped
    assert all(line == line.rstrip() for line in lines)


def test_strip_sample_keeps_lines_and_ast():
    stripped = stripsource.strip(SAMPLE)

    assert len(stripped.splitlines()) == len(SAMPLE.splitlines())
    assert ast.dump(ast.parse(stripped)) == ast.dump(
        stripsource.blank_docstrings(ast.parse(SAMPLE)))
    for number, line in enumerate(SAMPLE.splitlines(), start=1):
        if line.lstrip().startswith("return"):
            assert stripped.splitlines()[number - 1] == line, number


def test_strip_keeps_crlf_line_endings():
    source = '"""Doc\r\nstring."""\r\nx = 1  # why\r\n'

    assert stripsource.strip(source) == '""\r\n\r\nx = 1\r\n'


def test_strip_is_idempotent():
    once = stripsource.strip(SAMPLE)

    assert stripsource.strip(once) == once


def test_strip_rejects_invalid_module():
    with pytest.raises(stripsource.StripError) as error:
        stripsource.strip("def broken(:\n    pass\n")

    assert "cannot parse" in str(error.value)


def test_main_writes_stripped_file(tmp_path):
    source = tmp_path / "module.py"
    target = tmp_path / "out.py"
    source.write_bytes(SAMPLE.encode("utf-8"))

    result = subprocess.run([sys.executable, STRIPSOURCE, str(source), str(target)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert target.read_bytes() == stripsource.strip(SAMPLE).encode("utf-8")


def test_main_reports_invalid_module(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("def broken(:\n")

    result = subprocess.run([sys.executable, STRIPSOURCE, str(source), str(tmp_path / "out.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 1
    assert "broken.py" in result.stderr
    assert "cannot parse" in result.stderr
    assert not (tmp_path / "out.py").exists()


def test_main_reports_missing_file(tmp_path):
    result = subprocess.run([sys.executable, STRIPSOURCE, str(tmp_path / "absent.py"),
                             str(tmp_path / "out.py")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True, timeout=60)

    assert result.returncode == 1
    assert "absent.py" in result.stderr
