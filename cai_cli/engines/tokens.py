"""Counting prompt tokens without a model: the engines' own rendering (``ChatPrompts``) with the
model's tokenizer and chat template alone, or about four characters a token when no tokenizer is
on this machine. ``cai plan`` and the stages' ``work`` use these.
"""

from __future__ import annotations

from typing import Any, Sequence

from cai_cli.engines.base import ChatPrompts, PromptInput
from cai_cli.engines.sizes import local_file
from cai_cli.errors import UserError


class TokenCounter(ChatPrompts):
    """Renders and tokenises prompts as the hf and vLLM engines do (``ChatPrompts``), with the
    model's tokenizer and chat template alone."""

    approximate = False

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.has_chat_template = bool(tokenizer.chat_template)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation_tokens(self, messages: list[dict]) -> int:
        """Tokens of a whole conversation, as a trainer sees it."""
        if not self.has_chat_template:
            return self.count("".join(f"{m['role']}: {m['content']}\n\n" for m in messages))
        return len(self.tokenize(self.tokenizer.apply_chat_template(messages, tokenize=False),
                                 False))


class ApproxCounter:
    """No tokenizer here (a hub model not in the cache, a server's model): about four
    characters a token, each message as a line of a transcript. Chunks of text stand for
    tokens, so prompts that share a beginning still share their first "tokens"."""

    approximate = True
    has_chat_template = True

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def _chunks(text: str) -> list[str]:
        return [text[i:i + 4] for i in range(0, len(text), 4)]

    def _text(self, prompt: PromptInput) -> str:
        if isinstance(prompt, str):
            return prompt
        return "".join(f"<{m['role']}>{m['content']}\n" for m in prompt)

    def encode_many(self, prompts: Sequence[PromptInput]) -> list[list]:
        return [self._chunks(self._text(p)) for p in prompts]

    def conversation_tokens(self, messages: list[dict]) -> int:
        return len(self._chunks(self._text(messages)))


def token_counter(name_or_path: str, revision: str | None, what: str, cache: dict):
    """The tokenizer of a model (local directory or the hub cache), or an approximation."""
    if name_or_path in cache:
        return cache[name_or_path]
    counter: Any = ApproxCounter(name_or_path)
    if local_file(name_or_path, "tokenizer_config.json", revision) is not None or \
            local_file(name_or_path, "tokenizer.json", revision) is not None:
        from cai_cli.config import HFModelConfig
        from cai_cli.engines.models import load_tokenizer, quiet_transformers

        quiet_transformers()
        try:
            tokenizer = load_tokenizer(HFModelConfig(name_or_path=name_or_path, revision=revision),
                                       what)
            counter = TokenCounter(tokenizer, name_or_path)
        except UserError:
            pass
    cache[name_or_path] = counter
    return counter
