"""A user's mistake ends in one line on stderr, exit status 2, and no output that looks like a result."""

import json

import numpy as np
import pytest
import tifffile
import zarr

from conftest import cli


def _volume(tmp_path):
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 255, (3, 64, 64), dtype=np.uint8), photometric="minisblack")
    return path


def _expect_error(tmp_path, *args, match: str):
    out = tmp_path / "out.zarr"
    proc = cli(*args, "--out", out, "--no-progress", check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cellseg-batch: error:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not (tmp_path / "out.zarr.work").exists()


def _labels_args(tmp_path):
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(labels, np.zeros((3, 64, 64), np.uint32), photometric="minisblack")
    return ["--predictor", "labels", "--labels", labels, "--classes", "cell"]


def test_missing_file(tmp_path):
    _expect_error(tmp_path, "run", tmp_path / "nope.tif", *_labels_args(tmp_path), match="does not exist")


def test_rgb_label_stack(tmp_path):
    """An RGB image volume is read as grey (test_read.py); RGB labels have no ids to read."""
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((3, 64, 64, 3), np.uint8), photometric="rgb")
    tifffile.imwrite(tmp_path / "vol.tif", np.zeros((3, 64, 64), np.uint8), photometric="minisblack")
    _expect_error(tmp_path, "run", tmp_path / "vol.tif", "--predictor", "labels", "--labels", tmp_path / "rgb.tif",
                  "--classes", "cell", match="is RGB; a label stack holds one integer id per pixel")  # fmt: skip


def test_4d_without_axes(tmp_path):
    tifffile.imwrite(tmp_path / "4d.tif", np.zeros((2, 3, 64, 64), np.uint8), photometric="minisblack")
    _expect_error(tmp_path, "run", tmp_path / "4d.tif", *_labels_args(tmp_path), match="axes")


def test_empty_file(tmp_path):
    (tmp_path / "empty.tif").write_bytes(b"")
    _expect_error(tmp_path, "run", tmp_path / "empty.tif", *_labels_args(tmp_path), match="empty.tif")


def test_truncated_tiff(tmp_path):
    path = _volume(tmp_path)
    data = path.read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) * 2 // 3])
    _expect_error(tmp_path, "run", tmp_path / "cut.tif", *_labels_args(tmp_path), match="truncated")


def test_not_an_image(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _expect_error(tmp_path, "run", tmp_path / "notes.txt", *_labels_args(tmp_path), match="unknown volume format")


def test_zarr_group_without_image(tmp_path):
    g = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    g.create_array("raw", shape=(2, 32, 32), dtype="uint8")
    _expect_error(tmp_path, "run", tmp_path / "g.zarr", *_labels_args(tmp_path), match="g.zarr/raw")


def test_label_stack_of_another_shape(tmp_path):
    tifffile.imwrite(tmp_path / "small.tif", np.zeros((3, 32, 32), np.uint32), photometric="minisblack")
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", tmp_path / "small.tif",
                  "--classes", "cell", match="shape")


def test_class_map_without_an_id_found_in_the_stack(tmp_path):
    labels = np.zeros((3, 64, 64), np.uint32)
    labels[1, 10:20, 10:20] = 7
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    (tmp_path / "map.json").write_text(json.dumps({"1": "mitochondrion"}))
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", tmp_path / "lab.tif",
                  "--classes", tmp_path / "map.json", match="no class in its --classes map (7)")


@pytest.mark.parametrize("args,match", [
    (["--tile", "8"], "--tile"), (["--overlap", "7"], "--overlap"), (["--slices", "5:9"], "--slices"),
    (["--stitch-iou", "0"], "--stitch-iou"), (["--predictor", "magic"], "unknown predictor"),
])  # fmt: skip
def test_bad_options(tmp_path, args, match):
    base = [] if "--predictor" in args else _labels_args(tmp_path)
    _expect_error(tmp_path, "run", _volume(tmp_path), *base, *args, match=match)


