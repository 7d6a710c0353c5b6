"""Training through detectron2: COCO files as annotation tools write them, CPU multi-process (gloo) launch in
step, resume, the model directory `run` uses, and the round trip labels -> COCO -> train -> run -> eval."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util

from cellseg_batch.coco import load_coco, read_grey
from cellseg_batch.errors import UserError
from cellseg_batch.model_dir import ModelDir
from conftest import REPO, cli

CONFIG = REPO / "configs" / "demo_cpu.yaml"


def _makesense_like(root: Path, n_images: int = 4, size: int = 128) -> Path:
    """A COCO export like makesense.ai/CVAT write: polygons, category ids 3/7/12, file names only, RGB PNGs."""
    rng = np.random.default_rng(0)
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": 12, "name": "mitochondrion"},
                                                            {"id": 3, "name": "cell"}, {"id": 7, "name": "granule"}]}  # fmt: skip
    for i in range(n_images):
        img = np.full((size, size), 200, np.uint8)
        for k in range(6):
            cy, cx, r = (int(v) for v in (rng.integers(20, size - 20), rng.integers(20, size - 20), rng.integers(6, 14)))
            yy, xx = np.ogrid[:size, :size]
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img[disk] = 60 + 40 * (k % 3)
            poly = [v for a in np.linspace(0, 2 * np.pi, 12, endpoint=False)
                    for v in (float(cx + r * np.cos(a)), float(cy + r * np.sin(a)))]  # fmt: skip
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": i + 1, "iscrowd": 0,
                                        "category_id": [3, 7, 12][k % 3], "segmentation": [poly],
                                        "bbox": [cx - r, cy - r, 2 * r, 2 * r], "area": float(disk.sum())})  # fmt: skip
        Image.fromarray(np.repeat(img[:, :, None], 3, axis=2)).save(images_dir / f"slice_{i:03d}.png")
        coco["images"].append({"id": i + 1, "file_name": f"slice_{i:03d}.png", "width": size, "height": size})
    (root / "ann.json").write_text(json.dumps(coco))
    return root / "ann.json"


def test_makesense_style_coco_loads_with_classes_by_category_id(tmp_path):
    ann = _makesense_like(tmp_path)
    data = json.loads(ann.read_text())
    # problems an annotation tool export can hold: each is skipped and counted
    data["images"].append({"id": 99, "file_name": "gone.png", "width": 128, "height": 128})
    data["annotations"] += [
        {"id": 900, "image_id": 1, "category_id": 3, "segmentation": [[1, 1, 2, 2]]},  # degenerate polygon
        {"id": 901, "image_id": 1, "category_id": 5, "segmentation": [[1, 1, 20, 1, 20, 20]]},  # unknown category
        {"id": 902, "image_id": 1, "category_id": 3, "segmentation": [[300, 300, 320, 300, 320, 320]]},  # outside
    ]  # fmt: skip
    ann.write_text(json.dumps(data))
    s = load_coco(ann, tmp_path / "images")
    assert s.classes == ["cell", "granule", "mitochondrion"]  # ordered by category id 3, 7, 12
    assert len(s.records) == 4 and sum(len(r["annotations"]) for r in s.records) == 24
    assert s.skipped == {"missing image files": 1, "degenerate polygons": 1, "unknown categories": 1,
                         "annotations outside the image": 1}  # fmt: skip
    assert "skipped 1 annotations outside the image" in s.summary()


def test_what_other_annotation_tools_export_is_taken_or_refused_in_one_line(tmp_path):
    """CVAT's masks (RLE flagged iscrowd) are instances; categories repeating a name are one class; annotations of
    images not in the file are counted; ids as strings or floats find their image; an image id given twice, or a
    size that is not a number, is refused in one line."""
    ann = _makesense_like(tmp_path)
    data = json.loads(ann.read_text())
    for a in data["annotations"][:6]:  # image 1's: as CVAT's "COCO 1.0" mask export writes them
        rle = mask_util.merge(mask_util.frPyObjects(a["segmentation"], 128, 128))
        a["segmentation"], a["iscrowd"] = {"size": rle["size"], "counts": rle["counts"].decode()}, 1
    data["annotations"][6]["iscrowd"] = None
    for a in data["annotations"][12:18]:
        a["image_id"] = str(a["image_id"])  # "3": image 3's
    data["categories"].append({"id": 13, "name": "mitochondrion"})  # the class again, under another id
    data["annotations"][18]["category_id"] = 13
    data["annotations"].append(dict(data["annotations"][0], id=999, image_id=42))  # no image 42
    ann.write_text(json.dumps(data))
    s = load_coco(ann, tmp_path / "images")
    assert s.classes == ["cell", "granule", "mitochondrion"]
    assert sum(len(r["annotations"]) for r in s.records) == 24 and s.crowd == 6
    assert all(a["iscrowd"] == 0 for r in s.records for a in r["annotations"])
    assert s.skipped == {"annotations of images not in the file": 1}
    assert "6 of them flagged iscrowd" in s.summary()
    data["images"][1]["id"] = 1
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match="image id 1 is given to 2 images"):
        load_coco(ann, tmp_path / "images")
    data["images"][1]["id"], data["images"][0]["height"] = 2, "tall"
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match="height 'tall'"):
        load_coco(ann, tmp_path / "images")
    data["images"][0]["height"] = 256  # the file is 128 px high: masks and the model's tile would follow the JSON
    ann.write_text(json.dumps(data))
    with pytest.raises(UserError, match="is 128x128 px but the file gives height 256 and width 128"):
        load_coco(ann, tmp_path / "images")
    data["images"][0]["height"] = 128
    ann.write_bytes(b"\xef\xbb\xbf" + json.dumps(data).encode())  # a byte-order mark, as some Windows tools write
    assert load_coco(ann, tmp_path / "images").classes == ["cell", "granule", "mitochondrion"]
    Image.open(tmp_path / "images" / "slice_000.png").convert("P").save(tmp_path / "images" / "slice_000.png")
    with pytest.raises(UserError, match="colour-table indices"):
        read_grey(tmp_path / "images" / "slice_000.png")


def test_train_refuses_class_names_run_cannot_write_other_classes_on_resume_and_a_val_set_of_none(tmp_path):
    """Found before training starts, in one line: a class name no label layer can have; --resume of a model trained
    on other classes (its heads would keep their order under other names); a --val file none of whose categories
    is a training class."""
    ann = _makesense_like(tmp_path)
    base = ["train", "--train", ann, "--images", tmp_path / "images", "--config", REPO / "configs" / "demo_cpu.yaml",
            "--max-iter", 1]  # fmt: skip
    data = json.loads(ann.read_text())
    renamed = tmp_path / "renamed.json"
    renamed.write_text(json.dumps(dict(data, categories=[dict(c, name=c["name"].title()) for c in data["categories"]])))
    slash = tmp_path / "slash.json"  # two names that become one class's name (a label layer's: no '/', no ' ')
    clash = [dict(c, name=["cell/x", "cell x", "mitochondrion"][i]) for i, c in enumerate(data["categories"])]
    slash.write_text(json.dumps(dict(data, categories=clash)))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "cellseg.json").write_text(json.dumps({"classes": ["granule", "cell", "mitochondrion"]}))
    for args, match in (
        (["--train", slash, "--out", tmp_path / "a"], "categories 'cell/x' and 'cell x' would both be class 'cell_x'"),
        (["--out", tmp_path / "m", "--resume"], "was trained on classes granule, cell, mitochondrion"),
        (["--val", renamed, "--out", tmp_path / "b"], "training classes (cell, granule, mitochondrion; its categories: Mitochondrion, Cell, Granule"),
    ):
        proc = cli(*base, *args, check=False)
        assert proc.returncode == 2 and match in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("content,match", [
    ("{not json", "not valid JSON"), ('{"images": []}', "no 'annotations' list"),
    ('{"images": [], "annotations": [], "categories": []}', "defines no categories"),
    ('{"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], "categories": [{"id": 1}]}', "id and a name"),
    ('{"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], "categories": [{"id": 1, "name": "c"}]}',
     "none of its 1 images"),
])  # fmt: skip
def test_broken_coco_files_give_one_line_errors(tmp_path, content, match):
    (tmp_path / "images").mkdir()
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(UserError, match=match):
        load_coco(tmp_path / "bad.json", tmp_path / "images")
    proc = cli("train", "--train", tmp_path / "bad.json", "--images", tmp_path / "images", "--config", CONFIG,
               "--out", tmp_path / "m", check=False)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and match.split()[0] in proc.stderr


def test_unreachable_weights_url_fails_fast_with_advice(tmp_path):
    ann = _makesense_like(tmp_path)
    proc = cli("train", "--train", ann, "--images", tmp_path / "images", "--config", CONFIG, "--out", tmp_path / "m",
               "--weights", "http://127.0.0.1:9/model_final.pkl", check=False, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "download it on a machine that can reach it and pass --weights PATH" in proc.stderr


def test_two_gloo_processes_train_in_step_and_resume_continues(tmp_path):
    ann = _makesense_like(tmp_path)
    out = tmp_path / "model"
    common = ["train", "--train", ann, "--images", tmp_path / "images", "--config", CONFIG, "--out", out,
              "--cpu-procs", 2, "--batch-size", 2]  # fmt: skip
    # --resume with nothing to resume yet (a job script that always passes it) starts afresh, saying so
    first = cli(*common, "--max-iter", 4, "SOLVER.CHECKPOINT_PERIOD", 100, "--resume")
    assert "holds no checkpoint yet" in first.stderr and "training starts at iteration 0" in first.stderr
    work = out / "train"
    logs = [work / "log.txt", work / "log.txt.rank1"]
    for log in logs:  # both ranks ran the same iterations of one DDP job
        assert "Starting training from iteration 0" in log.read_text()
    assert (work / "metrics.json").exists()
    assert sorted(p.name for p in work.glob("model_*.pth")) == ["model_final.pth"]  # one checkpoint
    assert json.loads((out / "cellseg.json").read_text())["training"]["iterations"] == 4
    assert "holds no checkpoint yet" not in cli(*common, "--max-iter", 6, "--resume").stderr
    for log in logs:
        assert "Starting training from iteration 4" in log.read_text()
    model = ModelDir.load(out)
    assert model.training["last_iter"] == 6 and model.classes == ["cell", "granule", "mitochondrion"]


def test_sigterm_stops_training_with_a_checkpoint_that_resume_continues(tmp_path):
    """A pod's end or scancel (SIGTERM, then SIGKILL after a grace period), or SLURM's time-limit warning (SIGUSR1,
    tests/test_cluster.py): the launching process passes it to both training processes, which stop at the same
    iteration with a checkpoint and a model directory, and it exits 130 saying how to go on. It killed them, losing
    every iteration since the last periodic checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    ann = _makesense_like(tmp_path)
    out = tmp_path / "model"
    common = ["train", "--train", ann, "--images", tmp_path / "images", "--config", CONFIG, "--out", out,
              "--cpu-procs", 2, "--batch-size", 2, "SOLVER.CHECKPOINT_PERIOD", 100000]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "cellseg_batch", *map(str, common), "--max-iter", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ})  # fmt: skip
    try:
        metrics, t = out / "train" / "metrics.json", time.monotonic()
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):  # detectron2 logs every 20 iterations
            assert proc.poll() is None and time.monotonic() - t < 240, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    model = ModelDir.load(out)
    stopped = model.training["last_iter"]
    assert model.training["stopped_by_signal"] == "SIGTERM" and stopped > 20 and (stopped - 1) % 5 == 0  # checked every 5
    assert f"SIGTERM: training stopped at iteration {stopped}, its checkpoint saved; run the same command with " \
           "--resume to continue" in stderr and "Traceback" not in stderr  # fmt: skip
    cli(*common, "--max-iter", stopped + 2, "--resume")
    for log in (out / "train" / "log.txt", out / "train" / "log.txt.rank1"):  # both ranks went on from there
        assert f"Starting training from iteration {stopped}" in log.read_text()
    model = ModelDir.load(out)
    assert model.training["last_iter"] == stopped + 2 and model.training["stopped_by_signal"] is None
    # through the API, as the demo trains: the caller's SIGTERM handler is back afterwards (the demo's run must stop)
    from cellseg_batch.train import TrainConfig, train

    before = signal.getsignal(signal.SIGTERM)
    train(TrainConfig(train=str(ann), images=str(tmp_path / "images"), config=str(CONFIG), out=str(tmp_path / "api"),
                      max_iter=1, batch_size=2))  # fmt: skip
    assert signal.getsignal(signal.SIGTERM) is before


