"""Property-based: every bad option value and bad input file of every sub-command ends in exit status 2, one line on
stderr naming the option or file, no traceback, and nothing created (the CLI is called in-process: fast)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellseg_batch import cli

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _refused(capsys, root: Path, argv: list, names: list[str]) -> str:
    """Run the CLI; assert the refusal the module docstring describes; return the error line."""
    before = _tree(root)
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("cellseg-batch: error: "), err
    assert any(str(n) in lines[0] for n in names), (names, lines[0])
    assert _tree(root) == before, sorted(_tree(root) - before)
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A valid small volume, label stack, COCO file and images folder: each bad case changes one thing."""
    root = tmp_path_factory.mktemp("inputs")
    tifffile.imwrite(root / "vol.tif", np.zeros((3, 32, 32), np.uint8), photometric="minisblack")
    tifffile.imwrite(root / "lab.tif", np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
    (root / "images").mkdir()
    (root / "coco.json").write_text(json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "c"}]}))
    return root


def _base(command: str, root: Path) -> list:
    out = root / "out"
    return {
        "run": ["run", root / "vol.tif", "--predictor", "labels", "--labels", root / "lab.tif", "--classes", "cell",
                "--out", out, "--no-progress"],
        "convert": ["convert", "labels-to-coco", root / "lab.tif", root / "vol.tif", "--classes", "cell", "--out", out],
        "train": ["train", "--train", root / "coco.json", "--images", root / "images", "--config", "configs/none.yaml",
                  "--out", out],
        "synth": ["synth", out],
        "eval": ["eval", out, root / "lab.tif", "--gt-classes", "cell"],
    }[command]  # fmt: skip


# -- option values -------------------------------------------------------------------------------------------------
def _outside(low=None, high=None, above=False, integer=False):
    """Values outside [low, high] ((low, high] where ``above``), as the text a user types."""
    parts = []
    if integer:
        if low is not None:
            parts.append(st.integers(max_value=int(low) - (0 if above else 1), min_value=-(10**12)))
        if high is not None:
            parts.append(st.integers(min_value=int(high) + 1, max_value=10**12))
        parts.append(st.sampled_from(["x", "1.5", "", "1e3", "0x10"]))  # not an integer at all
    else:
        if low is not None:
            parts.append(st.floats(max_value=low, exclude_max=not above, allow_nan=False))
        if high is not None:
            parts.append(st.floats(min_value=high, exclude_min=True, allow_nan=False))
        parts.append(st.sampled_from([math.nan, "nan", "inf", "-inf", "x", ""]))
    return st.one_of(*parts).map(str)


NUMERIC = [  # (command, option, strategy of bad values)
    ("run", "tile", _outside(16, integer=True)), ("run", "overlap", _outside(0, integer=True)),
    ("run", "batch-size", _outside(1, integer=True)), ("run", "chunk", _outside(16, integer=True)),
    ("run", "actors", _outside(1, integer=True)), ("run", "cpus-per-actor", _outside(1, integer=True)),
    ("run", "num-cpus", _outside(1, integer=True)), ("run", "num-gpus", _outside(0, integer=True)),
    ("run", "stitch-iou", _outside(0, 1, above=True)), ("run", "link-iou", _outside(0, 1, above=True)),
    ("run", "link-ioa", _outside(0, 1, above=True)), ("run", "score-threshold", _outside(0, 1)),
    ("convert", "tile", st.one_of(_outside(0, integer=True), st.integers(1, 15).map(str))),  # 0: whole slices ("convert", "every", _outside(1, integer=True)),
    ("convert", "val-fraction", _outside(0, 1)),
    ("train", "lr", _outside(0, above=True)), ("train", "max-iter", _outside(1, integer=True)),
    ("train", "max-minutes", _outside(0, above=True)), ("train", "cpu-procs", _outside(1, integer=True)),
    ("train", "tile", _outside(16, integer=True)), ("train", "overlap", _outside(0, integer=True)),
    ("synth", "scale", _outside(0, above=True)), ("synth", "dropout", _outside(0, 1)),
]  # fmt: skip

