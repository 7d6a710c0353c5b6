"""Remote code: what runs on Ray workers (the predictor actor, the stitch and write tasks), each from paths and small arrays.

Workers get coordinates, never pixels: an actor reads its own tile windows from the volume and writes its tiles'
cores and bands to the work store; only fragment tables and z-overlap counts go back to the driver. Every call is
idempotent (it rewrites the same chunks with the same values), so a retry by Ray does not change the result.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from ..chunks import ChunkIO
from ..distribute import kill_point, reuse_freed_memory
from ..predict.base import without_no_data
from ..runs import label_runs
from ..stitch import SPARSE_SHARE, ZOVERLAP, fragment_table, stitch_slice, tile_bands, zoverlaps
from ..tiles import Box, TileGrid, TileKey
from .store import WorkStore, verified


@dataclass(frozen=True)
class TileJob:
    """Everything a predictor worker needs, sent once when the actor starts. The normalization comes with each
    call instead: actors start (and load their model) while the driver still samples the volume for it."""

    predictor: object  # predict.PredictorSpec
    volume: object  # read.Volume
    grid: TileGrid
    work_dir: str
    z_offset: int
    threads: int
    cache_bytes: int = 512 * 2**20  # cores (and runs) kept for the z-overlaps with the next slices
    reach: int = 1  # slices apart that z-overlaps are counted for: 1 + the largest link gap (gap edges need the rest)


class PredictorWorker:
    """Holds one predictor (on one GPU, or CPU threads) and predicts batches of tiles of one slice.

    It keeps the cores it predicted last and the runs of the slices before them (``HeldCores``, within
    ``cache_bytes``): when the same position of a slice within ``reach`` comes to it, the z-overlaps between the two
    are counted from memory, so a core is not read back for linking. The driver sends each position's slices to
    the same actor in z order."""

    def __init__(self, job: TileJob):
        from ..predict import build_predictor

        reuse_freed_memory()  # before the model's first allocations
        self.job = job
        self.predictor = build_predictor(job.predictor)
        self.predictor.set_threads(job.threads)
        self.store = WorkStore(job.work_dir)
        self.cores = None  # opened at the first call: the driver may still be creating the work store
        self.held = HeldCores(job.cache_bytes, job.reach)
        self.predict_lock = threading.Lock()  # where two calls overlap, one reads its windows while the other computes

    def pid(self) -> int:
        return os.getpid()

    def settings(self) -> dict:
        return self.predictor.settings()

    def predict(self, z: int, positions: list[tuple[int, int]], normalization=None) -> dict:
        """Fragment tables of the tiles, and the z-overlap blocks this call could count: ``((z_low, iy, ix), rows)``
        between slices z_low and z_low + 1 (possibly no rows: the pair was counted and shares nothing), and
        ``(d, (z_low, iy, ix), rows)`` between z_low and z_low + d for d = 2 .. ``job.reach``."""
        job, grid = self.job, self.job.grid
        windows = [grid.window(iy, ix) for iy, ix in positions]
        images, no_data = None, [None] * len(windows)
        t0 = time.perf_counter()
        times = {"read": 0.0, "normalize": 0.0}
        if self.predictor.needs_image:
            raw = [job.volume.read(job.z_offset + z, *w) for w in windows]
            t1 = time.perf_counter()
            images = [normalization.apply(r) for r in raw]
            no_data = [normalization.no_data(r) for r in raw]
            for image, where in zip(images, no_data):
                if where is not None and not where.all():  # no data reaches the model as the tile's median grey,
                    image[where] = np.median(image[~where])  # not as black: dark is image (membranes, dense matter)
            times = {"read": t1 - t0, "normalize": time.perf_counter() - t1}
        with self.predict_lock:
            t2 = time.perf_counter()
            tiles = self.predictor.predict(job.z_offset + z, windows, images)
            t3 = time.perf_counter()
            steps = self.predictor.step_times()
        tiles = [tile if where is None else without_no_data(tile, where) for tile, where in zip(tiles, no_data)]
        times.update(steps or {"predict": t3 - t2})
        fragments, overlaps, far_overlaps = [], [], []
        if self.cores is None:
            self.cores = ChunkIO(self.store.cores())
        for (iy, ix), window, tile in zip(positions, windows, tiles):
            core_box = grid.core(iy, ix)
            core = runs = None
            if tile.count:  # a tile without instances stays unwritten and reads as zeros
                # the core copied once, into its whole slot (one chunk of the cores array; zero padding), and kept as
                # a view of it: not of the window, which is freed
                slot = np.zeros(self.cores.chunks, tile.labels.dtype)
                core = slot[(0, slice(None), *(slice(0, n) for n in core_box.shape))]
                core[...] = tile.labels[(slice(None), *core_box.relative_to(window))]
                self.cores.write((z, 0, iy, ix), slot)
                self.store.write_bands(z, iy, ix, tile_bands(tile.labels, grid, iy, ix))
                # each layer's runs, from the slot (contiguous: no copy; the core at its origin): the fragment
                # table and the z-overlaps with both neighbouring slices are counted from them
                runs = [label_runs(layer) for layer in slot[0]]
            key = TileKey(z, iy, ix)
            fragments.append((tuple(key), fragment_table(key, tile, grid, runs)))
            near, far = self.held.add(z, iy, ix, core, runs)
            overlaps += near
            far_overlaps += far
        times["store"] = time.perf_counter() - t3  # cores, bands, fragment tables, z-overlaps
        return {"fragments": fragments, "zoverlaps": overlaps, "far_zoverlaps": far_overlaps, "times": times,
                "capped": sum(tile.capped for tile in tiles)}  # fmt: skip

    def call(self, fn, *args):
        """A later stage's task, run here between two batches (``run.predict.CpuTasks``)."""
        return fn(*args)


