"""The labels predictor through the whole pipeline (real Ray, real zarr) reproduces ground-truth 3D instances
exactly, with tiles much smaller than the largest objects; and per slice on a real EM stack."""

import json

import numpy as np
import pytest
import tifffile

from cellseg_batch.synth import CLASSES
from conftest import SHARED_DATA, assert_same_instances, cli, labels_of


@pytest.mark.parametrize("layout", ["blobs", "no background", "empty", "one id", "wide ids", "signed", "noise"])
def test_labels_are_renumbered_as_fastremap_numbers_them(layout):
    """Tile-local ids 1..n in the order the stack's ids first appear, 0 kept; counted per run of one id, or per
    pixel where the image is noise-like (no runs)."""
    import fastremap

    from cellseg_batch.predict.labels_predictor import renumber
    from cellseg_batch.stitch import label_runs

    rng = np.random.default_rng(3)
    blobs = np.repeat(np.repeat(rng.integers(0, 40, (20, 30)), 16, 0), 16, 1)  # 320 x 480, runs of 16+ pixels
    ids = {"blobs": blobs.astype(np.uint32), "no background": (blobs + 1).astype(np.uint16),
           "empty": np.zeros((50, 60), np.uint8), "one id": np.full((33, 17), 7, np.uint32),
           "wide ids": blobs.astype(np.uint64) * 2**40, "signed": blobs[:, :77].astype(np.int64),
           "noise": rng.integers(0, 1000, (64, 64)).astype(np.uint32)}[layout]  # fmt: skip
    assert (label_runs(ids) is None) == (layout == "noise")
    local, original = renumber(ids)
    expected, mapping = fastremap.renumber(ids, preserve_zero=True, in_place=False)
    assert np.array_equal(local, expected)
    assert original[0] == 0 and len(original) == len(set(mapping) - {0}) + 1
    assert np.array_equal(original[local], ids)


