"""Key/value caches for batches whose prompts begin with the same tokens.

Worked examples put hundreds of identical tokens in front of every critique and comparison
prompt. A batch may hold several *groups* of rows, each group sharing a prefix (the rows that
drew the same examples), and rows of their own. Three things keep those prefixes cheap:

- ``PrefixStore`` computes the keys and values of a prefix once (one row) and keeps the last few,
  so every batch, and every call, that begins with the same tokens reuses them.
- ``PrefixLayer`` holds a batch's cache in buffers sized up front, so a decoding step writes one
  column instead of copying the whole cache (``DynamicLayer`` concatenates at every step).
- In *cascade* mode the layer keeps each prefix once, not once per row, and returns only the
  rows' own keys and values, tagged with the prefixes; ``shared_prefix_attention`` then scores
  a decoding step's queries of a group's rows against its prefix in one matrix product and
  merges them with each row's own part in one softmax. Reading a prefix once instead of once
  per row is what makes decoding after a long shared prompt fast.

A batch is laid out as ``prefix | prefix padding | padding | own tokens``: the prefix columns
are as wide as the longest prefix, a row's prefix sits at their start and the columns after it
are masked, so positions taken from the attention mask stay right for every row.

Only models whose every layer is a plain full-attention layer (no sliding window, no recurrent
state) use these caches, and only those with ``sdpa`` attention take the cascade path; the
others keep the prefix copied into every row, which is exact as well.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "cai_shared_prefix"
_PREFIXES = "_cai_prefixes"  # attribute tagging a layer's returned keys with its Prefixes


@dataclass
class Prefix:
    """One group's prefix in one layer: its rows and their shared keys and values
    ``(1, kv heads, length, head dim)``."""
    rows: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor


@dataclass
class Prefixes:
    groups: list[Prefix]
    width: int  # prefix columns: the longest prefix

    def rows(self, first: int, last: int) -> Prefixes:
        """The groups of rows ``first`` to ``last - 1``, numbered from ``first``."""
        groups = []
        for group in self.groups:
            inside = group.rows[(group.rows >= first) & (group.rows < last)]
            if len(inside):
                groups.append(Prefix(inside - first, group.keys, group.values))
        return Prefixes(groups, self.width)

    def lay_out(self, rows: int, like: torch.Tensor, values: bool) -> torch.Tensor:
        """The prefix columns of every row, as a ``DynamicLayer`` would hold them (zeros where a
        row's prefix is shorter than ``width``: masked, and finite so they weigh nothing)."""
        out = like.new_zeros((rows, like.shape[1], self.width, like.shape[3]))
        for group in self.groups:
            source = group.values if values else group.keys
            out[group.rows, :, :source.shape[2]] = source
        return out


def shared_prefix_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                            **kwargs):
    """``sdpa`` attention, except for keys tagged with shared prefixes (cascade mode)."""
    prefixes: Prefixes | None = getattr(key, _PREFIXES, None)
    if prefixes is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rows, width = key.shape[0], prefixes.width
    if query.shape[2] > 1:  # a prefill: each group against its own prefix, the other rows alone
        length, own = query.shape[2], key.shape[2]
        if attention_mask is None:  # no padding anywhere: causal over the own columns
            causal = torch.ones(length, own, dtype=torch.bool, device=query.device).tril(own - length)
            attention_mask = torch.cat([causal.new_ones(length, width), causal], dim=-1)
            attention_mask = attention_mask.expand(rows, 1, -1, -1)
        output = query.new_empty((rows, length, query.shape[1], query.shape[3]))
        alone = torch.ones(rows, dtype=torch.bool, device=query.device)
        for group in prefixes.groups:
            n, columns = len(group.rows), group.keys.shape[2]
            mask = attention_mask[group.rows]
            output[group.rows] = sdpa_attention_forward(
                module, query[group.rows],
                torch.cat([group.keys.expand(n, -1, -1, -1), key[group.rows]], dim=2),
                torch.cat([group.values.expand(n, -1, -1, -1), value[group.rows]], dim=2),
                torch.cat([mask[..., :columns], mask[..., width:]], dim=-1),
                dropout=dropout, scaling=scaling, **kwargs)[0]
            alone[group.rows] = False
        if alone.any():
            output[alone] = sdpa_attention_forward(
                module, query[alone], key[alone], value[alone], attention_mask[alone][..., width:],
                dropout=dropout, scaling=scaling, **kwargs)[0]
        return output, None

    # One decoding step: queries (rows, heads, 1, d). Heads h*g .. h*g+g-1 share kv head h.
    heads, dim, kv_heads = query.shape[1], query.shape[3], key.shape[1]
    groups = heads // kv_heads
    scaling = dim ** -0.5 if scaling is None else scaling
    prefix_scores = query.new_full((rows, heads, 1, width), float("-inf"))
    for group in prefixes.groups:
        length = group.keys.shape[2]
        scores = _grouped(query[group.rows], group.keys[0].transpose(1, 2))
        prefix_scores[group.rows, :, :, :length] = scores * scaling
    # The rows' own columns, each kv head against its group of query heads, without copying
    # the keys and values once per query head (``repeat_kv``): that copy, a step's whole own
    # cache many times over, was the largest cost after the matrix products.
    by_kv = query.reshape(rows, kv_heads, groups, dim)
    own_scores = torch.matmul(by_kv, key.transpose(2, 3)).reshape(rows, heads, 1, -1)
    scores = torch.cat([prefix_scores, own_scores * scaling], dim=-1)
    if attention_mask is not None:  # (rows, 1, 1, width + own)
        scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                  else scores + attention_mask)
    weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    output = torch.matmul(weights[..., width:].reshape(rows, kv_heads, groups, -1),
                          value).reshape(rows, heads, 1, dim)
    for group in prefixes.groups:
        length = group.keys.shape[2]
        output[group.rows] += _grouped(weights[group.rows, :, :, :length], group.values[0])
    return output.transpose(1, 2).contiguous(), None


