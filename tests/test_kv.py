"""The hf backend's batch machinery: shared-prefix attention against plain attention, batches that
mix prefix groups with lone rows (greedy output equal to one prompt at a time, also with grouped
query attention), the prefix store, models it must leave alone, and the sampler's distribution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cai_cli.engines.base import SamplingParams
from cai_cli.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def backend_for(model_dir: Path, batch_size: int = 16):
    from cai_cli.engines.hf import HFBackend

    return HFBackend(ModelConfig(name_or_path=str(model_dir), device="cpu", forward_batch_size=batch_size), "m")


def mixed_prompts() -> list:
    """Critique prompts after two different worked examples (two prefix groups, one much
    longer than the other rows) and short first-answer prompts with nothing to share."""
    from cai_cli.constitution import load_constitution
    from cai_cli.engines.prompts import answer_prompt, critique_prompt

    constitution = load_constitution(CONSTITUTION)
    principle = constitution.principles[0]
    prompts = []
    for n, example in enumerate(constitution.few_shot[:2]):
        prompts += [critique_prompt(f"Question {n}.{i}?" + " really" * i, "An answer.", principle,
                                    [example], "chat") for i in range(3)]
    prompts += [answer_prompt(text, "chat") for text in ("Hi.", "How do I bake bread at home?" * 3)]
    return prompts


def test_shared_prefix_attention_equals_attention_over_the_whole_cache():
    import torch

    from cai_cli.engines import kv
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, own = 5, 8, 2, 16, 7

    class Attention(torch.nn.Module):
        num_key_value_groups = heads // kv_heads
        is_causal = True

    # rows 0 and 3 share a 12-token prefix, rows 1 and 4 a 9-token one, row 2 has none
    groups = [kv.Prefix(torch.tensor(rows_of), torch.randn(1, kv_heads, length, dim),
                        torch.randn(1, kv_heads, length, dim))
              for rows_of, length in (([0, 3], 12), ([1, 4], 9))]
    prefixes = kv.Prefixes(groups, 12)
    keys, values = torch.randn(rows, kv_heads, own, dim), torch.randn(rows, kv_heads, own, dim)
    mask = torch.ones(rows, 1, 1, 12 + own, dtype=torch.bool)
    mask[[1, 4], ..., 9:12] = False  # shorter prefix
    mask[2, ..., :12] = False  # no prefix
    mask[3, ..., 12:15] = False  # left padding
    query = torch.randn(rows, heads, 1, dim)

    tagged = keys.clone()
    setattr(tagged, kv._PREFIXES, prefixes)
    got, _ = kv.shared_prefix_attention(Attention(), query, tagged, values, mask, scaling=dim ** -0.5)
    whole_keys = torch.cat([prefixes.lay_out(rows, keys, False), keys], dim=2)
    whole_values = torch.cat([prefixes.lay_out(rows, values, True), values], dim=2)
    expected, _ = sdpa_attention_forward(Attention(), query, whole_keys, whole_values, mask,
                                         scaling=dim ** -0.5)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.fixture(scope="module")
def gqa_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model's tokenizer with a freshly initialised model that has 2 key/value heads
    for its 4 attention heads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("models") / "gqa"
    shutil.copytree(tiny_model_dir, out)
    config = AutoConfig.from_pretrained(out)
    config.num_key_value_heads = 2
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("model", ["tiny", "gqa"])
def test_mixed_batch_generates_what_each_prompt_generates_alone(model, tiny_model_dir, gqa_model_dir):
    backend = backend_for(tiny_model_dir if model == "tiny" else gqa_model_dir)
    assert backend.prefixes.cascade and backend.prefixes.supported
    prompts = mixed_prompts()
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    batched = backend.generate(prompts, params)  # one batch: two groups and two lone rows
    alone = [backend.generate([p], params)[0] for p in prompts]
    assert [(c.text, c.tokens) for c in batched] == [(c.text, c.tokens) for c in alone]
    assert len({c.text for c in batched}) > 1


def test_prefix_store_keeps_the_last_prefixes_and_recomputes_the_same_numbers(tiny_model_dir):
    import torch

    from cai_cli.engines.kv import PrefixStore

    backend = backend_for(tiny_model_dir)
    store = PrefixStore(backend.model, backend._cache_argument, size=2)
    first = store.get(list(range(10, 50)))
    assert store.get(list(range(10, 50)))[0][0] is first[0][0]  # kept: not computed again
    store.get(list(range(60, 90)))
    store.get(list(range(100, 140)))  # a third prefix pushes out the oldest
    again = store.get(list(range(10, 50)))
    assert again[0][0] is not first[0][0]
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(first, again))


def test_a_sliding_window_model_is_left_to_plain_caches(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         use_sliding_window=True, sliding_window=64, max_window_layers=0,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "sliding")
    tokenizer.save_pretrained(tmp_path / "sliding")
    backend = backend_for(tmp_path / "sliding")
    assert not backend.prefixes.supported
    assert backend.model.config._attn_implementation != "cai_shared_prefix"
    results = backend.generate(mixed_prompts(), SamplingParams(max_new_tokens=4, temperature=0.0))
    assert all(r.tokens > 0 for r in results)


def test_sampler_draws_from_the_softmax_of_the_warped_scores():
    import torch

    from cai_cli.engines.hf import gumbel_sampler

    torch.manual_seed(0)
    probabilities = torch.tensor([0.5, 0.3, 0.15, 0.05])
    scores = probabilities.log().repeat(20000, 1)
    draws = gumbel_sampler(SamplingParams(max_new_tokens=1, temperature=1.0))(None, scores).argmax(-1)
    shares = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(shares, probabilities, atol=0.015)
    # top-k 2 at temperature 0.5: only the two likeliest, in the ratio (0.5 / 0.3) ** 2
    sampler = gumbel_sampler(SamplingParams(max_new_tokens=1, temperature=0.5, top_k=2))
    draws = sampler(None, scores).argmax(-1)
    shares = torch.bincount(draws, minlength=4).float() / len(draws)
    assert shares[2:].sum() == 0
    assert shares[0] == pytest.approx(25 / 34, abs=0.015)


def test_plain_attention_gives_the_model_back_as_transformers_runs_it(tiny_model_dir):
    import torch

    backend = backend_for(tiny_model_dir)
    prompt = mixed_prompts()[0]
    ours = backend.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.0))[0]
    with backend.plain_attention() as model, torch.inference_mode():
        assert model.config._attn_implementation == "sdpa"
        ids = torch.tensor([backend.encode(prompt)])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                             do_sample=False, eos_token_id=backend.stop_token_ids,
                             pad_token_id=backend.pad_token_id)
    assert model.config._attn_implementation == "cai_shared_prefix"
    text = backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert text == ours.text
