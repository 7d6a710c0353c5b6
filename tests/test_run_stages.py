"""The run's parts one at a time: the work store, the resume rule, the stage loop, bands, z-overlaps from memory,
the write stage's in-memory pyramid; and the --keep-tiles re-merge end to end."""

import importlib
import json
import sys

import numpy as np
import pytest

from cellseg_batch.errors import UserError
from cellseg_batch.predict import PredictorSpec, build_predictor
from cellseg_batch.read import open_label_layers
from cellseg_batch.run.job import POST_RULES, TILE_STORE, decide
from cellseg_batch.run.remote import PredictorWorker, TileJob, relabel_into, stitch_task
from cellseg_batch.run.stage import Local, Stage, drive
from cellseg_batch.run.store import WorkStore
from cellseg_batch.run.write import block_levels
from cellseg_batch.stitch import FRAGMENT, PAIR, ZOVERLAP, Fills, SliceStitch, match_tiles, stitch_slice, tile_bands
from cellseg_batch.tiles import EAST, NORTH, SOUTH, WEST, TileGrid
from cellseg_batch.write import Output, label_dtype
from conftest import cli, labels_of

SYNTH = "synth:4x300x260,seed=2"


# -- work store ---------------------------------------------------------------------------------------------------


def test_store_logs_round_trip_and_ignore_a_record_cut_short(tmp_path):
    store = WorkStore(tmp_path / "w")
    grid = TileGrid(100, 100, 64, 16)
    store.create(3, grid, 2)
    rows = np.zeros(3, FRAGMENT)
    rows["local"] = [1, 2, 3]
    store.append_fragments(0, [((0, 0, 0), rows), ((0, 0, 1), rows[:0])])
    store.append_fragments(0, [((0, 1, 0), rows[:1])])
    log = store.fragments_log(0)
    good = log.stat().st_size
    store.append_fragments(0, [((0, 1, 1), rows)])
    with open(log, "r+b") as f:  # a kill in the middle of the last append
        f.truncate(good + 40)
    records = store.read_fragment_log(0)
    assert sorted(records) == [(0, 0, 0), (0, 0, 1), (0, 1, 0)]
    assert records[(0, 0, 0)].tolist() == rows.tolist()
    store.complete_slice(0, records)
    assert store.slice_done(0) and not log.exists()
    assert store.fragments(0)["local"].tolist() == [1, 2, 3, 1]
    # z-overlap blocks are logged per tile position
    ov = np.zeros(2, ZOVERLAP)
    store.append_zoverlaps(1, [((1, 0, 1), ov), ((1, 1, 1), ov[:0])])
    assert sorted(store.read_zoverlaps(1)) == [(0, 1), (1, 1)]
    # logs of slices d >= 2 apart: read by gap units (workers), which read up to a cut and never write
    store.append_zoverlaps(1, [((1, 0, 1), ov)], d=2)
    far = store.zoverlaps_log(1, 2)
    good = far.stat().st_size
    store.append_zoverlaps(1, [((1, 1, 1), ov)], d=2)
    with open(far, "r+b") as f:
        f.truncate(good + 40)
    assert sorted(store.read_zoverlaps(1, 2)) == [(0, 1)] and far.stat().st_size == good + 40
    assert sorted(store.read_zoverlaps(1)) == [(0, 1), (1, 1)]  # each distance its own log
    store.write_edges(1, SliceStitch(np.zeros(0, PAIR), 3, Fills.empty()), ov)
    assert store.stitched(1) and not store.zoverlaps_log(1).exists()
    assert int(store.edges(1)["touching_unmatched"]) == 3


def test_store_log_is_data_only(tmp_path):
    store = WorkStore(tmp_path / "w")
    store.create(1, TileGrid(64, 64, 64, 16), 1)
    # a pickle where an npy record should be is not executed: the log simply ends there
    store.fragments_log(0).write_bytes(b"\x80\x04\x95" + b"cos\nsystem\n(S'touch /tmp/pwned'\ntR." * 3)
    assert store.read_fragment_log(0) == {}