def test_labels_to_coco_train_run_eval_round_trip(tmp_path):
    cli("synth", tmp_path / "s", "--shape", "6,256,256", "--seed", 9)
    cli("convert", "labels-to-coco", tmp_path / "s" / "truth.zarr", tmp_path / "s" / "volume.tif", "--out",
        tmp_path / "coco", "--tile", 128, "--val-fraction", 0.34)  # fmt: skip
    train = json.loads((tmp_path / "coco" / "train.json").read_text())
    # every annotation's RLE decodes to exactly its instance's pixels in the tile
    import zarr

    truth = zarr.open_array(str(tmp_path / "s" / "truth.zarr" / "labels" / "cell" / "0"))[:]
    a = next(a for a in train["annotations"] if a["category_id"] == 1)
    img = next(i for i in train["images"] if i["id"] == a["image_id"])
    z, y, x = (int(v) for v in re.match(r"z(\d+)_y(\d+)_x(\d+)", img["file_name"]).groups())
    tile = truth[z, y : y + 128, x : x + 128]
    decoded = mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
    ids = np.unique(tile[decoded > 0])
    assert len(ids) == 1 and ((tile == ids[0]) == (decoded > 0)).all()
    out = tmp_path / "model"
    cli("train", "--train", tmp_path / "coco" / "train.json", "--images", tmp_path / "coco" / "images",
        "--val", tmp_path / "coco" / "val.json", "--config", CONFIG, "--out", out, "--max-iter", 10,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)  # ten iterations: keep every detection, so evaluation has some  # fmt: skip
    model = ModelDir.load(out)
    assert model.tile == 128 and model.classes == ["cell", "mitochondrion", "alpha_granule", "canalicular_vessel"]
    assert model.training["validation"] is not None and "segm/AP" in model.training["validation"]
    cli("run", tmp_path / "s" / "volume.tif", "--model", out, "--out", tmp_path / "seg.zarr", "--score-threshold",
        0.05, "--no-progress")  # fmt: skip
    cli("eval", tmp_path / "seg.zarr", tmp_path / "s" / "truth.zarr", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result["classes"]) == set(model.classes) and result["n_slices"] == 6
    # and back: the run's output as COCO polygons for correction in an annotation tool
    cli("convert", "output-to-coco", tmp_path / "seg.zarr", "--out", tmp_path / "fix", "--tile", 0)
    fix = json.loads((tmp_path / "fix" / "train.json").read_text())
    assert len(fix["images"]) == 6 and all(isinstance(a["segmentation"], list) for a in fix["annotations"])


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name != "base_em.yaml"))
def test_every_config_builds_a_mask_rcnn(config):
    """The shipped configs parse and build (weights are not loaded: no network here)."""
    from cellseg_batch.d2compat import detectron2_ready

    detectron2_ready()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    cfg = get_cfg()
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    assert cfg.INPUT.MIN_SIZE_TEST == 0 and cfg.MODEL.MASK_ON
    assert sum(p.numel() for p in model.parameters()) > 1e6


