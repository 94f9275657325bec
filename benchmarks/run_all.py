"""Run every benchmark script in this folder and write their output to RESULTS.md, with the
date and the machine, so the figures in an issue note can be traced to a run."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Scripts run more than once, with these arguments (the others once, without any).
RUNS = {"smollm2.py": [[], ["--model", "runs/tiny-model", "--config", "configs/tiny.yaml",
                            "--target", "4"]]}


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    scripts = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    sections = [f"# Benchmark results\n\n{datetime.datetime.now():%Y-%m-%d %H:%M}, {machine()}\n"]
    failed = False
    for script, arguments in ((s, a) for s in scripts for a in RUNS.get(s.name, [[]])):
        command = " ".join([f"benchmarks/{script.name}", *arguments])
        print(f"== {command}", flush=True)
        result = subprocess.run([sys.executable, str(script), *arguments], capture_output=True,
                                text=True, cwd=HERE.parent)
        output = result.stdout + (f"\n(exit code {result.returncode})\n{result.stderr[-2000:]}"
                                  if result.returncode else "")
        failed |= result.returncode != 0
        print(output, flush=True)
        sections.append(f"## {command}\n\n```text\n$ python {command}\n"
                        f"{output.strip()}\n```\n")
    (HERE / "RESULTS.md").write_text("\n".join(sections))
    print(f"written: {HERE / 'RESULTS.md'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
