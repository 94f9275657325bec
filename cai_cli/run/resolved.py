"""The resolved config a run directory keeps (``<run_dir>/.cai/config.yaml``), and reading a run
by its directory.

Every stage that starts producing writes the config it ran with there: defaults filled in,
``--set`` overrides applied. ``cai status RUN_DIR``, ``report``, ``plan`` read it, so a run is
looked at as it was run, without repeating its ``--set`` options.

Relative paths in a config (the constitution, the data, a local model, the run directory itself)
are read from the directory cai runs in, not the config file's folder. The file keeps them as
written, since the stages' fingerprints hold them as written, and records in its header the
directory they were read from. Reading a run from elsewhere reads them from there (``base``).

No heavy imports here.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cai_cli.config import Config, dump_config

_FROM = "# relative paths are from: "
_FROM_LINE = re.compile(r"^" + re.escape(_FROM) + r"(.+)$", re.MULTILINE)


def resolved_text(config: Config) -> str:
    """The file's text: a header saying what it is and where relative paths are from, then the
    config as ``cai config show`` prints it."""
    return ("# The resolved config of the last stage run in this directory, as cai wrote it:\n"
            "# `cai status / report / plan RUN_DIR` read it.\n"
            f"{_FROM}{json.dumps(str(Path.cwd()), ensure_ascii=False)}\n"
            + dump_config(config))


def recorded_cwd(text: str) -> Path | None:
    """The directory the recorded config's relative paths were read from; None for a file
    written before it was recorded."""
    found = _FROM_LINE.search(text)
    if found is None:
        return None
    try:
        return Path(json.loads(found.group(1)))
    except (ValueError, TypeError):
        return None


def base(run_dir: Path, recorded_run_dir: str, cwd: Path | None) -> Path:
    """Where to read the recorded config's relative paths from, for the run directory the user
    named (``run_dir``, as typed): where the run was run (``cwd``) while the run directory is
    still where that puts it; if the run directory moved together with the folder it was named
    from (a project copied elsewhere), that folder at its new place; else where it was run, if
    that directory still exists, else here."""
    here = Path.cwd()
    named, recorded = run_dir.resolve(), Path(recorded_run_dir).expanduser()
    origin = cwd if cwd is not None and cwd.is_dir() else None
    anchor = recorded if recorded.is_absolute() else (origin or here) / recorded
    if anchor.resolve() == named:
        return origin or here
    parts = recorded.parts
    if not recorded.is_absolute() and ".." not in parts and named.parts[-len(parts):] == parts:
        return Path(*named.parts[:-len(parts)]) if len(named.parts) > len(parts) else named
    return origin or here


@contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run the body in ``path`` (relative paths read from there), then go back."""
    before = Path.cwd()
    if path.resolve() == before.resolve():
        yield
        return
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)
