"""Synthetic volumes: laziness, determinism, window independence, URIs, pickling, and the ground-truth geometry
guarantees the pipeline's exactness tests rely on."""

import pickle
import time
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from cellseg_batch import synth
from cellseg_batch.errors import UserError
from cellseg_batch.read import Volume, open_volume
from cellseg_batch.synth import CLASSES, SyntheticEM, open_synthetic, open_synthetic_labels


def volume_labels(em: SyntheticEM, cls: str) -> np.ndarray:
    Z, Y, X = em.shape
    return np.stack([em.labels(cls, z, 0, Y, 0, X) for z in range(Z)])


# -- property checkers: each returns a list of violations ---------------------------------------------------------


def gap_violations(lab: np.ndarray) -> list:
    """Voxels whose 3x3x3 neighbourhood holds another nonzero id (objects closer than a 1-voxel gap)."""
    hi = ndimage.maximum_filter(lab, size=3, mode="constant", cval=0)
    lo = ndimage.minimum_filter(np.where(lab > 0, lab, np.iinfo(lab.dtype).max), size=3, mode="constant",
                                cval=np.iinfo(lab.dtype).max)
    bad = (lab > 0) & ((hi != lab) | (lo != lab))
    return sorted(set(lab[bad].tolist()))


def section_violations(lab: np.ndarray) -> list:
    """(id, z, why) for sections that are not one 4-connected region without holes, for z gaps, and for adjacent
    sections with IoU < 0.3 and overlap < 60 % of the smaller one."""
    out = []
    ids, inv = np.unique(lab, return_inverse=True)
    dense = inv.reshape(lab.shape)
    for n, box in enumerate(ndimage.find_objects(dense), start=1):
        if box is None:
            continue
        obj = dense[box] == n
        zs = np.flatnonzero(obj.any((1, 2)))
        if len(zs) != zs[-1] - zs[0] + 1:
            out.append((ids[n], int(box[0].start + zs[0]), "z gap"))
        for z in zs:
            sec = obj[z]
            if ndimage.label(sec)[1] != 1 or not np.array_equal(ndimage.binary_fill_holes(sec), sec):
                out.append((ids[n], int(box[0].start + z), "section"))
        for z in zs[:-1]:
            a, b = obj[z], obj[z + 1]
            if not b.any():
                continue
            inter = np.count_nonzero(a & b)
            iou = inter / np.count_nonzero(a | b)
            if iou < 0.3 and inter / min(a.sum(), b.sum()) < 0.6:
                out.append((ids[n], int(box[0].start + z), f"iou {iou:.2f}"))
    return out


def nesting_violations(cells: np.ndarray, organelles: np.ndarray, parents: dict) -> list:
    """Organelle ids with a voxel outside their own cell."""
    keys = np.array(sorted(parents), dtype=np.int64)
    owner = np.array([parents[k] for k in keys], dtype=np.int64)
    ids = organelles[organelles > 0].astype(np.int64)
    at = np.minimum(np.searchsorted(keys, ids), len(keys) - 1) if len(keys) else np.zeros_like(ids)
    expected = np.where(keys[at] == ids, owner[at], 0) if len(keys) else np.zeros_like(ids)
    wrong = cells[organelles > 0] != expected
    return sorted(set(ids[wrong].tolist()))


