"""The detectron2 predictor end to end: Ray actors holding a Mask R-CNN (CPU), batched tiles, OME-Zarr output
that a standard reader (ome-zarr-py) opens."""

import json

import numpy as np
import pytest

from conftest import REPO, cli, labels_of


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained (randomly initialized) demo-config Mask R-CNN saved as a model directory."""
    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.model_dir import ModelDir

    detectron2_ready()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    path = tmp_path_factory.mktemp("model") / "m"
    path.mkdir()
    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / "configs" / "demo_cpu.yaml"))
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    torch.save({"model": build_model(cfg).state_dict()}, path / "model_final.pth")
    (path / "config.yaml").write_text(cfg.dump())
    ModelDir(path=path, classes=["cell", "mitochondrion"], tile=96, overlap=16, pixel_size_nm=[40.0, 10.0, 10.0]).save()
    return path


def test_detectron2_predictor_runs_through_ray_and_writes_readable_ome_zarr(model_dir, synth_small, tmp_path):
    out = tmp_path / "pred.zarr"
    # an untrained head scores near 1/3 everywhere: threshold 0.2 keeps detections, so every stage has work
    cli("run", synth_small["volume"], "--model", model_dir, "--out", out, "--slices", "2:5", "--batch-size", 3,
        "--score-threshold", 0.2, "--chunk", 128, "--no-progress")  # chunks of 128 px: a 3-level pyramid
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["plan"]["predictor"] == "detectron2"
    assert report["plan"]["tile"] == 96 and report["plan"]["overlap"] == 16  # the model's tile, not resized
    assert report["counts"]["actors"]["count"] >= 1
    assert report["counts"]["objects"] > 0
    assert report["input"]["pixel_size_nm"] == [40.0, 10.0, 10.0]

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    nodes = list(Reader(parse_url(str(out)))())
    image = nodes[0]
    assert any(isinstance(s, Multiscales) for s in image.specs)
    assert image.data[0].shape == (3, 384, 384)
    labels = [n for n in nodes if any(isinstance(s, Label) for s in n.specs)]
    assert sorted(n.metadata["name"] for n in labels) == ["cell", "mitochondrion"]
    for node in labels:
        assert node.data[0].dtype == np.uint32  # the smallest type that holds the ids (chosen after linking)
        assert len(node.data) >= 2  # a pyramid
        assert node.data[0].shape == (3, 384, 384)
    ids = labels_of(out, "cell")
    table = (out / "cellseg" / "objects.csv").read_text().splitlines()
    assert len(table) - 1 == report["counts"]["objects"]
    assert set(np.unique(ids[ids > 0])) <= set(range(1, report["counts"]["objects"] + 1))
    assert (out / "cellseg" / "preview.png").stat().st_size > 1000


def test_a_model_whose_classes_disagree_with_its_config_is_refused_before_the_actors_start(model_dir, tmp_path):
    """cellseg.json edited to other classes than the config's NUM_CLASSES: the check ran in the actors only, and
    came out as Ray's retries and traceback (200-300 lines) after Ray and the actors had started."""
    import shutil

    import tifffile

    edited = tmp_path / "m"
    shutil.copytree(model_dir, edited)
    meta = json.loads((edited / "cellseg.json").read_text())
    (edited / "cellseg.json").write_text(json.dumps({**meta, "classes": ["cell", "mitochondrion", "granule"]}))
    tifffile.imwrite(tmp_path / "v.tif", np.full((1, 64, 64), 90, np.uint8), photometric="minisblack")
    proc = cli("run", tmp_path / "v.tif", "--model", edited, "--out", tmp_path / "o.zarr", "--no-progress", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"cellseg-batch: error: {edited}: cellseg.json lists 3 classes but the config has "
        "MODEL.ROI_HEADS.NUM_CLASSES=2; correct one of them"]
    assert not (tmp_path / "o.zarr").exists()


