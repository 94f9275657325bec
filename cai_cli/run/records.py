"""The records the stages pass to each other as JSONL, typed once: one writer and one reader each.

Every stage and ``cai inspect`` read artifacts through ``read``, which validates each line and
names ``file:line`` and the field when one is wrong, so two readers of one file can never
disagree about what it may hold (a ``p_chosen`` of ``true`` is not a probability anywhere).
Writers hand these models to ``artifacts`` (``dumps`` writes the declared keys in order, unset
optional ones left out). Keys not declared here are kept, so a
record written by a newer version still reads.

The formats are fixed contracts (DESIGN.md): a chain is ``{"id", "prompt", "initial", "rounds":
[{"principle", "critique_request", "critique", "revision_request", "revision"}], "final"}``; a
pair is TRL's conversational preference format plus ``p_chosen`` and ``judgments``.

No heavy imports here (``cai inspect`` uses it); pydantic is light.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Iterator, Literal, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from cai_cli.run.artifacts import numbered_jsonl
from cai_cli.errors import UserError
from cai_cli.validation import location



class Record(BaseModel):
    # Unknown keys are kept (forward compatible); the declared ones are checked strictly enough
    # that a bool is not a number and a number is not a string.
    model_config = ConfigDict(extra="allow")


class Message(Record):
    role: str
    content: str


Messages = Annotated[list[Message], Field(min_length=1)]


def conversation(messages: list[Message]) -> list[dict[str, str]]:
    """Messages as the plain role/content dicts chat templates and TRL take."""
    return [{"role": m.role, "content": m.content} for m in messages]


class Round(Record):
    """One critique/revision round of a chain."""

    principle: str
    critique_request: str
    critique: str
    revision_request: str
    revision: str
    changed: Optional[StrictBool] = None


class Chain(Record):
    """``sl/chains.jsonl``: one prompt's whole critique/revision chain."""

    id: str
    prompt: str
    initial: str
    rounds: list[Round]
    final: str
    format: Optional[str] = None


class SFTExample(Record):
    """``sl/sft.jsonl``: the user prompt and the final revision as the assistant's answer, in
    TRL's conversational prompt-completion format (the loss is on the completion only)."""

    id: str
    prompt: Messages
    completion: Messages


class Sample(Record):
    """``prefs/samples.jsonl``: the policy's answers to one prompt."""

    id: str
    prompt: str
    responses: list[str]


class Judgment(Record):
    """One question to the feedback model about a pair: a principle, the order the answers were
    shown in (``AB``: chosen first as (A)) and the probability of the option shown first.

    ``label_source`` says where ``p_first`` comes from: ``logprobs``, the option
    probabilities (a soft label); ``verdict``, the share of sampled answers that named the
    first option, for a server that returns no log-probabilities (0 or 1 with one sample: a
    hard label). Records written before it existed hold log-probability labels."""

    principle: str
    order: Literal["AB", "BA"]
    p_first: float = Field(ge=0.0, le=1.0, strict=True)
    reasoning: Optional[str] = None
    label_source: Optional[Literal["logprobs", "verdict"]] = None


class Pair(Record):
    """``prefs/pairs.jsonl``: one labelled comparison, in TRL's conversational preference format."""

    id: str
    prompt: Messages
    chosen: Messages
    rejected: Messages
    p_chosen: float = Field(ge=0.0, le=1.0, strict=True)
    order_disagreement: Optional[StrictBool] = None
    judgments: list[Judgment] = []
    prompt_id: Optional[str] = None


class GeneratedPrompt(Record):
    """``prompts/red_team.jsonl``: a new red-team prompt and the ids of the seed prompts it was
    shown (none: a seed prompt mixed in)."""

    id: str
    prompt: str
    seed_ids: Optional[list[str]] = None


class SeedPrompt(Record):
    """``prompts/seeds.jsonl``: a seed prompt the new ones were shown."""

    id: str
    prompt: str


class EvalAnswer(Record):
    """``eval/answers.jsonl``: one model's answer to one evaluation prompt."""

    model: str
    id: str
    answer: str


R = TypeVar("R", bound=Record)


def parse(record: dict, kind: type[R], where: str) -> R:
    """One record, validated; ``UserError`` naming ``where`` (``file:line``) and the field."""
    try:
        return kind.model_validate(record)
    except ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            field = location(error["loc"]) or "(record)"
            given = error.get("input")
            shown = "" if isinstance(given, (dict, list)) or error["type"] == "missing" \
                else f" (got {given!r})"
            problems.append(f"{field}: {error['msg'].removeprefix('Value error, ')}{shown}")
        more = f"; and {exc.error_count() - 5} more" if exc.error_count() > 5 else ""
        name = re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", kind.__name__).lower()
        raise UserError(f"{where}: not a valid {name} record: "
                        + "; ".join(problems) + more) from None


def iter_records(path: Path | str, kind: type[R], *, allow_torn_tail: bool = False) -> Iterator[R]:
    """The records of a JSONL artifact, each validated as ``kind``."""
    for number, record in numbered_jsonl(path, allow_torn_tail=allow_torn_tail):
        yield parse(record, kind, f"{path}:{number}")


def read(path: Path | str, kind: type[R], *, allow_torn_tail: bool = False) -> list[R]:
    return list(iter_records(path, kind, allow_torn_tail=allow_torn_tail))
