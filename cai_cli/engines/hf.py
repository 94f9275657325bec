"""Local transformers engine: batched generation with left padding on CPU or GPU.

Prompts are sorted by length before they are cut into batches, so each batch pads little; the
results come back in the caller's order. Generation stops at the end of a turn (every end token
the tokenizer and generation config know) and at the caller's stop strings.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from cai_cli.engines.base import (ChatPrompts, Completion, Overflow, PromptInput, SamplingParams,
                                   common_prefix, options_overflow, split_overflow)
from cai_cli.config import CONTEXT_FIELDS, ModelConfig
from cai_cli.engines.models import (check_device, check_model_source, free_device_memory, load_causal_lm,
                            load_tokenizer, quiet_transformers)

# End-of-turn markers of common chat templates; those in a tokenizer's vocabulary stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


class HFBackend(ChatPrompts):
    def __init__(self, model: ModelConfig, what: str):
        import torch

        quiet_transformers()
        check_model_source(model, what)
        self.config = model
        self.name = model.name_or_path
        self.tokenizer = load_tokenizer(model, what)
        self.device = check_device(model, what)
        self.model = load_causal_lm(model, what, self.device)
        self._torch = torch
        self.has_chat_template = bool(self.tokenizer.chat_template)
        self.max_context = model.max_context or self._model_context()
        self.stop_token_ids = self._stop_token_ids()
        self.pad_token_id = self.tokenizer.pad_token_id
        self.on_tokens = None
        # transformers 5 renames the cache argument from past_key_values to cache
        import inspect

        parameters = inspect.signature(self.model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        from cai_cli.engines.kv import PrefixStore

        self.prefixes = PrefixStore(self.model, self._cache_argument)

    def close(self) -> None:
        """Drop the model and its cached prefixes and give their device memory back; the
        backend cannot generate afterwards. Closing twice is harmless."""
        if self.model is None:
            return
        self.prefixes.clear()
        self.model = self.prefixes = None
        free_device_memory()

    def __enter__(self) -> "HFBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextlib.contextmanager
    def plain_attention(self):
        """The model as transformers runs it by default (its own ``sdpa`` attention and masks,
        not ours), for a baseline to compare against."""
        kept = self.model.config._attn_implementation
        if kept == "sdpa":
            yield self.model
            return
        self.model.set_attn_implementation("sdpa")
        try:
            yield self.model
        finally:
            self.model.set_attn_implementation(kept)

    def _model_context(self) -> int:
        for name in CONTEXT_FIELDS:
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

    def generate(self, prompts: Sequence[PromptInput], params: SamplingParams,
                 seeds: Sequence[int] | None = None) -> list[Completion | Overflow]:
        torch = self._torch
        self._require_open()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        encoded = self.encode_many(prompts)
        fitting, results = split_overflow(encoded, params.max_new_tokens, self.max_context)
        fitting = batch_order(fitting, encoded)
        if seeds is None:
            torch.manual_seed(params.seed)  # one stream for the call, drawn batch after batch
        size = self.config.forward_batch_size
        for start in range(0, len(fitting), size):
            batch = fitting[start:start + size]
            row_seeds = None if seeds is None else [seeds[i] for i in batch]
            for index, completion in zip(batch, self._generate_batch([encoded[i] for i in batch],
                                                                     params, row_seeds)):
                results[index] = completion
        return results  # type: ignore[return-value]

    def _require_open(self) -> None:
        if self.model is None:
            raise RuntimeError(f"the backend of '{self.name}' is closed")

    def _generate_batch(self, batch: list[list[int]], params: SamplingParams,
                        seeds: list[int] | None = None) -> list[Completion]:
        """Completions of one batch; with ``seeds``, row i samples from its own generator
        seeded by ``seeds[i]``."""
        torch = self._torch
        input_ids, attention, cache = self._batch_inputs(batch, room=params.max_new_tokens)
        width = input_ids.shape[1]
        if self.prefixes.supported:
            self._prefill(input_ids, attention, cache)
        # Sampling is done by our logits processors (the warpers, then a Gumbel-max draw) and
        # generate's greedy step takes the drawn token: see gumbel_sampler.
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=self.stop_token_ids or None,
            pad_token_id=self.pad_token_id,
        )
        if params.temperature > 0:
            generators = None if seeds is None else [
                torch.Generator(device=self.device).manual_seed(seed % 2**64) for seed in seeds]
            kwargs["logits_processor"] = gumbel_sampler(params, generators)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        if self.on_tokens is not None:
            kwargs["streamer"] = _StepCounter(self.on_tokens, self.pad_token_id,
                                              self.stop_token_ids)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                **({self._cache_argument: cache} if cache is not None else {}), **kwargs)
        completions = []
        stops = set(self.stop_token_ids)
        for row in output[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stops), None)
            new_tokens = row[:end] if end is not None else [t for t in row if t != self.pad_token_id]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            completions.append(Completion(cut_at_stop(text, params.stop).strip(),
                                          len(new_tokens) + (end is not None)))
        return completions


    def _prefill(self, input_ids, attention, cache) -> None:
        """Fill the cache with every prompt token but the last (``generate`` goes on from
        there), a run of rows of similar length at a time, so short prompts in a batch of long
        ones are not computed through the long ones' padding."""
        torch = self._torch
        columns, done = input_ids.shape[1], cache.get_seq_length()
        lengths = (attention[:, done:].sum(-1) - 1).tolist()  # own tokens to compute, per row
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        for first, last in _runs(lengths):
            start = columns - 1 - max(lengths[first:last])
            if start == columns - 1:
                continue
            part = self.prefixes.rows_view(cache, first, last, start)
            with torch.inference_mode():
                self.model(input_ids=input_ids[first:last, start:-1].to(self.device),
                           attention_mask=attention[first:last, :-1].to(self.device),
                           position_ids=positions[first:last, start:-1].to(self.device),
                           use_cache=True, logits_to_keep=1, **{self._cache_argument: part})
        for layer in cache.layers:
            layer.set_column(columns - 1)

    def _batch_inputs(self, batch: list[list[int]], room: int | None = None,
                      keeps: list[int] | None = None):
        """Input ids, attention mask and a cache holding the prefixes that rows share.

        Rows that begin with the same ``PREFIX_MIN`` tokens or more (the same worked examples,
        the same question) form a group; its prefix comes from ``self.prefixes`` (computed once,
        for one row, and kept) and only the rest of each row is computed. Rows are laid out as
        ``prefix | prefix padding | padding | rest`` (``kv.py``), so every prompt ends at the same
        column; position ids follow the attention mask, so the padding changes nothing (greedy
        outputs equal the unbatched ones). ``room``: the tokens to be generated; the cache is
        sized for them and, for models that allow it, keeps each prefix once for all its rows.
        ``keeps``: how many last positions of each row must be computed (default one).
        """
        torch = self._torch
        groups = prefix_groups(batch, keeps or [1] * len(batch))
        if not self.prefixes.supported:  # a plain cache: one prefix for the whole batch, or none
            groups = [g for g in groups if len(g[0]) == len(batch)]
        width = max((shared for _, shared in groups), default=0)
        own = [len(ids) for ids in batch]
        for rows, shared in groups:
            for row in rows:
                own[row] -= shared
        columns = width + max(own)
        cache = None
        if self.prefixes.supported and (groups or room is not None):
            cache = self.prefixes.batch_cache([(rows, batch[rows[0]][:shared]) for rows, shared in groups],
                                              len(batch), max(own) + (room or 0), cascade=room is not None)
        elif groups:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([batch[0][:width]], device=self.device),
                           use_cache=True, **{self._cache_argument: cache})
            cache.batch_repeat_interleave(len(batch))
        input_ids = torch.full((len(batch), columns), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), columns), dtype=torch.long)
        for rows, shared in groups:
            input_ids[rows, :shared] = torch.tensor(batch[rows[0]][:shared])
            attention[rows, :shared] = 1
        for row, ids in enumerate(batch):
            input_ids[row, columns - own[row]:] = torch.tensor(ids[len(ids) - own[row]:])
            attention[row, columns - own[row]:] = 1
        return input_ids, attention, cache

    def score_options(self, prompts: Sequence[PromptInput],
                      options: Sequence[str]) -> list[list[float] | Overflow]:
        """Log-probability of each option as the continuation of each prompt.

        The option tokens come from tokenising the prompt text *with* the option appended and
        taking what follows the common prefix, so a label like " (A)" is split the way the
        model would see it (a space may merge into the label's first token, or the prompt's last
        token into the label). When every option is one token right after the prompt, one
        forward pass over the prompt reads them all; otherwise each prompt+option sequence is
        scored and the option's token log-probabilities are summed.
        """
        self._require_open()
        results: list[list[float] | Overflow | None] = [None] * len(prompts)
        single: list[tuple[int, list[int], list[int]]] = []  # (prompt, ids, one id per option)
        multi: list[tuple[int, int, list[int], int]] = []  # (prompt, option, ids, option start)
        rendered = [self.render(prompt) for prompt in prompts]
        width = len(options) + 1
        encoded = self.tokenize_many([(text + suffix, special) for text, special in rendered
                                      for suffix in ("", *options)])
        for index in range(len(prompts)):
            prompt_ids, fulls = encoded[index * width], encoded[index * width + 1:(index + 1) * width]
            starts = self.option_starts(options, prompt_ids, fulls)
            overflow = options_overflow(prompt_ids, fulls, self.max_context)
            if overflow is not None:
                results[index] = overflow
            elif all(start == len(prompt_ids) and len(full) == start + 1
                     for full, start in zip(fulls, starts)):
                single.append((index, prompt_ids, [full[-1] for full in fulls]))
            else:
                multi += [(index, k, full, start) for k, (full, start) in enumerate(zip(fulls, starts))]

        for (index, _, option_ids), logprobs in zip(single, self._last_logprobs(
                [ids for _, ids, _ in single], [1] * len(single))):
            results[index] = [float(logprobs[-1, token]) for token in option_ids]
        scores: dict[int, list[float]] = {}
        # For the option tokens ids[start:] we need the distributions at positions start-1 .. -2.
        keeps = [len(ids) - start + 1 for _, _, ids, start in multi]
        for (index, k, ids, start), logprobs in zip(multi, self._last_logprobs(
                [ids for _, _, ids, _ in multi], keeps)):
            total = sum(float(logprobs[row, token]) for row, token in enumerate(ids[start:]))
            scores.setdefault(index, [0.0] * len(options))[k] = total
        for index, values in scores.items():
            results[index] = values
        return results  # type: ignore[return-value]

    def _last_logprobs(self, sequences: list[list[int]], keeps: list[int]) -> list:
        """Log-softmax over the vocabulary at the last ``keeps[i]`` positions of each sequence,
        in input order. Left padding with explicit position ids (so padding changes nothing)
        lets the model compute logits for those last positions only, not the whole sequence;
        a prefix all rows of a batch share is computed once (``_batch_inputs``)."""
        torch = self._torch
        out: list = [None] * len(sequences)
        order = batch_order(list(range(len(sequences))), sequences)
        size = self.config.forward_batch_size
        for begin in range(0, len(order), size):
            batch = order[begin:begin + size]
            keep = max(keeps[i] for i in batch)
            input_ids, attention, cache = self._batch_inputs([sequences[i] for i in batch],
                                                             keeps=[keeps[i] for i in batch])
            positions = (attention.cumsum(-1) - 1).clamp(min=0)
            start = cache.get_seq_length() if cache is not None else 0
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids[:, start:].to(self.device),
                                    attention_mask=attention.to(self.device),
                                    position_ids=positions[:, start:].to(self.device),
                                    use_cache=cache is not None, **{self._cache_argument: cache},
                                    logits_to_keep=keep).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
            for row, i in enumerate(batch):
                out[i] = logprobs[row, keep - keeps[i]:]
        return out