class HeldCores:
    """The tile cores an actor keeps (within ``budget`` bytes) to count z-overlaps from memory: each position's last
    core, and the runs of its slices before it up to ``reach - 1`` back."""

    def __init__(self, budget: int, reach: int = 1):
        self.budget, self.reach = budget, reach
        self.cache: OrderedDict[tuple[int, int, int], _Held] = OrderedDict()
        self.size = 0
        self.lock = threading.Lock()  # two calls of one actor may add at once

    def add(self, z: int, iy: int, ix: int, core: np.ndarray | None, runs: list | None) -> tuple[list, list]:
        """Count the overlaps of this core with the same position's cores held of the slices up to ``reach`` away:
        adjacent ones (``((z_low, iy, ix), rows)``, for stitching's links) and farther ones (``(d, (z_low, iy, ix),
        rows)``, for gap edges, so that the gap stage reads no core there), from both sides' runs where they have
        them. Then keep this core, and of the older slices of the position only the runs that later slices within
        reach can still use (the pairs a core could still make with its next slice are settled once that slice is
        here)."""
        near, far = [], []
        here = _Held(core, runs, core is not None)
        with self.lock:
            for d in range(1, self.reach + 1):
                for z_other in (z - d, z + d):
                    other = self.cache.get((z_other, iy, ix))
                    if other is None:
                        continue
                    a, b = (other, here) if z_other < z else (here, other)
                    rows = a.overlaps(b, iy, ix)
                    if rows is not None:
                        (near if d == 1 else far).append((d, (min(z, z_other), iy, ix), rows))
            for key in [k for k in self.cache if k[1:] == (iy, ix) and k[0] < z]:
                held = self.cache[key].nbytes()
                if key[0] <= z - self.reach or not self.cache[key].runs_only():
                    self._forget(key)
                else:
                    self.size -= held - self.cache[key].nbytes()  # its core let go
            self.cache[(z, iy, ix)] = here
            self.size += here.nbytes()
            while self.size > self.budget and self.cache:
                self._forget(next(iter(self.cache)))
        return [(key, rows) for _, key, rows in near], far

    def _forget(self, key) -> None:
        self.size -= self.cache.pop(key).nbytes()


