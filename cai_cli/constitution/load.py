"""Loading: read each file, tell its layout from its content, merge the parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from cai_cli import reading
from cai_cli.constitution import anthropic, hf, ours
from cai_cli.constitution.common import Constitution, Part, merge
from cai_cli.reading import file_problem, read_text
from cai_cli.errors import UserError

FORMATS_HELP = (
    "cai_cli YAML (keys: name, principles[id, critique, revision, comparison], few_shot, "
    "comparison_examples), Hugging Face llm-swarm JSON (keys: constitutions[critic, revision], "
    "system_chat) or Anthropic paper JSON (CritiqueRevisionInstructions {id: {prompt, "
    "edit_request}}, few-shot transcripts, RLMadison instructions or few-shot files)"
)


def load_constitution(paths: str | Path | list[str | Path]) -> Constitution:
    """Load one file, or several files whose parts are merged (e.g. Anthropic's instructions file +
    its few-shot file). The format of each file is detected from its content, not its extension."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise UserError("constitution: no file given; set `constitution:` to a constitution file")
    return merge([load_part(Path(path)) for path in paths])


def load_part(path: Path) -> Part:
    """One file's part. The checks go from the most to the least specific shape; the first that
    fits picks the layout."""
    data = _read(path)
    if data is None:
        raise UserError(f"{path}: the file is empty; expected {FORMATS_HELP}")
    if isinstance(data, dict) and "principles" in data:
        return ours.from_yaml(path, data)
    if isinstance(data, dict) and "constitutions" in data:
        return hf.from_json(path, data)
    if _is_list_of(data, dict) and all("critic" in item for item in data):
        return hf.from_json(path, {"constitutions": data})  # the older bare list
    if isinstance(data, dict) and any(
        isinstance(v, dict) and "edit_request" in v for v in data.values()
    ):
        return anthropic.from_instructions(path, data)
    if _is_list_of(data, str):
        if any("CritiqueRequest:" in text for text in data):
            return anthropic.from_few_shot(path, data)
        return anthropic.from_rl_instructions(path, data)
    if _is_list_of(data, dict) and all("corrects" in item for item in data):
        return anthropic.from_comparisons(path, data)
    if _is_list_of(data, dict) and all("[[[" in str(item.get("prompt")) for item in data):
        return anthropic.from_cot_comparisons(path, data)
    raise UserError(f"{path}: unrecognised constitution layout; expected {FORMATS_HELP}")


def _read(path: Path) -> Any:
    problem = file_problem(path)
    if problem is not None:
        raise UserError(
            f"{path}: constitution file {problem}; the `constitution:` config key expects the "
            "path of a constitution file (e.g. constitutions/harmless.yaml) or a list of such paths"
        )
    text = read_text(path)
    # JSON first: PyYAML rejects some valid JSON (tab indentation) and JSON errors read better
    # for JSON files. Anything else goes to YAML.
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            return reading.load_yaml(text, str(path))
        except yaml.YAMLError as yaml_error:
            if text.lstrip().startswith(("{", "[")):
                raise UserError(
                    f"{path}:{json_error.lineno}:{json_error.colno}: invalid JSON: {json_error.msg}"
                ) from None
            mark = getattr(yaml_error, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            problem = getattr(yaml_error, "problem", None) or str(yaml_error)
            raise UserError(f"{path}{where}: invalid YAML: {problem}") from None


def _is_list_of(data: Any, kind: type) -> bool:
    return isinstance(data, list) and bool(data) and all(isinstance(item, kind) for item in data)
