"""The JSON files in the ``prompts/`` folder of Anthropic's ConstitutionalHarmlessnessPaper
repository. Each file brings one kind of part:

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

The files are hand-written, so a label counts at the start of any line (``any_line``), and the
paper's trailing empty turns ("Human:" as a stop marker, "Assistant:" awaiting the answer) are
dropped.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from cai_cli.data import transcripts
from cai_cli.constitution.common import (
    ComparisonExample,
    DraftPrinciple,
    FewShotExample,
    Part,
    repeats,
    required_text,
)
from cai_cli.errors import UserError

_PAPER_LABELS = tuple(transcripts.LABELS.values())
_ROUND_LABELS = ("CritiqueRequest", "Critique", "RevisionRequest", "Revision")


def _turns(transcript: str, labels: tuple[str, ...] = _PAPER_LABELS) -> list[tuple[str, str]]:
    turns = transcripts.split(transcript, labels, any_line=True)[1]
    if turns and not turns[-1][1]:
        turns.pop()  # the paper's stop marker or the "Assistant:" awaiting an answer
    return turns


def _strip_label(request: str, label: str, stop: str) -> str:
    """`\\n\\nCritiqueRequest: Do X.\\n\\nCritique:` -> `Do X.`"""
    request = request.strip().removeprefix(f"{label}:").strip()
    return request.removesuffix(f"{stop}:").strip()


def from_instructions(path: Path, data: dict) -> Part:
    """CritiqueRevisionInstructions.json: principles."""
    principles = []
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserError(f"{path}: {key}: expected an object with prompt and edit_request")
        prompts = entry.get("prompt")
        first = prompts[0] if isinstance(prompts, list) and prompts else prompts
        critique = _strip_label(
            required_text(path, f"{key}.prompt", first), "CritiqueRequest", "Critique"
        )
        revision = _strip_label(
            required_text(path, f"{key}.edit_request", entry.get("edit_request")),
            "RevisionRequest",
            "Revision",
        )
        principles.append(
            DraftPrinciple(
                str(key),
                required_text(path, f"{key}.prompt", critique),
                required_text(path, f"{key}.edit_request", revision),
                None,
            )
        )
    return Part(path, "anthropic", principles=principles)


def from_few_shot(path: Path, transcript_texts: list[str]) -> Part:
    """CritiqueRevisionFewShotPrompts.json: one worked example per critique/revision round."""
    examples = []
    for index, transcript in enumerate(transcript_texts):
        turns = _turns(transcript)
        labels = [label for label, _ in turns]
        start = labels.index("CritiqueRequest") if "CritiqueRequest" in labels else 0
        conversation, rounds = turns[:start], turns[start:]
        if not repeats(labels[:start], ("Human", "Assistant")) or not repeats(
            labels[start:], _ROUND_LABELS
        ):
            raise UserError(
                f"{path}: transcript [{index}]: expected Human:/Assistant: turns, then "
                "CritiqueRequest:, Critique:, RevisionRequest:, Revision: sections"
            )
        prompt = transcripts.join([body for _, body in conversation[:-1]])
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
    return Part(path, "anthropic", few_shot=examples)


def from_rl_instructions(path: Path, questions: list[str]) -> Part:
    """RLMadisonInstructions.json: comparison questions without the trailing "Options:" (the
    prompt builder adds the options)."""
    stripped = []
    for index, question in enumerate(questions):
        question = required_text(path, f"[{index}]", question)
        stripped.append(required_text(path, f"[{index}]", question.removesuffix("Options:")))
    return Part(path, "anthropic", comparison_questions=stripped)


def _conversation_prompt(path: Path, where: str, conversation: str,
                         labels=("Human", "Assistant")) -> str:
    """A conversation that awaits the assistant's reply, rendered as one prompt."""
    turns = _turns(conversation, labels)
    expected = [labels[i % 2] for i in range(len(turns))]
    if not turns or [label for label, _ in turns] != expected or len(turns) % 2 == 0:
        raise UserError(
            f"{path}: {where}: expected a {labels[0]}:/{labels[1]}: conversation that starts "
            f"and ends with a {labels[0]}: turn"
        )
    return transcripts.join([body for _, body in turns])


def _first(path: Path, where: str, value: Any) -> str:
    """The first text of a ``corrects``/``incorrects`` list."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{path}: {where}: expected a non-empty list of responses")
    return required_text(path, f"{where}[0]", value[0])


def from_comparisons(path: Path, items: list[dict]) -> Part:
    """RLMadisonFewShotPrompts.json: labelled comparisons without reasoning."""
    examples = []
    for index, item in enumerate(items):
        where = f"[{index}]"
        prompt = _conversation_prompt(
            path, where, required_text(path, f"{where}.prompt", item.get("prompt"))
        )
        good = _first(path, f"{where}.corrects", item.get("corrects"))
        bad = _first(path, f"{where}.incorrects", item.get("incorrects"))
        # Alternate which option is right so the examples do not teach "the answer is always A".
        if index % 2 == 0:
            examples.append(ComparisonExample(prompt, good, bad, "", "A", ""))
        else:
            examples.append(ComparisonExample(prompt, bad, good, "", "B", ""))
    return Part(path, "anthropic", comparison_examples=examples)


_OPTIONS = re.compile(r"\(A\)\s*\[\[\[(.*?)\]\]\]\s*\(B\)\s*\[\[\[(.*?)\]\]\]", re.DOTALL)
_ANSWER = re.compile(r"answer is:?\s*\(?([AB])\)?\s*$")


def from_cot_comparisons(path: Path, items: list[dict]) -> Part:
    """RLMadisonPrecogFewShotPrompts.json: labelled comparisons with chain-of-thought reasoning."""
    examples = []
    for index, item in enumerate(items):
        prompt_text = str(item["prompt"]).strip()
        options, answer = _OPTIONS.search(prompt_text), _ANSWER.search(prompt_text)
        if not options or not answer:
            raise UserError(
                f"{path}: [{index}].prompt: expected '(A) [[[...]]] (B) [[[...]]]' options and "
                "'So the answer is: (A)' or '(B)' at the end"
            )
        # The conversation (H:/A: turns) sits between the "Consider the following conversation
        # ...:" line and the "{}" slot where the paper inserted the comparison principle.
        before = prompt_text[: options.start()].split("{}")[0]
        conversation = re.sub(r"(?s)^.*?Consider the following conversation[^\n]*\n", "", before)
        prompt = _conversation_prompt(path, f"[{index}].prompt", conversation, ("H", "A"))
        after = prompt_text[options.end() : answer.start()]
        reasoning = after.split("Assistant:", 1)[-1].rsplit("Human:", 1)[0].strip()
        reasoning = reasoning.removeprefix("Let's think step by step:").strip()
        examples.append(
            ComparisonExample(
                prompt, options[1].strip(), options[2].strip(), "", answer[1], reasoning
            )
        )
    return Part(path, "anthropic", comparison_examples=examples)
