"""Link: join the 2D instances of adjacent slices into 3D objects, number them, and build the object table.

The rule, class-aware (overlaps are counted within each class's own label layer, so an organelle never links to
its cell), applied to every pair of adjacent slices z, z+1:
1. One-to-one: 2D instances pair up by maximum total IoU (Hungarian) among pairs with IoU >= ``link_iou``
   (default 0.25). Each instance continues at most one instance of the other slice, so two objects side by side
   never share a label (the failure of greedy IoU linking).
2. Heal: an instance left unpaired whose overlap with one instance of the other slice covers at least
   ``link_ioa`` (default 0.5) of its own area joins that instance. This keeps an object whole where its section
   shrinks or grows fast (caps, tapering ends) and where a tube branches or two branches join.
3. Objects are the connected components of these links; ids are 1..N in order of first appearance (z, then tile
   raster order), so equal inputs give equal ids. An object with no owned pixel is dropped.

``link="none"`` skips 1-2: every 2D instance is its own object (data with too few slices or too thick sections to
link, or per-slice evaluation).

Everything here streams slice by slice from the work store; memory grows with the number of 2D instances, not
with the volume's voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .stitch import fragment_rows, slice_instances
from .tiles import TileGrid

OBJECT = np.dtype(
    [
        ("id", "<u8"), ("cls", "<i2"), ("score", "<f8"), ("voxels", "<i8"),
        ("z0", "<i8"), ("y0", "<i8"), ("x0", "<i8"), ("z1", "<i8"), ("y1", "<i8"), ("x1", "<i8"),
        ("cz", "<f8"), ("cy", "<f8"), ("cx", "<f8"),
    ]
)  # fmt: skip


@dataclass
class LinkStats:
    fragments: int = 0
    instances_2d: int = 0
    stitch_matches: int = 0
    links: int = 0
    heal_links: int = 0
    objects: int = 0
    max_tiles_per_instance: int = 0
    instances_over_4_tiles: int = 0
    per_class: dict = field(default_factory=dict)


def link_pair(
    cls_a: np.ndarray, area_a: np.ndarray, cls_b: np.ndarray, area_b: np.ndarray,
    ia: np.ndarray, ib: np.ndarray, inter: np.ndarray, iou_min: float, ioa_min: float,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """Links (k, 2) between 2D instances of two adjacent slices, and how many came from the heal step.

    ``ia``/``ib``/``inter``: overlapping instance pairs (same class) and their shared pixel counts."""
    if len(inter) == 0:
        return np.zeros((0, 2), dtype=np.int64), 0
    same = cls_a[ia] == cls_b[ib]
    ia, ib, inter = ia[same], ib[same], inter[same].astype(np.float64)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    cand = np.flatnonzero(iou >= iou_min)
    links = [_assign(ia[cand], ib[cand], iou[cand])]
    matched_a = np.zeros(len(area_a), bool)
    matched_b = np.zeros(len(area_b), bool)
    matched_a[links[0][:, 0]] = True
    matched_b[links[0][:, 1]] = True
    heal = 0
    for own, other, area, matched, flip in ((ia, ib, area_a, matched_a, False), (ib, ia, area_b, matched_b, True)):
        ioa = inter / area[own]
        ok = (ioa >= ioa_min) & ~matched[own]
        if not ok.any():
            continue
        # the partner covering most of an unpaired instance (ties: lowest partner index)
        order = np.lexsort((other[ok], -ioa[ok], own[ok]))
        o, p = own[ok][order], other[ok][order]
        first = np.concatenate([[True], o[1:] != o[:-1]])
        pair = np.stack([p[first], o[first]] if flip else [o[first], p[first]], axis=1)
        links.append(pair)
        heal += len(pair)
    return np.concatenate(links), heal


def _assign(ia: np.ndarray, ib: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Maximum-IoU one-to-one matching, solved per connected component of the candidate graph (scales to many)."""
    if len(iou) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    ua, ra = np.unique(ia, return_inverse=True)
    ub, rb = np.unique(ib, return_inverse=True)
    n = len(ua) + len(ub)
    graph = coo_matrix((np.ones(len(ra)), (ra, rb + len(ua))), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    edge_comp = comp[ra]
    out = []
    simple = np.bincount(edge_comp)[edge_comp] == 1  # a component with one candidate pair: nothing to decide
    out.append(np.stack([ua[ra[simple]], ub[rb[simple]]], axis=1))
    rest = np.flatnonzero(~simple)
    for group in np.split(rest[np.argsort(edge_comp[rest], kind="stable")],
                          np.flatnonzero(np.diff(np.sort(edge_comp[rest]))) + 1):  # fmt: skip
        if len(group) == 0:
            continue
        ga, gra = np.unique(ra[group], return_inverse=True)
        gb, grb = np.unique(rb[group], return_inverse=True)
        cost = np.zeros((len(ga), len(gb)))
        cost[gra, grb] = -iou[group]
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < 0
        out.append(np.stack([ua[ga[rows[keep]]], ub[gb[cols[keep]]]], axis=1))
    return np.concatenate(out).astype(np.int64)


def _aggregate(keys_a: np.ndarray, keys_b: np.ndarray, counts: np.ndarray):
    """Sum counts over equal (a, b) pairs."""
    if len(counts) == 0:
        return keys_a[:0], keys_b[:0], counts[:0]
    pairs = np.stack([keys_a, keys_b], axis=1)
    uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
    return uniq[:, 0], uniq[:, 1], np.bincount(inverse.ravel(), weights=counts).astype(np.int64)


def build_objects(store, grid: TileGrid, n_slices: int, n_classes: int, link: str,
                  iou_min: float, ioa_min: float, progress=None) -> tuple[np.ndarray, LinkStats]:  # fmt: skip
    """Stream the slices of the work store (``run.store.WorkStore``): 2D instances, links, 3D components; write
    each slice's fragment -> object id table (``lut_path``) and return the object table."""

    stats = LinkStats()
    bases, areas, classes, link_edges = [0], [], [], []
    prev = None
    for z in range(n_slices):
        frag = store.fragments(z)
        edges = store.edges(z)
        inst, n = slice_instances(frag, edges["pairs"], grid)
        area = np.bincount(inst, weights=frag["area"], minlength=n).astype(np.int64)
        cls = np.zeros(n, dtype=np.int16)
        cls[inst] = frag["cls"]
        tiles_per = np.bincount(inst[frag["area"] > 0], minlength=n)
        stats.fragments += len(frag)
        stats.instances_2d += int((area > 0).sum())
        stats.stitch_matches += len(edges["pairs"])
        stats.max_tiles_per_instance = max(stats.max_tiles_per_instance, int(tiles_per.max(initial=0)))
        stats.instances_over_4_tiles += int((tiles_per > 4).sum())
        store.write_instances(z, inst)
        if prev is not None and link != "none":
            p_frag, p_inst, p_edges = prev
            ov = p_edges["overlaps"]
            row_a, row_b = fragment_rows(p_frag, grid), fragment_rows(frag, grid)
            ia = p_inst[row_a(ov["iy"], ov["ix"], ov["a"])]
            ib = inst[row_b(ov["iy"], ov["ix"], ov["b"])]
            ia, ib, inter = _aggregate(ia, ib, ov["count"])
            pairs, heal = link_pair(classes[-1], areas[-1], cls, area, ia, ib, inter, iou_min, ioa_min)
            link_edges.append(pairs + np.array([bases[-2], bases[-1]]))
            stats.links += len(pairs)
            stats.heal_links += heal
        prev = (frag, inst, edges)
        areas.append(area)
        classes.append(cls)
        bases.append(bases[-1] + n)
        if progress:
            progress.update(1)
    total = bases[-1]
    area_all = np.concatenate(areas) if areas else np.zeros(0, np.int64)
    edges_all = np.concatenate(link_edges) if link_edges else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges_all), np.int8), (edges_all[:, 0], edges_all[:, 1])), shape=(total, total))
    _, comp = connected_components(graph, directed=False)
    voxels = np.bincount(comp, weights=area_all).astype(np.int64) if total else np.zeros(0, np.int64)
    kept = voxels > 0
    object_id = np.zeros(len(voxels), dtype=np.uint64)
    object_id[kept] = np.arange(1, kept.sum() + 1, dtype=np.uint64)
    table = _object_table(store, grid, n_slices, bases, comp, object_id, n_classes)
    stats.objects = len(table)
    for c in range(n_classes):
        stats.per_class[c] = int((table["cls"] == c).sum())
    return table, stats