_number = st.one_of(st.integers(-5, 100).map(str), st.sampled_from(["x", "", "nan", "inf", "1e400"]))
TEXT = [  # (command, option, strategy of bad values)
    ("run", "normalization", st.one_of(
        st.lists(_number, max_size=4).filter(lambda v: len(v) != 2).map(",".join),
        st.tuples(st.integers(0, 1000), st.integers(0, 1000)).map(lambda t: f"{max(t)},{min(t)}"))),
    ("run", "pixel-size", st.one_of(
        st.lists(_number, max_size=5).filter(lambda v: len(v) != 3).map(",".join),
        st.tuples(st.integers(-50, 0), st.integers(1, 50)).map(lambda t: f"{t[1]},{t[0]},{t[1]}"))),
    ("train", "pixel-size", st.lists(_number, min_size=1, max_size=5).filter(lambda v: len(v) != 3).map(",".join)),
    ("run", "slices", st.one_of(st.integers(0, 99).map(str), st.tuples(st.integers(0, 9), st.integers(0, 9)).filter(
        lambda t: t[0] >= t[1] or t[1] > 3).map(lambda t: f"{t[0]}:{t[1]}"), st.just("a:b"))),
    ("convert", "slices", st.one_of(st.integers(0, 99).map(str), st.integers(4, 99).map(lambda z: f"0:{z}"))),
    ("eval", "slices", st.one_of(st.sampled_from(["x", "0,,1", "1.5", "-1", "2,a"]), st.tuples(st.integers(-9, 9), st.integers(-9, 9)).filter(
        lambda t: not 0 <= t[0] < t[1]).map(lambda t: f"{t[0]}:{t[1]}"))),
    ("run", "link-gap", st.one_of(st.integers(4, 100).map(str), st.integers(-9, -1).map(str), st.just("cell=x"))),
    ("run", "min-voxels", st.one_of(st.integers(-100, -1).map(str), st.sampled_from(["x", "=3", "cell=1,cell=2"]))),
    ("run", "device", st.sampled_from(["gpu", "GPU", "cuda0", "cuda:x", "mps", "cpu,cuda", ""])),
    ("synth", "shape", st.lists(st.integers(-3, 64).map(str), max_size=4).filter(
        lambda v: len(v) != 3 or min(map(int, v)) < 1).map(",".join)),
]  # fmt: skip


@pytest.mark.parametrize("command,option,values", NUMERIC + TEXT, ids=[f"{c}--{o}" for c, o, _ in NUMERIC + TEXT])
def test_a_bad_option_value_is_refused_before_anything_is_read_or_written(capsys, inputs, command, option, values):
    @SETTINGS
    @given(value=values)
    def check(value):
        _refused(capsys, inputs, [*_base(command, inputs), f"--{option}={value}"], [f"--{option}"])

    check()


@pytest.mark.parametrize("command", ["run", "convert", "train"])
def test_a_tile_too_small_to_hold_an_object_is_refused_by_every_command(capsys, inputs, command):
    line = _refused(capsys, inputs, [*_base(command, inputs), "--tile", 1], ["--tile 1"])
    assert "give at least 16" in line and ("or 0 (whole slices)" in line) == (command == "convert")


@pytest.mark.parametrize("argv,name", [
    (["run"], "volume"), (["run", "v.tif"], "--out"), (["run", "v.tif", "--out", "o", "--link", "greedy"], "--link"),
    (["convert"], "labels-to-coco"), (["synth", "o", "--format", "png"], "--format"), (["frobnicate"], "frobnicate"),
    (["train", "--train", "t.json"], "--images"),
])  # fmt: skip
def test_usage_mistakes_are_one_line_too(capsys, tmp_path, argv, name):
    _refused(capsys, tmp_path, argv, [name])


def test_a_glob_the_shell_expanded_is_told_to_be_quoted(capsys, tmp_path):
    for k in range(3):
        tifffile.imwrite(tmp_path / f"s{k}.tif", np.zeros((8, 8), np.uint8))
    line = _refused(capsys, tmp_path, ["run", *sorted(tmp_path.glob("s*.tif")), "--out", tmp_path / "o.zarr"],
                    ["unrecognized arguments"])  # fmt: skip
    assert "quote a file pattern ('slices/*.tif') so that the shell passes it whole" in line


