"""`run` with the detectron2 predictor against a plain loop of detectron2's DefaultPredictor over the same tiles,
with the same weights, normalization and tile grid, side by side in one process tree on this machine.

    python benchmarks/bench_detectron2.py [--model demo/model] [--shape 8,1024,1024]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_measured, save  # noqa: E402


def default_predictor_loop(volume_path: str, model_dir: str) -> dict:
    """The baseline a user would write: DefaultPredictor, one tile at a time, read then predict."""
    import torch

    from cellseg_batch.d2compat import detectron2_ready
    from cellseg_batch.model_dir import ModelDir
    from cellseg_batch.normalize import estimate
    from cellseg_batch.predict.detectron2_predictor import load_config
    from cellseg_batch.read import open_volume
    from cellseg_batch.tiles import TileGrid

    detectron2_ready()
    from detectron2.engine import DefaultPredictor

    model = ModelDir.load(model_dir)
    volume = open_volume(volume_path)
    norm = estimate(volume, (model.normalization["low"], model.normalization["high"]))
    predictor = DefaultPredictor(load_config(model, "cpu"))
    grid = TileGrid(volume.shape[1], volume.shape[2], model.tile, model.overlap)
    n, detections = 0, 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for z in range(volume.shape[0]):
            for iy, ix in grid.positions():
                image = norm.apply(volume.read(z, *grid.window(iy, ix)))
                out = predictor(np.repeat(image[:, :, None], 3, axis=2))
                detections += len(out["instances"])
                n += 1
    elapsed = time.perf_counter() - t0
    voxels = int(np.prod(volume.shape))
    return {"tiles": n, "seconds": elapsed, "tiles_per_s": n / elapsed, "mvoxel_per_s": voxels / 1e6 / elapsed,
            "detections": detections, "torch_threads": torch.get_num_threads()}  # fmt: skip


def cellseg_run(volume_path: str, model_dir: str, batch_size: int, out: Path) -> dict:
    m = run_measured(["run", volume_path, "--model", model_dir, "--out", out, "--batch-size", batch_size,
                      "--no-image", "--no-progress", "--overwrite"])  # fmt: skip
    r = json.loads((out / "cellseg" / "report.json").read_text())
    voxels = int(np.prod(r["input"]["shape"]))
    t = r["time_s"]
    return {"batch_size": batch_size, "tiles": r["counts"]["tiles"], "time_s": t,
            "predict_tiles_per_s": r["counts"]["tiles"] / t["predict"],
            "predict_steady_tiles_per_s": r["throughput"]["tiles_per_s_steady"],
            "predict_mvoxel_per_s": voxels / 1e6 / t["predict"],
            "end_to_end_s": m["wall_s"], "end_to_end_tiles_per_s": r["counts"]["tiles"] / m["wall_s"],
            "end_to_end_mvoxel_per_s": voxels / 1e6 / m["wall_s"], "objects": r["counts"]["objects"],
            "driver_peak_rss_mb": m["driver_peak_rss_mb"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="demo/model", help="a model directory (make demo writes demo/model)")
    p.add_argument("--shape", default="8,1024,1024")
    args = p.parse_args()
    if not (Path(args.model) / "cellseg.json").exists():
        sys.exit(f"{args.model} is not a model directory; run `make demo` first or pass --model")
    from cellseg_batch.synth import write_synthetic

    shape = tuple(int(v) for v in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        data = write_synthetic(Path(tmp) / "vol", shape, seed=4)
        volume = str(data["volume"])
        rows = {"machine": machine(), "shape": shape, "model": args.model}
        # interleaved, so that drift in the machine's load shows up as a difference between repeats
        rows["baseline_1"] = default_predictor_loop(volume, args.model)
        rows["run_batch4"] = cellseg_run(volume, args.model, 4, Path(tmp) / "b4.zarr")
        rows["run_batch1"] = cellseg_run(volume, args.model, 1, Path(tmp) / "b1.zarr")
        rows["baseline_2"] = default_predictor_loop(volume, args.model)
    base = np.mean([rows["baseline_1"]["tiles_per_s"], rows["baseline_2"]["tiles_per_s"]])
    for k in ("run_batch4", "run_batch1"):
        rows[k]["predict_ratio_vs_baseline"] = rows[k]["predict_tiles_per_s"] / base
        rows[k]["end_to_end_ratio_vs_baseline"] = rows[k]["end_to_end_tiles_per_s"] / base
    print(json.dumps(rows, indent=2))
    print(f"saved {save('detectron2_vs_defaultpredictor', rows)}")


if __name__ == "__main__":
    main()
