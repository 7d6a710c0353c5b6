"""Stitch: within a slice, merge the instances of overlapping tiles into 2D instances.

The rule, deterministic and class-aware:
1. Ownership: each pixel takes its label from the tile whose core holds it (see ``tiles``); a tile's instance
   restricted to that tile's core is a *fragment*.
2. Matching: two instances of the same class from neighbouring tiles (8-neighbourhood) are the same object when,
   inside the region both windows saw, their masks have IoU >= ``stitch_iou`` (default 0.5); each instance matches
   at most one instance of each neighbour (Hungarian on IoU, needed only below 0.5, where it stays one-to-one).
3. Union: fragments joined by matches form one 2D instance (connected components), so an object cut by tile
   borders, or seen whole by several tiles, or larger than a tile, comes out once.

Only fragment tables (per-instance numbers) and match lists travel to the driver; pixels stay on the workers.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .predict.base import TileLabels
from .store import FRAGMENT
from .tiles import Box, TileGrid, TileKey

PAIR = np.dtype([("iy_a", "<u4"), ("ix_a", "<u4"), ("a", "<u2"), ("iy_b", "<u4"), ("ix_b", "<u4"), ("b", "<u2")])
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
    width = core.x1 - core.x0
    for layer in tile.labels:
        ids = layer[ys, xs]
        flat = ids.ravel()
        where = np.flatnonzero(flat)  # work on foreground pixels only: organelle layers are mostly empty
        if len(where) == 0:
            continue
        v = flat[where]
        area = np.bincount(v, minlength=n + 1)[1:]
        sy = np.bincount(v, weights=where // width + core.y0, minlength=n + 1)[1:]
        sx = np.bincount(v, weights=where % width + core.x0, minlength=n + 1)[1:]
        here = area > 0  # ids are unique across layers: each id's pixels are all in one layer
        rows["area"][here], rows["sy"][here], rows["sx"][here] = area[here], sy[here], sx[here]
        for i, sl in enumerate(ndimage.find_objects(ids, max_label=n)):
            if sl is not None:
                rows[i]["y0"], rows[i]["y1"] = sl[0].start + core.y0, sl[0].stop + core.y0
                rows[i]["x0"], rows[i]["x1"] = sl[1].start + core.x0, sl[1].stop + core.x0
    return rows


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of nonzero uint16 ids that share pixels, and how many."""
    both = (a > 0) & (b > 0)
    key = (a[both].astype(np.uint32) << 16) | b[both].astype(np.uint32)
    pairs, counts = np.unique(key, return_counts=True)
    return (pairs >> 16).astype(np.uint16), (pairs & 0xFFFF).astype(np.uint16), counts


def match_tiles(la: np.ndarray, wa: Box, lb: np.ndarray, wb: Box, iou_min: float) -> np.ndarray:
    """Matches (a, b) of local ids between two neighbouring tiles' label layers, per the stitching rule."""
    shared = wa.intersect(wb)
    if shared is None:
        return np.zeros((0, 2), dtype=np.uint16)
    sa, sb = shared.relative_to(wa), shared.relative_to(wb)
    matches = []
    for layer_a, layer_b in zip(la, lb):
        a, b = layer_a[sa], layer_b[sb]
        ia, ib, inter = _contingency(a, b)
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


def touching_unmatched(la: np.ndarray, ca: Box, wa: Box, lb: np.ndarray, cb: Box, wb: Box, matched: set) -> int:
    """Same-class fragment pairs that touch across the core border of two edge neighbours without matching:
    candidates for an object split at a tile border (reported in the run report, never merged)."""
    if ca.x1 == cb.x0:  # b east of a
        y0, y1 = max(ca.y0, cb.y0), min(ca.y1, cb.y1)
        edge_a, edge_b = Box(y0, y1, ca.x1 - 1, ca.x1), Box(y0, y1, cb.x0, cb.x0 + 1)
    else:  # b south of a
        x0, x1 = max(ca.x0, cb.x0), min(ca.x1, cb.x1)
        edge_a, edge_b = Box(ca.y1 - 1, ca.y1, x0, x1), Box(cb.y0, cb.y0 + 1, x0, x1)
    count = 0
    for layer_a, layer_b in zip(la, lb):
        ia, ib, _ = _contingency(layer_a[edge_a.relative_to(wa)].ravel(), layer_b[edge_b.relative_to(wb)].ravel())
        count += sum((int(x), int(y)) not in matched for x, y in zip(ia, ib))
    return count


def stitch_row(tiles, grid: TileGrid, z: int, iy: int, next_slice: bool, iou_min: float) -> dict:
    """Matches between tile row ``iy`` of slice z and its later neighbours, and the fragment overlaps between
    that row's cores in slices z and z+1 (when ``next_slice``). Runs on a worker; reads tiles as it goes."""
    cache: dict[tuple[int, int, int], np.ndarray] = {}

    def get(zz: int, jy: int, jx: int) -> np.ndarray:
        k = (zz, jy, jx)
        if k not in cache:
            w = grid.window(jy, jx)
            cache[k] = np.asarray(tiles[zz, jy, jx])[:, : w.y1 - w.y0, : w.x1 - w.x0]
        return cache[k]

    pairs, overlaps, touching = [], [], 0
    for ix in range(grid.nx):
        wa, ca = grid.window(iy, ix), grid.core(iy, ix)
        la = get(z, iy, ix)
        for jy, jx in grid.neighbours_after(iy, ix):
            wb = grid.window(jy, jx)
            lb = get(z, jy, jx)
            m = match_tiles(la, wa, lb, wb, iou_min)
            if len(m):
                rows = np.zeros(len(m), dtype=PAIR)
                rows["iy_a"], rows["ix_a"], rows["a"] = iy, ix, m[:, 0]
                rows["iy_b"], rows["ix_b"], rows["b"] = jy, jx, m[:, 1]
                pairs.append(rows)
            if jy == iy or jx == ix:
                touching += touching_unmatched(la, ca, wa, lb, grid.core(jy, jx), wb, {tuple(p) for p in m.tolist()})
        if next_slice:
            ys, xs = ca.relative_to(wa)
            lz = get(z + 1, iy, ix)
            for layer_a, layer_b in zip(la, lz):
                a_ids, b_ids, counts = _contingency(layer_a[ys, xs], layer_b[ys, xs])
                if len(counts):
                    rows = np.zeros(len(counts), dtype=ZOVERLAP)
                    rows["iy"], rows["ix"], rows["a"], rows["b"], rows["count"] = iy, ix, a_ids, b_ids, counts
                    overlaps.append(rows)
        for k in [k for k in cache if k[2] < ix]:  # columns left behind are never needed again
            del cache[k]
    return {
        "pairs": np.concatenate(pairs) if pairs else np.zeros(0, PAIR),
        "overlaps": np.concatenate(overlaps) if overlaps else np.zeros(0, ZOVERLAP),
        "touching_unmatched": touching,
    }


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
