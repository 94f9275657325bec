"""The backend protocol as the stages use it, on the hf engine and the tiny model: a prompt's
sampled text depends on its own seed, not on the batch it ran in; the per-call seed still
reproduces a call; closing a backend gives its model back."""

from __future__ import annotations

import gc
import weakref

import pytest

from cai_cli.engines import load_backend
from cai_cli.run.seeding import record_seed
from cai_cli.engines.base import SamplingParams
from cai_cli.config import ModelConfig

QUESTIONS = ["How do I pick a lock?", "Tell me a joke.", "What is the capital of France?",
             "Write a poem about rain, please, with many words in it.", "Hi.",
             "Why is the sky blue? Explain it to a child."]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    with load_backend(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", forward_batch_size=3),
                      "models.policy") as engine:
        yield engine


def prompts() -> list:
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_a_prompt_with_its_seed_gives_the_same_text_alone_and_in_any_batch(backend, temperature):
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=5)
    conversations = prompts()
    seeds = [record_seed(0, i, "answer") for i in range(len(conversations))]
    alone = [backend.generate([c], params, seeds=[s])[0].text for c, s in zip(conversations, seeds)]
    # two different batchings: all six (batch_size 3, sorted by length), and reversed with the
    # first prompt repeated under other seeds, so each prompt has other neighbours and places
    together = [c.text for c in backend.generate(conversations, params, seeds=seeds)]
    order = list(reversed(range(len(conversations))))
    mixed = backend.generate([conversations[0]] * 2 + [conversations[i] for i in order],
                             params, seeds=[11, 12] + [seeds[i] for i in order])
    assert together == alone
    assert [mixed[2 + k].text for k in range(len(order))] == [alone[i] for i in order]
    assert len(set(alone)) > 1


def test_different_seeds_sample_different_texts_for_the_same_prompt(backend):
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    texts = [c.text for c in backend.generate(prompts()[:1] * 4, params, seeds=[1, 2, 3, 4])]
    assert len(set(texts)) > 1
    again = [c.text for c in backend.generate(prompts()[:1] * 4, params, seeds=[1, 2, 3, 4])]
    assert again == texts


def test_without_seeds_the_call_seed_reproduces_a_call(backend):
    first = backend.generate(prompts(), SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    again = backend.generate(prompts(), SamplingParams(max_new_tokens=12, temperature=1.0, seed=3))
    other = backend.generate(prompts(), SamplingParams(max_new_tokens=12, temperature=1.0, seed=4))
    assert [c.text for c in again] == [c.text for c in first]
    assert [c.text for c in other] != [c.text for c in first]


def test_progress_hears_of_every_decoding_step(backend):
    """What the progress bars of generate-sl, label-prefs and evaluate count: tokens as they
    are made, not only when a call returns, and each completion once, when it finishes."""
    steps: list[tuple[int, int]] = []
    backend.on_tokens = lambda tokens, finished: steps.append((tokens, finished))
    try:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=3)
        completions = backend.generate(prompts(), params)
    finally:
        backend.on_tokens = None
    assert len(steps) > 2  # many times in each of the two batches of three, not once per batch
    assert all(0 <= n <= 3 and 0 <= done <= 3 and n + done for n, done in steps)
    assert sum(n for n, _ in steps) == sum(c.tokens for c in completions)
    assert sum(done for _, done in steps) == len(completions)


def test_seeds_must_match_the_prompts(backend):
    with pytest.raises(ValueError, match="2 seeds for 1 prompts"):
        backend.generate(prompts()[:1], SamplingParams(max_new_tokens=4), seeds=[1, 2])


def test_record_seed_is_stable_and_tells_records_apart():
    assert record_seed(0, "p1", "answer") == record_seed(0, "p1", "answer")
    assert len({record_seed(0, p, s) for p in ("p1", "p2") for s in ("answer", "critique0")}) == 4
    assert 0 <= record_seed(123, "x") < 2**63


def test_close_releases_the_model_and_the_backend_refuses_work(tiny_model_dir):
    engine = load_backend(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu"),
                          "models.policy")
    assert engine.name == str(tiny_model_dir) and engine.has_chat_template
    engine.generate(prompts()[:2], SamplingParams(max_new_tokens=2))  # fills the prefix store
    model = weakref.ref(engine.model)
    with engine:
        pass  # leaving the block closes it
    gc.collect()
    assert model() is None
    with pytest.raises(RuntimeError, match="closed"):
        engine.generate(prompts()[:1], SamplingParams(max_new_tokens=2))
    engine.close()  # a second close does nothing


@pytest.mark.parametrize("temperature, top_p", [(0.2, 0.9), (1.0, 0.5), (3.0, 0.95), (10.0, 0.99)])
def test_top_p_keeps_the_nucleus_transformers_keeps(temperature, top_p):
    """The sampler's top-p looks among the likeliest tokens first; it keeps the same tokens as
    transformers' warper, for narrow nuclei and for ones wider than where it looks first."""
    import torch
    from transformers import TopPLogitsWarper

    from cai_cli.engines.hf import TOP_P_CANDIDATES, gumbel_sampler

    scores = torch.randn(8, 4096, generator=torch.Generator().manual_seed(0)) * 4 / temperature
    ids = torch.zeros(8, 1, dtype=torch.long)
    expected = TopPLogitsWarper(top_p)(ids, scores.clone())
    top_p_step = gumbel_sampler(SamplingParams(max_new_tokens=1, temperature=temperature,
                                               top_p=top_p))[1]
    got = top_p_step(ids, scores.clone())
    assert torch.equal(got, expected)
    kept = (expected > float("-inf")).sum(-1)
    assert kept.min() >= 1 and kept.max() < 4096
    if temperature >= 3.0:
        assert kept.max() > TOP_P_CANDIDATES  # the wide case was exercised
