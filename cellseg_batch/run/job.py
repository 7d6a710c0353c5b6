"""The run job: settle the plan, decide fresh / resume / re-merge, drive the stages, then finish the output."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .. import __version__, distribute
from ..config import (
    RunConfig,
    check_output_path,
    check_run_config,
    option_change,
    parse_class_minimums,
    parse_normalization,
    parse_pixel_size,
    parse_slices,
)
from ..errors import UserError
from ..link import SHIFT_REACH, LinkRule
from ..normalize import Normalization, estimate
from ..predict import Plan, given, resolve_predictor
from ..read import ImageSequence, ZarrVolume, numbering_gaps, open_volume, volume_identity
from ..report_html import gallery_pictures, gallery_slices, write_html
from ..tiles import TileGrid
from ..write import Output, check_class_names
from .link import GapStage, LinkStage
from .lock import OutputLock
from .predict import ActorStart, CpuTasks, PredictStage
from .remote import TileJob
from .stage import LogProgress, drive
from .stitch import StitchStage
from .store import StoreDamage, WorkStore
from .write import ImageStage, PreviewStage, PyramidStage, WriteStage

log = logging.getLogger("cellseg_batch")
# --rescale refuses factors beyond this: a volume 8x finer or coarser than the model's training data is more likely
# a wrong pixel size in the file than data the model can see at all
MAX_ZOOM = 8.0


@dataclass(frozen=True)
class Decision:
    """What a run does with what an earlier run left: its mode, and what of it to throw away first."""

    mode: str  # "fresh", "resume" (same settings: continue), "reuse-predictions" (new merge settings)
    remove_output: bool
    forget: str | None  # None: keep the work store; "merge": forget stitch/link/write; "all": forget everything


# What the work store's rows were made by, recorded in run.json beside the fingerprints of the settings. Bump one
# where a change alters what its rows hold. TILE_STORE: the tiles' layout and content (an earlier run's predictions
# cannot be used). POST_RULES: the stitching, gap and linking rules (an unfinished run keeps its predictions and
# redoes the rest, instead of mixing rows of two rule sets). 2: gap edges realigned beside moved sections; 3: the
# class vote weighs runner-up classes; 4: misaligned sections realigned per class (the gap stage frees instances by
# it), object ids in the order of their boxes. Tile store 7: fragment rows hold each detection's runner-up class.
TILE_STORE, POST_RULES = 7, 4
VERSIONS_BEFORE_RECORDED = {"tile_store": 6, "post_rules": 1}  # what a run.json without them was made with


def made_by(previous: dict, key: str) -> int:
    return previous.get(key, VERSIONS_BEFORE_RECORDED[key])


# options that decide how a run goes, not what it computes: no fingerprint holds them
RUN_MECHANICS = frozenset({"overwrite", "progress", "verbose", "address", "num_cpus", "num_gpus", "actors",
                           "cpus_per_actor", "batch_size", "keep_tiles", "work_dir", "export_tiff"})


def changed_settings(previous: dict | None, config: dict) -> str:
    """What differs between an earlier run's recorded configuration and this one's, as options (for the message of
    a refused resume); where no option differs, an input was rewritten since (its identity is in the fingerprint)."""
    before = (previous or {}).get("config") or {}
    # the output itself is the one being resumed, however its path was spelt ('/abs/x.zarr' -> 'x.zarr')
    keys = [k for k in config if k in before and before[k] != config[k] and k not in RUN_MECHANICS | {"out"}]
    if not keys:
        return "the same options, but an input file was rewritten since"
    return ", ".join(option_change(k, before[k], config[k]) for k in keys)


def decide(output_status: str | None, output_exists: bool, previous: dict | None, predict_fp: str, post_fp: str,
           overwrite: bool, out: str, changed: str = "", predicted: bool = True) -> Decision:  # fmt: skip
    """The resume rule. ``output_status`` is the output's cellseg status (None where absent or not ours);
    ``predicted``: the work store holds predictions of some tile. An unfinished run that predicted nothing (it
    stopped as it started: a model its actors could not load, a wrong --device) is started over with any settings:
    nothing is lost, and refusing it made the corrected command ask for --overwrite."""
    resume = False
    keep_predictions = bool(previous) and previous.get("predict_fp") == predict_fp
    if output_exists:
        if output_status is None:
            raise UserError(f"{out} exists and is not a cellseg-batch output; choose another --out")
        if output_status == "complete" and not overwrite:
            raise UserError(f"{out} already holds a complete result; pass --overwrite to replace it")
        unfinished = output_status == "incomplete" and bool(previous)
        same_settings = unfinished and previous.get("post_fp") == post_fp
        resume = same_settings and made_by(previous, "post_rules") == POST_RULES
        if unfinished and not same_settings and not overwrite and predicted:
            if made_by(previous, "tile_store") != TILE_STORE:
                raise UserError(
                    f"{out} holds an unfinished run of another cellseg-batch version, whose tiles this one cannot "
                    "read; finish it with that version, or pass --overwrite to start over"
                )
            # where only stitching, linking or writing options changed (or their defaults, in a newer version),
            # --overwrite keeps the predictions: say so, it is the way on for most such cases
            raise UserError(
                f"{out} holds an unfinished run with other settings{f' ({changed})' if changed else ''}; rerun it "
                "with its own settings to resume, or pass --overwrite to "
                + ("stitch, link and write again with these (its predictions are kept)" if keep_predictions
                   else "start over")
            )
        # same settings, other stitching or linking rules (a newer cellseg-batch): predictions kept, the rest redone
    forget = None if resume or not previous else ("merge" if keep_predictions else "all")
    mode = "resume" if resume else ("reuse-predictions" if keep_predictions else "fresh")
    return Decision(mode, output_exists and not resume, forget)


def _nm(size) -> str:
    return ",".join(f"{v:g}" for v in size)


def image_copy_bytes(shape: tuple[int, int, int], dtype) -> int:
    """About what the output's image copy takes on disk: every level, each halving Y and X (4/3 of level 0), counted
    uncompressed (zstd-3 compressed the shared data's EM stacks 1.04-1.13x)."""
    return int(np.prod(shape, dtype=np.float64) * np.dtype(dtype).itemsize * 4 / 3)


def _fingerprinted(normalization: Normalization | None) -> dict | None:
    """The normalization as the fingerprint holds it: a given LOW,HIGH with its percentiles as NaN, as runs before
    ``Normalization.fixed`` recorded them, so that their unfinished runs still resume."""
    if normalization is None:
        return None
    record = normalization.to_dict()
    if record["percentiles"] is None:
        record["percentiles"] = (float("nan"), float("nan"))
    return record


def _fingerprint(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


# a class whose 2D instances share their slice with another of their object this often (of this many at least) is
# warned about as dense: the demo model's output has 2 of 339 (both vessel sections), `synth --linking`'s branched
# mitochondria and vessels about 30% (37 of 122 at 12 slices), the ISBI neurites 3345 of 3431 with the default rule
# and 507 of 3431 with --link-gap 0 --link-ioa 1.0 (at 25% it warned about the branched organelles, and its advice
# made them worse)
DENSE_SHARE, DENSE_MIN_INSTANCES = 0.5, 100


class Run:
    """One invocation of ``cellseg-batch run``: settles the plan, then drives the stages."""

    def __init__(self, cfg: RunConfig):
        check_run_config(cfg)
        self.cfg = cfg
        self.times: dict[str, float] = {}
        self._log_progress: LogProgress | None = None  # progress lines where stderr is a file
        self.inputs_read: list | None = None  # the inputs' identity when the run settled its plan (``_inputs``)
        self.volume = open_volume(cfg.volume)
        self.z0, self.z1 = parse_slices(cfg.slices, self.volume.shape[0])
        self.shape = (self.z1 - self.z0, *self.volume.shape[1:])
        predictor = resolve_predictor(cfg.predictor)
        self.plan: Plan = predictor.plan(cfg, self.volume)
        self.plan.spec = replace(self.plan.spec, module=predictor.__module__)  # the workers import it too
        self.warnings: list[str] = []
        if self.volume.rgb:
            self.warnings.append(f"{cfg.volume} is RGB: read as the mean of its R, G and B channels")
            log.warning(self.warnings[-1])
        if isinstance(self.volume, ZarrVolume) and self.volume.is_label_image and predictor.needs_image:
            self.warnings.append(f"{cfg.volume} is an OME-Zarr label image (image-label), a segmentation: it is "
                                 "segmented as an image. Give the image it labels (its OME-Zarr's root), or pass it "
                                 "with --predictor labels --labels to relink it")  # fmt: skip
            log.warning(self.warnings[-1])
        if isinstance(self.volume, ImageSequence) and (gaps := numbering_gaps(self.volume.files)):
            self.warnings.append(f"{cfg.volume}: {gaps}")
            log.warning(self.warnings[-1])
        self.pixel_size = self._pixel_size()
        if cfg.rescale:
            if not predictor.rescales:
                raise UserError(f"--rescale: the {predictor.name} predictor does not resize tiles")
            self.plan = predictor.rescaled(self.plan, self._zoom(), cfg)
        self.classes = self.plan.classes
        check_class_names(self.classes)
        self.link_rule = LinkRule(cfg.link_iou, cfg.link_ioa,
                                  parse_class_minimums(cfg.link_gap, self.classes, "--link-gap", most=3,
                                                       default=RunConfig.link_gap),
                                  parse_class_minimums(cfg.min_voxels, self.classes, "--min-voxels"),
                                  parse_class_minimums(cfg.min_slices, self.classes, "--min-slices", auto=True,
                                                       default=RunConfig.min_slices),
                                  tuple(self.plan.layer_of or ()))  # fmt: skip
        self.grid = TileGrid(self.shape[1], self.shape[2], self.plan.tile, self.plan.overlap)
        self.output = Output(cfg.out)
        inputs = [cfg.volume, *cfg.labels, *(c for c in cfg.classes if c.lower().endswith(".json")), cfg.model]
        check_output_path(cfg.out, inputs)
        self.store = WorkStore(cfg.work_dir or f"{cfg.out.rstrip('/')}.work")
        check_output_path(str(self.store.root), inputs, "--work-dir")
        if self.store.is_foreign():  # a run deletes its work store when it ends
            raise UserError(f"--work-dir {self.store.root} holds files that are not a cellseg-batch work store; give a "
                            "new or empty folder")  # fmt: skip
        self.normalization: Normalization | None = None
        self.counts: dict = {}
        self.resources: dict = {}
        self.stages: list = []
        self.steady: float | None = None
        self.ms_per_tile: dict[str, float] = {}
        self.tiles_over_time: list[list[float]] = []
        self.cpu_start = 0.0
        self.actors: ActorStart | None = None

    def _pixel_size(self) -> tuple[float, float, float] | None:
        """--pixel-size, else what the file records, completed by the model's; checked against the model's."""
        model = self.plan.pixel_size_nm
        if self.cfg.pixel_size:
            size = parse_pixel_size(self.cfg.pixel_size)
        else:
            recorded = self.volume.pixel_size_nm or (None, None, None)
            size = tuple(v if v is not None else m for v, m in zip(recorded, model or (None, None, None)))
            if all(v is None for v in size):
                return None
            if model and recorded[2] is None:  # most plain TIFF stacks: the model's size is a guess, say so
                self.warnings.append(f"{self.cfg.volume} records no pixel size: the output's metadata takes the "
                                     f"model's ({_nm(model)} nm); if its pixels are another size, pass --pixel-size "
                                     "Z,Y,X (and --rescale to resize them to the model's)")  # fmt: skip
                log.warning(self.warnings[-1])
            if size[0] is None:
                self.warnings.append(f"the volume does not record its z spacing: the output's metadata takes it equal "
                                     f"to its pixel size ({size[1]:g} nm), which EM sections rarely are; pass "
                                     f"--pixel-size Z,Y,X with the section thickness")  # fmt: skip
                log.warning(self.warnings[-1])
                size = (size[1], size[1], size[2])
        if model and abs(size[2] - model[2]) > 0.1 * model[2] and not self.cfg.rescale:
            self.warnings.append(
                f"the volume's pixel size ({size[2]:g} nm) differs from the model's ({model[2]:g} nm); tiles are not "
                "resized: pass --rescale to resize them to the model's pixel size"
            )
            log.warning(self.warnings[-1])
        return size

    def _zoom(self) -> tuple[float, float]:
        """--rescale: the factor (y, x) that takes the volume's pixels to the model's; refused where either pixel
        size is unknown, or where they differ so much that a pixel size is more likely wrong than the data."""
        model = self.plan.pixel_size_nm
        if not model:
            raise UserError("--rescale: the model records no pixel size; give it when training (train --pixel-size)")
        if not self.cfg.pixel_size and not (self.volume.pixel_size_nm and self.volume.pixel_size_nm[2]):
            raise UserError(f"--rescale: {self.cfg.volume} records no pixel size; give it with --pixel-size Z,Y,X (nm)")
        zoom = (self.pixel_size[1] / model[1], self.pixel_size[2] / model[2])
        if not all(1 / MAX_ZOOM <= f <= MAX_ZOOM for f in zoom):
            raise UserError(
                f"--rescale: the volume's pixel size ({self.pixel_size[2]:g} nm) is {zoom[1]:.3g} times the model's "
                f"({model[2]:g} nm), beyond 1/{MAX_ZOOM:g}..{MAX_ZOOM:g}; check it (a TIFF's 72 dpi is not a pixel size) "
                "and give the right one with --pixel-size Z,Y,X"
            )
        if min(zoom) > 1.1:  # measured on synthetic EM: shrinking helped, enlarging did not (benchmarks/REPORT.md)
            self.warnings.append(f"--rescale enlarges tiles {min(zoom):.2g}x to the model's pixel size, which adds "
                                 "no detail; compare with a run without it")  # fmt: skip
            log.warning(self.warnings[-1])
        return zoom

    def _timed(self, name: str, fn, *args):
        t = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t

    # -- resume / overwrite -------------------------------------------------------------------------------------
    def _prepare(self) -> str:
        cfg = self.cfg
        ignored = [*self.plan.ignored, *(() if self.plan.needs_image else given(cfg, "--normalization", "--invert"))]
        if ignored:
            self.warnings.append(f"{', '.join(ignored)} ignored: the {cfg.predictor} predictor does not use "
                                 f"{'it' if len(ignored) == 1 else 'them'}")
            log.warning(self.warnings[-1])
        if self.plan.needs_image:
            if cfg.normalization:
                low, high = parse_normalization(cfg.normalization)
                self.normalization = Normalization.fixed(low, high, invert=cfg.invert)
                kind = np.dtype(self.volume.dtype)
                if kind.kind in "ui" and (low < np.iinfo(kind).min or high > np.iinfo(kind).max):
                    # 0,65535 on 8-bit data: the model saw a near-black, flat image (4 objects where it found 40)
                    self.warnings.append(f"--normalization {cfg.normalization} reaches beyond the {kind} volume's "
                                         f"range ({np.iinfo(kind).min}..{np.iinfo(kind).max}): its pixels reach the "
                                         "model squeezed into a part of 0..255; leave --normalization out to "
                                         "stretch the volume's own percentiles")  # fmt: skip
                    log.warning(self.warnings[-1])
            else:
                self.normalization = self._timed("normalize", estimate, self.volume, self.plan.percentiles, cfg.invert)
                if self.normalization.blank:  # the wrong file or array, most likely: say so, the run goes on
                    self.warnings.append(f"{cfg.volume} has no contrast to stretch ({self.normalization.blank} in "
                                         "the sample of 16 slices): the model sees a blank image. Check the file "
                                         "and the array in it, or set --normalization LOW,HIGH")  # fmt: skip
                    log.warning(self.warnings[-1])
                if self.normalization.odd_slices:  # the run goes on: the section may be fine, or damaged
                    odd = ", ".join(f"{z} ({m:g})" for z, m, _ in self.normalization.odd_slices)
                    self.warnings.append(f"{cfg.volume}: sampled slice(s) {odd} lie far from the others' median "
                                         f"intensity ({self.normalization.odd_slices[0][2]:g}): left out of the "
                                         "normalization. A section imaged darker or brighter is segmented with the "
                                         "others' contrast; check it, or correct its intensity first")  # fmt: skip
                    log.warning(self.warnings[-1])
        self.inputs_read = self._inputs()
        predict_key = {
            "volume": self.inputs_read[0], "slices": [self.z0, self.z1], "predictor": self.cfg.predictor,
            "plan": self.plan.identity, "options": {k: v for k, v in self.plan.spec.options.items() if k != "layers"},
            "tile": self.grid.tile, "overlap": self.grid.overlap, "classes": self.classes,
            "normalization": _fingerprinted(self.normalization), "store": TILE_STORE,
        }  # fmt: skip
        predict_fp = _fingerprint(predict_key)
        post_fp = _fingerprint([predict_fp, cfg.stitch_iou, cfg.border_fill, cfg.link, asdict(self.link_rule),
                               cfg.write_image, cfg.chunk, cfg.format])
        previous = self.store.read_run()
        if previous is None and self.store.run_path.exists():  # damaged: nothing in the store is known to match
            self.warnings.append(f"{self.store.run_path} is damaged: the work store was started over")
            log.warning(self.warnings[-1])
            self.store.clear(keep_predictions=False)
        out = self.output
        out.remove_aside()
        self._check_work_store_belongs(previous)
        decision = decide(out.status if out.exists else None, out.exists, previous, predict_fp, post_fp,
                          cfg.overwrite, cfg.out, changed_settings(previous, json.loads(json.dumps(asdict(cfg)))),
                          self.store.holds_predictions())  # fmt: skip
        if decision.remove_output:
            out.remove()
        if decision.forget:
            self.store.clear(keep_predictions=decision.forget == "merge")
        if decision.mode != "resume":
            self._warn_if_short_of_space()
        self.store.create(self.shape[0], self.grid, len(self.classes))
        if previous and decision.mode == "reuse-predictions" and made_by(previous, "post_rules") != POST_RULES:
            self.warnings.append(f"{cfg.out}: the earlier run was stitched and linked by another cellseg-batch "
                                 "version; its predictions are kept, and stitching, linking and writing are redone")  # fmt: skip
            log.warning(self.warnings[-1])
        self.store.write_run({"predict_fp": predict_fp, "post_fp": post_fp, "tile_store": TILE_STORE,
                              "post_rules": POST_RULES, "config": asdict(cfg), "grid": asdict(self.grid),
                              "classes": self.classes})  # fmt: skip
        if not out.exists:
            out.create(
                self.shape, cfg.chunk, self.classes, self.volume.dtype if cfg.write_image else None,
                self.pixel_size, {"version": __version__, "volume": cfg.volume, "slices": [self.z0, self.z1],
                                  "work_dir": str(self.store.root.resolve())},
                fmt=cfg.format,
            )  # fmt: skip
        # loaded here while Ray starts: linking's scipy (~0.3 s to import; the link stage runs on the driver between
        # the last gap unit and the first write, where nothing else can run) and the object table's pyarrow (~0.15 s,
        # at the run's end)
        import pyarrow.csv  # noqa: F401
        import pyarrow.parquet  # noqa: F401
        import scipy.optimize  # noqa: F401
        import scipy.sparse.csgraph  # noqa: F401

        return decision.mode

    def _check_work_store_belongs(self, previous: dict | None) -> None:
        """One work store per output. A --work-dir holding another output's work (its kept tiles, or its unfinished
        run) would be started over or deleted at this run's end; an unfinished output whose work is in another
        folder than this run's would be started over, its predictions made again."""
        cfg, store = self.cfg, self.store
        recorded = (previous or {}).get("config", {}).get("out")
        if recorded and Path(recorded).resolve() != Path(cfg.out).resolve():
            raise UserError(f"{store.root} holds the work of another output, {recorded}; give this run its own "
                            f"--work-dir, or remove {store.root} if {recorded} no longer needs it")  # fmt: skip
        elsewhere = self.output.info.get("work_dir") if self.output.exists else None
        if (previous is None and self.output.status == "incomplete" and elsewhere and not cfg.overwrite
                and Path(elsewhere) != store.root.resolve() and (Path(elsewhere) / "run.json").exists()):  # fmt: skip
            raise UserError(f"{cfg.out} is unfinished and its run keeps its work in {elsewhere}: run again with "
                            f"--work-dir {elsewhere} to resume, or pass --overwrite to start over")  # fmt: skip

    def _warn_if_short_of_space(self) -> None:
        """Said at the start, not hours later when the disk fills (the run would stop there, and resume once space
        is freed): the image copy's size is known beforehand; what the labels and the work store take is not."""
        if not self.cfg.write_image:
            return
        need = image_copy_bytes(self.shape, self.volume.dtype)
        where = Path(self.cfg.out).resolve()
        while not where.exists():  # the output's folder may not exist yet
            where = where.parent
        free = shutil.disk_usage(where).free
        if free < need:
            self.warnings.append(
                f"{self.cfg.out}: {free / 1e9:.3g} GB free on its filesystem, and the image copy alone takes about "
                f"{need / 1e9:.3g} GB (EM images barely compress): free space, choose another --out, or pass --no-image"
            )
            log.warning(self.warnings[-1])

    # -- stages -------------------------------------------------------------------------------------------------
    def execute(self) -> dict:
        cfg = self.cfg
        t_start, self.cpu_start = time.perf_counter(), time.process_time()
        mode = None  # known once the earlier run's leftovers are settled
        lock = OutputLock(cfg.out)
        lock.acquire()  # before anything of the output is read or written: one writer at a time
        # a --work-dir two runs were given (one scratch folder for a lab's jobs) has one user at a time too: a second
        # run would take the first's predictions as its own, and the first that ends deletes the folder
        work_lock = OutputLock(self.store.root) if cfg.work_dir else None
        try:
            if work_lock is not None:
                work_lock.acquire()
            # Ray starts (seconds) while the plan is settled and the normalization sampled, not after; on a fresh
            # run the actors start as soon as Ray is up, loading their model while the driver is still at it
            fresh = self.store.read_run() is None
            with ThreadPoolExecutor(1) as pool:
                prepared = pool.submit(self._prepare)
                try:
                    self._timed("ray_start", distribute.start, cfg.address, cfg.num_cpus, cfg.num_gpus, cfg.verbose)
                    self.actors = self._actor_start()
                    if fresh:
                        self.actors.begin()
                finally:
                    mode = prepared.result()  # a problem with the input or output is reported first
            log.info("%s: %s, %d slices of %dx%d, %d tiles per slice (tile %d, overlap %d), classes %s", mode,
                     cfg.volume, *self.shape, len(self.grid), self.grid.tile, self.grid.overlap,
                     ", ".join(self.classes))  # fmt: skip
            report = self._repairing(mode, t_start)
        except UserError:
            if mode == "fresh":  # bad input found mid-run: leave nothing that could pass for a result
                self.output.remove()
                self.store.reset(keep_predictions=False)
            raise
        else:
            # while its lock is held: the next run to take it finds it gone, not half gone
            if not cfg.keep_tiles and (left := self.store.reset(keep_predictions=False)):
                # the result is complete; what is left only takes space (a 2 TB volume's tiles: hundreds of GB)
                log.warning("the output is complete, but the work store could not be deleted: %s; remove %s by hand",
                            left, self.store.root)
        finally:
            try:
                distribute.stop()
            finally:  # a second interrupt while Ray stops (scancel's SIGTERM, then the job script's SIGINT) must not
                # leave the locks behind: a resubmitted job on another node would be refused
                if work_lock is not None:
                    work_lock.release()
                lock.release()
        return report

    def _repairing(self, mode: str, t_start: float) -> dict:
        """The stages, driven again after each damaged work-store file found, once what it holds is forgotten; the
        same file damaged again (a failing disk) ends the run."""
        seen: set[str] = set()
        while True:
            try:
                return self._stages(mode, t_start)
            except StoreDamage as damage:
                if damage.path in seen:
                    raise UserError(f"{damage} again after it was computed again; check the disk under "
                                    f"{self.store.root}, remove that folder and run again") from None  # fmt: skip
                seen.add(damage.path)
                log.warning("%s: computing it again", damage)
                self.warnings.append(f"{damage}: computed again")
                self.store.repair(damage)

    def _stages(self, mode: str, t_start: float) -> dict:
        cfg, store, grid, nz = self.cfg, self.store, self.grid, self.shape[0]
        limit = 2 * max(1, self.resources["cpus"])
        predict = PredictStage(store, grid, nz, cfg.batch_size, self.actors, self.normalization)
        cpu_tasks = CpuTasks(predict)
        stitch = StitchStage(store, grid, nz, cfg.stitch_iou, cfg.border_fill, predict, limit, cpu_tasks)
        gaps = GapStage(store, grid, nz, len(self.classes), cfg.link, self.link_rule, limit, cpu_tasks)
        link = LinkStage(store, grid, nz, len(self.classes), cfg.link, self.link_rule, stitch, gaps)
        write = WriteStage(store, grid, nz, self.output, link, limit, cpu_tasks, self.plan.layer_of)
        image = ImageStage(store, nz, write, self.volume, self.z0, limit, cpu_tasks) if cfg.write_image else None
        pyramid = PyramidStage(store, nz, self.output, write, image, limit, cpu_tasks)
        preview = PreviewStage(nz, self.output, pyramid, cpu_tasks)
        # the image copy last: the loop offers each stage, in this order, the room left for CPU work
        self.stages = [predict, stitch, gaps, link, write, pyramid, preview] + ([image] if image else [])
        count, cpus, gpus = self.actors.layout
        self.counts["actors"] = {"count": count, "cpus_each": cpus, "gpus_each": gpus}
        drive(self.stages, bar=self._bar)
        # the report's pictures (~0.4 s) are drawn while Ray stops (~0.35 s, mostly waiting for its processes to end)
        touching = [int(store.edges(z)["touching_unmatched"]) for z in range(nz)]
        with ThreadPoolExecutor(1) as pool:
            pictures = pool.submit(gallery_pictures, self.output, gallery_slices(nz, touching))
            self._timed("ray_stop", distribute.stop)  # what is left runs here: free the cluster (or our share of it)
            pictures = pictures.result()
        self.counts["tiles"] = nz * len(grid)
        self.counts["tiles_predicted_now"] = predict.remaining
        self.counts["batches_rebalanced"] = predict.stolen
        self.counts["tiles_at_instance_cap"] = predict.capped
        if predict.capped:  # a dense tile lost its lowest-scoring objects, silently: say so, and how to avoid it
            self.warnings.append(
                f"{predict.capped} of the {predict.remaining} tiles predicted gave the most instances the predictor "
                f"gives a tile, so objects beyond it were dropped there (detectron2: TEST.DETECTIONS_PER_IMAGE in "
                f"the model's config.yaml): run with a smaller --tile, or raise that number")  # fmt: skip
            log.warning(self.warnings[-1])
        self.counts["tile_positions_read_back_for_z_overlaps"] = stitch.cores_read_back
        self.counts["cpu_units_run_by_predictor_actors"] = cpu_tasks.by_actors
        # cores read back for gap overlaps no actor counted: by the gap stage's units, or the driver where none ran
        self.counts["gap_cores_read"] = gaps.cores_read + link.stats.gap_cores_read
        self._warn_dense(link.stats)
        self._warn_unpaired(link.stats)
        self._warn_blank(link.stats)
        self.times["actor_start"] = predict.actor_start_s
        for stage in self.stages:
            self.times[stage.name] = stage.seconds
        if predict.last_finish and stitch.last_finish:
            self.times["stitch_after_predict"] = max(0.0, stitch.last_finish - predict.last_finish)
        self.steady = predict.steady_rate()
        self.ms_per_tile = predict.ms_per_tile()
        self.tiles_over_time = predict.tiles_over_time(t_start)
        return self._finish(link.table, link.stats, mode, t_start, touching, pictures)

    def _warn_unpaired(self, stats) -> None:
        """Sections most of whose 2D instances pair with neither neighbour (``LinkStats.unpaired_slices``)."""
        if unpaired := [z + self.z0 for z in stats.unpaired_slices]:  # the input's numbering
            listed = ", ".join(map(str, unpaired[:10])) + (f" and {len(unpaired) - 10} more" if len(unpaired) > 10 else "")
            self.warnings.append(
                f"slice(s) {listed}: most of their 2D instances continue into neither neighbouring slice, so they are "
                f"objects of one slice (which --min-slices may drop): a section moved more than {SHIFT_REACH} px or "
                f"rotated against its neighbours? Register the stack first, or check those sections")  # fmt: skip
            log.warning(self.warnings[-1])

    def _warn_blank(self, stats) -> None:
        """Sections without any object between sections with many (``LinkStats.blank_slices``)."""
        if self.cfg.link != "none" and (blank := [z + self.z0 for z in stats.blank_slices]):  # the input's numbering
            listed = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
            cut = [name for name, gap in zip(self.classes, self.link_rule.gap) if gap == 0]
            self.warnings.append(
                f"slice(s) {listed} hold no object while the slices around them hold many: blank or lost sections? "
                f"Objects are bridged over up to --link-gap missing slices"
                + (f"; {', '.join(cut)} (gap 0) are cut there" if cut else ""))  # fmt: skip
            log.warning(self.warnings[-1])

    def _warn_dense(self, stats) -> None:
        """A class where most 2D instances share their slice with another of their object: objects that tile the
        plane (neurites; ISBI ssTEM: 3345 of 3431 with the default gap) join through rule 2 and gap edges, and the objects
        are merges. Branched organelles make a few percent."""
        self.counts["instances_2d_sharing_a_slice"] = {self.classes[c]: shared for c, (shared, _) in
                                                       stats.sharing_a_slice.items()}  # fmt: skip
        for c, (shared, n) in stats.sharing_a_slice.items():
            if n >= DENSE_MIN_INSTANCES and shared >= DENSE_SHARE * n:
                self.warnings.append(
                    f"{self.classes[c]}: {shared} of its {n} 2D instances share their slice with another of their "
                    f"3D object: many of its objects may be merges (branched organelles give a few percent); for "
                    f"objects that tile the plane (neurites, dense label stacks) link one-to-one: --link-gap 0 "
                    f"--link-ioa 1.0")  # fmt: skip
                log.warning(self.warnings[-1])

    def _bar(self, total: int, desc: str, initial: int):
        from tqdm import tqdm

        if self.cfg.progress and not sys.stderr.isatty():  # a log file: lines, not bars
            if self._log_progress is None:
                self._log_progress = LogProgress()
            return self._log_progress.bar(total, desc, initial, "tiles" if desc == "predict" else "units")
        return tqdm(total=total, initial=initial, desc=desc, unit="tile" if desc == "predict" else "unit",
                    disable=not self.cfg.progress, mininterval=0.5, dynamic_ncols=True, smoothing=0.1)  # fmt: skip

    def _actor_start(self) -> ActorStart:
        """The predictor actors of this run, laid out on the cluster Ray just joined (not started yet)."""
        self.resources = distribute.cluster_resources()
        count, cpus, gpus, threads = self._actor_layout()
        reach = self._actor_reach(spare_cpus=self.resources["cpus"] - count * cpus)
        job = TileJob(self.plan.spec, self.volume, self.grid, str(self.store.root), self.z0, threads, reach=reach)
        return ActorStart(job, (count, cpus, gpus), float(os.environ.get("CELLSEG_ACTOR_START_TIMEOUT", 600)))

    def _actor_reach(self, spare_cpus: float) -> int:
        """How many slices back an actor counts a new tile's z-overlaps with the same position (``TileJob.reach``).
        The adjacent slice always: stitching's z-links need it. The slices across link gaps only where the actors
        hold every core: there the gap stage would wait for a core and read the cores back, and counting from the
        runs the actor keeps is the least work. Where cores are spare (GPU actors) the gap stage reads the cores
        on them instead, and the actor, whose per-tile work shares Python's lock with its model, keeps ~2 of its
        ~6.5 ms a tile (benchmarks/REPORT.md, ``bench_actor_threads.py``)."""
        if self.cfg.link == "none" or spare_cpus >= 1:
            return 1
        return max(self.link_rule.gap, default=0) + 1

    def _actor_layout(self) -> tuple[int, float, float, int]:
        """(actors, cpus each, gpus each, torch threads each), refused where the local Ray cannot hold them."""
        count, cpus, gpus, threads = self._actors_asked()
        res = self.resources
        if not self.cfg.address and (count * cpus > res["cpus"] or count * gpus > res["gpus"]):
            # a local Ray does not grow: the actors that do not fit would never start (a cluster's autoscaler may
            # add nodes; there ActorStart's timeout says so)
            kind, each, have = ("GPU", gpus, res["gpus"]) if count * gpus > res["gpus"] else ("CPU", cpus, res["cpus"])
            fewer = f"--actors {int(have // each)}" if have >= each else f"--cpus-per-actor {have}"
            raise UserError(f"{count} predictor actors of {each:g} {kind}(s) each need {count * each:g} {kind}s, but "
                            f"the local Ray has {have} (the machine's, or --num-cpus / --num-gpus): ask for fewer, "
                            f"e.g. {fewer}")  # fmt: skip
        return count, cpus, gpus, threads

    def _actors_asked(self) -> tuple[int, float, float, int]:
        """(actors, cpus each, gpus each, torch threads each) as the options and the cluster's size give them."""
        res = self.resources
        if self.cfg.device.startswith("cuda") and not res["gpus"]:
            raise UserError(f"--device {self.cfg.device}: the Ray cluster has no GPU; use --device cpu or auto")
        gpus = res["gpus"] if self.plan.uses_gpu and self.cfg.device != "cpu" else 0
        if gpus:
            count = self.cfg.actors or gpus
            cpus = self.cfg.cpus_per_actor or max(1, min(4, res["cpus_per_gpu"]))
            return count, cpus, 1, cpus
        if self.plan.needs_image:
            # CPU inference: one single-threaded actor per core. Measured on 2 cores (benchmarks/REPORT.md): two
            # 1-thread actors predicted ~2x the tiles/s of one 2-thread actor on a busy machine, since torch's
            # threads wait for each other at every op and the model's Python steps run on one core; each actor
            # holds its own model (memory grows with the cores: --cpus-per-actor N trades it back)
            cpus = self.cfg.cpus_per_actor or 1
            count = self.cfg.actors or max(1, res["cpus"] // cpus)
            return count, cpus, 0, cpus
        cpus = self.cfg.cpus_per_actor or 1
        return self.cfg.actors or max(1, res["cpus"] // cpus), cpus, 0, 1

    def _inputs(self) -> list:
        """What tells the inputs (the volume, and the predictor's: label stacks, the model's weights and config) from
        edited ones, as they are now: a file's size and modification time, a zarr array's metadata and sampled
        chunks."""
        return [volume_identity(self.volume), resolve_predictor(self.cfg.predictor).identity_now(self.plan)]

    def _check_inputs_unchanged(self) -> None:
        """An input rewritten in place while the run read it (a copy over it, a tool saving into it) gave an output
        of old and new slices that said it was complete; now the run refuses to finish it."""
        now = self._inputs()
        if json.dumps(now, default=str) != json.dumps(self.inputs_read, default=str):
            what = self.cfg.volume if now[0] != self.inputs_read[0] else "an input of the predictor (a --labels stack, the model)"
            raise UserError(f"{what} changed while the run read it (its size, time or contents): the output would mix "
                            "the old and the new data, so it is not finished; run again once the inputs stay as they "
                            "are (with --overwrite to start over)")  # fmt: skip

    def _finish(self, table, stats, mode: str, t_start: float, touching_per_slice: list[int],
                pictures: list[str]) -> dict:  # fmt: skip
        out, cfg = self.output, self.cfg
        self._check_inputs_unchanged()
        out.write_table(table, self.classes, self.z0)
        touching = sum(touching_per_slice)
        voxels = int(np.prod(self.shape))
        predict_s = self.times.get("predict", 0.0)
        elapsed = time.perf_counter() - t_start
        cpu_start = self.cpu_start
        report = {
            "cellseg_batch": __version__,
            "status": "complete",
            "mode": mode,
            "input": {"volume": cfg.volume, "shape": list(self.volume.shape), "dtype": str(self.volume.dtype),
                      "slices": [self.z0, self.z1], "pixel_size_nm": self.pixel_size,
                      "origin_nm": self.volume.origin_nm,
                      **({"slice_files": [Path(f).name for f in self.volume.files]}
                         if isinstance(self.volume, ImageSequence) else {})},  # fmt: skip
            "config": asdict(cfg),
            "plan": {"predictor": cfg.predictor, "classes": self.classes, "tile": self.grid.tile,
                     "overlap": self.grid.overlap, "tiles_per_slice": len(self.grid), "zoom": list(self.plan.zoom),
                     "normalization": self.normalization.to_dict() if self.normalization else None,
                     # as its actors built it (none started where a resumed run had every tile): device, threshold
                     "predictor_settings": next((s.settings for s in self.stages if s.name == "predict"), {})},
            "cluster": self.resources,
            "stages": [{"name": s.name, "reads": list(s.reads), "writes": list(s.writes), "units": s.total,
                        "seconds": round(s.seconds, 3), "driver_cpu_s": round(s.driver_cpu_seconds, 3),
                        # when each stage ran, from the run's start (wall and driver CPU): stages overlap
                        "span_s": [round(s.first_start - t_start, 3), round(s.last_finish - t_start, 3)]
                        if s.first_start and s.last_finish else None,
                        "driver_cpu_span_s": [round(s.cpu_at_start - cpu_start, 3), round(s.cpu_at_finish - cpu_start, 3)]
                        if s.first_start and s.last_finish else None}
                       for s in self.stages],
            "counts": {
                **self.counts,
                "objects": stats.objects,
                "objects_per_class": {self.classes[int(c)]: n for c, n in stats.per_class.items()},
                "fragments": stats.fragments, "instances_2d": stats.instances_2d,
                "stitch_matches": stats.stitch_matches, "z_links": stats.links, "z_links_healed": stats.heal_links,
                "z_links_gap": stats.gap_links, "gap_positions": stats.gap_positions,
                "gap_tiles_read": stats.gap_tiles_read,
                "z_pairs_realigned": stats.shifted_pairs, "gap_pairs_realigned": stats.gap_pairs_realigned,
                "slices_unpaired": [z + self.z0 for z in stats.unpaired_slices],
                "slices_blank": [z + self.z0 for z in stats.blank_slices],
                "z_crossings_cut": stats.crossings,
                "z_speck_bridges_cut": stats.speck_bridges,
                "gap_seconds": round(stats.gap_seconds, 3),
                "dropped_by_cleanup": {self.classes[int(c)]: d for c, d in stats.dropped.items()},
                "min_slices_auto": {self.classes[int(c)]: d for c, d in stats.min_slices_auto.items()},
            },
            "output": {"label_dtype": str(np.dtype(next(s for s in self.stages if s.name == "write").dtype or "uint32")),
                       "pixel_size_nm": self.pixel_size,  # the first voxel's place (--slices moves it; a crop's own)
                       "origin_nm": Output.origin(self.pixel_size, self.z0, self.volume.origin_nm) if self.pixel_size
                       else None},  # fmt: skip
            "merge_quality": {
                "touching_unmatched_at_tile_borders": touching,
                "touching_unmatched_per_slice": touching_per_slice,
                "max_tiles_per_2d_instance": stats.max_tiles_per_instance,
                "instances_spanning_more_than_4_tiles": stats.instances_over_4_tiles,
                "border_fill_pixels": stats.fill_pixels,
                "note": "touching_unmatched counts same-class fragments that touch across a tile border without "
                        "matching: possible splits. Raise --overlap if it is large. border_fill_pixels: pixels of a "
                        "tile's core where it found nothing and took the object its neighbour saw cross their "
                        "border and end (stitching rule 4).",
            },
            "time_s": {**{k: round(v, 3) for k, v in self.times.items()}, "total": round(elapsed, 3)},
            "throughput": {
                "tiles_per_s": round(self.counts["tiles_predicted_now"] / predict_s, 3) if predict_s else None,
                "tiles_per_s_steady": self.steady,
                "actor_ms_per_tile": self.ms_per_tile,  # read, normalize, the predictor's steps, store
                "tiles_over_time": self.tiles_over_time,  # [s from the start, tiles predicted by then]
                "mvoxel_per_s_predict": round(voxels / 1e6 / predict_s, 3) if predict_s and mode == "fresh" else None,
                "mvoxel_per_s_total": round(voxels / 1e6 / elapsed, 3) if mode == "fresh" else None,
            },
            "versions": _versions(),
            "warnings": self.warnings,
        }  # fmt: skip
        out.remove_tiffs()
        if cfg.export_tiff:
            report["tiff"] = [str(p) for p in out.export_tiff(max_id=len(table), pixel_size_nm=self.pixel_size)]
        write_html(out, report, pictures)  # first: a disk full here leaves no report.json that says "complete"
        out.write_report(report)
        with signals_held() as arrived:  # the output is complete, or (status incomplete) resumable: never in between
            out.finalize(self.pixel_size, self.z0, self.volume.origin_nm)
        if arrived:
            log.warning("a stop request arrived while the output was being finished; it is complete")
        return report


@contextmanager
def signals_held(signums=(signal.SIGINT, signal.SIGTERM)):
    """Ctrl-C and SIGTERM that arrive inside are only recorded (the list it yields): for a last step that must not be
    cut in two. Outside the main thread (where handlers cannot be set) it holds nothing."""
    arrived: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield arrived
        return
    previous = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in signums}
    try:
        yield arrived
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in ("numpy", "torch", "torchvision", "detectron2", "ray", "zarr", "tifffile"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def run(cfg: RunConfig) -> dict:
    return Run(cfg).execute()
