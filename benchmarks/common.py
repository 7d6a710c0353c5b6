"""Shared by the benchmarks: inputs made once (synthetic, deterministic), peak-memory sampling, machine facts."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CACHE = Path(os.environ.get("CELLSEG_BENCH_DATA", "/tmp/cellseg-bench"))
# real EM stacks with ground truth, beside the checkout (research use; each has a SOURCE.md); absent on most machines
SHARED_DATA = Path(os.environ.get("CELLSEG_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def machine() -> dict:
    import psutil

    return {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "load_avg_at_start": [round(v, 2) for v in os.getloadavg()]}  # fmt: skip


def label_stacks(shape: tuple[int, int, int], seed: int = 7) -> dict[str, Path]:
    """A synthetic volume as it comes from other tools: image (uint8 zarr), a cell stack and an organelle stack
    (uint32 zarr, organelle classes in a JSON map). Made once per shape and reused."""
    import zarr

    from cellseg_batch.synth import CLASSES, SyntheticEM

    root = CACHE / "stacks_{}x{}x{}_s{}".format(*shape, seed)
    paths = {"volume": root / "volume.zarr", "cells": root / "cells.zarr", "organelles": root / "organelles.zarr",
             "classes": root / "organelles.json"}  # fmt: skip
    if (root / "done").exists():
        return paths
    gen = SyntheticEM(shape, seed)
    chunks = (1, 1024, 1024)
    image = zarr.create_array(str(paths["volume"]), shape=shape, chunks=chunks, dtype="uint8", overwrite=True)
    cells = zarr.create_array(str(paths["cells"]), shape=shape, chunks=chunks, dtype="uint32", overwrite=True)
    orgs = zarr.create_array(str(paths["organelles"]), shape=shape, chunks=chunks, dtype="uint32", overwrite=True)
    # organelle ids are unique per class in the generator: give each class its own id range in the joint stack
    offset = {name: i << 28 for i, name in enumerate(CLASSES)}
    class_map: dict[str, str] = {}
    for z in range(shape[0]):
        for y0 in range(0, shape[1], 1024):
            y1 = min(y0 + 1024, shape[1])
            image[z, y0:y1] = gen.image(z, y0, y1, 0, shape[2])
            cells[z, y0:y1] = gen.labels("cell", z, y0, y1, 0, shape[2])
            joint = np.zeros((y1 - y0, shape[2]), np.uint32)
            for name in CLASSES[1:]:
                ids = gen.labels(name, z, y0, y1, 0, shape[2])
                joint[ids > 0] = (ids[ids > 0] & 0x0FFFFFFF) + offset[name]
                for i in np.unique(ids[ids > 0]):
                    class_map[str(int((i & 0x0FFFFFFF) + offset[name]))] = name
            orgs[z, y0:y1] = joint
    paths["classes"].write_text(json.dumps(class_map))
    (root / "done").touch()
    return paths


def run_measured(args: list[str], sample_s: float = 0.1, env: dict | None = None, cwd: str | None = None) -> dict:
    """Run ``cellseg-batch ARGS``; wall time, the peak resident memory of the driver and of every process, and the
    driver's CPU seconds (sampled, so up to ``sample_s`` short). ``cwd``: a checkout whose code runs instead of the
    installed one (``python -m`` imports from the folder it starts in; Ray's workers start in the driver's)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cellseg_batch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip
    peak = {"driver": 0, "any_worker": 0, "driver_cpu_s": 0.0}

    def sample():
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                cpu = root.cpu_times()
                peak["driver_cpu_s"] = cpu.user + cpu.system
                peak["driver"] = max(peak["driver"], root.memory_info().rss)
                for c in root.children(recursive=True):
                    peak["any_worker"] = max(peak["any_worker"], c.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
            time.sleep(sample_s)

    t = threading.Thread(target=sample)
    t.start()
    out, err = proc.communicate()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(f"cellseg-batch {' '.join(map(str, args))} failed:\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - t0, "driver_cpu_s": peak["driver_cpu_s"],
            "driver_peak_rss_mb": peak["driver"] / 2**20,
            "worker_peak_rss_mb": peak["any_worker"] / 2**20}  # fmt: skip


def segment_and_score(data: dict, out: Path, **config) -> tuple[float, dict, dict]:
    """``run`` of a synthetic volume (``data``: its volume and truth) with these RunConfig fields, timed; its report,
    and ``eval`` against the truth."""
    from cellseg_batch.config import RunConfig
    from cellseg_batch.evaluate import evaluate_paths
    from cellseg_batch.run import run

    t = time.perf_counter()
    run(RunConfig(volume=str(data["volume"]), out=str(out), overwrite=True, progress=False, **config))
    seconds = time.perf_counter() - t
    report = json.loads((out / "cellseg" / "report.json").read_text())
    return seconds, report, evaluate_paths(str(out), str(data["truth"]))


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def beside_old(old: str | None, rounds: int, module: str, call: str) -> list[dict]:
    """``module.call`` (a Python expression, e.g. ``measure(200)``) measured in child processes for this checkout
    ("new") and, given ``old`` (a checkout: git worktree add /tmp/old REV), for it too, alternating order each round so
    that neither always runs first; each child imports ``cellseg_batch`` from its own checkout. Rows: ``{"code":
    "new" | "old", "result": what the call returned (JSON)}``, printed as they come."""
    checkouts = {"new": str(HERE.parent)} | ({"old": str(Path(old).resolve())} if old else {})
    rows = []
    for r in range(rounds):
        for name in list(checkouts) if r % 2 == 0 else list(reversed(checkouts)):
            root = checkouts[name]
            code = (f"import sys, json; sys.path[:0] = [{root!r}, {str(HERE)!r}]; "
                    f"import {module} as b; print(json.dumps(b.{call}))")  # fmt: skip
            proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
            rows.append({"code": name, "result": json.loads(proc.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    return rows

