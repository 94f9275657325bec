"""Artifacts on disk: JSONL files, atomic writes, resumable appends, manifests, fingerprints.

Every stage writes through this module, so three promises hold everywhere:
- a finished artifact is replaced only by a complete new one (write to a temporary file, rename);
- an interrupted stage resumes after its last complete batch (``ResumableJsonl``);
- each stage directory has a ``manifest.json`` that says what produced it.

No heavy imports here: ``cai inspect`` and ``cai status`` use this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from cai_cli.errors import UserError, not_found
from cai_cli.run.layout import LOGS, PLOTS_DIR

MANIFEST = "manifest.json"


def dumps(record: Any) -> str:
    """One JSON line. Key order is kept and non-ASCII text stays readable. A typed record
    (``records.Record``) is written as its declared keys, unset optional ones left out."""
    if hasattr(record, "model_dump"):
        record = record.model_dump(mode="json", exclude_none=True)
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def iter_jsonl(path: Path | str, *, allow_torn_tail: bool = False) -> Iterator[dict]:
    """Yield the records of a JSONL file (see ``numbered_jsonl``)."""
    for _, record in numbered_jsonl(path, allow_torn_tail=allow_torn_tail):
        yield record


def numbered_jsonl(path: Path | str, *, allow_torn_tail: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield the records of a JSONL file; a malformed line is a UserError naming file:line.

    With ``allow_torn_tail`` a last line that does not end in a newline and does not parse (what
    a killed writer leaves) is dropped silently instead.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise UserError(f"{path}: file {not_found(path)}")
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    last_index = len(lines) - 1
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if allow_torn_tail and number - 1 == last_index:
                return  # torn last line: no trailing newline, cut mid-record
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); "
                            "fix or remove that line") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object per line, got "
                            f"{json_kind(record)}")
        yield number, record


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words: an array, a string, null..."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return {list: "an array", str: "a string", dict: "an object"}.get(type(value), "a number")


def read_jsonl(path: Path | str, *, allow_torn_tail: bool = False) -> list[dict]:
    return list(iter_jsonl(path, allow_torn_tail=allow_torn_tail))


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path | str, data: str | bytes) -> None:
    """Write a whole file so readers see either the old content or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with tmp.open("wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_jsonl_atomic(path: Path | str, records: Iterable[dict]) -> int:
    lines = [dumps(record) + "\n" for record in records]
    write_atomic(path, "".join(lines))
    return len(lines)


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


class ResumableJsonl:
    """Append-only JSONL output that survives being killed and resumes after the last batch.

    Records go to ``<final>.partial`` in batches; after each batch a small state file records the
    byte length of the partial file and how many batches are done, both fsynced. On resume the
    partial file is cut back to that length (dropping a torn line or a half-written batch), so
    the output is the same as if the run had never stopped. ``finish`` renames the partial file
    over the final one in one step; the state file then says "finished" until the stage has
    written its manifest and calls ``cleanup``, so a run killed in between does not start over.
    """

    def __init__(self, final_path: Path | str, fingerprint: str):
        self.final_path = Path(final_path)
        self.partial_path = self.final_path.with_name(self.final_path.name + ".partial")
        self.state_path = self.final_path.with_name(f".{self.final_path.name}.progress.json")
        self.fingerprint = fingerprint
        self.batches_done = 0
        self.finished = False
        self.reused = False  # finished by an earlier run when opened: nothing to write
        self.extra: dict[str, Any] = {}
        self._started = False  # whether the partial file and state of this run exist

    def open(self, *, fresh: bool = False) -> int:
        """Prepare for writing; return the number of batches already done (0 on a fresh start,
        always with ``fresh``). When a previous run with the same fingerprint got as far as
        ``finish``, ``finished`` is set and the final file holds its output. Nothing is written
        until the first batch is appended: a run that fails before producing leaves no trace."""
        state = None
        if self.state_path.is_file() and not fresh:
            try:
                state = json.loads(self.state_path.read_text())
            except json.JSONDecodeError:
                state = None
        if state and state.get("fingerprint") != self.fingerprint:
            state = None
        if state and state.get("finished") and self.final_path.is_file():
            self.finished = True
        elif state and self.partial_path.is_file():
            with self.partial_path.open("r+b") as handle:
                handle.truncate(int(state["bytes"]))
        else:
            state = None
        self._started = state is not None
        self.reused = self.finished
        self.batches_done = int(state["batches"]) if state else 0
        self.extra = state.get("extra", {}) if state else {}
        return self.batches_done

    def _start(self) -> None:
        """The first write of a fresh run: an empty partial file and its state."""
        if not self._started:
            self.final_path.parent.mkdir(parents=True, exist_ok=True)
            self.partial_path.write_bytes(b"")
            self._save_state(0)
            self._started = True

    def records(self) -> list[dict]:
        """The records written so far (after ``open``)."""
        path = self.final_path if self.finished else self.partial_path
        return read_jsonl(path) if path.is_file() and path.stat().st_size else []

    @property
    def empty(self) -> bool:
        """No record written so far (after ``open``)."""
        path = self.final_path if self.finished else self.partial_path
        return not path.is_file() or path.stat().st_size == 0

    def append_batch(self, records: list[dict], **extra: Any) -> None:
        """Append one batch of records; ``extra`` values are merged into the saved state."""
        self._start()
        payload = "".join(dumps(record) + "\n" for record in records).encode("utf-8")
        with self.partial_path.open("ab") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
            size = handle.tell()
        self.batches_done += 1
        self.extra.update(extra)
        self._save_state(size)

    def _save_state(self, size: int, finished: bool = False) -> None:
        write_json_atomic(
            self.state_path,
            {"fingerprint": self.fingerprint, "batches": self.batches_done, "bytes": size,
             "finished": finished, "extra": self.extra},
        )

    def finish(self) -> Path:
        """Move the complete output into place (one rename)."""
        if not self.finished:
            self._start()
            size = self.partial_path.stat().st_size
            # Rename first: killed before the state says "finished", a rerun starts over rather
            # than mistaking an older final file for this run's output.
            os.replace(self.partial_path, self.final_path)
            fsync_dir(self.final_path.parent)
            self._save_state(size, finished=True)
            self.finished = True
        return self.final_path

    def cleanup(self) -> None:
        """Forget the progress state once the stage has recorded completion."""
        self.state_path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Fingerprints and manifests


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(section: Any) -> str:
    """Stable hash of a JSON-able config fragment."""
    return sha256_bytes(json.dumps(section, sort_keys=True, default=str).encode())[:16]


# Files above this size are fingerprinted by size and modification time instead of content:
# hashing a 14 GB checkpoint on every `cai status` would take minutes.
CONTENT_HASH_LIMIT = 64 << 20


def file_fingerprint(path: Path | str, skip: frozenset[str] = frozenset()) -> str:
    """Hash of a file, or of a directory's files (names and contents; large files by size and
    modification time). Hidden files (our temporary and progress files) are left out, and so
    are the directory's top-level entries named in ``skip``."""
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_file():
        files = [path]
        root = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts)
                       and p.relative_to(path).parts[0] not in skip)
        root = path
    else:
        return "missing"
    for file in files:
        digest.update(str(file.relative_to(root)).encode())
        stat = file.stat()
        if stat.st_size > CONTENT_HASH_LIMIT:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
            continue
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def source_fingerprint(source) -> str:
    """A prompt source (``config.PromptSource``): a local file by content, a dataset by name."""
    return file_fingerprint(Path(source.path).expanduser()) if source.path else f"dataset:{source.dataset}"


