"""Reading what the user wrote: a text file (UTF-8, or an error naming the byte that is not),
and YAML (a config, a ``--set`` value, a constitution) read so that it cannot explode or say two
things at once.

- **Aliases.** ``&a [1, 1]``, ``&b [*a, *a]``, ... nine levels deep is a few lines that expand to
  hundreds of millions of values: PyYAML shares them, but everything after it (validation,
  ``config show``, a stage) copies them out, for minutes and gigabytes. The document is measured
  as it would expand before anything is built from it, and refused above ``MAX_VALUES``, naming
  the key where it grows past that. An alias that contains itself is refused the same way.
- **Duplicate keys.** YAML's last-one-wins would silently drop the first value; both lines are
  named instead.
- **Nesting** deeper than ``MAX_DEPTH`` levels is refused, naming the key (far deeper would break
  the parser, or pydantic writing the config back out).

Errors are ``YAMLProblem`` (a ``UserError``) naming ``source:line`` and the dotted key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cai_cli.errors import UserError, not_found

# Values (scalars, lists and mappings, keys included) a document may expand to. A full config,
# every key given, is about 400; the limit leaves room for long trl_args lists and constitutions.
MAX_VALUES = 100_000
# Levels of nesting: a config has six or so; far deeper ones break the YAML parser, or pydantic
# when it writes the config back out (`config show`, the run directory's copy).
MAX_DEPTH = 64
MERGE_KEY = "<<"  # YAML's merge key may repeat and may override: it is not a duplicate
# libyaml's parser when PyYAML has it (several times faster: `cai status` reads the constitution
# once per stage), else PyYAML's own; both build the same nodes, marks included.
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file, in words for an error message; ``None`` if it can."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is not a regular file"
    return not_found(path)


def read_text(path: Path, *, newline: str | None = None) -> str:
    """The text of a UTF-8 file. ``newline=None`` turns \\r\\n and \\r into \\n as ``open``
    does; ``""`` keeps line endings as they are (what the csv module wants).

    A byte that is not UTF-8 is a UserError naming its line and byte offset, so the user can
    find it (a file saved as Latin-1 or UTF-16 by a spreadsheet is the usual cause)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at byte "
                        f"offset {exc.start}); save the file as UTF-8") from None
    return text if newline == "" else text.replace("\r\n", "\n").replace("\r", "\n")


class YAMLProblem(UserError):
    """A YAML document refused before it was read (too big through aliases, duplicate keys,
    nested too deeply)."""


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` after the checks above; ``source`` names the file (or the
    ``--set`` option) in messages. YAML syntax errors are raised as ``yaml.YAMLError``, for the
    caller to word."""
    try:
        node = yaml.compose(text, Loader=LOADER)
        if node is None:
            return None
        _check(node, source)
        loader = LOADER("")
        try:
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise YAMLProblem(f"{source}: nested too deeply to read; a config or a constitution "
                          "is a few levels deep") from None
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" not in str(exc.problem):  # libyaml's own limit (1,000)
            raise
        raise YAMLProblem(f"{source}: nested too deeply to read; a config or a constitution "
                          "is a few levels deep") from None
    except yaml.reader.ReaderError as exc:  # a control character: its message has no line
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        character = chr(exc.character) if isinstance(exc.character, int) else exc.character
        raise YAMLProblem(f"{source}:{line}: YAML cannot hold the character {character!r} "
                          f"(character {exc.position + 1} of the text); remove it") from None


def _children(node) -> list[tuple[str, Any]]:
    """``(label, node)`` of a node's children: ``[i]`` for list items, the key for values
    (key nodes are labelled ``key``)."""
    if isinstance(node, yaml.SequenceNode):
        return [(f"[{i}]", child) for i, child in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        out = []
        for key, value in node.value:
            label = str(key.value) if isinstance(key, yaml.ScalarNode) else "(key)"
            out += [("(key)", key), (label, value)]
        return out
    return []


def _check(root, source: str) -> None:
    sizes, depths = _sizes(root, source)
    if depths[id(root)] > MAX_DEPTH:
        path, node = [], root
        while isinstance(node, yaml.MappingNode):  # down the keys towards the deepest value
            label, node = max(((label, child) for label, child in _children(node)
                               if label != "(key)"), key=lambda c: depths[id(c[1])])
            path.append(label)
        raise YAMLProblem(
            f"{source}:{node.start_mark.line + 1}: {_dotted(path) or '(the document)'} is "
            f"nested {depths[id(node)]} levels deep; cai reads at most "
            f"{MAX_DEPTH} levels from one file")
    if sizes[id(root)] > MAX_VALUES:
        path, node = [], root
        while True:  # down to the first value that alone is too big, and no further
            found = next(((label, child) for label, child in _children(node)
                          if label != "(key)" and sizes[id(child)] > MAX_VALUES), None)
            if found is None:
                break
            path.append(found[0])
            node = found[1]
        raise YAMLProblem(
            f"{source}:{node.start_mark.line + 1}: {_dotted(path) or '(the document)'} expands "
            f"to {sizes[id(node)]:,}{'+' if sizes[id(node)] >= 10 * MAX_VALUES else ''} values (YAML aliases *name repeat what &name marks); "
            f"cai reads at most {MAX_VALUES:,} from one file: write the values out, or repeat "
            "less")
    _duplicates(root, source)


def _sizes(root, source: str) -> tuple[dict[int, int], dict[int, int]]:
    """How many values each node expands to, and how many levels deep it goes, computed once per
    node (aliases share nodes) and without recursion; a node inside itself is refused."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children = [child for _, child in _children(node)]
        if done:
            open_nodes.discard(id(node))
            # capped: the exact count of a bomb is astronomically large and means nothing
            sizes[id(node)] = min(1 + sum(sizes[id(c)] for c in children), 10 * MAX_VALUES)
            depths[id(node)] = 1 + max((depths[id(c)] for c in children), default=0)
            continue
        if id(node) in open_nodes:
            raise YAMLProblem(f"{source}:{node.start_mark.line + 1}: a YAML alias (*name) "
                              "refers to the value it is inside, which would never end; "
                              "write the value out")
        open_nodes.add(id(node))
        stack.append((node, True))
        for child in reversed(children):
            if id(child) in open_nodes:
                raise YAMLProblem(f"{source}:{child.start_mark.line + 1}: a YAML alias (*name) "
                                  "refers to the value it is inside, which would never end; "
                                  "write the value out")
            if id(child) not in sizes:
                stack.append((child, False))
    return sizes, depths


def _duplicates(root, source: str) -> None:
    """Refuse a mapping that gives a key twice, naming the key and both lines."""
    seen: set[int] = set()
    stack: list[tuple[Any, list[str]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.value == MERGE_KEY:
                    continue
                line = key.start_mark.line + 1
                if key.value in lines:
                    raise YAMLProblem(
                        f"{source}:{line}: {_dotted(path + [key.value])} is given twice (lines "
                        f"{lines[key.value]} and {line}); keep one (YAML would silently keep "
                        "the last)")
                lines[key.value] = line
        for label, child in _children(node):
            if label != "(key)":
                stack.append((child, path + [label]))


def _dotted(path: list[str]) -> str:
    out = ""
    for part in path:
        out += part if part.startswith("[") or not out else f".{part}"
    return out
