"""Faults: a damaged work store (truncated, garbage or missing files and chunks) is detected and recomputed, never
used; one writer per output (a lock; a stale one taken over); output paths that would harm an input are refused."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellseg_batch import cli
from cellseg_batch.errors import UserError
from cellseg_batch.run.lock import OutputLock, lock_path
from cellseg_batch.run.store import StoreDamage, WorkStore, save_npy
from cellseg_batch.stitch import FRAGMENT, PAIR, Fills, SliceStitch
from cellseg_batch.synth import CLASSES
from cellseg_batch.tiles import TileGrid
from conftest import cli as cli_subprocess
from conftest import labels_of

SETTINGS = settings(max_examples=10, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip

# a damage: (how much of the file is kept, garbage written over its start) -- (None, b""): the file is deleted
damages = st.one_of(
    st.just((None, b"")),
    st.floats(0.0, 0.95).map(lambda keep: (keep, b"")),
    st.binary(min_size=1, max_size=32).map(lambda junk: (1.0, junk)),
)


def _damage(path: Path, damage) -> None:
    keep, junk = damage
    if keep is None:
        path.unlink()
        return
    data = path.read_bytes()
    data = data[: int(len(data) * keep)]
    path.write_bytes(junk + data[len(junk) :] if junk else data)


def _store(tmp_path) -> tuple[WorkStore, TileGrid]:
    store, grid = WorkStore(tmp_path / "w"), TileGrid(64, 64, 32, 8)
    store.create(2, grid, 1)
    return store, grid


@SETTINGS
@given(damage=damages, which=st.sampled_from(["fragments", "lut", "instances", "edges", "objects", "link_stats"]))
def test_a_damaged_store_file_raises_store_damage_naming_it(tmp_path, damage, which):
    store, _ = _store(tmp_path)
    frag = np.zeros(3, FRAGMENT)
    frag["area"] = [5, 6, 7]
    writers = {  # what writes it, what reads it, the file, the slice whose predictions it holds
        "fragments": (lambda: save_npy(store.fragments_path(1), frag), lambda: store.fragments(1),
                      store.fragments_path(1), 1),
        "lut": (lambda: store.write_lut(1, np.arange(40, dtype=np.uint32)), lambda: store.lut(1), store.lut_path(1), None),
        "instances": (lambda: store.write_instances(1, np.arange(40)), lambda: store.instances(1),
                      store.instances_path(1), None),
        "edges": (lambda: store.write_edges(1, SliceStitch(np.zeros(3, PAIR), 4, Fills.empty()), np.zeros(0)),
                  lambda: store.edges(1),
                  store.edges_path(1), None),
        "objects": (lambda: save_npy(store.objects_path, np.arange(40)), store.objects, store.objects_path, None),
        "link_stats": (lambda: store.write_link_stats({"objects": 3, "fragments": 9}), store.link_stats,
                       store.link_stats_path, None),
    }  # fmt: skip
    write, read, path, z = writers[which]
    write()
    read()  # intact: loads
    _damage(path, damage)
    try:
        value = read()
    except StoreDamage as e:
        assert e.path == str(path) and e.z == z
    else:  # garbage over a JSON's or an npy's bytes may by chance still decode: then it must equal what was written
        assert damage[0] == 1.0 and damage[1], value


@SETTINGS
@given(damage=damages)
def test_a_damaged_tile_chunk_raises_store_damage_and_is_never_read_as_zeros(tmp_path, damage):
    store, grid = _store(tmp_path)
    from cellseg_batch.chunks import ChunkIO

    core = np.arange(grid.core_max**2, dtype=np.uint16).reshape(1, 1, grid.core_max, grid.core_max)
    ChunkIO(store.cores()).write((1, 0, 1, 0), core)
    chunk = store.cores_path / "1" / "0" / "1" / "0"
    _damage(chunk, damage)
    with pytest.raises(StoreDamage) as info:
        WorkStore(store.root).core(grid, 1, 1, 0, written=True)
    assert info.value.path == str(chunk) and info.value.z == 1
    # a tile without instances is never written: read as zeros where the caller does not know it was written
    assert not WorkStore(store.root).core(grid, 0, 0, 0).any()


@SETTINGS
@given(cut=st.integers(1, 200), junk=st.binary(max_size=40))
def test_a_log_cut_short_or_followed_by_garbage_keeps_its_good_records_and_takes_new_ones(tmp_path, cut, junk):
    store, _ = _store(tmp_path)
    log = store.fragments_log(0)
    log.unlink(missing_ok=True)
    rows = [np.zeros(n, FRAGMENT) for n in (1, 2, 3)]
    store.append_fragments(0, [((0, 0, i), r) for i, r in enumerate(rows)])
    data = log.read_bytes()
    log.write_bytes(data[: max(0, len(data) - cut)] + junk)  # the last record damaged
    good = store.read_fragment_log(0)
    assert list(good) == [(0, 0, i) for i in range(len(good))] and len(good) <= 2  # the records before the damage
    store.append_fragments(0, [((0, 1, 0), rows[0])])  # the tile predicted again, appended after the cut
    assert set(store.read_fragment_log(0)) == set(good) | {(0, 1, 0)}


def test_repair_forgets_the_damaged_slice_and_what_was_made_from_it(tmp_path):
    store, _ = _store(tmp_path)
    for z in (0, 1):
        save_npy(store.fragments_path(z), np.zeros(1, FRAGMENT))
    store.write_lut(0, np.arange(3))
    store.repair(StoreDamage(store.fragments_path(1), 1))
    assert store.slice_done(0) and not store.slice_done(1) and not store.lut_path(0).exists()


# -- the output lock -----------------------------------------------------------------------------------------------
HOLD = "import sys,time; from cellseg_batch.run.lock import OutputLock; OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def _holder(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path, capsys):
    out = tmp_path / "out.zarr"
    holder = _holder(out)
    try:
        with pytest.raises(Exception) as info:
            OutputLock(out).acquire()
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(info.value)
    finally:
        holder.send_signal(signal.SIGKILL)  # kill -9: no clean-up; the file and its record stay
        holder.wait()
    assert json.loads(lock_path(out).read_text())["pid"] == holder.pid
    with OutputLock(out) as lock:  # the kernel dropped the dead process's flock: taken over
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert not lock_path(out).exists()


def test_a_work_dir_another_run_is_using_is_refused_and_left_as_it_is(tmp_path, zarr_volume):
    """One --work-dir given to two runs (one scratch folder for a lab's jobs): the second is refused before it
    reads or deletes anything of the first's."""
    shared = tmp_path / "scratch"
    shared.mkdir()
    (shared / "run.json").write_text('{"first": 1}')
    holder = _holder(shared)  # the first run, holding the work dir
    try:
        second = cli_subprocess(*_labels_run(zarr_volume, tmp_path / "o.zarr", "--work-dir", shared), check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert f"another run (pid {holder.pid} on {socket.gethostname()}" in second.stderr and str(shared) in second.stderr
    assert (shared / "run.json").read_text() == '{"first": 1}'


def test_a_lock_recorded_by_another_host_is_refused_with_the_way_out(tmp_path):
    lock_path(tmp_path / "o.zarr").write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "then"}))
    with pytest.raises(Exception, match=r"node-17.*delete .*o\.zarr\.lock"):
        OutputLock(tmp_path / "o.zarr").acquire()


