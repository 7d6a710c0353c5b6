"""Tile: the per-slice grid of overlapping windows whose cores partition the slice and are the output chunks.

Tile (iy, ix) owns the core ``[iy*S, (iy+1)*S) x [ix*S, (ix+1)*S)`` (clipped to the slice), where S = tile - overlap
is also the output chunk size, so each tile writes exactly one chunk per class and no two writers share a chunk.
Its window (what the predictor sees) is the core grown by overlap/2 on every side, shifted inward at the slice
edges so that it never leaves the image (no padding, full context at the borders). Every pixel of a core is thus
at least overlap/2 from the window edge on interior sides: predictions near tile edges, the least reliable ones,
never decide a pixel.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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
            raise UserError(
                f"--overlap {self.overlap} must be even and at most half of --tile {self.tile} (e.g. {self.tile // 8})"
            )

    @property
    def stride(self) -> int:
        return self.tile - self.overlap

    @property
    def ny(self) -> int:
        return -(-self.height // self.stride)

    @property
    def nx(self) -> int:
        return -(-self.width // self.stride)

    def __len__(self) -> int:
        return self.ny * self.nx

    def core(self, iy: int, ix: int) -> Box:
        s = self.stride
        return Box(iy * s, min((iy + 1) * s, self.height), ix * s, min((ix + 1) * s, self.width))

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