def test_store_reset_keeps_predictions_only_when_asked(tmp_path):
    store = WorkStore(tmp_path / "w")
    store.create(2, TileGrid(64, 64, 64, 16), 1)
    store.complete_slice(0, {})
    store.mark("write", (0, 0, 0))
    store.reset(keep_predictions=True)
    assert store.slice_done(0) and (0, 0, 0) not in store.marks("write")
    store.reset(keep_predictions=False)
    assert not store.root.exists()


# -- the resume rule ----------------------------------------------------------------------------------------------


NOW = {"tile_store": TILE_STORE, "post_rules": POST_RULES}  # what this version records in run.json


def test_decide_fresh_resume_and_re_merge():
    prev = {"predict_fp": "P", "post_fp": "Q", **NOW}
    assert decide(None, False, None, "P", "Q", False, "o").mode == "fresh"
    d = decide("incomplete", True, prev, "P", "Q", False, "o")
    assert (d.mode, d.remove_output, d.forget) == ("resume", False, None)
    d = decide("complete", True, prev, "P", "Q2", True, "o")
    assert (d.mode, d.remove_output, d.forget) == ("reuse-predictions", True, "merge")
    d = decide("incomplete", True, prev, "P2", "Q2", True, "o")
    assert (d.mode, d.remove_output, d.forget) == ("fresh", True, "all")
    d = decide(None, False, prev, "P", "Q2", False, "o")  # output deleted by hand, predictions kept
    assert (d.mode, d.forget) == ("reuse-predictions", "merge")


@pytest.mark.parametrize("status,prev,overwrite,message", [
    (None, None, False, "not a cellseg-batch output"),
    ("complete", {"predict_fp": "P", "post_fp": "Q", **NOW}, False, "--overwrite"),
    ("incomplete", {"predict_fp": "P", "post_fp": "other", **NOW}, False,
     r"other settings; .* --overwrite to stitch, link and write again with these \(its predictions are kept\)"),
    ("incomplete", {"predict_fp": "P0", "post_fp": "other", **NOW}, False, "other settings; .* --overwrite to start over"),
    ("incomplete", {"predict_fp": "old", "post_fp": "other", **NOW, "tile_store": TILE_STORE - 1}, False,
     "another cellseg-batch version, whose tiles this one cannot read"),
])  # fmt: skip
def test_decide_refuses_what_it_must_not_touch(status, prev, overwrite, message):
    with pytest.raises(UserError, match=message):
        decide(status, True, prev, "P", "Q", overwrite, "o")


def test_a_refused_resume_names_the_options_that_changed_or_says_an_input_changed():
    from cellseg_batch.run.job import changed_settings

    before = {"config": {"tile": 64, "link_gap": "2", "num_cpus": 2, "volume": "v.tif"}}
    assert changed_settings(before, {"tile": 128, "link_gap": "2", "num_cpus": 4, "volume": "v.tif"}) == "--tile 64 -> 128"
    # the output's path spelt otherwise is the same output, not a changed option
    assert changed_settings({"config": {**before["config"], "out": "/abs/x.zarr"}},
                            {**before["config"], "out": "x.zarr", "tile": 128}) == "--tile 64 -> 128"  # fmt: skip
    assert "an input file was rewritten" in changed_settings(before, {**before["config"], "num_cpus": 8})
    # every option that changed, as the user types it; a switched-off feature by its --no- option
    six = {"tile": 128, "link_gap": "1", "stitch_iou": 0.6, "min_voxels": "10", "link_iou": 0.3, "write_image": False,
           "amp": True}  # fmt: skip
    before6 = {"config": {**before["config"], "stitch_iou": 0.5, "min_voxels": None, "link_iou": 0.25,
                          "write_image": True, "amp": False}}  # fmt: skip
    assert changed_settings(before6, {**before6["config"], **six}) == (
        "--tile 64 -> 128, --link-gap '2' -> '1', --stitch-iou 0.5 -> 0.6, --min-voxels None -> '10', "
        "--link-iou 0.25 -> 0.3, --no-image given, --amp given")
    assert changed_settings({"config": six}, before6["config"]).endswith("--no-image left out, --amp left out")
    with pytest.raises(UserError, match=r"other settings \(--tile 64 -> 128\)"):
        decide("incomplete", True, {"predict_fp": "P", "post_fp": "Q", **NOW}, "P2", "Q2", False, "o",
               changed_settings(before, {**before["config"], "tile": 128}))


