"""Two checkouts of cellseg-batch side by side: `run` of the same input by each, alternating, end to end and per stage.

    git worktree add /tmp/old REV
    python benchmarks/bench_ab.py --old /tmp/old [--new .] [--case labels|detectron2] [--rounds 2] [--name NAME]

Each run starts ``python -m cellseg_batch`` in its checkout's folder, so that it, and the Ray workers it starts (in
the driver's folder), import that checkout's code. Rounds alternate the order (old, new, then new, old, ...), so
that a drift of the shared machine's load falls on both. Both outputs of a round are compared array by array
(the share of each array's elements that differ).
Cases: ``labels``, the pipeline's ceiling input of ``bench_labels.py`` (16 x 4096 x 4096, labels predictor, 1024 px
tiles); ``detectron2``, a synthetic 8 x 2048 x 2048 volume with ``--model`` (648 tiles of 256 px); ``gpu-like``, the
ceiling's volume with one ``latency`` actor (``fake_predictors.py``: 25 ms a tile, as a GPU at 40 tiles/s would take,
with its CPU idle) and the other CPU free for the later stages, as on a GPU node.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, label_stacks, machine, run_measured, save  # noqa: E402


def case_args(case: str, model: str) -> list:
    if case == "gpu-like":
        d = label_stacks((16, 4096, 4096))
        return ["run", d["volume"], "--predictor", "fake_predictors:latency", "--actors", 1, "--tile", 1024,
                "--overlap", 32]  # fmt: skip
    if case == "labels":
        d = label_stacks((16, 4096, 4096))
        return ["run", d["volume"], "--predictor", "labels", "--labels", d["cells"], "--classes", "cell", "--labels",
                d["organelles"], "--classes", d["classes"], "--tile", 1024, "--overlap", 32]  # fmt: skip
    from cellseg_batch.synth import write_synthetic

    root = CACHE / "ab_8x2048x2048_s5"
    if not (root / "done").exists():  # made once and reused
        write_synthetic(root, (8, 2048, 2048), seed=5, overwrite=True)
        (root / "done").touch()
    return ["run", root / "volume.tif", "--model", model]


def compare_outputs(a: Path, b: Path) -> dict:
    """Output ``a`` against ``b``, array by array: how many were compared, and for those that differ, the share of
    their elements that differ (a change meant to be exact should leave this empty; one that changes float
    rounding, e.g. in the model, shows how far it moved). Label arrays are compared as partitions: each of ``a``'s
    ids is matched to the id of ``b`` it shares most voxels with, and the voxels off that match count."""
    import zarr

    n, differing = 0, {}
    for meta in sorted([*a.rglob("zarr.json"), *a.rglob(".zarray")]):
        rel = meta.parent.relative_to(a)
        try:
            x, y = zarr.open_array(str(a / rel), mode="r"), zarr.open_array(str(b / rel), mode="r")
        except (ValueError, TypeError, KeyError, zarr.errors.NodeTypeValidationError):
            continue  # a group
        n += 1
        if x.shape != y.shape:
            differing[str(rel)] = 1.0
            continue
        if str(rel).startswith("labels/"):  # ids may be numbered differently: voxels off the best id match
            pairs: dict[int, int] = {}
            for z in range(x.shape[0]):
                keys, counts = np.unique((x[z].astype(np.uint64) << np.uint64(32)) | y[z].astype(np.uint64),
                                         return_counts=True)  # fmt: skip
                for k, c in zip(keys.tolist(), counts.tolist()):
                    pairs[k] = pairs.get(k, 0) + c
            best: dict[int, int] = {}
            for k, c in pairs.items():
                best[k >> 32] = max(best.get(k >> 32, 0), c)
            changed = x.size - sum(best.values())
        else:
            changed = sum(int(np.count_nonzero(x[z] != y[z])) for z in range(x.shape[0]))
        if changed:
            differing[str(rel)] = changed / x.size
    return {"arrays": n, "differing_share": differing}


def measure(checkout: str, args: list, out: Path) -> dict:
    # the fake predictors register from the checkout's own benchmarks folder (--case gpu-like)
    env = {"PYTHONPATH": str(Path(checkout) / "benchmarks"), "CELLSEG_BENCH_SECONDS_PER_TILE": "0.025"}
    m = run_measured([*args, "--out", out, "--no-progress", "--overwrite"], cwd=checkout, env=env)
    r = json.loads((out / "cellseg" / "report.json").read_text())
    return {"wall_s": round(m["wall_s"], 2), "worker_peak_rss_mb": round(m["worker_peak_rss_mb"]),
            "time_s": r["time_s"], "stages_s": {s["name"]: s["seconds"] for s in r["stages"]},
            "steady_tiles_per_s": r["throughput"].get("tiles_per_s_steady"),
            "actor_ms_per_tile": r["throughput"].get("actor_ms_per_tile")}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other checkout (e.g. a git worktree of the base revision)")
    ap.add_argument("--new", default=str(Path(__file__).resolve().parent.parent))
    ap.add_argument("--case", choices=["labels", "detectron2", "gpu-like"], default="labels")
    ap.add_argument("--model", default="demo/model", help="for --case detectron2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--name", default=None, help="results/ab_NAME.json (default: the case)")
    a = ap.parse_args()
    checkouts = {"old": str(Path(a.old).resolve()), "new": str(Path(a.new).resolve())}
    args = case_args(a.case, str(Path(a.model).resolve()))
    runs, compared = [], []
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        for r in range(a.rounds):
            for code in ("old", "new") if r % 2 == 0 else ("new", "old"):
                row = {"code": code, **measure(checkouts[code], args, Path(tmp) / f"{code}.zarr")}
                print(json.dumps({k: row[k] for k in ("code", "wall_s", "steady_tiles_per_s", "stages_s")}), flush=True)
                runs.append(row)
            compared.append(compare_outputs(Path(tmp) / "old.zarr", Path(tmp) / "new.zarr"))
            print(json.dumps(compared[-1]), flush=True)
    walls = {c: [r["wall_s"] for r in runs if r["code"] == c] for c in checkouts}
    summary = {c: {"wall_s": w, "mean_s": round(statistics.mean(w), 2)} for c, w in walls.items()}
    summary["old_over_new"] = round(summary["old"]["mean_s"] / summary["new"]["mean_s"], 3)
    print(json.dumps(summary))
    path = save(f"ab_{a.name or a.case}", {"machine": machine(), "case": a.case, "args": list(map(str, args)),
                                           "checkouts": checkouts, "outputs_compared_per_round": compared,
                                           "summary": summary, "runs": runs})  # fmt: skip
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