def test_a_run_with_a_given_normalization_writes_a_report_that_is_json(model_dir, tmp_path):
    """--normalization LOW,HIGH recorded its percentiles as NaN: report.json was not JSON to a strict reader (a
    browser's JSON.parse, jq). The report records the predictor's settings as its actors built it, and a volume
    without a pixel size is said to take the model's."""
    import tifffile

    tifffile.imwrite(tmp_path / "v.tif", np.full((1, 64, 64), 90, np.uint8), photometric="minisblack")
    cli("run", tmp_path / "v.tif", "--model", model_dir, "--normalization", "10,250", "--num-cpus", 1, "--out",
        tmp_path / "o.zarr", "--no-progress")  # fmt: skip

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "o.zarr" / "cellseg" / "report.json").read_text(), parse_constant=refuse)
    assert report["plan"]["normalization"]["low"] == 10 and report["plan"]["normalization"]["percentiles"] is None
    # what the run used where the options left it to the model and the machine (the report said null / auto)
    assert report["plan"]["predictor_settings"] == {"device": "cpu", "score_threshold": 0.5, "amp": None,
                                                    "exclusive": [], "detections_per_tile": 300}  # fmt: skip
    # a range beyond the 8-bit volume's (0,65535 on uint8: 4 objects where the model found 40) is said; 10,250 is not
    assert not any("reaches beyond" in w for w in report["warnings"])
    cli("run", tmp_path / "v.tif", "--model", model_dir, "--normalization", "0,65535", "--num-cpus", 1, "--out",
        tmp_path / "wide.zarr", "--no-progress")  # fmt: skip
    wide = json.loads((tmp_path / "wide.zarr" / "cellseg" / "report.json").read_text())["warnings"]
    assert any("--normalization 0,65535 reaches beyond the uint8 volume's range (0..255)" in w for w in wide), wide
    # a plain TIFF records no pixel size: the model's was taken without a word, and no --rescale advice could follow
    assert any("v.tif records no pixel size: the output's metadata takes the model's (40,10,10 nm)" in w
               for w in report["warnings"]), report["warnings"]


def test_detectron2_imports_without_torch_dynamo_and_roi_align_still_works():
    """Actors import detectron2 without torch._dynamo (``d2compat._import_torchvision_ops``); RoIAlign runs, and a
    later torch._dynamo import (torch.compile) is the real package, which torchvision's fallback check then uses."""
    import subprocess
    import sys

    code = """
import sys
from cellseg_batch.d2compat import detectron2_ready
detectron2_ready()
from detectron2.modeling import build_model  # noqa: F401
assert "torch._dynamo" not in sys.modules, "torch._dynamo was imported"
import torch
from torchvision.ops import roi_align
x = torch.arange(64.0).reshape(1, 1, 8, 8)
out = roi_align(x, torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]]), (2, 2), aligned=True)
assert out.shape == (1, 1, 2, 2) and torch.isfinite(out).all()
import torch._dynamo.utils as real
assert hasattr(real, "counters"), "a stand-in was left in place of torch._dynamo.utils"
check = sys.modules["torchvision.ops.roi_align"].is_compile_supported
assert check("cpu") == real.is_compile_supported("cpu")
print("ok")
"""
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_rescale_feeds_the_model_tiles_at_its_pixel_size_and_paints_masks_at_the_volume_s(model_dir, synth_small,
                                                                                           tmp_path):  # fmt: skip
    """--rescale on a volume whose pixels are half the model's: tiles of twice the model's size in volume pixels,
    shrunk to the model's size before the forward pass; instances come back at the volume's pixels."""
    out = tmp_path / "rescaled.zarr"
    cli("run", synth_small["volume"], "--model", model_dir, "--out", out, "--slices", "2:4", "--pixel-size",
        "40,5,5", "--rescale", "--score-threshold", 0.2, "--no-progress")  # fmt: skip
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["plan"]["tile"] == 192 and report["plan"]["overlap"] == 32  # the model's 96 / 16, in volume pixels
    assert report["plan"]["zoom"] == [0.5, 0.5]
    assert not any("pixel size" in w for w in report["warnings"])
    assert report["counts"]["objects"] > 0
    assert labels_of(out, "cell").shape == (2, 384, 384)
    enlarged = tmp_path / "enlarged.zarr"  # pixels twice the model's: tiles enlarged, which the report warns about
    cli("run", synth_small["volume"], "--model", model_dir, "--out", enlarged, "--slices", "2:3", "--pixel-size",
        "40,20,20", "--rescale", "--no-progress")  # fmt: skip
    report = json.loads((enlarged / "cellseg" / "report.json").read_text())
    assert report["plan"]["tile"] == 48 and report["plan"]["zoom"] == [2.0, 2.0]
    assert any("--rescale enlarges tiles 2x" in w for w in report["warnings"])

    from cellseg_batch.predict import PredictorSpec, build_predictor
    from cellseg_batch.tiles import Box

    predictor = build_predictor(PredictorSpec("detectron2", {"model_dir": str(model_dir), "device": "cpu",
                                                             "score_threshold": 0.2, "zoom": [0.5, 0.5]}))
    seen = []
    forward = predictor.model.forward
    predictor.model.forward = lambda inputs: seen.extend(i["image"].shape for i in inputs) or forward(inputs)
    image = np.random.default_rng(0).uniform(0, 255, (192, 200)).astype(np.float32)
    (tile,) = predictor.predict(0, [Box(0, 192, 0, 200)], [image])
    assert seen == [(1, 96, 100)]  # what the model saw: the window at its pixel size, one channel
    assert tile.labels.shape == (2, 192, 200) and tile.count > 0  # what comes back: the window's pixels


