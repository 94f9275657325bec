"""Building the prompts the models see, in one place: chat messages or plain transcripts.

A conversation is a list of turns ``(kind, text)``. The kinds are the paper's transcript labels;
in chat format the requests and the human's turns become ``user`` messages and the model's
answers, critiques and revisions ``assistant`` messages. In transcript format (for base models
without a chat template) each turn is a ``Label: text`` paragraph, and the prompt ends with the
label of the turn the model is to write, as in the paper's few-shot prompts.

SL-CAI rounds: each round critiques the current answer (the initial answer, then the latest
revision) in a conversation of its own, after ``k`` worked examples::

    [examples] Human: prompt / Assistant: answer / CritiqueRequest: ... / Critique: <model>
    ... / RevisionRequest: ... / Revision: <model>

so the context stays the same size however many rounds are run.
"""

from __future__ import annotations

from typing import Literal, Sequence

from cai_cli.backends.base import PromptInput
from cai_cli.constitution import FewShotExample, Principle

Format = Literal["chat", "transcript"]
Turn = tuple[str, str]

LABELS = {
    "human": "Human",
    "assistant": "Assistant",
    "critique_request": "CritiqueRequest",
    "critique": "Critique",
    "revision_request": "RevisionRequest",
    "revision": "Revision",
}
USER_KINDS = {"human", "critique_request", "revision_request"}
# In transcript format the model would run on into the next turn; cut it there.
TRANSCRIPT_STOPS = tuple(f"\n\n{label}:" for label in LABELS.values()) + ("\nHuman:",)


def render(turns: Sequence[Turn], next_kind: str, fmt: Format,
           system: str | None = None) -> PromptInput:
    """The prompt for the model to write a turn of ``next_kind`` after ``turns``."""
    if fmt == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user" if kind in USER_KINDS else "assistant", "content": text}
                     for kind, text in turns]
        return messages
    body = "".join(f"{LABELS[kind]}: {text}\n\n" for kind, text in turns)
    return f"{body}{LABELS[next_kind]}:"


def example_turns(examples: Sequence[FewShotExample]) -> list[Turn]:
    turns: list[Turn] = []
    for ex in examples:
        turns += [("human", ex.prompt), ("assistant", ex.answer),
                  ("critique_request", ex.critique_request), ("critique", ex.critique),
                  ("revision_request", ex.revision_request), ("revision", ex.revision)]
    return turns


def answer_prompt(prompt: str, fmt: Format, system: str | None = None) -> PromptInput:
    """The helpful model's first answer: the prompt alone, as a user would ask it."""
    return render([("human", prompt)], "assistant", fmt, system)


def critique_turns(prompt: str, answer: str, principle: Principle,
                   examples: Sequence[FewShotExample]) -> list[Turn]:
    return example_turns(examples) + [("human", prompt), ("assistant", answer),
                                      ("critique_request", principle.critique_request)]


def critique_prompt(prompt: str, answer: str, principle: Principle,
                    examples: Sequence[FewShotExample], fmt: Format,
                    system: str | None = None) -> PromptInput:
    return render(critique_turns(prompt, answer, principle, examples), "critique", fmt, system)


def revision_prompt(prompt: str, answer: str, principle: Principle, critique: str,
                    examples: Sequence[FewShotExample], fmt: Format,
                    system: str | None = None) -> PromptInput:
    turns = critique_turns(prompt, answer, principle, examples)
    turns += [("critique", critique), ("revision_request", principle.revision_request)]
    return render(turns, "revision", fmt, system)
