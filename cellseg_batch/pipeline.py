"""The run: read -> tile -> predict -> stitch -> link -> write, resumable, on a local or joined Ray cluster.

Stages and where they run:
  predict   Ray actors (one per GPU, or CPU actors): tile windows -> tile labels in the work store
  stitch    Ray tasks per tile row, as soon as a slice and the next are predicted: matches and z-overlaps
  link      the driver, streaming slice by slice over the work store: 2D instances, z links, object ids
  write     Ray tasks per tile row, then per slice: label chunks, image copy, pyramid levels
  finish    the driver: object table, preview, report, then the NGFF metadata that marks the output complete
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import __version__, distribute
from .errors import UserError
from .link import build_objects
from .normalize import Normalization, estimate
from .predict import PREDICTORS, Plan
from .read import Volume, open_volume
from .stitch import stitch_row, tile_starts
from .store import WorkStore, save_npy, save_npz
from .tiles import TileGrid, TileKey
from .write import Output, check_class_names

log = logging.getLogger("cellseg_batch")


@dataclass
class RunConfig:
    volume: str
    out: str
    predictor: str = "detectron2"
    model: str | None = None
    labels: list[str] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    tile: int | None = None
    overlap: int | None = None
    batch_size: int = 4
    actors: int | None = None
    cpus_per_actor: int | None = None
    device: str = "auto"
    score_threshold: float | None = None
    amp: bool = False
    stitch_iou: float = 0.5
    link: str = "overlap"
    link_iou: float = 0.25
    link_ioa: float = 0.5
    slices: str | None = None
    pixel_size: str | None = None
    normalization: str | None = None
    write_image: bool = True
    export_tiff: bool = False
    overwrite: bool = False
    work_dir: str | None = None
    keep_tiles: bool = False
    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    progress: bool = True
    verbose: bool = False


def _parse_floats(text: str, n: int, option: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise UserError(f"{option} {text!r}: give {n} comma-separated numbers")
    return values


def _slice_range(text: str | None, nz: int) -> tuple[int, int]:
    if not text:
        return 0, nz
    try:
        a, b = text.split(":")
        z0, z1 = int(a or 0), int(b or nz)
    except ValueError:
        raise UserError(f"--slices {text!r}: give START:STOP, e.g. 0:100") from None
    if not 0 <= z0 < z1 <= nz:
        raise UserError(f"--slices {text!r} is outside the volume's {nz} slices")
    return z0, z1


def _fingerprint(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _volume_identity(volume: Volume) -> list:
    p = Path(volume.path)
    stat = [p.stat().st_size, p.stat().st_mtime_ns] if p.exists() and p.is_file() else []
    return [str(p.resolve()) if p.exists() else volume.path, list(volume.shape), str(volume.dtype), *stat]


def _check_options(cfg: RunConfig) -> None:
    for name in ("stitch_iou", "link_iou", "link_ioa"):
        value = getattr(cfg, name)
        if not 0.0 < value <= 1.0:
            raise UserError(f"--{name.replace('_', '-')} {value} must be in (0, 1]")
    if cfg.link not in ("overlap", "none"):
        raise UserError(f"--link {cfg.link!r}: choose overlap or none")
    if cfg.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if cfg.predictor not in PREDICTORS:
        raise UserError(f"unknown predictor {cfg.predictor!r}; choose one of {', '.join(sorted(PREDICTORS))}")


class Run:
    """One invocation of ``cellseg-batch run``: settles the plan, then drives the stages."""

    def __init__(self, cfg: RunConfig):
        _check_options(cfg)
        self.cfg = cfg
        self.timer = distribute.Timer()
        self.volume = open_volume(cfg.volume)
        self.z0, self.z1 = _slice_range(cfg.slices, self.volume.shape[0])
        self.shape = (self.z1 - self.z0, *self.volume.shape[1:])
        self.plan: Plan = PREDICTORS[cfg.predictor].plan(cfg, self.volume)
        self.classes = self.plan.classes
        check_class_names(self.classes)
        self.grid = TileGrid(self.shape[1], self.shape[2], self.plan.tile, self.plan.overlap)
        self.warnings: list[str] = []
        self.pixel_size = self._pixel_size()
        self.output = Output(cfg.out)
        if not cfg.volume.startswith("synth:") and Path(cfg.out).resolve() == Path(cfg.volume).resolve():
            raise UserError("--out must differ from the input volume")
        self.store = WorkStore(cfg.work_dir or f"{cfg.out.rstrip('/')}.work")
        self.normalization: Normalization | None = None
        self.counts: dict = {}

    def _pixel_size(self) -> tuple[float, float, float] | None:
        """--pixel-size, else what the file records, completed by the model's; checked against the model's."""
        model = self.plan.pixel_size_nm
        if self.cfg.pixel_size:
            size = _parse_floats(self.cfg.pixel_size, 3, "--pixel-size")
        else:
            recorded = self.volume.pixel_size_nm or (None, None, None)
            size = tuple(v if v is not None else m for v, m in zip(recorded, model or (None, None, None)))
            if all(v is None for v in size):
                return None
            if size[0] is None:
                self.warnings.append("the volume does not record its z spacing; pass --pixel-size Z,Y,X")
                size = (size[1], size[1], size[2])
        if model and abs(size[2] - model[2]) > 0.1 * model[2]:
            self.warnings.append(
                f"the volume's pixel size ({size[2]:g} nm) differs from the model's ({model[2]:g} nm); tiles are not "
                "resized, so resample the volume to the model's pixel size for reliable results"
            )
        return size

    # -- resume / overwrite -------------------------------------------------------------------------------------
    def _prepare(self) -> str:
        cfg = self.cfg
        if self.plan.needs_image:
            if cfg.normalization:
                low, high = _parse_floats(cfg.normalization, 2, "--normalization")
                if high <= low:
                    raise UserError(f"--normalization {cfg.normalization}: HIGH must exceed LOW")
                self.normalization = Normalization(low, high, (float("nan"), float("nan")))
            else:
                with self.timer("normalize"):
                    self.normalization = estimate(self.volume, self.plan.percentiles)
        predict_key = {
            "volume": _volume_identity(self.volume), "slices": [self.z0, self.z1], "predictor": self.cfg.predictor,
            "plan": self.plan.identity, "options": {k: v for k, v in self.plan.spec.options.items() if k != "layers"},
            "tile": self.grid.tile, "overlap": self.grid.overlap, "classes": self.classes,
            "normalization": self.normalization.to_dict() if self.normalization else None,
        }  # fmt: skip
        predict_fp = _fingerprint(predict_key)
        post_fp = _fingerprint([predict_fp, cfg.stitch_iou, cfg.link, cfg.link_iou, cfg.link_ioa, cfg.write_image])
        previous = self.store.read_run()
        out, resume = self.output, False
        if out.exists:
            status = out.status
            if status is None:
                raise UserError(f"{cfg.out} exists and is not a cellseg-batch output; choose another --out")
            if status == "complete" and not cfg.overwrite:
                raise UserError(f"{cfg.out} already holds a complete result; pass --overwrite to replace it")
            resume = status == "incomplete" and bool(previous) and previous.get("post_fp") == post_fp
            if status == "incomplete" and previous and not resume and not cfg.overwrite:
                raise UserError(
                    f"{cfg.out} holds an unfinished run with other settings; rerun it with its own settings to "
                    "resume, or pass --overwrite to start over"
                )
            if not resume:
                out.remove()
        keep_predictions = bool(previous) and previous.get("predict_fp") == predict_fp
        if previous and not resume:
            self.store.reset(keep_predictions=keep_predictions)
        mode = "resume" if resume else ("reuse-predictions" if keep_predictions else "fresh")
        self.store.create(self.shape[0], self.grid, len(self.classes))
        self.store.write_run({"predict_fp": predict_fp, "post_fp": post_fp, "config": asdict(cfg),
                              "grid": asdict(self.grid), "classes": self.classes})  # fmt: skip
        if not out.exists:
            out.create(
                self.shape, self.grid.stride, self.classes, self.volume.dtype if cfg.write_image else None,
                self.pixel_size, {"version": __version__, "volume": cfg.volume, "slices": [self.z0, self.z1]},
            )  # fmt: skip
        return mode

    # -- stages -------------------------------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        mode = self._prepare()
        log.info("%s: %s, %d slices of %dx%d, %d tiles per slice (tile %d, overlap %d), classes %s", mode,
                 cfg.volume, *self.shape, len(self.grid), self.grid.tile, self.grid.overlap, ", ".join(self.classes))  # fmt: skip
        try:
            distribute.start(cfg.address, cfg.num_cpus, cfg.num_gpus, cfg.verbose)
            report = self._stages(mode, t_start)
        except UserError:
            if mode == "fresh":  # bad input found mid-run: leave nothing that could pass for a result
                self.output.remove()
                self.store.reset(keep_predictions=False)
            raise
        finally:
            distribute.stop()
        if not cfg.keep_tiles:
            self.store.reset(keep_predictions=False)
        return report

    def _stages(self, mode: str, t_start: float) -> dict:
        self.resources = distribute.cluster_resources()
        self._predict_and_stitch()
        with self.timer("link"):
            table, stats = self._link()
        with self.timer("write"):
            self._write(table)
        with self.timer("finish"):
            return self._finish(table, stats, mode, time.perf_counter() - t_start)

    def _bar(self, total: int, desc: str, unit: str, initial: int = 0):
        from tqdm import tqdm

        interactive = sys.stderr.isatty()
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not self.cfg.progress,
                    mininterval=0.5 if interactive else 30, dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def _actor_layout(self) -> tuple[int, float, float, int]:
        """(actors, cpus each, gpus each, torch threads each)."""
        res = self.resources
        if self.cfg.device.startswith("cuda") and not res["gpus"]:
            raise UserError(f"--device {self.cfg.device}: the Ray cluster has no GPU; use --device cpu or auto")
        gpus = res["gpus"] if self.plan.uses_gpu and self.cfg.device != "cpu" else 0
        if gpus:
            count = self.cfg.actors or gpus
            cpus = self.cfg.cpus_per_actor or max(1, min(4, res["cpus_per_gpu"]))
            return count, cpus, 1, cpus
        if self.plan.needs_image:  # CPU inference: few actors with several torch threads each (up to 8)
            cpus = self.cfg.cpus_per_actor or max(1, min(8, res["max_node_cpus"]))
            count = self.cfg.actors or max(1, res["cpus"] // cpus)
            return count, cpus, 0, cpus
        count = self.cfg.actors or max(1, res["cpus"])
        return count, self.cfg.cpus_per_actor or 1, 0, 1

    def _predict_and_stitch(self) -> None:
        nz = self.shape[0]
        store, grid = self.store, self.grid
        records = {z: store.read_records(z) for z in range(nz) if not store.slice_done(z)}
        batches = []
        for z, done in records.items():
            todo = [p for p in grid.positions() if TileKey(z, *p) not in done]
            batches += [(z, todo[i : i + self.cfg.batch_size]) for i in range(0, len(todo), self.cfg.batch_size)]
        remaining = {z: len(grid) - len(done) for z, done in records.items()}
        for z in [z for z, n in remaining.items() if n == 0]:  # killed between the last record and the table
            store.complete_slice(z, records.pop(z))
            del remaining[z]
        n_tiles = nz * len(grid)
        self.counts["tiles"] = n_tiles
        self.counts["tiles_predicted_now"] = sum(len(b[1]) for b in batches)
        stitched = {z for z in range(nz) if store.post(f"edges/z{z:06d}.npz").exists()}
        rows: dict[int, list] = defaultdict(list)
        sched = distribute.Scheduler()
        stitch_task = distribute.remote_task(_stitch_row_task)
        stitch = distribute.TaskQueue(
            sched, lambda item: stitch_task.remote(str(store.root), grid, *item, self.cfg.stitch_iou),
            limit=2 * max(1, self.resources["cpus"]),
        )  # fmt: skip
        bar = self._bar(n_tiles, "predict", "tile", initial=n_tiles - self.counts["tiles_predicted_now"])
        stitch_bar = self._bar(nz, "stitch", "slice", initial=len(stitched))
        queued = set(stitched)

        def stitch_ready(z: int) -> bool:
            return z not in queued and store.slice_done(z) and (z + 1 == nz or store.slice_done(z + 1))

        def on_stitched(z: int, result: dict) -> None:
            rows[z].append(result)
            if len(rows[z]) == grid.ny:
                parts = rows.pop(z)
                save_npz(
                    store.post(f"edges/z{z:06d}.npz"),
                    pairs=np.concatenate([r["pairs"] for r in parts]),
                    overlaps=np.concatenate([r["overlaps"] for r in parts]),
                    touching_unmatched=np.array(sum(r["touching_unmatched"] for r in parts)),
                )
                stitch_bar.update(1)

        def queue_stitch(z: int) -> None:
            queued.add(z)
            for iy in range(grid.ny):
                stitch.put((z, iy, z + 1 < nz), lambda result, z=z: on_stitched(z, result))

        def on_predicted(z: int, results) -> None:
            self._arrivals.append((time.perf_counter(), len(results)))
            store.append_records(z, results)
            for key, table in results:
                records[z][TileKey(*key)] = table
            remaining[z] -= len(results)
            bar.update(len(results))
            if remaining[z] == 0:
                store.complete_slice(z, records.pop(z))
                for zz in (z - 1, z):
                    if zz >= 0 and stitch_ready(zz):
                        queue_stitch(zz)

        for z in range(nz):
            if stitch_ready(z):
                queue_stitch(z)
        self._arrivals: list[tuple[float, int]] = []
        with self.timer("predict"):
            if batches:
                self._run_actors(batches, on_predicted, stitch, sched)
        with self.timer("stitch_after_predict"):
            while stitch.busy:
                stitch.pump()
                sched.wait()
        bar.close()
        stitch_bar.close()
        missing = [z for z in range(nz) if not store.post(f"edges/z{z:06d}.npz").exists()]
        if missing:
            raise RuntimeError(f"slices {missing[:5]} were not stitched")

    def _run_actors(self, batches: list, on_predicted, stitch, sched) -> None:
        """Predict the batches on a pool of actors, two calls in flight per actor (one reads while the other
        computes), stitching finished slices on the side; the actors are killed at the end to free their cores."""
        import ray

        count, cpus, gpus, threads = self._actor_layout()
        job = distribute.TileJob(self.plan.spec, self.volume, self.normalization, self.grid, str(self.store.root),
                                 self.z0, threads)  # fmt: skip
        actors = distribute.make_actors(job, count, cpus, gpus)
        self.counts["actors"] = {"count": count, "cpus_each": cpus, "gpus_each": gpus}
        load = [0] * count  # calls in flight per actor: two keep it busy (one queued behind the running one)
        queue = list(reversed(batches))
        try:
            distribute.wait_started(actors, float(os.environ.get("CELLSEG_ACTOR_START_TIMEOUT", 600)))
            while queue or any(load):
                while queue and min(load) < 2:
                    a = load.index(min(load))
                    z, positions = queue.pop()
                    load[a] += 1

                    def done(results, z=z, a=a):
                        load[a] -= 1
                        on_predicted(z, results)

                    sched.submit(actors[a].predict.remote(z, positions), done)
                stitch.pump()
                sched.wait()
        finally:
            for actor in actors:
                ray.kill(actor)

    def _link(self):
        objects_path = self.store.post("objects.npy")
        stats_path = self.store.post("link_stats.json")
        if objects_path.exists() and stats_path.exists():
            from .link import LinkStats

            return np.load(objects_path), LinkStats(**json.loads(stats_path.read_text()))
        bar = self._bar(self.shape[0], "link", "slice")
        table, stats = build_objects(self.store, self.grid, self.shape[0], len(self.classes), self.cfg.link,
                                     self.cfg.link_iou, self.cfg.link_ioa, progress=bar)  # fmt: skip
        bar.close()
        save_npy(objects_path, table)
        stats_path.write_text(json.dumps(asdict(stats)))
        return table, stats

    def _write(self, table) -> None:
        nz, grid, store, out = self.shape[0], self.grid, self.store, str(self.output.path)
        write_task = distribute.remote_task(_write_row_task)
        pyramid_task = distribute.remote_task(_pyramid_task)
        volume = self.volume if self.cfg.write_image else None
        todo = [z for z in range(nz) if not store.marked("pyramid", z)]
        bar = self._bar(nz, "write", "slice", initial=nz - len(todo))
        sched = distribute.Scheduler()
        limit = 2 * max(1, self.resources["cpus"])
        rows = distribute.TaskQueue(
            sched, lambda item: write_task.remote(str(store.root), out, grid, *item, self.classes, volume, self.z0),
            limit,
        )  # fmt: skip
        pyramids = distribute.TaskQueue(sched, lambda z: pyramid_task.remote(out, z), limit)
        rows_left = {}

        def pyramid_done(z: int) -> None:
            store.mark("pyramid", z)
            bar.update(1)

        def row_done(z: int) -> None:
            rows_left[z] -= 1
            if rows_left[z] == 0:
                store.mark("written", z)
                pyramids.put(z, lambda _, z=z: pyramid_done(z))

        for z in todo:
            if store.marked("written", z):
                pyramids.put(z, lambda _, z=z: pyramid_done(z))
                continue
            frag = store.fragments(z)
            lut = np.load(store.post(f"lut/z{z:06d}.npy"))
            start = tile_starts(frag, grid)
            rows_left[z] = grid.ny
            for iy in range(grid.ny):
                luts = [np.concatenate([[0], lut[start[i] : start[i + 1]]]).astype(np.uint64)
                        for i in range(iy * grid.nx, (iy + 1) * grid.nx)]  # fmt: skip
                rows.put((z, iy, luts), lambda _, z=z: row_done(z))
        while rows.busy or pyramids.busy:
            pyramids.pump()
            rows.pump()
            sched.wait()
        bar.close()

    def _finish(self, table, stats, mode: str, elapsed: float) -> dict:
        from .preview import render_output

        out, cfg = self.output, self.cfg
        out.write_table(table, self.classes)
        touching = sum(int(np.load(self.store.post(f"edges/z{z:06d}.npz"))["touching_unmatched"])
                       for z in range(self.shape[0]))  # fmt: skip
        voxels = int(np.prod(self.shape))
        predict_s = self.timer.stages.get("predict", 0.0)
        report = {
            "cellseg_batch": __version__,
            "status": "complete",
            "mode": mode,
            "input": {"volume": cfg.volume, "shape": list(self.volume.shape), "dtype": str(self.volume.dtype),
                      "slices": [self.z0, self.z1], "pixel_size_nm": self.pixel_size},
            "config": asdict(cfg),
            "plan": {"predictor": cfg.predictor, "classes": self.classes, "tile": self.grid.tile,
                     "overlap": self.grid.overlap, "tiles_per_slice": len(self.grid),
                     "normalization": self.normalization.to_dict() if self.normalization else None},
            "cluster": self.resources,
            "counts": {
                **self.counts,
                "objects": stats.objects,
                "objects_per_class": {self.classes[int(c)]: n for c, n in stats.per_class.items()},
                "fragments": stats.fragments, "instances_2d": stats.instances_2d,
                "stitch_matches": stats.stitch_matches, "z_links": stats.links, "z_links_healed": stats.heal_links,
            },
            "merge_quality": {
                "touching_unmatched_at_tile_borders": touching,
                "max_tiles_per_2d_instance": stats.max_tiles_per_instance,
                "instances_spanning_more_than_4_tiles": stats.instances_over_4_tiles,
                "note": "touching_unmatched counts same-class fragments that touch across a tile border without "
                        "matching: possible splits. Raise --overlap if it is large.",
            },
            "time_s": {**{k: round(v, 3) for k, v in self.timer.stages.items()}, "total": round(elapsed, 3)},
            "throughput": {
                "tiles_per_s": round(self.counts["tiles_predicted_now"] / predict_s, 3) if predict_s else None,
                "tiles_per_s_steady": self._steady_rate(),
                "mvoxel_per_s_predict": round(voxels / 1e6 / predict_s, 3) if predict_s and mode == "fresh" else None,
                "mvoxel_per_s_total": round(voxels / 1e6 / elapsed, 3) if mode == "fresh" else None,
            },
            "versions": _versions(),
            "warnings": self.warnings,
        }  # fmt: skip
        render_output(out, out.meta_dir / "preview.png")
        if cfg.export_tiff:
            report["tiff"] = [str(p) for p in out.export_tiff(max_id=len(table))]
        out.write_report(report)
        out.finalize(self.pixel_size, self.z0)
        return report


    def _steady_rate(self) -> float | None:
        """Tiles per second from the first batch's result to the last: prediction without actor start-up."""
        a = getattr(self, "_arrivals", [])
        if len(a) < 3:
            return None
        return round(sum(n for _, n in a[1:]) / (a[-1][0] - a[0][0]), 3)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("numpy", "torch", "torchvision", "detectron2", "ray", "zarr", "tifffile"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


# -- worker functions (Ray tasks): each runs alone from paths and small arrays ------------------------------------


def _stitch_row_task(work_dir: str, grid: TileGrid, z: int, iy: int, next_slice: bool, iou_min: float) -> dict:
    return stitch_row(WorkStore(work_dir).tiles(), grid, z, iy, next_slice, iou_min)


def _write_row_task(work_dir, out_path, grid: TileGrid, z, iy, luts, classes, volume, z_offset) -> None:
    """Level 0 of one tile row: each tile's core, its fragment ids replaced by object ids, per class."""
    tiles = WorkStore(work_dir).tiles()
    out = Output(out_path)
    arrays = [out.labels(name, 0) for name in classes]
    image = out.image(0) if volume is not None else None
    for ix in range(grid.nx):
        window, core = grid.window(iy, ix), grid.core(iy, ix)
        ys, xs = core.relative_to(window)
        labels = np.asarray(tiles[z, iy, ix])[:, ys.start : ys.stop, xs.start : xs.stop]
        lut = luts[ix]
        for c, arr in enumerate(arrays):
            if labels[c].any():  # an empty chunk stays unwritten (reads as 0)
                arr[z, core.y0 : core.y1, core.x0 : core.x1] = lut[labels[c]]
        if image is not None:
            image[z, core.y0 : core.y1, core.x0 : core.x1] = volume.read(z_offset + z, *core)


def _pyramid_task(out_path: str, z: int) -> None:
    Output(out_path).build_pyramid(z)


def run(cfg: RunConfig) -> dict:
    return Run(cfg).execute()