def test_missing_model_directory(tmp_path):
    _expect_error(tmp_path, "run", _volume(tmp_path), "--model", tmp_path / "no-model", match="does not exist")


def test_a_model_given_by_its_weights_file_or_a_manifest_missing_keys_says_what_to_fix(tmp_path):
    """--model model_final.pth said 'does not exist' of a file that does; a cellseg.json without its tile gave
    the constructor's words ('__init__() missing 2 required positional arguments')."""
    from cellseg_batch.errors import UserError
    from cellseg_batch.model_dir import ModelDir
    from cellseg_batch.tiles import TileGrid

    model = tmp_path / "m"
    model.mkdir()
    (model / "model_final.pth").write_bytes(b"")
    with pytest.raises(UserError, match=f"is a file; give the model directory that holds it \\({model}\\)"):
        ModelDir.load(model / "model_final.pth")
    (model / "cellseg.json").write_text(json.dumps({"format": 1, "classes": ["cell"], "colour": "red"}))
    with pytest.raises(UserError, match=r"malformed \(missing tile, overlap; unknown colour\)"):
        ModelDir.load(model)
    with pytest.raises(UserError, match=r"--overlap 32 \(given, or the model's\) .* e\.g\. --overlap 4$"):
        TileGrid(64, 64, 40, 32)


def test_complete_output_is_not_overwritten_without_overwrite(tmp_path):
    volume, out = _volume(tmp_path), tmp_path / "out.zarr"
    cli("run", volume, *_labels_args(tmp_path), "--out", out, "--no-progress")
    before = (out / "cellseg" / "report.json").read_text()
    proc = cli("run", volume, *_labels_args(tmp_path), "--out", out, "--no-progress", check=False)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "cellseg" / "report.json").read_text() == before
    cli("run", volume, *_labels_args(tmp_path), "--out", out, "--no-progress", "--overwrite")


def test_a_foreign_directory_is_never_replaced(tmp_path):
    (tmp_path / "out.zarr").mkdir()
    (tmp_path / "out.zarr" / "precious.txt").write_text("keep me")
    proc = cli("run", _volume(tmp_path), *_labels_args(tmp_path), "--out", tmp_path / "out.zarr", "--overwrite",
               check=False)  # fmt: skip
    assert proc.returncode == 2 and "not a cellseg-batch output" in proc.stderr
    assert (tmp_path / "out.zarr" / "precious.txt").read_text() == "keep me"


def test_actors_that_no_node_can_hold_fail_instead_of_waiting_forever(tmp_path, monkeypatch):
    """A local Ray does not grow: actors bigger than it are refused before they start (the run waited 600 s in
    silence). A cluster joined with --address may (an autoscaler): there the actors' start times out instead."""
    from ray.cluster_utils import Cluster

    _expect_error(tmp_path, "run", _volume(tmp_path), *_labels_args(tmp_path), "--cpus-per-actor", "64",
                  "--num-cpus", "2", match="1 predictor actors of 64 CPU(s) each need 64 CPUs, but the local Ray has "
                  "2 (the machine's, or --num-cpus / --num-gpus): ask for fewer, e.g. --cpus-per-actor 2")  # fmt: skip
    monkeypatch.setenv("CELLSEG_ACTOR_START_TIMEOUT", "10")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        _expect_error(tmp_path, "run", _volume(tmp_path), *_labels_args(tmp_path), "--cpus-per-actor", "64",
                      "--address", cluster.address, match="did not start within 10 s")  # fmt: skip
    finally:
        cluster.shutdown()


def test_negative_ids_in_a_signed_label_stack_are_refused_and_nothing_is_left(tmp_path):
    labels = np.zeros((3, 64, 64), np.int32)
    labels[0, 5:15, 5:15] = 2
    labels[2, 30:40, 30:40] = -3
    tifffile.imwrite(tmp_path / "signed.tif", labels, photometric="minisblack")
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", tmp_path / "signed.tif",
                  "--classes", "cell", match="negative label id -3")  # fmt: skip


