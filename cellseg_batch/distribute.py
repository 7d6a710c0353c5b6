"""Ray: start or join a cluster, the predictor actor pool, the CPU tasks, bounded work in flight, failures.

Workers get coordinates, never pixels: an actor reads its own tile windows from the volume, writes its tile
labels to the work store and returns only fragment tables. Ray's own fault tolerance replaces a dead actor
process (``max_restarts``) and re-runs its unfinished calls (``max_task_retries``); every call is idempotent (it
rewrites the same chunks with the same values), so a retry does not change the result.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError

ACTOR_RESTARTS = 4
TASK_RETRIES = 3


def start(address: str | None, num_cpus: int | None, num_gpus: int | None, verbose: bool) -> None:
    """Start a local Ray (``address`` None) or join a cluster; ``stop`` ends the one or leaves the other."""
    import signal

    if address:
        _check_reachable(address)  # before importing ray: it reads RAY_AUTH_MODE once
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
            ray.init(num_cpus=num_cpus, num_gpus=num_gpus, **kwargs)
    finally:
        # ray.init installs its own SIGTERM handler (exit 15): keep ours, so that scancel stops the run cleanly
        if callable(sigterm):
            signal.signal(signal.SIGTERM, sigterm)


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


def stop() -> None:
    """Disconnect; a local Ray started by ``start`` shuts down with it, a joined cluster keeps running."""
    import ray

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
    from ray.exceptions import GetTimeoutError

    try:
        ray.get([a.pid.remote() for a in actors], timeout=timeout)
    except GetTimeoutError:
        raise UserError(
            f"the predictor actors did not start within {timeout:.0f} s: no node offers the CPUs/GPUs each asks "
            "for (see `ray status`); lower --cpus-per-actor or --actors, or add nodes"
        ) from None


class PredictorWorker:
    """Holds one predictor (on one GPU, or CPU threads) and predicts batches of tiles of one slice."""

    def __init__(self, job: TileJob):
        from .predict import build_predictor

        self.job = job
        self.predictor = build_predictor(job.predictor)
        self.predictor.set_threads(job.threads)
        self.store_tiles = None
        self.lock = threading.Lock()  # where two calls overlap, one reads its windows while the other computes

    def pid(self) -> int:
        return os.getpid()

    def predict(self, z: int, positions: list[tuple[int, int]]) -> list[tuple[tuple[int, int, int], np.ndarray]]:
        from .stitch import fragment_table
        from .store import WorkStore
        from .tiles import TileKey

        job = self.job
        windows = [job.grid.window(iy, ix) for iy, ix in positions]
        images = None
        if self.predictor.needs_image:
            images = [job.normalization.apply(job.volume.read(job.z_offset + z, *w)) for w in windows]
        with self.lock:
            tiles = self.predictor.predict(job.z_offset + z, windows, images)
        if self.store_tiles is None:
            self.store_tiles = WorkStore(job.work_dir).tiles()
        out = []
        t = job.grid.tile
        for (iy, ix), window, tile in zip(positions, windows, tiles):
            if tile.count:  # a tile without instances stays unwritten and reads as zeros
                h, w = window.shape
                padded = tile.labels
                if (h, w) != (t, t):
                    padded = np.zeros((tile.labels.shape[0], t, t), dtype=tile.labels.dtype)
                    padded[:, :h, :w] = tile.labels
                self.store_tiles[z, iy, ix] = padded
            key = TileKey(z, iy, ix)
            out.append((tuple(key), fragment_table(key, tile, job.grid)))
        return out


@dataclass(frozen=True)
class TileJob:
    """Everything a predictor worker needs, sent once when the actor starts."""

    predictor: object  # PredictorSpec
    volume: object  # read.Volume
    normalization: object  # normalize.Normalization | None
    grid: object  # tiles.TileGrid
    work_dir: str
    z_offset: int
    threads: int


def make_actors(job: TileJob, count: int, cpus: float, gpus: float) -> list:
    """With a GPU, two calls run at once in an actor: one reads and post-processes on the CPU while the other
    computes on the GPU. On CPUs alone the two would fight over the same cores (measured: 16 vs 20 tiles/s on 2
    cores), so calls run one at a time."""
    import ray

    cls = ray.remote(PredictorWorker).options(
        num_cpus=cpus, num_gpus=gpus, max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES,
        max_concurrency=2 if gpus else 1,
    )  # fmt: skip
    return [cls.remote(job) for _ in range(count)]


def remote_task(fn: Callable, cpus: float = 1):
    import ray

    return ray.remote(fn).options(num_cpus=cpus, max_retries=TASK_RETRIES)


def unwrap(error: Exception) -> Exception:
    """The user-facing cause of a Ray failure (a UserError raised in a worker comes back as itself)."""
    cause = getattr(error, "cause", None)
    while cause is not None and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause if isinstance(cause, Exception) else error


class Scheduler:
    """Calls in flight, each with the callback that takes its result; callers bound how many they submit."""

    def __init__(self):
        self.pending: dict = {}

    def submit(self, ref, on_done: Callable) -> None:
        self.pending[ref] = on_done

    def wait(self, timeout: float = 1.0) -> int:
        """Hand finished results to their callbacks (in completion order); a worker's error is raised here."""
        import ray

        if not self.pending:
            return 0
        done, _ = ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        for ref in done:
            callback = self.pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as e:  # a worker's exception, or an actor that died too often
                raise unwrap(e) from None
            callback(result)
        return len(done)


class TaskQueue:
    """Items waiting to be submitted, at most ``limit`` in flight at once (backpressure)."""

    def __init__(self, sched: Scheduler, submit: Callable, limit: int):
        self.sched, self.submit_fn, self.limit = sched, submit, limit
        self.items: deque = deque()
        self.in_flight = 0

    def put(self, item, on_done: Callable) -> None:
        self.items.append((item, on_done))

    def pump(self) -> None:
        while self.items and self.in_flight < self.limit:
            item, on_done = self.items.popleft()
            self.in_flight += 1

            def done(result, on_done=on_done):
                self.in_flight -= 1
                on_done(result)

            self.sched.submit(self.submit_fn(item), done)

    @property
    def busy(self) -> bool:
        return bool(self.items) or self.in_flight > 0


class Timer:
    """Wall time per stage, for the run report."""

    def __init__(self):
        self.stages: dict[str, float] = {}

    def __call__(self, name: str):
        timer = self

        class _Stage:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                timer.stages[name] = timer.stages.get(name, 0.0) + time.perf_counter() - self.t

        return _Stage()