def test_exclusive_classes_found_in_the_annotations():
    """Classes seen together and never one inside the other exclude one another; nesting or no evidence: not."""
    from cellseg_batch.coco import CocoSet

    def box(y0, x0, y1, x1, cls):
        m = np.zeros((64, 64), np.uint8, order="F")
        m[y0:y1, x0:x1] = 1
        return {"segmentation": mask_util.encode(m), "category_id": cls, "iscrowd": 0}

    classes = ["cell", "mito", "granule", "vessel", "nucleus"]
    records = [
        # a cell holding a mitochondrion, a granule and a nucleus; the nucleus holds a granule once
        {"height": 64, "width": 64, "annotations": [box(0, 0, 60, 60, 0), box(5, 5, 15, 15, 1), box(20, 20, 25, 25, 2),
                                                     box(30, 30, 50, 50, 4), box(35, 35, 40, 40, 2)]},
        # mitochondria and granules side by side, touching by a pixel column
        {"height": 64, "width": 64, "annotations": [box(0, 0, 10, 10, 1), box(0, 9, 10, 20, 2)]},
        {"height": 64, "width": 64, "annotations": [box(0, 0, 10, 10, 3)]},  # vessels: never seen with the others
    ]
    s = CocoSet(Path("x.json"), classes, records)
    assert s.exclusive_classes() == [["mito", "granule"]]


