"""The write stages: tile cores -> object ids, every layer and pyramid level written from memory, block by block;
the image copy beside them."""

from __future__ import annotations

import numpy as np

from ..stitch import tile_starts
from ..tiles import Box, TileGrid
from ..write import Output, block_levels, label_dtype
from .link import LinkStage
from .predict import CpuTasks
from .remote import image_block_task, preview_task, pyramid_task, write_block_task
from .stage import Stage
from .store import WorkStore


class BlockStage(Stage):
    """A stage whose units are blocks (z, by, bx) of the output's slices (``blocks``), each recorded by a marker in
    the work store once written; ``left`` counts a slice's blocks still to write."""

    store: WorkStore
    n_slices: int
    blocks: list[tuple[int, int]]

    def __init__(self):
        super().__init__()
        self.left: dict[int, int] = {}
        self.marks: set = set()

    def units(self):
        for z in range(self.n_slices):
            for by, bx in self.blocks:
                yield (z, by, bx)

    def is_done(self, unit) -> bool:
        return unit in self.marks

    def plan(self) -> None:
        self.marks = self.store.marks(self.name)
        super().plan()
        for z, _, _ in self.todo:
            self.left[z] = self.left.get(z, 0) + 1

    def finish(self, unit, result) -> None:
        self.store.mark(self.name, unit)
        self.left[unit[0]] -= 1


