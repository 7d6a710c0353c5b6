"""How many tiles one driver can schedule, collect and stitch, and how well it keeps many actors busy.

    python benchmarks/bench_driver.py [--shape 16,2048,2048] [--tile 128]

1. ``replay`` predictor (a precomputed tile, returned at once): tiles/s end to end and in the predict stage, and
   the driver's own CPU seconds per tile, from which the tiles/s one driver core can handle follows. Small tiles
   keep the workers' share small; the driver's work per tile does not depend on the tile's size.
2. ``latency`` predictor (sleeps 25 ms per tile, like a GPU at 40 tiles/s) on 16 actors: scheduling efficiency =
   the time 16 perfect actors would take (tiles x 25 ms / 16) over the predict stage's time.
3. The predict stage's scheduler against Ray's ``ActorPool`` on the same 16 latency actors and batches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
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


def scheduler_vs_actor_pool(actors: int, seconds_per_tile: float, shape=(8, 1024, 1024), tile: int = 128,
                            batch: int = 4) -> dict:
    """The predict stage's own scheduler (tile positions kept on one actor, z order, stealing at the end) against
    Ray's ``ActorPool.map_unordered`` (each batch to whichever actor is free) on the same actors and batches of the
    latency predictor: seconds for all tiles, and the efficiency against perfect actors."""
    import ray
    from ray.util import ActorPool

    from cellseg_batch import distribute
    from cellseg_batch.predict import PredictorSpec
    from cellseg_batch.run.predict import ActorStart, PredictStage
    from cellseg_batch.run.remote import PredictorWorker, TileJob
    from cellseg_batch.run.stage import drive
    from cellseg_batch.run.store import WorkStore
    from cellseg_batch.tiles import TileGrid

    ray.init(num_cpus=actors, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})  # fmt: skip
    out = {}
    try:
        grid = TileGrid(shape[1], shape[2], tile, 16)
        spec = PredictorSpec("latency", {"seconds_per_tile": seconds_per_tile}, module="fake_predictors")
        tiles = shape[0] * len(grid)
        ideal = tiles * seconds_per_tile / actors
        with tempfile.TemporaryDirectory() as tmp:
            store = WorkStore(Path(tmp) / "a")
            store.create(shape[0], grid, 2)
            job = TileJob(spec, None, grid, str(store.root), 0, 1)
            stage = PredictStage(store, grid, shape[0], batch, ActorStart(job, (actors, 1, 0), 120))
            t = time.perf_counter()
            drive([stage])
            out["stage_scheduler_s"] = time.perf_counter() - t - stage.actor_start_s
            store = WorkStore(Path(tmp) / "b")
            store.create(shape[0], grid, 2)
            job = TileJob(spec, None, grid, str(store.root), 0, 1)
            cls = ray.remote(PredictorWorker).options(num_cpus=1, max_restarts=distribute.ACTOR_RESTARTS)
            pool_actors = [cls.remote(job) for _ in range(actors)]
            ray.get([a.pid.remote() for a in pool_actors])
            positions = list(grid.positions())
            batches = [(z, positions[i : i + batch]) for z in range(shape[0]) for i in range(0, len(positions), batch)]
            t = time.perf_counter()
            n = sum(len(r["fragments"]) for r in ActorPool(pool_actors).map_unordered(
                lambda a, b: a.predict.remote(*b), batches))  # fmt: skip
            out["actor_pool_s"] = time.perf_counter() - t
            assert n == tiles
        out.update(tiles=tiles, actors=actors, seconds_per_tile=seconds_per_tile, ideal_s=ideal,
                   stage_scheduler_efficiency=ideal / out["stage_scheduler_s"],
                   actor_pool_efficiency=ideal / out["actor_pool_s"],
                   note="ActorPool gives no tile position to a fixed actor, so every z-overlap would be read back")  # fmt: skip
    finally:
        ray.shutdown()
    return out


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
    rows["scheduler_vs_actor_pool"] = scheduler_vs_actor_pool(args.latency_actors, args.seconds_per_tile)
    rows["gpus_one_driver_feeds_at_40_tiles_per_s"] = rows["replay"]["tiles_per_s_one_driver_core"] / 40
    rows["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps({k: v for k, v in rows.items() if k != "machine"}, indent=2, default=str)[:3000])
    rows["seconds_per_tile"] = args.seconds_per_tile
    print(f"saved {save(f'driver_{round(args.seconds_per_tile * 1000)}ms', rows)}")


if __name__ == "__main__":
    main()