def test_unsigned_ids_saved_as_signed_are_told_to_be_read_as_unsigned(tmp_path):
    """uint16 ids over 32767 written as int16 come back negative, many of them: the message says to view them as
    unsigned (setting them to 0, as for a -1 background, would delete those objects)."""
    ids = np.zeros((3, 64, 64), np.uint16)
    for k in range(6):
        ids[:, 8 * k : 8 * k + 6, 5:15] = 40000 + k
    tifffile.imwrite(tmp_path / "wrapped.tif", ids.view(np.int16), photometric="minisblack")
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", tmp_path / "wrapped.tif",
                  "--classes", "cell", match="labels.view(np.uint16)")  # fmt: skip


def test_instance_labels_with_stray_pixels_are_told_to_lose_the_specks_not_to_label_them(tmp_path):
    """Salt-and-pepper noise on instance labels (stray pixels of existing ids) is refused as pieces, and the message
    names removing small pieces, not labelling each (which made every speck an object: 1488 false of 1516)."""
    ids = np.zeros((3, 64, 64), np.uint16)
    ids[:, 10:30, 10:30], ids[:, 35:60, 35:60] = 1, 2
    stray = np.random.default_rng(1).random(ids.shape) < 0.01
    ids[stray] = 1
    tifffile.imwrite(tmp_path / "salt.tif", ids, photometric="minisblack")
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", tmp_path / "salt.tif",
                  "--classes", "cell", match="remove pieces smaller than an object first")  # fmt: skip


