"""3D linking quality: the link rule before (adjacent slices only, as on main) and after (graph with gap bridging),
beside Cellpose's ``stitch3D`` (default threshold 0.25) run on the same 2D instances, on synthetic linking cases
(branches, touching neighbours, misaligned slices, missed detections) and on real EM data where any has 3D truth.

Usage: ``python benchmarks/bench_linking.py`` (cellpose, where wanted, from ``CELLPOSE_PATH``, e.g. a folder made by
``pip install --no-deps --target DIR cellpose fill-voids opencv-python-headless``). Writes
``results/linking.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import SHARED_DATA  # noqa: E402

from cellseg_batch.evaluate import evaluate  # noqa: E402
from cellseg_batch.read import ArrayVolume  # noqa: E402
from cellseg_batch.synth import LINK_CLASSES, write_linking_cases  # noqa: E402

SCENARIOS = {  # name: (shape, seed, dropout, shift)
    "branches+touching": ((24, 480, 480), 11, 0.0, 0.0),
    "dropout 5%": ((24, 480, 480), 12, 0.05, 0.0),
    "dropout 10%": ((24, 480, 480), 13, 0.10, 0.0),
    "shifted slices 20% + dropout 5%": ((24, 480, 480), 14, 0.05, 0.2),
    "dropout 5%, the test's volume": ((24, 640, 640), 1, 0.05, 0.0),  # tests/test_linking.py
    "shifted slices 20% + dropout 10%": ((24, 640, 640), 15, 0.10, 0.2),
}
KEYS = ("n_pred", "n_gt", "f1@0.5", "f1@0.5:0.95", "vi_split", "vi_merge")


def stitch3d():
    path = os.environ.get("CELLPOSE_PATH")
    if path:
        sys.path.insert(0, path)
    try:
        from cellpose.utils import stitch3D

        return stitch3D
    except ImportError as e:
        return str(e)


BASE = os.environ.get("BASE_REF", "04dad6e")  # main when the graph linking began: the rule before
DRIFT_BASE = os.environ.get("DRIFT_BASE_REF", "b101352")  # gap edges without drift, the last commit before it


def base_checkout(tmp: Path, ref: str) -> Path:
    """The package as of ``ref``, exported (git archive) to run in a subprocess."""
    out = tmp / f"base-{ref}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "cellseg_batch"], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def pipeline(paths: dict, out: Path, gap: int | None, base: Path | None = None) -> tuple[dict, dict]:
    """The labels predictor through ``run``: this branch's package (link_gap ``gap``), or ``base``'s (before)."""
    import zarr

    args = ["run", paths["volume"], "--predictor", "labels", "--labels", paths["detections"], "--classes",
            paths["classes"], "--tile", 256, "--overlap", 16, "--no-progress", "--overwrite", "--out", out]  # fmt: skip
    if gap is not None:
        args += ["--link-gap", gap]
    root = base or HERE.parent  # run from there too: ``-m`` puts the working directory first on sys.path
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", "import cellseg_batch, sys; print(cellseg_batch.__file__); "
                           "from cellseg_batch.cli import main; sys.exit(main(sys.argv[1:]))", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(root)), f"ran {proc.stdout.splitlines()[0]}, not the package in {root}"
    report = json.loads((out / "cellseg" / "report.json").read_text())
    link = next(s for s in report["stages"] if s["name"] == "link")
    return {c: np.asarray(zarr.open_array(str(out / "labels" / c / "0"), mode="r")[:]) for c in LINK_CLASSES}, link


def scores(pred: dict, truth: dict) -> dict:
    r = evaluate({c: ArrayVolume(pred[c]) for c in pred}, {c: ArrayVolume(truth[c]) for c in truth})
    return {c: {k: r["classes"][c][k] for k in KEYS} for c in LINK_CLASSES} | {"mean": {k: r["mean"][k] for k in KEYS}}


def main() -> None:
    import tifffile
    import zarr

    peer = stitch3d()
    results = {"peer": "cellpose.utils.stitch3D(stitch_threshold=0.25)" if callable(peer) else f"unavailable: {peer}"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"before": (None, base_checkout(Path(tmp), BASE)),
                "gap 2, no drift": (None, base_checkout(Path(tmp), DRIFT_BASE))}  # fmt: skip
        runs |= {"after, gap 0": (0, None), "after, gap 1": (1, None), "after, gap 2 (default)": (2, None)}
        results["before"] = f"the package at {BASE} (git archive), same pipeline and options"
        results["gap 2, no drift"] = f"the package at {DRIFT_BASE} (gap edges without drift), default options"
        for name, (shape, seed, dropout, shift) in SCENARIOS.items():
            paths = write_linking_cases(Path(tmp) / f"s{seed}", shape, seed, dropout, shift)
            truth = {c: np.asarray(zarr.open_array(str(paths["truth"] / "labels" / c / "0"), mode="r")[:])
                     for c in LINK_CLASSES}  # fmt: skip
            row = {"shape": shape, "seed": seed, "dropout": dropout, "shift": shift}
            for i, (label, (gap, base)) in enumerate(runs.items()):
                pred, link = pipeline(paths, Path(tmp) / f"out{seed}_{i}.zarr", gap, base)
                row[label] = scores(pred, truth) | {"link_stage_s": link["seconds"]}
            if callable(peer):
                det = tifffile.imread(paths["detections"])
                classes = json.loads(paths["classes"].read_text())
                pred = {}
                t = time.perf_counter()
                for c in LINK_CLASSES:  # stitch3D is class-blind: one class at a time, as a user would
                    ids = np.array([int(k) for k, v in classes.items() if v == c] or [0])
                    lut = np.zeros(int(det.max()) + 1, np.uint32)
                    lut[ids] = np.arange(1, len(ids) + 1)
                    masks = lut[det]
                    pred[c] = np.stack(peer(masks.copy(), stitch_threshold=0.25)).astype(np.uint32)
                row["cellpose stitch3D"] = scores(pred, truth) | {"seconds": round(time.perf_counter() - t, 3)}
            results[name] = row
            print(name, json.dumps({k: v["mean"] for k, v in row.items() if isinstance(v, dict)}), flush=True)
    results["real_data"] = real_data()
    out = HERE / "results" / "linking.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("wrote", out)


def gap_cost(shape=(24, 1024, 1024)) -> dict:
    """What gap edges cost the link stage: a synthetic platelet volume (dense cells and organelles) through the
    labels predictor with 256 px tiles, link_gap 0, 2, and 2 but 0 for cells (which the generator stacks one empty
    slice apart); with the objects' F1 (the truth is exact, so any change is a wrong join)."""
    out = {"volume": "synth:{}x{}x{},seed=3".format(*shape), "tile": 256}
    with tempfile.TemporaryDirectory() as tmp:
        for i, gap in enumerate(("0", "2", "cell=0,2")):
            args = ["run", out["volume"], "--predictor", "labels", "--labels", out["volume"], "--tile", 256,
                    "--overlap", 32, "--no-progress", "--link-gap", gap, "--out", Path(tmp) / f"g{i}.zarr"]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
            subprocess.run([sys.executable, "-m", "cellseg_batch", *map(str, args)], check=True, capture_output=True,
                           env=env, cwd=HERE.parent)  # fmt: skip
            pred = Path(tmp) / f"g{i}.zarr"
            report = json.loads((pred / "cellseg" / "report.json").read_text())
            from cellseg_batch.evaluate import evaluate_paths

            f1 = {c: r["f1@0.5"] for c, r in evaluate_paths(str(pred), out["volume"])["classes"].items()}
            link = next(s for s in report["stages"] if s["name"] == "link")
            c = report["counts"]
            out[f"gap {gap}"] = {"link_stage_s": link["seconds"], "link_driver_cpu_s": link["driver_cpu_s"],
                                 "gap_seconds": c.get("gap_seconds"), "gap_tiles_read": c.get("gap_tiles_read"),
                                 "tiles": c["tiles"], "instances_2d": c["instances_2d"], "objects": c["objects"],
                                 "z_links_gap": c.get("z_links_gap"), "f1@0.5": f1}  # fmt: skip
    return out


def real_data() -> str:
    """Real EM volumes with 3D ground truth in the shared data folder, if any."""
    root = SHARED_DATA
    if not root.exists():
        return f"skipped: no shared data at {root}"
    found = []
    for src in sorted(root.glob("*/SOURCE.md")):
        text = src.read_text().lower()
        if "no 3d linking" in text or "one slice" in text:
            continue
        found.append(src.parent.name)
    if not found:
        return (
            f"skipped: none of {sorted(p.name for p in root.iterdir())} has 3D instance truth (isbi2012: 2D "
            "instances only, no 3D linking; platelet-em-24-z0: one slice)"
        )
    return f"not run: {found} need a loader here"


if __name__ == "__main__":
    if sys.argv[1:] == ["--cost"]:
        cost = gap_cost()
        path = HERE / "results" / "linking_gap_cost.json"
        path.write_text(json.dumps(cost, indent=1) + "\n")
        print(json.dumps(cost, indent=1))
    else:
        main()
