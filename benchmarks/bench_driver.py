"""How many tiles one driver can schedule, collect and stitch, and how well it keeps many actors busy.

    python benchmarks/bench_driver.py [--shape 16,2048,2048] [--tile 128]

1. ``replay`` predictor (a precomputed tile, returned at once): tiles/s end to end and in the predict stage, and
   the driver's own CPU seconds per tile, from which the tiles/s one driver core can handle follows. Small tiles
   keep the workers' share small; the driver's work per tile does not depend on the tile's size.
2. ``latency`` predictor (sleeps 25 ms per tile, like a GPU at 40 tiles/s) on 16 actors: scheduling efficiency =
   the time 16 perfect actors would take (tiles x 25 ms / 16) over the predict stage's time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, run_measured, save  # noqa: E402

HERE = Path(__file__).resolve().parent


def measure(shape, tile: int, overlap: int, tmp: Path, name: str, extra: list, seconds_per_tile: float) -> dict:
    uri = "synth:{}x{}x{},seed=1".format(*shape)
    out = tmp / f"{name}.zarr"
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
           "CELLSEG_BENCH_SECONDS_PER_TILE": str(seconds_per_tile)}  # fmt: skip
    m = run_measured(["run", uri, "--predictor", f"fake_predictors:{name}", "--tile", tile, "--overlap", overlap,
                      "--no-image", "--out", out, "--no-progress", *extra], env=env)  # fmt: skip
    r = json.loads((out / "cellseg" / "report.json").read_text())
    tiles = r["counts"]["tiles"]
    predict_s = r["time_s"]["predict"]
    spans = {s["name"]: s["driver_cpu_span_s"] for s in r["stages"]}
    cpu = {s["name"]: s["driver_cpu_s"] for s in r["stages"]}
    # scheduling and collecting tiles, and stitching slices alongside: from the first tile to the last stitch
    driver = spans["stitch"][1] - spans["predict"][0]
    return {"shape": shape, "tile": tile, "tiles": tiles, "report_time_s": r["time_s"], "counts": r["counts"],
            "tiles_per_s_end_to_end": tiles / m["wall_s"], "tiles_per_s_predict_stage": tiles / predict_s,
            "driver_cpu_s_predict_and_stitch": driver, "driver_cpu_ms_per_tile": 1e3 * driver / tiles,
            "tiles_per_s_one_driver_core": tiles / driver, "driver_cpu_s_per_stage": cpu, **m}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="16,2048,2048")
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--latency-actors", type=int, default=16)
    p.add_argument("--seconds-per-tile", type=float, default=0.025)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    rows = {"machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        rows["replay"] = measure(shape, args.tile, 16, Path(tmp), "replay", ["--batch-size", 8], 0.0)
        n = args.latency_actors
        lat = measure(shape, args.tile, 16, Path(tmp), "latency",
                      ["--actors", n, "--num-cpus", n, "--batch-size", 4], args.seconds_per_tile)  # fmt: skip
        ideal = lat["tiles"] * args.seconds_per_tile / n
        lat["ideal_predict_s"] = ideal
        lat["scheduling_efficiency"] = ideal / lat["report_time_s"]["predict"]
        rows["latency"] = lat
    rows["gpus_one_driver_feeds_at_40_tiles_per_s"] = rows["replay"]["tiles_per_s_one_driver_core"] / 40
    rows["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({k: v for k, v in rows.items() if k != "machine"}, indent=2, default=str)[:3000])
    print(f"saved {save('driver', rows)}")


if __name__ == "__main__":
    main()