class _Held:
    """A tile core an actor keeps for z-overlaps: the core (a view of its store slot; None once only runs are
    kept, or where the tile has no instance), each layer's runs, and whether the tile has instances."""

    def __init__(self, core: np.ndarray | None, runs: list | None, instances: bool):
        self.core, self.runs, self.instances = core, runs, instances

    def runs_only(self) -> bool:
        """Drop the core where every layer's runs are here (True: kept); False where the entry is of no more use."""
        if not self.instances:
            return True  # shares nothing with anything: kept, it costs nothing
        if self.runs is None or any(r is None for r in self.runs):
            return False
        self.core = None
        return True

    def overlaps(self, later: _Held, iy: int, ix: int) -> np.ndarray | None:
        """ZOVERLAP rows with the same position's core of a later slice; None where a layer can be counted from
        neither both sides' runs nor both cores."""
        if not (self.instances and later.instances):
            return np.zeros(0, ZOVERLAP)
        for k in range(len(self.runs)):
            if (self.runs[k] is None or later.runs[k] is None) and (self.core is None or later.core is None):
                return None
        return zoverlaps(self.core, later.core, iy, ix, self.runs, later.runs)

    def nbytes(self) -> int:
        """Memory it keeps: the whole store slot behind the core (the core is a view of it) and the runs."""
        core = self.core
        held = 0 if core is None else core.base.nbytes if isinstance(core.base, np.ndarray) else core.nbytes
        return held + sum(r.starts.nbytes + r.lengths.nbytes + r.values[0].nbytes for r in self.runs or () if r)


def stitch_task(work_dir: str, grid: TileGrid, z: int, iou_min: float, fill: bool,
                missing: list[tuple[int, int, bool, bool]]) -> dict:  # fmt: skip
    """Matches and border fills within slice z (from its bands), and the z-overlaps with slice z+1 at the positions
    no actor could count from memory (an actor restart, a resumed run): those read the two cores back
    (``missing``: iy, ix, and whether each core was written)."""
    store = WorkStore(work_dir)
    stitched = verified(lambda _: stitch_slice(lambda iy: store.band_row(grid, z, iy), grid, iou_min, fill),
                        store.bands_path / str(z), z)  # fmt: skip
    kill_point(f"stitch-task:{z}")
    counted = []
    for iy, ix, written_a, written_b in missing:
        a, b = store.core(grid, z, iy, ix, written_a), store.core(grid, z + 1, iy, ix, written_b)
        counted.append(zoverlaps(a, b, iy, ix))
    return {"stitched": stitched, "overlaps": np.concatenate(counted) if counted else np.zeros(0, ZOVERLAP)}


def gap_task(work_dir: str, grid: TileGrid, z: int, n_slices: int, n_classes: int, rule) -> tuple[dict, int]:
    """The z-overlaps gap edges from slice z may need (``link.gap_overlaps``), and how many tile cores it read."""
    from ..link import LinkStats, gap_overlaps

    stats = LinkStats()
    return gap_overlaps(WorkStore(work_dir), grid, z, n_slices, n_classes, rule, stats), stats.gap_cores_read


def write_block_task(work_dir: str, out_path: str, grid: TileGrid, z: int, block: Box, tiles: list[tuple[int, int]],
                     luts: list[np.ndarray], levels: int, layer_of=None, classes: list[np.ndarray] | None = None,
                     fills: list[tuple] = ()) -> None:  # fmt: skip
    """One block of output chunks of slice z, written once: the tile cores it meets with fragment ids replaced by
    object ids (``luts``, one per tile), then the border fills inside it (``fills``: box, layer, object ids, their
    classes or None; only on background), every class layer at level 0 and at the ``levels - 1`` levels above it,
    built from the block in memory. The block is aligned to those levels' chunks,
    so no other writer shares them. Where classes share a layer (``layer_of``), class c's output takes the pixels
    of its layer whose object is of class c (``classes``: per tile, local id -> its object's class)."""
    from ..write import Output

    out = Output(out_path)
    store = WorkStore(work_dir)
    parts = []  # (where in the block, the core's part inside it), all classes
    for (iy, ix), lut in zip(tiles, luts):
        core = grid.core(iy, ix)
        inside = core.intersect(block)
        ids = store.core(grid, z, iy, ix, written=len(lut) > 1)[(slice(None), *inside.relative_to(core))]
        parts.append((inside.relative_to(block), ids))
    # one buffer for every layer, each pixel set by the core that owns it (the cores meeting a block cover it)
    labels = _block_buffer(block.shape, luts[0].dtype if luts else np.uint32)
    if sum(ids[0].size for _, ids in parts) != labels.size:  # the tile grid's cores partition every slice
        raise ValueError(f"the tile cores do not cover block {block} of slice {z}")
    for c, name in enumerate(out.info["classes"]):
        layer = layer_of[c] if layer_of else c
        for i, ((where, ids), lut) in enumerate(zip(parts, luts)):
            if not relabel_into(labels[where], ids[layer], lut):
                labels[where] = 0
            elif classes is not None:
                labels[where][classes[i][ids[layer]] != c] = 0  # pixels of objects of another class
        for box, fill_layer, objects, fill_cls in fills:
            if fill_layer == layer:
                into = labels[box.relative_to(block)]
                take = (objects > 0) & (into == 0) & (True if fill_cls is None else fill_cls == c)
                into[take] = objects[take]
        out.write_levels(name, z, block.y0, block.x0, labels, levels)
        kill_point(f"write-task:{z}")  # fault tests: a block half written


