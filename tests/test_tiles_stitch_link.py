"""The tile grid, the stitching rule and the linking rule, on small hand-made arrays."""

import numpy as np
import pytest

from cellseg_batch.errors import UserError
from cellseg_batch.link import link_pair
from cellseg_batch.predict.base import paint_instances
from cellseg_batch.stitch import contingency, match_labels, match_tiles
from cellseg_batch.tiles import Box, TileGrid


@pytest.mark.parametrize("shape,tile,overlap", [((512, 512), 256, 32), ((1000, 300), 128, 16), ((100, 1000), 1024, 128),
                                                ((257, 259), 64, 0), ((70, 70), 64, 32)])
def test_cores_partition_the_slice_and_windows_hold_their_core(shape, tile, overlap):
    g = TileGrid(*shape, tile, overlap)
    owner = np.zeros(shape, int)
    for iy, ix in g.positions():
        core, win = g.core(iy, ix), g.window(iy, ix)
        owner[core.y0 : core.y1, core.x0 : core.x1] += 1
        assert 0 <= win.y0 and win.y1 <= shape[0] and 0 <= win.x0 and win.x1 <= shape[1]
        assert win.shape[0] == min(tile, shape[0]) and win.shape[1] == min(tile, shape[1])
        assert win.intersect(core) == core
        # an interior core edge is at least overlap/2 from the window edge (context for the predictor)
        if core.y0 > 0:
            assert core.y0 - win.y0 >= overlap // 2 or win.y0 == 0
        if core.x1 < shape[1]:
            assert win.x1 - core.x1 >= overlap // 2 or win.x1 == shape[1]
    assert (owner == 1).all()


@pytest.mark.parametrize("size,tile,overlap", [(2048, 256, 32), (2016, 256, 32), (2017, 256, 32), (4096, 1024, 32),
                                               (1000, 64, 0), (513, 64, 2), (300, 256, 32), (256, 256, 32), (90, 64, 16)])
