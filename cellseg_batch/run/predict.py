"""The predict stage: tiles to a pool of predictor actors, each tile position to the same actor slice after slice."""

from __future__ import annotations

import time
from collections import defaultdict, deque

from .. import distribute
from ..tiles import TileGrid
from .remote import PredictorWorker, TileJob
from .stage import Stage
from .store import WorkStore


class ActorStart:
    """The predictor actors, created by ``begin`` (as soon as Ray is up: they load their model while the driver
    still settles the plan) or at the first batch; ``ready`` waits until all have started."""

    def __init__(self, job: TileJob, layout: tuple[int, float, float], timeout: float):
        self.job, self.layout, self.timeout = job, layout, timeout
        self.actors: list = []
        self.began = 0.0
        self.seconds = 0.0  # from creation until every actor is up

    def begin(self) -> None:
        import ray

        if self.actors:
            return
        count, cpus, gpus = self.layout
        self.began = time.perf_counter()
        # with a GPU two calls run at once: one reads and post-processes on the CPU while the other computes on
        # the GPU; on CPUs alone they would fight over the same cores (measured: 16 vs 20 tiles/s on 2 cores)
        cls = ray.remote(PredictorWorker).options(
            num_cpus=cpus, num_gpus=gpus, max_restarts=distribute.ACTOR_RESTARTS,
            max_task_retries=distribute.TASK_RETRIES, max_concurrency=2 if gpus else 1,
        )  # fmt: skip
        self.actors = [cls.remote(self.job) for _ in range(count)]

    def ready(self) -> list:
        self.begin()
        distribute.wait_started(self.actors, self.timeout)
        self.seconds = time.perf_counter() - self.began
        return self.actors


class CpuTasks:
    """Where the CPU work of the later stages (stitch, write, pyramid, preview: functions in ``remote``) runs: as Ray
    tasks, except where CPU predictor actors hold every core. There a task would wait for the last tile, then start
    a worker process of its own, so the actors run that work between their batches, in turn, and stay until the
    last unit (measured on 2 cores, 16 x 1024 x 1024: the stitching after the last tile 1.4-1.9 -> 0.1 s)."""

    def __init__(self, predict: PredictStage):
        self.predict = predict
        predict.cpu_tasks = self
        self.users: list[Stage] = []
        self.on_actors = True  # until an actor is lost running a unit: then tasks only
        self.tasks: dict = {}
        self.turn = 0
        self.by_actors = 0  # units run on a predictor actor

    def use(self, stage: Stage) -> None:
        stage.cpu_tasks = self
        self.users.append(stage)

    def remote(self, fn, *args):
        """``fn(*args)`` on the next predictor actor, or as a Ray task: an object ref either way."""
        actors = self.predict.spare_actors() if self.on_actors else []
        if actors:
            self.turn += 1
            self.by_actors += 1
            return actors[self.turn % len(actors)].call.remote(fn, *args)
        if fn not in self.tasks:
            self.tasks[fn] = distribute.remote_task(fn)
        return self.tasks[fn].remote(*args)

    def need_actors(self) -> bool:
        return self.on_actors and any(s.busy for s in self.users) and bool(self.predict.spare_actors())

    def lost(self, stage: Stage, unit) -> bool:
        """The actor running ``stage``'s unit is gone (died too often, or its node lost): the unit, and all later
        work, goes to tasks."""
        self.on_actors = False
        self.by_actors -= 1
        stage.todo.appendleft(unit)
        return True