def test_exclusive_option_names_the_run_classes():
    from cellseg_batch.predict.base import exclusive_groups, exclusive_layers

    classes, found = ["cell", "mito", "granule"], [["mito", "granule"]]
    assert exclusive_groups(None, classes, "m", found) == [["mito", "granule"]]
    assert exclusive_groups(["none"], classes, "m", found) == []
    assert exclusive_groups(["cell,mito"], classes, "m", found) == [["cell", "mito"]]
    with pytest.raises(UserError, match="--exclusive: vessel is not a class of m"):
        exclusive_groups(["mito,vessel"], classes, "m")
    assert exclusive_layers(classes, found) == (0, 1, 1)
    # a group of one (a typo of a pair), and a class in two groups (their layers disagreed: a class in two layers'
    # exclusions) were taken without a word; "none" beside groups was said to be no class
    for option, said in ((["mito"], "a group needs two classes or more"), (["mito,mito"], "two classes or more"),
                         (["cell,mito", "mito,granule"], "mito is in two groups.*--exclusive cell,mito,granule"),
                         (["none", "cell,mito"], "--exclusive none stands alone")):  # fmt: skip
        with pytest.raises(UserError, match=said):
            exclusive_groups(option, classes, "m")


def test_amp_training_forward_runs_in_bfloat16_and_returns_float32_losses():
    """``train --amp`` on a CPU: the training forward pass runs under bfloat16 autocast (the backbone's convolutions
    give bfloat16), the losses come back as float32 and backpropagate into float32 weights; eval mode is untouched."""
    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.train import autocast_training_forward

    detectron2_ready()
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.structures import BitMasks, Boxes, Instances
    from detectron2.utils.events import EventStorage

    cfg = get_cfg()
    cfg.merge_from_file(str(CONFIG))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    autocast_training_forward(model, torch.bfloat16)
    seen = []
    model.backbone.bottom_up.stem.conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 10:40, 12:44] = True
    target = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[12.0, 10.0, 44.0, 40.0]])),
                       gt_classes=torch.tensor([1]), gt_masks=BitMasks(mask))  # fmt: skip
    batch = [{"image": torch.rand(3, 64, 64) * 255, "instances": target, "height": 64, "width": 64}]
    model.train()
    with EventStorage():
        losses = model(batch)
    assert seen == [torch.bfloat16] and all(v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.backbone.bottom_up.stem.conv1.weight.grad is not None
    model.eval()
    with torch.no_grad():
        model([{"image": torch.rand(3, 64, 64) * 255, "height": 64, "width": 64}])
    assert seen[-1] == torch.float32


def _mixed_pixel_types(root: Path) -> Path:
    """The makesense-like set with half of its images saved as 16-bit PNGs (intensities x 257): 8- and 16-bit tiles
    of one training set, as collected from two microscopes."""
    ann = _makesense_like(root)
    for path in sorted((root / "images").glob("*.png"))[::2]:
        Image.fromarray(read_grey(path).astype(np.uint16) * 257).save(path)
    return ann


def test_training_images_of_8_and_16_bits_each_reach_the_model_on_the_full_scale(tmp_path):
    """Each pixel type gets its own intensity range (as `run` gives each volume its own): one range for both put
    the 8-bit images' 60-200 at 0-1 of 255 (nearly black). The model directory records the range of each type."""
    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.train import EMDatasetMapper, training_normalization

    detectron2_ready()
    ann = _mixed_pixel_types(tmp_path)
    records = load_coco(ann, tmp_path / "images").records
    assert sorted({read_grey(r["file_name"]).dtype.name for r in records}) == ["uint16", "uint8"]
    mapper = EMDatasetMapper(False, training_normalization(records, (1.0, 99.5)))
    for r in records:
        image = mapper(r)["image"].numpy()[0]
        background = image[read_grey(r["file_name"]) == read_grey(r["file_name"]).max()]
        assert background.min() == 255 and np.percentile(image, 1) == 0, (r["file_name"], image.max())
    out = tmp_path / "model"
    cli("train", "--train", ann, "--images", tmp_path / "images", "--config", CONFIG, "--out", out, "--max-iter", 1)
    intensities = ModelDir.load(out).normalization["training_intensities"]
    assert intensities["uint8"] == [60.0, 200.0] and intensities["uint16"] == [60.0 * 257, 200.0 * 257]


def _refuse_in_rank_1(message: str) -> None:
    """A training process's main function that finds a user's mistake in rank 1 only (in a spawned process)."""
    from detectron2.utils import comm

    if comm.get_rank() == 1:
        raise UserError(message)
    comm.synchronize()  # rank 0 waits for rank 1, as a training step would


def test_a_mistake_found_in_a_spawned_training_process_is_one_line_in_the_launching_one(tmp_path):
    """Found inside a --cpu-procs 2 process (torch's spawn): the launching process raises it as the same one-line
    UserError, not torch's report of the failed process with its traceback."""
    from cellseg_batch.train import TrainConfig, launch

    tc = TrainConfig(train="", images="", out=str(tmp_path), config="", cpu_procs=2)
    with pytest.raises(UserError) as raised:
        launch(_refuse_in_rank_1, ("image x.png changed while training; train again",), tc)
    assert str(raised.value) == "image x.png changed while training; train again"


def test_training_images_without_contrast_are_refused_before_the_training_processes_start(tmp_path):
    ann = _makesense_like(tmp_path, n_images=2)
    for path in (tmp_path / "images").glob("*.png"):
        Image.fromarray(np.full((128, 128), 7, np.uint8)).save(path)
    proc = cli("train", "--train", ann, "--images", tmp_path / "images", "--config", CONFIG, "--out", tmp_path / "m",
               "--cpu-procs", 2, "--batch-size", 2, "--max-iter", 1, check=False)  # fmt: skip
    assert proc.returncode == 2 and "the uint8 training images have no contrast (every sampled pixel is 7" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m").exists()


# -- annotated slices larger than the model's tile: random crops for training, windows for validation ---------------


def _large_record(h=300, w=260, n=25, seed=0) -> tuple[dict, list[np.ndarray]]:
    """A record of one large image's RLE annotations (discs, many across any window border), and their masks."""
    rng = np.random.default_rng(seed)
    anns, masks = [], []
    yy, xx = np.ogrid[:h, :w]
    for k in range(n):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 40)
        m = np.asfortranarray(((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).astype(np.uint8))
        if m.any():
            masks.append(m)
            anns.append({"bbox": [0, 0, 1, 1], "bbox_mode": 1, "segmentation": mask_util.encode(m),
                         "category_id": k % 3, "iscrowd": 0})  # fmt: skip
    return {"file_name": "slice.png", "height": h, "width": w, "image_id": 5, "annotations": anns}, masks


def test_validation_windows_partition_a_large_image_and_cut_every_mask_exactly():
    from cellseg_batch.coco import window_records

    record, masks = _large_record()
    small = {**record, "height": 100, "width": 100, "image_id": 9}
    windows = window_records([record, small], 128)
    assert [w["window"] for w in windows[:-1]] == [(y0, min(y0 + 128, 300), x0, min(x0 + 128, 260))
                                                    for y0 in (0, 128, 256) for x0 in (0, 128, 256)]  # fmt: skip
    assert "window" not in windows[-1] and windows[-1]["annotations"] is small["annotations"]
    assert [w["image_id"] for w in windows] == list(range(1, 11))  # each window an image of its own
    rebuilt = [np.zeros((300, 260), np.uint8) for _ in masks]
    for w in windows[:-1]:
        y0, y1, x0, x1 = w["window"]
        assert (w["height"], w["width"]) == (y1 - y0, x1 - x0)
        for a in w["annotations"]:
            part = mask_util.decode(a["segmentation"])
            k = next(i for i, m in enumerate(masks) if (m[y0:y1, x0:x1] == part).all() and part.any())
            x, y, bw, bh = a["bbox"]
            ys, xs = np.nonzero(part)
            assert (x, y, bw, bh) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            rebuilt[k][y0:y1, x0:x1] |= part
    assert all((r == m).all() for r, m in zip(rebuilt, masks))  # every pixel of every mask, in exactly its windows


def test_polygons_drawn_around_themselves_give_the_pixels_of_a_whole_image_drawing():
    """mask_cuts draws each polygon in a small frame (cheap in a 4096 px slice): random polygons, some across the
    image's edges, must give exactly the pixels pycocotools draws for them in the whole image."""
    from cellseg_batch.coco import mask_cuts

    rng = np.random.default_rng(2)
    h, w = 300, 260
    polygons = []
    for _ in range(400):
        cx, cy, n = rng.uniform(-20, w + 20), rng.uniform(-20, h + 20), rng.integers(3, 20)
        polygons.append([float(v) for a in np.sort(rng.uniform(0, 2 * np.pi, n))
                         for v in (cx + rng.uniform(0.3, 50) * np.cos(a), cy + rng.uniform(0.3, 50) * np.sin(a))])  # fmt: skip
    whole = [mask_util.decode(mask_util.merge(mask_util.frPyObjects([p], h, w))) > 0 for p in polygons]
    kept = [(p, m) for p, m in zip(polygons, whole) if m.any()]
    cuts = mask_cuts({"height": h, "width": w,
                      "annotations": [{"segmentation": [p], "category_id": 0} for p, _ in kept]})  # fmt: skip
    assert len(cuts) == len(kept) > 300
    for cut, (_, mask) in zip(cuts, kept):
        placed = np.zeros((h, w), bool)
        placed[cut.box.y0 : cut.box.y1, cut.box.x0 : cut.box.x1] = cut.mask
        assert (placed == mask).all()


def test_a_training_image_larger_than_the_crop_is_a_random_window_with_its_masks_cut_to_it(tmp_path):
    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.normalize import ByPixelType, Normalization
    from cellseg_batch.train import EMDatasetMapper

    detectron2_ready()
    record, masks = _large_record()
    image = (np.arange(300 * 260) % 251).reshape(300, 260).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "slice.png")
    record["file_name"] = str(tmp_path / "slice.png")
    mapper = EMDatasetMapper(True, ByPixelType({"uint8": Normalization(0.0, 255.0, (0.0, 255.0))}), crop=128)
    seen = set()
    for seed in range(6):
        np.random.seed(seed)
        window, parts = mapper.window(record)
        seen.add(window)
        assert window.shape == (128, 128) and 0 <= window.y0 <= 172 and 0 <= window.x0 <= 132
        inside = [m[window.y0 : window.y1, window.x0 : window.x1] for m in masks]
        assert sorted(int(p.mask.sum()) for p in parts) == sorted(int(m.sum()) for m in inside if m.any())
        np.random.seed(seed)
        sample = mapper(record)  # the same window: the crop is drawn first
        assert tuple(sample["image"].shape) == (3, 128, 128) and (sample["height"], sample["width"]) == (128, 128)
        areas = sorted(int(a) for a in sample["instances"].gt_masks.tensor.sum(dim=(1, 2)))
        assert areas == sorted(int(m.sum()) for m in inside if m.any())  # flips and transposes keep areas
    assert len(seen) > 1
    whole = EMDatasetMapper(True, mapper.normalization, crop=0)(record)  # --crop 0: the whole image, as before
    assert sorted(whole["image"].shape[1:]) == [260, 300] and len(whole["instances"]) == len(masks)  # maybe transposed


