"""`run` against a plain sliding-window loop of detectron2's DefaultPredictor, by volume per second, same weights,
same torch threads, side by side in one script; and mask AP50 of both on the same windows against the truth.

    python benchmarks/bench_detectron2.py [--model demo/model] [--shape 16,2048,2048] [--device cuda]
                                          [--batch-sizes 4,16] [--results DIR]

The loop is what a user would write: windows of the model's tile size at a step of tile - overlap (the last one
shifted back to end at the slice's edge), read, normalized, ``DefaultPredictor(image)``. It runs in a process of its
own, and its time counts from that process's start (importing torch and detectron2, loading the model, sampling the
normalization) to its last window, as `run`'s wall time counts its process from start to exit (imports, Ray, the
actors, and everything after prediction: stitch, link, write). The accuracy check scores, on every loop window, the loop's detections and `run`'s
output cut to the same window against the truth cut to it (COCO mask AP50, windows as images). Beside them, untimed,
`run`'s own predictor on the loop's windows, painted as the loop's detections are: the model's output before and
after this tool's changes (batching, channels-last, the one-channel stem, bfloat16), without the stitching.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_measured, save  # noqa: E402


def sliding_windows(size: int, tile: int, step: int) -> list[int]:
    """Window starts of a plain sliding window: 0, step, ... and the last one ending at the edge."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, step))
    return starts + [size - tile]


