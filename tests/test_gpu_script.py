"""benchmarks/gpu: the GPU check, run here through its entry script on the CPU with small shapes
(``--device cpu --shape small``), so it cannot rot between the sessions that have a GPU. One run
for the file: the table it writes, the correctness checks, the pipeline's stages and the
training steps are what a user reads off it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate")


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """``benchmarks/gpu/run.sh --device cpu`` as the README runs it on the GPU machine, with this
    interpreter, a scratch install folder and ``$OUT``: ``(result, out folder, checks by name)``."""
    root = tmp_path_factory.mktemp("gpu-check")
    out = root / "out"
    # No wheels: this interpreter has every dependency (a checkout's .whl/ is for the GPU's).
    # One torch thread: the suite runs two files at a time on two cores, and on a busy machine
    # two threads per process spin-wait for each other (the run took 3x as long).
    env = dict(os.environ, PYTHON=sys.executable, CAI_GPU_SITE=str(root / "site"), OUT=str(out),
               CAI_GPU_WHEELS=str(root / "no-wheels"), OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "run.sh"), "--device", "cpu",
                             "--work", str(root / "work")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").is_file() \
        else {"checks": [], "sections": {}}
    return result, out, {c["check"]: c for c in report["checks"]}, report


def test_the_table_is_written_and_printed(cpu_check):
    result, out, checks, report = cpu_check
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    table = (out / "gpu-check.md").read_text()
    for heading in ("## Checks:", "## Correctness", "## Pipeline", "## Generation speed",
                    "## Training steps", "## Time per part"):
        assert heading in table
        assert heading in result.stdout  # the same table on stdout
    assert "0 failed" in table
    assert (out / "gpu-check.log").is_file()  # run.sh keeps the whole output beside it
    assert set(report["timings"]) >= {"setup", "pipeline", "speed", "training"}


def test_the_backend_matches_plain_transformers_in_both_dtypes(cpu_check):
    _, _, checks, _ = cpu_check
    for dtype in ("bfloat16", "float32"):
        for name in ("greedy = plain generate", "cascade path taken",
                     "option log-probs = plain forward"):
            check = checks[f"{name}, {dtype}"]
            assert check["ok"], check
    assert "6/6 turns identical" in checks["greedy = plain generate, float32"]["detail"]


def test_every_pipeline_stage_finished_and_its_artifacts_load(cpu_check):
    _, _, checks, report = cpu_check
    assert checks["cai run"]["ok"], checks["cai run"]
    status = checks["cai status: every stage done"]
    assert status["ok"] and all(f"{stage} done" in status["detail"] for stage in STAGES), status
    assert checks["artifacts load"]["ok"], checks["artifacts load"]
    rows = report["sections"]["Pipeline: cai run (configs/tiny.yaml)"]["rows"]
    assert [row[:2] for row in rows] == [[stage, "done"] for stage in STAGES]


def test_training_steps_are_timed(cpu_check):
    _, _, checks, report = cpu_check
    for name in ("finetune, full", "finetune, LoRA", "optimize, dpo (DPOTrainer)"):
        assert checks[f"training: {name}"]["ok"], checks[f"training: {name}"]
    rows = report["sections"]["Training steps (cai finetune, cai optimize)"]["rows"]
    assert len(rows) == 3
    assert all(float(row[2]) > 0 for row in rows)
    full, lora, _ = rows
    assert int(lora[5]) < int(full[5])  # LoRA trains fewer parameters than the full model