class _StepCounter:
    """A ``generate`` streamer that reports, at each decoding step, how many tokens it made and
    how many rows it finished. A row ends with a stop token (counted, as ``Completion.tokens``
    counts it) or, cut by a stop string, with padding (not counted); rows still going at the end
    finish there, at ``max_new_tokens``."""

    def __init__(self, report, pad_token_id: int | None, stop_token_ids=()):
        self.report, self.pad_token_id = report, pad_token_id
        self.stops = set(stop_token_ids)
        self.prompt_seen = False
        self.done: list[bool] | None = None

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate hands over the prompt first
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        if self.done is None:
            self.done = [False] * len(tokens)
        new = finished = 0
        for row, token in enumerate(tokens):
            if self.done[row]:
                continue
            if token == self.pad_token_id and token not in self.stops:
                self.done[row], finished = True, finished + 1  # cut by a stop string
                continue
            new += 1
            if token in self.stops:
                self.done[row], finished = True, finished + 1
        if new or finished:
            self.report(new, finished)

    def end(self) -> None:
        left = 0 if self.done is None else self.done.count(False)
        if left:
            self.report(0, left)


def gumbel_sampler(params: SamplingParams, generators: list | None = None):
    """Logits processors that sample the next token: transformers' own temperature, top-k and
    top-p warpers, then a Gumbel-max draw (the argmax of the log-probabilities plus Gumbel
    noise is a draw from the softmax), leaving the drawn token as the only candidate.

    The noise comes from torch's global generator, or with ``generators`` (one
    ``torch.Generator`` per row) row i's noise from ``generators[i]``: each step draws one
    vocabulary's worth of numbers per row, so a row's tokens depend on its own seed and
    logits, not on the other rows of its batch or its place among them.

    The draw is the same distribution as ``torch.multinomial`` over the softmax, which
    ``generate`` uses when sampling, but needs uniform random numbers rather than exponential
    ones: on a CPU that is several times cheaper, about 2 ms a step at 48 rows.
    """
    import torch
    from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    class GumbelDraw(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if generators is None:
                uniform = torch.rand_like(scores, dtype=torch.float32)
            else:
                uniform = torch.stack([torch.rand(scores.shape[-1], generator=generator,
                                                  device=scores.device, dtype=torch.float32)
                                       for generator in generators])
            uniform.clamp_(min=1e-20)
            drawn = (scores.float() - torch.log(-torch.log(uniform))).argmax(dim=-1, keepdim=True)
            return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)

    class TopP(LogitsProcessor):
        """``TopPLogitsWarper``'s nucleus (keep a token while the probability above it is
        below ``top_p``), found among the ``TOP_P_CANDIDATES`` likeliest tokens instead of by
        sorting the whole vocabulary, which was 7% of a SmolLM2 critique turn on a CPU; rows
        whose nucleus is wider go through transformers' own warper."""

        full = TopPLogitsWarper(params.top_p)

        def __call__(self, input_ids, scores):
            top, index = scores.topk(min(TOP_P_CANDIDATES, scores.shape[-1]), dim=-1)
            probs = (top.float() - torch.logsumexp(scores.float(), -1, keepdim=True)).exp()
            above = probs.cumsum(-1) - probs
            keep = above < params.top_p
            keep[:, 0] = True
            out = torch.full_like(scores, float("-inf")).scatter_(
                1, index, top.masked_fill(~keep, float("-inf")))
            wide = (above[:, -1] + probs[:, -1]) < params.top_p  # the nucleus may go further
            if wide.any():
                out[wide] = self.full(input_ids[wide], scores[wide])
            return out

    processors = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k:
        processors.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        processors.append(TopP())
    return LogitsProcessorList([*processors, GumbelDraw()])