def _grouped(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``left @ right`` for ``left`` (rows, heads, 1, k) and one (k, n) matrix per kv head,
    ``right`` (kv heads, k, n): one product per kv head, over all rows and their heads."""
    rows, heads, _, inner = left.shape
    kv_heads = right.shape[0]
    groups = heads // kv_heads
    stacked = left.reshape(rows, kv_heads, groups, inner).transpose(0, 1)
    stacked = stacked.reshape(kv_heads, rows * groups, inner)
    out = torch.bmm(stacked, right)
    return out.reshape(kv_heads, rows, groups, -1).transpose(0, 1).reshape(rows, heads, 1, -1)


AttentionInterface.register(ATTENTION, shared_prefix_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class PrefixLayer(DynamicLayer):
    """One layer's cache for a batch: the prefix columns, then each row's own columns, in
    zeroed buffers with room for ``capacity`` own columns (they grow, by doubling, past that).

    With ``cascade`` each prefix is kept once and ``update`` returns the rows' own keys and
    values tagged with the prefixes; otherwise the prefixes are laid out in every row and
    ``update`` returns the whole cache, as ``DynamicLayer`` would. ``like``: keys and values of
    this layer (any length) for the shapes. ``rows_view`` gives a layer for some of the rows that
    writes into the same buffers, to fill the cache a few rows at a time.
    """

    def __init__(self, prefixes: Prefixes, rows: int, capacity: int, cascade: bool, like: tuple):
        super().__init__()
        self.prefixes = prefixes if prefixes.width else None
        self.cascade = cascade and self.prefixes is not None
        self.offset = prefixes.width if self.cascade else 0  # prefix columns outside the buffers
        columns = max(capacity + (0 if self.cascade else prefixes.width), 1)
        keys, values = like
        self._keys = keys.new_zeros((rows, keys.shape[1], columns, keys.shape[3]))
        self._values = values.new_zeros((rows, values.shape[1], columns, values.shape[3]))
        self.device, self.is_initialized, self.growable = keys.device, True, True
        self.length = 0  # columns used in the buffers
        if self.prefixes and not self.cascade:
            self.update(prefixes.lay_out(rows, keys, False), prefixes.lay_out(rows, values, True))
        else:
            self._views()

    def _views(self) -> None:
        self.keys = self._keys[:, :, :self.length]
        self.values = self._values[:, :, :self.length]
        if self.cascade:
            setattr(self.keys, _PREFIXES, self.prefixes)

    def rows_view(self, first: int, last: int, column: int) -> PrefixLayer:
        """Rows ``first`` to ``last - 1``, next to be written at input column ``column``."""
        view = PrefixLayer.__new__(PrefixLayer)
        DynamicLayer.__init__(view)
        view._keys, view._values = self._keys[first:last], self._values[first:last]
        view.cascade, view.offset = self.cascade, self.offset
        view.prefixes = self.prefixes.rows(first, last) if self.cascade else None
        view.device, view.is_initialized, view.growable = self.device, True, False
        view.length = column - self.offset
        view._views()
        return view

    def set_column(self, column: int) -> None:
        """Columns up to ``column`` are written (by views)."""
        self.length = column - self.offset
        self._views()

    def update(self, key_states, value_states, *args, **kwargs):
        end = self.length + key_states.shape[2]
        if end > self._keys.shape[2]:
            if not self.growable:
                raise RuntimeError("a view of a shared-prefix cache cannot grow")
            keys, values = self._keys, self._values
            self._keys = keys.new_zeros((keys.shape[0], keys.shape[1], 2 * end, keys.shape[3]))
            self._values = values.new_zeros((values.shape[0], values.shape[1], 2 * end, values.shape[3]))
            self._keys[:, :, :self.length] = keys[:, :, :self.length]
            self._values[:, :, :self.length] = values[:, :, :self.length]
        self._keys[:, :, self.length:end] = key_states
        self._values[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.offset + self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be repeated")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be reindexed")

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("a shared-prefix cache cannot be reordered")


class PrefixStore:
    """Keys and values of the last ``size`` shared prefixes, computed with one row each.

    A prefix is computed the same way whether or not it was seen before, so reusing it gives
    the numbers a fresh computation would: outputs do not depend on what ran earlier.
    ``supported`` is false for models with other kinds of layers; they do without.
    """

    def __init__(self, model, cache_argument: str, size: int = 8):
        self.model, self.cache_argument, self.size = model, cache_argument, size
        self._entries: OrderedDict[tuple[int, ...], list[tuple]] = OrderedDict()
        layers = DynamicCache(config=model.config).layers
        self.supported = bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
        if self.supported and model.config._attn_implementation == "sdpa":
            model.set_attn_implementation(ATTENTION)
        # only where the model took our attention function (some models cannot switch)
        self.cascade = self.supported and model.config._attn_implementation == ATTENTION
        # each layer's key and value shapes, from one token: the buffers are made before use
        self.like = [(keys[:, :, :0], values[:, :, :0]) for keys, values in self.get([0])] \
            if self.supported else []
        self.clear()

    def get(self, tokens: list[int]) -> list[tuple]:
        """``(keys, values)`` of each layer for these tokens, batch size one."""
        key = tuple(tokens)
        entry = self._entries.get(key)
        if entry is None:
            cache = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.tensor([tokens], device=self.model.device), use_cache=True,
                           **{self.cache_argument: cache})
            entry = [(layer.keys, layer.values) for layer in cache.layers]
            self._entries[key] = entry
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def batch_cache(self, groups: list[tuple[list[int], list[int]]], rows: int, capacity: int,
                    cascade: bool) -> DynamicCache:
        """A cache for ``rows`` rows where each group ``(row indices, prefix tokens)`` shares its
        prefix (no groups: an empty cache), with room for ``capacity`` more columns per row."""
        width = max((len(tokens) for _, tokens in groups), default=0)
        stored = [(torch.tensor(indices, device=self.model.device), self.get(tokens))
                  for indices, tokens in groups]
        layers = []
        for layer, like in enumerate(self.like):
            prefixes = Prefixes([Prefix(indices, *kv[layer]) for indices, kv in stored], width)
            layers.append(PrefixLayer(prefixes, rows, capacity, cascade and self.cascade, like))
        return _cache(self.model.config, layers)

    def rows_view(self, cache: DynamicCache, first: int, last: int, column: int) -> DynamicCache:
        """A cache of rows ``first`` to ``last - 1`` of ``cache`` (from ``batch_cache``) that
        writes into it, from input column ``column`` on."""
        return _cache(self.model.config, [layer.rows_view(first, last, column) for layer in cache.layers])


def _cache(config, layers: list) -> DynamicCache:
    cache = DynamicCache(config=config)
    cache.layers = layers
    return cache