def test_a_mask_given_as_labels_is_refused_in_one_line(tmp_path):
    """A binary mask (a pixel classifier's output) as a label stack: its id in many pieces per slice would be one
    2D instance per tile, so the objects would depend on the tile size. Refused, with how to fix it; the same
    pieces given their own ids run."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:384, :384]
    mask = np.zeros((384, 384), bool)
    for cy, cx, r in zip(rng.integers(20, 364, 40), rng.integers(20, 364, 40), rng.integers(6, 30, 40)):
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    pieces, n = ndimage.label(mask, structure=np.ones((3, 3)))
    assert n > 10
    tifffile.imwrite(tmp_path / "volume.tif", np.repeat(np.where(mask, 200, 30).astype(np.uint8)[None], 4, 0),
                     photometric="minisblack")  # fmt: skip
    tifffile.imwrite(tmp_path / "mask.tif", np.repeat(mask.astype(np.uint8)[None], 4, 0), photometric="minisblack")
    tifffile.imwrite(tmp_path / "pieces.tif", np.repeat(pieces.astype(np.uint16)[None], 4, 0), photometric="minisblack")
    args = ("--classes", "cell", "--tile", 96, "--overlap", 16, "--no-progress", "--no-image")
    refused = cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "mask.tif", *args,
                  "--out", tmp_path / "mask.zarr", check=False)  # fmt: skip
    assert refused.returncode == 2 and "separate pieces in slice 0" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "mask.zarr").exists()
    cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "pieces.tif", *args,
        "--out", tmp_path / "pieces.zarr")  # fmt: skip
    assert_same_instances(labels_of(tmp_path / "pieces.zarr", "cell"), np.repeat(pieces[None], 4, 0))


def test_a_png_label_sequence_of_8_and_16_bit_slices_runs_as_its_ids(tmp_path):
    """Per-slice label PNGs saved in the smallest type (8-bit where a slice has < 256 ids, 16-bit elsewhere) run as
    one uint16 stack, ids unchanged; the same files given as the image volume are refused (normalized together,
    8-bit slices would be on another scale)."""
    from PIL import Image

    blocks = np.zeros((128, 128), np.uint16)
    for k, (y, x) in enumerate([(8, 8), (8, 70), (70, 8), (70, 70)]):
        blocks[y : y + 50, x : x + 50] = k + 1
    (tmp_path / "labels").mkdir()
    for z in range(4):
        ids = blocks.astype(np.uint8) if z % 2 == 0 else np.where(blocks > 0, blocks + 300 * z, 0).astype(np.uint16)
        Image.fromarray(ids).save(tmp_path / "labels" / f"{z}.png")
    tifffile.imwrite(tmp_path / "volume.tif", np.full((4, 128, 128), 90, np.uint8), photometric="minisblack")
    args = ("--classes", "cell", "--no-progress", "--no-image")
    cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels", *args,
        "--out", tmp_path / "out.zarr")  # fmt: skip
    assert_same_instances(labels_of(tmp_path / "out.zarr", "cell"), np.repeat(blocks[None], 4, 0))
    refused = cli("run", tmp_path / "labels", "--predictor", "labels", "--labels", tmp_path / "labels", *args,
                  "--out", tmp_path / "refused.zarr", check=False)  # fmt: skip
    assert refused.returncode == 2 and "save every slice as uint16" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "refused.zarr").exists()


@pytest.mark.parametrize("background", [np.uint16(65535), np.uint32(4294967295), np.int32(-1)])
def test_a_background_other_than_0_is_refused_before_the_run_starts(tmp_path, background):
    """Tools that write 65535, 4294967295 or -1 for background or 'ignore': that id would be one object spread
    over every slice (a uint max) or refused only once a tile reads it (-1). Refused when the run starts, saying
    to set it to 0; an object that merely has the largest id of its type is kept."""
    from cellseg_batch.read import ArrayVolume, LabelLayer, check_label_stack

    ids = np.full((3, 96, 96), background)
    for k, (y, x) in enumerate([(10, 10), (10, 50), (50, 10), (50, 50)]):
        ids[:, y : y + 30, x : x + 30] = k + 1
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros(ids.shape, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", ids, photometric="minisblack")
    refused = cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif",
                  "--classes", "cell", "--no-progress", "--out", tmp_path / "out.zarr", check=False)  # fmt: skip
    assert refused.returncode == 2 and "set it to 0 first" in refused.stderr, refused.stderr
    assert f"{int(background)}" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.zarr").exists() and "Ray" not in refused.stderr
    if background > 0:  # the same id as one object among others, on a background of 0
        ids[ids == background] = 0
        ids[:, 90:, 90:] = background
        check_label_stack(LabelLayer(ArrayVolume(ids), "cell"))


def test_ids_missing_from_the_class_map_are_all_named_before_the_run_starts(tmp_path):
    """A --classes map that misses ids of the stack: refused when the run starts (not once tiles are read), naming
    every missing id of the checked slices, not only the first a tile met."""
    ids = np.zeros((3, 96, 96), np.uint16)
    for k, (y, x) in enumerate([(10, 10), (10, 50), (50, 10), (50, 50)]):
        ids[:, y : y + 30, x : x + 30] = k + 1
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros(ids.shape, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", ids, photometric="minisblack")
    (tmp_path / "classes.json").write_text(json.dumps({"1": "mito", "2": "granule"}))
    refused = cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif",
                  "--classes", tmp_path / "classes.json", "--no-progress", "--out", tmp_path / "out.zarr",
                  check=False)  # fmt: skip
    assert refused.returncode == 2 and "(3, 4)" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and not (tmp_path / "out.zarr").exists()


@pytest.mark.parametrize("base", [2**60, 2**63 + 7])
def test_uint64_ids_beyond_float_precision_are_classified_by_their_class_map(tmp_path, base):
    """uint64 ids from 2**53 up were compared to the map's int64 keys as float64 and refused as unmapped; from 2**63
    up the map itself did not convert (a traceback)."""
    ids = np.zeros((3, 96, 96), np.uint64)
    for k, (y, x) in enumerate([(10, 10), (10, 50), (50, 10), (50, 50)]):
        ids[:, y : y + 30, x : x + 30] = base + k
    np.save(tmp_path / "labels.npy", ids)
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros(ids.shape, np.uint8), photometric="minisblack")
    (tmp_path / "classes.json").write_text(json.dumps({str(base + k): ("mito", "granule")[k % 2] for k in range(4)}))
    cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.npy", "--classes",
        tmp_path / "classes.json", "--tile", 64, "--overlap", 16, "--no-progress", "--out", tmp_path / "out.zarr")  # fmt: skip
    for name, ks in (("mito", (0, 2)), ("granule", (1, 3))):
        mine = np.isin(ids, [base + k for k in ks])
        assert_same_instances(labels_of(tmp_path / "out.zarr", name), np.where(mine, ids - np.uint64(base) + 1, 0))


def test_a_tile_with_more_ids_than_it_can_hold_names_a_tile_size_that_works(tmp_path):
    """A supervoxel stack (an id per few pixels): a tile holds at most 65535 ids; the refusal names a --tile with
    which the same run goes through."""
    ids = np.arange(1, 2 * 300 * 300 + 1, dtype=np.uint32).reshape(2, 300, 300)
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros(ids.shape, np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", ids, photometric="minisblack")
    args = ("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes",
            "cell", "--no-progress", "--no-image", "--link", "none", "--out", tmp_path / "out.zarr")  # fmt: skip
    refused = cli(*args, check=False)
    assert refused.returncode == 2 and "holds 90000 label ids" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr and not (tmp_path / "out.zarr").exists()
    tile = refused.stderr.split("--tile ")[-1].split()[0]
    cli(*args, "--tile", tile)
    out = labels_of(tmp_path / "out.zarr", "cell")
    assert out.all() and len(np.unique(out)) == ids.size  # every pixel its own object, as in the stack


def test_truth_is_reproduced_exactly_with_tiles_smaller_than_cells(synth_small, tmp_path):
    out = tmp_path / "out.zarr"
    # 64 px tiles, 16 px overlap: cells (up to ~260 px) span up to five tiles in each direction
    proc = cli("run", synth_small["volume"], "--predictor", "labels", "--labels", synth_small["truth"],
               "--tile", 64, "--overlap", 16, "--out", out, "--no-progress")  # fmt: skip
    # Ray's notice that its local cluster uses token authentication (and how to opt out) is not printed
    assert "Token authentication" not in proc.stderr, proc.stderr
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["merge_quality"]["max_tiles_per_2d_instance"] >= 9
    for name in CLASSES:
        assert_same_instances(labels_of(out, name), labels_of(synth_small["truth"], name))
    cli("eval", out, synth_small["truth"], "--json", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    for name in CLASSES:
        c = result["classes"][name]
        assert c["exact"] == c["n_gt"] == c["n_pred"] > 0
        assert c["ap50"] == 1.0 and abs(c["vi"]) < 1e-12
    # the same objects get the same ids whatever the tile grid: ids follow the objects' boxes (first slice, top, left)
    whole = tmp_path / "whole.zarr"
    cli("run", synth_small["volume"], "--predictor", "labels", "--labels", synth_small["truth"], "--tile", 384,
        "--out", whole, "--no-progress", "--no-image")  # fmt: skip
    for name in CLASSES:
        np.testing.assert_array_equal(labels_of(whole, name), labels_of(out, name))
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "cellseg" / "objects.parquet").to_pylist()
    keys = [(r["z0"], r["y0"], r["x0"]) for r in sorted(rows, key=lambda r: r["id"])]
    assert keys == sorted(keys)


def test_later_stages_run_on_the_predictor_actors_only_where_those_hold_every_core(synth_small, tmp_path):
    """Two 1-CPU actors on a 2-CPU Ray hold every core: each stitch, gaps, write, image, pyramid and preview unit runs on them
    (a task could not start before the last tile). With one actor, a CPU is free and they are Ray tasks. Both give
    the truth."""
    for name, extra, on_actors in (("actors", [], True), ("tasks", ["--actors", 1], False)):
        out = tmp_path / f"{name}.zarr"
        cli("run", synth_small["volume"], "--predictor", "labels", "--labels", synth_small["truth"], "--tile", 128,
            "--overlap", 16, "--num-cpus", 2, "--out", out, "--no-progress", *extra)  # fmt: skip
        report = json.loads((out / "cellseg" / "report.json").read_text())
        later = sum(s["units"] for s in report["stages"]
                    if s["name"] in ("stitch", "gaps", "write", "image", "pyramid", "preview"))  # fmt: skip
        assert later > 0 and report["counts"]["actors"]["count"] == (2 if on_actors else 1)
        assert report["counts"]["cpu_units_run_by_predictor_actors"] == (later if on_actors else 0)
        for cls in CLASSES:
            assert_same_instances(labels_of(out, cls), labels_of(synth_small["truth"], cls))


def test_nested_classes_from_separate_stacks(synth_small, tmp_path):
    """A cell segmentation and an organelle segmentation (one stack, JSON class map) from other tools."""
    cells = labels_of(synth_small["truth"], "cell").astype(np.uint32)
    organelles = np.zeros_like(cells)
    class_map, next_id = {}, 1
    for name in CLASSES[1:]:
        ids = labels_of(synth_small["truth"], name)
        for i in np.unique(ids[ids > 0]):
            organelles[ids == i] = next_id
            class_map[str(next_id)] = name
            next_id += 1
    tifffile.imwrite(tmp_path / "cells.tif", cells)
    tifffile.imwrite(tmp_path / "organelles.tif", organelles)
    (tmp_path / "organelles.json").write_text(json.dumps(class_map))
    out = tmp_path / "out.zarr"
    cli("run", synth_small["volume"], "--predictor", "labels", "--labels", tmp_path / "cells.tif", "--classes", "cell",
        "--labels", tmp_path / "organelles.tif", "--classes", tmp_path / "organelles.json",
        "--tile", 96, "--overlap", 8, "--out", out, "--no-progress")
    for name in CLASSES:
        assert_same_instances(labels_of(out, name), labels_of(synth_small["truth"], name))
    # an organelle never erases its cell: the cell layer keeps the organelle's pixels
    assert (labels_of(out, "cell")[organelles > 0] > 0).all()


def test_a_folder_of_tiff_slices_runs_like_the_stack(synth_small, tmp_path):
    """Volume and labels as one 2D TIFF per slice (as FIB-SEM acquisitions write them): the truth is reproduced."""
    from cellseg_batch.read import open_volume

    volume = open_volume(synth_small["volume"])
    for folder, layer in (("volume", None), ("cells", "cell")):
        (tmp_path / folder).mkdir()
        for z in range(volume.shape[0]):
            image = volume.read(z, 0, volume.shape[1], 0, volume.shape[2]) if layer is None else labels_of(
                synth_small["truth"], layer)[z].astype(np.uint32)
            tifffile.imwrite(tmp_path / folder / f"section_{z}.tif", image, photometric="minisblack")
    out = tmp_path / "out.zarr"
    cli("run", tmp_path / "volume", "--predictor", "labels", "--labels", tmp_path / "cells", "--classes", "cell",
        "--tile", 128, "--overlap", 16, "--out", out, "--no-progress")  # fmt: skip
    assert_same_instances(labels_of(out, "cell"), labels_of(synth_small["truth"], "cell"))


ISBI = SHARED_DATA / "isbi2012-drosophila-sstem"


@pytest.mark.skipif(not ISBI.exists(), reason=f"real EM data not found at {ISBI} (../shared/data)")
def test_isbi2012_regions_are_reproduced_per_slice(tmp_path):
    out = tmp_path / "isbi.zarr"
    cli("run", ISBI / "volume.tif", "--predictor", "labels", "--labels", ISBI / "labels.tif", "--classes",
        "neurite_cross_section", "--tile", 128, "--overlap", 16, "--link", "none", "--slices", "0:6",
        "--out", out, "--no-progress")
    truth = tifffile.imread(ISBI / "labels.tif")[:6]
    pred = labels_of(out, "neurite_cross_section")
    for z in range(6):
        assert_same_instances(pred[z], truth[z])


def test_tiff_export_and_object_table_match_the_labels(synth_small, tmp_path):
    out = tmp_path / "out.zarr"
    done = cli("run", synth_small["volume"], "--predictor", "labels", "--labels", synth_small["truth"], "--slices",
               "1:4", "--export-tiff", "--out", out, "--no-progress")  # fmt: skip
    said = next(line for line in done.stdout.splitlines() if line.startswith("  tiff "))  # the files are listed
    assert all(f"labels_{name}.tif" in said for name in CLASSES), said
    import pyarrow.parquet as pq

    table = pq.read_table(out / "cellseg" / "objects.parquet").to_pylist()
    for name in CLASSES:
        ids = labels_of(out, name)
        np.testing.assert_array_equal(tifffile.imread(out / "cellseg" / f"labels_{name}.tif").reshape(ids.shape), ids)
        rows = [row for row in table if row["class"] == name]
        assert sorted(row["id"] for row in rows) == sorted(np.unique(ids[ids > 0]))
        for row in rows[:3]:
            zz, yy, xx = np.nonzero(ids == row["id"])
            assert row["voxels"] == len(zz)
            bbox = (zz.min(), yy.min(), xx.min(), zz.max() + 1, yy.max() + 1, xx.max() + 1)
            assert tuple(row[k] for k in ("z0", "y0", "x0", "z1", "y1", "x1")) == bbox
            assert abs(row["centroid_y"] - yy.mean()) < 1e-6
            # the label arrays start at --slices' first slice (1); first/last slice number the input's slices
            assert (row["first_slice"], row["last_slice"]) == (zz.min() + 1, zz.max() + 1)
    from cellseg_batch.read import open_label_volume, open_volume

    exported = open_label_volume(str(out / "cellseg" / f"labels_{CLASSES[0]}.tif"))
    size = open_volume(str(synth_small["volume"])).pixel_size_nm
    assert size is not None and exported.pixel_size_nm == pytest.approx(size)  # the export keeps the pixel size
    with tifffile.TiffFile(out / "cellseg" / f"labels_{CLASSES[0]}.tif") as tif:  # in the tags too (ImageJ's reader)
        tags = tif.pages[0].tags
        assert tags["ResolutionUnit"].value == 3  # cm
        assert [1e7 * den / num for num, den in (tags["YResolution"].value, tags["XResolution"].value)] == \
            pytest.approx(size[1:])  # fmt: skip


def test_a_run_without_address_starts_its_own_ray_whatever_names_another(tmp_path):
    """Without --address a run starts a Ray of its own: ray.init() alone would join the cluster that RAY_ADDRESS
    names, or the one `ray start` last started on this machine (even one since gone: the run then waited forever)."""
    import os

    out = tmp_path / "out.zarr"
    volume = "synth:2x256x256,seed=4"
    cli("run", volume, "--predictor", "labels", "--labels", volume, "--tile", 128, "--overlap", 16, "--out", out,
        "--no-progress", timeout=300, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})  # nothing listens there  # fmt: skip
    assert json.loads((out / "cellseg" / "report.json").read_text())["status"] == "complete"


# The labels, less what a detector misses at a tile's edge: every instance that touches a cut edge of the window
# (one inside the slice) and has no pixel farther than OVERLAP px from the cut edges.
EDGE_SHY = '''
import numpy as np

from cellseg_batch.predict import register
from cellseg_batch.predict.labels_predictor import LabelsPredictor

MARGIN = 32  # the overlap: a missed object reaches up to 16 px into the core


@register("edge_shy")  # its plan is the labels predictor's, under this name
class EdgeShy(LabelsPredictor):
    def predict(self, z, windows, images=None):
        height, width = self.layers[0].volume.shape[1:]
        tiles = super().predict(z, windows, images)
        for window, tile in zip(windows, tiles):
            h, w = tile.labels.shape[1:]
            deep = np.ones((h, w), bool)
            cut = np.zeros((h, w), bool)
            for inside, near, far in ((window.y0 > 0, np.s_[:MARGIN, :], np.s_[:1, :]),
                                      (window.y1 < height, np.s_[-MARGIN:, :], np.s_[-1:, :]),
                                      (window.x0 > 0, np.s_[:, :MARGIN], np.s_[:, :1]),
                                      (window.x1 < width, np.s_[:, -MARGIN:], np.s_[:, -1:])):
                if inside:
                    deep[near] = False
                    cut[far] = True
            for layer in tile.labels:
                shy = np.setdiff1d(np.unique(layer[cut]), np.unique(layer[deep]))
                layer[np.isin(layer, shy[shy > 0])] = 0
        return tiles
'''


def test_border_fill_completes_objects_a_tile_missed_at_its_edge(synth_small, tmp_path):
    """A predictor that misses the slivers at its window's edge: without border fill the owner's core cuts those
    objects along the border; with it, the band's pixels come from the neighbour that saw the object cross. Every
    filled pixel is true foreground of the object it joins, nothing else changes, and the object table counts it."""
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    (tmp_path / "edge_shy_mod.py").write_text(EDGE_SHY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    outs = {}
    for name, extra in (("fill", []), ("nofill", ["--no-border-fill"])):
        outs[name] = out = tmp_path / f"{name}.zarr"
        cmd = [sys.executable, "-m", "cellseg_batch", "run", str(synth_small["volume"]), "--predictor",
               "edge_shy_mod:edge_shy", "--labels", str(synth_small["truth"]), "--tile", "96", "--overlap", "32",
               "--link", "none", "--out", str(out), "--no-progress", "--no-image", *extra]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
    report = {k: json.loads((o / "cellseg" / "report.json").read_text()) for k, o in outs.items()}
    filled = report["fill"]["merge_quality"]["border_fill_pixels"]
    assert report["nofill"]["merge_quality"]["border_fill_pixels"] == 0 and filled > 100
    assert report["fill"]["counts"]["objects"] == report["nofill"]["counts"]["objects"]
    table = pq.read_table(outs["fill"] / "cellseg" / "objects.parquet").to_pydict()
    voxels = dict(zip(table["id"], table["voxels"]))
    changed, missed = 0, {}
    for name in CLASSES:
        truth = labels_of(synth_small["truth"], name)
        a, b = labels_of(outs["nofill"], name), labels_of(outs["fill"], name)
        diff = (a > 0) != (b > 0)
        changed += int(diff.sum())
        # the same objects where both hold them (their ids may differ: ids follow the objects' boxes, which a fill
        # can grow)
        both = (a > 0) & (b > 0)
        pairs = np.unique(np.stack([a[both], b[both]]), axis=1)
        assert len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]
        assert (a[diff] == 0).all() and (truth[diff] > 0).all()  # only background became foreground, rightly
        # each filled pixel joins the object that holds the rest of its true object's pixels in that slice
        for z in range(truth.shape[0]):
            for t in np.unique(truth[z][diff[z]]):
                assert len(np.unique(b[z][(truth[z] == t) & (b[z] > 0)])) == 1
        missed[name] = (int(((a == 0) & (truth > 0)).sum()), int(((b == 0) & (truth > 0)).sum()))
        ids, counts = np.unique(b[b > 0], return_counts=True)
        assert [voxels[i] for i in ids.tolist()] == counts.tolist()
    assert changed == filled
    lost_before = sum(m[0] for m in missed.values())
    lost_after = sum(m[1] for m in missed.values())
    # the predictor's misses reach at most 16 px (the band) into a core, and a neighbour saw each of them cross
    assert lost_before > 1000 and lost_after == 0, missed


def test_eval_scores_a_run_of_part_of_a_volume_against_the_whole_volumes_truth(tmp_path):
    """`run --slices 2:7` records where its slices lie; `eval` takes the same slices of a whole-volume ground truth,
    and its own --slices in the volume's numbering."""
    zz, yy, xx = np.mgrid[:10, :96, :96]
    truth = np.zeros((10, 96, 96), np.uint16)
    for i, (cz, cy, cx) in enumerate([(3, 24, 24), (6, 60, 30), (5, 30, 66), (8, 70, 70)], 1):
        truth[((zz - cz) / 4) ** 2 + ((yy - cy) / 14) ** 2 + ((xx - cx) / 14) ** 2 <= 1] = i
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    tifffile.imwrite(tmp_path / "volume.tif", np.where(truth > 0, 200, 30).astype(np.uint8), photometric="minisblack")
    out = tmp_path / "part.zarr"
    cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "truth.tif", "--classes", "cell",
        "--slices", "2:7", "--tile", 64, "--overlap", 16, "--out", out, "--no-progress", "--no-image")  # fmt: skip
    for slices, n_slices in ((None, 5), ("3:5", 2)):
        cli("eval", out, tmp_path / "truth.tif", "--gt-classes", "cell", "--json", tmp_path / "e.json",
            *(["--slices", slices] if slices else []))  # fmt: skip
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["n_slices"] == n_slices and result["classes"]["cell"]["f1@0.5"] == 1.0
    refused = cli("eval", out, tmp_path / "truth.tif", "--gt-classes", "cell", "--slices", "0:3", check=False)
    assert refused.returncode == 2 and "holds slices 2:7 of the volume only" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    # ground truth of a sub-range in a file of its own (slices 4:9): --gt-slices places it; the shared slices 4:7
    # of the partial run are scored, and all of 4:9 against a prediction of the whole volume (the truth stack itself)
    tifffile.imwrite(tmp_path / "truth_4_9.tif", truth[4:9], photometric="minisblack")
    for pred, extra, n_slices in ((out, (), 3), (tmp_path / "truth.tif", ("--pred-classes", "cell"), 5)):
        cli("eval", pred, tmp_path / "truth_4_9.tif", "--gt-classes", "cell", "--gt-slices", "4:9", *extra, "--json",
            tmp_path / "e.json")  # fmt: skip
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["slices"] == f"4:{4 + n_slices}" and result["classes"]["cell"]["f1@0.5"] == 1.0
    # open-ended: --gt-slices 4: takes the truth's own depth, --slices 5: runs to the end of what both hold
    cli("eval", tmp_path / "truth.tif", tmp_path / "truth_4_9.tif", "--gt-classes", "cell", "--pred-classes", "cell",
        "--gt-slices", "4:", "--slices", "5:", "--json", tmp_path / "e.json")  # fmt: skip
    assert json.loads((tmp_path / "e.json").read_text())["slices"] == "5:9"
    hint = cli("eval", tmp_path / "truth.tif", tmp_path / "truth_4_9.tif", "--gt-classes", "cell", "--pred-classes",
               "cell", check=False)  # fmt: skip
    assert hint.returncode == 2 and "--gt-slices 0:5" in hint.stderr and len(hint.stderr.strip().splitlines()) == 1
    for bad, said in (("4:8", "names 4 slices"), ("7:12", "share none")):
        refused = cli("eval", out, tmp_path / "truth_4_9.tif", "--gt-classes", "cell", "--gt-slices", bad, check=False)
        assert refused.returncode == 2 and said in refused.stderr, refused.stderr


