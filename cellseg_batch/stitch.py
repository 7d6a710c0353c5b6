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
4. Border fill: a detector often misses an object that enters its window only as a sliver. Where an object crosses
   the border between two edge neighbours and ends inside the band on the owner's side (the neighbour saw all of
   that part), and the owner has nothing there (no match, background), the owner's background pixels in the band
   take the neighbour's instance, so the object is not cut straight along the border. An object that runs on to
   the neighbour's window edge fills nothing: the owner saw more of it than the neighbour and said no. The owner's
   own pixels are never overwritten, and a detection the neighbour made only past its core (one the ownership rule
   drops) fills nothing. Where two neighbours fill the same pixel (a core's corner), the one first in raster order
   keeps it. Fill pixels count in the object table and the output, not in the z-overlaps that linking uses (those
   are counted from the cores).

What runs where: the actor that predicts a tile computes its fragment table, cuts its *bands* (the labels within
the band of each core border, ``tile_bands``) and, from the previous slice's core still in its memory, the z-overlaps.
Stitching a slice then reads only bands (``stitch_slice``); only fragment tables, match lists and border fills reach
the driver.
"""

from __future__ import annotations

from typing import NamedTuple

import cc3d
import numpy as np

from .predict.base import TileLabels
from .runs import Runs, label_runs
from .tiles import EAST, NORTH, SOUTH, WEST, Box, TileGrid, TileKey

# One row per fragment: a tile's instance, with what the merge and the object table need from its core pixels.
FRAGMENT = np.dtype(
    [
        ("iy", "<u4"), ("ix", "<u4"), ("local", "<u2"), ("cls", "<i2"), ("score", "<f4"),
        ("alt_cls", "<i2"), ("alt_score", "<f4"),  # the runner-up class of the detection (TileLabels), -1: none
        ("area", "<i8"), ("y0", "<i4"), ("x0", "<i4"), ("y1", "<i4"), ("x1", "<i4"),
        ("sy", "<f8"), ("sx", "<f8"),
    ]
)  # fmt: skip
# A match between fragments of neighbouring tiles of one slice.
PAIR = np.dtype([("iy_a", "<u4"), ("ix_a", "<u4"), ("a", "<u2"), ("iy_b", "<u4"), ("ix_b", "<u4"), ("b", "<u2")])
# Shared pixels of fragment a (slice z) and fragment b (slice z+1) at the same tile position.
ZOVERLAP = np.dtype([("iy", "<u4"), ("ix", "<u4"), ("a", "<u2"), ("b", "<u2"), ("count", "<i8")])
# A border fill (rule 4): in layer ``layer`` of the core of tile (iy, ix), the box [y0, y1) x [x0, x1) takes the
# local ids of tile (jy, jx) held at ``Fills.ids[start : start + box size]`` (row-major; 0: not filled).
FILL = np.dtype(
    [
        ("iy", "<u4"), ("ix", "<u4"), ("jy", "<u4"), ("jx", "<u4"), ("layer", "<u2"),
        ("y0", "<i4"), ("y1", "<i4"), ("x0", "<i4"), ("x1", "<i4"), ("start", "<i8"),
    ]
)  # fmt: skip


class Fills(NamedTuple):
    """A slice's border fills: FILL rows and the local ids they hold."""

    patches: np.ndarray
    ids: np.ndarray

    @classmethod
    def empty(cls) -> Fills:
        return cls(np.zeros(0, FILL), np.zeros(0, np.uint16))

    def patch(self, k: int) -> np.ndarray:
        """Patch k's ids as a 2D array over its box."""
        p = self.patches[k]
        h, w = int(p["y1"] - p["y0"]), int(p["x1"] - p["x0"])
        return self.ids[int(p["start"]) : int(p["start"]) + h * w].reshape(h, w)

    @property
    def pixels(self) -> int:
        return int(np.count_nonzero(self.ids))

    def fragments(self) -> np.ndarray:
        """FRAGMENT rows of the filled pixels, keyed by the tile that lent them (iy, ix, local: the source), with
        their area, coordinate sums and boxes in slice coordinates (class and score are the source's)."""
        out = []
        for k, p in enumerate(self.patches):
            ids = self.patch(k)
            stats = _layer_statistics(ids, int(ids.max(initial=0)))
            if stats is None:
                continue
            here, area, sy, sx, y0, y1, x0, x1 = stats
            rows = np.zeros(len(here), dtype=FRAGMENT)
            rows["iy"], rows["ix"], rows["local"] = p["jy"], p["jx"], here + 1
            rows["area"] = area
            rows["sy"], rows["sx"] = sy + p["y0"] * area, sx + p["x0"] * area
            rows["y0"], rows["y1"] = y0 + p["y0"], y1 + p["y0"]
            rows["x0"], rows["x1"] = x0 + p["x0"], x1 + p["x0"]
            out.append(rows)
        return np.concatenate(out) if out else np.zeros(0, FRAGMENT)


class SliceStitch(NamedTuple):
    """What stitching a slice gives: matches (PAIR rows), the count of same-class fragment pairs touching across a
    core border without a match, and the border fills."""

    pairs: np.ndarray
    touching_unmatched: int
    fills: Fills


def fragment_table(key: TileKey, tile: TileLabels, grid: TileGrid, runs: list | None = None) -> np.ndarray:
    """One FRAGMENT row per local id of the tile: class, score and the statistics of its core pixels (``runs``:
    each layer's runs of the core, or None, where the caller has them; see ``_layer_statistics``)."""
    window, core = grid.window(key.iy, key.ix), grid.core(key.iy, key.ix)
    ys, xs = core.relative_to(window)
    n = tile.count
    rows = np.zeros(n, dtype=FRAGMENT)
    rows["iy"], rows["ix"] = key.iy, key.ix
    rows["local"] = np.arange(1, n + 1)
    rows["cls"], rows["score"] = tile.classes, tile.scores
    rows["alt_cls"] = -1 if tile.alt_classes is None else tile.alt_classes
    if tile.alt_scores is not None:
        rows["alt_score"] = tile.alt_scores
    if n == 0:
        return rows
    for k, layer in enumerate(tile.labels):
        stats = _layer_statistics(layer[ys, xs], n, runs[k] if runs else None)
        if stats is None:
            continue
        here, area, sy, sx, y0, y1, x0, x1 = stats  # ids are unique across layers: each id's pixels are all here
        rows["area"][here] = area
        rows["sy"][here], rows["sx"][here] = sy + core.y0 * area, sx + core.x0 * area
        rows["y0"][here], rows["y1"][here] = y0 + core.y0, y1 + core.y0
        rows["x0"][here], rows["x1"][here] = x0 + core.x0, x1 + core.x0
    return rows


SPARSE_SHARE = 8  # a label layer with at most 1/8 of its pixels labelled is relabelled through those pixels alone
def _layer_statistics(ids: np.ndarray, n: int, runs: Runs | None = None):
    """For the ids 1..n present in a 2D label image: (row indices id-1, pixel counts, sums of y and of x, bounding
    boxes y0, y1, x0, x1), in the image's coordinates; None where it is empty. Counted per run of one id
    (``label_runs``: 3.4 -> 0.34 ms on a 1024² cell layer, against ``cc3d.statistics``, which a noise-like image
    with short runs still takes). ``runs``: the image's, where the caller has them; they may be of a larger image
    that holds ``ids`` at its origin, padded with zeros (a tile core in its store slot)."""
    runs = runs or label_runs(ids)
    if runs is None:
        return _pixel_statistics(ids, n)
    starts, length, (v,), (h, w) = runs
    labelled = v != 0
    if not labelled.any():
        return None
    starts, length, v = starts[labelled], length[labelled], v[labelled].astype(np.intp)
    y, x0 = np.divmod(starts, w)
    area = np.bincount(v, weights=length, minlength=n + 1)
    here = np.flatnonzero(area[1:])
    sy = np.bincount(v, weights=y * length, minlength=n + 1)[here + 1]
    sx = np.bincount(v, weights=length * x0 + length * (length - 1) // 2, minlength=n + 1)[here + 1]
    bounds = []
    for coord, reduce, start in ((y, np.minimum, h), (y + 1, np.maximum, 0), (x0, np.minimum, w),
                                 (x0 + length, np.maximum, 0)):  # fmt: skip
        out = np.full(n + 1, start, dtype=np.int64)
        reduce.at(out, v, coord)
        bounds.append(out[here + 1])
    return here, area[here + 1].astype(np.int64), sy, sx, *bounds


def _pixel_statistics(ids: np.ndarray, n: int):
    """``_layer_statistics`` in one pass of ``cc3d.statistics`` over every pixel."""
    if ids.size <= (top := int(ids.max(initial=0))):  # cc3d takes ids below the pixel count: pad with background rows
        ids = np.pad(ids, ((0, top // max(1, ids.shape[1]) + 1), (0, 0)))
    stats = cc3d.statistics(np.ascontiguousarray(ids))
    area = stats["voxel_counts"][1 : n + 1]
    here = np.flatnonzero(area > 0)
    if len(here) == 0:
        return None
    a = area[here].astype(np.int64)
    centroids = stats["centroids"][here + 1]
    boxes = np.array([[b[0].start, b[0].stop, b[1].start, b[1].stop] for b in
                      (stats["bounding_boxes"][i + 1] for i in here)], dtype=np.int64).reshape(-1, 4)  # fmt: skip
    return here, a, centroids[:, 0] * a, centroids[:, 1] * a, *boxes.T


def contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of nonzero uint16 ids at the same pixels of ``a`` and ``b``, and how many pixels each pair shares.
    Pairs come sorted by (a, b). Counted per run of one pair (``label_runs``) where runs are long, else per pixel."""
    runs = label_runs(a, b)
    if runs is None:
        return _pair_counts(a.reshape(-1), b.reshape(-1), None)
    return _pair_counts(*runs.values, runs.lengths)


def _pair_counts(av: np.ndarray, bv: np.ndarray, weights: np.ndarray | None):
    """``contingency`` of values ``av``, ``bv`` with ``weights`` pixels each (None: one)."""
    both = (av > 0) & (bv > 0)
    av, bv = av[both].astype(np.int64), bv[both].astype(np.int64)
    weights = weights[both] if weights is not None else None
    if len(av) == 0:
        return np.zeros(0, np.uint16), np.zeros(0, np.uint16), np.zeros(0, np.int64)
    nb = int(bv.max()) + 1
    key = av * nb + bv
    if (int(av.max()) + 1) * nb <= 4 * len(key) + 65536:  # a dense count is cheaper than sorting
        counts = np.bincount(key, weights=weights)
        pairs = np.flatnonzero(counts)
        counts = counts[pairs]
    elif weights is None:
        pairs, counts = np.unique(key, return_counts=True)
    else:
        pairs, inverse = np.unique(key, return_inverse=True)
        counts = np.bincount(inverse, weights=weights)
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
        ua, ra = np.unique(ia, return_inverse=True)
        ub, rb = np.unique(ib, return_inverse=True)
        if iou_min <= 0.5 and (len(ua) < len(ia) or len(ub) < len(ib)):
            # at IoU 0.5 and below one instance can pass with two others: keep the best one-to-one assignment. Only
            # there: where the pairs are one-to-one already it would keep them all (and scipy's import is ~0.3 s of
            # each worker's CPU)
            from scipy.optimize import linear_sum_assignment

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


def stitch_slice(band_row, grid: TileGrid, iou_min: float, fill: bool = True) -> SliceStitch:
    """Matches (PAIR rows) between all neighbouring tiles of a slice, the count of same-class fragment pairs that
    touch across a core border without matching (possible splits; reported, never merged), and the border fills
    (rule 4; none where ``fill`` is False). Reads the slice's bands one tile row at a time: ``band_row(iy)`` ->
    (NX, 4, classes, 2h, tile), ``tile_bands`` of each tile."""
    pairs, touching, fills = [], 0, []
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
                    if fill and shared is not None:
                        fills += _border_fills(la, lb, shared, (iy, ix, ca), (jy, jx, cb), m)
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
    return SliceStitch(np.concatenate(pairs) if pairs else np.zeros(0, PAIR), touching, _resolve_fills(fills))


def _border_fills(la: np.ndarray, lb: np.ndarray, shared: Box, a: tuple[int, int, Box], b: tuple[int, int, Box],
                  matches: np.ndarray) -> list[tuple]:  # fmt: skip
    """Rule 4 between edge neighbours a and b (iy, ix, core) over the band region both saw (``la``, ``lb``: their
    labels there; ``matches``: their (a, b) matches): (owner iy, ix, layer, source jy, jx, box, ids) for each
    layer and direction with a fill."""
    out = []
    for own, other, (oy, ox, own_core), (sy, sx, other_core), matched in ((la, lb, a, b, matches[:, 1]),
                                                                          (lb, la, b, a, matches[:, 0])):  # fmt: skip
        part, theirs = shared.intersect(own_core), shared.intersect(other_core)
        if part is None or theirs is None:
            continue
        ps, ts = part.relative_to(shared), theirs.relative_to(shared)
        # the band's far edge on the owner's side: the edge of the neighbour's window, or as far as the band reaches
        far = ((slice(None), slice(0, 1)) if part.x1 <= theirs.x0 else (slice(None), slice(-1, None)) if
               part.x0 >= theirs.x1 else (slice(0, 1), slice(None)) if part.y1 <= theirs.y0 else
               (slice(-1, None), slice(None)))  # fmt: skip
        for layer in range(own.shape[0]):
            candidate = np.where(own[layer][ps] == 0, other[layer][ps], 0)
            if not candidate.any():
                continue
            # source ids with pixels on their own side of the border, unmatched, and ending before the far edge
            # (the neighbour saw where they end)
            allowed = np.setdiff1d(np.unique(other[layer][ts]), [0, *matched.tolist(), *np.unique(other[layer][ps][far])])
            if len(allowed) == 0:
                continue
            ids = np.where(np.isin(candidate, allowed), candidate, 0).astype(np.uint16)
            if ids.any():
                out.append((oy, ox, layer, sy, sx, part, ids))
    return out


def _resolve_fills(fills: list[tuple]) -> Fills:
    """One Fills of a slice, each pixel filled once: the patches of one owner and layer meet only in a core's
    corner, where the source first in raster order keeps it."""
    fills.sort(key=lambda f: f[:5])
    start, rows, chunks = 0, [], []
    for k, (oy, ox, layer, sy, sx, box, ids) in enumerate(fills):
        for prev in fills[max(0, k - 3) : k]:  # at most 4 neighbours fill one core's layer
            if prev[:3] == (oy, ox, layer) and (both := box.intersect(prev[5])) is not None:
                ids[both.relative_to(box)][prev[6][both.relative_to(prev[5])] > 0] = 0
        if ids.any():
            rows.append((oy, ox, sy, sx, layer, box.y0, box.y1, box.x0, box.x1, start))
            chunks.append(ids.ravel())
            start += ids.size
    if not rows:
        return Fills.empty()
    return Fills(np.array(rows, dtype=FILL), np.concatenate(chunks))


def zoverlaps(core_a: np.ndarray, core_b: np.ndarray, iy: int, ix: int, runs_a=None, runs_b=None) -> np.ndarray:
    """ZOVERLAP rows between the cores of one tile position in slices z (``core_a``) and z+1 (``core_b``).
    ``runs_a``, ``runs_b``: each layer's runs (``label_runs``, or None) where the caller has them: a layer whose
    runs both sides have is counted from them alone (their joint runs), without a pass over its pixels; a core may
    be None where every layer's runs are given on both sides."""
    out = []
    for k in range(len(core_a) if core_a is not None else len(runs_a)):
        ra, rb = (runs_a[k] if runs_a else None), (runs_b[k] if runs_b else None)
        if ra is not None and rb is not None:
            joint = ra.joint(rb)
            a, b, counts = _pair_counts(*joint.values, joint.lengths)
        else:
            a, b, counts = contingency(core_a[k], core_b[k])
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
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(frag)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    row = fragment_rows(frag, grid)
    a = row(pairs["iy_a"], pairs["ix_a"], pairs["a"])
    b = row(pairs["iy_b"], pairs["ix_b"], pairs["b"])
    graph = coo_matrix((np.ones(len(a), dtype=np.int8), (a, b)), shape=(n, n))
    count, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64), count
