"""The pipeline's ceiling with the `labels` predictor (no model: reading, stitching, linking, writing) beside the
floor on the same input, and the driver's peak memory at two volume sizes 8x apart.

    python benchmarks/bench_labels.py [--shape 16,4096,4096] [--repeats 2]

Ceiling: `cellseg-batch run` end to end (process start to exit), with and without the image copy, and each stage's
MVoxel/s from its run report. Floor (`bench_floor.py`): the least work any tool must do for the same output layers
(read the label stacks, split the classes, write the same layers and image copy with the same dtype and codecs as
the run's output; no stitching, linking or pyramid) on 2 processes. The two alternate for ``--repeats`` rounds and
the best of each counts, so their ratio is measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cellseg_batch.config import RunConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_floor import ClassMap, _init_worker, floor  # noqa: E402
from common import label_stacks, machine, run_measured, save  # noqa: E402

LABEL_CODEC, IMAGE_CODEC = "lz4-5-noshuffle", "zstd-3-bitshuffle"  # the output's own (cellseg_batch.write._codec)


def ceiling(shape, tmp: Path, write_image: bool) -> dict:
    d = label_stacks(shape)
    out = tmp / f"ceiling_{write_image}.zarr"
    args = ["run", d["volume"], "--predictor", "labels", "--labels", d["cells"], "--classes", "cell",
            "--labels", d["organelles"], "--classes", d["classes"], "--tile", 1024, "--overlap", 32,
            "--out", out, "--no-progress", "--overwrite"] + ([] if write_image else ["--no-image"])  # fmt: skip
    m = run_measured(args)
    r = json.loads((out / "cellseg" / "report.json").read_text())
    voxels = int(np.prod(shape))
    return {"shape": shape, "image_copy": write_image, "wall_s": m["wall_s"],
            "mvoxel_per_s_end_to_end": voxels / 1e6 / m["wall_s"], "time_s": r["time_s"],
            "stages": r["stages"], "label_dtype": r["output"]["label_dtype"],
            "stage_mvoxel_per_s": {s["name"]: voxels / 1e6 / s["seconds"] for s in r["stages"] if s["seconds"] > 0.05},
            "fixed_s": {k: r["time_s"].get(k, 0.0) for k in ("ray_start", "actor_start", "ray_stop")},
            "cores_read_back": r["counts"]["tile_positions_read_back_for_z_overlaps"],
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
    p.add_argument("--shape", default="16,4096,4096", help="volume for the ceiling and floor (Z,Y,X)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of ceiling and floor")
    p.add_argument("--memory-shapes", default="2,4096,4096;16,4096,4096", help="two shapes 8x apart")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    rows: dict = {"machine": machine()}
    inputs = label_stacks(shape)
    class_map = ClassMap(inputs["classes"])
    rounds = []
    with tempfile.TemporaryDirectory() as tmp, ProcessPoolExecutor(
        2, mp_context=get_context("spawn"), initializer=_init_worker
    ) as pool:
        list(pool.map(time.sleep, [0.2, 0.2]))  # the floor's workers started before its clock
        for _ in range(args.repeats):
            rounds.append({
                "ceiling": ceiling(shape, Path(tmp), write_image=True),
                "floor": floor(shape, "uint32", LABEL_CODEC, pool, inputs, class_map, RunConfig.chunk, Path(tmp),
                               writer="files", image_codec=IMAGE_CODEC),
                "ceiling_no_image": ceiling(shape, Path(tmp), write_image=False),
            })  # fmt: skip
        for name in rounds[0]:
            rows[name] = min((r[name] for r in rounds), key=lambda r: r["wall_s"])
            rows[name]["wall_s_each"] = [r[name]["wall_s"] for r in rounds]
        rows["ceiling_over_floor"] = rows["ceiling"]["mvoxel_per_s_end_to_end"] / rows["floor"]["mvoxel_per_s"]
        fixed = sum(rows["ceiling"]["fixed_s"].values())
        voxels = int(np.prod(shape))
        rows["ceiling_without_fixed_costs_mvoxel_per_s"] = voxels / 1e6 / (rows["ceiling"]["wall_s"] - fixed)
        rows["driver_memory"] = [driver_memory(tuple(int(v) for v in s.split(",")), Path(tmp))
                                 for s in args.memory_shapes.split(";")]  # fmt: skip
    mem = rows["driver_memory"]
    rows["driver_memory_ratio"] = mem[1]["driver_peak_rss_mb"] / mem[0]["driver_peak_rss_mb"]
    rows["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    c, f = rows["ceiling"], rows["floor"]
    print(f"ceiling {c['mvoxel_per_s_end_to_end']:.1f} MVoxel/s end to end ({c['wall_s']:.1f} s), "
          f"floor {f['mvoxel_per_s']:.1f} MVoxel/s: {rows['ceiling_over_floor']:.2f}x; without Ray start/stop and "
          f"actor start {rows['ceiling_without_fixed_costs_mvoxel_per_s']:.1f} MVoxel/s; driver memory "
          f"{mem[0]['driver_peak_rss_mb']:.0f} / {mem[1]['driver_peak_rss_mb']:.0f} MB")  # fmt: skip
    print(f"saved {save('labels_ceiling_and_memory', rows)}")


if __name__ == "__main__":
    main()