TOP_P_CANDIDATES = 256  # top-p looks for its nucleus among these first


# Shortest shared prefix worth caching: below this the extra forward pass costs more than it saves.
PREFIX_MIN = 32


def batch_order(indices: list[int], encoded: list[list[int]]) -> list[int]:
    """The order in which to batch prompts: those that share their first ``PREFIX_MIN`` tokens
    with another prompt together (so a batch shares a prefix worth caching), longest first, then
    the rest longest first (so a batch pads little, and a batch too big fails at once)."""
    heads: dict[tuple, int] = {}
    for i in indices:
        head = tuple(encoded[i][:PREFIX_MIN])
        heads[head] = heads.get(head, 0) + 1

    def key(i: int):
        head = tuple(encoded[i][:PREFIX_MIN])
        return (0, head, -len(encoded[i])) if heads[head] > 1 else (1, (), -len(encoded[i]))

    return sorted(indices, key=key)


# A row shorter than this share of the longest row in its run starts a run of its own.
RUN_SHARE = 0.8


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """``(first, last)`` row ranges whose lengths are within ``RUN_SHARE`` of each other."""
    runs, first, low, high = [], 0, None, None
    for row, length in enumerate(lengths):
        if high is not None and (length < RUN_SHARE * high or length * RUN_SHARE > low):
            runs.append((first, row))
            first, low, high = row, None, None
        low = length if low is None else min(low, length)
        high = length if high is None else max(high, length)
    if lengths:
        runs.append((first, len(lengths)))
    return runs


def prefix_groups(batch: list[list[int]], keeps: list[int]) -> list[tuple[list[int], int]]:
    """``(rows, prefix length)`` of each group of two or more rows that begin with the same
    ``PREFIX_MIN`` tokens: the prefix they all share, short of each row's last ``keeps[row]``
    tokens (those must be computed row by row)."""
    heads: dict[tuple, list[int]] = {}
    for row, ids in enumerate(batch):
        heads.setdefault(tuple(ids[:PREFIX_MIN]), []).append(row)
    groups = []
    for rows in heads.values():
        members = [batch[row] for row in rows]
        shared = min(_common_prefix_all(members), min(len(batch[row]) - keeps[row] for row in rows))
        if len(rows) > 1 and shared >= PREFIX_MIN:
            groups.append((rows, shared))
    return groups


def _common_prefix_all(rows: list[list[int]]) -> int:
    """Length of the prefix every row shares."""
    length = min(len(row) for row in rows)
    first = rows[0]
    for row in rows[1:]:
        length = common_prefix(first[:length], row)
    return length



def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string."""
    cut = len(text)
    for stop in stops:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut]
