"""Sharded generation (``--shard I/N``, ``cai merge``): shards started as separate processes and
merged are byte for byte one unsharded run; a killed shard resumes; a partly sharded stage is
refused downstream naming the missing shard; shards run side by side while any other writer of
the run directory is refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ENV, ROOT, cai, kill_after_batches

from cai_cli.config import load_config
from cai_cli.errors import UserError
from cai_cli.run.shards import Shard

PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model: Path, name: str, *, limit: int = 4,
                 temperature: float = 0.8, **sections) -> Path:
    config = {
        "run_dir": str(tmp_path / name),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": limit}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 4}},
        "generate_sl": {"num_revisions": 1, "few_shot": 1, "prompts_per_checkpoint": 1,
                        "sampling": {"max_new_tokens": 6, "temperature": temperature}},
        "label_prefs": {"policy": str(model), "responses_per_prompt": 2,
                        "principles_per_pair": 1, "few_shot": 1, "prompts_per_checkpoint": 1,
                        "sampling": {"max_new_tokens": 6}},
        **sections,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cai_cli", *map(str, args)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err


def same_files(a: Path, b: Path, names: tuple[str, ...]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def in_process(command: str, path: Path, **kwargs):
    from cai_cli.stages.pipeline import STAGES

    return STAGES[command].run(load_config(path, []), **kwargs)


# --- which records a shard takes ------------------------------------------------------------

def test_shards_take_the_ranges_datasets_gives_them():
    from datasets import Dataset

    for total in (1, 5, 7, 12, 23):
        rows = Dataset.from_dict({"i": list(range(total))})
        for count in (1, 2, 3, 4, 8):
            taken = [list(range(*Shard(index, count).bounds(total))) for index in range(count)]
            assert sum(taken, []) == list(range(total))  # each record once, in order
            if count <= total:  # datasets cannot select an empty shard past the end
                assert taken == [rows.shard(count, index, contiguous=True)["i"]
                                 for index in range(count)]


@pytest.mark.parametrize("text, message", [("4/4", "I must be 0 to N-1"), ("1/0", "I must be"),
                                           ("2", "expected I/N"), ("a/b", "expected I/N")])
def test_a_bad_shard_is_a_user_error(text, message):
    with pytest.raises(UserError, match=message):
        Shard.parse(text)
    assert Shard.parse(" 3 / 8 ") == Shard(3, 8)


# --- the locks, without a model ---------------------------------------------------------------

HOLDER = """
import sys, time
from cai_cli.errors import UserError
from cai_cli.run.lock import ShardLock, run_lock
run_dir, what = sys.argv[1], sys.argv[2]
lock = run_lock(run_dir, "generate-sl") if what == "all" else \\
    ShardLock(run_dir, "generate-sl", int(what), 2)