def test_a_lock_another_node_left_in_a_slurm_job_is_taken_over_by_the_same_job_only_where_slurm_can_tell(
        tmp_path, monkeypatch):  # fmt: skip
    """A requeued job takes over its own lock; another job's is refused where SLURM cannot be asked (no squeue:
    unknown is not ended). Taking over a job SLURM says ended: tests/test_cluster.py, on a real SLURM."""
    path = lock_path(tmp_path / "o.zarr")
    path.write_text(json.dumps({"host": "node-17", "pid": 4242, "since": "then", "slurm_job": "77"}))
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(Exception, match=r"pid 4242, SLURM job 77\) on host node-17.*delete"):
        OutputLock(tmp_path / "o.zarr").acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    with OutputLock(tmp_path / "o.zarr"):
        assert json.loads(path.read_text()) | {"since": "-"} == {"host": socket.gethostname(), "pid": os.getpid(),
                                                                 "since": "-", "slurm_job": "77"}  # fmt: skip


# -- output paths --------------------------------------------------------------------------------------------------
def _labels_run(volume: Path, out, *extra) -> list:
    return ["run", volume, "--predictor", "labels", "--labels", volume, "--classes", "cell", "--out", out, *extra]


@pytest.fixture
def zarr_volume(tmp_path) -> Path:
    zarr.create_array(str(tmp_path / "vol.zarr"), shape=(2, 32, 32), dtype="uint16", fill_value=0)
    return tmp_path / "vol.zarr"


