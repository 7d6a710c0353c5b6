"""Stages and the one loop that drives them: each stage names what it reads and writes, and knows when a unit is done.

A stage splits its work into units (a batch of tiles, a slice, a block of a slice). The loop asks each stage, in
order, for the units it can start now (their inputs are done, and the stage has room for more in flight), starts
them, and hands every result back to the stage that started it, as it arrives. So stitching starts while tiles are
still predicted, and no stage waits for another longer than its inputs require. A unit already done (its
``is_done`` check holds, from the work store) is never started: that is how a run resumes.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Hashable, Iterable
from typing import Any, ClassVar

from .. import distribute

log = logging.getLogger("cellseg_batch")


class Stage(ABC):
    """A step of the run. Subclasses set ``name``, ``reads`` and ``writes`` (work store / output products) and
    implement ``units``, ``is_done`` and ``start``; ``is_ready`` and ``finish`` where they have inputs or results."""

    name: ClassVar[str]
    reads: ClassVar[tuple[str, ...]] = ()
    writes: ClassVar[tuple[str, ...]] = ()
    limit: int = 1  # units in flight at once
    cpu_tasks = None  # run.predict.CpuTasks, for stages whose units are CPU tasks

    def __init__(self):
        self.todo: deque = deque()
        self.in_flight = 0
        self.total = 0
        self.remaining = 0  # of ``total``: what this run does (the rest was done by an earlier one)
        self.finished = 0  # units whose results this run took
        self.first_start: float | None = None
        self.last_finish: float | None = None
        self.cpu_at_start = self.cpu_at_finish = 0.0  # the driver process's CPU time at those two moments
        self.bar = None

    # -- what a stage says about itself ------------------------------------------------------------------------
    @abstractmethod
    def units(self) -> Iterable[Hashable]:
        """All of the run's units of this stage, in the order they should start."""

    @abstractmethod
    def is_done(self, unit) -> bool:
        """The check function: the unit's products are in the work store (or the output)."""

    def is_ready(self, unit) -> bool:
        """Whether the unit's inputs are done."""
        return True

    @abstractmethod
    def start(self, unit) -> Any:
        """Start the unit: return a Ray object ref, or do it here and return its result wrapped in ``Local``."""

    def finish(self, unit, result) -> None:  # noqa: B027 - optional: stages without a driver-side result
        """Take the unit's result on the driver (small: tables and counts) and record it in the work store."""

    def flush(self) -> None:  # noqa: B027 - optional: stages that buffer their records
        """Write what ``finish`` buffered (called once per batch of results: one file append for many units)."""

    def take(self) -> list:
        """Units to start now: in order, while the head one is ready and there is room."""
        out = []
        while self.todo and self.in_flight + len(out) < self.limit and self.is_ready(self.todo[0]):
            out.append(self.todo.popleft())
        return out

    def weight(self, unit) -> int:
        """How much of the stage's progress bar a unit is (tiles for a batch of tiles)."""
        return 1

    # -- bookkeeping by the loop --------------------------------------------------------------------------------
    def plan(self) -> None:
        units = list(self.units())
        self.total = sum(self.weight(u) for u in units)
        self.todo = deque(u for u in units if not self.is_done(u))
        self.remaining = sum(self.weight(u) for u in self.todo)

    @property
    def busy(self) -> bool:
        return bool(self.todo) or self.in_flight > 0

    @property
    def seconds(self) -> float:
        """Wall time from the stage's first start to its last result (stages overlap: these do not add up)."""
        if self.first_start is None or self.last_finish is None:
            return 0.0
        return self.last_finish - self.first_start

    @property
    def driver_cpu_seconds(self) -> float:
        """CPU time of the driver process (all its threads, Ray's included) over ``seconds``."""
        return max(0.0, self.cpu_at_finish - self.cpu_at_start)

    def worker_lost(self, unit) -> bool:
        """A unit's actor is gone (its node lost, or it died too often): True where the stage takes the unit back
        to give it to another worker; by default the run fails, unless the unit ran on a predictor actor."""
        return self.cpu_tasks.lost(self, unit) if self.cpu_tasks is not None else False

    def close(self) -> None:  # noqa: B027 - optional: stages holding workers release them here
        """Release what the stage holds (actors) once it has nothing left to do."""


class Local:
    """A result computed in the driver by ``Stage.start``."""

    def __init__(self, value):
        self.value = value


