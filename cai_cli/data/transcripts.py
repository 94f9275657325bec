"""Human:/Assistant: transcripts: the plain-text conversations of Anthropic's HH data and of the
Constitutional AI paper's prompts. Their labels, how to split one into turns, how to write one.

HH data (``\\n\\nHuman: ...\\n\\nAssistant: ...``) starts a turn only after a blank line, so a
message that quotes "Human:" mid-paragraph is not cut. The paper's few-shot files are read more
loosely (a label at the start of any line) because they are hand-written; ``split`` does both.
"""

from __future__ import annotations

import re

HUMAN, ASSISTANT = "Human", "Assistant"

# The paper's transcript labels, by the kind of turn they start. Prompt building works in kinds
# (chat roles follow from them); transcripts show the labels.
LABELS = {
    "human": HUMAN,
    "assistant": ASSISTANT,
    "critique_request": "CritiqueRequest",
    "critique": "Critique",
    "revision_request": "RevisionRequest",
    "revision": "Revision",
}
ROLES = {HUMAN: "user", ASSISTANT: "assistant"}  # chat role of each HH label

Turn = tuple[str, str]  # (label, text)


def split(text: str, labels: tuple[str, ...] = (HUMAN, ASSISTANT), *,
          any_line: bool = False) -> tuple[str, list[Turn]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``("", [("Human", "hi"), ("Assistant",
    "hello")])``: the text before the first turn and the ``(label, text)`` turns, both stripped.

    A label starts a turn after a blank line; with ``any_line`` at the start of any line, maybe
    indented. Text without labels has no turns. Empty turns are kept (callers decide what an
    empty "Assistant:" at the end means)."""
    # The first turn has no blank line before it when the text starts with its label.
    text = text if text.startswith("\n\n") else "\n\n" + text.lstrip()
    names = "|".join(labels)
    boundary = rf"(?m)^[ \t]*({names}):" if any_line else rf"\n\n({names}):"
    before, *rest = re.split(boundary, text)
    return before.strip(), [(label, body.strip()) for label, body in zip(rest[::2], rest[1::2])]


def first_human_turn(text: str) -> str:
    """Reduce an HH transcript to its first human turn; any other text is returned stripped."""
    return next((body for label, body in split(text)[1] if label == HUMAN), text.strip())


def transcript_messages(text: str) -> list[dict[str, str]] | None:
    """An HH transcript as chat messages, up to its last assistant turn; ``None`` for text that
    is not one."""
    before, turns = split(text)
    if len(turns) < 2 or before:
        return None
    messages = [{"role": ROLES[label], "content": body} for label, body in turns]
    while messages and messages[-1]["role"] != "assistant":  # a trailing question has no answer
        messages.pop()
    return messages or None


def join(texts: list[str]) -> str:
    """Human, assistant, ..., human turns written as one prompt, so a conversation with earlier
    turns fits where one prompt is expected; a single turn stays plain text."""
    if len(texts) == 1:
        return texts[0]
    return "\n\n".join(f"{(HUMAN, ASSISTANT)[i % 2]}: {text}" for i, text in enumerate(texts))
