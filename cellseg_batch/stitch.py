"""Stitch: within a slice, merge the instances of overlapping tiles into 2D instances; between slices, count overlaps.

The rule, deterministic and class-aware:
1. Ownership: each pixel takes its label from the tile whose core holds it (see ``tiles``); a tile's instance
   restricted to that tile's core is a *fragment*.
2. Matching: two instances of the same class from neighbouring tiles (8-neighbourhood) are the same object when,
   inside the band of ``overlap`` pixels centred on the border between their cores (both windows saw all of it),
   their masks have IoU >= ``stitch_iou`` (default 0.5); each instance matches at most one instance of each
   neighbour (Hungarian on IoU, needed only below 0.5, where it stays one-to-one).
3. Union: fragments joined by matches form one 2D instance (connected components), so an object cut by tile
   borders, or seen whole by several tiles, or larger than a tile, comes out once.

What runs where: the actor that predicts a tile computes its fragment table, cuts its *bands* (the labels within
the band of each core border, ``tile_bands``) and, from the previous slice's core still in its memory, the z-overlaps.
Stitching a slice then reads only bands (``stitch_slice``); only fragment tables and match lists reach the driver.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .predict.base import TileLabels
from .tiles import EAST, NORTH, SOUTH, WEST, Box, TileGrid, TileKey

# One row per fragment: a tile's instance, with what the merge and the object table need from its core pixels.
FRAGMENT = np.dtype(
    [
        ("iy", "<u4"), ("ix", "<u4"), ("local", "<u2"), ("cls", "<i2"), ("score", "<f4"),
        ("area", "<i8"), ("y0", "<i4"), ("x0", "<i4"), ("y1", "<i4"), ("x1", "<i4"),
        ("sy", "<f8"), ("sx", "<f8"),
    ]
)  # fmt: skip
# A match between fragments of neighbouring tiles of one slice.
PAIR = np.dtype([("iy_a", "<u4"), ("ix_a", "<u4"), ("a", "<u2"), ("iy_b", "<u4"), ("ix_b", "<u4"), ("b", "<u2")])
# Shared pixels of fragment a (slice z) and fragment b (slice z+1) at the same tile position.
ZOVERLAP = np.dtype([("iy", "<u4"), ("ix", "<u4"), ("a", "<u2"), ("b", "<u2"), ("count", "<i8")])


def fragment_table(key: TileKey, tile: TileLabels, grid: TileGrid) -> np.ndarray:
    """One FRAGMENT row per local id of the tile: class, score and the statistics of its core pixels."""
    window, core = grid.window(key.iy, key.ix), grid.core(key.iy, key.ix)
    ys, xs = core.relative_to(window)
    n = tile.count
    rows = np.zeros(n, dtype=FRAGMENT)
    rows["iy"], rows["ix"] = key.iy, key.ix
    rows["local"] = np.arange(1, n + 1)
    rows["cls"], rows["score"] = tile.classes, tile.scores
    if n == 0:
        return rows
    for layer in tile.labels:
        stats = _layer_statistics(layer[ys, xs], n)
        if stats is None:
            continue
        here, area, cy, cx, y0, y1, x0, x1 = stats  # ids are unique across layers: each id's pixels are all here
        rows["area"][here] = area
        rows["sy"][here], rows["sx"][here] = (cy + core.y0) * area, (cx + core.x0) * area
        rows["y0"][here], rows["y1"][here] = y0 + core.y0, y1 + core.y0
        rows["x0"][here], rows["x1"][here] = x0 + core.x0, x1 + core.x0
    return rows


def _layer_statistics(ids: np.ndarray, n: int):
    """For the ids 1..n present in a label image: (row indices id-1, pixel counts, centroid y and x, bounding boxes
    y0, y1, x0, x1), in the image's coordinates; None where it is empty. Dense layers (cells) in one pass of
    ``cc3d.statistics``; sparse ones (organelles) from their foreground pixels only, several times faster there."""
    count = np.count_nonzero(ids)
    if count == 0:
        return None
    if count > ids.size // 8:
        stats = cc3d.statistics(np.ascontiguousarray(ids))
        area = stats["voxel_counts"][1 : n + 1]
        here = np.flatnonzero(area > 0)
        centroids = stats["centroids"][here + 1]
        boxes = np.array([[b[0].start, b[0].stop, b[1].start, b[1].stop] for b in
                          (stats["bounding_boxes"][i + 1] for i in here)], dtype=np.int64).reshape(-1, 4)  # fmt: skip
        return here, area[here], centroids[:, 0], centroids[:, 1], *boxes.T
    flat = np.ascontiguousarray(ids).ravel()
    where = np.flatnonzero(flat)
    v = flat[where].astype(np.int64)
    py, px = where // ids.shape[1], where % ids.shape[1]
    area = np.bincount(v, minlength=n + 1)
    here = np.flatnonzero(area[1:] > 0)
    a = area[here + 1]
    cy = np.bincount(v, weights=py, minlength=n + 1)[here + 1] / a
    cx = np.bincount(v, weights=px, minlength=n + 1)[here + 1] / a
    bounds = []
    for coord, reduce, start, shift in ((py, np.minimum, ids.shape[0], 0), (py, np.maximum, -1, 1),
                                        (px, np.minimum, ids.shape[1], 0), (px, np.maximum, -1, 1)):  # fmt: skip
        out = np.full(n + 1, start, dtype=np.int64)
        reduce.at(out, v, coord)
        bounds.append(out[here + 1] + shift)
    return here, a, cy, cx, bounds[0], bounds[1], bounds[2], bounds[3]


def contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of nonzero uint16 ids at the same pixels of ``a`` and ``b``, and how many pixels each pair shares.
    Pairs come sorted by (a, b)."""
    both = (a > 0) & (b > 0)
    av, bv = a[both].astype(np.int64), b[both].astype(np.int64)
    if len(av) == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint16), np.zeros(0, np.int64)
    nb = int(bv.max()) + 1
    key = av * nb + bv
    if (int(av.max()) + 1) * nb <= 4 * len(key) + 65536:  # a dense count is cheaper than sorting the pixels
        counts = np.bincount(key)
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    else:
        pairs, counts = np.unique(key, return_counts=True)
    return (pairs // nb).astype(np.uint16), (pairs % nb).astype(np.uint16), counts.astype(np.int64)


def match_labels(la: np.ndarray, lb: np.ndarray, iou_min: float) -> np.ndarray:
    """Matches (a, b) of local ids between two tiles' label layers over the same pixels, per the stitching rule."""
    matches = []
    for a, b in zip(la, lb):
        ia, ib, inter = contingency(a, b)
        if len(inter) == 0:
            continue
        area_a = np.bincount(a.ravel())
        area_b = np.bincount(b.ravel())
        iou = inter / (area_a[ia] + area_b[ib] - inter)
        ok = iou >= iou_min
        ia, ib, iou = ia[ok], ib[ok], iou[ok]
        if len(iou) == 0:
            continue
        if iou_min <= 0.5:
            # below IoU 0.5 one instance can pass with two others: keep the best one-to-one assignment
            ua, ra = np.unique(ia, return_inverse=True)
            ub, rb = np.unique(ib, return_inverse=True)
            cost = np.zeros((len(ua), len(ub)))
            cost[ra, rb] = -iou
            rows, cols = linear_sum_assignment(cost)
            keep = cost[rows, cols] < 0
            ia, ib = ua[rows[keep]], ub[cols[keep]]
        matches.append(np.stack([ia, ib], axis=1))
    return np.concatenate(matches) if matches else np.zeros((0, 2), dtype=np.uint16)


def match_tiles(la: np.ndarray, wa: Box, lb: np.ndarray, wb: Box, iou_min: float) -> np.ndarray:
    """Matches between two tiles' label layers (window coordinates ``wa``, ``wb``) over all pixels both saw."""
    shared = wa.intersect(wb)
    if shared is None:
        return np.zeros((0, 2), dtype=np.uint16)
    sa, sb = shared.relative_to(wa), shared.relative_to(wb)
    return match_labels(la[(slice(None), *sa)], lb[(slice(None), *sb)], iou_min)


# -- bands: what stitching needs of a tile ----------------------------------------------------------------------


def tile_bands(labels: np.ndarray, grid: TileGrid, iy: int, ix: int) -> np.ndarray:
    """(4, classes, 2h, tile) uint16: the tile's labels in the band along each core border (``tiles.SIDES``);
    west and east bands are stored transposed, so that all four share one shape. Pixels outside the window are 0."""
    window, h = grid.window(iy, ix), grid.band
    out = np.zeros((4, labels.shape[0], 2 * h, grid.tile), dtype=labels.dtype)
    for side in (NORTH, SOUTH, WEST, EAST):
        box = grid.band_box(iy, ix, side)
        held = box.intersect(window)
        if held is None:
            continue
        data = labels[(slice(None), *held.relative_to(window))]
        ys, xs = held.relative_to(box)
        if side in (NORTH, SOUTH):
            out[side, :, ys, xs] = data
        else:
            out[side, :, xs, ys] = data.transpose(0, 2, 1)
    return out


def _band_pixels(bands: np.ndarray, grid: TileGrid, iy: int, ix: int, side: int, region: Box) -> np.ndarray:
    """(classes, h, w) labels of ``region`` (inside the band's part of the window) from a tile's stored bands."""
    ys, xs = region.relative_to(grid.band_box(iy, ix, side))
    if side in (NORTH, SOUTH):
        return bands[side, :, ys, xs]
    return bands[side, :, xs, ys].transpose(0, 2, 1)


def _held(grid: TileGrid, iy: int, ix: int, side: int) -> Box | None:
    return grid.band_box(iy, ix, side).intersect(grid.window(iy, ix))


def stitch_slice(band_row, grid: TileGrid, iou_min: float) -> tuple[np.ndarray, int]:
    """Matches (PAIR rows) between all neighbouring tiles of a slice, and the count of same-class fragment pairs
    that touch across a core border without matching (possible splits; reported, never merged). Reads the slice's
    bands one tile row at a time: ``band_row(iy)`` -> (NX, 4, classes, 2h, tile), ``tile_bands`` of each tile."""
    pairs, touching = [], 0
    row = band_row(0)
    for iy in range(grid.ny):
        below = band_row(iy + 1) if iy + 1 < grid.ny else None
        for ix in range(grid.nx):
            ca = grid.core(iy, ix)
            for jy, jx in grid.neighbours_after(iy, ix):
                east = jy == iy
                side_a, side_b = (EAST, WEST) if east else (SOUTH, NORTH)
                bands_b = row[jx] if east else below[jx]
                box_a, box_b = _held(grid, iy, ix, side_a), _held(grid, jy, jx, side_b)
                shared = box_a.intersect(box_b)
                m = np.zeros((0, 2), dtype=np.uint16)
                if shared is not None:
                    la = _band_pixels(row[ix], grid, iy, ix, side_a, shared)
                    lb = _band_pixels(bands_b, grid, jy, jx, side_b, shared)
                    m = match_labels(la, lb, iou_min)
                if len(m):
                    rows = np.zeros(len(m), dtype=PAIR)
                    rows["iy_a"], rows["ix_a"], rows["a"] = iy, ix, m[:, 0]
                    rows["iy_b"], rows["ix_b"], rows["b"] = jy, jx, m[:, 1]
                    pairs.append(rows)
                if jy == iy or jx == ix:  # edge neighbours share a border line
                    cb = grid.core(jy, jx)
                    if east:
                        y0, y1 = max(ca.y0, cb.y0), min(ca.y1, cb.y1)
                        edge_a, edge_b = Box(y0, y1, ca.x1 - 1, ca.x1), Box(y0, y1, cb.x0, cb.x0 + 1)
                    else:
                        x0, x1 = max(ca.x0, cb.x0), min(ca.x1, cb.x1)
                        edge_a, edge_b = Box(ca.y1 - 1, ca.y1, x0, x1), Box(cb.y0, cb.y0 + 1, x0, x1)
                    ea = _band_pixels(row[ix], grid, iy, ix, side_a, edge_a)
                    eb = _band_pixels(bands_b, grid, jy, jx, side_b, edge_b)
                    matched = {(int(a), int(b)) for a, b in m}
                    for layer_a, layer_b in zip(ea, eb):
                        ia, ib, _ = contingency(layer_a.ravel(), layer_b.ravel())
                        touching += sum((int(a), int(b)) not in matched for a, b in zip(ia, ib))
        row = below
    return (np.concatenate(pairs) if pairs else np.zeros(0, PAIR)), touching


def zoverlaps(core_a: np.ndarray, core_b: np.ndarray, iy: int, ix: int) -> np.ndarray:
    """ZOVERLAP rows between the cores of one tile position in slices z (``core_a``) and z+1 (``core_b``)."""
    out = []
    for layer_a, layer_b in zip(core_a, core_b):
        a, b, counts = contingency(layer_a, layer_b)
        if len(counts):
            rows = np.zeros(len(counts), dtype=ZOVERLAP)
            rows["iy"], rows["ix"], rows["a"], rows["b"], rows["count"] = iy, ix, a, b, counts
            out.append(rows)
    return np.concatenate(out) if out else np.zeros(0, ZOVERLAP)


# -- fragment tables ---------------------------------------------------------------------------------------------


def tile_starts(frag: np.ndarray, grid: TileGrid) -> np.ndarray:
    """Where each tile's rows begin in a slice's fragment table (rows are in raster order); one more entry at
    the end, so tile i's rows are ``starts[i]:starts[i + 1]``."""
    counts = np.bincount(frag["iy"].astype(np.int64) * grid.nx + frag["ix"], minlength=len(grid))
    return np.concatenate([[0], np.cumsum(counts)])


def fragment_rows(frag: np.ndarray, grid: TileGrid):
    """A function (iy, ix, local) -> row of the slice's fragment table (locals are dense per tile)."""
    start = tile_starts(frag, grid)

    def row(iy, ix, local):
        return start[np.asarray(iy, np.int64) * grid.nx + ix] + np.asarray(local, np.int64) - 1

    return row


def slice_instances(frag: np.ndarray, pairs: np.ndarray, grid: TileGrid) -> tuple[np.ndarray, int]:
    """2D instance index of every fragment of a slice: connected components of the match graph (in row order)."""
    n = len(frag)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    row = fragment_rows(frag, grid)
    a = row(pairs["iy_a"], pairs["ix_a"], pairs["a"])
    b = row(pairs["iy_b"], pairs["ix_b"], pairs["b"])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), count