def test_a_given_normalization_keeps_the_fingerprint_runs_before_its_report_fix_recorded():
    """--normalization's percentiles became None (NaN had made report.json invalid JSON); the fingerprint keeps
    the NaN of before, or every unfinished run of it was refused as 'other settings' after an upgrade."""
    from dataclasses import asdict

    from cellseg_batch.normalize import Normalization
    from cellseg_batch.run.job import _fingerprinted

    before = asdict(Normalization(10.0, 250.0, (float("nan"), float("nan")), invert=False))
    assert json.dumps(_fingerprinted(Normalization.fixed(10, 250))) == json.dumps(before)
    assert Normalization.fixed(10, 250).to_dict()["percentiles"] is None


def test_an_unfinished_run_that_predicted_nothing_starts_over_with_other_settings():
    """A run that stopped as its actors started (a model they could not load) left an unfinished output: the
    corrected command was refused unless given --overwrite, though nothing would be lost."""
    prev = {"predict_fp": "P", "post_fp": "Q", **NOW}
    with pytest.raises(UserError, match="other settings"):
        decide("incomplete", True, prev, "P2", "Q2", False, "o", predicted=True)
    d = decide("incomplete", True, prev, "P2", "Q2", False, "o", predicted=False)
    assert (d.mode, d.remove_output, d.forget) == ("fresh", True, "all")


FAILS_AS_IT_LOADS = """
from cellseg_batch.errors import UserError
from cellseg_batch.predict import register
from cellseg_batch.predict.labels_predictor import LabelsPredictor


@register("fails_as_it_loads")  # its plan is the labels predictor's, under this name
class FailsAsItLoads(LabelsPredictor):
    def __init__(self, *args, **kwargs):
        raise UserError("weights.pth cannot be loaded: a mistake found in the actor")
"""


def test_a_users_mistake_found_as_the_actors_start_is_one_line_and_the_corrected_run_is_not_refused(tmp_path):
    """A UserError raised as an actor builds its predictor (a model file the driver cannot check: cut weights) came
    out as Ray's traceback, and its unfinished output refused the corrected command. Actors beyond the local Ray's
    CPUs never started: the run waited 600 s in silence; they are refused at once."""
    import os

    import tifffile

    from conftest import cli

    (tmp_path / "fails_mod.py").write_text(FAILS_AS_IT_LOADS)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    tifffile.imwrite(tmp_path / "vol.tif", np.full((2, 64, 64), 90, np.uint8), photometric="minisblack")
    labels = np.zeros((2, 64, 64), np.uint16)
    labels[:, 8:30, 8:30] = 1
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    base = ["run", tmp_path / "vol.tif", "--labels", tmp_path / "lab.tif", "--classes", "cell", "--tile", 64,
            "--num-cpus", 2, "--out", tmp_path / "o.zarr", "--no-progress"]  # fmt: skip
    failed = cli(*base, "--predictor", "fails_mod:fails_as_it_loads", check=False, env=env)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 2 and last == "cellseg-batch: error: weights.pth cannot be loaded: a mistake found in the actor"
    assert "retries remaining" not in failed.stderr  # Ray's retries of the call each printed the traceback
    cli(*base, "--predictor", "labels", "--link-iou", 0.3, env=env)  # other settings: not refused
    crowded = cli(*base, "--predictor", "labels", "--actors", 3, "--overwrite", check=False, env=env, timeout=120)
    assert crowded.returncode == 2 and "need 3 CPUs, but the local Ray has 2" in crowded.stderr
    assert "e.g. --actors 2" in crowded.stderr


