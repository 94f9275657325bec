"""Pydantic validation errors as the short messages a user reads: where the value is (a dotted
path, ``[i]`` for list entries), then what is wrong with it and, for a misspelt key, the closest
valid name.

Two wordings, one for each kind of file validated with pydantic:

- the config (``describe``) names the offending key in the path and keeps pydantic's own text
  with the value given: ``generate_sl.num_revison: unknown key; did you mean 'num_revisions'?``,
  ``models.policy.name_or_path: required but missing``;
- a constitution (``describe_entry``) names the entry, then the key, in plainer words for its
  texts and A/B answers: ``principles[0]: missing 'revision'``, ``principles[1].critique: is
  empty; write the text``.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any, Union

from pydantic import BaseModel


def location(loc: tuple | list) -> str:
    """``("principles", 3, "id")`` -> ``principles[3].id``."""
    out = ""
    for item in loc:
        out += f"[{item}]" if isinstance(item, int) else (f".{item}" if out else str(item))
    return out


def unwrap(annotation: Any) -> list[Any]:
    """The concrete types inside Optional/Union annotations."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:  # a tagged member of a union
        return unwrap(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [t for arg in typing.get_args(annotation) for t in unwrap(arg)]
    return [annotation]


def model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class found by walking field names from ``root``. Where a field holds
    one of several models (a tagged union), a tag in ``loc`` (as pydantic puts it there) picks
    the member; without one, the first member that has the next field."""
    models: list[type[BaseModel]] = [root]
    for part in loc:
        if isinstance(part, int) or not models:
            continue
        tagged = [m for m in models if _tag_of(m) == part]
        if tagged:
            models = tagged
            continue
        owner = next((m for m in models if str(part) in m.model_fields), None)
        if owner is None:
            return None
        models = nested_models(owner.model_fields[str(part)].annotation)
        if not models:  # a list of models (evaluate.judges): its entries' classes
            models = [m for kind in unwrap(owner.model_fields[str(part)].annotation)
                      if typing.get_origin(kind) is list
                      for m in nested_models(typing.get_args(kind)[0])]
    return models[0] if models else None


def _tag_of(model: type[BaseModel]) -> Any:
    """The value of the model's literal field with a default (its tag in a tagged union)."""
    for field in model.model_fields.values():
        if typing.get_origin(field.annotation) is typing.Literal and field.default is not None:
            return field.default
    return None


def nested_model(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``Optional[LoraConfig]`` -> ``LoraConfig``), if any."""
    models = nested_models(annotation)
    return models[0] if models else None


def nested_models(annotation: Any) -> list[type[BaseModel]]:
    """Every pydantic model a field may hold (the members of a union, in order)."""
    return [t for t in unwrap(annotation) if isinstance(t, type) and issubclass(t, BaseModel)]


def closest(name: str, options: list[str], cutoff: float = 0.5) -> str | None:
    """The option ``name`` is most likely a misspelling of, if any is close enough."""
    matches = difflib.get_close_matches(name, options, n=1, cutoff=cutoff)
    return matches[0] if matches else None


def describe(error: dict, root: type[BaseModel], tags: tuple[str, ...] = ()) -> str:
    """One pydantic error of a model under ``root`` as ``a.b.c: what is wrong`` (config wording).
    ``tags`` are the names of a tagged union's branches (the config's model backends)."""
    # pydantic adds the branch of a Union to the location ("str", "list[str]", a tag); drop those,
    # but not an unknown key the user wrote, which is the last part and may look like one ("[").
    parts = error["loc"]
    unknown = error["type"] == "extra_forbidden"
    tagged = tuple(p for i, p in enumerate(parts)
                   if (unknown and i == len(parts) - 1)
                   or not (isinstance(p, str) and ("[" in p or p in ("str", "int"))))
    # A tag is dropped where it picks a union's member, not where it is a key (optimize.vllm).
    loc = tuple(p for i, p in enumerate(tagged)
                if p not in tags or p in getattr(model_at(root, tagged[:i]), "model_fields", {}))
    where = location(loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        model = model_at(root, tagged[:-1])
        hint = ""
        if model is not None and loc:
            close = closest(str(loc[-1]), list(model.model_fields))
            hint = (f"; did you mean '{close}'?" if close
                    else f"; valid keys: {', '.join(model.model_fields)}")
        return f"{where}: unknown key{hint}"
    if error["type"] == "missing":
        return f"{where}: required but missing"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if error["type"] not in ("value_error", "model_type") and not isinstance(given, (dict, list)):
        message += f" (got {given!r})"
    return f"{where}: {message}"


def describe_entry(error: dict) -> str:
    """One pydantic error as ``principles[3]: missing 'revision'`` (constitution wording)."""
    loc = list(error["loc"])
    kind = error["type"]
    # For a missing or unknown key, name the entry and then the key; otherwise the full path.
    key = loc.pop() if kind in ("missing", "extra_forbidden") and loc else None
    where = location(loc) or "top level"
    if kind == "missing":
        return f"{where}: missing '{key}'"
    if kind == "extra_forbidden":
        return f"{where}: unknown key '{key}' (check the spelling)"
    if kind == "string_too_short":
        return f"{where}: is empty; write the text"
    if kind == "literal_error":
        return f"{where}: must be A or B"
    return f"{where}: {error['msg'].lower()}"


def problem_list(source: str, problems: list[str]) -> str:
    """Every problem, one per line under a count: ``config.yaml: 2 problems:\\n  - ...``."""
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return f"{source}: {count}:\n" + "\n".join(f"  - {p}" for p in problems)


def problem_line(problems: list[str], shown: int = 3) -> str:
    """The first few problems on one line, ``a; b; c (and 2 more)``, for one-line errors."""
    more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
    return "; ".join(problems[:shown]) + more