def test_checkers_catch_violations():
    lab = np.zeros((4, 12, 12), np.uint32)
    lab[1:3, 2:5, 2:5] = 1
    lab[1:3, 2:5, 6:9] = 2  # one empty column between: fine
    assert gap_violations(lab) == [] and section_violations(lab) == []
    touching = lab.copy()
    touching[2, 5, 5] = 3  # diagonal neighbour of 1 and 2
    assert gap_violations(touching) == [1, 2, 3]
    split = lab.copy()
    split[1, 3, 2:5] = 0  # the section of 1 at z=1 falls in two
    assert (1, 1, "section") in section_violations(split)
    holed = np.zeros((1, 7, 7), np.uint32)
    holed[0, 1:6, 1:6] = 1
    holed[0, 3, 3] = 0
    assert section_violations(holed) == [(1, 0, "section")]
    gap = np.zeros((3, 5, 5), np.uint32)
    gap[0, 1:4, 1:4] = gap[2, 1:4, 1:4] = 1
    assert (1, 0, "z gap") in section_violations(gap)
    shift = np.zeros((2, 5, 12), np.uint32)
    shift[0, 1:4, 0:5] = 1
    shift[1, 1:4, 4:9] = 1  # shifted: IoU 1/9, overlap 1/5 of the smaller
    assert section_violations(shift) == [(1, 0, "iou 0.11")]
    cells = np.zeros((1, 6, 6), np.uint32)
    cells[0, 1:5, 1:5] = 7
    org = np.zeros_like(cells)
    org[0, 2:4, 2:6] = 9  # pokes out of its cell
    assert nesting_violations(cells, org, {9: 7}) == [9]


# -- geometry guarantees on generated volumes ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=[(0, 0.5), (1, 0.5), (2, 1.0), (4, 0.25)], ids=lambda p: f"seed{p[0]}-s{p[1]}")
def generated(request):
    seed, scale = request.param
    em = SyntheticEM((24, 384, 384), seed, scale=scale)
    return em, {cls: volume_labels(em, cls) for cls in CLASSES}


def test_every_class_is_present(generated):
    em, labs = generated
    counts = {cls: len(np.unique(lab)) - 1 for cls, lab in labs.items()}
    assert all(counts[c] >= 2 for c in CLASSES), counts
    assert 0.25 < np.mean(labs["cell"] > 0) < 0.7


def test_same_class_objects_keep_a_gap(generated):
    _, labs = generated
    for cls, lab in labs.items():
        assert gap_violations(lab) == [], cls


def test_organelles_of_different_classes_are_disjoint_with_a_gap(generated):
    _, labs = generated
    merged = np.zeros_like(labs["cell"])
    for n, cls in enumerate(CLASSES[1:]):
        assert not np.any((merged > 0) & (labs[cls] > 0))
        merged = np.where(labs[cls] > 0, labs[cls] * 4 + n, merged)  # distinct ids across classes
    assert gap_violations(merged) == []


def test_organelles_lie_inside_their_cell(generated):
    em, labs = generated
    for cls in CLASSES[1:]:
        parents = {o["id"]: o["parent"] for o in em.objects(cls)}
        assert nesting_violations(labs["cell"], labs[cls], parents) == [], cls


def test_sections_are_single_regions_and_link_between_slices(generated):
    _, labs = generated
    for cls, lab in labs.items():
        assert section_violations(lab) == [], cls


def test_objects_match_the_labels(generated):
    em, labs = generated
    for cls, lab in labs.items():
        objs = em.objects(cls)
        ids = [o["id"] for o in objs]
        assert len(set(ids)) == len(ids) and 0 not in ids
        present, dense, voxels = np.unique(lab, return_inverse=True, return_counts=True)
        assert sorted(ids) == present[1:].tolist(), cls
        boxes = ndimage.find_objects(dense.reshape(lab.shape))
        for o in objs:
            n = int(np.searchsorted(present, o["id"]))
            assert o["bbox"] == tuple(v for s in boxes[n - 1] for v in (s.start, s.stop))
            assert o["voxels"] == voxels[n]
    assert [o["id"] for o in em.objects("cell", z_range=(5, 6))] == np.unique(labs["cell"][5])[1:].tolist()


# -- laziness, determinism, windows -------------------------------------------------------------------------------