@pytest.mark.parametrize("made_with", [{"post_rules": POST_RULES - 1}, {}])  # older rules; a run.json before versions
def test_an_unfinished_run_of_older_linking_rules_keeps_its_predictions_and_redoes_the_rest(made_with):
    prev = {"predict_fp": "P", "post_fp": "Q", **made_with}
    d = decide("incomplete", True, prev, "P", "Q", False, "o")
    assert (d.mode, d.remove_output, d.forget) == ("reuse-predictions", True, "merge")


# -- the stage loop -----------------------------------------------------------------------------------------------


class _Squares(Stage):
    name, writes = "squares", ("square(i)",)

    def __init__(self, done: dict, n: int, limit: int):
        super().__init__()
        self.done, self.n, self.limit, self.started = done, n, limit, []

    def units(self):
        return range(self.n)

    def is_done(self, i):
        return i in self.done

    def start(self, i):
        import ray

        self.started.append(i)
        return ray.remote(lambda x: x * x).remote(i)

    def finish(self, i, result):
        self.done[i] = result


class _Sum(Stage):
    name, reads = "sum", ("square(i)",)

    def __init__(self, upstream: _Squares):
        super().__init__()
        self.upstream, self.total = upstream, None

    def units(self):
        return ["all"]

    def is_done(self, unit):
        return False

    def is_ready(self, unit):
        return not self.upstream.busy

    def start(self, unit):
        self.total = sum(self.upstream.done.values())
        return Local(None)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_drive_runs_each_unit_once_in_dependency_order_and_skips_done_ones(ray_local):
    squares = _Squares({0: 0, 3: 9}, 8, limit=3)  # units 0 and 3 done by an earlier run
    total = _Sum(squares)
    drive([squares, total])
    assert sorted(squares.started) == [1, 2, 4, 5, 6, 7]
    assert total.total == sum(i * i for i in range(8))
    assert not squares.busy and squares.in_flight == 0


def test_drive_raises_a_workers_error_and_a_stall(ray_local):
    class Failing(_Squares):
        def start(self, i):
            import ray

            def boom(_):
                raise UserError("bad tile")

            return ray.remote(boom).options(max_retries=0).remote(i)

    with pytest.raises(UserError, match="bad tile"):
        drive([Failing({}, 2, 1)])

    class Never(_Sum):
        def is_ready(self, unit):
            return False

    with pytest.raises(RuntimeError, match="no unit can start"):
        drive([Never(_Squares({}, 0, 1))])


