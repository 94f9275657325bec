"""Constitutions: the principles behind critique, revision and AI feedback, plus worked examples.

A constitution is loaded from one file or from several files whose parts are merged. The layout
of each file is detected from its content, never from its extension (JSON is valid YAML, so
either syntax works for every layout). Three layouts are understood:

``cai_cli`` -- our own YAML::

    name: harmless
    description: ...                       # optional
    principles:
      - {id: privacy, critique: ..., revision: ..., comparison: ...}   # comparison optional
    few_shot:                              # optional; requests come from the named principle
      - {principle: privacy, prompt: ..., answer: ..., critique: ..., revision: ...}
    comparison_examples:                   # optional; question = that principle's comparison
      - {principle: privacy, prompt: ..., option_a: ..., option_b: ..., answer: A, reasoning: ...}

``anthropic`` -- the JSON files in the ``prompts/`` folder of Anthropic's
ConstitutionalHarmlessnessPaper repository:

- ``CritiqueRevisionInstructions.json``: principles, ids from the keys::

      {"harmful0": {"prompt": ["\\n\\nCritiqueRequest: ...\\n\\nCritique:"],
                    "edit_request": "\\n\\nRevisionRequest: ...\\n\\nRevision:"}, ...}

  (only the first entry of ``prompt`` is used; the paper has exactly one per principle).
- ``CritiqueRevisionFewShotPrompts.json``: a list of transcripts::

      "\\n\\nHuman: ...\\n\\nAssistant: ...[more Human/Assistant turns]\\n\\nCritiqueRequest: ...
       \\n\\nCritique: ...\\n\\nRevisionRequest: ...\\n\\nRevision: ...\\n\\nHuman:"

  Each critique/revision round becomes one example; a later round's answer is the previous
  round's revision, which is exactly what the model was critiquing.
- ``RLMadisonInstructions.json``: a list of comparison questions ("... Options:"). They are
  handed out in order (cycling) to the principles that have no comparison question of their own.
- ``RLMadisonFewShotPrompts.json``: ``[{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:",
  "corrects": [...], "incorrects": [...]}]``, labelled comparisons without reasoning.
- ``RLMadisonPrecogFewShotPrompts.json``: ``[{"prompt": "...H: ...\\n\\n{}\\n (A) [[[...]]]\\n
  (B) [[[...]]]\\n\\nAssistant: Let's think step by step: ...\\n\\nHuman:\\nSo the answer is:
  (B)"}]``, labelled comparisons with chain-of-thought reasoning.

``hf`` -- Hugging Face's llm-swarm constitutional-ai example (used by the alignment-handbook
recipe): ``{"constitutions": [{"critic": ..., "revision": ...}], "system_chat": [[{"role": "user",
"content": ...}, {"role": "assistant", ...}, ...]]}``, or the older bare list of critic/revision
pairs. Principle ids are ``hf-0``, ``hf-1``, ... Each ``system_chat`` conversation is user
prompt, assistant answer (possibly after earlier turns), then user critique request, assistant
critique, user revision request, assistant revision (system messages are skipped).

Merging several files concatenates principles (ids must be unique across files), examples and
comparison questions in file order. The name comes from the first file that has one (else the
first file's stem); ``source_format`` is the layout of the first file that brings principles.

Conversations with earlier turns keep them in ``prompt`` as ``Human: ...\\n\\nAssistant: ...``
text, so every example fits the one-prompt/one-answer shape the stages use.

Principles without a comparison question (``hf``, ``anthropic`` without an RLMadison
instructions file, or our YAML with ``comparison`` left out) get one derived from the revision
request, which says what a good response looks like: ``Which response better satisfies this
request, without needing to be revised? <revision request>``. Comparison examples from files
without their own question take the comparison question of principle ``i % len(principles)``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from cai_cli.errors import UserError


@dataclass(frozen=True)
class Principle:
    id: str
    critique_request: str
    revision_request: str
    comparison: str  # question for choosing between two responses


@dataclass(frozen=True)
class FewShotExample:
    prompt: str
    answer: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str


@dataclass(frozen=True)
class ComparisonExample:
    prompt: str
    option_a: str
    option_b: str
    question: str
    answer: str  # "A" or "B"
    reasoning: str  # may be ""


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    few_shot: tuple[FewShotExample, ...]
    comparison_examples: tuple[ComparisonExample, ...]
    source_format: str  # "cai_cli", "anthropic" or "hf"

    def principle(self, principle_id: str) -> Principle:
        for principle in self.principles:
            if principle.id == principle_id:
                return principle
        known = ", ".join(p.id for p in self.principles)
        raise UserError(
            f"constitution '{self.name}': unknown principle '{principle_id}'; known ids: {known}"
        )


def default_comparison(revision_request: str) -> str:
    """A comparison question for a principle that has none: the revision request names the goal."""
    return (
        "Which response better satisfies this request, without needing to be revised? "
        + revision_request
    )


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
    parts = [_load_part(Path(path)) for path in paths]

    principles: list[_DraftPrinciple] = []
    seen: dict[str, Path] = {}
    for part in parts:
        for draft in part.principles:
            if draft.id in seen:
                raise UserError(
                    f"{part.path}: principle id '{draft.id}' is already defined in "
                    f"{seen[draft.id]}; ids must be unique across merged files"
                )
            seen[draft.id] = part.path
            principles.append(draft)
    if not principles:
        names = ", ".join(str(part.path) for part in parts)
        raise UserError(
            f"{names}: no principles found; add a principles file (our YAML, Anthropic's "
            "CritiqueRevisionInstructions.json or a Hugging Face constitution) to `constitution:`"
        )

    # Comparison questions from an RLMadison instructions file go, in order, to the principles
    # that did not bring their own; cycling keeps every principle usable for labelling.
    questions = [q for part in parts for q in part.comparison_questions]
    final, handed_out = [], 0
    for draft in principles:
        comparison = draft.comparison
        if comparison is None and questions:
            comparison = questions[handed_out % len(questions)]
            handed_out += 1
        elif comparison is None:
            comparison = default_comparison(draft.revision_request)
        final.append(
            Principle(draft.id, draft.critique_request, draft.revision_request, comparison)
        )

    comparison_examples = []
    for part in parts:
        for example in part.comparison_examples:
            if not example.question:
                question = final[len(comparison_examples) % len(final)].comparison
                example = dataclasses.replace(example, question=question)
            comparison_examples.append(example)

    named = [part.name for part in parts if part.name]
    first_with_principles = next(part for part in parts if part.principles)
    return Constitution(
        name=named[0] if named else Path(paths[0]).stem,
        principles=tuple(final),
        few_shot=tuple(example for part in parts for example in part.few_shot),
        comparison_examples=tuple(comparison_examples),
        source_format=first_with_principles.source_format,
    )


# ---------------------------------------------------------------------------------------------
# One file: read, parse, detect the layout


@dataclass(frozen=True)
class _DraftPrinciple:
    id: str
    critique_request: str
    revision_request: str
    comparison: str | None  # None: filled in after merging


@dataclass
class _Part:
    """What one file contributes to the merged constitution."""

    path: Path
    source_format: str
    name: str | None = None
    principles: list[_DraftPrinciple] = field(default_factory=list)
    few_shot: list[FewShotExample] = field(default_factory=list)
    comparison_examples: list[ComparisonExample] = field(default_factory=list)
    comparison_questions: list[str] = field(default_factory=list)


def _load_part(path: Path) -> _Part:
    data = _read(path)
    if data is None:
        raise UserError(f"{path}: the file is empty; expected {FORMATS_HELP}")
    if isinstance(data, dict) and "principles" in data:
        return _from_cai_cli(path, data)
    if isinstance(data, dict) and "constitutions" in data:
        return _from_hf(path, data)
    if _is_list_of(data, dict) and all("critic" in item for item in data):
        return _from_hf(path, {"constitutions": data})
    if isinstance(data, dict) and any(
        isinstance(v, dict) and "edit_request" in v for v in data.values()
    ):
        return _from_anthropic_instructions(path, data)
    if _is_list_of(data, str):
        if any("CritiqueRequest:" in text for text in data):
            return _from_anthropic_few_shot(path, data)
        questions = [_question(path, index, text) for index, text in enumerate(data)]
        return _Part(path, "anthropic", comparison_questions=questions)
    if _is_list_of(data, dict) and all("corrects" in item for item in data):
        return _from_anthropic_comparisons(path, data)
    if _is_list_of(data, dict) and all("[[[" in str(item.get("prompt")) for item in data):
        return _from_anthropic_cot_comparisons(path, data)
    raise UserError(f"{path}: unrecognised constitution layout; expected {FORMATS_HELP}")


def _read(path: Path) -> Any:
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise UserError(
            f"{path}: constitution file {what}; the `constitution:` config key expects the path "
            "of a constitution file (e.g. constitutions/harmless.yaml) or a list of such paths"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    # JSON first: PyYAML rejects some valid JSON (tab indentation) and JSON errors read better
    # for JSON files. Anything else goes to YAML.
    try:
        return json.loads(text)
    except json.JSONDecodeError as json_error:
        try:
            return yaml.safe_load(text)
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


def _text(path: Path, where: str, value: Any) -> str:
    """A required, non-empty piece of text from a JSON layout."""
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{path}: {where}: empty or missing text; write the instruction there")
    return value.strip()


# ---------------------------------------------------------------------------------------------
# Our YAML, validated with pydantic


Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _PrincipleSpec(_Strict):
    id: Text
    critique: Text
    revision: Text
    comparison: Text | None = None


class _FewShotSpec(_Strict):
    principle: Text
    prompt: Text
    answer: Text
    critique: Text
    revision: Text


class _ComparisonSpec(_Strict):
    principle: Text
    prompt: Text
    option_a: Text
    option_b: Text
    answer: Literal["A", "B"]
    reasoning: str = ""


class _ConstitutionSpec(_Strict):
    name: Text | None = None
    description: str | None = None
    principles: list[_PrincipleSpec]
    few_shot: list[_FewShotSpec] = []
    comparison_examples: list[_ComparisonSpec] = []


def _from_cai_cli(path: Path, data: dict) -> _Part:
    try:
        spec = _ConstitutionSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(error) for error in exc.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(f"{path}: " + "; ".join(problems[:3]) + more) from None

    by_id: dict[str, _PrincipleSpec] = {}
    for index, principle in enumerate(spec.principles):
        if principle.id in by_id:
            raise UserError(
                f"{path}: principles[{index}]: duplicate id '{principle.id}'; ids must be unique"
            )
        by_id[principle.id] = principle

    def lookup(section: str, index: int, principle_id: str) -> _PrincipleSpec:
        if principle_id not in by_id:
            raise UserError(
                f"{path}: {section}[{index}]: unknown principle '{principle_id}'; "
                f"use one of the ids under principles: {', '.join(by_id)}"
            )
        return by_id[principle_id]

    few_shot = []
    for index, ex in enumerate(spec.few_shot):
        p = lookup("few_shot", index, ex.principle)
        few_shot.append(
            FewShotExample(ex.prompt, ex.answer, p.critique, ex.critique, p.revision, ex.revision)
        )
    comparisons = []
    for index, ex in enumerate(spec.comparison_examples):
        p = lookup("comparison_examples", index, ex.principle)
        question = p.comparison or default_comparison(p.revision)
        comparisons.append(
            ComparisonExample(
                ex.prompt, ex.option_a, ex.option_b, question, ex.answer, ex.reasoning.strip()
            )
        )
    return _Part(
        path,
        "cai_cli",
        name=spec.name,
        principles=[
            _DraftPrinciple(p.id, p.critique, p.revision, p.comparison) for p in spec.principles
        ],
        few_shot=few_shot,
        comparison_examples=comparisons,
    )


def _describe(error: dict) -> str:
    """One pydantic error as `principles[3]: missing 'revision'`."""
    loc = list(error["loc"])
    kind = error["type"]
    # For a missing or unknown key, name the entry and then the key; otherwise the full path.
    key = loc.pop() if kind in ("missing", "extra_forbidden") and loc else None
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    where = where or "top level"
    if kind == "missing":
        return f"{where}: missing '{key}'"
    if kind == "extra_forbidden":
        return f"{where}: unknown key '{key}' (check the spelling)"
    if kind == "string_too_short":
        return f"{where}: is empty; write the text"
    if kind == "literal_error":
        return f"{where}: must be A or B"
    return f"{where}: {error['msg'].lower()}"


# ---------------------------------------------------------------------------------------------
# Hugging Face llm-swarm JSON


def _from_hf(path: Path, data: dict) -> _Part:
    unknown = set(data) - {"constitutions", "system_chat"}
    if unknown:
        raise UserError(
            f"{path}: unknown key '{min(unknown)}'; "
            "a Hugging Face constitution has only constitutions and system_chat"
        )
    entries = data["constitutions"]
    if not isinstance(entries, list):
        raise UserError(f"{path}: 'constitutions' must be a list of {{critic, revision}} objects")
    principles = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise UserError(
                f"{path}: constitutions[{index}]: expected an object with critic and revision"
            )
        critique = _text(path, f"constitutions[{index}].critic", entry.get("critic"))
        revision = _text(path, f"constitutions[{index}].revision", entry.get("revision"))
        principles.append(_DraftPrinciple(f"hf-{index}", critique, revision, None))

    few_shot = []
    for index, chat in enumerate(data.get("system_chat") or []):
        where = f"system_chat[{index}]"
        if not isinstance(chat, list) or not all(isinstance(m, dict) for m in chat):
            raise UserError(f"{path}: {where}: expected a list of {{role, content}} messages")
        turns = [
            (m.get("role"), _text(path, f"{where}.content", m.get("content")))
            for m in chat
            if m.get("role") != "system"
        ]
        roles = [role for role, _ in turns]
        if len(turns) < 6 or not _repeats(roles, ("user", "assistant")):
            raise UserError(
                f"{path}: {where}: expected alternating user/assistant messages: prompt, answer, "
                "critique request, critique, revision request, revision"
            )
        texts = [text for _, text in turns]
        few_shot.append(FewShotExample(_render_prompt(texts[:-5]), *texts[-5:]))
    return _Part(path, "hf", principles=principles, few_shot=few_shot)


def _repeats(labels: list, pattern: tuple) -> bool:
    """True when ``labels`` is one or more whole copies of ``pattern``."""
    copies, rest = divmod(len(labels), len(pattern))
    return copies > 0 and rest == 0 and labels == list(pattern) * copies


def _render_prompt(turns: list[str]) -> str:
    """Human, assistant, ..., human turns as one prompt; a single turn stays plain text."""
    if len(turns) == 1:
        return turns[0]
    speakers = ["Human", "Assistant"]
    return "\n\n".join(f"{speakers[i % 2]}: {text}" for i, text in enumerate(turns))


# ---------------------------------------------------------------------------------------------
# Anthropic paper JSON


_TRANSCRIPT_LABELS = (
    "Human",
    "Assistant",
    "CritiqueRequest",
    "Critique",
    "RevisionRequest",
    "Revision",
)


def _split_transcript(text: str, labels=_TRANSCRIPT_LABELS) -> list[tuple[str, str]]:
    """`\\n\\nHuman: hi\\n\\nAssistant: hello` -> [("Human", "hi"), ("Assistant", "hello")].

    A label counts only at the start of a line. A trailing empty turn (the paper's transcripts
    end with "Human:" as a stop marker, prompts end with "Assistant:" awaiting the answer) is
    dropped.
    """
    pieces = re.split(rf"(?m)^[ \t]*({'|'.join(labels)}):", text.strip())
    turns = [(label, body.strip()) for label, body in zip(pieces[1::2], pieces[2::2])]
    if turns and not turns[-1][1]:
        turns.pop()
    return turns


def _strip_label(text: str, label: str, stop: str) -> str:
    """`\\n\\nCritiqueRequest: Do X.\\n\\nCritique:` -> `Do X.`"""
    text = text.strip()
    text = text.removeprefix(f"{label}:").strip()
    return text.removesuffix(f"{stop}:").strip()


def _from_anthropic_instructions(path: Path, data: dict) -> _Part:
    principles = []
    for key, entry in data.items():
        prompts = entry.get("prompt")
        first = prompts[0] if isinstance(prompts, list) and prompts else prompts
        critique = _strip_label(_text(path, f"{key}.prompt", first), "CritiqueRequest", "Critique")
        revision = _strip_label(
            _text(path, f"{key}.edit_request", entry.get("edit_request")),
            "RevisionRequest",
            "Revision",
        )
        principles.append(
            _DraftPrinciple(
                str(key),
                _text(path, f"{key}.prompt", critique),
                _text(path, f"{key}.edit_request", revision),
                None,
            )
        )
    return _Part(path, "anthropic", principles=principles)


def _from_anthropic_few_shot(path: Path, transcripts: list[str]) -> _Part:
    examples = []
    for index, transcript in enumerate(transcripts):
        turns = _split_transcript(transcript)
        labels = [label for label, _ in turns]
        start = labels.index("CritiqueRequest") if "CritiqueRequest" in labels else 0
        conversation, rounds = turns[:start], turns[start:]
        round_labels = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")
        if not _repeats(labels[:start], ("Human", "Assistant")) or not _repeats(
            labels[start:], round_labels
        ):
            raise UserError(
                f"{path}: transcript [{index}]: expected Human:/Assistant: turns, then "
                "CritiqueRequest:, Critique:, RevisionRequest:, Revision: sections"
            )
        prompt = _render_prompt([body for _, body in conversation[:-1]])
        answer = conversation[-1][1]
        for r in range(0, len(rounds), 4):
            critique_request, critique, revision_request, revision = (
                body for _, body in rounds[r : r + 4]
            )
            examples.append(
                FewShotExample(
                    prompt, answer, critique_request, critique, revision_request, revision
                )
            )
            answer = revision  # the next round critiques this revision
    return _Part(path, "anthropic", few_shot=examples)


def _question(path: Path, index: int, text: str) -> str:
    """An RLMadison instruction without the trailing "Options:"; the prompt builder adds options."""
    question = _text(path, f"[{index}]", text)
    return _text(path, f"[{index}]", question.removesuffix("Options:"))


def _conversation_prompt(path: Path, where: str, text: str, labels=("Human", "Assistant")) -> str:
    """A conversation that awaits the assistant's reply, rendered as one prompt."""
    turns = _split_transcript(text, labels)
    expected = [labels[i % 2] for i in range(len(turns))]
    if not turns or [label for label, _ in turns] != expected or len(turns) % 2 == 0:
        raise UserError(
            f"{path}: {where}: expected a {labels[0]}:/{labels[1]}: conversation that starts "
            f"and ends with a {labels[0]}: turn"
        )
    return _render_prompt([body for _, body in turns])


