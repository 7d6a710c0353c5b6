"""The pipeline's ceiling with the `labels` predictor (no model: reading, stitching, linking, writing), and the
driver's peak memory at two volume sizes 8x apart.

    python benchmarks/bench_labels.py [--shape 16,4096,4096]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import label_stacks, machine, run_measured, save  # noqa: E402


def ceiling(shape, tmp: Path, write_image: bool) -> dict:
    d = label_stacks(shape)
    out = tmp / f"ceiling_{write_image}.zarr"
    args = ["run", d["volume"], "--predictor", "labels", "--labels", d["cells"], "--classes", "cell",
            "--labels", d["organelles"], "--classes", d["classes"], "--tile", 1024, "--overlap", 32,
            "--out", out, "--no-progress"] + ([] if write_image else ["--no-image"])  # fmt: skip
    m = run_measured(args)
    r = json.loads((out / "cellseg" / "report.json").read_text())
    voxels = int(np.prod(shape))
    return {"shape": shape, "image_copy": write_image, "wall_s": m["wall_s"],
            "mvoxel_per_s_end_to_end": voxels / 1e6 / m["wall_s"], "time_s": r["time_s"],
            "stage_mvoxel_per_s": {k: voxels / 1e6 / v for k, v in r["time_s"].items() if v > 0.05},
            "objects": r["counts"]["objects"], "driver_peak_rss_mb": m["driver_peak_rss_mb"],
            "worker_peak_rss_mb": m["worker_peak_rss_mb"]}  # fmt: skip


def driver_memory(shape, tmp: Path) -> dict:
    uri = "synth:{}x{}x{},seed=3".format(*shape)
    m = run_measured(["run", uri, "--predictor", "labels", "--labels", uri, "--no-image", "--tile", 1024,
                      "--overlap", 32, "--out", tmp / f"mem_{shape[0]}.zarr", "--no-progress"])  # fmt: skip
    r = json.loads((tmp / f"mem_{shape[0]}.zarr" / "cellseg" / "report.json").read_text())
    return {"shape": shape, "mvoxel": int(np.prod(shape)) / 1e6, "fragments": r["counts"]["fragments"],
            "objects": r["counts"]["objects"], **m}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="16,4096,4096", help="volume for the ceiling (Z,Y,X)")
    p.add_argument("--memory-shapes", default="2,4096,4096;16,4096,4096", help="two shapes 8x apart")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    rows = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        rows["ceiling"] = ceiling(shape, Path(tmp), write_image=True)
        rows["ceiling_no_image"] = ceiling(shape, Path(tmp), write_image=False)
        rows["driver_memory"] = [driver_memory(tuple(int(v) for v in s.split(",")), Path(tmp))
                                 for s in args.memory_shapes.split(";")]  # fmt: skip
    print(json.dumps(rows, indent=2))
    print(f"saved {save('labels_ceiling_and_memory', rows)}")


if __name__ == "__main__":
    main()