# -- bands, z-overlaps, blocks --------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,tile,overlap", [((300, 260), 96, 16), ((300, 260), 64, 0), ((200, 90), 128, 32)])
def test_stitching_from_bands_matches_stitching_full_windows_in_the_band(shape, tile, overlap, tmp_path):
    """Bands hold exactly what matching needs: matches from stored bands are those of the whole windows' labels
    compared over the band both windows saw."""
    grid = TileGrid(*shape, tile, overlap)
    layers = open_label_layers([SYNTH], [])
    predictor = build_predictor(PredictorSpec("labels", {"layers": layers}))
    windows = {p: grid.window(*p) for p in grid.positions()}
    tiles = dict(zip(windows, predictor.predict(1, list(windows.values()))))
    store = WorkStore(tmp_path / "w")
    store.create(1, grid, len(predictor.classes))
    for (iy, ix), t in tiles.items():
        store.write_bands(0, iy, ix, tile_bands(t.labels, grid, iy, ix))
    stitched = stitch_slice(lambda iy: store.band_row(grid, 0, iy), grid, 0.5)
    assert stitched.fills.pixels == 0  # every tile saw the same labels: no tile missed what a neighbour saw
    pairs = stitched.pairs
    got = {(int(p["iy_a"]), int(p["ix_a"]), int(p["a"]), int(p["iy_b"]), int(p["ix_b"]), int(p["b"])) for p in pairs}
    want = set()
    for (iy, ix) in grid.positions():
        for jy, jx in grid.neighbours_after(iy, ix):
            sides = (EAST, WEST) if jy == iy else (SOUTH, NORTH)
            band = grid.band_box(iy, ix, sides[0]).intersect(grid.band_box(jy, jx, sides[1]))
            wa = band and windows[iy, ix].intersect(band)
            wb = band and windows[jy, jx].intersect(band)
            if wa is None or wb is None:
                continue
            la = tiles[iy, ix].labels[(slice(None), *wa.relative_to(windows[iy, ix]))]
            lb = tiles[jy, jx].labels[(slice(None), *wb.relative_to(windows[jy, jx]))]
            m = match_tiles(la, wa, lb, wb, 0.5)
            want |= {(iy, ix, int(a), jy, jx, int(b)) for a, b in m}
    assert got == want and len(got) > 0


def test_actor_counts_z_overlaps_from_memory_as_the_store_would(tmp_path):
    grid = TileGrid(300, 260, 128, 16)
    layers = open_label_layers([SYNTH], [])
    store = WorkStore(tmp_path / "w")
    store.create(3, grid, 4)
    job = TileJob(PredictorSpec("labels", {"layers": layers}), None, grid, str(store.root), 0, 1)
    worker = PredictorWorker(job)  # the actor's class, here in this process
    positions = list(grid.positions())
    first = worker.predict(0, positions)
    assert first["zoverlaps"] == []  # nothing before slice 0
    second = worker.predict(1, positions)
    assert sorted(k[1:] for k, _ in second["zoverlaps"]) == sorted(positions)
    from_memory = np.concatenate([rows for _, rows in second["zoverlaps"]])
    read_back = stitch_task(str(store.root), grid, 0, 0.5, True, [(*p, False, False) for p in positions])["overlaps"]
    assert from_memory.tolist() == read_back.tolist() and len(read_back) > 0
    # a slice out of order (an actor stole it) still pairs with what is held, in either direction
    third = worker.predict(2, positions[:1])
    assert [k for k, _ in third["zoverlaps"]] == [(1, *positions[0])]


def test_actor_counts_far_z_overlaps_from_the_runs_it_keeps_and_counts_what_it_keeps(tmp_path):
    # with gap edges up to 2 slices (reach 3) an actor also counts overlaps 2 and 3 slices apart, from the runs it
    # keeps of the older slices (their cores let go): they equal the overlaps of the stored cores
    from dataclasses import replace

    from cellseg_batch.stitch import zoverlaps

    grid, n = TileGrid(300, 260, 128, 16), 6
    layers = open_label_layers([f"synth:{n}x300x260,seed=2"], [])
    store = WorkStore(tmp_path / "w")
    store.create(n, grid, 4)
    job = TileJob(PredictorSpec("labels", {"layers": layers}), None, grid, str(store.root), 0, 1, reach=3)
    positions = list(grid.positions())
    worker, small = PredictorWorker(job), PredictorWorker(replace(job, cache_bytes=2**18))
    far = {}
    for z in range(n):
        for d, key, rows in worker.predict(z, positions)["far_zoverlaps"]:
            far[d, key] = rows
        small.predict(z, positions)
        for held in (worker.held, small.held):
            assert held.size == sum(e.nbytes() for e in held.cache.values())
        assert small.held.size <= 2**18 < worker.held.size  # the small one let go of what went over its budget
        assert all(e.core is None for (zz, _, _), e in worker.held.cache.items() if zz < z)  # runs only
        assert {zz for zz, _, _ in worker.held.cache} == set(range(max(0, z - 2), z + 1))
    assert sorted(far) == sorted((d, (z, *p)) for d in (2, 3) for z in range(n - d) for p in positions)
    for (d, (z, iy, ix)), rows in far.items():
        assert rows.tolist() == zoverlaps(store.core(grid, z, iy, ix), store.core(grid, z + d, iy, ix), iy, ix).tolist()
    assert sum(len(rows) for rows in far.values()) > 0


