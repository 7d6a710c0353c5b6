"""Tile: the per-slice grid of overlapping windows whose cores partition the slice.

The grid uses as few windows as a sliding window of ``tile`` px with ``overlap`` px between neighbours: n =
ceil((size - overlap) / (tile - overlap)) per axis. Tile (iy, ix) owns a *core*, and the cores partition the slice:
the cuts between cores are spread evenly, so interior cores are at most S = tile - overlap wide and the first and
last at most S + overlap/2 (they need no margin on the slice's side). Its window (what the predictor sees) is the
core grown by overlap/2 on every side, shifted inward at the slice edges so that it never leaves the image (no
padding, full context at the borders). Every pixel of a core is thus at least overlap/2 from the window edge on
interior sides: predictions near tile edges, the least reliable ones, never decide a pixel.

The grid does not follow the output's chunks (that would cost a window per row and column wherever the slice is
not a multiple of S): the write stage cuts cores into chunks (``run/write.py``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import NamedTuple

from .errors import UserError


class Box(NamedTuple):
    """A half-open rectangle [y0, y1) x [x0, x1) in slice coordinates."""

    y0: int
    y1: int
    x0: int
    x1: int

    def intersect(self, other: Box) -> Box | None:
        y0, y1 = max(self.y0, other.y0), min(self.y1, other.y1)
        x0, x1 = max(self.x0, other.x0), min(self.x1, other.x1)
        return Box(y0, y1, x0, x1) if y0 < y1 and x0 < x1 else None

    def relative_to(self, origin: Box) -> tuple[slice, slice]:
        """Index of this box inside an array that covers ``origin``."""
        return slice(self.y0 - origin.y0, self.y1 - origin.y0), slice(self.x0 - origin.x0, self.x1 - origin.x0)

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0


def side_by_side(height: int, width: int, tile: int) -> list[Box]:
    """Windows of ``tile`` px that partition a slice without overlap, in raster order, those at the far edges
    smaller: what ``convert labels-to-coco`` cuts, and how ``train`` cuts large validation images."""
    return [Box(y0, min(y0 + tile, height), x0, min(x0 + tile, width))
            for y0 in range(0, height, tile) for x0 in range(0, width, tile)]  # fmt: skip


# The four borders of a tile's core, in the order their bands are stored.
NORTH, SOUTH, WEST, EAST = SIDES = (0, 1, 2, 3)


class TileKey(NamedTuple):
    z: int
    iy: int
    ix: int


@dataclass(frozen=True)
class TileGrid:
    height: int
    width: int
    tile: int
    overlap: int

    def __post_init__(self):
        if self.tile < 16:
            raise UserError(f"--tile {self.tile} is too small; use at least 16 pixels (EM models: 256-1024)")
        if self.overlap < 0 or self.overlap % 2 or self.overlap >= self.tile // 2 + 1:
            raise UserError(f"--overlap {self.overlap} (given, or the model's) must be even and at most half of --tile "
                            f"{self.tile}: e.g. --overlap {max(2, self.tile // 16 * 2)}")  # fmt: skip

    @property
    def stride(self) -> int:
        """The widest interior core (a sliding window's step)."""
        return self.tile - self.overlap

    @cached_property
    def y_cuts(self) -> tuple[int, ...]:
        """Core boundaries along y: ``ny + 1`` values from 0 to ``height``."""
        return self._cuts(self.height)

    @cached_property
    def x_cuts(self) -> tuple[int, ...]:
        return self._cuts(self.width)

    def _cuts(self, size: int) -> tuple[int, ...]:
        h = self.overlap // 2
        n = max(1, -(-(size - self.overlap) // self.stride))
        # inner cuts spread evenly over [h, size - h]: interior cores <= S, the two outer ones <= S + h
        return (0, *(h + i * (size - 2 * h) // n for i in range(1, n)), size)

    @property
    def ny(self) -> int:
        return len(self.y_cuts) - 1

    @property
    def nx(self) -> int:
        return len(self.x_cuts) - 1

    @property
    def core_max(self) -> int:
        """The largest core side: the slot each core has in the work store."""
        return max(max(b - a for a, b in zip(c, c[1:])) for c in (self.y_cuts, self.x_cuts))

    def __len__(self) -> int:
        return self.ny * self.nx

    def core(self, iy: int, ix: int) -> Box:
        ys, xs = self.y_cuts, self.x_cuts
        return Box(ys[iy], ys[iy + 1], xs[ix], xs[ix + 1])

    def cores_in(self, box: Box) -> list[tuple[int, int]]:
        """Positions (raster order) whose cores meet ``box``."""
        iy0, iy1 = bisect_right(self.y_cuts, box.y0) - 1, bisect_left(self.y_cuts, box.y1)
        ix0, ix1 = bisect_right(self.x_cuts, box.x0) - 1, bisect_left(self.x_cuts, box.x1)
        return [(iy, ix) for iy in range(max(iy0, 0), min(iy1, self.ny)) for ix in range(max(ix0, 0), min(ix1, self.nx))]

    def window(self, iy: int, ix: int) -> Box:
        core = self.core(iy, ix)
        return Box(*self._span(core.y0, self.height), *self._span(core.x0, self.width))

    def _span(self, start: int, size: int) -> tuple[int, int]:
        if size <= self.tile:
            return 0, size
        lo = min(max(start - self.overlap // 2, 0), size - self.tile)
        return lo, lo + self.tile

    @property
    def band(self) -> int:
        """Half-width of the band around each core border that stitching compares: the overlap's half (each
        side of the border is then at least that far from one of the two windows' edges), and at least one pixel,
        so that fragments touching across a border are seen even without overlap."""
        return max(self.overlap // 2, 1)

    def band_box(self, iy: int, ix: int, side: int) -> Box:
        """The band along one border of a tile's core (``SIDES``), as long as its window is wide or high: the
        slot that tile's band occupies in the work store. Intersect with the window for the pixels it holds."""
        core, window, h = self.core(iy, ix), self.window(iy, ix), self.band
        if side == NORTH:
            return Box(core.y0 - h, core.y0 + h, window.x0, window.x1)
        if side == SOUTH:
            return Box(core.y1 - h, core.y1 + h, window.x0, window.x1)
        if side == WEST:
            return Box(window.y0, window.y1, core.x0 - h, core.x0 + h)
        return Box(window.y0, window.y1, core.x1 - h, core.x1 + h)

    def positions(self) -> Iterator[tuple[int, int]]:
        for iy in range(self.ny):
            for ix in range(self.nx):
                yield iy, ix

    def neighbours_after(self, iy: int, ix: int) -> Iterator[tuple[int, int]]:
        """The neighbours of (iy, ix) that come later in raster order (each neighbour pair once): E, SW, S, SE."""
        for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):
            jy, jx = iy + dy, ix + dx
            if 0 <= jy < self.ny and 0 <= jx < self.nx:
                yield jy, jx