def drive(stages: list[Stage], bar=None, poll_s: float = 1.0) -> None:
    """Run every stage's units to completion, each as soon as it is ready; a worker's error is raised here."""
    import ray
    from ray.exceptions import RayActorError

    for stage in stages:
        stage.plan()
        if bar is not None:
            stage.bar = bar(stage.total, stage.name, stage.total - stage.remaining)
    done = [f"{s.name} {s.total - s.remaining} of {s.total}" for s in stages if 0 < s.total - s.remaining]
    if done:  # a resumed run: what the earlier one finished (a job log has no progress bars to show it)
        log.info("already done: %s", ", ".join(done))
    pending: dict = {}
    try:
        while any(s.busy for s in stages):
            started = False
            for stage in stages:
                for unit in stage.take():
                    started = True
                    if stage.first_start is None:
                        stage.first_start, stage.cpu_at_start = time.perf_counter(), time.process_time()
                    ref = stage.start(unit)
                    if isinstance(ref, Local):
                        _finished(stage, unit, ref.value)
                    else:
                        stage.in_flight += 1
                        pending[ref] = (stage, unit)
                if not stage.busy:
                    stage.close()
            if not pending:
                if not started and any(s.busy for s in stages):
                    waiting = [f"{s.name}: {s.todo[0]}" for s in stages if s.todo]
                    raise RuntimeError(f"no unit can start and none is running ({'; '.join(waiting)})")
                continue
            refs = list(pending)
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # everything finished so far, at once
            if not done:
                done, _ = ray.wait(refs, num_returns=1, timeout=poll_s)
            for ref in done:
                stage, unit = pending.pop(ref)
                stage.in_flight -= 1
                try:
                    result = ray.get(ref)
                except RayActorError as e:  # an actor that died too often, or unreachable (its node lost)
                    if stage.worker_lost(unit):
                        log.warning("%s: a worker was lost (%s); its units go to the others", stage.name,
                                    type(e).__name__)  # fmt: skip
                        continue
                    raise distribute.unwrap(e) from None
                except Exception as e:  # a worker's exception
                    raise distribute.unwrap(e) from None
                _finished(stage, unit, result)
            for stage in stages:
                stage.flush()
    except Exception:
        _drain(pending)
        raise
    finally:
        for stage in stages:
            stage.flush()  # results that arrived before an error or Ctrl-C count on the next run
            stage.close()
            if stage.bar is not None:
                stage.bar.close()


class LogProgress:
    """Progress where stderr is not a terminal (a SLURM job's log): one line for every stage at most every
    ``period_s`` as units finish, and a line for each stage when its last unit finishes. tqdm's bars there are carriage returns and
    cursor moves (a job's log held 53 lines of escapes for 17 of text)."""

    def __init__(self, period_s: float = 60.0):
        self.period_s, self.last = period_s, time.monotonic()
        self.lines: list[_StageLine] = []

    def bar(self, total: int, desc: str, initial: int, unit: str = "units") -> _StageLine:
        line = _StageLine(self, desc, total, initial, unit)
        self.lines.append(line)
        return line

    def tick(self) -> None:
        if time.monotonic() - self.last >= self.period_s:
            self.last = time.monotonic()
            log.info("progress: %s", ", ".join(f"{b.desc} {b.n}/{b.total}" for b in self.lines if b.total))


class _StageLine:
    """The part of tqdm's interface ``drive`` uses."""

    def __init__(self, owner: LogProgress, desc: str, total: int, initial: int, unit: str):
        self.owner, self.desc, self.total, self.n, self.unit = owner, desc, total, initial, unit
        self.start, self.closed = time.monotonic(), False

    def update(self, n: int) -> None:
        self.n += n
        if self.n >= self.total and not self.closed:
            self.closed = True
            log.info("%s: %d %s done, %.0f s into the run", self.desc, self.total, self.unit,
                     time.monotonic() - self.start)  # fmt: skip
        self.owner.tick()

    def close(self) -> None:
        self.closed = True


DRAIN_S = 60.0  # the longest wait, after an error, for units still running


def _drain(pending: dict) -> None:
    """After an error: wait (up to ``DRAIN_S``) for the units still running, results ignored. They write to the work
    store and the output (the image copy runs beside prediction), which the caller may be about to remove: a bad
    input found mid-run must leave nothing behind, not a folder a late unit made again."""
    import ray

    if pending:
        done, running = ray.wait(list(pending), num_returns=len(pending), timeout=DRAIN_S)
        if running:
            log.warning("%d units still running %.0f s after the error; files they write may be left", len(running),
                        DRAIN_S)  # fmt: skip


def _finished(stage: Stage, unit, result) -> None:
    stage.finish(unit, result)
    stage.last_finish, stage.cpu_at_finish = time.perf_counter(), time.process_time()
    stage.finished += 1
    if stage.bar is not None:
        stage.bar.update(stage.weight(unit))
    distribute.kill_point(f"{stage.name}:{stage.finished}")  # fault tests: after this result, before its flush
