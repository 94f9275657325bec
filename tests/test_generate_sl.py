"""``cai generate-sl`` end to end on the tiny model: records, resume after SIGKILL, reruns,
overflowing prompts, prompt formats and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import cai, cai_main, kill_after_batches

from cai_cli.config import load_config
from cai_cli.constitution import load_constitution
from cai_cli.errors import UserError
from cai_cli.stages.common import NothingMade

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model: Path, name: str = "config.yaml", **sections) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 6}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu", "forward_batch_size": 4}},
        "generate_sl": {"num_revisions": 2, "few_shot": 1, "prompts_per_checkpoint": 3,
                        "sampling": {"max_new_tokens": 12, "temperature": 0.8}},
    }
    for key, value in sections.items():
        node = config
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def run_stage(path: Path, *overrides: str, force: bool = False):
    from cai_cli.stages import generate_sl

    return generate_sl.GenerateSL().run(load_config(path, list(overrides)), force=force)


def test_records_follow_the_contract(tmp_path, tiny_model_dir):
    config_path = write_config(tmp_path, tiny_model_dir)
    run_stage(config_path)
    sl = tmp_path / "run" / "sl"
    chains = [json.loads(line) for line in (sl / "chains.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (sl / "sft.jsonl").read_text().splitlines()]
    constitution = load_constitution(CONSTITUTION)
    by_id = {p.id: p for p in constitution.principles}

    assert len(chains) == 6 and len(sft) == 6
    prompts = {json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()}
    for chain, example in zip(chains, sft):
        assert {"id", "prompt", "initial", "rounds", "final"} <= set(chain)
        assert chain["prompt"] in prompts
        assert len(chain["rounds"]) == 2
        # a fresh principle each round
        assert chain["rounds"][0]["principle"] != chain["rounds"][1]["principle"]
        for round_ in chain["rounds"]:
            principle = by_id[round_["principle"]]
            assert round_["critique_request"] == principle.critique_request
            assert round_["revision_request"] == principle.revision_request
            assert isinstance(round_["critique"], str) and isinstance(round_["revision"], str)
        assert chain["final"] == chain["rounds"][-1]["revision"]
        assert example == {"id": chain["id"],  # TRL's conversational prompt-completion format
                           "prompt": [{"role": "user", "content": chain["prompt"]}],
                           "completion": [{"role": "assistant", "content": chain["final"]}]}

    manifest = json.loads((sl / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"]["chains"] == 6 and manifest["counts"]["rounds"] == 12
    assert manifest["counts"]["generated_tokens"] > 0
    resolved = tmp_path / "run" / ".cai" / "config.yaml"  # a tool-owned place, never a user file
    assert yaml.safe_load(resolved.read_text())["generate_sl"]["num_revisions"] == 2
    assert not list(sl.glob("*.partial")) and not list(sl.glob(".*progress*"))


def test_rerun_is_a_noop_and_a_foreign_config_is_refused(tmp_path, tiny_model_dir):
    config_path = write_config(tmp_path, tiny_model_dir)
    run_stage(config_path)
    chains = tmp_path / "run" / "sl" / "chains.jsonl"
    before, mtime = chains.read_bytes(), chains.stat().st_mtime_ns

    run_stage(config_path)  # same config: nothing to do
    assert chains.stat().st_mtime_ns == mtime

    with pytest.raises(UserError, match=r"different config \(changed: generate_sl.num_revisions\).*--force"):
        run_stage(config_path, "generate_sl.num_revisions=1")
    assert chains.read_bytes() == before

    run_stage(config_path, "generate_sl.num_revisions=1", force=True)
    assert all(len(json.loads(line)["rounds"]) == 1 for line in chains.read_text().splitlines())


def test_principle_draws_do_not_depend_on_batching(tmp_path, tiny_model_dir):
    small = write_config(tmp_path, tiny_model_dir, "a.yaml", run_dir=str(tmp_path / "a"))
    large = write_config(tmp_path, tiny_model_dir, "b.yaml", run_dir=str(tmp_path / "b"),
                         generate_sl__prompts_per_checkpoint=6)
    run_stage(small)
    run_stage(large)

    def principles(run: str) -> dict:
        lines = (tmp_path / run / "sl" / "chains.jsonl").read_text().splitlines()
        return {c["id"]: [r["principle"] for r in c["rounds"]] for c in map(json.loads, lines)}

    assert principles("a") == principles("b")


def test_transcript_format_for_base_models(tmp_path, tiny_model_dir):
    config_path = write_config(tmp_path, tiny_model_dir, generate_sl__prompt_format="transcript")
    run_stage(config_path)
    chains = [json.loads(line) for line in (tmp_path / "run" / "sl" / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 6 and all(c["format"] == "transcript" for c in chains)
    # stop strings cut the model's text before it starts the next labelled turn
    for chain in chains:
        for round_ in chain["rounds"]:
            assert "\n\nRevisionRequest:" not in round_["critique"]


def too_long(tmp_path: Path, model: Path, **sections) -> Path:
    """A config whose chains all fit their answer but not their first critique: the critique
    prompt (worked examples + answer + request) is far longer than the question. (The other
    stages' budgets fit this context too, or the config is refused as it loads.)"""
    return write_config(tmp_path, model, models__policy__max_context=120, generate_sl__few_shot=2,
                        label_prefs__sampling__max_new_tokens=16,
                        evaluate__sampling__max_new_tokens=16, **sections)


def test_every_chain_too_long_is_exit_2_and_the_fixed_rerun_needs_no_force(
        tmp_path, tiny_model_dir, monkeypatch):
    config_path = too_long(tmp_path, tiny_model_dir)
    result = cai_main("generate-sl", "--config", config_path)
    assert result.returncode == 2
    assert "skipped at critique round 1" in result.stderr
    assert "exceed the context of 120" in result.stderr
    *_, last = result.stderr.strip().splitlines()
    assert last.startswith("error: generate-sl: all 6 prompts were skipped")
    assert "lower generate_sl.sampling.max_new_tokens" in last
    assert "raise models.policy.max_context" in last and "Traceback" not in result.stderr
    sl = tmp_path / "run" / "sl"
    assert not (sl / "manifest.json").exists() and not (sl / "chains.jsonl").exists()

    # the same settings again: the same refusal at once, without loading the model
    from cai_cli import engines

    def no_model(*args):
        raise AssertionError("the model was loaded again")

    monkeypatch.setattr(engines, "load_backend", no_model)
    with pytest.raises(NothingMade, match="all 6 prompts were skipped"):
        run_stage(config_path)
    monkeypatch.undo()

    # the context fixed (and fewer prompts, to be quick): a fresh run, no --force needed
    run_stage(config_path, "models.policy.max_context=2048", "data.red_team.limit=2")
    manifest = json.loads((sl / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["chains"] == 2


def test_a_resumed_run_that_makes_nothing_is_forgotten_too(tmp_path, tiny_model_dir,
                                                            monkeypatch):
    """A run killed after its last batch, before the check: the rerun has no batch left and
    makes nothing; its manifest goes all the same, so the fixed settings need no --force."""
    from cai_cli.stages import generate_sl

    config_path = too_long(tmp_path, tiny_model_dir)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate_sl, "refuse_empty", killed)
    with pytest.raises(KeyboardInterrupt):
        run_stage(config_path)
    monkeypatch.undo()
    sl = tmp_path / "run" / "sl"
    assert json.loads((sl / "manifest.json").read_text())["status"] != "complete"

    with pytest.raises(NothingMade, match="all 6 prompts were skipped"):
        run_stage(config_path)
    assert not (sl / "manifest.json").exists()
    run_stage(config_path, "models.policy.max_context=2048", "data.red_team.limit=2")
    assert json.loads((sl / "manifest.json").read_text())["status"] == "complete"


def test_shards_that_skip_every_prompt_are_refused_when_merged(tmp_path, tiny_model_dir):
    from cai_cli.run.shards import Shard
    from cai_cli.stages import generate_sl

    config = load_config(too_long(tmp_path, tiny_model_dir))
    generate_sl.GenerateSL().run(config, shard=Shard.parse("0/2"))  # an empty part is fine alone
    with pytest.raises(NothingMade, match="all 6 prompts were skipped"):
        generate_sl.GenerateSL().run(config, shard=Shard.parse("1/2"))
    assert not (tmp_path / "run" / "sl" / "manifest.json").exists()


def test_the_hint_to_look_at_the_chains_quotes_the_path(tmp_path, tiny_model_dir, capsys):
    config_path = write_config(tmp_path, tiny_model_dir, run_dir=str(tmp_path / "my run"),
                               data__red_team__limit=2, generate_sl__num_revisions=1)
    run_stage(config_path)
    assert f"look at them with: cai inspect '{tmp_path / 'my run'}'" in capsys.readouterr().err


def test_sigkill_then_resume_gives_identical_files(tmp_path, tiny_model_dir):
    settings = dict(data__red_team__limit=12, generate_sl__prompts_per_checkpoint=2)
    reference = write_config(tmp_path, tiny_model_dir, "ref.yaml", run_dir=str(tmp_path / "ref"), **settings)
    interrupted = write_config(tmp_path, tiny_model_dir, "int.yaml", run_dir=str(tmp_path / "int"), **settings)
    assert cai("generate-sl", "--config", reference).returncode == 0

    state = tmp_path / "int" / "sl" / ".chains.jsonl.progress.json"
    kill_after_batches(["generate-sl", "--config", interrupted], state, 2)
    partial = tmp_path / "int" / "sl" / "chains.jsonl.partial"
    assert partial.is_file() and not (tmp_path / "int" / "sl" / "chains.jsonl").exists()
    done_before = len(partial.read_text().splitlines())
    assert 4 <= done_before < 12
    # a torn line, as a writer killed mid-write leaves it, is dropped on resume
    with partial.open("a") as handle:
        handle.write('{"id": "torn", "prom')

    result = cai("generate-sl", "--config", interrupted)
    assert result.returncode == 0, result.stderr
    assert "resuming" in result.stderr
    for name in ("chains.jsonl", "sft.jsonl"):
        assert (tmp_path / "int" / "sl" / name).read_bytes() == (tmp_path / "ref" / "sl" / name).read_bytes()


@pytest.mark.parametrize("change, message", [
    ({"data__red_team__path": "missing.jsonl"},
     "data.red_team.path: missing.jsonl: not found (relative to the current directory"),
    ({"models__policy__name_or_path": "no/such/dir/model"}, "models.policy.name_or_path: model directory not found"),
    ({"constitution": "nope.yaml"}, "nope.yaml: constitution file not found"),
])
def test_bad_input_exits_2_and_keeps_existing_output(tmp_path, tiny_model_dir, change, message):
    config_path = write_config(tmp_path, tiny_model_dir)
    run_stage(config_path)
    chains = tmp_path / "run" / "sl" / "chains.jsonl"
    before = chains.read_bytes()
    bad = write_config(tmp_path, tiny_model_dir, "bad.yaml", **change)
    result = cai("generate-sl", "--config", bad)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert chains.read_bytes() == before


def test_empty_prompt_set_and_malformed_line(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": ""}\n')
    result = cai("generate-sl", "--config", write_config(tmp_path, tiny_model_dir, "e.yaml",
                                                          data__red_team__path=str(empty)))
    assert result.returncode == 2 and "no prompts" in result.stderr

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "fine"}\n{"prompt": oops}\n')
    result = cai("generate-sl", "--config", write_config(tmp_path, tiny_model_dir, "m.yaml",
                                                          data__red_team__path=str(broken)))
    assert result.returncode == 2 and f"{broken}:2: not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr
