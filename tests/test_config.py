"""Shared option parsing (config.py), the Registry, and the CLI refusing bad values before it writes anything."""

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg_batch.cli import build_parser
from cellseg_batch.config import (
    RunConfig,
    check_options,
    check_run_config,
    format_slice_list,
    parse_floats,
    parse_pixel_size,
    parse_slice_list,
    parse_slices,
)
from cellseg_batch.errors import UserError
from cellseg_batch.predict import PREDICTORS, register
from cellseg_batch.read import VOLUME_OPENERS, register_opener
from cellseg_batch.registry import Registry
from conftest import REPO, cli


def test_parse_floats():
    assert parse_floats("40,10,10", 3, "--pixel-size") == (40.0, 10.0, 10.0)
    assert parse_floats(" 1.5, -2 ", 2, "--normalization") == (1.5, -2.0)


@pytest.mark.parametrize("text", ["40,10", "40,10,10,10", "a,b,c", "", "1,,2", "1,nan,2", "inf,1,2"])
def test_parse_floats_refuses(text):
    with pytest.raises(UserError, match="^--pixel-size .*give 3 comma-separated numbers$"):
        parse_floats(text, 3, "--pixel-size")


def test_parse_pixel_size_wants_positive_numbers():
    assert parse_pixel_size("40,10,10") == (40.0, 10.0, 10.0)
    with pytest.raises(UserError, match="--pixel-size '40,0,10'.*positive"):
        parse_pixel_size("40,0,10")
    # micrometres typed for nanometres: refused, saying so, not written into the output as 0.01 nm pixels
    with pytest.raises(UserError, match=r"--pixel-size '0.04,0.01,0.01'.*in nm.*multiply by 1000"):
        parse_pixel_size("0.04,0.01,0.01")
    assert parse_pixel_size("0.5,0.1,0.1") == (0.5, 0.1, 0.1)  # sub-nm pixels (cryo-EM) stand


@pytest.mark.parametrize("text,expected", [
    (None, (0, 10)), ("", (0, 10)), ("2:5", (2, 5)), (":4", (0, 4)), ("7:", (7, 10)), ("0:10", (0, 10)),
])  # fmt: skip
def test_parse_slices(text, expected):
    assert parse_slices(text, 10) == expected


@pytest.mark.parametrize("text", ["5", "a:b", "1:2:3", "5:3", "4:4", "0:11", "-1:3", "10:"])
def test_parse_slices_refuses(text):
    with pytest.raises(UserError, match=f"^--from {text!r}"):
        parse_slices(text, 10, "--from")


def test_check_run_config_accepts_the_defaults_and_good_values():
    check_run_config(RunConfig("v.tif", "o.zarr"))
    check_run_config(RunConfig("v.tif", "o.zarr", predictor="labels", tile=256, overlap=2, actors=2, num_gpus=0,
                               score_threshold=0.0, normalization="10,200", pixel_size="40,10,10", link="none"))  # fmt: skip


@pytest.mark.parametrize("field,value,option", [
    ("predictor", "magic", "--predictor"), ("stitch_iou", 0.0, "--stitch-iou"), ("link_iou", 1.5, "--link-iou"),
    ("link_ioa", float("nan"), "--link-ioa"), ("link", "greedy", "--link"), ("batch_size", 0, "--batch-size"),
    ("tile", 0, "--tile"), ("overlap", -2, "--overlap"), ("overlap", 0, "--overlap"), ("actors", 0, "--actors"),
    ("cpus_per_actor", 0, "--cpus-per-actor"), ("num_cpus", 0, "--num-cpus"), ("num_gpus", -1, "--num-gpus"),
    ("score_threshold", 1.5, "--score-threshold"), ("normalization", "200,10", "--normalization"),
    ("normalization", "10", "--normalization"), ("pixel_size", "40,10", "--pixel-size"),
    ("pixel_size", "40,-1,10", "--pixel-size"),
])  # fmt: skip
def test_check_run_config_refuses(field, value, option):
    with pytest.raises(UserError) as info:
        check_run_config(RunConfig("v.tif", "o.zarr", **{field: value}))
    assert str(info.value).startswith(option + " ") and "\n" not in str(info.value)


def test_run_options_take_their_defaults_from_run_config():
    args = vars(build_parser().parse_args(["run", "v.tif", "--out", "o.zarr"]))
    assert vars(build_parser().parse_args(["run", "v.tif", "-o", "o.zarr"])) == args  # -o: as most tools spell it
    assert RunConfig(**{k: args[k] for k in RunConfig.__dataclass_fields__}) == RunConfig("v.tif", "o.zarr")
    for f in dataclasses.fields(RunConfig):
        if f.default is not dataclasses.MISSING:
            assert args[f.name] == f.default, f.name


def test_registry():
    reg = Registry("widget")
    reg.register("b", 2)

    @reg.register("a")
    def a():
        return 1

    assert a() == 1 and reg["a"] is a and reg.get("b") == 2 and reg.get("c") is None
    assert "a" in reg and "c" not in reg and reg.names() == ["a", "b"] == list(reg) == sorted(reg) and len(reg) == 2
    with pytest.raises(ValueError, match="widget 'b' is already registered"):
        reg.register("b", 3)
    assert reg["b"] == 2
    with pytest.raises(KeyError, match="unknown widget 'c'; choose one of a, b"):
        reg["c"]
    reg.register_lazy("dumps", "json:dumps")
    assert reg["dumps"] is json.dumps


def test_predictors_and_openers_refuse_a_second_entry_of_a_name():
    assert isinstance(PREDICTORS, Registry) and {"detectron2", "labels"} <= set(PREDICTORS)
    assert PREDICTORS["labels"].name == "labels"
    with pytest.raises(ValueError, match="predictor 'labels' is already registered"):
        register("labels")(type("Other", (), {}))
    assert PREDICTORS["labels"].__name__ == "LabelsPredictor"
    with pytest.raises(ValueError, match="volume opener '.tif' is already registered"):
        register_opener(".tif", lambda path: None)
    assert ".tif" in VOLUME_OPENERS and "synth:" in VOLUME_OPENERS


def test_no_import_cycles():
    """No cycle among the package's modules, counting imports inside functions too."""
    root = REPO / "cellseg_batch"

    def name(p: Path) -> str:
        parts = p.relative_to(REPO).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in root.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[mod] = deps & modules.keys() - {mod}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        return False

    # a package reaching its own __init__ is how Python imports submodules, not a cycle
    cycles = sorted((a, b) for a in graph for b in graph[a] if not a.startswith(b + ".") and reaches(b, a))
    assert not cycles, cycles


# -- the command line: refused with one line, status 2, nothing written --------------------------------------------


def _expect_refusal(out: Path, *args, match: str):
    proc = cli(*args, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cellseg-batch: error:") and match in lines[0], proc.stderr
    assert not out.exists() and not Path(f"{out}.work").exists()


@pytest.fixture
def stacks(tmp_path):
    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "vol.tif", rng.integers(0, 255, (3, 64, 64), dtype=np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", np.zeros((3, 64, 64), np.uint32), photometric="minisblack")
    return tmp_path / "vol.tif", tmp_path / "lab.tif"


@pytest.mark.parametrize("args,match", [
    (["--slices", "5"], "--slices '5': give START:STOP"), (["--slices", "1:9"], "--slices '1:9' is outside"),
    (["--every", "0"], "--every 0"),
])  # fmt: skip
def test_convert_refuses(tmp_path, stacks, args, match):
    volume, labels = stacks
    out = tmp_path / "coco"
    _expect_refusal(out, "convert", "labels-to-coco", labels, volume, "--classes", "cell", "--out", out, *args,
                    match=match)  # fmt: skip


def test_train_refuses_two_pixel_sizes(tmp_path):
    out = tmp_path / "model"
    _expect_refusal(out, "train", "--train", tmp_path / "ann.json", "--images", tmp_path, "--config", "c.yaml",
                    "--out", out, "--pixel-size", "40,10", match="--pixel-size '40,10': give 3")  # fmt: skip


@pytest.mark.parametrize("args,match", [(["--tile", "0"], "--tile 0"), (["--num-gpus", "-1"], "--num-gpus -1")])
def test_run_refuses(tmp_path, stacks, args, match):
    volume, labels = stacks
    out = tmp_path / "out.zarr"
    _expect_refusal(out, "run", volume, "--predictor", "labels", "--labels", labels, "--classes", "cell", "--out", out,
                    "--no-progress", *args, match=match)  # fmt: skip


@pytest.mark.parametrize("text,expected", [
    ("0,10,20", [0, 10, 20]), ("20,0,10,10", [0, 10, 20]), ("0:3", [0, 1, 2]), ("0:3,8,5:7,2", [0, 1, 2, 5, 6, 8]),
    (" 4 , 1:3", [1, 2, 4]), ("28:", [28, 29]), ("29", [29]), (None, list(range(30))),
])  # fmt: skip
def test_parse_slice_list(text, expected):
    assert parse_slice_list(text, 30) == expected


@pytest.mark.parametrize("text,match", [
    ("x", "give slices and START:STOP ranges separated by commas"), ("0,,5", "separated by commas"),
    ("1.5", "separated by commas"), ("-1", "slice -1 is negative"), ("0,30", "slice 30 is outside the volume's 30"),
    ("0,5:3", "outside the volume's 30 slices"), ("0,25:31", "outside"), ("1:2:3", "give START:STOP"),
])  # fmt: skip
def test_parse_slice_list_refuses(text, match):
    with pytest.raises(UserError, match=match) as refused:
        parse_slice_list(text, 30)
    assert str(refused.value).startswith("--slices ") and "\n" not in str(refused.value)


def test_slice_lists_are_eval_s_syntax_only():
    check_options("eval", {"slices": "0,10:12,20"})  # no volume yet: the syntax alone
    with pytest.raises(UserError, match="slice -3 is negative"):
        check_options("eval", {"slices": "0,-3"})
    for command in ("run", "convert"):  # a run or a conversion covers one range of slices
        with pytest.raises(UserError, match="give START:STOP"):
            check_options(command, {"slices": "0,10"})
    assert format_slice_list([0, 1, 2, 5, 7, 8]) == "0:3,5,7:9"
