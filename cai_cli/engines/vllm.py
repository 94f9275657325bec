"""vLLM's offline engine in this process (``backend: vllm``): continuous batching, paged
attention and prefix caching (critique, revision and comparison prompts share their worked
examples, so most of their tokens are computed once).

Every prompt is one request with its own ``SamplingParams`` and seed, so a record's text does
not depend on the other requests of a call. Prompts are rendered and tokenised here, with the
same chat template and special-token rules as the hf backend, so both engines see the same
tokens and an overlong conversation is found before it is sent (``Overflow``). Option
log-probabilities are read with ``logprob_token_ids`` (exactly the options' tokens, raw
log-probabilities, prefix cache kept) where the installed vLLM has it, else from the top
``TOP_LOGPROBS`` alternatives, with an error when an option is not among them.

vLLM starts its engine in worker processes with ``spawn``: the program that imports this must
guard its entry point with ``if __name__ == "__main__"`` (``cai`` does).
"""

from __future__ import annotations

import os
from typing import Sequence

from cai_cli.engines.base import (ChatPrompts, Completion, Overflow, PromptInput, SamplingParams,
                                   options_overflow, split_overflow)
from cai_cli.engines.hf import END_OF_TURN_TOKENS, cut_at_stop
from cai_cli.config import VLLMModelConfig
from cai_cli.errors import UserError, reason
from cai_cli.run.seeding import record_seed

# Alternatives asked for when this vLLM cannot be asked for the options' tokens themselves.
TOP_LOGPROBS = 20


