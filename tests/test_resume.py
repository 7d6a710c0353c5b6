"""Interruptions: kill -9 of the driver (in predict; slow: in every stage), then the same command, gives the
uninterrupted run's output; so does killing one predictor actor's process mid-run (Ray replaces it and retries its
tiles) or (slow) a stitch, write or pyramid task's worker, or (slow) a node of a two-node Ray; Ctrl-C stops
cleanly."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import zarr

from cellseg_batch.synth import CLASSES
from conftest import cli, labels_of

VOLUME = "synth:16x768x768,seed=11"
ARGS = ["--predictor", "labels", "--labels", VOLUME, "--tile", 128, "--overlap", 16, "--batch-size", 1, "--no-progress"]


# Ctrl-C reaches the run as it would from a terminal even where the tests themselves were started in the background
# by a shell without job control (`cmd &` in a script), which makes every descendant ignore SIGINT: Python then keeps
# ignoring it, and the run would finish instead of stopping.
WITH_CTRL_C = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
               "runpy.run_module('cellseg_batch', run_name='__main__', alter_sys=True)")  # fmt: skip


def _start(out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WITH_CTRL_C, "run", VOLUME, *map(str, ARGS), "--out", str(out),
                             *map(str, extra)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _wait_for(predicate, proc, timeout=240):
    t = time.monotonic()
    while not predicate():
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() - t < timeout, "timed out waiting for the run to make progress"
        time.sleep(0.05)


def _slices_done(out: Path) -> int:
    return len(list((Path(f"{out}.work") / "frag").glob("*.npy")))


def _assert_identical(a: Path, b: Path) -> None:
    for name in CLASSES:
        for level in range(len(zarr.open_group(str(a / "labels" / name)).attrs["multiscales"][0]["datasets"])):
            np.testing.assert_array_equal(labels_of(a, name, level), labels_of(b, name, level))
    assert (a / "cellseg" / "objects.csv").read_text() == (b / "cellseg" / "objects.csv").read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    cli("run", VOLUME, *ARGS, "--out", out)
    return out


def _ray_processes_of(session_pids: set[int]) -> list[psutil.Process]:
    alive = []
    for pid in session_pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_kill_9_of_the_driver_then_rerun_gives_the_same_output(reference, tmp_path):
    out = tmp_path / "out.zarr"
    proc = _start(out)
    _wait_for(lambda: _slices_done(out) >= 3, proc)
    family = {c.pid for c in psutil.Process(proc.pid).children(recursive=True)}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 3 <= _slices_done(out) < 16
    # what is left must not look complete: no NGFF label list, status incomplete
    assert zarr.open_group(str(out)).attrs["cellseg_batch"]["status"] == "incomplete"
    assert "labels" not in zarr.open_group(str(out / "labels")).attrs
    killed_at = time.monotonic()
    done_before = _slices_done(out)
    cli("run", VOLUME, *ARGS, "--out", out)
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["mode"] == "resume"
    # slices finished before the kill were not predicted again
    assert report["counts"]["tiles_predicted_now"] <= report["counts"]["tiles"] * (16 - done_before) / 16
    _assert_identical(out, reference)
    # the local Ray the killed driver started goes down too (its node agents notice within about a minute)
    while _ray_processes_of(family) and time.monotonic() < killed_at + 150:
        time.sleep(1)
    assert not _ray_processes_of(family), [p.name() for p in _ray_processes_of(family)]


def test_killing_an_actor_process_mid_run_does_not_change_the_result(reference, tmp_path):
    out = tmp_path / "out.zarr"
    proc = _start(out, "--actors", 2)

    def actors():
        return [c for c in psutil.Process(proc.pid).children(recursive=True) if "PredictorWorker" in " ".join(c.cmdline())]

    _wait_for(lambda: _slices_done(out) >= 2 and len(actors()) == 2, proc)
    victim = actors()[0]
    victim.send_signal(signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert not psutil.pid_exists(victim.pid) or psutil.Process(victim.pid).status() == psutil.STATUS_ZOMBIE
    _assert_identical(out, reference)


# Ctrl-C and SIGTERM take the same path once the handler runs; the default run keeps SIGTERM (what scancel sends)
@pytest.mark.parametrize("sig", [pytest.param(signal.SIGINT, marks=pytest.mark.slow), signal.SIGTERM],
                         ids=["ctrl-c", "sigterm"])  # fmt: skip
def test_ctrl_c_or_sigterm_stops_cleanly_and_the_run_resumes(reference, tmp_path, sig):
    out = tmp_path / "out.zarr"
    proc = _start(out)
    _wait_for(lambda: _slices_done(out) >= 2, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr and "Traceback" not in stderr
    cli("run", VOLUME, *ARGS, "--out", out)
    _assert_identical(out, reference)


SIGTERM_IN_RAY_START = """
import os, signal, sys
import psutil, ray
from cellseg_batch import distribute
from cellseg_batch.cli import _terminate
signal.signal(signal.SIGTERM, _terminate)
real = ray.init
def init_then_sigterm(*args, **kwargs):
    info = real(*args, **kwargs)
    print(" ".join(str(p.pid) for p in psutil.Process().children(recursive=True)), flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # Ray's own handler is the one set inside ray.init
    return info
ray.init = init_then_sigterm
try:
    distribute.start(None, 1, 0, False)
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_sigterm_while_ray_starts_stops_like_one_later_and_ends_rays_processes():
    """A SIGTERM inside ray.init met Ray's handler (exit 15 with no word), which left Ray's agents running."""
    proc = subprocess.run([sys.executable, "-c", SIGTERM_IN_RAY_START], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, proc.stderr[-3000:]
    started = {int(p) for p in proc.stdout.split()}
    assert started
    deadline = time.monotonic() + 30
    while (left := _ray_processes_of(started)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [p.cmdline()[:2] for p in left]


@pytest.mark.slow
@pytest.mark.parametrize("point", ["predict:100", "stitch:5", "gaps:2", "link:1", "write:5", "image:3", "preview:1"])
def test_kill_9_of_the_driver_in_each_stage_then_rerun_gives_the_same_output(reference, tmp_path, point):
    """CELLSEG_KILL_AFTER=STAGE:N: the driver SIGKILLs itself right after its Nth result of STAGE (before the flush):
    the same kill -9 as above, at a point chosen exactly instead of by timing."""
    import os

    out = tmp_path / "out.zarr"
    proc = subprocess.run([sys.executable, "-m", "cellseg_batch", "run", VOLUME, *map(str, ARGS), "--out", str(out)],
                          env={**os.environ, "CELLSEG_KILL_AFTER": point}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert zarr.open_group(str(out)).attrs["cellseg_batch"]["status"] == "incomplete"
    cli("run", VOLUME, *ARGS, "--out", out)
    assert json.loads((out / "cellseg" / "report.json").read_text())["mode"] == "resume"
    _assert_identical(out, reference)


# the pyramid stage runs only where the output has more levels than a write block spans (4096 px at most): a tall,
# narrow volume with small chunks (8 levels, blocks of 2048 px filling 6)
PYRAMID_VOLUME = "synth:4x4608x128,seed=11"
PYRAMID_ARGS = ["--predictor", "labels", "--labels", PYRAMID_VOLUME, *ARGS[4:], "--chunk", "64"]


@pytest.fixture(scope="module")
def pyramid_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "pyramid.zarr"
    cli("run", PYRAMID_VOLUME, *PYRAMID_ARGS, "--out", out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("point", ["stitch-task:4", "write-task:4", "image-task:3", "pyramid-task:2"])
def test_kill_9_of_a_task_worker_during_stitch_write_or_pyramid_does_not_change_the_result(tmp_path, point, request):
    """The worker running slice 4's stitch task (after stitching), a write block of slice 4 (after its first class
    layer), an image block of slice 3 (written, not yet recorded), or slice 2's pyramid task (after the upper levels
    of its first class layer) SIGKILLs itself once; Ray retries the task and the run ends with the uninterrupted
    output."""
    import os

    volume, args, ref = VOLUME, ARGS, "reference"
    if point.startswith("pyramid"):
        volume, args, ref = PYRAMID_VOLUME, PYRAMID_ARGS, "pyramid_reference"
        assert zarr.open_group(str(request.getfixturevalue(ref))).attrs["cellseg_batch"]["levels"] == 8
    out, killed = tmp_path / "out.zarr", tmp_path / "killed"
    cli("run", volume, *args, "--out", out, env={**os.environ, "CELLSEG_KILL_AFTER": point, "CELLSEG_KILL_ONCE": killed})
    assert killed.exists()  # the kill happened
    _assert_identical(out, request.getfixturevalue(ref))


@pytest.mark.slow
def test_losing_a_node_of_a_two_node_ray_cluster_mid_predict_does_not_change_the_result(reference, tmp_path,
                                                                                           monkeypatch):
    """A real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``, 2 CPUs each: 4 predictor
    actors); once actors run on both nodes and some slices are predicted, the second node is removed (its raylet
    and workers killed). Its actors cannot come back (the head's CPUs are its own actors'): the driver gives their
    batches to the head's actors (``PredictStage.worker_lost``), Ray retries tasks, and the run ends with the
    uninterrupted output."""
    from ray.cluster_utils import Cluster

    # the test's cluster and the run's driver without token auth (a driver given an address would use this
    # machine's token, which the test's cluster does not require: its actors then die unscheduled)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    ray_pids = {p.process.pid for ps in cluster.head_node.all_processes.values() for p in ps}
    proc = None
    try:
        node = cluster.add_node(num_cpus=2)
        ray_pids |= {p.process.pid for ps in node.all_processes.values() for p in ps}
        cluster.wait_for_nodes()

        def actors_on(n) -> list:
            raylet = psutil.Process(n.all_processes["raylet"][0].process.pid)
            return [c for c in raylet.children(recursive=True) if "PredictorWorker" in " ".join(c.cmdline())]

        out = tmp_path / "out.zarr"
        proc = _start(out, "--address", cluster.address)
        _wait_for(lambda: _slices_done(out) >= 2 and actors_on(node) and actors_on(cluster.head_node), proc)
        lost = [p.pid for p in actors_on(node)]
        cluster.remove_node(node, allow_graceful=False)
        assert _slices_done(out) < 16  # the node went in predict
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-5000:]
        assert "predict: a worker was lost" in stderr  # the driver gave the lost actors' batches to the others
        assert not _ray_processes_of(set(lost))
        _assert_identical(out, reference)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        cluster.shutdown()
    assert not _ray_processes_of(ray_pids), [p.name() for p in _ray_processes_of(ray_pids)]


def test_an_unfinished_run_of_older_linking_rules_is_relinked_with_its_predictions_kept(reference, tmp_path):
    """A run killed after prediction, whose work store says older stitching and linking rules made its rows (a
    cellseg-batch upgraded mid-run): the same command keeps every prediction and redoes stitching and linking,
    instead of mixing rows of two rule sets."""
    import os

    out = tmp_path / "out.zarr"
    proc = subprocess.run([sys.executable, "-m", "cellseg_batch", "run", VOLUME, *map(str, ARGS), "--out", str(out)],
                          env={**os.environ, "CELLSEG_KILL_AFTER": "link:1"}, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    run_json = Path(f"{out}.work") / "run.json"
    run = json.loads(run_json.read_text())
    del run["post_rules"]  # as a version before the rules were recorded wrote it
    run_json.write_text(json.dumps(run))
    cli("run", VOLUME, *ARGS, "--out", out)
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["mode"] == "reuse-predictions" and report["counts"]["tiles_predicted_now"] == 0
    assert any("stitched and linked by another cellseg-batch version" in w for w in report["warnings"])
    _assert_identical(out, reference)