def test_greyscale_tiles_go_in_as_one_channel_with_the_stock_model_s_detections(model_dir):
    """The predictor's model takes a tile as one channel (the stem's kernel summed over its 3 input channels); the
    stock detectron2 model, fed the tile as 3 equal channels as DefaultPredictor would, detects the same."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from cellseg_batch.predict.detectron2_predictor import Detectron2Predictor, fold_grey_input
    from cellseg_batch.synth import SyntheticEM

    ours = Detectron2Predictor(str(model_dir), device="cpu", score_threshold=0.2)
    assert ours.channels == 1 and ours.model.backbone.bottom_up.stem.conv1.weight.shape[1] == 1
    stock = build_model(ours.cfg).eval()
    DetectionCheckpointer(stock).load(ours.cfg.MODEL.WEIGHTS)
    image = torch.from_numpy(SyntheticEM((1, 96, 160), seed=3).image(0, 0, 96, 0, 160).astype(np.float32))
    with torch.inference_mode():
        (a,) = ours.model([{"image": image[None], "height": 96, "width": 160}])
        (b,) = stock([{"image": image.expand(3, 96, 160), "height": 96, "width": 160}])
    a, b = a["instances"], b["instances"]
    assert len(a) == len(b) > 0
    assert torch.equal(a.pred_classes, b.pred_classes)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-4, rtol=0)
    torch.testing.assert_close(a.pred_boxes.tensor, b.pred_boxes.tensor, atol=0.01, rtol=0)
    assert (a.pred_masks != b.pred_masks).float().mean() < 1e-3

    # a per-channel pixel mean (ImageNet's) makes the channels differ: the model keeps its 3 channels
    cfg = ours.cfg.clone()
    cfg.MODEL.PIXEL_MEAN = [103.53, 116.28, 123.675]
    model = build_model(cfg)
    assert fold_grey_input(model) == 3 and model.backbone.bottom_up.stem.conv1.weight.shape[1] == 3


@pytest.mark.parametrize("args, message", [
    (("--pixel-size", "40,5,5", "--predictor", "labels", "--labels", "LABELS"),
     "labels predictor does not resize"),
    (("--pixel-size", "40,352777,352777"), "beyond 1/8..8"),
])  # fmt: skip
def test_rescale_refuses_what_it_cannot_do(model_dir, synth_small, tmp_path, args, message):
    args = [str(synth_small["truth"]) if a == "LABELS" else a for a in args]
    r = cli("run", synth_small["volume"], "--model", model_dir, "--out", tmp_path / "o.zarr", "--rescale", *args,
            "--no-progress", check=False)  # fmt: skip
    assert r.returncode != 0 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_rescale_needs_the_volume_s_pixel_size(model_dir, tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "plain.tif", np.zeros((2, 96, 96), np.uint8))  # no resolution recorded
    r = cli("run", tmp_path / "plain.tif", "--model", model_dir, "--out", tmp_path / "o.zarr", "--rescale",
            "--no-progress", check=False)  # fmt: skip
    assert r.returncode != 0 and "plain.tif records no pixel size; give it with --pixel-size" in r.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_a_volume_without_contrast_is_segmented_with_a_warning(model_dir, tmp_path):
    """A volume whose sample is one value (the wrong array of a file, an empty acquisition) reaches the model as a
    blank image: the run says so on the console and in its report, with what to check."""
    import tifffile

    tifffile.imwrite(tmp_path / "blank.tif", np.full((2, 160, 160), 7, np.uint8), photometric="minisblack")
    out = tmp_path / "blank.zarr"
    result = cli("run", tmp_path / "blank.tif", "--model", model_dir, "--out", out, "--no-progress")
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert any("has no contrast to stretch (every sampled pixel is 7" in w for w in report["warnings"])
    assert "no contrast" in result.stderr


def test_normalization_samples_without_contrast_say_why():
    from cellseg_batch.normalize import from_samples

    assert from_samples([np.full((8, 8), np.nan)]).blank == "no sampled pixel has a value (all NaN)"
    assert from_samples([np.full((8, 8), 3.0)]).blank == "every sampled pixel is 3"
    almost = np.full(1000, 5.0)
    almost[:3] = 9.0
    assert from_samples([almost]).blank == "at least 98.5% of the sampled pixels are 5"
    assert from_samples([np.arange(100.0)]).blank == ""


def test_invert_gives_the_model_a_negative_volume_as_its_positive(model_dir, synth_small, tmp_path):
    """``--invert`` (a volume whose contrast is the opposite of the training images'): the negative of a volume run
    with it reaches the model as the volume itself does without it, to the detection; without it, it does not."""
    import tifffile

    from cellseg_batch.read import open_volume

    volume = open_volume(str(synth_small["volume"]))
    nz, ny, nx = volume.shape
    image = np.stack([volume.read(z, 0, ny, 0, nx) for z in (3, 4)])
    tifffile.imwrite(tmp_path / "positive.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "negative.tif", np.iinfo(image.dtype).max - image, photometric="minisblack")
    common = ("--model", model_dir, "--score-threshold", 0.2, "--no-progress", "--no-image", "--link", "none")
    runs = {}
    for name, volume_file, extra in (("positive", "positive.tif", ()), ("inverted", "negative.tif", ("--invert",)),
                                     ("negative", "negative.tif", ())):  # fmt: skip
        out = tmp_path / f"{name}.zarr"
        cli("run", tmp_path / volume_file, "--out", out, *common, *extra)
        runs[name] = np.stack([labels_of(out, c) for c in ("cell", "mitochondrion")])
        report = json.loads((out / "cellseg" / "report.json").read_text())
        assert report["plan"]["normalization"]["invert"] == bool(extra)
    assert runs["positive"].any()
    assert np.array_equal(runs["inverted"] > 0, runs["positive"] > 0)
    assert not np.array_equal(runs["negative"] > 0, runs["positive"] > 0)


def test_tiles_that_reach_the_model_s_detection_cap_are_counted_and_named(model_dir, synth_small, tmp_path):
    """detectron2 keeps a tile's top TEST.DETECTIONS_PER_IMAGE detections and drops the rest without a word: a
    tile of dense organelles lost objects and the output looked complete. The run counts such tiles and says what
    to do."""
    import shutil

    capped = tmp_path / "capped"
    shutil.copytree(model_dir, capped)
    config = capped / "config.yaml"
    config.write_text(config.read_text().replace("DETECTIONS_PER_IMAGE: 300", "DETECTIONS_PER_IMAGE: 2"))
    out = tmp_path / "pred.zarr"
    done = cli("run", synth_small["volume"], "--model", capped, "--out", out, "--slices", "2:3", "--score-threshold",
               0.2, "--no-progress", "--no-image")  # fmt: skip
    report = json.loads((out / "cellseg" / "report.json").read_text())
    n = report["counts"]["tiles_at_instance_cap"]
    assert 0 < n <= report["counts"]["tiles"]
    said = f"{n} of the {report['counts']['tiles']} tiles predicted gave the most instances the predictor gives a tile"
    assert said in done.stderr and any(w.startswith(said) for w in report["warnings"])
    # scores of an untrained head are ~1/3: above 0.9 none is kept, no tile is at the cap, and nothing is said
    done = cli("run", synth_small["volume"], "--model", capped, "--out", out, "--slices", "2:3", "--score-threshold",
               0.9, "--no-progress", "--no-image", "--overwrite")  # fmt: skip
    assert json.loads((out / "cellseg" / "report.json").read_text())["counts"]["tiles_at_instance_cap"] == 0
    assert "gave the most instances" not in done.stderr



def test_a_section_far_darker_than_the_others_is_named_and_left_out_of_the_normalization(model_dir, synth_small,
                                                                                          tmp_path):
    """One section of four imaged at a quarter of the others' brightness: the run goes on, says which section and
    why (stderr and the report's warnings), and the contrast is the other sections'."""
    import tifffile

    volume = tifffile.imread(synth_small["volume"])[2:6]
    dark = volume.copy()
    dark[2] = dark[2] // 4
    tifffile.imwrite(tmp_path / "dark.tif", dark, photometric="minisblack")
    out = tmp_path / "dark.zarr"
    done = cli("run", tmp_path / "dark.tif", "--model", model_dir, "--out", out, "--no-progress", "--no-image")
    report = json.loads((out / "cellseg" / "report.json").read_text())
    said = [w for w in report["warnings"] if "sampled slice(s) 2 (" in w and "left out of the normalization" in w]
    assert len(said) == 1 and said[0].split(":")[0] in done.stderr, report["warnings"]
    plan = report["plan"]["normalization"]
    assert [z for z, _, _ in plan["odd_slices"]] == [2]
    assert plan["low"] >= np.percentile(volume[[0, 1, 3]], 1.0) - 1, plan


def test_no_objects_where_the_volume_holds_no_data(model_dir, synth_small, tmp_path):
    """A section cut off (its right part 0, as registration fills it) beside a 4 px zero frame on every slice, and
    NaN in a float copy: no object has a pixel there, the zeros are recorded as fill, and the normalization is the
    tissue's (the frame alone made its 1st percentile 0)."""
    import tifffile

    volume = tifffile.imread(synth_small["volume"])[2:5]
    filled = volume.copy()
    filled[:, :4] = filled[:, -4:] = filled[:, :, :4] = filled[:, :, -4:] = 0
    filled[1, :, 200:] = 0
    blank = np.nan_to_num(volume.astype(np.float32))
    blank[1, 100:300, 100:300] = np.nan
    for name, data, nothing in (("filled", filled, filled == 0), ("nan", blank, np.isnan(blank))):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, photometric="minisblack")
        out = tmp_path / f"{name}.zarr"
        cli("run", tmp_path / f"{name}.tif", "--model", model_dir, "--out", out, "--score-threshold", 0.2,
            "--no-progress", "--no-image")  # fmt: skip
        labels = [labels_of(out, cls) for cls in ("cell", "mitochondrion")]
        assert sum(int(layer.max()) for layer in labels) > 0  # the model found objects elsewhere
        for layer in labels:
            assert not layer[nothing].any(), name
        plan = json.loads((out / "cellseg" / "report.json").read_text())["plan"]["normalization"]
        assert plan["zero_is_fill"] == (name == "filled") and plan["low"] > 0


def test_an_ome_zarr_label_image_given_as_the_volume_is_warned_about(model_dir, tmp_path):
    """A run's label layer (NGFF image-label) given as the volume was segmented as an image with no word."""
    import tifffile

    from cellseg_batch.read import ZarrVolume

    labels = np.zeros((2, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    out = tmp_path / "out.zarr"
    cli("run", tmp_path / "labels.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes",
        "cell", "--out", out, "--no-progress")  # fmt: skip
    assert ZarrVolume(str(out / "labels" / "cell")).is_label_image and not ZarrVolume(str(out)).is_label_image
    done = cli("run", out / "labels" / "cell", "--model", model_dir, "--out", tmp_path / "o2.zarr", "--no-progress",
               "--no-image")  # fmt: skip
    assert "is an OME-Zarr label image (image-label)" in done.stderr, done.stderr


def test_a_model_rewritten_while_the_run_uses_it_is_not_finished_as_complete(model_dir, tmp_path, monkeypatch, capsys):
    """A training that saved into the model directory mid-run (new weights): the tiles before and after came from
    two models. The run refuses to finish its output (``Detectron2Predictor.identity_now``)."""
    import os
    import shutil

    import tifffile

    from cellseg_batch import cli as command
    from cellseg_batch.run import job

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    tifffile.imwrite(tmp_path / "v.tif", np.full((2, 96, 96), 7, np.uint8), photometric="minisblack")
    drive = job.drive

    def drive_then_save_weights(*args, **kwargs):
        drive(*args, **kwargs)
        weights = model / "model_final.pth"
        os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))

    monkeypatch.setattr(job, "drive", drive_then_save_weights)
    capsys.readouterr()
    assert command.main(["run", str(tmp_path / "v.tif"), "--model", str(model), "--out", str(tmp_path / "o.zarr"),
                         "--no-progress"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "an input of the predictor (a --labels stack, the model) changed while the run read it" in err, err