class VLLMBackend(ChatPrompts):
    def __init__(self, model: VLLMModelConfig, what: str):
        from cai_cli.engines.models import check_model_source, model_key, quiet_transformers

        quiet_transformers()
        check_model_source(model, what)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        try:
            import torch
            import vllm
        except ImportError:
            raise UserError(f"{what}.backend: vllm, but vLLM is not installed in this Python "
                            "environment; `make vllm` builds .venv-vllm with it (see docs/engines.md), "
                            "or use backend: hf") from None
        from cai_cli.engines.models import resolve_dtype

        self._vllm = vllm
        self.config, self.name = model, model.name_or_path
        gpu = torch.cuda.is_available()
        share = model.gpu_memory_utilization or (0.9 if gpu else 0.3)
        dtype = resolve_dtype(model.dtype, "cuda" if gpu else "cpu")
        extra = {}
        if not gpu and model.tensor_parallel_size == 1:
            # On a CPU the engine's own processes buy nothing (they share the same cores) and
            # each costs a fresh import of torch and vLLM: in this process the engine starts
            # in about 20 s instead of 60 s on 2 cores.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            extra["distributed_executor_backend"] = "uni"
        try:
            self.llm = vllm.LLM(
                model=model.name_or_path, revision=model.revision,
                trust_remote_code=model.trust_remote_code, dtype=str(dtype).removeprefix("torch."),
                tensor_parallel_size=model.tensor_parallel_size, gpu_memory_utilization=share,
                max_model_len=model.max_context, enable_prefix_caching=True,
                enforce_eager=model.enforce_eager, seed=0, max_logprobs=TOP_LOGPROBS, **extra)
        except (ValueError, RuntimeError, OSError) as exc:
            raise UserError(f"{model_key(what)}: vLLM cannot start '{model.name_or_path}': "
                            f"{reason(exc)}; check {what}.gpu_memory_utilization, "
                            f"{what}.max_context and {what}.tensor_parallel_size") from None
        self.tokenizer = self.llm.get_tokenizer()
        self.has_chat_template = bool(getattr(self.tokenizer, "chat_template", None))
        self.on_tokens = None  # told once per call: the offline engine runs it as a whole
        self.max_context = self.llm.llm_engine.model_config.max_model_len
        vocab = self.tokenizer.get_vocab()
        self.stop_token_ids = sorted({vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
                                     | ({self.tokenizer.eos_token_id}
                                        if self.tokenizer.eos_token_id is not None else set()))
        fields = getattr(vllm.SamplingParams, "__struct_fields__", ())
        self.exact_logprobs = "logprob_token_ids" in fields  # vLLM >= 0.17

    # -- lifecycle

    def close(self) -> None:
        """Stop the engine (its worker processes and their device memory); closing twice is
        harmless."""
        if getattr(self, "llm", None) is None:
            return
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None:
            core.shutdown()
        self.llm = None
        from cai_cli.engines.models import free_device_memory

        free_device_memory()

    def __enter__(self) -> "VLLMBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _require_open(self) -> None:
        if self.llm is None:
            raise RuntimeError(f"the backend of '{self.name}' is closed")

    # -- requests

    def _sampling(self, params: SamplingParams, seed: int):
        return self._vllm.SamplingParams(
            max_tokens=params.max_new_tokens, temperature=params.temperature,
            top_p=params.top_p, top_k=params.top_k, seed=seed,
            stop=list(params.stop) or None, stop_token_ids=self.stop_token_ids,
            skip_special_tokens=True)

    def _run(self, token_ids: list[list[int]], sampling: list) -> list:
        from vllm.inputs import TokensPrompt

        if not token_ids:
            return []
        return self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
                                 sampling, use_tqdm=False)

    # -- the protocol

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion | Overflow]:
        self._require_open()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if seeds is None:  # one seed for the call: each prompt's drawn from it by position
            seeds = [record_seed(params.seed, index) for index in range(len(prompts))]
        encoded = self.encode_many(prompts)
        fitting, results = split_overflow(encoded, params.max_new_tokens, self.max_context)
        outputs = self._run([encoded[i] for i in fitting],
                            [self._sampling(params, seeds[i]) for i in fitting])
        for index, output in zip(fitting, outputs):
            sample = output.outputs[0]
            results[index] = Completion(cut_at_stop(sample.text, params.stop).strip(),
                                        len(sample.token_ids))
        if self.on_tokens is not None:
            self.on_tokens(sum(len(output.outputs[0].token_ids) for output in outputs),
                           len(outputs))
        return results  # type: ignore[return-value]

    def score_options(self, prompts: Sequence[PromptInput],
                      options: Sequence[str]) -> list[list[float] | Overflow]:
        """Log-probability of each option as the continuation of each prompt: the sum of its
        tokens' log-probabilities, each read as the next token after the prompt and the
        option's tokens before it (one token per option, after the prompt, in the usual case:
        one request per prompt). The option tokens come from tokenising the prompt with the
        option appended, as in the hf backend."""
        self._require_open()
        results: list[list[float] | Overflow | None] = [None] * len(prompts)
        # (prompt, option, context ids, token): the option's token after that context
        pieces: list[tuple[int, int, tuple[int, ...], int]] = []
        for index, prompt in enumerate(prompts):
            text, special = self.render(prompt)
            prompt_ids = self.tokenize(text, special)
            fulls = [self.tokenize(text + option, special) for option in options]
            starts = self.option_starts(options, prompt_ids, fulls)
            overflow = options_overflow(prompt_ids, fulls, self.max_context)
            if overflow is not None:
                results[index] = overflow
                continue
            for k, (full, start) in enumerate(zip(fulls, starts)):
                pieces += [(index, k, tuple(full[:j]), full[j]) for j in range(start, len(full))]
        contexts: dict[tuple[int, ...], list[int]] = {}
        for _, _, context, token in pieces:
            wanted = contexts.setdefault(context, [])
            if token not in wanted:
                wanted.append(token)
        read = self._next_token_logprobs(list(contexts.items()))
        for index, k, context, token in pieces:
            scores = results[index]
            if scores is None:
                scores = results[index] = [0.0] * len(options)
            scores[k] += read[context][token]  # type: ignore[index]
        return results  # type: ignore[return-value]

    def _next_token_logprobs(self, requests: list[tuple[tuple[int, ...], list[int]]]
                             ) -> dict[tuple[int, ...], dict[int, float]]:
        """For each ``(context, tokens)``, the log-probability of each token as the next one."""
        vllm = self._vllm
        if self.exact_logprobs:
            sampling = [vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=tokens,
                                            detokenize=False) for _, tokens in requests]
        else:
            sampling = [vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS,
                                            detokenize=False)] * len(requests)
        outputs = self._run([list(context) for context, _ in requests], sampling)
        read = {}
        for (context, tokens), output in zip(requests, outputs):
            found = output.outputs[0].logprobs[0]
            missing = [t for t in tokens if t not in found]
            if missing:
                shown = ", ".join(repr(self.tokenizer.decode([t])) for t in missing)
                raise UserError(
                    f"'{self.name}': the option token(s) {shown} are not among the "
                    f"{TOP_LOGPROBS} most likely next tokens, and this vLLM "
                    f"({vllm.__version__}) cannot be asked for them by id "
                    "(logprob_token_ids, vLLM >= 0.17); upgrade vLLM or use backend: hf")
            read[context] = {t: float(found[t].logprob) for t in tokens}
        return read