def test_write_levels_from_memory_equal_the_pyramid_built_level_by_level(tmp_path):
    rng = np.random.default_rng(0)
    shape, chunk = (1, 300, 200), 32
    labels = rng.integers(0, 5, shape[1:]).astype(np.uint32) * (rng.random(shape[1:]) < 0.3)
    image = rng.integers(0, 255, shape[1:]).astype(np.uint8)
    a, b = Output(tmp_path / "a.zarr"), Output(tmp_path / "b.zarr")
    for out in (a, b):
        out.create(shape, chunk, ["c"], np.uint8, None, {}, np.uint32)
    levels = a.info["levels"]
    assert levels == 5
    for y0 in range(0, 300, 128):  # blocks of 4 x 4 chunks fill 3 levels each
        for x0 in range(0, 200, 128):
            a.write_levels("c", 0, y0, x0, labels[y0 : y0 + 128, x0 : x0 + 128], 3)
            a.write_levels(None, 0, y0, x0, image[y0 : y0 + 128, x0 : x0 + 128], 3)
    a.build_pyramid(0, from_level=2)
    b.write_levels("c", 0, 0, 0, labels, 1)
    b.write_levels(None, 0, 0, 0, image, 1)
    b.build_pyramid(0)
    for level in range(levels):
        np.testing.assert_array_equal(a.labels("c", level)[:], b.labels("c", level)[:])
        np.testing.assert_array_equal(a.image(level)[:], b.image(level)[:])


@pytest.mark.parametrize("share", [0.0, 0.002, 0.05, 0.2, 1.0])  # empty, organelle-like .. dense: both lookups
def test_relabel_into_is_the_lut_of_the_ids_on_views_of_any_density(share):
    rng = np.random.default_rng(7)
    core = np.zeros((300, 310), np.uint16)
    labelled = rng.random(core.shape) < share
    core[labelled] = rng.integers(1, 50, int(labelled.sum()))
    lut = np.concatenate([[0], rng.integers(1, 2**31, 49)]).astype(np.uint32)
    block = np.full((400, 400), 99, np.uint32)
    ids, target = core[5:290, 7:300], block[20:305, 30:323]  # views, as a block's part of a core
    assert relabel_into(target, ids, lut) == bool(ids.any())
    assert np.array_equal(target, lut[ids] if ids.any() else np.full(ids.shape, 99))
    assert (block[:20] == 99).all() and (block[:, :30] == 99).all() and (block[305:] == 99).all()
    if ids.any():  # an id the lut does not hold is refused, never clipped
        ids[np.nonzero(ids)[0][0], np.nonzero(ids)[1][0]] = 50
        with pytest.raises(ValueError, match="has no object id"):
            relabel_into(target, ids, lut)


def test_block_levels_and_label_dtype():
    assert block_levels(512, 4) == 4  # 8 x 8 chunks of 512 px: a 4096 px block fills levels 0-3 from memory
    assert block_levels(1024, 4) == 3
    assert block_levels(256, 2) == 2
    assert block_levels(8192, 3) == 1  # a chunk is already a whole block
    assert label_dtype(2**32 - 1) == np.uint32 and label_dtype(2**32) == np.uint64


# -- re-merge with kept tiles, end to end -----------------------------------------------------------------------------