class PredictStage(Stage):
    """Units are batches ``(z, actor, positions)`` of one slice's tiles. Positions are dealt to actors once
    (a run of neighbours in raster order each, so an actor's windows share input chunks) and each actor gets its
    batches in z order, so it holds the previous slice's core of a position when the next one comes and counts
    z-overlaps from memory. An actor whose queue runs dry
    takes the last batch of the longest queue: idle hardware costs more than the few cores read back for it."""

    name = "predict"
    reads = ("volume",)
    writes = ("cores", "bands", "fragments(z)", "zoverlaps(z)", "zoverlaps(z, d)")

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, batch_size: int, actors: ActorStart,
                 normalization=None):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.batch_size = store, grid, n_slices, batch_size
        self.starter, self.normalization = actors, normalization
        self.layout = actors.layout
        self.records = {z: store.read_fragment_log(z) for z in range(n_slices) if not store.slice_done(z)}
        # z -> position -> its z-overlap rows with z+1, logged (by this run or the one before), until z is stitched:
        # the stitch stage takes them from here instead of reading the log back
        self.zoverlaps: dict[int, dict] = defaultdict(dict)
        for z in range(n_slices - 1):
            if not store.stitched(z):
                self.zoverlaps[z] = store.read_zoverlaps(z)
        for z, done in list(self.records.items()):
            if len(done) == len(grid):  # killed between the last record and the table
                store.complete_slice(z, self.records.pop(z))
        # results not yet in the logs: written by ``flush``, once per batch of results (a kill loses only those)
        self.unlogged: dict[int, list] = defaultdict(list)
        self.unlogged_zov: dict[tuple[int, int], list] = defaultdict(list)  # (z_low, slices apart) -> blocks
        self.actors: list = []
        self.shares: list[list[tuple[int, int]]] = []
        self.slices_left: deque = deque()
        self.queues: list[deque] = []
        self.load: list[int] = []
        self.per_actor = 2  # calls in flight per actor: one queued behind the running one keeps it busy
        self.arrivals = [0.0, 0.0, 0]  # first result's time, last result's time, tiles after the first result
        self.progress: list[tuple[float, int]] = []  # (time, tiles) of each result: tiles/s over the run
        self.stolen = 0
        self.lost: set[int] = set()  # actors given up on (unreachable: their node lost): their batches go to others
        self.actor_start_s = 0.0
        self.settings: dict = {}  # the predictor's as built (``Predictor.settings``), once its actors started
        self.hold_every_core = False  # CPU actors holding all of the cluster's cores: no task runs beside them
        self.cpu_tasks: CpuTasks | None = None  # other stages' work the actors may run: kept while it needs them
        self.step_seconds: dict[str, float] = defaultdict(float)  # actors' time per step, summed over tiles
        self.capped = 0  # tiles whose predictor gave the most instances it gives a tile (``TileLabels.capped``)
        self.tiles_timed = 0

    def _shares(self) -> list[list[tuple[int, int]]]:
        """Each actor's tile positions: a run of neighbours in raster order."""
        positions = list(self.grid.positions())
        share = -(-len(positions) // self.layout[0])
        return [positions[a * share : (a + 1) * share] for a in range(self.layout[0])]

    def _slice_units(self, z: int) -> list[list[tuple]]:
        """The batches ``(z, actor, positions)`` of slice z's tiles still to predict, per actor."""
        done = self.records[z]
        out = []
        for a, share in enumerate(self.shares):
            mine = [p for p in share if (z, *p) not in done]
            out.append([(z, a, tuple(mine[i : i + self.batch_size])) for i in range(0, len(mine), self.batch_size)])
        return out

    def units(self):
        for z in sorted(self.records):
            for batches in self._slice_units(z):
                yield from batches

    def weight(self, unit) -> int:
        return len(unit[2])

    def is_done(self, unit) -> bool:
        z, _, positions = unit  # units are made for unfinished slices only
        return all((z, *p) in self.records[z] for p in positions)

    def plan(self) -> None:
        """Units are made a slice at a time, as the queues need them (a volume of millions of tiles is never listed
        at once); the counts come from the logs."""
        self.shares = self._shares()
        self.slices_left = deque(sorted(self.records))
        self.total = self.n_slices * len(self.grid)
        self.remaining = sum(len(self.grid) - len(self.records[z]) for z in self.slices_left)
        self.queues = [deque() for _ in self.shares]
        self.load = [0] * len(self.shares)

    def _refill(self) -> None:
        """Queue the next slices' batches while an actor (with positions) has fewer than two calls' worth queued."""
        working = [q for a, (q, share) in enumerate(zip(self.queues, self.shares)) if share and a not in self.lost]
        while self.slices_left and min(len(q) for q in working) < 2 * self.per_actor:
            for queue, batches in zip(self.queues, self._slice_units(self.slices_left.popleft())):
                queue.extend(batches)
        for a in self.lost:  # a lost actor's batches, to the live actor with the fewest queued
            while self.queues[a]:
                min((self.queues[b] for b in range(len(self.queues)) if b not in self.lost), key=len).append(
                    self.queues[a].popleft())

    def worker_lost(self, unit) -> bool:
        """Ray could not reach the unit's actor (its node lost) or it died too often: the actor is given up on, its
        batches (this one first) go to the other actors; the run fails only where none is left."""
        z, a, positions = unit
        self.load[a] -= 1
        self.lost.add(a)
        if len(self.lost) == len(self.queues):
            return False
        min((self.queues[b] for b in range(len(self.queues)) if b not in self.lost), key=len).appendleft(unit)
        self._refill()
        return True

    @property
    def busy(self) -> bool:
        return any(self.queues) or bool(self.slices_left) or self.in_flight > 0

    def take(self) -> list:
        self._refill()
        if not any(self.queues):
            return []
        if not self.actors:
            self._start_actors()
        out = []
        for a in range(len(self.queues)):
            while a not in self.lost and self.load[a] < self.per_actor:
                queue = self.queues[a]
                if not queue:
                    self._refill()
                if not queue:  # no slices left to deal: help the actor with the most queued
                    longest = max(self.queues, key=len)
                    if len(longest) < 2:
                        break
                    queue = longest
                    unit = queue.pop()
                    self.stolen += 1
                else:
                    unit = queue.popleft()
                self.load[a] += 1
                out.append((unit[0], a, unit[2]))
        return out

    def _start_actors(self) -> None:
        import ray

        self.actors = self.starter.ready()
        self.actor_start_s = self.starter.seconds
        self.settings = ray.get(self.actors[0].settings.remote())  # for the report: what the model and machine chose
        self.hold_every_core = not self.layout[2] and ray.available_resources().get("CPU", 0) < 1

    def spare_actors(self) -> list:
        """The live predictor actors, where CPU actors hold every core (else none: tasks run beside them)."""
        if not (self.hold_every_core and self.actors):
            return []
        return [actor for a, actor in enumerate(self.actors) if a not in self.lost]

    def start(self, unit):
        z, a, positions = unit
        return self.actors[a].predict.remote(z, list(positions), self.normalization)

    def finish(self, unit, result) -> None:
        z, a, _ = unit
        self.load[a] -= 1
        fragments = result["fragments"]
        now, a = time.perf_counter(), self.arrivals
        a[2] += len(fragments) if a[0] else 0
        a[0], a[1] = a[0] or now, now
        self.progress.append((now, len(fragments)))
        self.records[z].update(fragments)
        self.unlogged[z] += fragments
        for step, seconds in result.get("times", {}).items():
            self.step_seconds[step] += seconds
        self.tiles_timed += len(fragments)
        self.capped += result.get("capped", 0)
        for key, rows in result["zoverlaps"]:
            self.unlogged_zov[key[0], 1].append((key, rows))
            self.zoverlaps[key[0]][key[1:]] = rows
        for d, key, rows in result.get("far_zoverlaps", ()):  # for the gap stage, which reads them from the log
            self.unlogged_zov[key[0], d].append((key, rows))
        if len(self.records[z]) == len(self.grid):
            self.store.complete_slice(z, self.records.pop(z))
            self.unlogged.pop(z)

    def flush(self) -> None:
        for z, records in self.unlogged.items():
            self.store.append_fragments(z, records)
        for (z_low, d), blocks in self.unlogged_zov.items():
            self.store.append_zoverlaps(z_low, blocks, d)
        self.unlogged.clear()
        self.unlogged_zov.clear()

    def close(self) -> None:
        import ray

        if self.cpu_tasks is not None and self.cpu_tasks.need_actors():
            return  # they run the stages' last units, warm (a task would start a worker); closed once those are done
        for actor in self.starter.actors:  # free their cores (and GPUs) for the stages after this one
            ray.kill(actor)
        self.actors = self.starter.actors = []

    def ms_per_tile(self) -> dict[str, float]:
        """Where an actor's time per tile went: read, normalize, the predictor's steps, store."""
        n = max(self.tiles_timed, 1)
        return {step: round(1000 * s / n, 2) for step, s in self.step_seconds.items()}

    def tiles_over_time(self, t_start: float, points: int = 200) -> list[list[float]]:
        """[seconds from ``t_start``, tiles predicted so far] after each result, thinned to about ``points``."""
        done, out = 0, []
        step = max(1, len(self.progress) // points)
        for k, (t, n) in enumerate(self.progress):
            done += n
            if k % step == 0 or k == len(self.progress) - 1:
                out.append([round(t - t_start, 3), done])
        return out

    def steady_rate(self) -> float | None:
        """Tiles per second from the first batch's result to the last: prediction without actor start-up."""
        first, last, tiles = self.arrivals
        return round(tiles / (last - first), 3) if last > first else None
