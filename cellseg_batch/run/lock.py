"""The output lock: one run writes an output at a time; a lock left by a run that is gone is taken over."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..errors import UserError

log = logging.getLogger("cellseg_batch")


def lock_path(out: str | Path) -> Path:
    """``OUT.lock`` beside the output (an output's own files are replaced by --overwrite; its lock is not)."""
    return Path(f"{str(out).rstrip('/')}.lock")


class OutputLock:
    """An exclusive ``flock`` on ``OUT.lock``, which records the holder (host, pid, start) for the message a second
    run gets. The kernel drops the flock when its process dies (kill -9 included), so a lock file whose flock is free
    was left by a run that is gone on this host, and is taken over. A holder recorded on another host is refused
    while its flock is free too (flock over some network filesystems is not seen across hosts), unless it records a
    SLURM job that SLURM says has ended, or is this very job (requeued): a job resubmitted after a scancel or a
    time limit usually starts on another node. Otherwise its message says to delete the file if that run is gone."""

    def __init__(self, out: str | Path):
        self.path = lock_path(out)
        self.fd: int | None = None

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        host = socket.gethostname()
        while True:
            try:
                # an --out in folders not made yet (a new results folder on a cluster's scratch) makes them
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"cannot write beside {self.path.with_suffix('')} ({e.strerror}); choose an --out in a "
                                "folder you can write") from None  # fmt: skip
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                who = self.holder()
                raise UserError(
                    f"another run (pid {who.get('pid', '?')} on {who.get('host', '?')}, since {who.get('since', '?')})"
                    f" is writing {self.path.with_suffix('')}; wait for it to end, or stop it"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the holder released (and unlinked) it between our open and flock: open the new one
                break
            os.close(fd)
        who = self.holder()
        job = os.environ.get("SLURM_JOB_ID")
        their_job = who.get("slurm_job")
        if who.get("host") not in (None, host) and not (their_job and (their_job == job or slurm_job_ended(their_job))):
            os.close(fd)
            in_job = f", SLURM job {their_job}" if their_job else ""
            raise UserError(
                f"{self.path} says a run (pid {who.get('pid')}{in_job}) on host {who['host']} writes this output; if "
                f"that run is gone, delete {self.path} and run again"
            )
        if who.get("pid"):
            in_job = f" (SLURM job {their_job}, ended)" if their_job and their_job != job else ""
            log.warning("taking over the lock of pid %s on %s%s, since %s, which is no longer running", who["pid"],
                        who.get("host", host), in_job, who.get("since"))  # fmt: skip
        os.ftruncate(fd, 0)
        mine = {"host": host, "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.write(fd, json.dumps(mine | ({"slurm_job": job} if job else {})).encode())
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the flock goes: a run waiting on this file opens a new one
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# what squeue shows for a job that still has (or may soon have) processes on its nodes
_SLURM_ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT",
                "RESIZING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


def slurm_job_ended(job: str) -> bool:
    """Whether SLURM says job ``job`` has ended: squeue shows it in an end state, or no longer knows it (purged after
    MinJobAge). False where SLURM cannot be asked (no squeue here, the controller not answering): unknown is not
    ended."""
    import subprocess

    try:
        done = subprocess.run(["squeue", "-h", "-j", str(job), "-t", "all", "-o", "%T"], capture_output=True, text=True,
                              timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        return "invalid job id" in done.stderr.lower()
    states = set(done.stdout.split())
    return bool(states) and not states & _SLURM_ALIVE