def _object_table(store, grid, n_slices, bases, comp, object_id, n_classes) -> np.ndarray:

    n_obj = int(object_id.max(initial=0))
    t = np.zeros(n_obj + 1, dtype=OBJECT)
    big = np.iinfo(np.int64).max
    for name in ("z0", "y0", "x0"):
        t[name] = big
    weighted_score = np.zeros(n_obj + 1)
    sz = np.zeros(n_obj + 1)
    for z in range(n_slices):
        frag = store.fragments(z)
        inst = store.instances(z)
        obj = object_id[comp[bases[z] + inst]] if len(inst) else np.zeros(0, np.uint64)
        store.write_lut(z, obj)
        own = (frag["area"] > 0) & (obj > 0)
        o, f = obj[own].astype(np.int64), frag[own]
        a = f["area"].astype(np.float64)
        t["cls"][o] = f["cls"]
        np.add.at(t["voxels"], o, f["area"])
        np.add.at(weighted_score, o, f["score"] * a)
        np.add.at(sz, o, z * a)
        np.add.at(t["cy"], o, f["sy"])
        np.add.at(t["cx"], o, f["sx"])
        np.minimum.at(t["z0"], o, z)
        np.maximum.at(t["z1"], o, z + 1)
        for lo, hi in (("y0", "y1"), ("x0", "x1")):
            np.minimum.at(t[lo], o, f[lo])
            np.maximum.at(t[hi], o, f[hi])
    t = t[1:]
    t["id"] = np.arange(1, n_obj + 1, dtype=np.uint64)
    v = np.maximum(t["voxels"], 1).astype(np.float64)
    t["score"] = weighted_score[1:] / v
    t["cz"], t["cy"], t["cx"] = sz[1:] / v, t["cy"] / v, t["cx"] / v
    return t