class WindowAP:
    """Mask AP50 per class over windows (each window one COCO image), for one method."""

    def __init__(self, classes: list[str], scores: dict[str, dict[int, float]] | None = None):
        from cellseg_batch.evaluate import _MaskAP

        self.ap = {c: _MaskAP(scores.get(c, {}) if scores is not None else {}) for c in classes}
        self.image = 0

    def add(self, pred: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> None:
        for c, ap in self.ap.items():
            ap.add(self.image, pred[c], truth[c])
        self.image += 1

    def result(self) -> dict:
        per = {c: ap.result()["ap50"] for c, ap in self.ap.items()}
        valid = [v for v in per.values() if v is not None]
        return {"mask_ap50_mean": float(np.mean(valid)) if valid else None, "mask_ap50": per}


def default_predictor_loop(volume_path: str, truth_path: str | None, model_dir: str, device: str = "cpu") -> dict:
    """The baseline, in a fresh process (``loop_process``): its fixed time counts from the process's start. Scoring
    (when ``truth_path``) is done outside the timed part."""
    import psutil
    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.model_dir import ModelDir
    from cellseg_batch.normalize import estimate
    from cellseg_batch.predict.base import paint_instances
    from cellseg_batch.predict.detectron2_predictor import load_config
    from cellseg_batch.read import open_volume

    detectron2_ready()
    import detectron2.modeling.meta_arch.rcnn as rcnn
    from detectron2.engine import DefaultPredictor

    model = ModelDir.load(model_dir)
    volume = open_volume(volume_path)
    norm = estimate(volume, (model.normalization["low"], model.normalization["high"]))
    predictor = DefaultPredictor(load_config(model, device))
    steps = {"read": 0.0, "normalize": 0.0, "forward": 0.0, "paste": 0.0}
    paste = rcnn.detector_postprocess

    def timed_paste(*a, **k):  # detectron2's mask pasting, inside the predictor call
        t = time.perf_counter()
        try:
            return paste(*a, **k)
        finally:
            steps["paste"] += time.perf_counter() - t

    rcnn.detector_postprocess = timed_paste
    fixed = time.time() - psutil.Process().create_time()  # from this process's start: torch's import included
    classes = list(model.classes)
    scores: dict[str, dict[int, float]] = {c: {} for c in classes}  # filled before each window is scored
    scorer = WindowAP(classes, scores) if truth_path else None
    truth = _Truth(truth_path, classes) if truth_path else None
    nz, ny, nx = volume.shape
    ys, xs = sliding_windows(ny, model.tile, model.tile - model.overlap), sliding_windows(nx, model.tile, model.tile - model.overlap)
    n, detections, next_id = 0, 0, 1
    timed = 0.0
    with torch.inference_mode():
        for z in range(nz):
            for y0 in ys:
                for x0 in xs:
                    box = (y0, min(y0 + model.tile, ny), x0, min(x0 + model.tile, nx))
                    t0 = time.perf_counter()
                    raw = volume.read(z, *box)
                    t1 = time.perf_counter()
                    image = norm.apply(raw)
                    t2 = time.perf_counter()
                    out = predictor(np.repeat(image[:, :, None], 3, axis=2))["instances"].to("cpu")
                    t3 = time.perf_counter()
                    steps["read"] += t1 - t0
                    steps["normalize"] += t2 - t1
                    steps["forward"] += t3 - t2
                    timed += t3 - t0
                    detections += len(out)
                    n += 1
                    if scorer is not None:
                        scorer.add(_loop_window(out, classes, next_id, scores, paint_instances), truth.window(z, box))
                        next_id += len(out)
    steps["forward"] -= steps["paste"]
    seconds = fixed + timed
    voxels = int(np.prod(volume.shape))
    row = {"tiles": n, "seconds": seconds, "fixed_s": fixed, "tiles_per_s": n / timed,
           "mvoxel_per_s": voxels / 1e6 / seconds, "detections": detections, "torch_threads": torch.get_num_threads(),
           "ms_per_tile": {k: 1000 * v / n for k, v in steps.items()}}  # fmt: skip
    if scorer is not None:
        row["accuracy"] = scorer.result()
    return row


def predictor_on_loop_windows(volume_path: str, truth_path: str, model_dir: str, device: str = "cpu",
                              batch: int = 4) -> dict:
    """Accuracy only (untimed): this package's predictor (batched, channels-last, one-channel stem) on the loop's own
    windows, painted as the loop's detections are (a layer per class, no sliver rule), scored the same way. Beside
    the loop's score it isolates what the faster model path changes from what stitching changes."""
    from cellseg_batch.model_dir import ModelDir
    from cellseg_batch.normalize import estimate
    from cellseg_batch.predict.detectron2_predictor import Detectron2Predictor
    from cellseg_batch.read import open_volume
    from cellseg_batch.tiles import Box

    model = ModelDir.load(model_dir)
    classes = list(model.classes)
    predictor = Detectron2Predictor(model_dir, device=device, min_visible=0.0)
    predictor.set_threads(os.cpu_count() or 1)
    volume = open_volume(volume_path)
    norm = estimate(volume, (model.normalization["low"], model.normalization["high"]))
    scores: dict[str, dict[int, float]] = {c: {} for c in classes}
    scorer, truth = WindowAP(classes, scores), _Truth(truth_path, classes)
    nz, ny, nx = volume.shape
    step = model.tile - model.overlap
    boxes = [(y0, min(y0 + model.tile, ny), x0, min(x0 + model.tile, nx))
             for y0 in sliding_windows(ny, model.tile, step) for x0 in sliding_windows(nx, model.tile, step)]
    next_id = 1
    for z in range(nz):
        for i in range(0, len(boxes), batch):
            group = boxes[i : i + batch]
            tiles = predictor.predict(z, [Box(*b) for b in group], [norm.apply(volume.read(z, *b)) for b in group])
            for box, tile in zip(group, tiles):
                ids = np.arange(next_id - 1, next_id + tile.count, dtype=np.int64)
                ids[0] = 0  # local id i -> a volume-wide id
                layers = {name: ids[tile.labels[c]] for c, name in enumerate(classes)}
                for local, (cls, score) in enumerate(zip(tile.classes, tile.scores), start=1):
                    scores[classes[int(cls)]][int(ids[local])] = float(score)
                scorer.add(layers, truth.window(z, box))
                next_id += tile.count
    return scorer.result()


def _loop_window(out, classes, first_id, scores, paint_instances):
    """The loop's detections of one window as label layers per class, with ids unique over the volume."""
    labels = paint_instances(out.pred_masks, out.pred_classes.numpy(), out.scores.numpy(), len(classes))
    ids = np.zeros(len(out) + 1, np.int64)
    ids[1:] = np.arange(first_id, first_id + len(out))  # local id i -> a volume-wide id
    layers = {}
    for c, name in enumerate(classes):
        layers[name] = ids[labels.labels[c]]
    for local, (cls, score) in enumerate(zip(labels.classes, labels.scores), start=1):
        scores[classes[int(cls)]][int(ids[local])] = float(score)
    return layers


class _Truth:
    """A label OME-Zarr (truth or a run's output) read a slice at a time, cut into windows."""

    def __init__(self, path: str, classes: list[str]):
        from cellseg_batch.write import Output

        self.out, self.classes, self.z, self.slice = Output(path), classes, None, {}

    def window(self, z: int, box) -> dict[str, np.ndarray]:
        if self.z != z:
            self.slice = {c: np.asarray(self.out.labels(c, 0)[z]) for c in self.classes}
            self.z = z
        y0, y1, x0, x1 = box
        return {c: a[y0:y1, x0:x1] for c, a in self.slice.items()}


def score_run(out: Path, truth_path: str, classes: list[str], shape, tile: int, overlap: int) -> dict:
    from cellseg_batch.evaluate import load_scores

    scorer = WindowAP(classes, load_scores(out / "cellseg" / "objects.parquet"))
    pred, truth = _Truth(str(out), classes), _Truth(truth_path, classes)
    ys, xs = sliding_windows(shape[1], tile, tile - overlap), sliding_windows(shape[2], tile, tile - overlap)
    for z in range(shape[0]):
        for y0 in ys:
            for x0 in xs:
                box = (y0, min(y0 + tile, shape[1]), x0, min(x0 + tile, shape[2]))
                scorer.add(pred.window(z, box), truth.window(z, box))
    return scorer.result()


def cellseg_run(volume_path: str, model_dir: str, out: Path, extra: list[str]) -> dict:
    m = run_measured(["run", volume_path, "--model", model_dir, "--out", out, "--no-image", "--no-progress",
                      "--overwrite", *extra])  # fmt: skip
    r = json.loads((out / "cellseg" / "report.json").read_text())
    voxels = int(np.prod(r["input"]["shape"]))
    t = r["time_s"]
    return {"options": extra, "tiles": r["counts"]["tiles"], "time_s": t,
            "predict_tiles_per_s": r["counts"]["tiles"] / t["predict"],
            "predict_steady_tiles_per_s": r["throughput"]["tiles_per_s_steady"],
            "ms_per_tile": r["throughput"]["actor_ms_per_tile"],
            "end_to_end_s": m["wall_s"], "mvoxel_per_s": voxels / 1e6 / m["wall_s"],
            "objects": r["counts"]["objects"], "driver_peak_rss_mb": m["driver_peak_rss_mb"]}  # fmt: skip


def loop_process(volume: str, truth: str | None, model: str, device: str) -> dict:
    """``default_predictor_loop`` in a process of its own (a user's script), its row back through a JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "loop.json"
        subprocess.run([sys.executable, __file__, "--loop", json.dumps([volume, truth, model, device]), "--loop-out",
                        str(out)], check=True)  # fmt: skip
        return json.loads(out.read_text())


def main() -> None:
    if "--loop" in sys.argv:  # the loop's own process (``loop_process``)
        p = argparse.ArgumentParser()
        p.add_argument("--loop", required=True)
        p.add_argument("--loop-out", required=True)
        args = p.parse_args()
        Path(args.loop_out).write_text(json.dumps(default_predictor_loop(*json.loads(args.loop))))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo/model", help="a model directory (make demo writes demo/model)")
    p.add_argument("--shape", default="16,2048,2048")
    p.add_argument("--name", default="detectron2_vs_defaultpredictor", help="results/NAME.json")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for a GPU machine")
    p.add_argument("--batch-sizes", default="4", help="run's --batch-size values, comma-separated")
    p.add_argument("--results", help="where NAME.json goes (default benchmarks/results)")
    args = p.parse_args()
    if not (Path(args.model) / "cellseg.json").exists():
        sys.exit(f"{args.model} is not a model directory; run `make demo` first or pass --model")
    from cellseg_batch.model_dir import ModelDir
    from cellseg_batch.synth import write_synthetic

    model = ModelDir.load(args.model)
    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "vol", shape, seed=4)
        volume, truth = str(data["volume"]), str(data["truth"])
        rows: dict = {"machine": machine(), "shape": shape, "model": args.model, "device": args.device}
        # interleaved, so that drift in the machine's load shows up as a difference between the two loops
        rows["loop_1"] = loop_process(volume, truth, args.model, args.device)
        runs = []
        variants = [(f"run_{precision}_b{batch}", ["--batch-size", batch, *extra])
                    for batch in args.batch_sizes.split(",") for precision, extra in (("fp32", []), ("amp", ["--amp"]))]
        first_batch = args.batch_sizes.split(",")[0]
        if args.device == "cpu":  # beside the default (an actor per core), one actor with every core's threads
            variants.append((f"run_fp32_b{first_batch}_one_actor",
                             ["--batch-size", first_batch, "--actors", "1", "--cpus-per-actor", str(os.cpu_count())]))
        for name, extra in variants:
            out = Path(tmp) / f"{name}.zarr"
            rows[name] = cellseg_run(volume, args.model, out, ["--device", args.device, *extra])
            rows[name]["accuracy"] = score_run(out, truth, list(model.classes), shape, model.tile, model.overlap)
            runs.append(name)
        rows["loop_2"] = loop_process(volume, None, args.model, args.device)
        rows["predictor_on_loop_windows"] = predictor_on_loop_windows(volume, truth, args.model, args.device)
    loop_s = np.mean([rows["loop_1"]["seconds"], rows["loop_2"]["seconds"]])
    for name in runs:
        r = rows[name]
        r["volume_per_s_vs_loop"] = loop_s / r["end_to_end_s"]
        r["ap50_minus_loop"] = r["accuracy"]["mask_ap50_mean"] - rows["loop_1"]["accuracy"]["mask_ap50_mean"]
    rows["predictor_on_loop_windows"]["ap50_minus_loop"] = (
        rows["predictor_on_loop_windows"]["mask_ap50_mean"] - rows["loop_1"]["accuracy"]["mask_ap50_mean"])
    print(json.dumps(rows, indent=2))
    if args.results:
        path = Path(args.results) / f"{args.name}.json"
        path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
    else:
        path = save(args.name, rows)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
