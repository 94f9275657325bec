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

AI feedback: a comparison is a multiple-choice question after the conversation, and the
feedback model's answer turn is begun for it ("The answer is: ("), so the next token is the
option letter whose probability is read. With chain of thought the turn is begun with "Let's
think step by step:", the model writes its reasoning, and the letter is read after "So the
answer is: (".
"""

from __future__ import annotations

from typing import Literal, Sequence

from cai_cli.engines.base import PromptInput
from cai_cli.constitution import ComparisonExample, FewShotExample, Principle
from cai_cli.errors import UserError

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
           system: str | None = None, begun: str | None = None) -> PromptInput:
    """The prompt for the model to write a turn of ``next_kind`` after ``turns``; with ``begun``
    that turn already starts with this text and the model continues it."""
    if fmt == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user" if kind in USER_KINDS else "assistant", "content": text}
                     for kind, text in turns]
        if begun is not None:
            messages.append({"role": "assistant", "content": begun})
        return messages
    body = "".join(f"{LABELS[kind]}: {text}\n\n" for kind, text in turns)
    return f"{body}{LABELS[next_kind]}:" + (f" {begun}" if begun is not None else "")


def resolve_format(fmt: str, backend, what: str) -> Format:
    """``auto`` -> chat when the model has a chat template, else transcript."""
    if fmt == "auto":
        return "chat" if backend.has_chat_template else "transcript"
    if fmt == "chat" and not backend.has_chat_template:
        raise UserError(f"{what}: chat, but '{backend.name}' has no chat template; "
                        "use transcript (or auto) for base models")
    return fmt  # type: ignore[return-value]


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


# ---------------------------------------------------------------------------------------------
# AI feedback

# The answer turn is begun up to the opening parenthesis, so the option labels are the letters
# alone: one token each in most vocabularies, read from one forward pass over the prompt.
OPTIONS = ("A", "B")
ANSWER_PREFIX = "The answer is: ("
COT_PREFIX = "Let's think step by step:"
COT_ANSWER = "So the answer is: ("


def comparison_question(prompt: str, question: str, first: str, second: str) -> str:
    return ("Consider the following conversation between a human and an assistant:\n\n"
            f"Human: {prompt}\n\n{question}\nOptions:\n(A) {first}\n(B) {second}")


def cot_answer(reasoning: str) -> str:
    """The begun answer turn once the reasoning is written: the label comes next."""
    return f"{COT_PREFIX} {reasoning.strip()}\n{COT_ANSWER}"


def comparison_prompt(prompt: str, question: str, first: str, second: str,
                      examples: Sequence[ComparisonExample], fmt: Format, *,
                      chain_of_thought: bool = False, reasoning: str | None = None) -> PromptInput:
    """The feedback model's multiple-choice question, its answer turn begun.

    Without chain of thought the turn is begun with "The answer is: (". With it, and no
    ``reasoning`` yet, with "Let's think step by step:" for the model to reason; given the
    reasoning, with that reasoning and "So the answer is: (". Worked examples come first, as
    earlier turns, each answered with its label (after its reasoning in chain-of-thought mode).
    """
    turns: list[Turn] = []
    for ex in examples:
        answer = (f"{cot_answer(ex.reasoning)}{ex.answer})" if chain_of_thought and ex.reasoning
                  else f"{ANSWER_PREFIX}{ex.answer})")
        turns += [("human", comparison_question(ex.prompt, ex.question, ex.option_a, ex.option_b)),
                  ("assistant", answer)]
    turns.append(("human", comparison_question(prompt, question, first, second)))
    if not chain_of_thought:
        begun = ANSWER_PREFIX
    else:
        begun = COT_PREFIX if reasoning is None else cot_answer(reasoning)
    return render(turns, "assistant", fmt, begun=begun)


# A yes/no classification of one answer (or of a request alone) is asked as a two-option
# question too, in both orders of the options (yes first, then no first), so a judge's
# preference for the first letter cancels out as it does for comparisons.
YES_NO = ("Yes", "No")


def classification_prompt(prompt: str, answer: str | None, question: str, yes_first: bool,
                          fmt: Format) -> PromptInput:
    """The judge's yes/no question about one answer (``answer`` None: about the request
    alone), its answer turn begun as a comparison's."""
    first, second = YES_NO if yes_first else YES_NO[::-1]
    if answer is None:
        shown = ("Consider the following request from a human to an assistant:\n\n"
                 f"Human: {prompt}")
    else:
        shown = ("Consider the following conversation between a human and an assistant:\n\n"
                 f"Human: {prompt}\n\nAssistant: {answer}")
    text = f"{shown}\n\n{question}\nOptions:\n(A) {first}\n(B) {second}"
    return render([("human", text)], "assistant", fmt, begun=ANSWER_PREFIX)


def transcript_pair(pair: dict) -> dict:
    """A pair as plain Human:/Assistant: text, for a model without a chat template (the layout
    the paper's preference models read); TRL appends the end-of-sequence token. Control-token
    strings in the contents are marked (``literal.mark_any``), so the tokenizers cai loads read
    them as text."""
    from cai_cli.engines.literal import mark_any

    def kind(message: dict) -> str:
        return "assistant" if message["role"] == "assistant" else "human"

    def answer(conversation: list[dict]) -> str:  # continues the prompt's "Assistant:"
        first, *rest = conversation
        return f" {mark_any(first['content'])}" + "".join(
            f"\n\n{LABELS[kind(m)]}: {mark_any(m['content'])}" for m in rest)

    return {"prompt": render([(kind(m), mark_any(m["content"])) for m in pair["prompt"]],
                             "assistant", "transcript"),
            "chosen": answer(pair["chosen"]), "rejected": answer(pair["rejected"]),
            "p_chosen": pair["p_chosen"]}