@pytest.mark.parametrize("stack", ["labels.tif", "labels.zarr"])
def test_a_label_stack_edited_between_runs_is_predicted_again(tmp_path, stack):
    """A rerun over a kept work store reuses its predictions only where the inputs are the ones they came from:
    a label stack edited in between (a TIFF rewritten, a zarr array's chunks rewritten) is served again."""
    import zarr

    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:128, :128]
    versions = []
    for _ in range(2):
        lab = np.zeros((4, 128, 128), np.uint16)
        for i, (cy, cx) in enumerate(rng.integers(20, 108, (5, 2)), 1):
            lab[:, (yy - cy) ** 2 + (xx - cx) ** 2 < 150] = i
        versions.append(lab)
    tifffile.imwrite(tmp_path / "volume.tif", np.full((4, 128, 128), 100, np.uint8), photometric="minisblack")

    def save(lab):
        if stack.endswith(".tif"):
            tifffile.imwrite(tmp_path / stack, lab, photometric="minisblack")
        else:
            zarr.create_array(str(tmp_path / stack), shape=lab.shape, dtype=lab.dtype, chunks=(1, 64, 64),
                              overwrite=True)[:] = lab  # fmt: skip

    out = tmp_path / "out.zarr"
    for lab in versions:
        save(lab)
        cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / stack, "--classes", "cell",
            "--tile", 64, "--overlap", 16, "--out", out, "--no-progress", "--no-image", "--keep-tiles", "--overwrite")  # fmt: skip
        assert_same_instances(labels_of(out, "cell"), lab)
    assert json.loads((out / "cellseg" / "report.json").read_text())["mode"] == "fresh"


