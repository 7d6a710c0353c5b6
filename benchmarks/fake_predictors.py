"""Predictors for measuring the pipeline around the model: ``replay`` returns one precomputed tile at once;
``latency`` returns it after sleeping as long as a GPU would take (``CELLSEG_BENCH_SECONDS_PER_TILE``).

They register themselves from outside the package, as a lab's own predictor would:
``cellseg-batch run VOLUME --predictor fake_predictors:replay`` with this folder on PYTHONPATH.
"""

from __future__ import annotations

import os
import time

import numpy as np

from cellseg_batch.predict import Plan, Predictor, PredictorSpec, TileLabels, register

CLASSES = ["cell", "mitochondrion"]


def _tile(h: int, w: int) -> TileLabels:
    """Four cells in quadrants, each holding one mitochondrion: 8 instances, like a sparse EM tile."""
    labels = np.zeros((2, h, w), np.uint16)
    yy, xx = np.mgrid[0:h, 0:w]
    n = 0
    for qy in (0, 1):
        for qx in (0, 1):
            cy, cx = (2 * qy + 1) * h // 4, (2 * qx + 1) * w // 4
            r = min(h, w) // 5
            n += 1
            labels[0][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = n
            n += 1
            labels[1][(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 3) ** 2] = n
    return TileLabels(labels, np.array([0, 1] * 4, np.int16), np.ones(8, np.float32))


class _Replay(Predictor):
    needs_image = False
    seconds_per_tile = 0.0

    def __init__(self, seconds_per_tile: float = 0.0):
        self.classes = list(CLASSES)
        self.seconds = seconds_per_tile
        self.cache: dict[tuple[int, int], TileLabels] = {}

    @classmethod
    def plan(cls, options, volume) -> Plan:
        seconds = float(os.environ.get("CELLSEG_BENCH_SECONDS_PER_TILE", cls.seconds_per_tile))
        return Plan(spec=PredictorSpec(cls.name, {"seconds_per_tile": seconds}), classes=list(CLASSES),
                    needs_image=False, tile=options.tile or 256, overlap=options.overlap or 32,
                    identity={"seconds_per_tile": seconds})  # fmt: skip

    def predict(self, z, windows, images=None):
        if self.seconds:
            time.sleep(self.seconds * len(windows))
        out = []
        for w in windows:
            if w.shape not in self.cache:
                self.cache[w.shape] = _tile(*w.shape)
            out.append(self.cache[w.shape])
        return out


@register("replay")
class ReplayPredictor(_Replay):
    """A precomputed tile, at once: what is left is the pipeline's own work."""


@register("latency")
class LatencyPredictor(_Replay):
    """A precomputed tile after a GPU's time per tile (default 25 ms: 40 tiles/s)."""

    seconds_per_tile = 0.025