def test_keep_tiles_re_merges_without_predicting_and_equals_a_fresh_run(tmp_path):
    args = ["--predictor", "labels", "--labels", SYNTH, "--tile", 96, "--overlap", 16, "--no-progress"]
    out = tmp_path / "out.zarr"
    cli("run", SYNTH, *args, "--out", out, "--keep-tiles")
    cli("run", SYNTH, *args, "--out", out, "--keep-tiles", "--overwrite", "--link", "none")
    report = json.loads((out / "cellseg" / "report.json").read_text())
    assert report["mode"] == "reuse-predictions" and report["counts"]["tiles_predicted_now"] == 0
    assert report["output"]["label_dtype"] == "uint32"
    fresh = tmp_path / "fresh.zarr"
    cli("run", SYNTH, *args, "--out", fresh, "--link", "none")
    for name in ("cell", "mitochondrion"):
        np.testing.assert_array_equal(labels_of(out, name), labels_of(fresh, name))
    assert (out / "cellseg" / "objects.csv").read_text() == (fresh / "cellseg" / "objects.csv").read_text()


def test_each_stage_knows_its_done_units_from_the_work_store(tmp_path):
    """After a run kept its work store: every unit of every stage is done; remove one product and exactly the
    units that made it are to do again (the check functions a resume relies on)."""
    from cellseg_batch.config import RunConfig
    from cellseg_batch.run.job import Run

    out = tmp_path / "out.zarr"
    cli("run", SYNTH, "--predictor", "labels", "--labels", SYNTH, "--tile", 128, "--overlap", 16, "--out", out,
        "--keep-tiles", "--no-progress")  # fmt: skip
    run = Run(RunConfig(SYNTH, str(out), predictor="labels", labels=[SYNTH], tile=128, overlap=16))
    store, grid, nz = run.store, run.grid, run.shape[0]
    job = TileJob(run.plan.spec, run.volume, grid, str(store.root), 0, 1)
    from cellseg_batch.run.link import GapStage, LinkStage
    from cellseg_batch.run.predict import ActorStart, CpuTasks, PredictStage
    from cellseg_batch.run.stitch import StitchStage
    from cellseg_batch.run.write import PyramidStage, WriteStage

    def stages():
        predict = PredictStage(store, grid, nz, 4, ActorStart(job, (2, 1, 0), 60))
        tasks = CpuTasks(predict)
        stitch = StitchStage(store, grid, nz, 0.5, True, predict, 2, tasks)
        gaps = GapStage(store, grid, nz, 4, "overlap", run.link_rule, 2, tasks)
        link = LinkStage(store, grid, nz, 4, "overlap", run.link_rule, stitch, gaps)
        write = WriteStage(store, grid, nz, run.output, link, 2, tasks)
        return [predict, stitch, link, write, PyramidStage(store, nz, run.output, write, None, 2, tasks), gaps]

    for stage in stages():
        stage.plan()
        assert not stage.busy, stage.name
    from cellseg_batch.run.write import ImageStage

    def image_stage():
        predict = PredictStage(store, grid, nz, 4, ActorStart(job, (2, 1, 0), 60))
        write = WriteStage(store, grid, nz, run.output, None, 2, CpuTasks(predict))
        return ImageStage(store, nz, write, run.volume, 0, 2, CpuTasks(predict))

    image = image_stage()
    image.plan()
    assert image.total == nz * len(image.write.blocks) and not image.busy
    store.marker("image", (3, 0, 0)).unlink()
    image = image_stage()
    image.plan()
    assert list(image.todo) == [(3, 0, 0)] and image.is_ready((3, 0, 0))  # needs nothing from the other stages
    store.edges_path(2).unlink()
    store.marker("write", (1, 0, 0)).unlink()
    predict, stitch, link, write, pyramid, gaps = stages()
    for stage in (predict, stitch, link, write, pyramid, gaps):
        stage.plan()
    assert not predict.busy and list(stitch.todo) == [2] and list(write.todo) == [(1, 0, 0)]
    assert not gaps.busy  # counted from slices that do not change: a stitch redone gives the same edges
    assert not link.busy  # the object table is still there: only a changed merge setting redoes it
    assert stitch.is_ready(2) and write.is_ready((1, 0, 0))
    store.fragments_path(3).unlink()  # slice 3 lost its fragment table: its tiles are predicted again
    predict = stages()[0]
    predict.plan()
    assert predict.remaining == len(grid) and not stitch.is_ready(2)


