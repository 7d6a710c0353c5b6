"""Ray plumbing, free of this tool's data: start or join a cluster, its resources, task options, failures.

Ray's own fault tolerance replaces a dead actor process (``ACTOR_RESTARTS``) and re-runs unfinished calls and
tasks (``TASK_RETRIES``); the run's workers make every call idempotent, so a retry does not change the result.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

ACTOR_RESTARTS = 4
TASK_RETRIES = 3


def kill_point(point: str) -> None:
    """Fault tests: ``kill -9`` of this process where ``CELLSEG_KILL_AFTER`` names ``point`` (``STAGE:N`` in the
    driver, ``STAGE-task:Z`` in a worker); with ``CELLSEG_KILL_ONCE=FILE`` only the first time (the file records it),
    so that Ray's retry of the task goes on."""
    if os.environ.get("CELLSEG_KILL_AFTER") != point:
        return
    once = os.environ.get("CELLSEG_KILL_ONCE")
    if once:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)


def start(address: str | None, num_cpus: int | None, num_gpus: int | None, verbose: bool) -> None:
    """Start a local Ray (``address`` None) or join a cluster; ``stop`` ends the one or leaves the other."""
    import signal

    if address:
        _check_reachable(address)  # before importing ray: it reads RAY_AUTH_MODE once
    else:
        # a local Ray of our own keeps Ray's default, token authentication, without the warning Ray prints about it
        # at the start of every run (how to opt out of it)
        logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_not_token_default)
    import ray

    kwargs = dict(
        include_dashboard=False,
        logging_level=logging.INFO if verbose else logging.WARNING,
        log_to_driver=verbose,
        configure_logging=True,
    )
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise UserError(
                    f"cannot join the Ray cluster at {address!r} ({e}); start it with `ray start --head`, and where it "
                    "uses token authentication, set RAY_AUTH_TOKEN"
                ) from e
        else:
            # Ray's raylet connects to the object store it has just started, and where the store is not up at the
            # first try it retries after 1 s (Ray's default: 10 tries, 1000 ms apart): 3 to 4 of 8 starts here took
            # 1 s longer (3.5 against 2.5 s, benchmarks/bench_ray_start.py). Every 100 ms instead, same 10 s budget.
            for key, value in (("RAY_raylet_client_connect_timeout_milliseconds", "100"),
                               ("RAY_raylet_client_num_connect_attempts", "100")):  # fmt: skip
                os.environ.setdefault(key, value)
            # "local": a new Ray of our own. Without it, ray.init() joins the cluster that `ray start` last started on
            # this machine (/tmp/ray/ray_current_cluster) or RAY_ADDRESS names, someone else's, even one since gone
            ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
            _local.append(True)
    except (KeyboardInterrupt, SystemExit) as e:
        # a stop request while Ray starts (Ctrl-C; SIGTERM, which Ray's own handler turns into exit 15 there): end
        # what it started (its agents were left running) and stop as anywhere else in a run (status 130, resumable)
        if isinstance(e, SystemExit) and e.code != signal.SIGTERM:
            raise
        ray.shutdown()
        raise KeyboardInterrupt from None
    finally:
        # ray.init installs its own SIGTERM handler (exit 15): keep ours, so that scancel stops the run cleanly
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


def _not_token_default(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast where a HOST:PORT cannot be reached (ray.init would retry for minutes), and send this machine's
    Ray token where one exists: Ray 2.5x clusters started by `ray start` require it, and a driver given an
    explicit address does not look for it by itself."""
    import socket

    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise UserError(f"no Ray cluster answers at {address} ({e}); check the head's address and port") from e
    token = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or token.exists()):
        os.environ["RAY_AUTH_MODE"] = "token"


_local: list = []  # non-empty while this process runs a local Ray that ``start`` started


def stop() -> None:
    """Disconnect; a local Ray started by ``start`` shuts down with it, a joined cluster keeps running."""
    import ray

    if _local:
        _local.clear()
        # the autoscaler's monitor of our one-machine Ray has nothing to save, and ray.shutdown gives it a second
        # to answer SIGTERM that it always uses (1.0 of the 1.4 s of a shutdown here): kill it first
        try:
            ray._private.worker._global_node.kill_monitor(check_alive=False)
        except Exception:  # a private API: a Ray that moved it just keeps the slower shutdown
            pass
    if ray.is_initialized():
        ray.shutdown()


def cluster_resources() -> dict:
    """Totals, and what the smallest node offers per GPU and the largest node in CPUs: an actor must fit on one
    node, so its size comes from those, not from the totals."""
    import ray

    res = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) >= 1]
    return {
        "cpus": int(res.get("CPU", 0)), "gpus": int(res.get("GPU", 0)), "nodes": len(nodes),
        "max_node_cpus": int(max((n.get("CPU", 0) for n in nodes), default=0)),
        "cpus_per_gpu": int(min((n.get("CPU", 0) // n["GPU"] for n in gpu_nodes), default=0)),
    }  # fmt: skip


def wait_started(actors: list, timeout: float) -> None:
    """Actors that cannot be placed would leave the run waiting forever: give up with the reason instead."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        try:  # without retries first: each retry of a call to an actor whose start raised printed its traceback
            ray.get([a.pid.options(max_task_retries=0).remote() for a in actors], timeout=timeout)
        except RayActorError as e:  # a user's mistake found as the actor loaded its model: its one line, not Ray's
            cause = getattr(e.args[0] if e.args else None, "cause", None)
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            # a worker that died as it started (a crash, not a mistake) is restarted by Ray (ACTOR_RESTARTS)
            ray.get([a.pid.remote() for a in actors], timeout=timeout)
    except GetTimeoutError:
        raise UserError(
            f"the predictor actors did not start within {timeout:.0f} s: no node offers the CPUs/GPUs each asks "
            "for (see `ray status`); lower --cpus-per-actor or --actors, or add nodes"
        ) from None


def remote_task(fn: Callable, cpus: float = 1):
    import ray

    @functools.wraps(fn)
    def task(*args):
        reuse_freed_memory()
        return fn(*args)

    return ray.remote(task).options(num_cpus=cpus, max_retries=TASK_RETRIES)


# glibc's malloc hands an allocation above its mmap threshold (128 KiB at first, raised as such blocks are freed)
# straight back to the OS when it is freed, and trims the heap's free top above 128 KiB: the next batch's arrays of
# the same sizes then fault their pages in again, one by one. Predicting 256 px tiles with Mask R-CNN in one
# process on one thread, that was ~2,400 page faults and 8-9 ms of system time a tile, 6-8% of its CPU. Keeping
# blocks up to 32 MiB (glibc's upper bound on 64-bit) on the heap, untrimmed, lets one batch's memory serve the next;
# the price is that a worker stays at its peak resident memory (~250 MB more for a Mask R-CNN actor, measured).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters
MMAP_THRESHOLD, TRIM_THRESHOLD = 32 * 2**20, 2**30


@functools.cache
def reuse_freed_memory() -> bool:
    """In a worker process: let malloc reuse freed memory instead of returning it to the OS (glibc only; elsewhere
    nothing changes). Once per process; True where it took effect."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
        return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl, macOS)
        return False


def unwrap(error: Exception) -> Exception:
    """The user-facing cause of a Ray failure (a UserError raised in a worker comes back as itself)."""
    cause = getattr(error, "cause", None)
    while cause is not None and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause if isinstance(cause, Exception) else error