def test_train_with_a_missing_config_leaves_no_model_directory(capsys, inputs, tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}], "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]], "bbox": [4, 4, 16, 16],
         "area": 256, "iscrowd": 0}], "categories": [{"id": 1, "name": "cell"}]}  # fmt: skip
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    _refused(capsys, tmp_path, ["train", "--train", tmp_path / "coco.json", "--images", tmp_path, "--config",
                                tmp_path / "missing.yaml", "--out", tmp_path / "model"], ["--config"])  # fmt: skip


# -- input files ---------------------------------------------------------------------------------------------------
def _tiff_bytes(array: np.ndarray, **kw) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        tifffile.imwrite(Path(d) / "a.tif", array, **kw)
        return (Path(d) / "a.tif").read_bytes()


VALID_SLICE = _tiff_bytes(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16), photometric="minisblack")
TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")

bad_tiff = st.one_of(
    # a valid one-slice TIFF cut short anywhere (the first bytes most of all)
    st.one_of(st.integers(0, 16), st.integers(0, len(VALID_SLICE) - 1)).map(lambda n: ("truncated", VALID_SLICE[:n])),
    # its header overwritten by garbage
    st.binary(min_size=4, max_size=64).filter(lambda b: b[:4] not in TIFF_MAGIC).map(
        lambda b: ("garbage header", b + VALID_SLICE[len(b):])),
    # a pixel type no volume or label stack can have
    st.sampled_from(["complex64", "bool", "float16", "float32", "float64"]).map(
        lambda t: ("dtype", _tiff_bytes(np.zeros((2, 8, 8), t), photometric="minisblack"))),
    # shapes: RGB, more than one non-singleton axis besides Y and X
    st.tuples(st.integers(2, 3), st.integers(2, 3), st.integers(4, 8), st.integers(4, 8)).map(
        lambda s: ("4D", _tiff_bytes(np.zeros(s, np.uint8), photometric="minisblack"))),
    st.just(("rgb", _tiff_bytes(np.zeros((8, 8, 3), np.uint8), photometric="rgb"))),
)  # fmt: skip


@SETTINGS
@given(case=bad_tiff)
def test_a_bad_tiff_is_refused_naming_the_file(capsys, case):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "bad.tif").write_bytes(case[1])
        _refused(capsys, root, ["run", root / "bad.tif", "--predictor", "labels", "--labels", root / "bad.tif",
                                "--classes", "cell", "--out", root / "out.zarr"], ["bad.tif"])  # fmt: skip


LAYOUTS = {"contiguous": {}, "zlib": {"compression": "zlib"}, "tiled": {"tile": (16, 16)}, "imagej": {"imagej": True, "metadata": {"axes": "ZYX"}},
           "zlib-tiled": {"compression": "zlib", "tile": (16, 16)}}  # fmt: skip
STACK = np.arange(3 * 16 * 32, dtype=np.uint16).reshape(3, 16, 32)
STACKS = {name: _tiff_bytes(STACK, photometric="minisblack", **kw) for name, kw in LAYOUTS.items()}


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(layout=st.sampled_from(sorted(LAYOUTS)), keep=st.floats(0, 1, exclude_max=True))
def test_a_stack_cut_short_is_refused_or_reads_exactly_what_was_written(tmp_path_factory, layout, keep):
    """Never a smaller or phantom stack: a file cut anywhere is a one-line error, or (only its trailing page
    directories lost, every pixel there) the stack as written."""
    from cellseg_batch.errors import UserError
    from cellseg_batch.read import open_volume

    data = STACKS[layout]
    path = tmp_path_factory.mktemp("cut") / "cut.tif"
    path.write_bytes(data[: int(len(data) * keep)])
    try:
        volume = open_volume(path)
        read = np.stack([volume.read(z, 0, 16, 0, 32) for z in range(volume.shape[0])])
    except UserError as e:
        assert "\n" not in str(e) and "cut.tif" in str(e)
    else:
        assert np.array_equal(read, STACK), (layout, keep)


