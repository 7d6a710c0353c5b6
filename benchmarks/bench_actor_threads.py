"""An actor's per-tile work beside a model thread: what the two cost each other through Python's GIL.

    python benchmarks/bench_actor_threads.py [--old PATH] [--rounds 2]

Where an actor holds a GPU it takes two calls at once (``max_concurrency=2``): one thread runs the model on a batch
while the other does the pipeline's per-tile work on the batch before (fragment table, z-overlaps with the same
position's core in the slice before, stitching bands). Both need the GIL. Here the per-tile work runs on real tiles
(the `labels` predictor's tiles of ``bench_labels.py``'s input), once alone and once beside a stand-in for a model's
Python side: a small torch network on a tiny input in a loop, one torch thread, so that its time is mostly Python
dispatch, as a GPU model's host side is (not detectron2 on a GPU: none here). Reported: the per-tile work's ms a tile
alone and beside the model, and the model's forwards per second alone and while the per-tile work runs. With
``--old``, a checkout of this package measured the same way in alternating child processes (its code imported from
its folder), so the two are compared side by side.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import beside_old, label_stacks, machine, save  # noqa: E402

SHAPE = (16, 4096, 4096)


def measure(tiles: int) -> dict:
    """In a child process whose ``cellseg_batch`` is the checkout under test."""
    import numpy as np
    import torch

    from cellseg_batch import stitch
    from cellseg_batch.predict.labels_predictor import LabelsPredictor
    from cellseg_batch.read import open_label_layers
    from cellseg_batch.stitch import fragment_table, tile_bands, zoverlaps
    from cellseg_batch.tiles import TileGrid, TileKey

    d = label_stacks(SHAPE)
    predictor = LabelsPredictor(open_label_layers([str(d["cells"]), str(d["organelles"])], ["cell", str(d["classes"])]))
    grid = TileGrid(SHAPE[1], SHAPE[2], 1024, 32)
    # per position, slices 1-4 as an actor holds them when slice 4 comes (link gap 2: reach 3); the slices before
    # the last as runs only, where the checkout keeps them so
    from cellseg_batch.run import remote

    far = hasattr(remote, "HeldCores")
    work = []  # (key, tile, its store slot, the core in it, what is held of slices 3, 2, 1)
    for iy, ix in grid.positions():
        box = grid.core(iy, ix)
        held = []
        for z in (1, 2, 3, 4):
            tile = predictor._tile(z, grid.window(iy, ix))
            slot = np.zeros((tile.labels.shape[0], 1024, 1024), tile.labels.dtype)  # as the actor's, made beforehand
            core = slot[:, : box.shape[0], : box.shape[1]]
            core[...] = tile.labels[(slice(None), *box.relative_to(grid.window(iy, ix)))]
            if z == 4:
                work.append((TileKey(z, iy, ix), tile, slot, core, held[::-1]))
            runs = [stitch.label_runs(layer) for layer in slot] if hasattr(stitch, "Runs") else None
            held.append((core if z == 3 or not far else None, runs))

    def per_tile(n: int) -> None:
        """What the checkout's actor does for a tile besides storing it (``run.remote.PredictorWorker.predict``):
        with per-run counts (``stitch.Runs``), each layer's runs of the slot, the fragment table and z-overlaps
        from them (the slice before's runs held from its own call), and with ``HeldCores`` also the overlaps with
        the slices 2 and 3 before, from runs; before them, the fragment table and adjacent overlaps from pixels."""
        for k in range(n):
            key, tile, slot, core, held = work[k % len(work)]
            (before, before_runs), farther = held[0], held[1:]
            if before_runs is not None:
                runs = [stitch.label_runs(layer) for layer in slot]
                fragment_table(key, tile, grid, runs)
                zoverlaps(before, core, key.iy, key.ix, before_runs, runs)
                for other, other_runs in farther if far else ():
                    zoverlaps(other, None, key.iy, key.ix, other_runs, runs)
            else:
                fragment_table(key, tile, grid)
                zoverlaps(before, core, key.iy, key.ix)
            tile_bands(tile.labels, grid, key.iy, key.ix)

    torch.set_num_threads(1)
    net = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU())
                                for _ in range(20)]).eval()  # fmt: skip
    x = torch.randn(1, 16, 8, 8)

    def model(stop: threading.Event, out: list) -> None:
        n = 0
        with torch.no_grad():
            while not stop.is_set():
                net(x)
                n += 1
        out.append(n)

    def beside_model(seconds: float | None) -> tuple[float, float]:
        """(seconds the per-tile work took, or ``seconds`` of sleep; model forwards per second meanwhile)."""
        stop, out = threading.Event(), []
        thread = threading.Thread(target=model, args=(stop, out))
        thread.start()
        t = time.perf_counter()
        time.sleep(seconds) if seconds else per_tile(tiles)
        dt = time.perf_counter() - t
        stop.set()
        thread.join()
        return dt, out[0] / dt

    per_tile(len(work))  # warm
    t = time.perf_counter()
    per_tile(tiles)
    alone = time.perf_counter() - t
    _, model_alone = beside_model(2.0)
    beside, model_beside = beside_model(None)
    return {"tiles": tiles, "per_tile_ms_alone": 1e3 * alone / tiles, "per_tile_ms_beside_model": 1e3 * beside / tiles,
            "model_per_s_alone": model_alone, "model_per_s_beside_per_tile_work": model_beside,
            "model_share_kept": model_beside / model_alone}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", help="a checkout to measure beside this one (git worktree add /tmp/old REV)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tiles", type=int, default=200)
    p.add_argument("--name", default="actor_threads")
    args = p.parse_args()
    label_stacks(SHAPE)  # made once, before any clock
    rows = [{"code": row["code"], **row["result"]} for row in
            beside_old(args.old, args.rounds, "bench_actor_threads", f"measure({args.tiles})")]  # fmt: skip
    summary = {}
    for name in dict.fromkeys(r["code"] for r in rows):
        mine = [r for r in rows if r["code"] == name]
        summary[name] = {k: [round(r[k], 3) for r in mine] for k in
                         ("per_tile_ms_alone", "per_tile_ms_beside_model", "model_share_kept")}  # fmt: skip
    print(json.dumps(summary))
    save(args.name, {"machine": machine(), "shape": SHAPE, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
