"""What one call of the device tool would carry, against its 64 MiB limit, and the carried
wheels against pyproject.toml: ``make gpu-wheels`` runs it after downloading them.

A call carries the tracked files, the untracked files git does not ignore, and the paths named
in ``carry`` (here the wheels folder). Fails (exit 1) when that is over ``--limit`` MiB (48 by
default: well under 64), when a pinned wheel's version is outside pyproject.toml's range, or
when the folder holds two versions of one package (which stops the whole install there).

    python benchmarks/gpu/carry.py .whl [--limit 48]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip's own copy
    from pip._vendor.packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
MIB = 2**20


def git_files(*options: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z", *options], cwd=ROOT, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return [ROOT / name for name in listed if name]


def size(paths) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", type=Path, help="the folder of wheels to carry (.whl)")
    parser.add_argument("--limit", type=float, default=48, help="MiB allowed in all")
    args = parser.parse_args()
    wheels = sorted((ROOT / args.wheels).glob("*.whl"))
    tracked = size(git_files())
    untracked = size(git_files("--others", "--exclude-standard"))
    carried = size(wheels)
    total = tracked + untracked + carried
    print(f"carried per call: tracked files {tracked / MIB:.1f} MiB + untracked, not ignored "
          f"{untracked / MIB:.1f} MiB + {len(wheels)} wheels {carried / MIB:.1f} MiB = "
          f"{total / MIB:.1f} MiB (limit {args.limit:g} MiB here, 64 MiB on the device tool)")
    problems = []
    if total > args.limit * MIB:
        problems.append(f"{total / MIB:.1f} MiB is over {args.limit:g} MiB")

    versions: dict[str, list[str]] = {}
    for wheel in wheels:
        name, version = wheel.name.split("-")[:2]
        versions.setdefault(normalise(name), []).append(version)
    for name, found in versions.items():
        if len(found) > 1:
            problems.append(f"{name}: {len(found)} versions ({', '.join(found)}); keep one")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for line in pyproject["project"]["dependencies"]:
        requirement = Requirement(line)
        for version in versions.get(normalise(requirement.name), []):
            if not requirement.specifier.contains(version, prereleases=True):
                problems.append(f"{requirement.name} {version} is outside pyproject.toml's "
                                f"'{requirement}'")
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