@SETTINGS
@given(shape=st.tuples(st.integers(1, 2**40), st.integers(1, 2**40), st.integers(1, 2**40)).filter(
    lambda s: s[1] * s[2] > 2**36 or math.prod(s) > 2**50))  # fmt: skip
def test_a_header_declaring_an_enormous_shape_is_refused_before_any_allocation(capsys, shape):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        zarr.create_array(str(root / "big.zarr"), shape=shape, chunks=(1, 1024, 1024), dtype="uint8")
        line = _refused(capsys, root, ["run", root / "big.zarr", "--predictor", "labels", "--labels", root / "big.zarr",
                                       "--classes", "cell", "--out", root / "out.zarr"], ["big.zarr"])  # fmt: skip
        assert "declares the shape" in line


def test_a_tiff_header_declaring_an_enormous_slice_is_refused(capsys, tmp_path):
    # no tifffile description (metadata=None): the forged tags are all the file says about its shape
    tifffile.imwrite(tmp_path / "big.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack", metadata=None)
    with tifffile.TiffFile(tmp_path / "big.tif", mode="r+b") as tf:
        for page in tf.pages:
            page.tags["ImageWidth"].overwrite(2**31)
            page.tags["ImageLength"].overwrite(2**31)
    line = _refused(capsys, tmp_path, ["run", tmp_path / "big.tif", "--predictor", "labels", "--labels",
                                       tmp_path / "big.tif", "--classes", "c", "--out", tmp_path / "o.zarr"], ["big.tif"])  # fmt: skip
    assert "declares the shape" in line


@SETTINGS
@given(dtype=st.sampled_from(["complex64", "bool", "float32"]),
       shape=st.lists(st.integers(0, 4), min_size=1, max_size=5).map(tuple))  # fmt: skip
def test_a_bad_zarr_array_is_refused_naming_it(capsys, dtype, shape):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        zarr.create_array(str(root / "bad.zarr"), shape=shape, dtype=dtype)
        _refused(capsys, root, ["run", root / "bad.zarr", "--predictor", "labels", "--labels", root / "bad.zarr",
                                "--classes", "cell", "--out", root / "out.zarr"], ["bad.zarr"])  # fmt: skip


@SETTINGS
@given(data=st.one_of(
    st.binary(max_size=64),
    st.sampled_from(['[1, 2]', '{}', '{"x": "cell"}', '{"0": "cell"}', '{"-3": "cell"}', '{"1": 5}', '{"1": ""}', '"cell"']).map(str.encode),
))  # fmt: skip
def test_a_bad_class_map_is_refused_naming_it(capsys, inputs, data):
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "map.json").write_bytes(data)
        _refused(capsys, root, ["run", inputs / "vol.tif", "--predictor", "labels", "--labels", inputs / "lab.tif",
                                "--classes", root / "map.json", "--out", root / "out.zarr"], ["map.json"])  # fmt: skip


@pytest.mark.parametrize("name,limit,argv", [
    ("map.json", "64 MiB", ["run", "{vol}", "--predictor", "labels", "--labels", "{lab}", "--classes", "{file}"]),
    ("coco.json", "1024 MiB", ["train", "--train", "{file}", "--images", "{root}", "--config", "c.yaml"]),
])  # fmt: skip
def test_a_json_file_of_absurd_size_is_refused_unread(capsys, inputs, tmp_path, name, limit, argv):
    with open(tmp_path / name, "wb") as f:
        f.truncate(2**30 + 1)  # sparse: no disk used
    fields = {"vol": inputs / "vol.tif", "lab": inputs / "lab.tif", "file": tmp_path / name, "root": tmp_path}
    line = _refused(capsys, tmp_path, [a.format(**fields) for a in argv] + ["--out", tmp_path / "out"], [name])
    assert limit in line