class WriteStage(BlockStage):
    """Unit: a block of output chunks of one slice, ready once linking is done. A block reads the tile cores it
    meets from the work store (a core inside one block is read once; one across a block border, by each block it
    meets). In NGFF 0.5 a block is exactly one shard of each level it writes (``write.shard_sides``): no shard has
    two writers."""

    name = "write"
    reads = ("cores(z)", "fragments(z)", "lut(z)", "edges(z)")
    writes = ("labels/<class>/0..k",)

    def __init__(self, store: WorkStore, grid: TileGrid, n_slices: int, output: Output, link: LinkStage, limit: int,
                 cpu_tasks: CpuTasks, layer_of: tuple[int, ...] | None = None):  # fmt: skip
        super().__init__()
        self.store, self.grid, self.n_slices, self.output = store, grid, n_slices, output
        # where classes share a label layer (exclusive classes), each pixel goes to its object's class
        self.layer_of = layer_of if layer_of and list(layer_of) != list(range(len(layer_of))) else None
        self.link, self.limit = link, limit
        self.levels = output.info["levels"]
        self.block_levels = block_levels(output.info["chunk"], self.levels)
        self.side = side = output.info["chunk"] * 2 ** (self.block_levels - 1)  # pixels
        self.blocks = [(by, bx) for by in range(-(-grid.height // side)) for bx in range(-(-grid.width // side))]
        cpu_tasks.use(self)
        self.dtype: np.dtype | None = None
        self._luts: tuple | None = None

    def is_ready(self, unit) -> bool:
        return self.link.done

    def start(self, unit):
        z, by, bx = unit
        if self.dtype is None:  # ids are known now: the smallest type that holds them
            self.dtype = label_dtype(len(self.link.table))
            self.output.create_labels(self.dtype)
        g = self.grid
        block = self.block(by, bx)
        tiles = g.cores_in(block)
        luts, classes, fills = self._slice_luts(z)
        picked = [iy * g.nx + ix for iy, ix in tiles]
        fills = [(inside, layer, ids[inside.relative_to(box)], None if cls is None else cls[inside.relative_to(box)])
                 for box, layer, ids, cls in fills if (inside := box.intersect(block)) is not None]  # fmt: skip
        return self.cpu_tasks.remote(write_block_task, str(self.store.root), str(self.output.path), g, z, block, tiles,
                                     [luts[i] for i in picked], self.block_levels, self.layer_of,
                                     [classes[i] for i in picked] if classes else None, fills)  # fmt: skip

    def block(self, by: int, bx: int) -> Box:
        s, g = self.side, self.grid
        return Box(by * s, min((by + 1) * s, g.height), bx * s, min((bx + 1) * s, g.width))

    def _slice_luts(self, z: int) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[tuple]]:
        """Per tile of slice z: local id -> object id (0 -> 0), in the output's label dtype; where classes share
        layers, local id -> its object's class (-1: none); and the slice's border fills (``stitch`` rule 4) as
        (box, layer, object ids, their classes or None)."""
        if self._luts is None or self._luts[0] != z:
            objects = self.store.lut(z)
            start = tile_starts(self.store.fragments(z), self.grid)
            cut = [objects[start[i] : start[i + 1]] for i in range(len(self.grid))]
            luts = [np.concatenate([[0], o]).astype(self.dtype) for o in cut]
            classes = None
            if self.layer_of:
                object_cls = np.concatenate([[-1], self.link.table["cls"]]).astype(np.int16)
                classes = [np.concatenate([[-1], object_cls[o.astype(np.int64)]]).astype(np.int16) for o in cut]
            fills = self.store.fills(z)
            patches = []
            for k, p in enumerate(fills.patches):
                ids, source = fills.patch(k), int(p["jy"]) * self.grid.nx + int(p["jx"])
                patches.append((Box(int(p["y0"]), int(p["y1"]), int(p["x0"]), int(p["x1"])), int(p["layer"]),
                                luts[source][ids], classes[source][ids] if classes else None))  # fmt: skip
            self._luts = (z, luts, classes, patches)
        return self._luts[1], self._luts[2], self._luts[3]


class ImageStage(BlockStage):
    """Unit: a block of the image copy of one slice (the write stage's blocks and levels), from the volume. It needs
    nothing the other stages make, so it runs while tiles are predicted: where the model is on GPUs, on the CPUs
    they leave idle (the copy is then off the run's critical path); where CPU actors hold every core, one block at a
    time between their batches, and all at once after the last tile."""

    name = "image"
    reads = ("volume",)
    writes = ("image 0..k",)

    def __init__(self, store: WorkStore, n_slices: int, write: WriteStage, volume, z_offset: int, limit: int,
                 cpu_tasks: CpuTasks):  # fmt: skip
        super().__init__()
        self.store, self.n_slices, self.write, self.blocks = store, n_slices, write, write.blocks
        self.volume, self.z_offset, self.most = volume, z_offset, limit
        cpu_tasks.use(self)

    @property
    def limit(self) -> int:
        predicting_on_every_core = self.cpu_tasks.predict.busy and self.cpu_tasks.predict.spare_actors()
        return 1 if predicting_on_every_core else self.most

    def start(self, unit):
        z, by, bx = unit
        return self.cpu_tasks.remote(image_block_task, str(self.write.output.path), z, self.write.block(by, bx),
                                     self.write.block_levels, self.volume, self.z_offset)  # fmt: skip


class PyramidStage(Stage):
    """Unit: slice z, ready once all its blocks (labels and image) are written; the levels above what blocks span,
    from the highest level they wrote (1/4^k of the slice). No unit where the blocks span every level."""

    name = "pyramid"
    reads = ("labels/<class>/k", "image k")
    writes = ("labels/<class>/k+1..", "image k+1..")

    def __init__(self, store: WorkStore, n_slices: int, output: Output, write: WriteStage, image: ImageStage | None,
                 limit: int, cpu_tasks: CpuTasks):  # fmt: skip
        super().__init__()
        self.store, self.n_slices, self.output, self.write, self.limit = store, n_slices, output, write, limit
        self.block_stages = [write] + ([image] if image is not None else [])
        cpu_tasks.use(self)
        self.marks: set = set()

    def _blocks_written(self, z: int) -> bool:
        return all(stage.left.get(z, 0) == 0 for stage in self.block_stages)

    def units(self):
        return range(self.n_slices) if self.write.block_levels < self.write.levels else []

    def is_done(self, z) -> bool:
        return (z,) in self.marks

    def plan(self) -> None:
        self.marks = self.store.marks("pyramid")
        super().plan()

    def is_ready(self, z) -> bool:
        return self._blocks_written(z)

    def start(self, z):
        return self.cpu_tasks.remote(pyramid_task, str(self.output.path), z, self.write.block_levels - 1)

    def finish(self, z, result) -> None:
        self.store.mark("pyramid", (z,))
        self.marks.add((z,))

    def slice_done(self, z: int) -> bool:
        """Every level of every layer of slice z is written."""
        return self._blocks_written(z) and (self.write.block_levels == self.write.levels or (z,) in self.marks)


class PreviewStage(Stage):
    """Unit: the middle slice's picture (``cellseg/preview.png``), drawn as soon as that slice is written."""

    name = "preview"
    reads = ("labels/<class>/k", "image k")
    writes = ("cellseg/preview.png",)

    def __init__(self, n_slices: int, output: Output, pyramid: PyramidStage, cpu_tasks: CpuTasks):
        super().__init__()
        self.z, self.output, self.pyramid = n_slices // 2, output, pyramid
        self.path = output.meta_dir / "preview.png"
        cpu_tasks.use(self)

    def units(self):
        return [self.z]

    def is_done(self, z) -> bool:
        return self.path.exists()

    def is_ready(self, z) -> bool:
        return self.pyramid.slice_done(z)

    def start(self, z):
        return self.cpu_tasks.remote(preview_task, str(self.output.path), z, str(self.path))
