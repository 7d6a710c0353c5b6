"""The link stage: on the driver, once every slice is stitched, 2D instances -> 3D objects and their ids."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..link import LinkRule, LinkStats, build_objects
from ..tiles import TileGrid
from .predict import CpuTasks
from .remote import gap_task
from .stage import Local, Stage
from .stitch import StitchStage
from .store import WorkStore, save_npy


class GapStage(Stage):
    """Unit: slice z, ready once the slices from z - 1 to its largest gap + 2 below are stitched. Its task collects
    the z-overlaps gap edges from z may need at the positions that hold an instance without an adjacent partner:
    those the actors counted from memory (logged by distance), the rest from the tile cores, and those of such
    instances moved along their drift (``link.gap_overlaps``), so that the link stage on the driver reads none:
    many positions of a dense volume qualify, and the tasks run beside prediction on every core instead of one
    after it on the driver."""

    name = "gaps"
    reads = ("fragments(z-1..z+g+2)", "edges(z-1..z+g+2)", "zoverlaps(z, d)",
             "cores at gap positions no actor counted, and of moved instances")  # fmt: skip
    writes = ("gap_overlaps(z)",)

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, n_classes: int, link: str, rule: LinkRule,
                 limit: int, cpu_tasks: CpuTasks):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.n_classes, self.rule = store, grid, n_slices, n_classes, rule
        self.reach = max(rule.gap, default=0) + 1 if link != "none" else 0  # slices below z a unit reads
        self.limit = limit
        self.cores_read = 0  # by this run's units
        cpu_tasks.use(self)

    def units(self):
        return range(self.n_slices - 2) if self.reach >= 2 else []

    def is_done(self, z) -> bool:
        return self.store.gaps_path(z).exists()

    def is_ready(self, z) -> bool:
        # drift: z's from slice z - 1, the far slice's from the one after it
        last = min(z + self.reach + 1, self.n_slices - 1)
        return all(self.store.stitched(zz) for zz in range(max(z - 1, 0), last + 1))

    def start(self, z):
        return self.cpu_tasks.remote(gap_task, str(self.store.root), self.grid, z, self.n_slices, self.n_classes,
                                     self.rule)  # fmt: skip

    def finish(self, z, result) -> None:
        rows, cores_read = result
        self.store.write_gap_overlaps(z, rows)
        self.cores_read += cores_read


class LinkStage(Stage):
    """One unit (the volume). Streams the slices' fragment tables, edges and gap overlaps; writes each slice's
    fragment -> object id table and the object table. Memory grows with the number of 2D instances, not with
    voxels."""

    name = "link"
    reads = ("fragments(z)", "edges(z)", "gap_overlaps(z)")
    writes = ("lut(z)", "objects", "link_stats")

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, n_classes: int, link: str, rule: LinkRule,
                 stitch: StitchStage, gaps: GapStage):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.n_classes = store, grid, n_slices, n_classes
        self.link, self.rule = link, rule
        self.stitch, self.gaps = stitch, gaps
        self.table: np.ndarray | None = None
        self.stats: LinkStats | None = None

    def units(self):
        return ["volume"]

    def is_done(self, unit) -> bool:
        if self.store.objects_path.exists() and self.store.link_stats_path.exists():
            self.table = self.store.objects()
            self.stats = LinkStats.from_json(self.store.link_stats())
            return True
        return False

    def is_ready(self, unit) -> bool:
        return not (self.stitch.busy or self.gaps.busy)

    def start(self, unit):
        table, stats = build_objects(self.store, self.grid, self.n_slices, self.n_classes, self.link, self.rule)
        save_npy(self.store.objects_path, table)
        self.store.write_link_stats(asdict(stats))
        self.table, self.stats = table, stats
        return Local(None)

    @property
    def done(self) -> bool:
        return self.table is not None
