"""The run-directory lock, with real processes: one writer at a time, killed holders don't block,
the ranks of one training job share the lock, and ``holder()`` reports without waiting."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai_cli.errors import UserError
from cai_cli.run import dist
from cai_cli.run.layout import TOOL_DIR
from cai_cli.run.lock import holder, holder_path, lock_path, run_lock

REPO = Path(__file__).resolve().parents[1]

# Takes the lock of argv[1] for the command "generate-sl", says LOCKED, holds it argv[2] seconds;
# a UserError ends it the way the CLI does: the message on stderr, exit code 2.
TAKER = """
import sys, time
from cai_cli.errors import UserError
from cai_cli.run.lock import run_lock
run_dir, hold, rank_wait = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
try:
    with run_lock(run_dir, "generate-sl", rank_wait_s=rank_wait) as lock:
        print("LOCKED", lock.role, flush=True)
        time.sleep(hold)
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
print("DONE", flush=True)
"""

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")


def _env(job: dict | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(job or {})
    return env


def _job(run_id: str, port: int, rank: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "TORCHELASTIC_RUN_ID": run_id, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def _start(run_dir: Path, hold: float = 60, job: dict | None = None,
           rank_wait: float = 10) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", TAKER, str(run_dir), str(hold), str(rank_wait)],
                            env=_env(job), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _start_holding(run_dir: Path, **kw) -> subprocess.Popen:
    proc = _start(run_dir, **kw)
    line = proc.stdout.readline()
    assert line.startswith("LOCKED"), (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc


def _run(run_dir: Path, job: dict | None = None, rank_wait: float = 10):
    t0 = time.monotonic()
    proc = _start(run_dir, hold=0, job=job, rank_wait=rank_wait)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err, time.monotonic() - t0


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_second_writer_is_refused_at_once_naming_the_holder(tmp_path, procs):
    run_dir = tmp_path / "run"
    first = _start_holding(run_dir)
    procs.append(first)

    rc, out, err, took = _run(run_dir)

    assert rc == 2, err
    assert "LOCKED" not in out
    assert f"pid {first.pid} on {socket.gethostname()}" in err
    # when the holder started, and how long ago (m:ss)
    assert re.search(r"since 20\d\d-\d\d-\d\d \d\d:\d\d:\d\d \(\d+:\d\d ago\)", err), err
    assert "Wait for it to finish, or stop it" in err and f"kill {first.pid}" in err
    assert "Traceback" not in err
    assert took < 15  # refused, not queued behind the holder's 60 s
    assert first.poll() is None  # the holder keeps running


def test_a_killed_holder_does_not_block_the_next_run(tmp_path, procs):
    run_dir = tmp_path / "run"
    first = _start_holding(run_dir)
    procs.append(first)
    os.kill(first.pid, signal.SIGKILL)  # not reaped yet: a zombie still answers kill(pid, 0)

    deadline = time.monotonic() + 10
    while holder(run_dir) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert holder(run_dir) is None  # its record is still there, but names a dead process
    assert holder_path(run_dir).exists()

    rc, out, err, _ = _run(run_dir)
    assert rc == 0, err
    assert "LOCKED owner" in out and "DONE" in out
    assert not holder_path(run_dir).exists()  # a clean exit removes its record


def test_holder_reports_the_live_writer_without_waiting_or_taking_the_lock(tmp_path, procs):
    run_dir = tmp_path / "run"
    assert holder(run_dir) is None
    assert not run_dir.exists()  # looking never creates anything

    first = _start_holding(run_dir)
    procs.append(first)
    t0 = time.monotonic()
    info = holder(run_dir)
    assert time.monotonic() - t0 < 0.5
    assert info is not None and info["pid"] == first.pid and info["live"] is True
    assert info["command"] == "generate-sl" and info["host"] == socket.gethostname()
    assert "ago" in info["since"] and "token" not in info

    rc, _, err, _ = _run(run_dir)  # holder() left the lock with its owner
    assert rc == 2 and f"pid {first.pid}" in err

    first.kill()
    first.communicate()
    assert holder(run_dir) is None


def test_ranks_of_one_job_share_the_lock_and_another_job_is_refused(tmp_path, procs):
    run_dir = tmp_path / "run"
    # Rank 1 starts first: it must wait for its rank 0, not run unguarded or take the lock.
    rank1 = _start(run_dir, hold=0, job=_job("job-a", 29511, 1), rank_wait=20)
    procs.append(rank1)
    time.sleep(0.3)
    rank0 = _start_holding(run_dir, job=_job("job-a", 29511, 0))
    procs.append(rank0)
    out, err = rank1.communicate(timeout=60)
    assert rank1.returncode == 0, err
    assert "LOCKED rank" in out

    info = holder(run_dir)
    assert info["pid"] == rank0.pid and info["job_id"] == "job-a@127.0.0.1:29511"

    # Another job on the same directory: its rank 0 and its rank 1 are both refused at once.
    for rank in (0, 1):
        rc, out, err, took = _run(run_dir, job=_job("job-b", 29522, rank))
        assert rc == 2, (rank, err)
        assert f"pid {rank0.pid}" in err and "job job-a@127.0.0.1:29511" in err
        assert took < 15
    rc, _, err, _ = _run(run_dir)  # and so is a plain single-process command
    assert rc == 2 and f"pid {rank0.pid}" in err
    assert rank0.poll() is None


def test_a_rank_whose_rank_0_never_takes_the_lock_gives_up(tmp_path):
    rc, out, err, took = _run(tmp_path / "run", job=_job("job-c", 29533, 1), rank_wait=1)
    assert rc == 2
    assert "waited 1 s for rank 0" in err
    assert took < 15


def test_nested_takes_in_one_process_and_release(tmp_path, procs):
    run_dir = tmp_path / "run"
    with run_lock(run_dir, "run") as outer:
        with run_lock(run_dir, "generate-sl") as inner:  # `cai run` calling a stage
            assert (outer.role, inner.role) == ("owner", "nested")
        assert holder(run_dir)["command"] == "run"  # still held after the inner exit
        rc, _, err, _ = _run(run_dir)
        assert rc == 2 and f"pid {os.getpid()}" in err
    assert holder(run_dir) is None
    rc, _, err, _ = _run(run_dir)
    assert rc == 0, err


def test_run_dir_under_a_file_is_a_user_error(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        with run_lock(blocker / "demo", "finetune"):
            pass


def test_read_only_run_dir_is_a_user_error(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    if os.geteuid() != 0:
        run_dir.mkdir()
        run_dir.chmod(0o500)
        with pytest.raises(UserError, match="not writable"):
            with run_lock(run_dir, "finetune"):
                pass
        run_dir.chmod(0o700)
    # root ignores permissions; a read-only mount answers EROFS, whoever asks
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if self.name == TOOL_DIR:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    with pytest.raises(UserError, match=f"run directory {run_dir} is read-only"):
        with run_lock(run_dir, "finetune"):
            pass
    assert not lock_path(run_dir).exists()


def test_dist_reads_the_launcher_environment(monkeypatch):
    for name in DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.is_distributed()) == (0, 1, True, False)
    assert dist.job_id() is None
    dist.refuse_multiprocess("generate-sl")  # one process: allowed
    dist.barrier()  # no process group: nothing to wait for

    for name, value in _job("job-a", 29511, 1).items():
        monkeypatch.setenv(name, value)
    assert (dist.rank(), dist.world_size(), dist.is_main(), dist.is_distributed()) == (1, 2, False, True)
    assert dist.job_id() == "job-a@127.0.0.1:29511"
    with pytest.raises(UserError, match=r"`cai generate-sl` runs as a single process.*1 of 2"):
        dist.refuse_multiprocess("generate-sl")

    monkeypatch.setenv("RANK", "one")
    with pytest.raises(UserError, match="RANK='one'"):
        dist.rank()