@pytest.mark.parametrize("case,match", [
    ("inside", "lies inside the input"), ("holds", "lies inside --out"), ("symlink", "symbolic link"),
    ("work-inside", "--work-dir"), ("read-only", "cannot write beside"), ("work-foreign", "not a cellseg-batch work"),
])  # fmt: skip
def test_an_output_path_that_would_harm_an_input_or_cannot_be_written_is_refused(tmp_path, capsys, zarr_volume, case,
                                                                                  match):  # fmt: skip
    extra = []
    if case == "inside":
        out = zarr_volume / "seg.zarr"
    elif case == "holds":
        out = tmp_path
    elif case == "symlink":
        (tmp_path / "real.zarr").mkdir()
        out = tmp_path / "link.zarr"
        out.symlink_to(tmp_path / "real.zarr")
    elif case == "work-inside":
        out, extra = tmp_path / "o.zarr", ["--work-dir", zarr_volume / "w"]
    elif case == "work-foreign":  # a run deletes its work store when it ends: never a folder of the user's
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "thesis.tex").write_text("keep me")
        out, extra = tmp_path / "o.zarr", ["--work-dir", tmp_path / "mine"]
    else:
        out = Path("/sys/cellseg-out.zarr")  # a filesystem even root cannot create files in
        try:
            out.mkdir()
            out.rmdir()
            pytest.skip("/sys is writable here")
        except OSError:
            pass
    before = sorted(p for p in tmp_path.rglob("*"))
    rc = cli.main([str(a) for a in _labels_run(zarr_volume, out, *extra)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and match in err[0], err
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_a_damaged_run_json_starts_the_work_store_over_instead_of_trusting_what_is_left(tmp_path, zarr_volume):
    from cellseg_batch.config import RunConfig
    from cellseg_batch.run.job import Run

    cfg = RunConfig(str(zarr_volume), str(tmp_path / "o.zarr"), predictor="labels", labels=[str(zarr_volume)],
                    classes=["cell"])  # fmt: skip
    Run(cfg)._prepare()  # what a run does before its stages (no Ray needed): output and work store made
    store = WorkStore(f"{cfg.out}.work")
    save_npy(store.fragments_path(0), np.zeros(1, FRAGMENT))  # a slice an earlier run predicted...
    store.run_path.write_bytes(store.run_path.read_bytes()[:20])  # ...with settings no longer known
    again = Run(cfg)
    assert again._prepare() == "fresh"
    assert not store.slice_done(0) and any("run.json is damaged" in w for w in again.warnings)
    assert store.read_run() is not None


# -- end to end: Ray, zarr and the filesystem, all real --------------------------------------------------------------
VOLUME = "synth:5x160x160,seed=3"
ARGS = ["--predictor", "labels", "--labels", VOLUME, "--tile", 80, "--overlap", 16, "--no-progress", "--keep-tiles",
        "--num-cpus", 2]  # fmt: skip


def _result(out: Path) -> dict:
    return {**{n: labels_of(out, n) for n in CLASSES}, "table": (out / "cellseg" / "objects.csv").read_text()}


def test_a_corrupted_work_store_is_recomputed_to_the_clean_output_and_a_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "out.zarr"
    first = subprocess.Popen([sys.executable, "-m", "cellseg_batch", "run", VOLUME, *map(str, ARGS), "--out", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    t = time.monotonic()
    while not lock_path(out).exists():
        assert first.poll() is None and time.monotonic() - t < 120, first.communicate()
        time.sleep(0.02)
    # a second run on the same output while the first runs: refused, the first unharmed
    assert cli.main([str(a) for a in ["run", VOLUME, *ARGS, "--out", out]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"another run (pid {first.pid}" in err[0], err
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    clean = _result(out)

    store = WorkStore(f"{out}.work")
    frag0 = store.fragments_path(0)
    frag0.write_bytes(frag0.read_bytes()[: frag0.stat().st_size // 2])  # the case: half of the file
    chunks = sorted(p for p in store.cores_path.rglob("*") if p.is_file() and p.name[0].isdigit())
    by_slice = {int(p.relative_to(store.cores_path).parts[0]): p for p in chunks}
    by_slice[2].write_bytes(os.urandom(by_slice[2].stat().st_size))  # a garbage tile chunk (a missing one takes the
    # same way, from the same StoreDamage: test_a_damaged_tile_chunk_raises_store_damage_and_is_never_read_as_zeros)

    cli_subprocess("run", VOLUME, *ARGS, "--out", out, "--overwrite")  # re-merge from the kept predictions
    report = json.loads((out / "cellseg" / "report.json").read_text())
    again = " ".join(report["warnings"])
    assert str(frag0) in again and str(by_slice[2]) in again, report["warnings"]
    repaired = _result(out)
    for key, value in clean.items():
        assert np.array_equal(repaired[key], value) if key != "table" else repaired[key] == value, key


def test_sigterm_while_the_output_is_finished_leaves_it_complete_never_half_finished(tmp_path):
    from cellseg_batch.run.job import signals_held
    from cellseg_batch.write import Output

    def fresh(name: str) -> Output:
        out = Output(tmp_path / name)
        out.create((2, 32, 32), 16, ["cell"], None, None, {"version": "test"}, labels_dtype=np.uint32)
        return out

    previous = signal.signal(signal.SIGTERM, cli._terminate)  # what `cellseg-batch` installs: stop like Ctrl-C
    try:
        held = fresh("held.zarr")
        with signals_held() as arrived:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered now, while finalize is to run
            held.finalize(None)
        assert arrived == [signal.SIGTERM] and Output(held.path).status == "complete"
        assert zarr.open_group(str(held.path / "labels")).attrs["labels"] == ["cell"]
        bare = fresh("bare.zarr")  # without holding: stopped before it says complete, so it reads as incomplete
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            bare.finalize(None)
        assert Output(bare.path).status == "incomplete"
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def small_filesystem(tmp_path):
    """A 600 KiB tmpfs (root only: skipped where mounting is not allowed), unmounted afterwards."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_disk_full_while_writing_is_one_line_and_the_rerun_after_freeing_space_equals_a_clean_run(tmp_path,
                                                                                                small_filesystem):  # fmt: skip
    args = ["run", VOLUME, *ARGS]
    full = cli_subprocess(*args, "--out", small_filesystem / "o.zarr", check=False)
    assert full.returncode == 2 and "no space left on the device" in full.stderr and "Traceback" not in full.stderr
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_filesystem)], check=True)  # space freed
    cli_subprocess(*args, "--out", small_filesystem / "o.zarr")
    assert json.loads((small_filesystem / "o.zarr" / "cellseg" / "report.json").read_text())["mode"] == "resume"
    cli_subprocess(*args, "--out", tmp_path / "clean.zarr")
    resumed, clean = _result(small_filesystem / "o.zarr"), _result(tmp_path / "clean.zarr")
    assert all(np.array_equal(resumed[k], clean[k]) if k != "table" else resumed[k] == clean[k] for k in clean)


def test_a_filesystem_too_small_for_the_image_copy_is_said_at_the_start(small_filesystem):
    """A 4 x 512 x 512 uint8 volume's image copy takes about 1.4 MB with its pyramid: more than the 600 KiB free."""
    big = "synth:4x512x512,seed=3"
    args = ["run", big, "--predictor", "labels", "--labels", big, "--no-progress", "--num-cpus", 2]
    short = cli_subprocess(*args, "--out", small_filesystem / "o.zarr", check=False)
    assert "the image copy alone takes about 0.0014 GB" in short.stderr and "pass --no-image" in short.stderr
    assert short.stderr.index("the image copy alone") < short.stderr.index("no space left on the device")
    fits = cli_subprocess(*args, "--no-image", "--out", small_filesystem / "labels_only.zarr", check=False)
    assert "the image copy alone" not in fits.stderr


def test_a_missing_band_chunk_of_a_tile_with_fragments_is_damage_not_zeros(tmp_path):
    from cellseg_batch.chunks import ChunkIO

    store, grid = _store(tmp_path)
    bands = ChunkIO(store.bands())
    bands.write((1, 0, 1), np.ones(bands.chunks, np.uint16))
    store.check_bands(1, [(0, 1)])  # written: fine
    (store.bands_path / "1" / "0" / "1").unlink()
    with pytest.raises(StoreDamage) as info:
        store.check_bands(1, [(0, 1)])
    assert info.value.z == 1


@pytest.mark.parametrize("changed", ["volume", "labels"])
def test_an_input_rewritten_while_the_run_reads_it_is_not_finished_as_complete(tmp_path, monkeypatch, capsys, changed):
    """A copy over the volume or a tool saving into a label stack mid-run gave an output of old and new slices,
    status complete, exit 0. The inputs are checked again before the output is finished: a one-line error, and
    (a fresh run) nothing left that looks like a result."""
    import tifffile

    from cellseg_batch.run import job

    labels = np.zeros((4, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "volume.tif", np.where(labels > 0, 200, 30).astype(np.uint8), photometric="minisblack")
    drive = job.drive

    def drive_then_rewrite(*args, **kwargs):  # the run's stages, then the input saved again (a new mtime)
        drive(*args, **kwargs)
        path = tmp_path / f"{changed}.tif"
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))

    monkeypatch.setattr(job, "drive", drive_then_rewrite)
    out = tmp_path / "out.zarr"
    argv = ["run", tmp_path / "volume.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes",
            "cell", "--tile", 32, "--overlap", 8, "--out", out, "--no-progress"]  # fmt: skip
    capsys.readouterr()
    assert cli.main([str(a) for a in argv]) == 2
    said = {"volume": f"{tmp_path / 'volume.tif'} changed while the run read it",
            "labels": "an input of the predictor (a --labels stack, the model) changed while the run read it"}[changed]
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
    assert not out.exists()  # a fresh run: nothing that could pass for a result


def test_eval_into_a_full_disk_still_prints_its_scores_and_leaves_no_cut_off_file(tmp_path, small_filesystem):
    """--errors-png failing on a full disk lost the scores (nothing printed); --json left an invalid file cut at
    8192 bytes; both said to choose a folder one can write."""
    import tifffile

    gt = np.zeros((4, 64, 64), np.uint16)
    gt[:, 4:40, 4:40] = 1
    pred = gt.copy()
    pred[2:][pred[2:] == 1] = 2  # a split at z 2: a picture to draw
    tifffile.imwrite(tmp_path / "gt.tif", gt, photometric="minisblack")
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    filler = os.open(small_filesystem / "filler", os.O_WRONLY | os.O_CREAT)  # the disk full
    try:
        while os.write(filler, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(filler)
    done = cli_subprocess("eval", tmp_path / "pred.tif", tmp_path / "gt.tif", "--pred-classes", "cell", "--gt-classes",
                          "cell", "--errors-png", small_filesystem / "split.png", check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.search(r"^cell +\d", done.stdout, re.M) and "did not write" not in done.stdout, done.stdout  # the scores
    assert "cannot write --errors-png" in done.stderr and not (small_filesystem / "split.png").exists()
    done = cli_subprocess("eval", tmp_path / "pred.tif", tmp_path / "gt.tif", "--pred-classes", "cell", "--gt-classes",
                          "cell", "--json", small_filesystem / "e.json", check=False)  # fmt: skip
    assert done.returncode == 2 and "free some space" in done.stderr, done.stderr
    assert not (small_filesystem / "e.json").exists() and "cell" in done.stdout


def test_an_output_deleted_while_the_run_writes_it_is_one_line(tmp_path, monkeypatch, capsys):
    """rm -rf OUT mid-run ended in zarr's FileNotFoundError traceback."""
    import shutil

    from cellseg_batch.run import job

    drive = job.drive
    out = tmp_path / "out.zarr"

    def drive_then_delete(*args, **kwargs):
        drive(*args, **kwargs)
        shutil.rmtree(out)

    monkeypatch.setattr(job, "drive", drive_then_delete)
    capsys.readouterr()
    argv = ["run", "synth:2x96x96,seed=1", "--predictor", "labels", "--labels", "synth:2x96x96,seed=1", "--tile", 64,
            "--overlap", 16, "--out", out, "--no-progress"]  # fmt: skip
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"{out} was deleted or moved while the run used it" in err and "Traceback" not in err, err


@pytest.fixture
def immutable(tmp_path):
    """Files made undeletable (chattr +i: refused even to root, as a quota-locked or foreign-owned file is to a
    user), all of tmp_path made deletable again afterwards (a test may have moved them); skips where the filesystem
    or the user cannot set the flag."""

    def make(path: Path) -> Path:
        proc = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"chattr +i is not possible here: {proc.stderr.strip()}")
        return path

    yield make
    subprocess.run(["chattr", "-R", "-i", str(tmp_path)], capture_output=True)


def test_work_store_progress_that_cannot_be_deleted_is_refused_before_a_run_and_said_after_one(tmp_path, immutable,
                                                                                               caplog):  # fmt: skip
    """Stitch/link progress that stays after a reset would pass for the new run's: refused in one line. At the end of
    a complete run, a work store left behind (on a 2 TB volume, hundreds of GB of tiles) is said, not hidden."""
    store, _ = _store(tmp_path)
    (store.root / "post" / "stale").write_text("an earlier run's progress")
    immutable(store.root / "post" / "stale")
    assert store.reset(keep_predictions=True).startswith(f"{store.root / 'post' / 'stale'} (")
    with pytest.raises(UserError, match=r"cannot delete the work store's .*stale \(.*\); remove .* by hand"):
        store.clear(keep_predictions=True)

    out = tmp_path / "out.zarr"
    (Path(f"{out}.work") / "frag").mkdir(parents=True)
    (Path(f"{out}.work") / "frag" / "notes.txt").write_text("a user's file the run cannot delete")
    immutable(Path(f"{out}.work") / "frag" / "notes.txt")
    argv = ["run", "synth:2x96x96,seed=1", "--predictor", "labels", "--labels", "synth:2x96x96,seed=1", "--tile", 64,
            "--overlap", 16, "--out", out, "--no-progress"]  # fmt: skip
    code = cli.main([str(a) for a in argv])
    err = caplog.text
    assert code == 0, err
    assert "the output is complete, but the work store could not be deleted: " in err and f"remove {out}.work by hand" in err
    assert json.loads((out / "cellseg" / "report.json").read_text())["status"] == "complete"


def test_an_output_removal_stopped_part_way_leaves_no_half_output_and_the_rerun_completes(tmp_path, immutable):
    """--overwrite deletes the old output first. A stop in that delete (a time limit, kill -9) used to leave a folder
    without the output's attributes, refused as foreign even by --overwrite, whose report still said complete."""
    from cellseg_batch.write import Output

    out = tmp_path / "o.zarr"
    argv = [str(a) for a in ["run", "synth:2x96x96,seed=1", "--predictor", "labels", "--labels",
                             "synth:2x96x96,seed=1", "--tile", 64, "--overlap", 16, "--out", out, "--no-progress"]]  # fmt: skip
    assert cli.main(argv) == 0
    first = _result(out)
    stuck = immutable(out / "labels" / "cell" / "0" / "0")  # the delete stops here, part of the way through
    with pytest.raises(OSError):
        Output(out).remove()
    assert not out.exists()  # gone whole, at once: nothing left that could pass for an output
    subprocess.run(["chattr", "-i", str(Output(out).deleting_path / stuck.relative_to(out))], check=True)
    assert cli.main([*argv, "--overwrite"]) == 0
    again = _result(out)
    assert all(np.array_equal(again[k], v) if k != "table" else again[k] == v for k, v in first.items())
    assert not Output(out).deleting_path.exists()


def test_tiffs_of_a_stopped_export_are_not_left_beside_a_resumed_output(tmp_path):
    out = tmp_path / "o.zarr"
    argv = [str(a) for a in ["run", "synth:2x96x96,seed=1", "--predictor", "labels", "--labels",
                             "synth:2x96x96,seed=1", "--tile", 64, "--overlap", 16, "--out", out, "--no-progress"]]  # fmt: skip
    assert cli.main([*argv, "--export-tiff"]) == 0
    meta = out / "cellseg"
    assert sorted(p.name for p in meta.glob("labels_*.tif")) == sorted(f"labels_{n}.tif" for n in CLASSES)
    # a run stopped in its export: one TIFF whole, one cut off, the output not finished
    root = zarr.open_group(str(out), mode="r+")
    root.attrs["cellseg_batch"] = {**root.attrs["cellseg_batch"], "status": "incomplete"}
    (meta / f"labels_{CLASSES[1]}.tif").write_bytes(b"")
    assert cli.main(argv) == 0  # resumed without --export-tiff
    assert not list(meta.glob("labels_*.tif*"))
    assert "tiff" not in json.loads((meta / "report.json").read_text())


def test_one_work_dir_for_two_outputs_is_refused_and_an_unfinished_output_names_its_own(tmp_path):
    """A lab's scratch folder given as --work-dir to a second output started the first output's kept tiles over, or
    took them and deleted them at its end; an unfinished output rerun with another --work-dir (or none) was started
    over, its predictions made again, its work store left behind unmentioned."""
    work = tmp_path / "W"
    small = ["--tile", 64, "--overlap", 16, "--no-progress"]
    cli_subprocess("run", VOLUME, *ARGS, "--out", tmp_path / "x.zarr", "--work-dir", work)  # kept, with --keep-tiles
    kept = sorted(p.relative_to(work) for p in work.rglob("*"))
    for volume in (VOLUME, "synth:2x96x96,seed=1"):  # the same predictions (reused) or others (started over)
        second = cli_subprocess("run", volume, "--predictor", "labels", "--labels", volume, *small,
                                "--out", tmp_path / "y.zarr", "--work-dir", work, check=False)  # fmt: skip
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr
        assert f"{work} holds the work of another output, {tmp_path / 'x.zarr'}; give this run its own --work-dir" \
            in second.stderr, second.stderr
        assert sorted(p.relative_to(work) for p in work.rglob("*")) == kept

    killed = cli_subprocess("run", VOLUME, *ARGS, "--out", tmp_path / "k.zarr", check=False,
                            env={**os.environ, "CELLSEG_KILL_AFTER": "write:1"})  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    elsewhere = cli_subprocess("run", VOLUME, *ARGS, "--out", tmp_path / "k.zarr", "--work-dir", tmp_path / "W2",
                               check=False)  # fmt: skip
    assert elsewhere.returncode == 2 and (
        f"k.zarr is unfinished and its run keeps its work in {tmp_path / 'k.zarr.work'}: run again with --work-dir "
        in elsewhere.stderr), elsewhere.stderr
    cli_subprocess("run", VOLUME, *ARGS, "--out", tmp_path / "k.zarr")  # where it was: resumed to complete
    assert json.loads((tmp_path / "k.zarr" / "cellseg" / "report.json").read_text())["mode"] == "resume"