def test_the_grid_needs_no_more_windows_than_a_sliding_window(size, tile, overlap):
    g = TileGrid(size, size, tile, overlap)
    step = tile - overlap
    sliding = len(range(0, max(size - tile, 0) + step, step))  # windows at 0, step, ... until one reaches the end
    assert g.ny == g.nx == sliding
    for i in range(g.ny):
        core, win = g.core(i, i), g.window(i, i)
        # every interior core border keeps overlap/2 of context, also next to the slice's edges
        assert core.y0 == 0 or core.y0 - win.y0 >= overlap // 2
        assert core.y1 == size or win.y1 - core.y1 >= overlap // 2
        assert core.shape[0] <= g.core_max
    box = Box(size // 3, size // 3 + 1, 0, size)
    assert g.cores_in(box) == [p for p in g.positions() if g.core(*p).intersect(box)]


@pytest.mark.parametrize("tile,overlap", [(8, 0), (256, 3), (256, 200)])
def test_bad_tile_settings_are_user_errors(tile, overlap):
    with pytest.raises(UserError):
        TileGrid(512, 512, tile, overlap)


def _layers(*masks):
    return paint_instances(np.stack(masks), np.zeros(len(masks), int), np.linspace(0.5, 0.9, len(masks)), 1).labels


def test_match_tiles_joins_the_same_object_and_not_its_neighbour():
    # two tiles sharing columns 8..11; object A crosses the border, object B is seen only by the right tile
    wa, wb = Box(0, 10, 0, 12), Box(0, 10, 8, 20)
    a_obj = np.zeros((10, 20), bool)
    a_obj[2:6, 5:14] = True
    b_obj = np.zeros((10, 20), bool)
    b_obj[7:9, 10:18] = True
    la = _layers(a_obj[:, 0:12])
    lb = _layers(a_obj[:, 8:20], b_obj[:, 8:20])
    matches = match_tiles(la, wa, lb, wb, 0.5)
    a_id = la[0][3, 6]
    b_id = lb[0][3, 0]
    assert matches.tolist() == [[a_id, b_id]]


def test_match_tiles_is_one_to_one_below_iou_half():
    wa = wb = Box(0, 4, 0, 8)
    big = np.zeros((4, 8), bool)
    big[:, :] = True
    left, right = np.zeros((4, 8), bool), np.zeros((4, 8), bool)
    left[:, :4], right[:, 4:] = True, True
    m = match_tiles(_layers(big), wa, _layers(left, right), wb, 0.3)
    assert len(m) == 1  # IoU 0.5 with each half: only one may continue the whole


@pytest.mark.parametrize("iou_min", [0.25, 0.5])
@pytest.mark.parametrize("seed", range(6))
def test_match_labels_equals_the_best_one_to_one_assignment_of_every_pair(iou_min, seed):
    # the assignment is solved only where an instance has two candidates: elsewhere the pairs are kept as they are
    from scipy.optimize import linear_sum_assignment

    rng = np.random.default_rng(seed)
    la, lb = np.zeros((1, 40, 40), np.uint16), np.zeros((1, 40, 40), np.uint16)
    for layer in (la, lb):
        for k in range(1, 9):  # boxes that overlap within and across the layers, as two models' instances would
            y, x, h, w = rng.integers(0, 30), rng.integers(0, 30), rng.integers(3, 12), rng.integers(3, 12)
            layer[0, y : y + h, x : x + w] = k
    ia, ib, inter = contingency(la[0], lb[0])
    iou = inter / (np.bincount(la[0].ravel())[ia] + np.bincount(lb[0].ravel())[ib] - inter)
    ok = iou >= iou_min
    cost = np.zeros((9, 9))
    cost[ia[ok], ib[ok]] = -iou[ok]
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < 0
    expected = sorted(map(tuple, np.stack([rows[keep], cols[keep]], axis=1).tolist()))
    assert sorted(map(tuple, match_labels(la, lb, iou_min).tolist())) == expected


def test_link_pair_hungarian_keeps_two_side_by_side_objects_apart():
    # slice a: instances 0 and 1; slice b: instance 0 overlaps a0 strongly and a1 weakly, b1 overlaps a1
    cls = np.zeros(2, np.int16)
    area_a, area_b = np.array([100, 100]), np.array([100, 100])
    ia, ib, inter = np.array([0, 1, 1]), np.array([0, 0, 1]), np.array([80, 30, 60])
    links, healed = link_pair(cls, area_a, cls, area_b, ia, ib, inter, 0.25, 0.5)
    assert sorted(map(tuple, links.tolist())) == [(0, 0), (1, 1)]
    assert healed == 0


def test_link_pair_heals_a_shrinking_cap_and_a_branch():
    cls = np.zeros(3, np.int16)
    # a0 (area 400) continues as b0 (area 300); b1 (area 20) is a small branch inside a0
    area_a, area_b = np.array([400, 50, 50]), np.array([300, 20, 50])
    ia, ib, inter = np.array([0, 0]), np.array([0, 1]), np.array([290, 19])
    links, healed = link_pair(cls, area_a, cls, area_b, ia, ib, inter, 0.25, 0.5)
    assert sorted(map(tuple, links.tolist())) == [(0, 0), (0, 1)]
    assert healed == 1


def test_link_pair_is_class_aware():
    links, _ = link_pair(np.array([0], np.int16), np.array([50]), np.array([1], np.int16), np.array([50]),
                         np.array([0]), np.array([0]), np.array([50]), 0.25, 0.5)
    assert len(links) == 0


def _random_boxes(rng, n: int, h: int = 40, w: int = 50) -> np.ndarray:
    """n overlapping rectangular masks of random size and place."""
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        y, x = rng.integers(0, h - 5), rng.integers(0, w - 5)
        masks[i, y : y + rng.integers(3, 20), x : x + rng.integers(3, 20)] = True
    return masks


@pytest.mark.parametrize("seed", range(4))
def test_paint_instances_highest_score_wins_and_ids_stay_dense(seed):
    rng = np.random.default_rng(seed)
    masks = _random_boxes(rng, 12)
    n = len(masks)
    masks[3] = masks[2]  # an instance hidden under a higher-scoring twin of its class
    classes = rng.integers(0, 2, n)
    classes[3] = classes[2]
    scores = rng.random(n)
    scores[3] = scores[2] / 2
    tile = paint_instances(masks, classes, scores, 2)
    # reference: per class, per pixel, the highest score among the masks covering it
    visible = set()
    for c in range(2):
        cover = np.where(masks & (classes == c)[:, None, None], scores[:, None, None], -1)
        best = cover.max(0)
        painted = tile.labels[c] > 0
        assert (painted == (best >= 0)).all()
        assert np.allclose(tile.scores[tile.labels[c][painted].astype(int) - 1], best[painted])
        visible |= set(np.unique(cover.argmax(0)[painted]).tolist())
    ids = np.unique(tile.labels[tile.labels > 0])
    assert 3 not in visible  # the hidden one is dropped, and ids stay 1..count
    assert list(ids) == list(range(1, tile.count + 1)) and tile.count == len(visible)


@pytest.mark.parametrize("seed", range(4))
def test_paint_instances_exclusive_classes_share_a_layer_and_slivers_are_dropped(seed):
    rng = np.random.default_rng(seed)
    masks = _random_boxes(rng, 14)
    n, h, w = masks.shape
    classes = rng.integers(0, 3, n)  # class 0 nests the others; classes 1 and 2 exclude one another: layer 1
    scores = rng.random(n)
    tile = paint_instances(masks, classes, scores, 3, layer_of=[0, 1, 1], min_visible=0.5)
    assert not tile.labels[2].any()
    # reference: per layer and pixel the highest-scoring mask wins; an instance keeping less than half its mask is
    # dropped (its pixels become background)
    for layer, group in ((0, [0]), (1, [1, 2])):
        mine = np.isin(classes, group)
        cover = np.where(masks & mine[:, None, None], scores[:, None, None], -1)
        winner = np.where(cover.max(0) >= 0, cover.argmax(0), -1)
        want = np.zeros((h, w), np.float64)
        for i in np.flatnonzero(mine):
            shown = winner == i
            if shown.any() and shown.sum() >= 0.5 * masks[i].sum():
                want[shown] = scores[i]
        got = np.where(tile.labels[layer] > 0, tile.scores[tile.labels[layer].astype(int) - 1], 0)
        assert np.allclose(got, want, atol=1e-6)
    ids = np.unique(tile.labels[tile.labels > 0])
    assert list(ids) == list(range(1, tile.count + 1))
    source = np.array([np.flatnonzero(np.isclose(scores, s))[0] for s in tile.scores])  # kept -> input index
    assert (tile.classes == classes[source]).all()
    # runner-ups: a dropped detection of the shared layer whose mask lies at least half under one kept instance of
    # the other class gives that one its class and score (the best such); none elsewhere
    mine = np.isin(classes, [1, 2])
    cover = np.where(masks & mine[:, None, None], scores[:, None, None], -1)
    winner = np.where(cover.max(0) >= 0, cover.argmax(0), -1)
    want_alt = {}
    for j in sorted(set(np.flatnonzero(mine)) - set(source.tolist()), key=lambda j: scores[j]):
        under = winner[masks[j]]
        under = under[(under >= 0) & (under != j)]
        if len(under):
            top, count = np.unique(under, return_counts=True)
            i = top[np.argmax(count)]
            if 2 * count.max() >= masks[j].sum() and i in source and classes[i] != classes[j]:
                want_alt[int(i)] = (int(classes[j]), float(scores[j]))
    got_alt = {int(i): (int(c), float(a)) for i, c, a in zip(source, tile.alt_classes, tile.alt_scores) if c >= 0}
    assert got_alt.keys() == want_alt.keys() and all(np.isclose(got_alt[i][1], want_alt[i][1]) for i in got_alt)
    assert all(got_alt[i][0] == want_alt[i][0] for i in got_alt)


def test_instances_lose_their_pixels_where_the_volume_holds_no_data():
    """Pixels of no data (fill, NaN) belong to no instance; one left with less than half its pixels is dropped, the
    ids renumbered densely, the runner-up classes kept with their instances."""
    from cellseg_batch.predict.base import TileLabels, without_no_data

    labels = np.zeros((2, 20, 20), np.uint16)
    labels[0, 0:10, 0:10] = 1  # 30% over no data: kept, less those pixels
    labels[1, 10:20, 0:10] = 2  # 80% over no data: dropped
    labels[1, 0:10, 10:20] = 3  # clear of it
    tile = TileLabels(labels, np.array([0, 1, 2], np.int16), np.array([0.9, 0.8, 0.7], np.float32),
                      alt_classes=np.array([-1, 2, 1], np.int16), alt_scores=np.array([0, 0.5, 0.4], np.float32))  # fmt: skip
    no_data = np.zeros((20, 20), bool)
    no_data[7:20, 0:10] = True
    no_data[10:12, 0:10] = False
    out = without_no_data(tile, no_data)
    assert out.count == 2 and out.classes.tolist() == [0, 2] and np.allclose(out.scores, [0.9, 0.7])
    assert out.alt_classes.tolist() == [-1, 1] and np.allclose(out.alt_scores, [0, 0.4])
    assert (out.labels[0] == np.where(no_data, 0, labels[0])).all()
    assert (out.labels[1] == np.where(labels[1] == 3, 2, 0)).all()  # instance 2 gone (its 20% too), 3 is now 2
    assert without_no_data(tile, np.zeros((20, 20), bool)).count == 3


def test_paint_instances_keeps_a_dropped_duplicates_class_as_runner_up():
    """One object given twice under two exclusive classes: the lower-scoring one is dropped and its class and score
    stay with the kept one; a duplicate of the same class, or of a class with a layer of its own, gives none."""
    masks = np.zeros((5, 32, 32), bool)
    masks[0, 4:14, 4:14] = masks[1, 5:14, 4:14] = True  # mitochondrion 0.8, and the same object as a granule 0.6
    masks[2, 18:28, 4:14] = masks[3, 18:28, 4:14] = True  # a granule 0.9 and a granule duplicate 0.5
    masks[4, 18:28, 18:28] = True  # a cell 0.7, nothing under it
    classes, scores = np.array([1, 2, 2, 2, 0]), np.array([0.8, 0.6, 0.9, 0.5, 0.7])
    tile = paint_instances(masks, classes, scores, 3, layer_of=[0, 1, 1], min_visible=0.5)
    assert tile.count == 3
    alt = {int(c): (int(a), round(float(s), 3)) for c, a, s in zip(tile.classes, tile.alt_classes, tile.alt_scores)}
    assert alt == {1: (2, 0.6), 2: (-1, 0.0), 0: (-1, 0.0)}
    # the same masks without exclusive classes: nothing is dropped on another class's account
    tile = paint_instances(masks, classes, scores, 3, min_visible=0.5)
    assert tile.count == 4 and (tile.alt_classes == -1).all()


def _stitch_tiles(truth: np.ndarray, grid: TileGrid, missed: dict, fill: bool = True):
    """stitch_slice over tiles that show ``truth`` (1, H, W) in their windows, less the ids ``missed[(iy, ix)]``
    (a detector that missed them there)."""
    from cellseg_batch.stitch import stitch_slice, tile_bands

    rows = {}
    for iy, ix in grid.positions():
        w = grid.window(iy, ix)
        labels = truth[:, w.y0 : w.y1, w.x0 : w.x1].copy()
        labels[np.isin(labels, missed.get((iy, ix), []))] = 0
        rows.setdefault(iy, []).append(tile_bands(labels, grid, iy, ix))
    return stitch_slice(lambda iy: np.stack(rows[iy]), grid, 0.5, fill)


def test_border_fill_completes_an_object_the_owner_missed_and_nothing_else():
    """Rule 4: the east tile saw object 1 cross the border and end 10 px past it; the west tile missed it: the west
    core's background in the band takes it. Object 5 crosses too but runs on to the east window's edge (the west
    tile saw more of it than the east one and said no): no fill. Object 2 (only in the west core, seen by the east
    tile past its own core) fills nothing; object 3, which both saw (matched), keeps the owner's own mask."""
    grid = TileGrid(100, 200, 128, 32)  # cores x [0, 100) and [100, 200); the band both saw: x [84, 116)
    truth = np.zeros((1, 100, 200), np.uint16)
    truth[0, 10:30, 90:180] = 1  # crosses the border, 10 px into the west core
    truth[0, 40:50, 86:98] = 2  # west core only, inside the east window's margin
    truth[0, 60:90, 40:160] = 3  # crosses; both tiles see it
    truth[0, 52:58, 60:150] = 5  # crosses, and reaches past the east window's edge (x 84)
    fills = _stitch_tiles(truth, grid, {(0, 0): [1, 2, 5]}).fills
    assert len(fills.patches) == 1
    p = fills.patches[0]
    assert (p["iy"], p["ix"], p["jy"], p["jx"], p["layer"]) == (0, 0, 0, 1, 0)
    filled = np.zeros((100, 200), np.uint16)
    filled[p["y0"] : p["y1"], p["x0"] : p["x1"]] = fills.patch(0)
    east_local_of_1 = int(np.unique(fills.patch(0)[fills.patch(0) > 0])[0])
    assert ((filled > 0) == (truth[0] == 1) & (np.arange(200) < 100)).all()  # all of object 1 in the west core
    assert fills.pixels == 20 * 10
    rows = fills.fragments()
    assert len(rows) == 1 and rows[0]["local"] == east_local_of_1 and rows[0]["area"] == 200
    assert (rows[0]["y0"], rows[0]["y1"], rows[0]["x0"], rows[0]["x1"]) == (10, 30, 90, 100)
    assert rows[0]["sx"] / rows[0]["area"] == pytest.approx(94.5)
    # the same tiles with the rule off, or with nothing missed: no fill
    assert _stitch_tiles(truth, grid, {(0, 0): [1, 2, 5]}, fill=False).fills.pixels == 0
    assert _stitch_tiles(truth, grid, {}).fills.pixels == 0


def test_border_fill_gives_a_corner_pixel_once():
    """An object across a four-core corner that only the north-west tile missed: its east and south neighbours
    each saw its part in that core's corner (within both their bands). Each pixel is filled once, from the east
    one (first in raster order)."""
    grid = TileGrid(200, 200, 128, 32)  # cores [0, 100) and [100, 200) on both axes; bands 16 px deep
    truth = np.zeros((1, 200, 200), np.uint16)
    truth[0, 88:160, 88:160] = 7

    def sources(fills):
        return {(int(p["iy"]), int(p["ix"]), int(p["jy"]), int(p["jx"])) for p in fills.patches}

    south_only = _stitch_tiles(truth, grid, {(0, 0): [7], (0, 1): [7]}).fills  # the east one missed it too
    assert sources(south_only) == {(0, 0, 1, 0), (0, 1, 1, 1)} and south_only.pixels == 12 * 12 + 12 * 60
    fills = _stitch_tiles(truth, grid, {(0, 0): [7]}).fills
    assert sources(fills) == {(0, 0, 0, 1)} and fills.pixels == 12 * 12
    filled = np.zeros((200, 200), np.int64)
    for k, p in enumerate(fills.patches):
        filled[p["y0"] : p["y1"], p["x0"] : p["x1"]] += fills.patch(k) > 0
    assert (filled[88:100, 88:100] == 1).all() and filled.sum() == 12 * 12


def _blobs(rng, shape, n, fill):
    """Label image of n overlapping boxes (later ones on top) over about ``fill`` of the image, as masks come."""
    ids = np.zeros(shape, np.uint16)
    for k in range(1, n + 1):
        h, w = (max(1, int(s * fill ** 0.5 * rng.uniform(0.3, 1.0))) for s in shape)
        y, x = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
        ids[y : y + h, x : x + w] = k
    return ids


# dense (cells), sparse (organelles), empty, noise-like layers, ids up to 60,000 (pairs counted by sorting, not in
# a dense table) and objects wider than the image (a run would go on into the next row), whole and as strided
# views: noise takes the per-pixel path (runs too short), the others per run
_LAYOUTS = [("dense", 40, 0.3), ("sparse", 12, 0.01), ("empty", 0, 0.0), ("noise", 0, 0.0), ("wide", 40, 0.3),
            ("stripes", 12, 0.0)]  # fmt: skip


def _layout(rng, kind, n, fill):
    if kind == "noise":
        return rng.integers(0, 30, (60, 70)).astype(np.uint16), 29
    if kind == "stripes":
        ids = np.repeat(rng.permutation(np.arange(1, n + 1, dtype=np.uint16)), 5)[:, None] * np.ones(70, np.uint16)
        ids[rng.integers(0, 60, 8), rng.integers(0, 70, 8)] = 0
        return ids, n
    ids = _blobs(rng, (60, 70), n, fill) if n else np.zeros((60, 70), np.uint16)
    if kind == "wide":
        ids *= 1500
        n *= 1500
    return ids, n


@pytest.mark.parametrize("kind,n,fill", _LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_fragment_statistics_equal_each_id_counted_pixel_by_pixel(kind, n, fill, seed):
    from cellseg_batch.stitch import _layer_statistics

    rng = np.random.default_rng(seed)
    image, n = _layout(rng, kind, n, fill)
    for ids in (image, image[3:50, 5:61], image[::2, ::3]):
        stats = _layer_statistics(ids, n)
        present = [k for k in range(1, n + 1) if (ids == k).any()]
        if not present:
            assert stats is None
            continue
        here, area, sy, sx, y0, y1, x0, x1 = stats
        assert here.tolist() == [k - 1 for k in present]
        for i, k in enumerate(present):
            yy, xx = np.nonzero(ids == k)
            assert area[i] == len(yy) and (y0[i], y1[i], x0[i], x1[i]) == (yy.min(), yy.max() + 1, xx.min(), xx.max() + 1)
            assert sy[i] == pytest.approx(yy.sum()) and sx[i] == pytest.approx(xx.sum())


@pytest.mark.parametrize("kind,n,fill", _LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_contingency_equals_the_pairs_counted_pixel_by_pixel(kind, n, fill, seed):
    rng = np.random.default_rng(seed)
    a, _ = _layout(rng, kind, n, fill)
    b, _ = _layout(rng, kind, n, fill)
    b[: len(b) // 2] = a[: len(a) // 2]  # half the pixels shared, as the next slice shares most of an object
    for x, y in ((a, b), (a[3:50, 5:61], b[3:50, 5:61]), (a[::2, ::3], b[::2, ::3]), (a.ravel()[::7], b.ravel()[::7])):
        both = (x > 0) & (y > 0)
        pairs, counts = np.unique(np.stack([x[both], y[both]]), axis=1, return_counts=True)
        ia, ib, inter = contingency(x, y)
        assert ia.tolist() == pairs[0].tolist() and ib.tolist() == pairs[1].tolist() and inter.tolist() == counts.tolist()


@pytest.mark.parametrize("kind,n,fill", _LAYOUTS)
@pytest.mark.parametrize("seed", range(3))
def test_counts_from_runs_of_a_padded_slot_equal_those_from_the_pixels(kind, n, fill, seed):
    # an actor counts a core's fragment statistics and its z-overlaps from the runs of the zero-padded store slot
    # that holds it at its origin (one pass over each layer); they must equal the counts over the core's pixels
    from cellseg_batch.stitch import _layer_statistics, label_runs, zoverlaps

    rng = np.random.default_rng(seed)
    (a, _), (b, _) = _layout(rng, kind, n, fill), _layout(rng, kind, n, fill)
    b[:30] = a[:30]
    slots = np.zeros((2, 2, 64, 80), np.uint16)  # (slice, layer, slot rows, slot columns)
    slots[0, 0, :60, :70], slots[1, 0, :60, :70] = a, b
    slots[:, 1, :60, :70] = slots[:, 0, :60, :70][:, ::-1]  # a second layer
    cores = slots[:, :, :60, :70]
    runs = [[label_runs(layer) for layer in slot] for slot in slots]
    for layer in range(2):
        top = int(cores[0, layer].max())
        expected, got = _layer_statistics(cores[0, layer], top), _layer_statistics(cores[0, layer], top, runs[0][layer])
        assert (expected is None) == (got is None)
        if expected is not None:
            assert all(np.allclose(e, g) for e, g in zip(expected, got))
    plain = zoverlaps(cores[0], cores[1], 2, 3)
    assert zoverlaps(cores[0], cores[1], 2, 3, runs[0], runs[1]).tolist() == plain.tolist()
    assert zoverlaps(cores[0], cores[1], 2, 3, runs[0], None).tolist() == plain.tolist()  # one side without runs
    unpadded = [[label_runs(layer) for layer in core] for core in cores]  # runs that end at the image's last pixel
    assert zoverlaps(cores[0], cores[1], 2, 3, unpadded[0], unpadded[1]).tolist() == plain.tolist()
