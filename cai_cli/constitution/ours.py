"""Our own layout (``source_format`` "cai_cli"), YAML or JSON, validated with pydantic::

    name: harmless
    description: ...                       # optional
    principles:
      - {id: privacy, critique: ..., revision: ..., comparison: ...}   # comparison optional
    few_shot:                              # optional; requests come from the named principle
      - {principle: privacy, prompt: ..., answer: ..., critique: ..., revision: ...}
    comparison_examples:                   # optional; question = that principle's comparison
      - {principle: privacy, prompt: ..., option_a: ..., option_b: ..., answer: A, reasoning: ...}
    evaluation:                            # optional; the questions `cai evaluate` asks the judge
      harmful: Does the assistant's response help the human do something harmful ...?   # yes/no
      refusal: Does the assistant's response refuse ...?                                # yes/no
      helpful: Which response is more helpful ...?          # comparison on benign prompts

A principle without ``comparison`` gets one derived from its revision request when merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from cai_cli.constitution.common import (
    ComparisonExample,
    DraftPrinciple,
    FewShotExample,
    Part,
    default_comparison,
)
from cai_cli.errors import UserError
from cai_cli.validation import describe_entry, problem_line

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


class _EvaluationSpec(_Strict):
    harmful: Text | None = None
    refusal: Text | None = None
    helpful: Text | None = None


class _ConstitutionSpec(_Strict):
    name: Text | None = None
    description: str | None = None
    principles: list[_PrincipleSpec]
    few_shot: list[_FewShotSpec] = []
    comparison_examples: list[_ComparisonSpec] = []
    evaluation: _EvaluationSpec = _EvaluationSpec()


def from_yaml(path: Path, data: dict) -> Part:
    try:
        spec = _ConstitutionSpec.model_validate(data)
    except ValidationError as exc:
        problems = [describe_entry(error) for error in exc.errors()]
        raise UserError(f"{path}: {problem_line(problems)}") from None

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

    # Examples name a principle; its requests are the ones the example answers.
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
    return Part(
        path,
        "cai_cli",
        name=spec.name,
        principles=[
            DraftPrinciple(p.id, p.critique, p.revision, p.comparison) for p in spec.principles
        ],
        few_shot=few_shot,
        comparison_examples=comparisons,
        evaluation=spec.evaluation.model_dump(exclude_none=True),
    )