@pytest.mark.parametrize("crop", [128, 280])  # 280: a window of 280 x 260, not square, transposed in some samples
def test_a_training_windows_instances_are_detectron2s_own_for_the_same_masks(crop):
    """instances_of_parts (all masks transformed together, no RLE) gives what detectron2's
    transform_instance_annotations and annotations_to_instances make of the same window's masks as RLE annotations:
    the same boxes, classes and masks, for each of the flips and transposes the samples draw."""
    from cellseg_batch.coco import mask_cuts, window_annotations
    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.normalize import ByPixelType, Normalization
    from cellseg_batch.train import EMDatasetMapper, instances_of_parts

    detectron2_ready()
    import torch
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    record, _ = _large_record(n=40, seed=3)
    mapper = EMDatasetMapper(True, ByPixelType({"uint8": Normalization(0.0, 255.0, (0.0, 255.0))}), crop=crop)
    cuts, drawn = mask_cuts(record), set()
    for seed in range(12):
        np.random.seed(seed)
        window, parts = mapper.window(record)
        aug = T.AugInput(np.zeros((*window.shape, 3), np.float32))
        transforms = mapper.augmentations(aug)
        drawn.add(tuple(type(t).__name__ for t in transforms if type(t).__name__ != "NoOpTransform"))
        shape = aug.image.shape[:2]
        mine = instances_of_parts(parts, window.shape, transforms, shape)
        annos = [utils.transform_instance_annotations(dict(a), transforms, shape)
                 for a in window_annotations(cuts, window)]  # fmt: skip
        theirs = utils.filter_empty_instances(utils.annotations_to_instances(annos, shape, mask_format="bitmask"))
        assert len(mine) == len(theirs) > 0 and mine.image_size == theirs.image_size
        assert torch.equal(mine.gt_boxes.tensor, theirs.gt_boxes.tensor)
        assert torch.equal(mine.gt_classes, theirs.gt_classes)
        assert torch.equal(mine.gt_masks.tensor, theirs.gt_masks.tensor)
    assert any("TransposeTransform" in d for d in drawn) and any("HFlipTransform" in d for d in drawn)