# -- nothing executable from a file a user is handed ------------------------------------------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # what a hostile pickle does: call anything on load
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_weights_that_would_run_code_are_refused_and_plain_weights_load(tmp_path, suffix):
    import pickle

    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.errors import UserError

    detectron2_ready()
    from detectron2.checkpoint import DetectionCheckpointer

    model, marker = torch.nn.Linear(2, 2), tmp_path / "ran"
    hostile, plain = tmp_path / f"hostile{suffix}", tmp_path / f"plain{suffix}"
    if suffix == ".pth":
        torch.save({"model": _Payload(marker)}, hostile)
        torch.save({"model": {k: v * 0 + 3 for k, v in model.state_dict().items()}}, plain)
    else:  # a model-zoo pickle: numpy arrays
        pickle.dump({"model": _Payload(marker)}, hostile.open("wb"))
        pickle.dump({"blobs": {k: np.full(v.shape, 3, np.float32) for k, v in model.state_dict().items()}}, plain.open("wb"))
    with pytest.raises(UserError, match="cannot be loaded as weights only"):
        DetectionCheckpointer(model).load(str(hostile))
    assert not marker.exists()
    DetectionCheckpointer(model).load(str(plain))
    assert all((v == 3).all() for v in model.state_dict().values())


def _untrained_model(path: Path) -> Path:
    """A randomly initialized demo-config Mask R-CNN as a model directory (it detects things in any tile)."""
    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.model_dir import ModelDir

    detectron2_ready()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    path.mkdir()
    cfg = get_cfg()
    cfg.merge_from_file(str(Path(__file__).parents[1] / "configs" / "demo_cpu.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path / "model_final.pth")
    (path / "config.yaml").write_text(cfg.dump())
    ModelDir(path=path, classes=["cell", "mitochondrion"], tile=96, overlap=16).save()
    return path


def test_a_blank_window_gets_no_objects_from_the_model(tmp_path):
    """A window of one value (a missing section filled with 0, fill around registered sections, a saturated slice)
    holds nothing to find: a model that finds objects anywhere finds none there, and still finds them beside it."""
    from cellseg_batch.predict.detectron2_predictor import Detectron2Predictor
    from cellseg_batch.synth import SyntheticEM
    from cellseg_batch.tiles import Box

    predictor = Detectron2Predictor(str(_untrained_model(tmp_path / "m")), device="cpu", score_threshold=0.0)
    image = SyntheticEM((1, 96, 128), seed=3).image(0, 0, 96, 0, 128).astype(np.float32)
    blank = [np.zeros((96, 128), np.float32), np.full((96, 128), 255, np.float32)]
    assert predictor.predict(0, [Box(0, 96, 0, 128)], [image])[0].count > 0  # it does find things
    tiles = predictor.predict(0, [Box(0, 96, 0, 128)] * 4, [blank[0], image, blank[1], image])
    assert [t.count > 0 for t in tiles] == [False, True, False, True]
    assert all(t.labels.shape == (2, 96, 128) and not t.labels.any() for t in tiles[::2])
    assert predictor.predict(0, [Box(0, 96, 0, 128)], [blank[0]])[0].count == 0  # a batch of blank windows alone


def test_the_view_command_run_prints_can_be_pasted_where_the_output_path_has_spaces(capsys, monkeypatch, inputs,
                                                                                     tmp_path):
    import shlex

    import cellseg_batch.run

    out = tmp_path / "my runs" / "vol 1 ü.zarr"
    report = {"counts": {"objects": 0, "objects_per_class": {"cell": 0}}, "time_s": {"total": 1.0}}
    monkeypatch.setattr(cellseg_batch.run, "run", lambda cfg: report)
    argv = [a if a != inputs / "out" else out for a in _base("run", inputs)]
    assert cli.main([str(a) for a in argv]) == 0
    look = next(line for line in capsys.readouterr().out.splitlines() if "cellseg-batch view" in line)
    assert shlex.split(look.split("look", 1)[1]) == ["cellseg-batch", "view", str(out)]


def test_a_work_dir_that_cannot_be_written_is_refused_naming_it(capsys, inputs, tmp_path):
    """A --work-dir that is a file (or on a read-only filesystem, or another user's) ended in a traceback."""
    (tmp_path / "work").write_text("a file, not a folder")
    line = _refused(capsys, inputs, [*_base("run", inputs), "--work-dir", tmp_path / "work"], [tmp_path / "work"])
    assert "Not a directory" in line and "choose an --out and --work-dir" in line


@pytest.fixture(scope="module")
def cropped_run(tmp_path_factory) -> Path:
    """A 10-slice ground truth, slices 5:8 of it saved as a volume of their own, and a run of that crop (its own
    labels as the prediction: exact)."""
    from conftest import cli as run_cli

    root = tmp_path_factory.mktemp("cropped")
    truth = np.zeros((10, 64, 64), np.uint16)
    truth[:, 10:30, 10:30], truth[:, 40:60, 35:55] = 1, 2
    tifffile.imwrite(root / "truth.tif", truth, photometric="minisblack")
    tifffile.imwrite(root / "crop.tif", truth[5:8], photometric="minisblack")
    run_cli("run", root / "crop.tif", "--predictor", "labels", "--labels", root / "crop.tif", "--classes", "cell",
            "--tile", 32, "--overlap", 8, "--out", root / "crop.zarr", "--no-progress", "--no-image")  # fmt: skip
    return root


def test_eval_of_a_whole_volume_s_run_against_deeper_ground_truth_is_refused_not_scored_on_its_first_slices(
        capsys, cropped_run):
    """A run of a whole 3-slice volume (a crop saved as its own file) records slices 0:3 of it; eval took them as
    slices 0:3 of a 10-slice ground truth and scored them there (exit 0). Only a run of part of its volume (--slices)
    is placed in a deeper ground truth."""
    argv = ["eval", cropped_run / "crop.zarr", cropped_run / "truth.tif", "--gt-classes", "cell"]
    line = _refused(capsys, cropped_run, argv, ["shape"])
    assert "(3, 64, 64) but the ground truth has (10, 64, 64)" in line


@pytest.mark.parametrize("args, said", [
    (["crop.zarr", "crop.tif"], "crop.tif is a label stack without class names: give its classes with --gt-classes"),
    (["crop.zarr", "crop.tif", "--gt-classes", "a/b"], "--gt-classes 'a/b': give a class name"),
    (["crop.tif", "crop.tif", "--pred-classes", "x/y", "--gt-classes", "cell"], "--pred-classes 'x/y': give a class"),
    (["crop.zarr", "crop.zarr", "--gt-classes", "cell"], "crop.zarr is an OME-Zarr whose labels/ group names its "
                                                          "classes: drop --gt-classes"),
])  # fmt: skip
def test_eval_s_class_mistakes_name_eval_s_own_options(capsys, cropped_run, args, said):
    """Said in run's terms before: '1 label stack(s) need classes but 0 --classes were given; put one --classes
    after each --labels stack', options eval does not have."""
    line = _refused(capsys, cropped_run, ["eval", *(cropped_run / a if a.startswith("crop") else a for a in args)],
                    ["classes"])  # fmt: skip
    assert said in line and "--labels" not in line


def test_a_labels_path_that_does_not_exist_is_named_before_the_classes_it_would_need(capsys, tmp_path):
    """A typo in --labels without --classes was told '1 label stack(s) need classes but 0 --classes were given'."""
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 32, 32), np.uint8))
    for extra in ([], ["--classes", "cell"]):
        line = _refused(capsys, tmp_path, ["run", tmp_path / "v.tif", "--predictor", "labels", "--labels",
                                           tmp_path / "nope" / "labels.tif", *extra, "--out", tmp_path / "o.zarr"],
                        ["does not exist"])  # fmt: skip
        assert str(tmp_path / "nope" / "labels.tif") in line and "--classes" not in line


