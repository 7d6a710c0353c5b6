"""The GPU scheduling logic without a GPU: a local Ray with two logical GPUs (``--num-gpus 2``) and a predictor
that asks for GPUs but computes on the CPU. One actor per GPU, each seeing only its own device; an actor killed
mid-run is replaced on the GPU it held, and the output is the same as a run without GPUs."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import cli, labels_of

VOLUME = "synth:6x512x512,seed=5"
ARGS = ["--labels", VOLUME, "--tile", 128, "--overlap", 16, "--batch-size", 2, "--no-progress", "--no-image"]

# A labels predictor that claims a GPU and records, per actor process, what Ray gave it. With a kill file it
# kills its own process once (the first call for slice 3), as a crashed GPU worker would die.
PROBE = '''
import json, os, signal
from pathlib import Path

import ray

from cellseg_batch.predict import register
from cellseg_batch.predict.labels_predictor import LabelsPredictor


@register("gpu_probe")
class GPUProbe(LabelsPredictor):
    @classmethod
    def plan(cls, options, volume):
        plan = super().plan(options, volume)
        plan.uses_gpu = True
        return plan

    def __init__(self, layers):
        super().__init__(layers)
        record = {"pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
                  "visible": os.environ.get("CUDA_VISIBLE_DEVICES")}
        (Path(os.environ["PROBE_DIR"]) / f"actor-{os.getpid()}.json").write_text(json.dumps(record))

    def predict(self, z, windows, images=None):
        kill = Path(os.environ["PROBE_DIR"]) / "kill-once"
        if z == 3 and kill.exists():
            kill.unlink()
            (Path(os.environ["PROBE_DIR"]) / f"killed-{os.getpid()}").touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().predict(z, windows, images)
'''


def _run_with_gpus(tmp_path: Path, out: Path, kill: bool) -> list[dict]:
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (tmp_path / "gpu_probe_mod.py").write_text(PROBE)
    if kill:
        (probe_dir / "kill-once").touch()
    env = {**os.environ, "PROBE_DIR": str(probe_dir),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "cellseg_batch", "run", VOLUME, "--predictor", "gpu_probe_mod:gpu_probe",
                           *map(str, ARGS), "--num-gpus", "2", "--num-cpus", "2", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(p.read_text()) for p in sorted(probe_dir.glob("actor-*.json"))]
    killed = [int(p.name.split("-")[1]) for p in probe_dir.glob("killed-*")]
    for r in records:
        r["killed"] = r["pid"] in killed
    return records


def _assert_same_output(a: Path, b: Path) -> None:
    import numpy as np

    for name in ("cell", "mitochondrion", "alpha_granule", "canalicular_vessel"):
        np.testing.assert_array_equal(labels_of(a, name), labels_of(b, name))
    assert (a / "cellseg" / "objects.csv").read_text() == (b / "cellseg" / "objects.csv").read_text()


def test_one_actor_per_logical_gpu_each_sees_its_own_and_a_killed_one_is_replaced(tmp_path):
    reference = tmp_path / "cpu.zarr"
    cli("run", VOLUME, "--predictor", "labels", *ARGS, "--out", reference)
    out = tmp_path / "gpu.zarr"
    records = _run_with_gpus(tmp_path, out, kill=True)
    # every actor held exactly one GPU and CUDA_VISIBLE_DEVICES showed it that one only
    assert all(len(r["gpu_ids"]) == 1 and r["visible"] == r["gpu_ids"][0] for r in records), records
    killed = [r for r in records if r["killed"]]
    assert len(killed) == 1, records
    # two actors at a time on the two GPUs; the replacement of the killed one got the GPU it left
    assert len(records) == 3, records
    survivors = [r for r in records if not r["killed"]]
    assert {r["gpu_ids"][0] for r in records} == {"0", "1"}
    replacement = [r for r in survivors if r["gpu_ids"] == killed[0]["gpu_ids"]]
    assert len(replacement) == 1 and replacement[0]["pid"] != killed[0]["pid"], records
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["counts"]["actors"] == {"count": 2, "cpus_each": 1, "gpus_each": 1}
    _assert_same_output(out, reference)