def test_a_run_logged_to_a_file_says_its_progress_in_lines_not_bars(tmp_path):
    """stderr a file (a SLURM job's log): a line per stage as it ends, no carriage returns or cursor moves (tqdm's bars
    there held 53 lines of escapes for 17 of text)."""
    import subprocess

    out = tmp_path / "out.zarr"
    args = [sys.executable, "-m", "cellseg_batch", "run", SYNTH, "--predictor", "labels", "--labels", SYNTH, "--tile",
            "128", "--overlap", "16", "--out", str(out)]  # fmt: skip
    with (tmp_path / "log").open("w") as log:
        assert subprocess.run(args, stdout=log, stderr=log, timeout=300).returncode == 0
    text = (tmp_path / "log").read_text()
    assert "\r" not in text and "\x1b" not in text, text
    for stage in ("predict: 36 tiles done", "stitch: 4 units done", "write: ", "image: 4 units done"):
        assert f"INFO {stage}" in text, text


def test_a_run_stopped_after_linking_resumes_from_the_saved_object_table_and_counts(tmp_path):
    """A time limit that lands in the write stage (the longest on a big volume): the rerun reads the link stage's
    counts back from the work store. JSON made their class keys strings, and every such resume failed with a
    TypeError in the report."""
    import os
    import subprocess

    from cellseg_batch.link import LinkStats

    out = tmp_path / "out.zarr"
    args = [sys.executable, "-m", "cellseg_batch", "run", SYNTH, "--predictor", "labels", "--labels", SYNTH,
            "--tile", "128", "--overlap", "16", "--out", str(out), "--no-progress"]  # fmt: skip
    proc = subprocess.run(args, env={**os.environ, "CELLSEG_KILL_AFTER": "write:1"}, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    saved = WorkStore(str(out) + ".work").link_stats()
    stats = LinkStats.from_json(saved)
    assert stats.sharing_a_slice and all(isinstance(c, int) for c in stats.sharing_a_slice)
    assert json.loads(json.dumps(stats.__dict__, default=list)) == saved  # the same counts, only the keys typed
    cli("run", *args[4:])
    report = json.loads((out / "cellseg" / "report.json").read_text())
    names = [("cell", "mitochondrion", "alpha_granule", "canalicular_vessel")[c] for c in sorted(stats.sharing_a_slice)]
    assert report["mode"] == "resume" and list(report["counts"]["instances_2d_sharing_a_slice"]) == names


def test_a_predictor_from_outside_the_package_is_loaded_by_module_name(tmp_path, monkeypatch):
    """--predictor MODULE:NAME imports MODULE (which registers NAME); the spec tells workers to import it too."""
    from cellseg_batch.predict import resolve_predictor

    (tmp_path / "lab_predictors.py").write_text(
        "from cellseg_batch.predict import register\n"
        "from cellseg_batch.predict.labels_predictor import LabelsPredictor\n\n"
        "@register('lab_labels')\nclass LabPredictor(LabelsPredictor):\n    pass\n"
    )
    # not monkeypatch.syspath_prepend: it calls into pkg_resources, which an earlier test may have left half-imported
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    importlib.invalidate_caches()
    cls = resolve_predictor("lab_predictors:lab_labels")
    assert cls.__name__ == "LabPredictor" and cls.__module__ == "lab_predictors"
    assert resolve_predictor("lab_labels") is cls  # registered once, found by name from then on
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        resolve_predictor("no_such_module:x")
    with pytest.raises(UserError, match="unknown predictor 'nothing'"):
        resolve_predictor("lab_predictors:nothing")
