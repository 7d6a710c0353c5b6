"""The stitch stage: per slice, matches and border fills between neighbouring tiles from their bands, and the complete
z-overlaps."""

from __future__ import annotations

import numpy as np

from ..stitch import ZOVERLAP, tile_starts
from ..tiles import TileGrid
from .predict import CpuTasks, PredictStage
from .remote import stitch_task
from .stage import Stage
from .store import WorkStore


class StitchStage(Stage):
    """Unit: slice z, ready once z and z+1 are predicted. Its task reads only the slice's bands, plus the two cores
    of any position whose z-overlaps no actor counted from memory; the driver joins those with the logged ones.
    Where CPU actors hold every core, a predictor actor runs it between two of its batches (``CpuTasks``)."""

    name = "stitch"
    reads = ("bands(z)", "fragments(z)", "zoverlaps(z)")
    writes = ("edges(z)",)

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, iou_min: float, fill: bool,
                 predict: PredictStage, limit: int, cpu_tasks: CpuTasks):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.iou_min, self.fill = store, grid, n_slices, iou_min, fill
        self.predict, self.limit = predict, limit
        # one core per task: tried without (to overlap stitching with CPU actors that hold every core), the actors
        # lost more (torch shares the cores with the task) than the tail after the last tile gained; so there the
        # actors stitch, one call among their batches (``CpuTasks``)
        cpu_tasks.use(self)
        self.cores_read_back = 0  # tile positions whose z-overlaps had to read their cores again

    def units(self):
        return range(self.n_slices)

    def is_done(self, z) -> bool:
        return self.store.stitched(z)

    def is_ready(self, z) -> bool:
        return self.store.slice_done(z) and (z + 1 == self.n_slices or self.store.slice_done(z + 1))

    def start(self, z):
        missing = []
        if z + 1 < self.n_slices:
            delivered = self.predict.zoverlaps.get(z, {})
            missing = [p for p in self.grid.positions() if p not in delivered]
        self.cores_read_back += len(missing)
        if missing:  # slices predicted by an earlier run: with whether each core was written (the tile has
            # fragments; then a missing chunk is damage), and the slice's bands checked the same way
            held = [np.diff(tile_starts(self.store.fragments(zz), self.grid)) > 0 for zz in (z, z + 1)]
            self.store.check_bands(z, [p for p in self.grid.positions() if held[0][p[0] * self.grid.nx + p[1]]])
            missing = [(iy, ix, bool(held[0][iy * self.grid.nx + ix]), bool(held[1][iy * self.grid.nx + ix]))
                       for iy, ix in missing]  # fmt: skip
        return self.cpu_tasks.remote(stitch_task, str(self.store.root), self.grid, z, self.iou_min, self.fill,
                                     missing)

    def finish(self, z, result) -> None:
        logged = list(self.predict.zoverlaps.get(z, {}).values()) if z + 1 < self.n_slices else []
        overlaps = np.concatenate([*logged, result["overlaps"]]) if logged else result["overlaps"]
        self.store.write_edges(z, result["stitched"], overlaps.astype(ZOVERLAP, copy=False))
        self.predict.zoverlaps.pop(z, None)
