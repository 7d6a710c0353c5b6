"""Ray's start as `run` starts it (a local Ray of its own), with Ray's default retry of the raylet's first
connection to its object store (every 1000 ms, 10 tries) and with the one `distribute.start` sets (every 100 ms,
100 tries), alternating, each in a fresh process.

    python benchmarks/bench_ray_start.py [--rounds 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROBE = ("import time; t = time.perf_counter(); from cellseg_batch import distribute; "
         "distribute.start(None, 2, None, False); print(time.perf_counter() - t); distribute.stop()")  # fmt: skip
RAY_DEFAULT = {"RAY_raylet_client_connect_timeout_milliseconds": "1000", "RAY_raylet_client_num_connect_attempts": "10"}


def start_s(env: dict) -> float:
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args()
    times = {"ray_default": [], "cellseg": []}
    for _ in range(args.rounds):
        times["ray_default"].append(round(start_s(RAY_DEFAULT), 3))
        times["cellseg"].append(round(start_s({}), 3))
    result = {"machine": machine(), "seconds": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "over_3_s": {k: sum(t > 3.0 for t in v) for k, v in times.items()}}  # fmt: skip
    print(result)
    save("ray_start", result)


if __name__ == "__main__":
    main()
