"""Local transformers engine: batched generation with left padding on CPU or GPU.

Prompts are sorted by length before they are cut into batches, so each batch pads little; the
results come back in the caller's order. Generation stops at the end of a turn (every end token
the tokenizer and generation config know) and at the caller's stop strings.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from cai_cli.backends.base import Completion, Overflow, PromptInput, SamplingParams
from cai_cli.config import ModelConfig
from cai_cli.errors import UserError

# End-of-turn markers of common chat templates; those in a tokenizer's vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$|^[\w.-]+$")


def quiet_transformers() -> None:
    """Our own progress bars and messages replace the libraries' per-file tqdm bars."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


def is_local_model(name_or_path: str) -> bool:
    """A name is a local path when it exists, looks like a path (``./x``, ``/x``, ``~/x``,
    ``a/b/c``) or its first component is a directory here (``runs/tiny-model`` with ``runs/``
    present). Anything else of the form ``org/name`` is a hub id."""
    path = Path(name_or_path).expanduser()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or not _HUB_ID.match(name_or_path):
        return True
    return Path(name_or_path.split("/")[0]).is_dir() and "/" in name_or_path


def check_model_source(model: ModelConfig, what: str) -> None:
    """Fail early, before anything is written, for a local model path that is not a model."""
    if not is_local_model(model.name_or_path):
        return  # a hub id: loading will tell whether it can be reached
    path = Path(model.name_or_path).expanduser()
    if not path.exists():
        raise UserError(f"{what}.name_or_path: model directory not found: {path} "
                        f"(build a test model with `cai tiny-model {model.name_or_path}`, or give a hub id)")
    if not (path / "config.json").is_file():
        raise UserError(f"{what}.name_or_path: {path} has no config.json; expected a directory "
                        "written by save_pretrained")


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        if device.startswith("cuda") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype)


def load_tokenizer(model: ModelConfig, what: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model.name_or_path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{what}.name_or_path: cannot load a tokenizer from '{model.name_or_path}': "
                        f"{str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


class HFBackend:
    def __init__(self, model: ModelConfig, what: str):
        import torch
        from transformers import AutoModelForCausalLM

        quiet_transformers()
        check_model_source(model, what)
        self.config = model
        self.tokenizer = load_tokenizer(model, what)
        self.device = resolve_device(model.device)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model.name_or_path, dtype=resolve_dtype(model.dtype, self.device),
                revision=model.revision, trust_remote_code=model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"{what}.name_or_path: cannot load a causal LM from '{model.name_or_path}': "
                            f"{str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self._torch = torch
        self.has_chat_template = bool(self.tokenizer.chat_template)
        self.max_context = model.max_context or self._model_context()
        self.stop_token_ids = self._stop_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id

    def _model_context(self) -> int:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.model.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        limit = self.tokenizer.model_max_length
        return limit if limit and limit < 10**7 else 2048

    def _stop_token_ids(self) -> list[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        return sorted(ids)

    def encode(self, prompt: PromptInput) -> list[int]:
        """Token ids of a prompt: a conversation through the chat template, ready for the
        assistant's turn, or a plain string as is."""
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        if not self.has_chat_template:
            raise UserError(f"model '{self.config.name_or_path}' has no chat template; use "
                            "generate_sl.prompt_format: transcript for base models")
        return self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_dict=False)

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams) -> list[Completion | Overflow]:
        torch = self._torch
        encoded = [self.encode(prompt) for prompt in prompts]
        results: list[Completion | Overflow | None] = [None] * len(prompts)
        fitting = []
        for index, ids in enumerate(encoded):
            if len(ids) + params.max_new_tokens > self.max_context:
                results[index] = Overflow(len(ids), params.max_new_tokens, self.max_context)
            else:
                fitting.append(index)
        fitting.sort(key=lambda i: -len(encoded[i]))  # longest first: a too-big batch fails at once
        torch.manual_seed(params.seed)
        size = self.config.batch_size
        for start in range(0, len(fitting), size):
            batch = fitting[start:start + size]
            for index, completion in zip(batch, self._generate_batch([encoded[i] for i in batch], params)):
                results[index] = completion
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams) -> list[Completion]:
        torch = self._torch
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):  # left padding: every prompt ends at the same column
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        sampling = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sampling,
            temperature=params.temperature if sampling else None,
            top_p=params.top_p if sampling else None,
            top_k=params.top_k if sampling else None,
            eos_token_id=self.stop_token_ids or None,
            pad_token_id=self.pad_token_id,
        )
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device), **kwargs)
        completions = []
        stops = set(self.stop_token_ids)
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            new_tokens = row[:end] if end is not None else [t for t in row if t != self.pad_token_id]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            completions.append(Completion(cut_at_stop(text, params.stop).strip(),
                                          len(new_tokens) + (end is not None)))
        return completions


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]