def test_training_on_whole_annotated_slices_crops_them_and_the_model_runs_at_the_crop(tmp_path):
    cli("synth", tmp_path / "s", "--shape", "4,256,256", "--seed", 9)
    cli("convert", "labels-to-coco", tmp_path / "s" / "truth.zarr", tmp_path / "s" / "volume.tif", "--out",
        tmp_path / "coco", "--tile", 0, "--val-fraction", 0.25)  # whole 256 px slices, as an annotation tool has them
    # beside them two small crops of the first slice, of two other sizes, an object annotated in each: the model's
    # tile is the crop still (the median of the distinct sizes made it 100)
    coco = json.loads((tmp_path / "coco" / "train.json").read_text())
    first, images = coco["images"][0], tmp_path / "coco" / "images"
    pixels = np.asarray(Image.open(images / first["file_name"]))
    for k, side in enumerate((64, 100)):
        name = f"small_{side}.png"
        Image.fromarray(pixels[:side, :side]).save(images / name)
        coco["images"].append({"id": 1000 + k, "file_name": name, "height": side, "width": side})
        # one object each (a synthetic cell cut to the window), so that each is a training image of its own
        coco["annotations"].append({"id": 10**6 + k, "image_id": 1000 + k, "category_id": coco["categories"][0]["id"],
                                    "bbox": [8, 8, 20, 20], "area": 400, "iscrowd": 0,
                                    "segmentation": [[8, 8, 28, 8, 28, 28, 8, 28]]})  # fmt: skip
    (tmp_path / "coco" / "train.json").write_text(json.dumps(coco))
    out = tmp_path / "model"
    done = cli("train", "--train", tmp_path / "coco" / "train.json", "--images", images,
               "--val", tmp_path / "coco" / "val.json", "--config", CONFIG, "--out", out, "--max-iter", 2, "--crop",
               128, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0)  # fmt: skip
    model = ModelDir.load(out)
    assert model.tile == 128 and model.training["crop"] == 128 and model.overlap == 16
    assert "run's tile 128 px, overlap 16" in done.stdout.splitlines()[-1]
    assert "\x1b[" not in done.stdout + done.stderr  # detectron2's colours, in a log that is no terminal
    # its long records (environment, config file, full config, model: ~600 lines) are one line each on the console,
    # whole in log.txt
    log = (out / "train" / "log.txt").read_text()
    assert "Running with full config (" in done.stdout and f"lines: in {out / 'train' / 'log.txt'})" in done.stdout
    for line in ("CUDNN_BENCHMARK: false", "GeneralizedRCNN(", "sys.platform"):  # the full config, model, environment
        assert line not in done.stdout and line in log
    assert model.training["validation"] is not None and "segm/AP" in model.training["validation"]
    evaluated = json.loads(next((out / "train" / "eval").glob("*_coco_format.json")).read_text())
    assert [(i["height"], i["width"]) for i in evaluated["images"]] == [(128, 128)] * 4  # the slice's 4 windows