def test_eval_s_output_files_go_where_said_or_are_refused_in_one_line(capsys, tmp_path):
    """--json into a folder ended in a traceback after the scores (IsADirectoryError), and into folders not made yet
    too (FileNotFoundError); --errors-png NAME said 'wrote NAME' where matplotlib wrote NAME.png."""
    gt = np.zeros((4, 32, 32), np.uint16)
    gt[:, 4:20, 4:20] = 1
    pred = gt.copy()
    pred[2:][pred[2:] == 1] = 2  # a split at z 2
    tifffile.imwrite(tmp_path / "gt.tif", gt, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    base = ["eval", tmp_path / "pred.tif", tmp_path / "gt.tif", "--pred-classes", "cell", "--gt-classes", "cell"]
    (tmp_path / "folder").mkdir()
    for option in ("--json", "--errors-png"):
        line = _refused(capsys, tmp_path, [*base, option, tmp_path / "folder"], [option])
        assert "is a folder; give a file in it" in line
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert cli.main([str(a) for a in [*base, "--json", tmp_path / "a_file" / "r.json"]]) == 2  # after the scores
    assert capsys.readouterr().err.strip() == (f"cellseg-batch: error: cannot write --json {tmp_path / 'a_file' / 'r.json'}"
                                               " (File exists); give a file in a folder you can write")  # fmt: skip
    assert cli.main([str(a) for a in [*base, "--json", tmp_path / "new" / "r.json", "--errors-png",
                                      tmp_path / "pics" / "split"]]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert json.loads((tmp_path / "new" / "r.json").read_text())["classes"]["cell"]["errors"]["n_splits"] == 1
    assert (tmp_path / "pics" / "split.png").stat().st_size > 1000 and f"wrote {tmp_path / 'pics' / 'split.png'} (" in said


@pytest.mark.parametrize("mode, why", [("3d", "no ground-truth object is split"), ("2d", "--mode 2d finds no 3D")])
def test_eval_says_why_it_drew_no_errors_png(capsys, cropped_run, tmp_path, mode, why):
    """--errors-png with nothing to draw left no file and said nothing."""
    png = tmp_path / "errors.png"
    argv = ["eval", cropped_run / "crop.zarr", cropped_run / "crop.tif", "--gt-classes", "cell", "--mode", mode,
            "--errors-png", png]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    assert f"did not write {png}: {why}" in capsys.readouterr().out and not png.exists()


def test_an_out_in_folders_not_made_yet_makes_them(capsys, inputs, tmp_path):
    """An --out in a results folder not made yet was refused as 'cannot write beside ...': the folders are made."""
    out = tmp_path / "results" / "new" / "run.zarr"
    argv = [*_base("run", inputs)[:-3], "--out", out, "--no-progress"]
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert (out / "labels" / "cell").is_dir()


def test_eval_says_which_ids_its_class_map_leaves_unscored(capsys, tmp_path):
    """An id missing from --gt-classes was dropped from the scores without a word (run refuses it; eval may be
    given a map of some classes on purpose, so it warns), and then named only where the check at the start read
    it (the first, middle and last slices): all are named, as scoring reads them."""
    gt = np.zeros((5, 32, 32), np.uint16)
    gt[:, 2:10, 2:10], gt[:, 20:30, 20:30], gt[1, 12:16, 12:16] = 1, 9, 11
    tifffile.imwrite(tmp_path / "gt.tif", gt, photometric="minisblack")
    (tmp_path / "map.json").write_text(json.dumps({"1": "cell"}))
    capsys.readouterr()
    argv = ["eval", tmp_path / "gt.tif", tmp_path / "gt.tif", "--pred-classes", "cell", "--gt-classes",
            tmp_path / "map.json"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "2 ids in the slices scored have no class in its --gt-classes map (9, 11)" in err
    # also where the map's first class (by name) is not scored: the prediction holds only the other one
    (tmp_path / "map2.json").write_text(json.dumps({"1": "axon", "3": "cell"}))
    gt[gt == 1] = 3
    tifffile.imwrite(tmp_path / "gt2.tif", gt, photometric="minisblack")
    argv = ["eval", tmp_path / "gt2.tif", tmp_path / "gt2.tif", "--pred-classes", "cell", "--gt-classes",
            tmp_path / "map2.json"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 0
    assert "2 ids in the slices scored have no class in its --gt-classes map (9, 11)" in capsys.readouterr().err
    assert err.count("they are not scored") == 1
