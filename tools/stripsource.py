#!/usr/bin/env python3
"""Remove comments and docstrings from a Python module, keeping its line numbers.

spotfi-agent and spotfi-agent-paho ship the agent as source, and its comments
and docstrings are a large part of the package. strip() removes every
comment and replaces every docstring (the first statement of a module,
class or function, when it is a string literal) by "". Every line stays
where it was, so a traceback from a router names the same line as the file
in git, and the blank lines left behind compress to almost nothing. Other
string literals are never changed. A shebang on line 1 and a PEP 263
encoding declaration on line 1 or 2 are kept. The output depends only on
the input text.

Usage: stripsource.py IN OUT (the feed Makefile and tools/build_ipk.py run it).
"""

import ast
import io
import re
import sys
import tokenize

# PEP 263's pattern for an encoding declaration.
_CODING_RE = re.compile(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)")
_LINE_END_RE = re.compile(r"\r\n|\r|\n")


class StripError(Exception):
    """Raised when a module cannot be parsed, or its stripped text would not run the same."""


def _docstring_nodes(tree):
    """Return the Expr nodes that are docstrings: a str literal first in a module, class or function."""
    owners = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = []
    for node in ast.walk(tree):
        if not isinstance(node, owners) or not node.body:
            continue
        first = node.body[0]
        if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)):
            nodes.append(first)
    return nodes


def blank_docstrings(tree):
    """Set every docstring of `tree` to "" in place and return `tree` (what strip() does, on the AST)."""
    for node in _docstring_nodes(tree):
        node.value.value = ""
        node.value.kind = None
    return tree


def _is_kept_comment(row, comment):
    if row == 1 and comment.startswith("#!"):
        return True
    return row <= 2 and _CODING_RE.match(comment) is not None


def _char_column(line, byte_column):
    # ast counts columns in UTF-8 bytes, tokenize in characters.
    return len(line.encode("utf-8")[:byte_column].decode("utf-8"))


def strip(text):
    """Return `text` without comments and with each docstring replaced by "", on the same lines."""
    try:
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError) as error:
        raise StripError("cannot parse the module: %s" % error) from None

    lines = text.splitlines(keepends=True)
    offsets = [0]
    for line in lines:
        offsets.append(offsets[-1] + len(line))

    def offset(row, column):
        return offsets[row - 1] + column

    # (start, end, replacement) as offsets into `text`. The spans never overlap.
    edits = []
    for token in tokens:
        if token.type != tokenize.COMMENT or _is_kept_comment(token.start[0], token.string):
            continue
        row, column = token.start
        # The spaces before a trailing comment go too, so no line ends in blanks.
        before = lines[row - 1][:column]
        start_column = len(before.rstrip(" \t\f"))
        edits.append((offset(row, start_column), offset(*token.end), ""))

    for node in _docstring_nodes(tree):
        value = node.value
        start = offset(value.lineno, _char_column(lines[value.lineno - 1], value.col_offset))
        end = offset(value.end_lineno,
                     _char_column(lines[value.end_lineno - 1], value.end_col_offset))
        code_after = [token for token in tokens
                      if token.start[0] == value.end_lineno and offset(*token.start) >= end
                      and token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)]
        # Code after the docstring on its last line (`"""x"""; y = 1`, or the
        # `)` of a parenthesized one) stays on the docstring's logical line
        # through backslash continuations.
        joiner = "\\" if code_after else ""
        line_ends = _LINE_END_RE.findall(text[start:end])
        edits.append((start, end, '""' + "".join(joiner + ending for ending in line_ends)))

    result = text
    for start, end, replacement in sorted(edits, reverse=True):
        result = result[:start] + replacement + result[end:]
    _check(text, tree, result)
    return result


def _check(text, tree, result):
    """Raise StripError unless `result` has the lines of `text` and its AST with blank docstrings."""
    if len(result.splitlines()) != len(text.splitlines()):
        raise StripError("stripping changed the number of lines from %d to %d"
                         % (len(text.splitlines()), len(result.splitlines())))
    try:
        stripped_tree = ast.parse(result)
    except SyntaxError as error:
        raise StripError("the stripped module does not parse: %s" % error) from None
    if ast.dump(stripped_tree) != ast.dump(blank_docstrings(tree)):
        raise StripError("the stripped module's AST differs from the original's, which is "
                         "a bug in stripsource.py: report it with the module")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.stderr.write("usage: stripsource.py IN OUT\n")
        return 2
    source, target = argv
    try:
        with open(source, "rb") as handle:
            encoding, _ = tokenize.detect_encoding(handle.readline)
            handle.seek(0)
            # newline="" keeps the line endings as they are.
            text = io.TextIOWrapper(handle, encoding=encoding, newline="").read()
        stripped = strip(text)
        with open(target, "w", encoding=encoding, newline="") as handle:
            handle.write(stripped)
    except OSError as error:
        sys.stderr.write("stripsource: %s: %s\n" % (error.filename or source, error.strerror))
        return 1
    except (StripError, SyntaxError, UnicodeDecodeError) as error:
        sys.stderr.write("stripsource: %s: %s\n" % (source, error))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