def image_block_task(out_path: str, z: int, block: Box, levels: int, volume, z_offset: int) -> None:
    """One block of the image copy of slice z, from the volume: level 0 and the ``levels - 1`` levels above it,
    each from the one below in memory (the block is aligned to their chunks, as the label blocks are)."""
    from ..write import Output

    Output(out_path).write_levels(None, z, block.y0, block.x0, volume.read(z_offset + z, *block), levels)
    kill_point(f"image-task:{z}")  # fault tests: a block written, its result not yet taken


_buffers = threading.local()


def _block_buffer(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An array of ``shape`` from this thread's block buffer, which only grows: a fresh array (64 MiB for a 4096 px
    block of uint32, above what malloc keeps for reuse) is faulted in page by page on its first touch."""
    size, dtype = int(np.prod(shape)), np.dtype(dtype)
    held = getattr(_buffers, "block", None)
    if held is None or held.dtype != dtype or held.size < size:
        held = _buffers.block = np.empty(size, dtype)
    return held[:size].reshape(shape)


def relabel_into(target: np.ndarray, ids: np.ndarray, lut: np.ndarray) -> bool:
    """``target[...] = lut[ids]`` (a layer's tile-local ids -> object ids) where ``ids`` has any nonzero pixel; False
    (target untouched) where it has none. Where few pixels are labelled (organelle layers: ~1% here), only those
    are looked up, the rest zeroed: 0.45-0.5 against 1.0 ms on a 900 x 950 organelle layer (measured). Elsewhere
    ``np.take`` band by band of ~64k pixels: it casts the ids to intp first, and a band's cast (512 KB) stays in
    cache; a 1024² layer took 0.9 ms so, 2.5 ms in one call (measured)."""
    found = np.count_nonzero(ids)
    if found == 0:
        return False
    if found <= ids.size // SPARSE_SHARE:
        rows, cols = np.divmod(np.flatnonzero(ids != 0), ids.shape[-1])  # through a bool mask: faster than on ids
        values = ids[rows, cols]
        _check_ids(int(values.max()), lut)
        target[...] = 0
        target[rows, cols] = lut[values]
        return True
    _check_ids(int(ids.max()), lut)
    rows = max(1, RELABEL_BAND // max(1, ids.shape[-1]))
    for r in range(0, len(ids), rows):
        np.take(lut, ids[r : r + rows], out=target[r : r + rows], mode="clip")  # clip: unbuffered; ids checked above
    return True


def _check_ids(top: int, lut: np.ndarray) -> None:
    if top >= len(lut):  # the lut and the core disagree: never write a clipped id
        raise ValueError(f"tile id {top} has no object id (lut of {len(lut)})")


RELABEL_BAND = 1 << 16  # pixels per np.take in relabel_into


def pyramid_task(out_path: str, z: int, from_level: int) -> None:
    """The levels above ``from_level`` of slice z, from that level (already small) for every layer."""
    from ..write import Output

    # fault tests: the levels of slice z half written (after the first layer)
    Output(out_path).build_pyramid(z, from_level, after_layer=lambda: kill_point(f"pyramid-task:{z}"))


def preview_task(out_path: str, z: int, path: str) -> None:
    """The preview picture of slice z, once it is written (off the driver)."""
    from ..preview import render_output
    from ..write import Output

    render_output(Output(out_path), path, z)
