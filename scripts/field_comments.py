"""The comment written for each field of a dataclass, read from its source: the comment lines
directly above the field and the comments beside its lines. A class made by
`make_dataclass(NAME, [(field, type, ...), ...])` has no source of its own: its fields' comments
are read beside the tuples of that call, in whichever loaded module imports make_dataclass.
Used by config_reference.py (docs/config.md)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize
from functools import cache


def _comment_lines(source: str) -> dict[int, tuple[str, bool]]:
    """Line -> (comment text, whether the line holds only the comment)."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            found[tok.start[0]] = (text, tok.line.strip().startswith("#"))
    return found


def _described(node: ast.AST, comments: dict[int, tuple[str, bool]]) -> str:
    """The comment lines directly above a statement, then the comments beside its lines."""
    above, line = [], node.lineno - 1
    while line in comments and comments[line][1]:
        above.insert(0, comments[line][0])
        line -= 1
    beside = [
        comments[n][0]
        for n in range(node.lineno, node.end_lineno + 1)
        if n in comments and not comments[n][1]
    ]
    return " ".join(above + beside)


@cache
def _class_comments(cls: type) -> dict[str, str]:
    """Field name -> comment, from the class's own source (a `class` statement, or a
    `make_dataclass(NAME, [(field, ...), ...])` call in a loaded module)."""
    try:
        source = textwrap.dedent("".join(inspect.getsourcelines(cls)[0]))
    except (OSError, TypeError):
        return _made_comments(cls.__name__)
    comments, tree = _comment_lines(source), ast.parse(source)
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    return {
        node.target.id: _described(node, comments)
        for node in body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


@cache
def _module_source(name: str) -> str:
    try:
        return inspect.getsource(sys.modules[name])
    except (OSError, TypeError, KeyError):
        return ""


def _made_comments(class_name: str) -> dict[str, str]:
    """Comments of the fields of a class made by `make_dataclass(class_name, [...])`, looked up
    in the loaded modules that import make_dataclass."""
    found: dict[str, str] = {}
    makers = [
        name
        for name, module in list(sys.modules.items())
        if getattr(module, "make_dataclass", None) is dataclasses.make_dataclass
    ]
    for module in makers:
        source = _module_source(module)
        if f'"{class_name}"' not in source:
            continue
        comments = _comment_lines(source)
        for call in ast.walk(ast.parse(source)):
            if not (isinstance(call, ast.Call) and len(call.args) >= 2):
                continue
            name, fields = call.args[0], call.args[1]
            if not (isinstance(name, ast.Constant) and name.value == class_name):
                continue
            for entry in getattr(fields, "elts", []):
                key = entry.elts[0] if isinstance(entry, ast.Tuple) and entry.elts else None
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    found[key.value] = _described(entry, comments)
    return found


def field_comment(cls: type, name: str) -> str:
    """The comment of field `name`: the class's own, else the nearest base class's."""
    for klass in cls.__mro__:
        if dataclasses.is_dataclass(klass) and _class_comments(klass).get(name):
            return _class_comments(klass)[name]
    return ""