def test_a_background_of_65535_or_minus_1_in_a_slice_no_start_check_reads_is_refused_when_read(tmp_path):
    """The start checks read the first, middle and last slices; a per-slice exporter's 65535 background in another
    slice became one object spread over that slice (run), and -1 one more object in eval (scored as id 2**64 - 1)."""
    labels = np.zeros((6, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    bad = labels.copy()
    bad[1][bad[1] == 0] = 65535  # slice 1: neither 0, 3 nor 5
    tifffile.imwrite(tmp_path / "bad.tif", bad, photometric="minisblack")
    tifffile.imwrite(tmp_path / "vol.tif", (labels * 100).astype(np.uint8), photometric="minisblack")
    proc = cli("run", tmp_path / "vol.tif", "--predictor", "labels", "--labels", tmp_path / "bad.tif", "--classes",
               "cell", "--out", tmp_path / "out.zarr", "--no-progress", check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cellseg-batch: error:")]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and "id 65535, the largest uint16 value, covers" in lines[0] and "slice 1" in lines[0]
    signed = labels.astype(np.int32)
    signed[4][signed[4] == 0] = -1
    tifffile.imwrite(tmp_path / "signed.tif", signed, photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", labels, photometric="minisblack")
    for pred, truth in (("truth.tif", "signed.tif"), ("signed.tif", "truth.tif"), ("truth.tif", "bad.tif")):
        proc = cli("eval", tmp_path / pred, tmp_path / truth, "--pred-classes", "cell", "--gt-classes", "cell",
                   check=False)  # fmt: skip
        assert proc.returncode == 2 and proc.stderr.startswith("cellseg-batch: error:"), proc.stderr
        assert ("negative label id -1 in slice 4" in proc.stderr) or ("id 65535" in proc.stderr), proc.stderr


def test_an_image_given_where_a_label_stack_belongs_is_named_so(tmp_path):
    """The volume given as eval's truth (or as --labels) was refused as 'id 65535 ... covers 0% ..., it looks like
    background': it is said to be an image. Labels of objects two pixels wide (most pixel pairs a border) are not."""
    image = tmp_path / "vol16.tif"
    grey = np.random.default_rng(2).normal(30000, 300, (3, 64, 64)).clip(0, 65535).astype(np.uint16)
    grey[0, 0, 0] = 65535
    tifffile.imwrite(image, grey, photometric="minisblack")
    small = np.zeros((3, 64, 64), np.uint16)
    small[:, ::4, ::4] = np.arange(1, 257, dtype=np.uint16).reshape(16, 16)
    small[:, 1::4] = small[:, ::4]
    small[:, :, 1::4] = small[:, :, ::4]  # 2 x 2 px objects
    tifffile.imwrite(tmp_path / "small.tif", small, photometric="minisblack")
    _expect_error(tmp_path, "run", _volume(tmp_path), "--predictor", "labels", "--labels", image, "--classes", "cell",
                  match="vol16.tif looks like an image, not a label stack")  # fmt: skip
    proc = cli("eval", tmp_path / "small.tif", image, "--pred-classes", "cell", "--gt-classes", "cell", check=False)
    assert proc.returncode == 2 and "vol16.tif looks like an image, not a label stack" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    cli("eval", tmp_path / "small.tif", tmp_path / "small.tif", "--pred-classes", "cell", "--gt-classes", "cell")


def test_a_coco_file_given_to_eval_is_named_so(tmp_path):
    """eval given a COCO file as truth said 'a label stack without class names', then 'unknown volume format'."""
    labels = tmp_path / "lab.tif"
    tifffile.imwrite(labels, np.ones((2, 32, 32), np.uint16), photometric="minisblack")
    (tmp_path / "train.json").write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    for extra in ((), ("--gt-classes", "cell")):
        proc = cli("eval", labels, tmp_path / "train.json", "--pred-classes", "cell", *extra, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert "train.json is a JSON file: eval scores label volumes" in proc.stderr, proc.stderr


def test_a_semantic_mask_given_to_eval_as_truth_is_warned_about(tmp_path):
    """A semantic mask (one id per class, each in many pieces) was scored as ground truth with no word: each class
    one object. eval warns (a 3D object may lie in a few pieces of a slice, so it is not refused)."""
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[:, 2:62:6, 2:62:6] = 1  # one-pixel granules of class 1 (96 beside the square)
    mask[:, 30:40, 30:40] = 2
    tifffile.imwrite(tmp_path / "semantic.tif", mask, photometric="minisblack")
    proc = cli("eval", tmp_path / "semantic.tif", tmp_path / "semantic.tif", "--pred-classes", "x", "--gt-classes", "x")
    assert "semantic.tif: id 1 covers 96 separate pieces in slice 0, and the slice holds 2 id(s): a semantic mask" \
        in proc.stderr, proc.stderr  # fmt: skip


def test_filesystem_refusals_that_reach_the_top_are_one_line_with_the_way_on():
    """A full disk said how to resume `run` for every command (convert starts over; train needs --resume) and never
    named inodes; convert's and train's --out on a read-only filesystem, and a file deleted mid-run, were tracebacks."""
    import errno

    from cellseg_batch.cli import _os_error_said

    full = OSError(errno.ENOSPC, "No space left on device", "/scratch/o.zarr/labels/cell/0/3")
    assert _os_error_said(full, "run") == ("no space left on the device (/scratch/o.zarr/labels/cell/0/3) (or no inodes "
                                           "left: see df -i, or your quota); free some and run the same command again "
                                           "to resume")  # fmt: skip
    assert _os_error_said(full, "train").endswith("free some and run it again with --resume to continue")
    assert _os_error_said(full, "convert").endswith("free some and run the same command again")
    read_only = OSError(errno.EROFS, "Read-only file system", "/ro/set")
    assert _os_error_said(read_only, "convert") == ("cannot write /ro/set (Read-only file system); choose an --out in a "
                                                    "folder you can write")  # fmt: skip
    gone = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/volume.tif")
    assert _os_error_said(gone, "run").startswith("/data/volume.tif was deleted or moved while cellseg-batch used it")
    assert _os_error_said(OSError(errno.EIO, "Input/output error"), "run") is None  # not one a user can act on