def test_a_warning_about_the_volume_reaches_the_terminal_not_only_the_report(tmp_path):
    """A volume whose file records its pixel size in X and Y but not its z spacing: the run says so as it starts."""
    labels = np.zeros((3, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "v.tif", labels, photometric="minisblack", resolution=(1e6, 1e6),
                     resolutionunit="CENTIMETER")  # 10 nm pixels
    done = cli("run", tmp_path / "v.tif", "--predictor", "labels", "--labels", tmp_path / "v.tif", "--classes", "cell",
               "--no-progress", "--out", tmp_path / "out.zarr")  # fmt: skip
    said = ("the volume does not record its z spacing: the output's metadata takes it equal to its pixel size (10 nm), "
            "which EM sections rarely are; pass --pixel-size Z,Y,X with the section thickness")  # fmt: skip
    assert said in done.stderr
    assert said in json.loads((tmp_path / "out.zarr" / "cellseg" / "report.json").read_text())["warnings"]


def test_options_the_predictor_does_not_use_are_named_not_silently_dropped(tmp_path):
    """--score-threshold with the labels predictor (its labels have no scores) did nothing and said nothing."""
    labels = np.zeros((2, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "v.tif", labels)
    done = cli("run", tmp_path / "v.tif", "--predictor", "labels", "--labels", tmp_path / "v.tif", "--classes", "cell",
               "--score-threshold", 0.9, "--normalization", "0,255", "--no-progress", "--out", tmp_path / "out.zarr")  # fmt: skip
    said = "--score-threshold, --normalization ignored: the labels predictor does not use them"
    assert said in done.stderr
    assert said in json.loads((tmp_path / "out.zarr" / "cellseg" / "report.json").read_text())["warnings"]


def test_a_section_moved_beyond_the_realignment_reach_is_named_in_a_warning(tmp_path):
    """A section moved more than SHIFT_REACH (or rotated) pairs with neither neighbour: its instances became
    one-slice objects, which --min-slices auto dropped, with no word of it."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:256, :256]
    ids = np.zeros((5, 256, 256), np.uint16)
    for k in range(16):
        cy, cx = rng.integers(12, 244, 2)
        ids[:, (yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = k + 1
    ids[2] = np.roll(ids[2], (100, 100), axis=(0, 1))  # beyond the 48 px the linker looks for
    tifffile.imwrite(tmp_path / "labels.tif", ids, photometric="minisblack")
    tifffile.imwrite(tmp_path / "volume.tif", np.zeros(ids.shape, np.uint8), photometric="minisblack")
    cli("run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes",
        "blob", "--no-progress", "--out", tmp_path / "out.zarr")  # fmt: skip
    report = json.loads((tmp_path / "out.zarr" / "cellseg" / "report.json").read_text())
    assert report["counts"]["slices_unpaired"] == [2], report["counts"]
    assert any(w.startswith("slice(s) 2: most of their 2D instances continue into neither") for w in report["warnings"])
