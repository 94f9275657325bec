"""A model's size from its ``config.json`` and the JSON headers of its safetensors files, never
its weights: what ``cai plan`` prices. Local directories and the Hugging Face cache are read;
nothing is downloaded.

No heavy imports here.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from cai_cli.engines.models import recorded_base, safetensors_header
from cai_cli.errors import UserError

WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


@dataclass
class ModelSize:
    name: str
    params: float  # all parameters
    body: float  # parameters a token passes through before the output head
    head: float  # the output head (vocabulary x hidden), tied or not
    layers: int
    kv_width: int  # keys and values a token keeps per layer (2 x kv heads x head dim); 0: unknown
    context: int | None
    source: str  # where the figures come from, for the assumptions list


def local_file(name_or_path: str, filename: str, revision: str | None) -> Path | None:
    """A model file in a local directory or the Hugging Face cache; never downloads."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(name_or_path, filename, revision=revision)
    except Exception:  # not a valid repo id: nothing cached under that name
        return None
    return Path(found) if isinstance(found, str) else None


def safetensors_params(file: Path) -> int:
    """Parameters in one safetensors file, from its JSON header alone."""
    header = safetensors_header(file)
    return sum(math.prod(entry["shape"]) for name, entry in header.items()
               if name != "__metadata__")


def model_size(name_or_path: str, revision: str | None, key: str, *,
               given: float | None = None, given_as: str = "", hint: str = "") -> ModelSize:
    """A model's size without its weights: ``given`` (``given_as`` says where from), else its
    config.json (and safetensors headers for the exact count), else the size in its name
    ("1.5B", "135M"). ``hint`` ends the error when none of these is there."""
    config_file = local_file(name_or_path, "config.json", revision)
    adapter = local_file(name_or_path, "adapter_config.json", revision)
    if config_file is None and adapter is not None:  # a LoRA adapter: the base model's size
        base = recorded_base(adapter.parent)  # "../sft": relative to the adapter
        if base:
            return model_size(base, None, key, given=given, given_as=given_as, hint=hint)
    cfg: dict = {}
    if config_file is not None:
        cfg = json.loads(config_file.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    vocab = cfg.get("vocab_size")
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    head = float(vocab * hidden) if hidden and vocab else 0.0
    tied = cfg.get("tie_word_embeddings", True)
    total, source = None, None
    if given is not None:
        total, source = given, given_as
    elif config_file is not None:
        counted = 0
        for name in WEIGHTS:
            file = local_file(name_or_path, name, revision)
            if file is None:
                continue
            if name.endswith(".json"):
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
                files = [local_file(name_or_path, s, revision) for s in shards]
                if all(files):
                    counted = sum(safetensors_params(f) for f in files)
            else:
                counted = safetensors_params(file)
            if counted:
                total, source = float(counted), "safetensors headers"
                break
        if total is None and hidden and layers and vocab:
            total, source = _params_from_config(cfg, hidden, layers, vocab, tied), "config.json"
    if total is None:
        named = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", name_or_path.lower())
        if named:
            total = float(named.group(1)) * (1e9 if named.group(2) == "b" else 1e6)
            source = "its name"
    if total is None:
        raise UserError(f"{key}: unknown size of '{name_or_path}': no config.json here or in the "
                        f"local Hugging Face cache, and no size in its name{hint}")
    embeddings = head * (1 if tied else 2)
    body = max(total - embeddings, total * 0.5) if head else total
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else 0)
    kv_width = 2 * (cfg.get("num_key_value_heads") or heads or 0) * head_dim
    if not layers:
        source += " (layers, vocabulary and attention unknown: 24 layers assumed, no output head, "\
                  "no KV-cache reads)"
    return ModelSize(name_or_path, total, body, head, int(layers or 24), kv_width,
                     int(context) if context else None, source)


def _params_from_config(cfg: dict, hidden: int, layers: int, vocab: int, tied: bool) -> float:
    """Decoder-only transformer: attention (grouped-query aware) and a gated MLP per layer."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or max(hidden // 64, 1)
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    gated = "gpt2" not in str(cfg.get("model_type", ""))
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = (3 if gated else 2) * hidden * inter
    return float(layers * (attention + mlp) + vocab * hidden * (1 if tied else 2))