def test_same_parameters_give_identical_volumes_and_seeds_differ():
    a, b = SyntheticEM((8, 300, 300), 5, scale=0.5), SyntheticEM((8, 300, 300), 5, scale=0.5)
    c = SyntheticEM((8, 300, 300), 6, scale=0.5)
    for z in (0, 7):
        assert np.array_equal(a.image(z, 0, 300, 0, 300), b.image(z, 0, 300, 0, 300))
        for cls in CLASSES:
            assert np.array_equal(a.labels(cls, z, 0, 300, 0, 300), b.labels(cls, z, 0, 300, 0, 300))
    assert not np.array_equal(a.image(3, 0, 300, 0, 300), c.image(3, 0, 300, 0, 300))
    assert not np.array_equal(a.labels("cell", 3, 0, 300, 0, 300), c.labels("cell", 3, 0, 300, 0, 300))


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_windows_equal_crops_of_the_full_slice(dtype):
    em = SyntheticEM((3, 600, 640), 7, dtype=dtype, scale=0.5)
    for z in range(3):
        full = em.image(z, 0, 600, 0, 640)
        labs = {cls: em.labels(cls, z, 0, 600, 0, 640) for cls in CLASSES}
        # 200/213 steps straddle the 256-px noise blocks and the site boxes at varying offsets.
        for y0 in range(0, 600, 200):
            for x0 in range(0, 640, 213):
                y1, x1 = min(y0 + 200, 600), min(x0 + 213, 640)
                assert np.array_equal(em.image(z, y0, y1, x0, x1), full[y0:y1, x0:x1]), (z, y0, x0)
                for cls in CLASSES:
                    assert np.array_equal(em.labels(cls, z, y0, y1, x0, x1), labs[cls][y0:y1, x0:x1])
        assert np.array_equal(em.image(z, 255, 258, 1, 2), full[255:258, 1:2])
    assert any(labs[cls].any() for cls in CLASSES[1:])


def test_output_and_ids_do_not_depend_on_what_was_generated_before():
    warm = SyntheticEM((4, 512, 512), 9, scale=0.5)
    for z in range(4):
        warm.image(z, 0, 512, 0, 512)
    cold = SyntheticEM((4, 512, 512), 9, scale=0.5)
    for z in (3, 1):
        assert np.array_equal(cold.image(z, 100, 300, 150, 420), warm.image(z, 100, 300, 150, 420))
        for cls in reversed(CLASSES):
            assert np.array_equal(cold.labels(cls, z, 300, 512, 0, 200), warm.labels(cls, z, 300, 512, 0, 200))


def test_huge_volume_reads_a_window_quickly_in_little_memory():
    tracemalloc.start()
    try:
        t = time.perf_counter()
        em = SyntheticEM((100_000, 100_000, 100_000), 1)
        image = em.image(50_000, 60_000, 60_512, 70_000, 70_512)
        cells = em.labels("cell", 50_000, 60_000, 60_512, 70_000, 70_512)
        elapsed = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.shape == cells.shape == (512, 512) and cells.any()
    assert elapsed < 3.0 and peak < 64 << 20, (elapsed, peak)


def test_image_content_and_ranges():
    em8 = SyntheticEM((2, 512, 512), 4)
    em16 = SyntheticEM((2, 512, 512), 4, dtype="uint16")
    img8, img16 = em8.image(1, 0, 512, 0, 512), em16.image(1, 0, 512, 0, 512)
    assert img8.dtype == np.uint8 and img16.dtype == np.uint16
    assert 8000 <= img16.min() and img16.max() <= 50000 and img16.max() - img16.min() > 20000
    cell = em8.labels("cell", 1, 0, 512, 0, 512) > 0
    inner = ndimage.binary_erosion(cell, iterations=6)
    outer = ~ndimage.binary_dilation(cell, iterations=6)
    assert img8[outer].mean() - img8[inner].mean() > 40  # resin bright, cytoplasm darker
    for cls in CLASSES[1:]:
        mask = em8.labels(cls, 1, 0, 512, 0, 512) > 0
        if mask.sum() > 50:
            assert img8[ndimage.binary_erosion(mask)].mean() != pytest.approx(img8[inner].mean(), abs=5), cls


