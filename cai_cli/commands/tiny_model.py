"""``cai tiny-model``: a small random Llama-style model and tokenizer, built offline.

Tests and the demo run the whole pipeline on it, so everything downstream goes through the same
``from_pretrained`` code as a real model. The tokenizer is a byte-level BPE trained on text the
package ships (any string can be encoded), with ChatML-style turns. The chat template marks
assistant turns with ``{% generation %}`` so trainers can mask the loss to assistant tokens.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

from cai_cli.errors import UserError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_texts() -> list[str]:
    """The text the tokenizer is trained on: every text resource the package ships."""
    folder = resources.files("cai_cli") / "resources"
    return [item.read_text(encoding="utf-8") for item in sorted(folder.iterdir(), key=lambda p: p.name)
            if item.name.endswith((".txt", ".jsonl"))]


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: no unknown tokens
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(out_dir: Path | str, *, seed: int = 0, hidden_size: int = 256, layers: int = 4,
                     vocab_size: int = 2048, max_positions: int = 2048) -> Path:
    """Write model, tokenizer and generation config to ``out_dir``; return the path."""
    # BPE training is parallel; one thread keeps merges (and so token ids) the same on every run.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from cai_cli.engines.models import quiet_transformers

    quiet_transformers()  # no "Writing model shards" bar: our one summary line says it all

    out_dir = Path(out_dir)
    if hidden_size % 64:
        raise UserError(f"--hidden-size must be a multiple of 64, got {hidden_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} exists and is not a directory")

    tokenizer = build_tokenizer(vocab_size)
    ids = tokenizer.convert_tokens_to_ids
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 11 // 4 // 32 * 32,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=max_positions,
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|pad|>"),
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=True, temperature=1.0,
    )

    # Build beside the target, then swap in: a half-written model directory is never left behind.
    staging = out_dir.resolve().with_name(f".{out_dir.resolve().name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    if out_dir.exists():
        # Replace an earlier tiny model, never a directory holding anything else (`cai tiny-model
        # ~/models` must not wipe the user's models).
        foreign = sorted({p.name for p in out_dir.iterdir()} - {p.name for p in staging.iterdir()})
        if foreign:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"{out_dir} already holds files that are not a tiny model "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                            "give an empty or new directory")
        shutil.rmtree(out_dir)
    staging.rename(out_dir)

    params = sum(p.numel() for p in model.parameters())
    print(f"tiny model: {params / 1e6:.1f}M parameters, vocabulary {len(tokenizer)}, "
          f"{layers} layers of width {hidden_size} -> {out_dir}")
    return out_dir
