"""The protocol every inference engine implements, and the types it speaks.

A prompt is either a chat conversation (a list of ``{"role", "content"}`` messages, rendered by
the engine's chat template) or a plain string used as is (transcript format for base models).
A conversation that ends with an assistant message is a turn the model has begun: it is
continued from that text rather than answered with a new turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, Union

Message = dict[str, str]
PromptInput = Union[list[Message], str]


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int = 0  # without per-prompt seeds: reseeds the sampler at the start of each call
    stop: tuple[str, ...] = ()  # the text is cut before the first of these


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int  # new tokens generated


@dataclass(frozen=True)
class Overflow:
    """A prompt that does not fit the model's context with room for the new tokens."""

    prompt_tokens: int
    max_new_tokens: int
    max_context: int

    def __str__(self) -> str:
        return (f"{self.prompt_tokens} prompt tokens + {self.max_new_tokens} new tokens exceed "
                f"the context of {self.max_context}")


class NoLogprobs(Exception):
    """``score_options`` of an engine whose server returns no log-probabilities (some hosted
    APIs): the judge falls back to sampled verdicts (``judging.Judge``)."""


class Backend(Protocol):
    name: str  # the model's name or path, for messages
    max_context: int
    has_chat_template: bool  # whether chat prompts (lists of messages) can be rendered
    # Set by a stage to see generation move within a call (progress bars): called with the number
    # of tokens just generated and the number of completions that just finished, at every
    # decoding step (hf: the finished are the rows that end there) or as requests finish
    # (servers: each one's tokens, one completion).
    on_tokens: Optional[Callable[[int, int], None]]

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion | Overflow]:
        """One completion per prompt, in input order; ``Overflow`` for a prompt that does not fit.

        With ``seeds`` (one int per prompt, see ``seeding.record_seed``) prompt i is sampled with
        ``seeds[i]`` alone: its text depends on its prompt and seed, not on the other prompts of
        the call, how they are batched or sharded. Without, the call is seeded by ``params.seed``
        (reproducible for the same call, but a prompt's text depends on its batch)."""
        ...

    def score_options(self, prompts: Sequence[PromptInput],
                      options: Sequence[str]) -> list[list[float] | Overflow]:
        """For each prompt, the log-probability of each option text as its continuation (the
        sum over the option's tokens), without generating; ``Overflow`` where it does not fit.
        Raises ``NoLogprobs`` when the engine cannot give log-probabilities."""
        ...

    def close(self) -> None:
        """Release the model and the device memory it holds; the backend is unusable after.
        A backend is also a context manager that closes on leaving the ``with`` block."""
        ...

    def __enter__(self) -> "Backend":
        ...

    def __exit__(self, *exc_info) -> None:
        ...


class ChatPrompts:
    """Prompts to token ids through a transformers tokenizer and its chat template, for the
    engines that tokenise in this process (hf, vllm). Needs ``tokenizer``,
    ``has_chat_template`` and ``name``.

    Every text in a prompt (the data's prompts, the models' answers, critiques and revisions,
    the worked examples) is tokenised as text: a control-token string inside it such as
    ``<|im_end|>`` never becomes the control id, only the chat template's own do
    (``engines.literal``)."""

    tokenizer: object
    has_chat_template: bool
    name: str

    def render(self, prompt: PromptInput) -> tuple[str, bool]:
        """The text of a prompt, its contents marked (``literal.mark``), and whether the
        tokenizer should add its special tokens (a chat template writes its own). A
        conversation ending in an assistant message is continued."""
        from cai_cli.engines import literal

        if isinstance(prompt, str):
            return literal.mark(prompt, self.tokenizer), True
        if not self.has_chat_template:
            from cai_cli.errors import UserError

            raise UserError(f"model '{self.name}' has no chat template; use prompt_format: "
                            "transcript for base models")
        begun = prompt[-1]["role"] == "assistant"
        text = self.tokenizer.apply_chat_template(
            literal.mark_conversation(prompt, self.tokenizer), tokenize=False,
            add_generation_prompt=not begun, continue_final_message=begun)
        return text, False

    def tokenize(self, text: str, special: bool) -> list[int]:
        from cai_cli.engines import literal

        return literal.encode(self.tokenizer, text, special)

    def tokenize_many(self, texts: Sequence[tuple[str, bool]]) -> list[list[int]]:
        """``tokenize`` of many ``(text, special)`` at once (a fast tokenizer encodes a list
        in one call per kind; a text holding a control-token string is encoded alone)."""
        from cai_cli.engines import literal

        out: list = [None] * len(texts)
        for index, (text, special) in enumerate(texts):
            if literal.is_marked(text):
                out[index] = literal.encode(self.tokenizer, text, special)
        for special in (True, False):
            indices = [i for i, (_, s) in enumerate(texts) if s is special and out[i] is None]
            if indices:
                ids = self.tokenizer([texts[i][0] for i in indices],
                                     add_special_tokens=special)["input_ids"]
                for i, row in zip(indices, ids):
                    out[i] = list(row)
        return out

    def encode(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt, ready for the model's next token."""
        return self.tokenize(*self.render(prompt))

    def encode_many(self, prompts: Sequence[PromptInput]) -> list[list[int]]:
        return self.tokenize_many([self.render(prompt) for prompt in prompts])

    def option_starts(self, options: Sequence[str], prompt_ids: list[int],
                      fulls: list[list[int]]) -> list[int]:
        """Where each option's tokens begin in ``fulls`` (the prompt tokenised with each option
        appended), after checking that each option comes out as its own, different tokens that
        decode back to it."""
        starts = [common_prefix(prompt_ids, full) for full in fulls]
        tails = [full[start:] for full, start in zip(fulls, starts)]
        decoded = [self.tokenizer.decode(tail).strip() for tail in tails]
        if any(not tail for tail in tails) or len(set(map(tuple, tails))) < len(tails) or \
                any(d != o.strip() for d, o in zip(decoded, options)):
            from cai_cli.errors import UserError

            raise UserError(
                f"the tokenizer of '{self.name}' cannot represent the option labels "
                f"{', '.join(map(repr, options))} (they tokenise to {tails}, which decode to "
                f"{decoded}); use a feedback model whose tokenizer covers plain ASCII text")
        return starts


def split_overflow(encoded: Sequence[Sequence[int]], max_new_tokens: int,
                   max_context: int) -> tuple[list[int], list[Overflow | None]]:
    """``(fitting, results)``: the indices of the prompts whose tokens leave room for
    ``max_new_tokens`` in the context, and a result per prompt, ``Overflow`` for each that
    does not fit, None for the others (the engine fills those in)."""
    fitting, results = [], []
    for index, ids in enumerate(encoded):
        if len(ids) + max_new_tokens > max_context:
            results.append(Overflow(len(ids), max_new_tokens, max_context))
        else:
            fitting.append(index)
            results.append(None)
    return fitting, results


def options_overflow(prompt_ids: Sequence[int], fulls: Sequence[Sequence[int]],
                     max_context: int) -> Overflow | None:
    """``Overflow`` when a prompt with its longest option (``fulls``: the prompt tokenised with
    each option) does not fit the context, else None."""
    longest = max(len(full) for full in fulls)
    if longest <= max_context:
        return None
    return Overflow(len(prompt_ids), longest - len(prompt_ids), max_context)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