def _from_anthropic_comparisons(path: Path, items: list[dict]) -> _Part:
    examples = []
    for index, item in enumerate(items):
        where = f"[{index}]"
        prompt = _conversation_prompt(
            path, where, _text(path, f"{where}.prompt", item.get("prompt"))
        )
        corrects, incorrects = item.get("corrects") or [None], item.get("incorrects") or [None]
        good = _text(path, f"{where}.corrects[0]", corrects[0])
        bad = _text(path, f"{where}.incorrects[0]", incorrects[0])
        # Alternate which option is right so the examples do not teach "the answer is always A".
        if index % 2 == 0:
            examples.append(ComparisonExample(prompt, good, bad, "", "A", ""))
        else:
            examples.append(ComparisonExample(prompt, bad, good, "", "B", ""))
    return _Part(path, "anthropic", comparison_examples=examples)


_OPTIONS = re.compile(r"\(A\)\s*\[\[\[(.*?)\]\]\]\s*\(B\)\s*\[\[\[(.*?)\]\]\]", re.DOTALL)
_ANSWER = re.compile(r"answer is:?\s*\(?([AB])\)?\s*$")


def _from_anthropic_cot_comparisons(path: Path, items: list[dict]) -> _Part:
    examples = []
    for index, item in enumerate(items):
        text = str(item["prompt"]).strip()
        options, answer = _OPTIONS.search(text), _ANSWER.search(text)
        if not options or not answer:
            raise UserError(
                f"{path}: [{index}].prompt: expected '(A) [[[...]]] (B) [[[...]]]' options and "
                "'So the answer is: (A)' or '(B)' at the end"
            )
        # The conversation (H:/A: turns) sits between the "Consider the following conversation
        # ...:" line and the "{}" slot where the paper inserted the comparison principle.
        before = text[: options.start()].split("{}")[0]
        conversation = re.sub(r"(?s)^.*?Consider the following conversation[^\n]*\n", "", before)
        prompt = _conversation_prompt(path, f"[{index}].prompt", conversation, ("H", "A"))
        after = text[options.end() : answer.start()]
        reasoning = after.split("Assistant:", 1)[-1].rsplit("Human:", 1)[0].strip()
        reasoning = reasoning.removeprefix("Let's think step by step:").strip()
        examples.append(
            ComparisonExample(
                prompt, options[1].strip(), options[2].strip(), "", answer[1], reasoning
            )
        )
    return _Part(path, "anthropic", comparison_examples=examples)
