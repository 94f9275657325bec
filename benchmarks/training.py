"""Training overhead: ``cai finetune`` and ``cai optimize`` (dpo) against plain TRL scripts, and
``cai run``'s own cost against the full run.

1. A fresh ``cai run`` of the tiny config (timed, as a user runs it), then a second ``cai run``
   that finds every stage fresh: its time is the cost of planning and fingerprinting, printed
   as a share of the full run; so is the time the fresh run spent outside the stages.
2. ``finetune`` and ``optimize`` (dpo) run in this process for a fixed number of steps, each
   against a plain TRL script with the same model, data and arguments (load, train, save), in the
   same run, each twice, interleaved, best of two; steps/s of both and the ratio are printed
   (target >= 0.9).

    python benchmarks/training.py [--steps 20]

Needs the tiny model: ``cai tiny-model runs/tiny-model``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RUN_DIR = ROOT / "runs" / "bench-training"


def cai(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cai_cli", *args], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    overrides = [f"run_dir={RUN_DIR}"]

    # 1. The pipeline as a user runs it, then again with nothing to do.
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    sets = [item for o in overrides for item in ("--set", o)]
    full = cai("run", "--config", args.config, *sets)
    noop = cai("run", "--config", args.config, *sets)
    stage_seconds = 0.0
    for directory in ("sl", "sft", "prefs", "rm", "policy", "eval"):
        manifest = json.loads((RUN_DIR / directory / "manifest.json").read_text())
        stage_seconds += manifest["timings"]["seconds"]
    print(f"fresh `cai run`: {full:.1f} s, of which the stages {stage_seconds:.1f} s; outside the "
          f"stages (start-up, planning, fingerprints): {full - stage_seconds:.1f} s = "
          f"{(full - stage_seconds) / full:.1%}")
    print(f"second `cai run` (every stage fresh): {noop:.2f} s = {noop / full:.1%} of the full run "
          "(target <= 5%)")

    # 2. The trainers against plain TRL scripts. Import the libraries first, so neither side's
    # time includes the one-off import (seconds) that whichever ran first would pay.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import trl  # noqa: F401
    from transformers import PrinterCallback  # noqa: F401
    from trl import DPOTrainer, SFTConfig, SFTTrainer  # noqa: F401

    from cai_cli.config import load_config

    common = [f"finetune.training.max_steps={args.steps}", "finetune.helpful_ratio=0",
              f"optimize.training.max_steps={args.steps}", "optimize.soft_labels=false",
              "finetune.training.save_steps=1000", "optimize.training.save_steps=1000"]
    config = load_config(args.config, overrides + common)
    # Each side twice, interleaved, best of two: the first run of a trainer in a process pays
    # one-off set-up that would otherwise land on whichever side goes first.
    for name, stage, plain_script in (("finetune (SFTTrainer)", "finetune", plain_sft),
                                      ("optimize dpo (DPOTrainer)", "optimize", plain_dpo)):
        ours, plain = [], []
        for _ in range(2):
            ours.append(time_stage(stage, config))
            plain.append(plain_script(config))
        report(name, args.steps, min(ours), min(plain))


def report(what: str, steps: int, ours: float, plain: float) -> None:
    print(f"{what}: cai {steps / ours:.2f} steps/s ({ours:.1f} s), plain TRL {steps / plain:.2f} "
          f"steps/s ({plain:.1f} s), ratio {plain / ours:.2f} (target >= 0.9)")


def time_stage(name: str, config) -> float:
    import importlib

    module = importlib.import_module(f"cai_cli.stages.{name}")
    start = time.perf_counter()
    module.run(config, force=True)
    return time.perf_counter() - start


def training_args(config_cls, training, output_dir: str, **extra):
    return config_cls(
        output_dir=output_dir, max_steps=training.max_steps, learning_rate=training.learning_rate,
        per_device_train_batch_size=training.per_device_batch_size, max_length=training.max_length,
        logging_steps=training.logging_steps, save_steps=training.save_steps, report_to=[],
        use_cpu=True, seed=0, disable_tqdm=True,
        # the same precision as ours (precision auto: fp32 on a CPU); TRL's configs would turn
        # bf16 autocast on by default, which is other work, not the same job done faster
        bf16=False, fp16=False, **extra)


def plain_sft(config) -> float:
    """What a user would write with TRL alone for the same job."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import SFTConfig, SFTTrainer

    start = time.perf_counter()
    data = load_dataset("json", data_files=str(RUN_DIR / "sl" / "sft.jsonl"), split="train")
    data = data.select_columns(["prompt", "completion"])  # TRL masks the prompt itself
    model = AutoModelForCausalLM.from_pretrained(config.models.policy.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(config.models.policy.name_or_path)
    with tempfile.TemporaryDirectory() as out:
        args = training_args(SFTConfig, config.finetune.training, out)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the log dicts disable_tqdm turns on
        trainer.train()
        trainer.save_model(out)
    return time.perf_counter() - start


def plain_dpo(config) -> float:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    data = load_dataset("json", data_files=str(RUN_DIR / "prefs" / "pairs.jsonl"), split="train")
    data = data.select_columns(["prompt", "chosen", "rejected"])
    sft = str(RUN_DIR / "sft")
    model = AutoModelForCausalLM.from_pretrained(sft)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    with tempfile.TemporaryDirectory() as out:
        args = training_args(DPOConfig, config.optimize.training, out, beta=config.optimize.beta)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        trainer.save_model(out)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
