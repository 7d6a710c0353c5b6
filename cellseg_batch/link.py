"""Link: join the 2D instances of the slices into 3D objects, number them, and build the object table.

Linking is a graph. Its nodes are the 2D instances; its edges are decided pair of slices by pair of slices and
resolved per connected component of the candidate graph between the two slices (small, independent problems).
Everything is class-aware: overlaps are counted within each class's own label layer, so an organelle never links
to its cell, and only instances of one class are candidates. Classes that exclude one another (``Plan.layer_of``:
mitochondria and alpha granules never share a pixel; ``train`` finds such groups in the annotations, ``--exclusive``
sets them) share one layer, and their instances are candidates to one another: a detection whose class flips
between slices stays one object. For two slices a, b (adjacent, or across a gap):

1. Continue (one-to-one): instances pair up by maximum total IoU (Hungarian, ``scipy.optimize.
   linear_sum_assignment``) among pairs with IoU >= ``link_iou`` (default 0.25). Two touching neighbours that each
   keep their own partner stay apart, however much they overlap each other's partner.
2. Branch / merge: an instance left without a partner joins the instance of the other slice that covers the
   largest share of it (IoA = overlap / own area), if that share is >= ``link_ioa`` (default 0.5) or if the two
   could have continued one another (IoU >= ``link_iou``; the partner went to a better pair). One instance
   overlapping two in the next slice, each mostly inside it or each a fair continuation of it (a Y-shaped
   mitochondrion or vessel, a cap that shrinks fast), becomes one object.
3. Gap (``link_gap``, per class, default 2, 0 to 3): an instance of slice z with no edge to z+1 (a missed detection in z+1,
   or the object's end) and an instance of z+2 with no edge from z+1 (a missed detection, or a start) are *free*
   between z and z+2: rules 1-2 run again between these slices, the Hungarian on free pairs only, and a free
   instance left unpaired may join any instance it lies mostly inside. Then z and z+3, and so on up to
   z+1+link_gap, nearer slices first. Drift: a free instance with a partner on its other side (z-1, or the one
   after the far slice) has a step from its centroid to its partners' (area-weighted; none if longer than its
   radius); a pair's overlap is the larger of where the two lie and where the free one lies moved on by its drift
   over the gap (``gap_overlaps``: MOVED rows). One or two missed 2D instances in a row no longer cut an object in
   two, a missed section at a branch point or of an oblique arm just before it joins its sibling included. The
   default is 2 because at a 5 % miss rate two misses in a row are common enough in long objects to cost F1
   (``benchmarks/REPORT.md``, linking). The price: two distinct objects of a class stacked in z with one or two
   empty slices between them, aligned (IoU >= ``link_iou``, where the first's drift carries it), become one.
   Where a class can be stacked like that (the synthetic generator's cells: stacked boxes leave one empty slice),
   set its gap to 0, e.g. ``--link-gap cell=0,2``.
Two faults of real stacks are handled between rules 1-2 and the gap edges:

- Misaligned sections (registration errors): where the steps between the centroids of same-sized instances of two
  adjacent slices pile up on one translation of 3 px or more (``_slice_shift``), the pair's overlaps are counted
  again with the second slice moved back by it, from the tile cores, and rules 1-2 run on those for each class
  where more of the first slice's area of that class then continues one-to-one (``_registered_links``; per class,
  as cells still pair across a shift that cuts every mitochondrion). A section moved by 5-20 px otherwise cuts
  every small object in two and leaves its own instances as one-slice objects. Gap edges are realigned alike: the
  gap unit frees instances from the realigned adjacent edges, votes between the two slices of each gap directly, and
  where a step stands counts the free instances' overlaps moved by it (``gap_overlaps``, MOVED sides 2 and 3).
- Crossings (2D merges): an instance that two or more instances of the slice before and two or more of the slice
  after link to (rules 1-2, before any cut) is two objects that meet in one section and part at once, what a
  missed boundary between touching objects looks like (``_crossings``). Its edges are cut on both sides; it joins
  the largest instance below it as a leaf, and the instances it held are free for gap edges across it. Otherwise
  one missed boundary merges two objects over their whole length. A branch (one below, two above) or a join is
  none; a network that crosses itself in one section (canalicular vessels can) is cut there, and a 2D merge over
  two or more sections in a row is still a merge. A speck (``SPECK_PIXELS``, 4 px or fewer) linked on each
  side to more than a speck is cut alike: rule 2 lets it join whatever it lies in, so one stray pixel between two
  objects stacked in z joined them. A speck that starts or ends an object (a cap) keeps its edge, as do the specks
  of an object thin in every section (linked to specks).

4. Objects are the connected components of all edges (``scipy.sparse.csgraph.connected_components``). An object
   takes the class of most of its voxels (ties: the lower class index), where a detection the model also gave
   under another class (a dropped duplicate, ``TileLabels.alt_classes``) shares its voxels with that class by
   score; its pixels of other classes move to it.
   Clean-up (optional, per class): objects with fewer than ``min_voxels`` voxels or spanning fewer than
   ``min_slices`` slices are dropped (their pixels become background; the run report counts them). An object in
   the run's first or last slice is never dropped for its slices: the volume's end cut it. ``min_slices`` auto
   lets the class's own objects decide: where those inside the run (in neither end slice) that span two or more
   slices are ``AUTO_MIN_OBJECTS`` or more and span ``AUTO_TYPICAL_SLICES`` or more at the median, an object there in
   one slice alone (no partner above, below or across a gap) is not what the class looks like at this z spacing:
   a false detection; it is dropped. Elsewhere (a thin class, thick sections, too few objects to tell) nothing is.
   Ids are 1..N in the order of the objects' boxes (first slice, top, left; ``_object_table``): equal objects give
   equal ids, whatever the tile grid.

Scores break ties only (equal IoU, equal IoA: the higher-scored partner, then the lower index), so the result
never depends on the order of the input.

``link="none"`` skips 1-3: every 2D instance is its own object (data with too few slices or too thick sections to
link, or per-slice evaluation).

Memory and cost. Everything streams slice by slice from the work store: adjacent slices' overlaps were counted
by the actors (``edges(z)["overlaps"]``), so the driver holds the fragment tables of link_gap + 2 slices and one int per
2D instance. Gap edges need the overlaps of z and z+2 (z+3, ...), which nobody counted. The gap stage counts them
(``gap_overlaps``, one unit per slice, off the driver, as soon as the slices it needs are stitched): only at the tile
positions that hold a fragment of an instance without an adjacent partner in one slice and any fragment of the other,
from the two tile cores (``cores.zarr``, tile-local ids), with the same ``stitch.zoverlaps`` as the actors use;
and, for each free instance its drift moves by a pixel or more, in the box around it moved, from the cores that box
meets (a few cores are kept while neighbouring boxes are read). That is not a small share of the tiles where objects
are dense: on a synthetic platelet volume (24 x 1024 x 1024, 256 px tiles) 522 of 600 tile positions were needed,
about 3 ms each. Counted on the driver (as before the gap stage, and still where it did not run: the same unit, run
by the driver) the link stage took 1.6 s instead of 0.08 s there (``benchmarks/REPORT.md``). The run report has the
positions used (``gap_positions``) and any the driver read itself (``gap_tiles_read``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np

from .config import AUTO
from .read import SPECK_PIXELS
from .stitch import ZOVERLAP, fragment_rows, slice_instances, zoverlaps
from .tiles import Box, TileGrid

OBJECT = np.dtype(
    [
        ("id", "<u8"), ("cls", "<i2"), ("score", "<f8"), ("voxels", "<i8"),
        ("z0", "<i8"), ("y0", "<i8"), ("x0", "<i8"), ("z1", "<i8"), ("y1", "<i8"), ("x1", "<i8"),
        ("cz", "<f8"), ("cy", "<f8"), ("cx", "<f8"),
    ]
)  # fmt: skip


# Shared pixels of 2D instance a (slice z) and b (slice z + d) with one of them moved along its drift (``side``: 0
# a moved forward, 1 b moved back; 2, 3: the same with the translation between the two sections undone too, where
# ``_slice_shift`` finds one: the pair's plain z-overlaps are then left out); indices as ``_load_slice`` numbers a
# slice's instances.
MOVED = np.dtype([("a", "<i8"), ("b", "<i8"), ("count", "<i8"), ("side", "<i1")])


@dataclass
class LinkStats:
    fragments: int = 0
    instances_2d: int = 0
    stitch_matches: int = 0
    fill_pixels: int = 0  # border fills (stitch rule 4): core pixels a neighbouring tile's instance filled
    links: int = 0
    heal_links: int = 0
    gap_links: int = 0
    gap_positions: int = 0  # tile positions whose overlaps gap edges used (counted by the gap stage, or here)
    gap_tiles_read: int = 0  # of those, the ones whose cores the driver read (the gap stage did not run)
    gap_cores_read: int = 0  # tile cores read back to count gap overlaps (where no actor counted them)
    gap_seconds: float = 0.0
    crossings: int = 0  # 2D instances two objects crossed (a 2D merge): cut out of both (``_crossings``)
    speck_bridges: int = 0  # of those, specks between two objects (``_crossings``)
    shifted_pairs: int = 0  # pairs of adjacent slices linked with the second moved by its misalignment
    gap_pairs_realigned: int = 0  # pairs of slices across a gap whose overlaps were counted with their shift undone
    # slices most of whose 2D instances pair with nothing in either neighbouring slice: a section moved beyond
    # SHIFT_REACH or rotated (its instances become one-slice objects, which --min-slices drops)
    unpaired_slices: list = field(default_factory=list)
    # slices without any 2D instance between slices with many: a blank or lost section (black fill, NaN, a failed
    # acquisition); gap edges bridge it where --link-gap allows, and a class with gap 0 is cut there
    blank_slices: list = field(default_factory=list)
    objects: int = 0
    max_tiles_per_instance: int = 0
    instances_over_4_tiles: int = 0
    per_class: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)  # class index -> {"objects": n, "voxels": v} removed by clean-up
    # class index -> what ``--min-slices auto`` saw and chose for it (``_auto_min_slices``)
    min_slices_auto: dict = field(default_factory=dict)
    # class index -> (2D instances whose object has another instance in their slice, 2D instances): a branch makes a
    # few; most of them means objects that tile the plane (neurites) joining through rule 2 and gap edges
    sharing_a_slice: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, saved: dict) -> LinkStats:
        """The counts as ``asdict`` gave them, back from JSON, which made the class indices keying the per-class
        counts strings (a resumed run's report then indexed its class names with "0")."""
        per_class = {f.name for f in fields(cls) if f.type == "dict"}
        return cls(**{k: {int(c): v for c, v in value.items()} if k in per_class else value
                      for k, value in saved.items()})  # fmt: skip


@dataclass(frozen=True)
class LinkRule:
    """The linking options of a run (see the module docstring); minimums are per class index (0: no minimum)."""

    iou_min: float = 0.25
    ioa_min: float = 0.5
    gap: tuple[int, ...] = ()  # per class
    min_voxels: tuple[int, ...] = ()
    min_slices: tuple[int, ...] = ()
    layer_of: tuple[int, ...] = ()  # per class: its label layer; classes sharing one exclude one another

    def kinds(self, cls: np.ndarray) -> np.ndarray:
        """What must be equal for two instances to link: their class, or their shared layer (exclusive classes)."""
        return np.asarray(self.layer_of, np.int64)[cls] if self.layer_of else cls


def link_pair(
    cls_a: np.ndarray, area_a: np.ndarray, cls_b: np.ndarray, area_b: np.ndarray,
    ia: np.ndarray, ib: np.ndarray, inter: np.ndarray, iou_min: float, ioa_min: float,
    score_a: np.ndarray | None = None, score_b: np.ndarray | None = None,
    free_a: np.ndarray | None = None, free_b: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:  # fmt: skip
    """Edges (k, 2) between 2D instances of two slices, and how many came from the branch/merge step.

    ``ia``/``ib``/``inter``: overlapping instance pairs and their shared pixel counts (other classes' pairs are
    ignored). ``free_a``/``free_b`` (default: all): the instances that may take part; only free pairs continue one
    another, and a free instance left unpaired may join any instance. Scores break ties."""
    if len(inter) == 0:
        return np.zeros((0, 2), dtype=np.int64), 0
    free_a = np.ones(len(area_a), bool) if free_a is None else free_a
    free_b = np.ones(len(area_b), bool) if free_b is None else free_b
    score_a = np.zeros(len(area_a)) if score_a is None else score_a
    score_b = np.zeros(len(area_b)) if score_b is None else score_b
    keep = (cls_a[ia] == cls_b[ib]) & (free_a[ia] | free_b[ib])
    ia, ib, inter = ia[keep], ib[keep], inter[keep].astype(np.float64)
    iou = inter / (area_a[ia] + area_b[ib] - inter)
    cand = np.flatnonzero((iou >= iou_min) & free_a[ia] & free_b[ib])
    # a score term far below any IoU difference the areas allow: equal IoU goes to the better-scored pair
    tie = 1e-9 * (score_a[ia[cand]] + score_b[ib[cand]])
    links = [_assign(ia[cand], ib[cand], iou[cand] + tie)]
    matched_a = np.zeros(len(area_a), bool)
    matched_b = np.zeros(len(area_b), bool)
    matched_a[links[0][:, 0]] = True
    matched_b[links[0][:, 1]] = True
    heal = 0
    for own, other, area, free, matched, score, flip in ((ia, ib, area_a, free_a, matched_a, score_b, False),
                                                         (ib, ia, area_b, free_b, matched_b, score_a, True)):  # fmt: skip
        ioa = inter / area[own]
        ok = ((ioa >= ioa_min) | (iou >= iou_min)) & free[own] & ~matched[own]
        if not ok.any():
            continue
        # the partner covering most of an unpaired instance (ties: higher score, then lowest partner index); one it
        # could have continued (IoU >= iou_min, lost to a better pair) qualifies too
        order = np.lexsort((other[ok], -score[other[ok]], -ioa[ok], own[ok]))
        o, p = own[ok][order], other[ok][order]
        first = np.concatenate([[True], o[1:] != o[:-1]])
        pair = np.stack([p[first], o[first]] if flip else [o[first], p[first]], axis=1)
        links.append(pair)
        heal += len(pair)
    return np.concatenate(links), heal


def _assign(ia: np.ndarray, ib: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Maximum-IoU one-to-one matching, solved per connected component of the candidate graph (scales to many)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

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
        # imported here, where a choice is left: scipy.optimize's import is ~0.3 s of a worker's CPU
        from scipy.optimize import linear_sum_assignment

        ga, gra = np.unique(ra[group], return_inverse=True)
        gb, grb = np.unique(rb[group], return_inverse=True)
        cost = np.zeros((len(ga), len(gb)))
        cost[gra, grb] = -iou[group]
        rows, cols = linear_sum_assignment(cost)
        keep = cost[rows, cols] < 0
        out.append(np.stack([ua[ga[rows[keep]]], ub[gb[cols[keep]]]], axis=1))
    return np.concatenate(out).astype(np.int64)


def _aggregate(keys_a: np.ndarray, keys_b: np.ndarray, counts: np.ndarray, largest: bool = False):
    """Sum counts over equal (a, b) pairs; or, with ``largest``, keep each pair's largest count."""
    if len(counts) == 0:
        return keys_a[:0], keys_b[:0], counts[:0]
    uniq, inverse = np.unique(np.stack([keys_a, keys_b], axis=1), axis=0, return_inverse=True)
    if largest:
        out = np.zeros(len(uniq), np.int64)
        np.maximum.at(out, inverse.ravel(), counts)
    else:
        out = np.bincount(inverse.ravel(), weights=counts).astype(np.int64)
    return uniq[:, 0], uniq[:, 1], out


@dataclass
class _Slice:
    """What linking keeps of one slice while it streams: fragments, fragment -> instance, and per instance its
    class, area, score, first node index, and whether it has an edge to the next / from the previous slice."""

    frag: np.ndarray
    inst: np.ndarray
    cls: np.ndarray
    area: np.ndarray
    score: np.ndarray
    base: int
    forward: np.ndarray
    backward: np.ndarray


def _instance_overlaps(grid: TileGrid, a: _Slice, b: _Slice, ov: np.ndarray):
    """ZOVERLAP rows (fragments of a, b at one tile position) -> summed overlaps between their 2D instances."""
    row_a, row_b = fragment_rows(a.frag, grid), fragment_rows(b.frag, grid)
    ia = a.inst[row_a(ov["iy"], ov["ix"], ov["a"])]
    ib = b.inst[row_b(ov["iy"], ov["ix"], ov["b"])]
    return _aggregate(ia, ib, ov["count"])


def _gap_positions(grid: TileGrid, a: _Slice, b: _Slice, free_a: np.ndarray, free_b: np.ndarray):
    """The tile positions whose overlaps gap edges between slices a and b need: where a fragment of a free instance
    of one slice and any fragment of the other have pixels; and per such position, the boxes (rows of y0, y1, x0,
    x1, volume pixels) of the free fragments there. Every pixel a pair with a free side shares lies in the free
    side's box, and only such pairs can make a gap edge (``link_pair``): counting the boxes' pixels alone gives them
    whole."""

    def rows(s: _Slice, free: np.ndarray | None) -> np.ndarray:
        return s.frag[(s.frag["area"] > 0) & (True if free is None else free[s.inst])]

    held_a, held_b = _positions(grid, rows(a, None)), _positions(grid, rows(b, None))
    fa, fb = rows(a, free_a), rows(b, free_b)
    todo = np.union1d(np.intersect1d(_positions(grid, fa), held_b), np.intersect1d(held_a, _positions(grid, fb)))
    free = np.concatenate([fa, fb])
    where = free["iy"].astype(np.int64) * grid.nx + free["ix"]
    corners = np.stack([free[k].astype(np.int64) for k in ("y0", "y1", "x0", "x1")], axis=1)
    return todo, {t: corners[where == t] for t in todo.tolist()}


def _box_pixels(core: Box, boxes: np.ndarray) -> tuple:
    """What of a tile core to count for ``boxes`` (rows of y0, y1, x0, x1): an index of its (classes, h, w) array,
    the crop around them, or where they cover under half of that crop, the pixels of the CELL x CELL cells they
    meet (a superset of theirs, marked without a loop over the boxes). The free fragments of a position are small
    and spread out: on the labels benchmark their boxes cover 2% of a core, the box around them all 48%."""
    y0, x0 = boxes[:, 0].min(), boxes[:, 2].min()
    y1, x1 = boxes[:, 1].max(), boxes[:, 3].max()
    crop = (slice(None), slice(y0 - core.y0, y1 - core.y0), slice(x0 - core.x0, x1 - core.x0))
    if len(boxes) == 1:
        return crop
    rel = boxes - [y0, y0, x0, x0]
    top, bottom, left, right = rel[:, 0] // CELL, -(-rel[:, 1] // CELL), rel[:, 2] // CELL, -(-rel[:, 3] // CELL)
    ny, nx = -(-(y1 - y0) // CELL), -(-(x1 - x0) // CELL)
    starts = np.zeros((ny + 1, nx + 1), np.int32)  # +1 where a box starts, -1 past its end; summed: boxes per cell
    for rows, cols, sign in ((top, left, 1), (top, right, -1), (bottom, left, -1), (bottom, right, 1)):
        np.add.at(starts, (rows, cols), sign)
    met = starts.cumsum(0).cumsum(1)[:ny, :nx] > 0
    if 2 * np.count_nonzero(met) >= met.size:
        return crop
    cy, cx = np.nonzero(met)
    step = np.arange(CELL)
    ys = np.broadcast_to((cy * CELL)[:, None, None] + step[None, :, None], (len(cy), CELL, CELL))
    xs = np.broadcast_to((cx * CELL)[:, None, None] + step[None, None, :], (len(cx), CELL, CELL))
    inside = (ys < y1 - y0) & (xs < x1 - x0)
    return slice(None), ys[inside] + (y0 - core.y0), xs[inside] + (x0 - core.x0)


CELL = 8  # pixels: the grain of _box_pixels's mask


class _Cores:
    """The tile cores of a few slices, read once each and kept while near ones are read (the last ``keep`` of them,
    at most ``budget`` bytes; reads go in raster order): as stored (tile-local ids), or as 2D instance indices + 1
    (0: none) over any box of a slice, from the cores it meets. A position of a slice without fragments reads as
    zeros; a missing core where it has some is damage."""

    def __init__(self, store, grid: TileGrid, slices: dict[int, _Slice], keep: int = 8, budget: int = 256 << 20):
        self.store, self.grid, self.slices, self.keep, self.budget = store, grid, slices, keep, budget
        self.cache: dict[tuple[int, int, int], np.ndarray] = {}
        self.rows = {z: fragment_rows(s.frag, grid) for z, s in slices.items()}
        self.held = {z: set(_positions(grid, s.frag[s.frag["area"] > 0]).tolist()) for z, s in slices.items()}
        self.reads = 0

    def raw(self, z: int, iy: int, ix: int) -> np.ndarray:
        key = (z, iy, ix)
        if key not in self.cache:
            self.reads += 1
            core = self.store.core(self.grid, z, iy, ix, written=iy * self.grid.nx + ix in self.held[z])
            while self.cache and (len(self.cache) >= self.keep or
                                  sum(c.nbytes for c in self.cache.values()) + core.nbytes > self.budget):  # fmt: skip
                del self.cache[next(iter(self.cache))]  # the oldest
            self.cache[key] = core
        return self.cache[key]

    def instances(self, z: int, box: Box) -> np.ndarray:
        out = None
        for iy, ix in self.grid.cores_in(box):
            core = self.grid.core(iy, ix)
            part = box.intersect(core)
            local = self.raw(z, iy, ix)[(slice(None), *part.relative_to(core))]
            if out is None:
                out = np.zeros((len(local), *box.shape), np.int64)
            ids = out[(slice(None), *part.relative_to(box))]
            on = local > 0
            ids[on] = self.slices[z].inst[self.rows[z](iy, ix, local[on])] + 1
        return out


def _positions(grid: TileGrid, frag: np.ndarray) -> np.ndarray:
    return np.unique(frag["iy"].astype(np.int64) * grid.nx + frag["ix"])


def _count_gap_overlaps(cores: _Cores, grid: TileGrid, za: int, wanted: dict[int, dict],
                        counted: dict[int, dict] | None = None) -> dict[int, np.ndarray]:  # fmt: skip
    """ZOVERLAP rows between slice za and each slice zb of ``wanted`` (zb -> the positions to count, each with the
    boxes to count there, from ``_gap_positions``): those an actor counted over the whole cores from memory
    (``counted``: zb -> position -> rows; the same counts for every pair with a free side), the rest from the
    stored tile cores one position at a time: the core of za is read once for every zb that needs it."""
    counted = counted or {}
    out = {zb: [np.zeros(0, ZOVERLAP)] for zb in wanted}
    for t in sorted(set().union(*wanted.values())):
        iy, ix = divmod(t, grid.nx)
        core = grid.core(iy, ix)
        for zb, boxes in wanted.items():
            if t in boxes and (iy, ix) in counted.get(zb, {}):
                out[zb].append(counted[zb][iy, ix])
            elif t in boxes:
                pixels = _box_pixels(core, boxes[t])
                out[zb].append(zoverlaps(cores.raw(za, iy, ix)[pixels], cores.raw(zb, iy, ix)[pixels], iy, ix))
    return {zb: np.concatenate(rows) for zb, rows in out.items()}


def _centroids(s: _Slice) -> np.ndarray:
    n, area = len(s.area), np.maximum(s.area, 1)
    return np.stack([np.bincount(s.inst, weights=s.frag[k], minlength=n) / area for k in ("sy", "sx")], axis=1)


def _drift(here: _Slice, other: _Slice, pairs: np.ndarray) -> np.ndarray:
    """Per instance of ``here``: the step (dy, dx) from its centroid to its partners' (``pairs``: here, other) in
    the adjacent slice ``other``, all partners together, area-weighted; NaN where it has none, or where the step is
    longer than its radius (a jump of the detection, not the object's motion)."""
    n = len(here.area)
    out = np.full((n, 2), np.nan)
    if len(pairs) == 0:
        return out
    i, j = pairs[:, 0], pairs[:, 1]
    weight = other.area[j].astype(np.float64)
    total = np.bincount(i, weights=weight, minlength=n)
    has = total > 0
    c_here, c_other = _centroids(here), _centroids(other)
    for k in (0, 1):
        out[has, k] = np.bincount(i, weights=weight * c_other[j, k], minlength=n)[has] / total[has] - c_here[has, k]
    out[np.hypot(out[:, 0], out[:, 1]) > np.sqrt(here.area / np.pi)] = np.nan
    return out


def _boxes(s: _Slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per fragment with pixels: its instance and its box (y0, y1, x0, x1); per instance: its box."""
    valid = s.frag["area"] > 0
    inst, f = s.inst[valid], s.frag[valid]
    frag_box = np.stack([f[k].astype(np.int64) for k in ("y0", "y1", "x0", "x1")], axis=1)
    box = np.tile(np.array([np.iinfo(np.int64).max, -1]), (len(s.area), 2))
    for k, reduce in enumerate((np.minimum, np.maximum) * 2):
        reduce.at(box[:, k], inst, frag_box[:, k])
    return inst, frag_box, box


def _moved_overlaps(cores: _Cores, grid: TileGrid, rule: LinkRule, z_own: int, z_other: int, who: np.ndarray,
                    shifts: np.ndarray, side: int) -> np.ndarray:  # fmt: skip
    """MOVED rows: each instance ``who`` of slice z_own, its pixels moved by ``shifts`` (dy, dx), against the
    instances of slice z_other under them (pixels moved out of the slice are lost). Only where a fragment of a
    candidate (same class, or layer) meets the moved box are cores read: most moved ends meet nothing."""
    own, other = cores.slices[z_own], cores.slices[z_other]
    box = _boxes(own)[2]
    other_inst, other_box, _ = _boxes(other)
    other_kind = rule.kinds(other.cls)[other_inst]
    kind = rule.kinds(own.cls)
    moved = box[who] + np.repeat(shifts, 2, axis=1)
    moved[:, 0::2] = np.maximum(moved[:, 0::2], 0)
    moved[:, 1] = np.minimum(moved[:, 1], grid.height)
    moved[:, 3] = np.minimum(moved[:, 3], grid.width)
    # the cores are read in raster order of the boxes: a few kept serve neighbouring ones
    order = np.lexsort((np.searchsorted(grid.x_cuts, moved[:, 2], "right"),
                        np.searchsorted(grid.y_cuts, moved[:, 0], "right")))  # fmt: skip
    out = [np.zeros(0, MOVED)]
    for k in order.tolist():
        i, (dy, dx), (y0, y1, x0, x1) = int(who[k]), shifts[k].tolist(), moved[k].tolist()
        near = (other_kind == kind[i]) & (other_box[:, 0] < y1) & (other_box[:, 1] > y0) & (other_box[:, 2] < x1)
        if y0 >= y1 or x0 >= x1 or not (near & (other_box[:, 3] > x0)).any():
            continue
        target = Box(y0, y1, x0, x1)
        mask = cores.instances(z_own, Box(y0 - dy, y1 - dy, x0 - dx, x1 - dx)) == i + 1
        under = cores.instances(z_other, target)[mask]
        j, count = np.unique(under[under > 0] - 1, return_counts=True)
        rows = np.zeros(len(j), MOVED)
        rows["a"], rows["b"] = (i, j) if side % 2 == 0 else (j, i)
        rows["count"], rows["side"] = count, side
        out.append(rows)
    return np.concatenate(out)


def _moving(drift: np.ndarray, free: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """The free instances whose drift carried over ``d`` slices moves them by a pixel or more, and that move."""
    shift = np.rint(-drift * d)
    who = np.flatnonzero(free & np.isfinite(shift).all(axis=1))
    shift = shift[who].astype(np.int64)
    keep = shift.any(axis=1)
    return who[keep], shift[keep]


def _gap_moves(drift: np.ndarray, free: np.ndarray, d: int, offset: np.ndarray | None) -> list:
    """The moves (instances, steps) to count a slice's free instances at across a gap of ``d`` slices: along their
    drift (``_moving``); where the other slice is translated against this one (``offset``, ``_slice_shift``), every
    free instance by that translation (where it lies, the sections realigned) and the drifting ones by their drift
    plus it. Their plain z-overlaps are then no measure: those moves replace them."""
    who, steps = _moving(drift, free, d)
    if offset is None:
        return [(who, steps)]
    everyone = np.flatnonzero(free)
    return [(everyone, np.tile(offset, (len(everyone), 1))), (who, steps + offset)]


def _load_slice(store, grid: TileGrid, z: int, base: int = 0) -> tuple[_Slice, dict]:
    """Slice z's 2D instances (its fragments joined by its stitch matches) with their class, area and score; and
    its edges."""
    frag = store.fragments(z)
    edges = store.edges(z)
    inst, n = slice_instances(frag, edges["pairs"], grid)
    area = np.bincount(inst, weights=frag["area"], minlength=n).astype(np.int64)
    score = np.bincount(inst, weights=frag["score"] * frag["area"], minlength=n) / np.maximum(area, 1)
    cls = np.zeros(n, dtype=np.int16)
    cls[inst] = frag["cls"]
    return _Slice(frag, inst, cls, area, score, base, np.zeros(n, bool), np.zeros(n, bool)), edges


UNPAIRED_MIN_INSTANCES = 10  # a slice with fewer 2D instances is not judged by its unpaired share


def _note_unpaired(stats: LinkStats, za: int, a: _Slice, b: _Slice, a_unpaired_below, pairs: np.ndarray) -> np.ndarray:
    """Adds slice ``za`` to ``stats.unpaired_slices`` where most of its instances pair with neither neighbour
    (``a_unpaired_below``: those without an edge to slice za - 1, None for the first slice; ``pairs``: the edges
    (a, b) to the next slice); returns ``b``'s instances without an edge to slice za."""
    present = a.area > 0
    unpaired_above = present.copy()
    unpaired_above[pairs[:, 0]] = False
    n = int(present.sum())
    if a_unpaired_below is not None and n >= UNPAIRED_MIN_INSTANCES and (a_unpaired_below & unpaired_above).sum() > n / 2:
        stats.unpaired_slices.append(za)
    b_unpaired_below = b.area > 0
    b_unpaired_below[pairs[:, 1]] = False
    return b_unpaired_below


def _blank_slices(present: list[int]) -> list[int]:
    """Slices with no 2D instance between the first and the last slice that hold ``UNPAIRED_MIN_INSTANCES`` or more
    (each of a run of blank sections counts; the volume's ends, where the tissue may stop, do not)."""
    counts = np.asarray(present)
    full = np.flatnonzero(counts >= UNPAIRED_MIN_INSTANCES)
    if len(full) < 2:
        return []
    empty = np.flatnonzero(counts == 0)
    return [int(z) for z in empty[(empty > full[0]) & (empty < full[-1])]]


def _adjacent_links(grid: TileGrid, rule: LinkRule, a: _Slice, b: _Slice, overlaps: np.ndarray):
    """Rules 1-2 between adjacent slices, from the overlaps the actors counted: edges and the branch/merge count."""
    ia, ib, inter = _instance_overlaps(grid, a, b, overlaps)
    return link_pair(rule.kinds(a.cls), a.area, rule.kinds(b.cls), b.area, ia, ib, inter, rule.iou_min,
                     rule.ioa_min, a.score, b.score)  # fmt: skip


SHIFT_REACH = 48  # px: the largest misalignment of a section that linking looks for
SHIFT_MIN = 3  # px: smaller shifts are left alone (instances still pair)
SHIFT_SAMPLE = 4096  # instances of a slice that vote (evenly spread): the vote needs a share, not all
SHIFT_NEAREST = 32  # the nearest instances of the other slice each voter looks at


def _slice_shift(a: _Slice, b: _Slice, rule: LinkRule) -> np.ndarray | None:
    """The translation (dy, dx) of slice b against slice a where b is a misaligned section (a registration error,
    ``benchmarks/REPORT.md``, linking on real data), or None. Every pair of instances of one kind within
    ``SHIFT_REACH`` px whose areas are within 2x of each other (up to ``SHIFT_SAMPLE`` instances of a, each with its
    ``SHIFT_NEAREST`` nearest of b) votes for the step between their centroids; the
    most voted step (1 px bins, counted over 3 x 3 bins) stands where it is at least ``SHIFT_MIN`` px long, is
    voted by a quarter of the instances of the smaller slice (and 4 at least), and is voted twice as often as no
    step at all. Objects that move on their own vote for steps spread around 0: they move no peak away from it."""
    from scipy.spatial import cKDTree

    here, there = np.flatnonzero(a.area > 0), np.flatnonzero(b.area > 0)
    # a bounded vote: at most SHIFT_SAMPLE instances of a (evenly spread over its ids), each with its SHIFT_NEAREST
    # nearest of b; all pairs within reach grew with instances x density (supervoxel stacks: ~10^8 pairs, GBs)
    here = here[:: -(-len(here) // SHIFT_SAMPLE)] if len(here) else here
    if min(len(here), len(there)) < 4:
        return None
    centroids_a, centroids_b = _centroids(a), _centroids(b)
    k = min(SHIFT_NEAREST, len(there))
    _, near = cKDTree(centroids_b[there]).query(centroids_a[here], k=k, distance_upper_bound=SHIFT_REACH)
    found = near.reshape(len(here), k) < len(there)  # misses come back as len(there)
    i, j = np.repeat(here, k)[found.ravel()], there[near.reshape(len(here), k)[found]]
    ratio = b.area[j] / a.area[i]
    keep = (ratio >= 0.5) & (ratio <= 2) & (rule.kinds(a.cls)[i] == rule.kinds(b.cls)[j])
    step = np.rint(centroids_b[j[keep]] - centroids_a[i[keep]]).astype(np.int64) + SHIFT_REACH + 1
    side = 2 * SHIFT_REACH + 3
    raw = np.zeros((side, side))
    np.add.at(raw, (step[:, 0], step[:, 1]), 1)
    votes = sum(raw[1 + dy : side - 1 + dy, 1 + dx : side - 1 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    peak = np.array(np.unravel_index(np.argmax(votes), votes.shape))
    best, still = votes[tuple(peak)], votes[SHIFT_REACH, SHIFT_REACH]
    if best < max(4, min(len(here), len(there)) / 4) or best < 2 * still:  # also: no votes (0 / 0 below)
        return None
    window = raw[peak[0] : peak[0] + 3, peak[1] : peak[1] + 3]  # the peak's 3 x 3 bins (best votes): their mean step
    offset = np.array([(window.sum(1) * [-1, 0, 1]).sum(), (window.sum(0) * [-1, 0, 1]).sum()]) / window.sum()
    shift = peak - SHIFT_REACH + np.rint(offset).astype(np.int64)
    return None if np.hypot(*shift) < SHIFT_MIN else shift


def _paired_share(kind: np.ndarray, area: np.ndarray, pairs: np.ndarray, heal: int) -> np.ndarray:
    """Per kind of instance (``LinkRule.kinds``): the share of slice a's instance area (``area``, its instances'
    kinds ``kind``) that continues one-to-one (rule 1) in the pairs."""
    one = pairs[: len(pairs) - heal, 0]
    n = int(kind.max(initial=0)) + 1
    paired = np.bincount(kind[one], weights=area[one], minlength=n)
    return paired / np.maximum(np.bincount(kind, weights=area, minlength=n), 1)


def _of_kinds(pairs: np.ndarray, heal: int, kind: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pairs whose instances are of the ``chosen`` kinds: (one-to-one pairs, branch/merge pairs)."""
    keep = chosen[kind[pairs[:, 0]]]
    split = len(pairs) - heal
    return pairs[:split][keep[:split]], pairs[split:][keep[split:]]


def _registered_links(store, grid: TileGrid, rule: LinkRule, a: _Slice, b: _Slice, za: int, pairs: np.ndarray,
                      heal: int, stats: LinkStats | None = None) -> tuple[np.ndarray, int]:  # fmt: skip
    """Rules 1-2 between adjacent slices a (za) and b (za + 1) where b is a misaligned section: overlaps counted
    with b moved back by its shift (``_slice_shift``), from the tile cores; kept for each kind of instance
    (``LinkRule.kinds``) where more of a's area of that kind continues one-to-one (by 0.1 at least) than with the
    overlaps as they lie (``pairs``, ``heal``). A section translated by 5-20 px otherwise leaves its instances
    unpaired (one-slice objects, or joins to a neighbour). Per kind, because large objects (cells) still pair across
    a shift that small ones (mitochondria) beside them cannot: by area as a whole, the cells decided for both."""
    shift = _slice_shift(a, b, rule)
    if shift is None:
        return pairs, heal
    who = np.flatnonzero(b.area > 0)
    cores = _Cores(store, grid, {za: a, za + 1: b})
    rows = _moved_overlaps(cores, grid, rule, za + 1, za, who, np.tile(-shift, (len(who), 1)), 1)
    moved, moved_heal = link_pair(rule.kinds(a.cls), a.area, rule.kinds(b.cls), b.area, rows["a"], rows["b"],
                                  rows["count"], rule.iou_min, rule.ioa_min, a.score, b.score)  # fmt: skip
    if stats is not None:
        stats.gap_cores_read += cores.reads
    kind = rule.kinds(a.cls)
    realign = _paired_share(kind, a.area, moved, moved_heal) >= _paired_share(kind, a.area, pairs, heal) + 0.1
    if not realign.any():
        return pairs, heal
    if stats is not None:
        stats.shifted_pairs += 1
    (moved_one, moved_heals), (one, heals) = (_of_kinds(moved, moved_heal, kind, realign),
                                              _of_kinds(pairs, heal, kind, ~realign))  # fmt: skip
    return np.concatenate([moved_one, one, moved_heals, heals]), len(moved_heals) + len(heals)


def _crossings(below: np.ndarray, above: np.ndarray, areas: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """The 2D instances of a slice that two or more instances of the slice before and two or more of the slice after
    link to (``below``: edges (previous slice, this one); ``above``: (this one, next); both before any cut; ``areas``:
    the instances' areas in the three slices): two objects that meet in one section and part at once, which is what a
    2D merge of two touching objects (a missed boundary) looks like. A branch (one below, two above) or a join (two
    below, one above) is none, and specks are not counted among the two. A speck (``SPECK_PIXELS`` or fewer) linked
    on both sides to more than a speck is one too: it lies inside whatever is around it (rule 2), so one stray pixel between two objects stacked in z joined
    them; no object narrows to a speck and widens again (where one did, its two sides still meet by a gap edge). A
    speck that starts or ends an object (a cap), or one of an object thin in every section (specks linked to specks),
    is none."""
    if len(below) == 0 or len(above) == 0:
        return np.zeros(0, np.int64)
    area_below, area, area_above = areas
    # partners that count: more than a speck (a fragment a model cut off at an object's rim lies inside the object
    # in the next section: it made every section of a true object a crossing)
    n_below = np.bincount(below[:, 1], area_below[below[:, 0]] > SPECK_PIXELS, minlength=len(area))
    n_above = np.bincount(above[:, 0], area_above[above[:, 1]] > SPECK_PIXELS, minlength=len(area))
    speck = (area > 0) & (area <= SPECK_PIXELS) & (n_below > 0) & (n_above > 0)
    return np.flatnonzero(((n_below >= 2) & (n_above >= 2)) | speck)


def _cut(pairs: np.ndarray, cross_a: np.ndarray, cross_b: np.ndarray) -> np.ndarray:
    """Edges between two slices less those of the crossings of either (``_crossings``)."""
    return pairs[~(np.isin(pairs[:, 0], cross_a) | np.isin(pairs[:, 1], cross_b))]


def _leaves(below: np.ndarray, cross: np.ndarray, area_below: np.ndarray) -> np.ndarray:
    """One edge per crossing (rows: instance below, crossing): to the largest of the instances below linked to it,
    so that its pixels belong to one object, which it joins as a leaf."""
    mine = below[np.isin(below[:, 1], cross)]
    order = np.lexsort((mine[:, 0], -area_below[mine[:, 0]], mine[:, 1]))
    mine = mine[order]
    return mine[np.concatenate([[True], mine[1:, 1] != mine[:-1, 1]])] if len(mine) else mine


def _gaps(rule: LinkRule, n_classes: int) -> np.ndarray:
    gap = np.zeros(n_classes, np.int64)
    gap[: len(rule.gap)] = rule.gap
    return gap


def gap_overlaps(store, grid: TileGrid, za: int, n_slices: int, n_classes: int, rule: LinkRule,
                 stats: LinkStats | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """What gap edges from slice za may need, per distance d (za + d, d = 2 .. largest gap + 1): the z-overlaps
    (ZOVERLAP rows) counted from the tile cores, and the MOVED rows of free instances carried along their drift;
    the gap stage's unit, run off the driver once slices za - 1 .. za + d + 1 are stitched.

    ``build_objects`` frees an instance for a gap edge only where it has no edge to the next (previous) slice, and
    those edges include gap edges made before; here only the adjacent edges are known (made as it makes them,
    misaligned sections realigned), so its free instances (and the positions that hold them) are a superset of what
    ``build_objects`` uses: it takes the rows it needs, which are the same as if it had counted them itself. Drift
    comes from adjacent edges alone, so both agree on it. Where slices za and za + d are translated against one
    another (``_slice_shift``), the free instances are counted moved by that translation only (``_gap_moves``).
    The tile cores it reads are added to ``stats.gap_cores_read``."""
    gap = _gaps(rule, n_classes)
    last = min(za + int(gap.max(initial=0)) + 1, n_slices - 1)
    if last < za + 2:
        return {}
    loaded = {z: _load_slice(store, grid, z) for z in range(max(za - 1, 0), min(last + 1, n_slices - 1) + 1)}
    slices = {z: s for z, (s, _) in loaded.items()}
    # adjacent edges as ``build_objects`` makes them, misaligned sections realigned (``_registered_links``): an
    # instance whose partner was missed next to a moved section is free here as there, and drift agrees. The driver's
    # cost again for a unit's few pairs: a bounded vote each, a recount from the cores only at a moved section
    seen = LinkStats()
    adjacent = {z: _registered_links(store, grid, rule, slices[z], slices[z + 1], z,
                                     *_adjacent_links(grid, rule, slices[z], slices[z + 1], edges["overlaps"]), seen)[0]
                for z, (_, edges) in loaded.items() if z + 1 in slices}  # fmt: skip
    cores = _Cores(store, grid, slices)
    a = slices[za]
    cross = {z: _crossings(adjacent[z - 1], adjacent[z], (slices[z - 1].area, slices[z].area, slices[z + 1].area))
             for z in slices if z - 1 in adjacent and z in adjacent}  # fmt: skip
    none = np.zeros(0, np.int64)
    cut = {z: _cut(p, cross.get(z, none), cross.get(z + 1, none)) for z, p in adjacent.items()}
    forward = np.zeros(len(a.area), bool)
    forward[cut[za][:, 0]] = True
    forward[cross.get(za, none)] = True
    drift_a = _drift(a, slices[za - 1], adjacent[za - 1][:, ::-1]) if za > 0 else np.full((len(a.area), 2), np.nan)
    wanted, free, shift = {}, {}, {}
    for zb in range(za + 2, last + 1):
        b = slices[zb]
        backward = np.zeros(len(b.area), bool)
        backward[cut[zb - 1][:, 1]] = True
        backward[cross.get(zb, none)] = True
        bridged = gap >= zb - za - 1
        free[zb] = (~forward & (a.area > 0) & bridged[a.cls], ~backward & (b.area > 0) & bridged[b.cls])
        # the two slices' own translation (a moved section between or at either end, or several): voted on directly,
        # as for adjacent slices. Bounded (SHIFT_SAMPLE voters x SHIFT_NEAREST of the other slice, one k-d tree
        # query): a few ms a pair, against the cores a unit reads
        shift[zb] = _slice_shift(a, b, rule) if any(f.any() for f in free[zb]) else None
        if shift[zb] is None:  # where a shift stands, the moves below count every free instance's overlaps
            wanted[zb] = _gap_positions(grid, a, b, *free[zb])[1]
    rows = _count_gap_overlaps(cores, grid, za, wanted, {zb: store.read_zoverlaps(za, zb - za) for zb in wanted})
    out = {}
    for zb, (free_a, free_b) in free.items():
        b, d, s = slices[zb], zb - za, shift[zb]
        drift_b = _drift(b, slices[zb + 1], adjacent[zb]) if zb + 1 in slices else np.full((len(b.area), 2), np.nan)
        # a's instances moved on into b's frame (+ shift), b's moved back into a's (- shift, as _registered_links)
        sides = ((za, zb, drift_a, free_a, s), (zb, za, drift_b, free_b, None if s is None else -s))
        moved = [_moved_overlaps(cores, grid, rule, own, other, who, steps, side + (0 if s is None else 2))
                 for side, (own, other, drift, mine, offset) in enumerate(sides)
                 for who, steps in _gap_moves(drift, mine, d, offset)]  # fmt: skip
        out[d] = (rows.get(zb, np.zeros(0, ZOVERLAP)), np.concatenate(moved))
    if stats is not None:
        stats.gap_cores_read += cores.reads + seen.gap_cores_read
    return out


def build_objects(store, grid: TileGrid, n_slices: int, n_classes: int, link: str, rule: LinkRule,
                  progress=None) -> tuple[np.ndarray, LinkStats]:  # fmt: skip
    """Stream the slices of the work store (``run.store.WorkStore``): 2D instances, edges, 3D components, clean-up;
    write each slice's fragment -> object id table (``lut_path``) and return the object table."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    stats = LinkStats()
    bases, areas, classes, zs, link_edges, runners_up = [0], [], [], [], [], []
    window: list[_Slice] = []  # the last slices (up to the largest gap + 1), oldest first
    gap = _gaps(rule, n_classes)
    counted: dict[int, tuple[dict, bool]] = {}  # za -> the gap unit's rows per distance; counted by the driver?
    prev_edges = None
    pending = None  # the edges to the last slice: crossings of that slice may still cut them (``_settle``)
    unpaired_below = None  # the last slice's instances without an edge to the slice before it
    present = []  # 2D instances per slice
    for z in range(n_slices):
        here, edges = _load_slice(store, grid, z, bases[-1])
        frag, inst, cls, area, n = here.frag, here.inst, here.cls, here.area, len(here.area)
        tiles_per = np.bincount(inst[frag["area"] > 0], minlength=n)
        stats.fragments += len(frag)
        present.append(int((area > 0).sum()))
        stats.instances_2d += present[-1]
        stats.stitch_matches += len(edges["pairs"])
        stats.max_tiles_per_instance = max(stats.max_tiles_per_instance, int(tiles_per.max(initial=0)))
        stats.instances_over_4_tiles += int((tiles_per > 4).sum())
        store.write_instances(z, inst)
        if window and link != "none":
            prev = window[-1]
            pairs, heal = _adjacent_links(grid, rule, prev, here, prev_edges["overlaps"])
            pairs, heal = _registered_links(store, grid, rule, prev, here, z - 1, pairs, heal, stats)
            stats.links += len(pairs)
            stats.heal_links += heal
            unpaired_below = _note_unpaired(stats, z - 1, prev, here, unpaired_below, pairs)
            pending = _settle(link_edges, pending, pairs, prev, here, stats)
            for d in range(2, min(int(gap.max(initial=0)) + 1, len(window)) + 1):  # nearer first: they take targets
                if z - d not in counted:
                    rows = store.gap_overlaps(z - d)
                    if by_driver := rows is None:  # the gap stage did not run: its unit, here
                        t = time.perf_counter()
                        rows = gap_overlaps(store, grid, z - d, n_slices, n_classes, rule, stats)
                        stats.gap_seconds += time.perf_counter() - t
                    counted[z - d] = (rows, by_driver)
                rows, by_driver = counted[z - d]
                stats.gap_links += _bridge(grid, window[-d], here, rule, link_edges, stats, gap >= d - 1,
                                           rows.get(d, (np.zeros(0, ZOVERLAP), np.zeros(0, MOVED))), by_driver)  # fmt: skip
            counted.pop(z - int(gap.max(initial=0)) - 1, None)
        window = (window + [here])[-(int(gap.max(initial=0)) + 1) :]
        prev_edges = edges
        # clean-up and the class vote count the border fill pixels an instance lent (linking's overlaps do not)
        fills = store.fills_of(edges)
        stats.fill_pixels += fills.pixels
        filled, filled_inst = _with_fills(frag, inst, fills, grid)
        areas.append(np.bincount(filled_inst, weights=filled["area"], minlength=n).astype(np.int64))
        classes.append(cls)
        runners_up.append(_runner_up_votes(frag, inst, bases[-1]))
        zs.append(np.full(n, z, np.int64))
        bases.append(bases[-1] + n)
        if progress:
            progress.update(1)
    if pending is not None:
        _commit(link_edges, pending)
    stats.blank_slices = _blank_slices(present)
    total = bases[-1]
    area_all = np.concatenate(areas) if areas else np.zeros(0, np.int64)
    edges_all = np.concatenate(link_edges) if link_edges else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(edges_all), np.int8), (edges_all[:, 0], edges_all[:, 1])), shape=(total, total))
    _, comp = connected_components(graph, directed=False)
    voxels = np.bincount(comp, weights=area_all).astype(np.int64) if total else np.zeros(0, np.int64)
    cls_all = np.concatenate(classes) if classes else np.zeros(0, np.int16)
    runner_up = tuple(np.concatenate(parts) for parts in zip(*runners_up)) if runners_up else None
    comp_cls = _component_classes(comp, cls_all, area_all, len(voxels), n_classes, runner_up)
    kept = voxels > 0
    z_all = np.concatenate(zs) if zs else np.zeros(0, np.int64)
    _count_sharing(comp, z_all, cls_all, area_all, n_classes, n_slices, stats)
    if total and (any(rule.min_voxels) or any(rule.min_slices)):
        kept &= _clean_up(comp, comp_cls, area_all, z_all, voxels, n_classes, n_slices, rule, stats)
    object_id = np.zeros(len(voxels), dtype=np.uint64)
    object_id[kept] = np.arange(1, kept.sum() + 1, dtype=np.uint64)
    table = _object_table(store, grid, n_slices, bases, comp, object_id, comp_cls[kept])
    stats.objects = len(table)
    for c in range(n_classes):
        stats.per_class[c] = int((table["cls"] == c).sum())
    return table, stats


@dataclass
class _Pending:
    """Adjacent edges of slices a, b not yet final: uncut (for the crossings of b, once the slice after is known),
    and cut by the crossings known so far (those of a)."""

    a: _Slice
    b: _Slice
    uncut: np.ndarray
    edges: np.ndarray
    cross_a: np.ndarray


def _settle(out: list, pending: _Pending | None, pairs: np.ndarray, prev: _Slice, here: _Slice,
            stats: LinkStats) -> _Pending:  # fmt: skip
    """New adjacent edges (prev, here): the crossings of prev (``_crossings``, from the uncut edges on both sides)
    cut their edges on both sides; each joins, as a leaf, the largest instance below it, and the instances they
    linked are free again for gap edges across them (two objects a 2D merge glued in one section are apart again,
    and each is bridged over it). Commits the edges before prev, and returns those to here, pending."""
    none = np.zeros(0, np.int64)
    cross = _crossings(pending.uncut, pairs, (pending.a.area, prev.area, here.area)) if pending is not None else none
    if pending is not None:
        pending.edges = _cut(pending.edges, pending.cross_a, cross)
        pending.a.forward[:] = False
        pending.a.forward[pending.edges[:, 0]] = True
        pending.a.forward[pending.cross_a] = True
        if len(cross):
            leaves = _leaves(pending.uncut, cross, pending.a.area)
            out.append(leaves + np.array([pending.a.base, prev.base]))
            stats.crossings += len(cross)
            stats.speck_bridges += int((prev.area[cross] <= SPECK_PIXELS).sum())
        _commit(out, pending)
    edges = _cut(pairs, cross, none)
    prev.forward[:] = False
    prev.forward[edges[:, 0]] = True
    prev.forward[cross] = True
    here.backward[edges[:, 1]] = True
    return _Pending(prev, here, pairs, edges, cross)


def _commit(out: list, pending: _Pending) -> None:
    out.append(pending.edges + np.array([pending.a.base, pending.b.base]))


def _add_edges(out: list, pairs: np.ndarray, a: _Slice, b: _Slice) -> None:
    a.forward[pairs[:, 0]] = True
    b.backward[pairs[:, 1]] = True
    out.append(pairs + np.array([a.base, b.base]))


def _bridge(grid, a: _Slice, b: _Slice, rule: LinkRule, out: list, stats: LinkStats, bridged: np.ndarray,
            counted: tuple[np.ndarray, np.ndarray], by_driver: bool) -> int:  # fmt: skip
    """Gap edges between slices a and b (b at least two slices after a): for the instances of a left without an
    edge to a later slice and those of b left without one from an earlier slice (rules 1-2 with only these free), of
    the classes ``bridged`` (per class index) allows. Their overlaps come from ``counted``, the gap unit's rows for
    the pair (``gap_overlaps``, a superset); a pair's overlap is the larger of where the two lie and where the free
    one would be had it moved on as it did from its neighbouring slice (both with the two sections' translation
    undone where the gap unit found one: its MOVED sides 2, 3, and no plain z-overlaps)."""
    free_a = ~a.forward & (a.area > 0) & bridged[a.cls]
    free_b = ~b.backward & (b.area > 0) & bridged[b.cls]
    if not (free_a.any() or free_b.any()):
        return 0
    t = time.perf_counter()
    todo = _gap_positions(grid, a, b, free_a, free_b)[0]
    rows, moved = counted
    stats.gap_positions += len(todo)
    stats.gap_tiles_read += len(todo) if by_driver else 0
    at = np.isin(rows["iy"].astype(np.int64) * grid.nx + rows["ix"], todo)
    ia, ib, inter = _instance_overlaps(grid, a, b, rows[at])
    stats.gap_pairs_realigned += bool((moved["side"] >= 2).any())  # the sections' translation undone (MOVED)
    moved = moved[np.where(moved["side"] % 2 == 0, free_a[moved["a"]], free_b[moved["b"]])]
    ia, ib, inter = _aggregate(np.concatenate([ia, moved["a"]]), np.concatenate([ib, moved["b"]]),
                               np.concatenate([inter, moved["count"]]), largest=True)  # fmt: skip
    pairs, _ = link_pair(rule.kinds(a.cls), a.area, rule.kinds(b.cls), b.area, ia, ib, inter, rule.iou_min,
                         rule.ioa_min, a.score, b.score, free_a=free_a, free_b=free_b)  # fmt: skip
    _add_edges(out, pairs, a, b)
    stats.gap_seconds += time.perf_counter() - t
    return len(pairs)


def _runner_up_votes(frag: np.ndarray, inst: np.ndarray, base: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The class votes of a slice's runner-up detections (``TileLabels.alt_classes``): node, class and voxels,
    each fragment's area shared between its class and its runner-up in proportion to their scores."""
    has = frag["alt_cls"] >= 0
    f = frag[has]
    share = f["alt_score"].astype(np.float64) / np.maximum(f["score"].astype(np.float64) + f["alt_score"], 1e-12)
    return base + inst[has].astype(np.int64), f["alt_cls"].astype(np.int16), f["area"] * share


def _component_classes(comp: np.ndarray, cls: np.ndarray, area: np.ndarray, n: int, n_classes: int,
                       runner_up: tuple | None = None) -> np.ndarray:  # fmt: skip
    """Each component's class: that of most of its voxels (ties: the lower class index). Components mix classes
    only where classes exclude one another and a detection's class flipped between slices or tiles, or where the
    model gave an object under two classes: then the lower-scoring detection's class (``runner_up``: node, class,
    voxels, from ``_runner_up_votes``) takes its share of the voxels, by score."""
    out = np.zeros(n, np.int64)
    if len(comp) == 0:
        return out
    out[comp] = cls
    mixed = np.zeros(n, bool)
    np.logical_or.at(mixed, comp, cls != out[comp])
    node, other, share = runner_up if runner_up is not None else (np.zeros(0, np.int64), np.zeros(0, np.int16), np.zeros(0))
    mixed[comp[node]] = True
    if mixed.any():  # votes only for the mixed ones: (component, class) -> voxels, the largest per component
        weight = area.astype(np.float64)
        np.subtract.at(weight, node, share)
        sel, alt = mixed[comp], mixed[comp[node]]
        key, inverse = np.unique(np.concatenate([comp[sel].astype(np.int64) * n_classes + cls[sel],
                                                 comp[node[alt]].astype(np.int64) * n_classes + other[alt]]),
                                 return_inverse=True)  # fmt: skip
        votes = np.bincount(inverse.ravel(), weights=np.concatenate([weight[sel], share[alt]]))
        order = np.lexsort((key % n_classes, -votes, key // n_classes))
        first = order[np.concatenate([[True], np.diff(key[order] // n_classes) != 0])]
        out[key[first] // n_classes] = key[first] % n_classes
    return out


def _count_sharing(comp, z, cls, area, n_classes: int, n_slices: int, stats: LinkStats) -> None:
    """Per class: the 2D instances whose object holds another instance of the same slice (``sharing_a_slice``)."""
    present = area > 0
    _, inverse, counts = np.unique(comp[present].astype(np.int64) * n_slices + z[present], return_inverse=True,
                                   return_counts=True)  # fmt: skip
    shared = counts[inverse.ravel()] > 1
    for c in range(n_classes):
        mine = cls[present] == c
        if mine.any():
            stats.sharing_a_slice[c] = (int(shared[mine].sum()), int(mine.sum()))


AUTO_MIN_OBJECTS = 5  # --min-slices auto: interior objects of two or more slices needed to tell a class's extent
AUTO_TYPICAL_SLICES = 3  # ... and the median slices they span, for one-slice objects to be out of place


def _clean_up(comp, comp_cls, area, z, voxels, n_classes: int, n_slices: int, rule: LinkRule, stats: LinkStats
              ) -> np.ndarray:  # fmt: skip
    """Per component: whether it meets its class's minimum voxels and slices; counts what is dropped. An object in
    the first or last slice meets the minimum slices whatever its extent: the volume's end cut it, its true extent is
    unknown."""
    n = len(voxels)
    z0 = np.full(n, np.iinfo(np.int64).max)
    z1 = np.full(n, -1)
    present = area > 0
    np.minimum.at(z0, comp[present], z[present])
    np.maximum.at(z1, comp[present], z[present])
    span, inside = z1 - z0 + 1, (z0 > 0) & (z1 < n_slices - 1) & (voxels > 0)
    min_vox = np.zeros(n_classes, np.int64)
    min_sl = np.zeros(n_classes, np.int64)
    min_vox[: len(rule.min_voxels)] = rule.min_voxels
    min_sl[: len(rule.min_slices)] = rule.min_slices
    for c in np.nonzero(min_sl == AUTO)[0]:
        min_sl[c] = _auto_min_slices(span[inside & (comp_cls == c)], int(c), stats)
    ok = (voxels >= min_vox[comp_cls]) & ((span >= min_sl[comp_cls]) | ~inside)
    drop = ~ok & (voxels > 0)
    for c in range(n_classes):
        mine = drop & (comp_cls == c)
        if mine.any():
            stats.dropped[c] = {"objects": int(mine.sum()), "voxels": int(voxels[mine].sum())}
    return ok


def _auto_min_slices(spans: np.ndarray, cls: int, stats: LinkStats) -> int:
    """``--min-slices auto`` for one class from the slices its interior objects span: 2 (one-slice objects dropped)
    where those of two or more slices are enough to tell and typically span ``AUTO_TYPICAL_SLICES`` or more; else 0.
    One-slice objects do not count towards the median: a model's specks can outnumber the objects."""
    long = spans[spans >= 2]
    median = float(np.median(long)) if len(long) else 0.0
    chosen = 2 if len(long) >= AUTO_MIN_OBJECTS and median >= AUTO_TYPICAL_SLICES else 0
    stats.min_slices_auto[cls] = {"interior_objects_of_2_or_more_slices": int(len(long)),
                                  "their_median_slices": median, "min_slices": chosen}  # fmt: skip
    return chosen


def _with_fills(frag: np.ndarray, per_row: np.ndarray, fills, grid: TileGrid) -> tuple[np.ndarray, np.ndarray]:
    """A slice's fragment rows followed by its border fills' (``stitch`` rule 4) as rows of the fragments that
    lent them (their class and score), and ``per_row`` (a value per fragment row) extended to match."""
    extra = fills.fragments()
    if len(extra) == 0:
        return frag, per_row
    rows = fragment_rows(frag, grid)(extra["iy"], extra["ix"], extra["local"])
    for name in ("cls", "score", "alt_cls", "alt_score"):
        extra[name] = frag[name][rows]
    return np.concatenate([frag, extra]), np.concatenate([per_row, per_row[rows]])


def _object_table(store, grid, n_slices, bases, comp, object_id, object_cls) -> np.ndarray:
    """The OBJECT table from the fragments (``object_id``: each component's provisional id 1..N, ``object_cls``
    their classes); writes each slice's lut. Final ids 1..N follow the objects' boxes: first slice, top, left (then
    last slice, bottom, right, class, voxels, centroid), so the same objects get the same ids whatever the tile grid
    or the order a model lists its detections in."""
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
        frag, obj = _with_fills(frag, obj, store.fills(z), grid)
        own = (frag["area"] > 0) & (obj > 0)
        o, f = obj[own].astype(np.int64), frag[own]
        a = f["area"].astype(np.float64)
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
    t["cls"] = object_cls
    v = np.maximum(t["voxels"], 1).astype(np.float64)
    t["score"] = weighted_score[1:] / v
    t["cz"], t["cy"], t["cx"] = sz[1:] / v, t["cy"] / v, t["cx"] / v
    # the last key first; the centroid decides only between objects of one box, class and size
    order = np.lexsort([t[k] for k in ("cx", "cy", "cz", "voxels", "cls", "x1", "y1", "z1", "x0", "y0", "z0")])
    t = t[order]
    t["id"] = np.arange(1, n_obj + 1, dtype=np.uint64)
    final = np.zeros(n_obj + 1, np.uint64)
    final[order + 1] = t["id"]
    for z in range(n_slices):  # the luts once the ids are final: a slice's instances again, not its fragments
        inst = store.instances(z)
        store.write_lut(z, final[object_id[comp[bases[z] + inst]]] if len(inst) else np.zeros(0, np.uint64))
    return t