try:
    with lock:
        print("LOCKED", flush=True)
        time.sleep(float(sys.argv[3]))
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def hold(run_dir: Path, what: str, seconds: float = 60) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), what, str(seconds)],
                               cwd=ROOT, env={**ENV, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return process


def test_shards_share_the_run_directory_and_every_other_writer_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first, second = hold(run_dir, "0"), hold(run_dir, "1")
    try:
        assert first.stdout.readline().startswith("LOCKED")
        assert second.stdout.readline().startswith("LOCKED")  # two shards at once
        for what, expected in (("all", "in use by 2 running shards"),
                               ("0", "shard 0/2 of generate-sl is already running")):
            refused = hold(run_dir, what, 0)
            out, err = refused.communicate(timeout=60)
            assert refused.returncode == 2 and expected in err, err
            assert f"pid {first.pid}" in err
    finally:
        for process in (first, second):
            process.kill()
            process.communicate()
    whole = hold(run_dir, "all")  # the killed shards' locks are gone with them
    try:
        assert whole.stdout.readline().startswith("LOCKED")
        refused = hold(run_dir, "1", 0)
        out, err = refused.communicate(timeout=60)
        assert refused.returncode == 2 and f"pid {whole.pid}" in err, err
    finally:
        whole.kill()
        whole.communicate()


# --- generate-sl ------------------------------------------------------------------------------

SL_FILES = ("chains.jsonl", "sft.jsonl")


def test_two_greedy_shards_run_at_once_refuse_other_writers_and_merge_to_one_run(
        tmp_path, tiny_model_dir):
    reference = write_config(tmp_path, tiny_model_dir, "ref", temperature=0.0)
    sharded = write_config(tmp_path, tiny_model_dir, "sharded", temperature=0.0)
    run = tmp_path / "sharded"
    shards = [start("generate-sl", "--config", sharded, "--shard", f"{i}/2") for i in range(2)]
    try:
        holders = [run / ".cai" / f"lock.generate-sl.shard-{i}-of-2.holder.json" for i in range(2)]
        deadline = time.time() + 120
        while not all(h.is_file() for h in holders) and time.time() < deadline:
            assert all(s.poll() is None for s in shards), shards[0].stderr.read()
            time.sleep(0.05)
        for other in (["generate-sl"], ["run", "--to", "generate-sl"], ["merge", "generate-sl"]):
            refused = cai(*other, "--config", sharded)
            assert refused.returncode == 2, refused.stderr
            assert "in use by 2 running shards" in refused.stderr
            assert f"pid {shards[0].pid}" in refused.stderr and f"pid {shards[1].pid}" in refused.stderr
        again = cai("generate-sl", "--config", sharded, "--shard", "1/2")
        assert again.returncode == 2 and "shard 1/2 of generate-sl is already running" in again.stderr
    finally:
        finish(shards)

    in_process("generate-sl", reference)
    same_files(tmp_path / "ref" / "sl", run / "sl", SL_FILES)
    assert not (run / "sl" / "shards").exists()  # merged parts are removed
    manifest = json.loads((run / "sl" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["shards"] == 2
    assert manifest["counts"]["chains"] == 4
    status = cai("status", "--config", sharded)
    assert "generate-sl   done" in status.stdout
    rerun = cai("generate-sl", "--config", sharded, "--shard", "0/2")
    assert rerun.returncode == 0 and "nothing to do" in rerun.stderr


def test_three_sampled_shards_one_killed_and_rerun_merge_to_one_run(tmp_path, tiny_model_dir):
    reference = write_config(tmp_path, tiny_model_dir, "ref", limit=8)
    sharded = write_config(tmp_path, tiny_model_dir, "sharded", limit=8)
    run = tmp_path / "sharded"
    others = [start("generate-sl", "--config", sharded, "--shard", f"{i}/3") for i in (0, 2)]
    try:  # shard 1 of 3 (prompts 3 to 5) is killed after its first prompt
        kill_after_batches(["generate-sl", "--config", sharded, "--shard", "1/3"],
                           run / "sl" / "shards" / ".chains.1-of-3.jsonl.progress.json", 1)
    finally:
        finish(others)
    assert (run / "sl" / "shards" / "chains.1-of-3.jsonl.partial").is_file()
    assert not (run / "sl" / "chains.jsonl").exists()

    status = cai("status", "--config", sharded)
    table = " ".join(status.stdout.split())  # the details column wraps
    assert "generate-sl partial" in table and "2 of 3 shards complete" in table
    refused = cai("finetune", "--config", sharded)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "1/3 (interrupted" in refused.stderr and "--shard I/3` for I = 1" in refused.stderr
    early = cai("merge", "generate-sl", "--config", sharded)
    assert early.returncode == 2 and "1/3 (interrupted" in early.stderr
    plain = cai("generate-sl", "--config", sharded)  # would redo the shards' work: refused
    assert plain.returncode == 2 and "--force" in plain.stderr

    rerun = cai("generate-sl", "--config", sharded, "--shard", "1/3")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming shard 1/3" in rerun.stderr and "merging 3 shards" in rerun.stderr
    in_process("generate-sl", reference)
    same_files(tmp_path / "ref" / "sl", run / "sl", SL_FILES)


# --- label-prefs ------------------------------------------------------------------------------

def test_label_prefs_in_two_and_three_shards_merge_to_one_run(tmp_path, tiny_model_dir):
    reference = write_config(tmp_path, tiny_model_dir, "ref", limit=5)
    configs = {n: write_config(tmp_path, tiny_model_dir, f"shards{n}", limit=5) for n in (2, 3)}
    for n in (2, 3):  # each set's shards at once, as separate processes
        finish([start("label-prefs", "--config", configs[n], "--shard", f"{i}/{n}")
                for i in range(n)])
    in_process("label-prefs", reference)
    pairs = (tmp_path / "ref" / "prefs" / "pairs.jsonl").read_text().splitlines()
    assert len(pairs) >= 3  # sampled answers differ, so there is something to compare
    for n in (2, 3):
        prefs = tmp_path / f"shards{n}" / "prefs"
        same_files(tmp_path / "ref" / "prefs", prefs, ("samples.jsonl", "pairs.jsonl"))
        mine = json.loads((prefs / "manifest.json").read_text())
        theirs = json.loads((tmp_path / "ref" / "prefs" / "manifest.json").read_text())
        assert mine["stats"] == theirs["stats"]  # the label statistics of the merged pairs
        assert mine["counts"] == {"shards": n, **theirs["counts"]}


# --- evaluate, and cai merge by hand ----------------------------------------------------------

@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from cai_cli.commands.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


def test_evaluate_shards_merged_by_hand_give_the_same_report(tmp_path, tiny_model_dir,
                                                              other_model, monkeypatch):
    # 3 red-team and 3 benign prompts: each shard holds the prompts of one axis only; two
    # judges, so each shard's judgments are those of both, merged judge by judge
    evaluate = {"models": ["base", str(other_model)], "limit": 3, "benign_limit": 3,
                "principles_per_pair": 1, "bootstrap": 100, "reward_model": False,
                "sampling": {"max_new_tokens": 6},
                "judges": ["feedback", {"name_or_path": str(other_model), "device": "cpu"}]}
    reference = write_config(tmp_path, tiny_model_dir, "ref", evaluate=evaluate)
    sharded = write_config(tmp_path, tiny_model_dir, "sharded", evaluate=evaluate)
    in_process("evaluate", reference)

    from cai_cli.stages import sharded as shard_runs

    monkeypatch.setattr(shard_runs, "merge", lambda *args: None)  # shards that never merge
    in_process("evaluate", sharded, shard=Shard(1, 2))
    early = cai("merge", "evaluate", "--config", sharded)
    assert early.returncode == 2 and "0/2 (not started)" in early.stderr
    in_process("evaluate", sharded, shard=Shard(0, 2))
    assert not (tmp_path / "sharded" / "eval" / "report.json").exists()

    merged = cai("merge", "evaluate", "--config", sharded)
    assert merged.returncode == 0, merged.stderr
    same_files(tmp_path / "ref" / "eval", tmp_path / "sharded" / "eval",
               ("answers.jsonl", "judgments.jsonl", "report.json"))
    report = json.loads((tmp_path / "sharded" / "eval" / "report.json").read_text())
    assert report["prompts"] == 3 and any(report["per_principle"].values())  # really judged
    assert report["helpfulness"]["prompts"] == 3 and len(report["harmful_compliance"]) == 2
    assert set(report["by_judge"]) == {"feedback", str(other_model)}
    assert cai("merge", "evaluate", "--config", sharded).returncode == 0  # nothing left to merge



def test_an_evaluate_shard_without_prompts_merges_and_leaves_nothing_behind(tmp_path, tiny_model_dir,
                                                                            other_model):
    evaluate = {"models": ["base", str(other_model)], "limit": 1, "benign_limit": 0,
                "principles_per_pair": 1, "bootstrap": 100, "reward_model": False,
                "sampling": {"max_new_tokens": 4}}
    path = write_config(tmp_path, tiny_model_dir, "run", evaluate=evaluate)
    in_process("evaluate", path, shard=Shard(1, 2))  # no prompts in this one
    in_process("evaluate", path, shard=Shard(0, 2))  # the last to finish merges
    out = tmp_path / "run" / "eval"
    assert sorted(p.name for p in out.iterdir()) == ["answers.jsonl", "judgments.jsonl",
                                                     "manifest.json", "report.json"]
    kinds = [json.loads(line)["kind"] for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert kinds == ["harmlessness", "harmful", "harmful"]

# --- generate-prompts -------------------------------------------------------------------------

def test_generate_prompts_in_two_shards_merge_to_one_run_and_filter(tmp_path, tiny_model_dir):
    """Requests in batches of 3 unsharded, 2 + 2 in shards: the same candidates; the merge runs
    the filters (the feedback filter too) once, over all of them."""
    settings = {"num_prompts": 8, "per_request": 2, "few_shot": 3, "prompts_per_checkpoint": 3,
                "min_chars": 1, "min_readable": 0, "min_words": 0, "feedback_filter": True,
                "feedback_threshold": 0.5, "sampling": {"max_new_tokens": 8}}
    reference = write_config(tmp_path, tiny_model_dir, "ref", limit=10, generate_prompts=settings)
    sharded = write_config(tmp_path, tiny_model_dir, "sharded", limit=10,
                           generate_prompts=settings)
    in_process("generate-prompts", reference)
    assert in_process("generate-prompts", sharded, shard=Shard(1, 2)) is None  # waits for 0
    in_process("generate-prompts", sharded, shard=Shard(0, 2))  # the last one merges
    names = ("candidates.jsonl", "feedback.jsonl", "red_team.jsonl", "seeds.jsonl")
    same_files(tmp_path / "ref" / "prompts", tmp_path / "sharded" / "prompts", names)
    assert not (tmp_path / "sharded" / "prompts" / "shards").exists()
    mine, theirs = (json.loads((tmp_path / run / "prompts" / "manifest.json").read_text())
                    for run in ("sharded", "ref"))
    assert mine["status"] == "complete" and mine["counts"] == {"shards": 2, **theirs["counts"]}
    assert theirs["counts"]["requests"] == 4 and theirs["counts"]["kept"] > 0