def model_fingerprint(name_or_path: str) -> str:
    """A local model directory is fingerprinted by content, less its trackers' ``logs/``
    (``LOGS``: not the model, and a later forced run that fails adds to them) and its
    ``plots/`` (drawn after the stage completes, and again by ``cai report``: drawing them must
    not make the stages that read the model stale); a hub id by its name."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return file_fingerprint(path, skip=frozenset({LOGS, PLOTS_DIR}))
    return f"hub:{name_or_path}"


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("cai_cli", "torch", "transformers", "trl", "datasets", "peft", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


@dataclass
class Manifest:
    """What produced a stage directory. ``status`` is ``running`` until the stage completes."""

    stage: str
    config_hash: str
    config: dict
    inputs: dict[str, str] = field(default_factory=dict)
    status: str = "running"
    counts: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None

    def to_dict(self) -> dict:
        return {
            "stage": self.stage,
            "status": self.status,
            "config_hash": self.config_hash,
            "inputs": self.inputs,
            "counts": self.counts,
            "stats": self.stats,
            "timings": self.timings,
            "versions": self.versions,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "config": self.config,
        }

    def save(self, directory: Path | str, name: str = MANIFEST) -> None:
        write_json_atomic(Path(directory) / name, self.to_dict())


def load_manifest(directory: Path | str, name: str = MANIFEST) -> dict | None:
    path = Path(directory) / name
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path}: manifest is not valid JSON; delete the stage directory "
                        "or rerun the stage with --force") from None


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths whose values differ between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        changed: list[str] = []
        for key in sorted(set(old) | set(new)):
            path = f"{prefix}.{key}" if prefix else str(key)
            changed += diff_keys(old.get(key), new.get(key), path)
        return changed
    return [] if old == new else [prefix or "(root)"]
