"""One writer per run directory: a lock every writing command holds from start to end.

Two ``cai`` commands writing one run directory interleave their appends and both report success
with half the records. So a writing command takes ``<run_dir>/.cai/lock`` first and keeps it
until it exits; a second writer is refused at once, with the holder's pid, host, command line
and start time, instead of waiting or silently sharing.

- The lock is an OS file lock (``filelock``: flock on Unix), which the kernel drops when its
  process dies, SIGKILL included, so a killed run never blocks the next one.
- Who holds it is written next to it (``lock.holder.json``) for the refusal message and for
  ``cai status`` / ``cai inspect`` (``holder()``). That file can outlive a killed holder, so it
  is only believed while the process it names is still running.
- A multi-process training job (torchrun, accelerate launch) is one writer: global rank 0 takes
  the lock and records the job id; the other ranks take nothing but wait briefly until rank 0's
  record names their own job, and are refused if another job holds the directory.
- Taking the lock again in the process that holds it (``cai run`` calling each stage) nests.

What ``filelock`` gives and this module does not redo: the OS lock itself, dropped by the kernel
with its process, and nesting within a process (one ``FileLock`` per path, ``is_singleton``,
with its own hold counter). What this module adds: the holder record and the refusal naming the
holder, stale records of killed holders told apart from live ones (pid, boot, process start
time), the ranks of one multi-process job sharing rank 0's hold, and shards holding the run
directory's lock shared (``flock(LOCK_SH)``, which filelock does not offer on a file its
exclusive lock also uses) beside their own.
- The shards of a sharded stage (``cai generate-sl --shard I/N``) run at once: each holds the
  run directory's lock *shared* (``flock(LOCK_SH)``) and its own shard lock
  (``lock.<command>.shard-I-of-N``) exclusively. Shards therefore run side by side while any
  whole-directory writer (a plain stage command, ``cai run``, ``cai merge``), which needs the
  lock exclusively, is refused, and the same shard cannot run twice. Shards that finish take
  ``lock.<command>.merge`` in turn to merge (``ShardLock``, ``merge_lock``).

No heavy imports: ``cai status`` and ``cai inspect`` use ``holder()``.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from cai_cli import ui
from cai_cli.errors import UserError
from cai_cli.run import dist
from cai_cli.run.layout import RunLayout

LOCK_NAME = RunLayout.of(".").lock.name  # the run directory's lock, in its tool folder
HOLDER_SUFFIX = ".holder.json"  # next to a lock: who holds it (pid, host, command line, since when)

RANK_WAIT_S = 30.0  # how long ranks other than 0 wait for rank 0 to take the lock
_HOLDER_SETTLE_S = 1.0  # a refused writer waits this long for the holder's record to be written
_POLL_S = 0.05

_tokens: dict[str, str] = {}  # lock file -> the token of this process's holder record


def lock_dir(run_dir: Path | str) -> Path:
    return RunLayout.of(run_dir).tool_dir


def lock_path(run_dir: Path | str, name: str = LOCK_NAME) -> Path:
    return lock_dir(run_dir) / name


def holder_path(run_dir: Path | str, name: str = LOCK_NAME) -> Path:
    return lock_dir(run_dir) / (name + HOLDER_SUFFIX)


def shard_lock_name(command: str, index: int, count: int) -> str:
    """The lock of shard ``index`` of ``count`` of a stage."""
    return f"{LOCK_NAME}.{command}.shard-{index}-of-{count}"


def merge_lock_name(command: str) -> str:
    return f"{LOCK_NAME}.{command}.merge"


# --- who is this process -------------------------------------------------------------------

def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) of a local process, from /proc (Linux)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()  # the command name in (...) may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _command_line() -> str:
    argv = list(sys.argv)
    head = argv[0].replace("\\", "/") if argv else ""
    if head.endswith("cai_cli/__main__.py") or Path(head).name == "cai":
        argv = ["cai", *argv[1:]]  # `python -m cai_cli ...` and the `cai` script read the same
    return shlex.join(argv)


def _my_record(command: str, token: str) -> dict:
    pid = os.getpid()
    stat = _proc_stat(pid)
    return {
        "pid": pid,
        "host": socket.gethostname(),
        "command": command,
        "command_line": _command_line(),
        "cwd": os.getcwd(),
        "started": time.time(),
        "job_id": dist.job_id(),
        "world_size": dist.world_size(),
        "boot_id": _boot_id(),
        "pid_start": stat[1] if stat else None,
        "token": token,
    }


# --- reading the holder record -------------------------------------------------------------

def _read_record(run_dir: Path | str, name: str = LOCK_NAME) -> dict | None:
    try:
        record = json.loads(holder_path(run_dir, name).read_text())
    except (OSError, ValueError):
        return None  # missing, unreadable, or torn by a writer killed mid-write
    if not isinstance(record, dict) or not isinstance(record.get("pid"), int):
        return None
    return record


def _liveness(record: dict) -> bool | None:
    """True/False whether the process a record names still runs; None when it is on another host."""
    if record.get("host") != socket.gethostname():
        return None
    boot = _boot_id()
    if boot and record.get("boot_id") and boot != record["boot_id"]:
        return False  # the machine rebooted since
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state in ("Z", "X"):
            return False  # killed, not yet reaped
        if record.get("pid_start") is not None and start != record["pid_start"]:
            return False  # the pid was reused by another process
    return True


def holder(run_dir: Path | str, name: str = LOCK_NAME) -> dict | None:
    """Who is writing ``run_dir`` now, for ``cai status`` / ``cai inspect``; None when nobody
    (``name``: of another lock than the run directory's, e.g. ``shard_lock_name(...)``).

    Never takes the lock and never waits: it reads the holder record and checks that the
    process it names still runs. The dict has pid, host, command ("finetune"), command_line,
    cwd, started (epoch seconds), since (human time), job_id, world_size, and ``live``: True
    when checked on this host, None when the holder is on another host (cannot be checked
    from here; a record left by a killed process there stays until the next run replaces it).
    """
    record = _read_record(run_dir, name)
    if record is None:
        return None
    live = _liveness(record)
    if live is False:
        return None
    record.pop("token", None)
    record["live"] = live
    record["since"] = _human_time(record.get("started"))
    return record


def shard_holders(run_dir: Path | str) -> list[dict]:
    """The running shards of any stage in ``run_dir`` (see ``holder``), by lock name."""
    directory = lock_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in sorted(directory.glob(f"{LOCK_NAME}.*.shard-*{HOLDER_SUFFIX}")):
        record = holder(run_dir, path.name.removesuffix(HOLDER_SUFFIX))
        if record is not None:
            found.append(record)
    return found


# --- messages ------------------------------------------------------------------------------

def _human_time(started) -> str:
    """``2026-12-06 03:40:00 (12:05 ago)``: when, and how long ago (``ui.duration``)."""
    if not isinstance(started, (int, float)):
        return "an unknown time"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
    return f"{stamp} ({ui.duration(max(0.0, time.time() - started))} ago)"


def describe(record: dict) -> str:
    """One line naming a holder: pid, host, command line, since when."""
    where = record.get("host", "?")
    job = f", job {record['job_id']} of {record.get('world_size')} processes" \
        if record.get("job_id") else ""
    return (f"pid {record['pid']} on {where}{job}, running `{record.get('command_line', '?')}` "
            f"since {_human_time(record.get('started'))}")


def _busy_message(run_dir: Path, record: dict | None) -> str:
    if record is None or _liveness(record) is False:
        shards = shard_holders(run_dir)
        if shards:
            return (f"run directory {run_dir} is in use by {len(shards)} running "
                    f"shard{'s' if len(shards) > 1 else ''}: "
                    + "; ".join(describe(r) for r in shards)
                    + ". Wait for them to finish (the last one merges), or stop them, then run "
                    "this again.")
    if record is None:
        return (f"run directory {run_dir} is in use: another process holds {lock_path(run_dir)} "
                f"but has not said who it is (`fuser -v {lock_path(run_dir)}` shows it). "
                f"Wait for it to finish, or stop it, then run this again.")
    live = _liveness(record)
    if live is False:
        return (f"run directory {run_dir} is in use: {lock_path(run_dir)} is held, and its last "
                f"recorded holder ({describe(record)}) has exited; a process it started may "
                f"still hold it (`fuser -v {lock_path(run_dir)}` shows it). Wait for it to "
                f"finish, or stop it, then run this again.")
    stop = f"`kill {record['pid']}`" if live else f"`kill {record['pid']}` on {record.get('host')}"
    return (f"run directory {run_dir} is in use by another cai command: {describe(record)}. "
            f"Wait for it to finish, or stop it ({stop}), then run this again.")


def _unwritable(run_dir: Path, exc: OSError) -> UserError:
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "is read-only" if exc.errno == errno.EROFS else "is not writable by this user"
        return UserError(f"run directory {run_dir} {why} ({exc.filename or run_dir}: "
                         f"{exc.strerror}); set run_dir to a folder you can write to")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return UserError(f"run directory {run_dir} cannot be created: {exc.filename or run_dir} "
                         f"is a file, not a folder; set run_dir to a folder path")
    return UserError(f"run directory {run_dir} cannot be written ({exc.filename or run_dir}: "
                     f"{exc.strerror}); set run_dir to a folder you can write to")


# --- taking and releasing ------------------------------------------------------------------

def _write_record(run_dir: Path, record: dict, name: str = LOCK_NAME) -> None:
    final = holder_path(run_dir, name)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, final)  # readers see the old record or the new one, never half of it


def _remove_record_if_mine(run_dir: Path, token: str, name: str = LOCK_NAME) -> None:
    record = _read_record(run_dir, name)
    if record is not None and record.get("token") == token:
        try:
            holder_path(run_dir, name).unlink()
        except OSError:
            pass


def _settled_record(run_dir: Path, name: str = LOCK_NAME) -> dict | None:
    # The holder writes its record just after taking the lock: give it a moment, so the
    # refusal names it rather than a stale record of a killed run or nobody. The shards that
    # share the run directory's lock write no record of it: look for theirs as well.
    deadline = time.monotonic() + _HOLDER_SETTLE_S
    while True:
        record = _read_record(run_dir, name)
        if (record is not None and _liveness(record) is not False) \
                or (name == LOCK_NAME and shard_holders(run_dir)) \
                or time.monotonic() >= deadline:
            return record
        time.sleep(_POLL_S)


class RunLock:
    """The write lock of one run directory, held by one command (or one multi-process job).

    ``with RunLock(run_dir, "finetune"):`` (or ``run_lock``) around everything the command
    writes. Raises UserError (exit 2) at once when another command or job holds it.
    ``role`` says what this process did: "owner" (took the lock), "nested" (this process
    already held it), "rank" (a non-zero rank of the job whose rank 0 holds it).
    """

    def __init__(self, run_dir: Path | str, command: str, *, rank_wait_s: float = RANK_WAIT_S):
        self.run_dir = Path(run_dir)
        self.command = command
        self.rank_wait_s = rank_wait_s
        self.role: str | None = None
        self._key: str | None = None
        self._lock = None
        self._created: list[Path] = []  # folders this hold created, removed again if left empty

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "RunLock":
        if self.role is not None:
            raise RuntimeError("RunLock.acquire called twice; use one RunLock per hold")
        try:
            self._created = [p for p in (self.run_dir, lock_dir(self.run_dir)) if not p.exists()]
            lock_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        if dist.is_distributed() and not dist.is_main():
            self._join_job()
            self.role = "rank"
            return self
        from filelock import FileLock, Timeout

        self._key = str(lock_path(self.run_dir).resolve())
        # One FileLock per path in this process: a second hold is filelock's nesting.
        self._lock = FileLock(self._key, thread_local=False, is_singleton=True)
        if self._lock.is_locked:
            self._lock.acquire(timeout=0)
            self.role = "nested"
            return self
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise UserError(_busy_message(self.run_dir, _settled_record(self.run_dir))) from None
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        token = secrets.token_hex(8)
        try:
            _write_record(self.run_dir, _my_record(self.command, token))
        except OSError as exc:
            self._lock.release()
            raise _unwritable(self.run_dir, exc) from None
        except BaseException:
            self._lock.release()
            raise
        _tokens[self._key] = token
        self.role = "owner"
        return self

    def _join_job(self) -> None:
        """Ranks > 0: proceed once rank 0 of this job holds the lock; refuse if another job does."""
        mine = dist.job_id()
        deadline = time.monotonic() + self.rank_wait_s
        while True:
            record = _read_record(self.run_dir)
            if record is not None and _liveness(record) is not False:
                if record.get("job_id") == mine:
                    return
                raise UserError(_busy_message(self.run_dir, record))
            if time.monotonic() >= deadline:
                raise UserError(
                    f"process {dist.rank()} of {dist.world_size()} (job {mine}) waited "
                    f"{self.rank_wait_s:.0f} s for rank 0 to take the lock of run directory "
                    f"{self.run_dir}, and it did not; see rank 0's error above. Every process "
                    f"of one job must use the same run_dir on a shared filesystem.")
            time.sleep(_POLL_S * 4)

    def release(self) -> None:
        role, self.role = self.role, None
        if role not in ("owner", "nested"):
            return
        if self._lock.lock_counter > 1:  # an inner hold of this process: it ends here
            self._lock.release()
            return
        try:
            _remove_record_if_mine(self.run_dir, _tokens.pop(self._key, ""))
            self._remove_if_nothing_written()
        finally:
            self._lock.release()

    def _remove_if_nothing_written(self) -> None:
        """A command refused before it wrote anything leaves no run directory behind: remove
        the lock file and the folders this hold created, if nothing else was put in them."""
        if not self._created:
            return
        layout = RunLayout.of(self.run_dir)
        try:
            if {p.name for p in layout.tool_dir.iterdir()} - {layout.lock.name}:
                return
            if self.run_dir in self._created \
                    and {p.name for p in self.run_dir.iterdir()} != {layout.tool_dir.name}:
                return
            layout.lock.unlink(missing_ok=True)
            for folder in reversed(self._created):
                folder.rmdir()
        except OSError:
            pass  # another command is starting in it: leave it


@contextmanager
def run_lock(run_dir: Path | str, command: str, *,
             rank_wait_s: float = RANK_WAIT_S) -> Iterator[RunLock]:
    """Hold the write lock of ``run_dir`` for the body; see RunLock."""
    with RunLock(run_dir, command, rank_wait_s=rank_wait_s) as lock:
        yield lock


class ShardLock:
    """What shard ``index`` of ``count`` of one stage holds from start to end: the run
    directory's lock shared with the other shards (so a whole-directory writer is refused, and
    refuses them) and its own shard lock exclusively (so the same shard cannot run twice).

    ``with ShardLock(run_dir, "generate-sl", 0, 4):``. Raises UserError (exit 2) at once when
    a whole-directory writer or the same shard holds what it needs. Unix only (``flock``).
    """

    def __init__(self, run_dir: Path | str, command: str, index: int, count: int):
        self.run_dir = Path(run_dir)
        self.command, self.index, self.count = command, index, count
        self.name = shard_lock_name(command, index, count)
        self._shared: int | None = None  # the descriptor holding the run directory's lock
        self._own = None
        self._token: str | None = None

    def __enter__(self) -> "ShardLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "ShardLock":
        import fcntl

        from filelock import FileLock, Timeout

        if self._shared is not None:
            raise RuntimeError("ShardLock.acquire called twice; use one ShardLock per hold")
        try:
            lock_dir(self.run_dir).mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path(self.run_dir), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _unwritable(self.run_dir, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise UserError(_busy_message(self.run_dir, _settled_record(self.run_dir))) from None
        self._shared = fd
        try:
            own = FileLock(str(lock_path(self.run_dir, self.name)), thread_local=False)
            try:
                own.acquire(timeout=0)
            except Timeout:
                record = _settled_record(self.run_dir, self.name)
                who = describe(record) if record else "another process"
                raise UserError(
                    f"shard {self.index}/{self.count} of {self.command} is already running in "
                    f"{self.run_dir}: {who}. Wait for it to finish, or stop it, then run this "
                    "again.") from None
            self._own, self._token = own, secrets.token_hex(8)
            record = _my_record(self.command, self._token)
            record["shard"] = f"{self.index}/{self.count}"
            _write_record(self.run_dir, record, self.name)
        except OSError as exc:
            self.release()
            raise _unwritable(self.run_dir, exc) from None
        except BaseException:
            self.release()
            raise
        return self

    def release(self) -> None:
        import fcntl

        own, self._own = self._own, None
        if own is not None:
            try:
                _remove_record_if_mine(self.run_dir, self._token, self.name)
            finally:
                own.release()
        fd, self._shared = self._shared, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


@contextmanager
def merge_lock(run_dir: Path | str, command: str) -> Iterator[None]:
    """Held by a shard while it looks whether all parts are complete and merges them: shards
    finishing together merge one after the other (the later ones find the stage complete).
    Waits for the shard merging now; merges are short."""
    from filelock import FileLock

    lock = FileLock(str(lock_path(run_dir, merge_lock_name(command))), thread_local=False)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()
