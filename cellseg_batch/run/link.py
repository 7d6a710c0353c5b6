"""The link stage: on the driver, once every slice is stitched, 2D instances -> 3D objects and their ids."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from ..link import LinkRule, LinkStats, build_objects
from ..tiles import TileGrid
from .stage import Local, Stage
from .stitch import StitchStage
from .store import WorkStore, save_npy


class LinkStage(Stage):
    """One unit (the volume). Streams the slices' fragment tables and edges; writes each slice's fragment ->
    object id table and the object table. Memory grows with the number of 2D instances, not with voxels."""

    name = "link"
    reads = ("fragments(z)", "edges(z)", "cores(z) at gap tiles")
    writes = ("lut(z)", "objects", "link_stats")

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, n_classes: int, link: str, rule: LinkRule,
                 stitch: StitchStage):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.n_classes = store, grid, n_slices, n_classes
        self.link, self.rule = link, rule
        self.stitch = stitch
        self.table: np.ndarray | None = None
        self.stats: LinkStats | None = None

    def units(self):
        return ["volume"]

    def is_done(self, unit) -> bool:
        if self.store.objects_path.exists() and self.store.link_stats_path.exists():
            self.table = self.store.objects()
            self.stats = LinkStats(**self.store.link_stats())
            return True
        return False

    def is_ready(self, unit) -> bool:
        return not self.stitch.busy

    def start(self, unit):
        table, stats = build_objects(self.store, self.grid, self.n_slices, self.n_classes, self.link, self.rule)
        save_npy(self.store.objects_path, table)
        self.store.write_link_stats(asdict(stats))
        self.table, self.stats = table, stats
        return Local(None)

    @property
    def done(self) -> bool:
        return self.table is not None