# -- API: URIs, volumes, pickling ---------------------------------------------------------------------------------


def test_uri_options():
    em = SyntheticEM.from_uri("synth:24x512x256,seed=3,dtype=uint16,scale=0.5")
    assert em.shape == (24, 512, 256) and em.seed == 3 and em.dtype == np.uint16 and em.scale == 0.5
    assert em.pixel_size_nm == (40.0, 20.0, 20.0) and em.classes == CLASSES
    assert SyntheticEM.from_uri("synth:2x3x4").pixel_size_nm == (40.0, 10.0, 10.0)


@pytest.mark.parametrize("uri", [
    "synth:", "synth:24x512", "synth:0x512x512", "synth:24x512x512x3", "synth:-1x5x5", "synth:24x512x512,seed=-1",
    "synth:24x512x512,seed=x", "synth:24x512x512,dtype=float32", "synth:24x512x512,scale=0", "synth:2x2x2,scale=nan",
    "synth:24x512x512,color=red", "synth:24x512x512,seed=1,seed=2", "synth:24x512x512,seed", "synth24x512x512",
    "synth:24x512x512,,seed=1",
])
def test_bad_uris_raise_user_errors(uri):
    with pytest.raises(UserError) as err:
        SyntheticEM.from_uri(uri)
    assert "\n" not in str(err.value)


def test_user_errors_for_bad_arguments():
    with pytest.raises(UserError):
        SyntheticEM((4, 0, 4))
    with pytest.raises(UserError):
        SyntheticEM((4, 4, 4), dtype="int8")
    with pytest.raises(UserError):
        SyntheticEM((4, 4, 4)).labels("nucleus", 0, 0, 4, 0, 4)


def test_volumes_read_the_generator_and_pickle_small():
    uri = "synth:6x300x320,seed=2,scale=0.5"
    em = SyntheticEM.from_uri(uri)
    vol = open_volume(uri)
    assert isinstance(vol, Volume) and isinstance(open_synthetic(uri), Volume)
    assert vol.shape == (6, 300, 320) and vol.dtype == np.uint8 and vol.pixel_size_nm == (40.0, 20.0, 20.0)
    layers = open_synthetic_labels(uri)
    assert [layer.classes for layer in layers] == list(CLASSES)
    for volume in [vol, *(layer.volume for layer in layers)]:
        data = pickle.dumps(volume)
        assert len(data) < 1000
        synth._generator.cache_clear()  # as in a fresh worker process
        clone = pickle.loads(data)
        assert clone._em is not volume._em
        assert np.array_equal(clone.read(3, 10, 200, 20, 220), volume.read(3, 10, 200, 20, 220))
    assert np.array_equal(vol.read(4, 0, 300, 0, 320), em.image(4, 0, 300, 0, 320))
    for layer in layers:
        assert layer.volume.dtype == np.uint32
        assert np.array_equal(layer.volume.read(4, 0, 300, 0, 320), em.labels(layer.classes, 4, 0, 300, 0, 320))
    clone = pickle.loads(pickle.dumps(em))
    for z in (0, 5):
        ours, theirs = (g.labels("alpha_granule", z, 0, 300, 0, 320) for g in (clone, em))
        assert np.array_equal(ours, theirs)


def test_windows_beyond_the_volume_are_clipped_like_slices():
    em = SyntheticEM((2, 100, 120), 0)
    assert em.image(0, 50, 400, 100, 400).shape == (50, 20)
    assert em.labels("cell", 1, -5, 10, 0, 10).shape == (10, 10)
    with pytest.raises(IndexError):
        em.image(2, 0, 10, 0, 10)


def test_module_registers_its_reader():
    from cellseg_batch.read import VOLUME_OPENERS

    assert VOLUME_OPENERS["synth:"] is synth.open_synthetic
