"""Train: fine-tune Mask R-CNN on COCO annotations with detectron2's DefaultTrainer under ``launch``, on GPUs
(NCCL, several machines) or on CPU processes (gloo), and write the model directory that ``run`` reads.

    OUT/                   the model directory (config.yaml, model_final.pth, cellseg.json)
    OUT/train/             checkpoints (``--resume`` continues from the last), metrics.json, TensorBoard events,
                           COCO evaluation results, log.txt
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from pathlib import Path

import numpy as np

from .coco import CocoSet, MaskCut, load_coco, mask_cuts, read_grey, window_parts, window_records
from .config import check_options, check_output_folder, parse_pixel_size
from .d2compat import detectron2_ready, has_compiled_ops
from .errors import UserError
from .model_dir import MANIFEST, ModelDir
from .normalize import ByPixelType, from_samples
from .read import load_json
from .tiles import Box
from .write import check_class_names

TRAIN_SET, VAL_SET = "cellseg_train", "cellseg_val"
MODEL_ZOO_URL = "https://dl.fbaipublicfiles.com/detectron2/"
CACHE = Path(os.environ.get("CELLSEG_CACHE", Path.home() / ".cache" / "cellseg-batch"))
# train --crop's default where --tile is not given: a window the R50-FPN config trains on at IMS_PER_BATCH on a
# 16 GB GPU, and the tile `run` then uses (TEST.DETECTIONS_PER_IMAGE is per tile)
DEFAULT_CROP = 1024
IMAGE_CACHE_BYTES = 2**30  # decoded training images a mapper keeps (large slices are cropped again and again)


@dataclass
class TrainConfig:
    train: str
    images: str
    out: str
    config: str
    val: str | None = None
    val_images: str | None = None
    weights: str | None = None
    num_gpus: int = 0
    cpu_procs: int = 1
    num_machines: int = 1
    machine_rank: int = 0
    dist_url: str = "auto"
    resume: bool = False
    max_iter: int | None = None
    max_minutes: float | None = None
    eval_period: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    tile: int | None = None
    overlap: int | None = None
    pixel_size: str | None = None
    percentiles: tuple[float, float] = (1.0, 99.5)
    crop: int | None = None
    amp: bool = False
    opts: list[str] = field(default_factory=list)


# -- data ---------------------------------------------------------------------------------------------------------


def training_normalization(records: list[dict], percentiles, max_images: int = 64,
                           more: list[dict] = ()) -> ByPixelType:  # fmt: skip
    """The normalization ``run`` applies to a volume, computed the same way over (a spread of) the training images
    of each pixel type on its own, as ``run`` computes it for each volume: 8- and 16-bit images of one training set
    each reach the model on the 0-255 scale (one range for both left the 8-bit ones nearly black). Every image is
    read here, before training starts, so an unreadable one is named now. ``more`` (the validation images): types
    the training images do not have get their own range from them."""
    by_type = _paths_by_pixel_type(records)
    for name, paths in _paths_by_pixel_type(more).items():
        by_type.setdefault(name, paths)
    out = {}
    for name, paths in by_type.items():
        step = max(1, len(paths) // max_images)
        normalization = from_samples([read_grey(p) for p in paths[::step]], percentiles)
        if normalization.blank:
            raise UserError(f"the {name} training images have no contrast ({normalization.blank} in "
                            f"{len(paths[::step])} of them): check the image files the COCO file names")  # fmt: skip
        out[name] = normalization
    return ByPixelType(out)


def _paths_by_pixel_type(records: list[dict]) -> dict[str, list[str]]:
    by_type: dict[str, list[str]] = {}
    for r in records:
        by_type.setdefault(read_grey(r["file_name"]).dtype.name, []).append(r["file_name"])
    return by_type


def _transpose_augmentation():
    from detectron2.data import transforms as T
    from fvcore.transforms.transform import Transform

    class TransposeTransform(Transform):
        """Swap y and x: with the two flips it gives all eight 90-degree rotations and mirrors of a tile."""

        def apply_image(self, img):
            return np.ascontiguousarray(np.swapaxes(img, 0, 1))

        def apply_coords(self, coords):
            return coords[:, ::-1].copy()

        def apply_segmentation(self, segmentation):
            return self.apply_image(segmentation)

        def inverse(self):
            return self

    class RandomTranspose(T.Augmentation):
        def get_transform(self, image):
            return TransposeTransform() if self._rand_range() < 0.5 else T.NoOpTransform()

    return RandomTranspose()


def training_crop(tc: TrainConfig) -> int:
    """Images larger than this (px, either side) are trained as random windows of it and validated as the windows
    that partition them: ``--crop``, else ``--tile``, else ``DEFAULT_CROP``; 0 never."""
    return tc.crop if tc.crop is not None else (tc.tile or DEFAULT_CROP)


class EMDatasetMapper:
    """Reads a greyscale slice in its own dtype, normalizes it like ``run`` does, augments (flips, transposes,
    brightness, contrast) for training, and never resizes: tiles keep their pixel scale. A training image larger
    than ``crop`` is a random ``crop`` x ``crop`` window of it at each use, its masks cut to the window (annotated
    slices of 4096 px would otherwise be trained whole, at a memory and a tile size `run` never uses); a validation
    window (``coco.window_records``) is read as recorded."""

    def __init__(self, is_train: bool, normalization: ByPixelType, crop: int = 0):
        from detectron2.data import transforms as T

        self.is_train = is_train
        self.normalization = normalization
        self.crop = crop
        self.augmentations = T.AugmentationList(
            [
                T.RandomFlip(0.5, horizontal=True, vertical=False),
                T.RandomFlip(0.5, horizontal=False, vertical=True),
                _transpose_augmentation(),
                T.RandomBrightness(0.8, 1.2),
                T.RandomContrast(0.8, 1.2),
            ]
            if is_train
            else []
        )
        self._cuts: dict = {}  # image id -> its masks cut to their boxes (``coco.mask_cuts``)
        self._images: dict[str, np.ndarray] = {}  # file -> decoded image, oldest first, IMAGE_CACHE_BYTES at most

    def window(self, record: dict) -> tuple[Box | None, list[MaskCut] | None]:
        """The part of the image this sample is (None: all of it), and, for a random training window, the masks
        inside it (``coco.window_parts``; None: the record's annotations are the sample's)."""
        if "window" in record:
            return Box(*record["window"]), None
        h, w = record["height"], record["width"]
        if not (self.is_train and self.crop and max(h, w) > self.crop):
            return None, None
        ch, cw = min(self.crop, h), min(self.crop, w)
        y0, x0 = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)  # detectron2 seeds numpy
        window = Box(int(y0), int(y0) + ch, int(x0), int(x0) + cw)
        if record["image_id"] not in self._cuts:
            self._cuts[record["image_id"]] = mask_cuts(record)
        return window, window_parts(self._cuts[record["image_id"]], window)

    def _read(self, path: str, whole: bool) -> np.ndarray:
        """An image file, decoded once where it is cropped (``whole`` False) and then kept while there is room."""
        if whole:
            return read_grey(path)
        if path not in self._images:
            image = read_grey(path)
            while self._images and sum(i.nbytes for i in self._images.values()) + image.nbytes > IMAGE_CACHE_BYTES:
                del self._images[next(iter(self._images))]
            self._images[path] = image
        return self._images[path]

    def __call__(self, record: dict) -> dict:
        import torch
        from detectron2.data import detection_utils as utils
        from detectron2.data import transforms as T

        window, parts = self.window(record)
        image = self._read(record["file_name"], whole=window is None)
        if window is not None:
            image = image[window.y0 : window.y1, window.x0 : window.x1]
        image = self.normalization.apply(image)
        image = np.repeat(image[:, :, None], 3, axis=2)
        aug = T.AugInput(image)
        transforms = self.augmentations(aug)
        image = np.clip(aug.image, 0, 255)
        out = {k: record[k] for k in ("file_name", "image_id")}
        out["height"], out["width"] = image.shape[:2]
        out["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32))
        if self.is_train and parts is not None:
            out["instances"] = instances_of_parts(parts, window.shape, transforms, image.shape[:2])
        elif self.is_train:
            annos = [utils.transform_instance_annotations(dict(a), transforms, image.shape[:2])
                     for a in record["annotations"] if not a.get("iscrowd", 0)]  # fmt: skip
            instances = utils.annotations_to_instances(annos, image.shape[:2], mask_format="bitmask")
            out["instances"] = utils.filter_empty_instances(instances)
        return out


def instances_of_parts(parts: list[MaskCut], window_shape: tuple[int, int], transforms, image_shape: tuple[int, int]):
    """A training window's masks (``coco.window_parts``) after the sample's transforms, as detectron2 ``Instances``:
    what ``annotations_to_instances`` makes of the same masks as RLE annotations, without encoding each mask to RLE
    and decoding it again (~0.8 s a sample for ~90 masks in a 1024 px window, against ~0.2 s)."""
    import torch
    from detectron2.structures import BitMasks, Boxes, Instances

    masks = np.zeros((len(parts), *image_shape), bool)
    boxes = np.zeros((len(parts), 4))
    window = np.zeros(window_shape, bool)
    for k, part in enumerate(parts):
        window[part.box.y0 : part.box.y1, part.box.x0 : part.box.x1] = part.mask
        masks[k] = transforms.apply_segmentation(window)  # one mask at a time: faster than all as an image's channels
        window[part.box.y0 : part.box.y1, part.box.x0 : part.box.x1] = False
        boxes[k] = part.box.x0, part.box.y0, part.box.x1, part.box.y1
    if parts:  # clipped to the image, as transform_instance_annotations clips them (Boxes stores float32)
        boxes = np.minimum(transforms.apply_box(boxes).clip(min=0), [*image_shape[::-1], *image_shape[::-1]])
    out = Instances(image_shape)
    out.gt_boxes = Boxes(boxes)
    out.gt_classes = torch.tensor([p.category_id for p in parts], dtype=torch.int64)
    out.gt_masks = BitMasks(torch.from_numpy(masks))
    return out


def register(name: str, dataset: CocoSet) -> None:
    from detectron2.data import DatasetCatalog, MetadataCatalog

    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: dataset.records)
    MetadataCatalog.get(name).set(thing_classes=list(dataset.classes), evaluator_type="coco")


# -- weights ------------------------------------------------------------------------------------------------------


def resolve_weights(weights: str | None, timeout: float = 30) -> str:
    """A local path for ``weights``: a file, or a model-zoo/HTTP URL fetched once into the cache (with a timeout;
    where it cannot be reached, a one-line error says to download it by hand)."""
    if not weights:
        return ""
    if weights.startswith("detectron2://"):
        weights = MODEL_ZOO_URL + weights[len("detectron2://") :]
    if not weights.startswith(("http://", "https://")):
        if not Path(weights).is_file():
            raise UserError(f"--weights {weights} does not exist")
        return weights
    cached = CACHE / "weights" / Path(weights).name
    if cached.exists():
        return str(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(weights, timeout=timeout) as r, open(cached.with_suffix(".part"), "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        raise UserError(
            f"cannot download {weights} ({e}); download it on a machine that can reach it and pass --weights PATH"
        ) from e
    cached.with_suffix(".part").replace(cached)
    return str(cached)


# -- detectron2 config and trainer ----------------------------------------------------------------------------------


def build_cfg(tc: TrainConfig, classes: list[str], device: str):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    if not Path(tc.config).is_file():
        raise UserError(f"--config {tc.config} does not exist (see configs/)")
    try:
        cfg.merge_from_file(tc.config)
        cfg.merge_from_list(list(tc.opts))
    except Exception as e:
        raise UserError(f"{tc.config}: {e}") from e
    cfg.DATASETS.TRAIN = (TRAIN_SET,)
    cfg.DATASETS.TEST = (VAL_SET,) if tc.val else ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = len(classes)
    cfg.MODEL.DEVICE = device
    # detectron2's AMPTrainer needs CUDA: on a CPU, --amp is the bfloat16 forward of ``train_main`` instead (and a
    # config's SOLVER.AMP.ENABLED alone is turned off there rather than fail at the first step)
    cfg.SOLVER.AMP.ENABLED = bool(tc.amp or cfg.SOLVER.AMP.ENABLED) and device.startswith("cuda")
    cfg.MODEL.WEIGHTS = resolve_weights(tc.weights) if tc.weights is not None else resolve_weights(cfg.MODEL.WEIGHTS)
    cfg.OUTPUT_DIR = str(Path(tc.out) / "train")
    if tc.max_iter:
        # keep the config's schedule where it fits, else decay at 75% and 90% of the new length
        steps = [s for s in cfg.SOLVER.STEPS if s < tc.max_iter]
        if len(steps) != len(cfg.SOLVER.STEPS):
            steps = sorted({s for s in (int(tc.max_iter * 0.75), int(tc.max_iter * 0.9)) if 0 < s < tc.max_iter})
        cfg.SOLVER.STEPS = tuple(steps)
        cfg.SOLVER.MAX_ITER = tc.max_iter
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, max(1, tc.max_iter // 5))
    if tc.batch_size:
        cfg.SOLVER.IMS_PER_BATCH = tc.batch_size
    if tc.lr:
        cfg.SOLVER.BASE_LR = tc.lr
    world = tc.num_machines * (tc.num_gpus or tc.cpu_procs)
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise UserError(f"the batch size {cfg.SOLVER.IMS_PER_BATCH} must be divisible by the {world} processes")
    cfg.TEST.EVAL_PERIOD = tc.eval_period if tc.eval_period is not None else (max(1, cfg.SOLVER.MAX_ITER // 4) if tc.val else 0)
    return cfg


def autocast_training_forward(model, dtype) -> None:
    """Run ``model``'s training forward pass under CPU autocast to ``dtype`` (bfloat16): the losses come back in
    float32 and the weights and their gradients stay float32; inference is left as it is."""
    import torch

    forward = model.forward

    def autocast_forward(*args, **kwargs):
        if not model.training:
            return forward(*args, **kwargs)
        with torch.autocast("cpu", dtype=dtype):
            losses = forward(*args, **kwargs)
        return {k: v.float() for k, v in losses.items()}

    model.forward = autocast_forward


class _TimeUp(Exception):
    """Raised by the stop hook; every rank stops at the same iteration."""


# the signal that asked this process to stop training (``_stop_on_signals``), else None
_STOP: dict[str, str | None] = {"signal": None}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _stop_on_signals() -> dict:
    """SIGUSR1 (SLURM's warning before the time limit: --signal=USR1@300) and SIGTERM (scancel, a Kubernetes pod's
    end, each with a grace period before SIGKILL) stop the training at its next check (every 5 iterations) with a
    checkpoint saved and the model directory written, as --max-minutes does, instead of killing it with all its
    progress since the last periodic checkpoint. The launching process passes the signal on to its training processes.
    Ctrl-C (SIGINT) still interrupts at once."""
    import multiprocessing

    def stop(signum, frame):
        _STOP["signal"] = signal.Signals(signum).name
        for child in multiprocessing.active_children():
            os.kill(child.pid, signum)

    return {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}  # the handlers replaced


def make_trainer(cfg, normalization: ByPixelType, max_minutes: float | None, has_val: bool, cpu_amp=None,
                 crop: int = 0):  # fmt: skip
    import torch
    import torch.distributed as dist
    from detectron2.data import build_detection_test_loader, build_detection_train_loader
    from detectron2.engine import DefaultTrainer, HookBase, hooks
    from detectron2.evaluation import COCOEvaluator
    from detectron2.utils import comm

    class Stop(HookBase):
        """--max-minutes, or a stop signal (``_stop_on_signals``)."""

        def __init__(self, minutes: float | None):
            self.deadline = time.monotonic() + 60 * minutes if minutes else None

        def after_step(self):
            if self.trainer.iter % 5:
                return
            late = self.deadline is not None and time.monotonic() > self.deadline
            flag = torch.tensor([float(late or _STOP["signal"] is not None)])
            if comm.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # the same decision on every rank
            if flag.item():
                raise _TimeUp

    class Trainer(DefaultTrainer):
        @classmethod
        def build_model(cls, cfg):
            model = super().build_model(cfg)
            if cpu_amp is not None:  # detectron2's AMPTrainer needs CUDA
                autocast_training_forward(model, cpu_amp)
            return model

        @classmethod
        def build_train_loader(cls, cfg):
            return build_detection_train_loader(cfg, mapper=EMDatasetMapper(True, normalization, crop))

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_detection_test_loader(cfg, dataset_name, mapper=EMDatasetMapper(False, normalization))

        @classmethod
        def build_evaluator(cls, cfg, dataset_name):
            # without compiled ops, COCO evaluation runs in pycocotools (same numbers, slower)
            return COCOEvaluator(dataset_name, output_dir=os.path.join(cfg.OUTPUT_DIR, "eval"),
                                 use_fast_impl=has_compiled_ops(), max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)  # fmt: skip

        def build_hooks(self):
            ret = super().build_hooks()
            if has_val and comm.is_main_process():
                ret.append(hooks.BestCheckpointer(self.cfg.TEST.EVAL_PERIOD, self.checkpointer, "segm/AP", "max"))
            ret.append(Stop(max_minutes))
            return ret

    return Trainer(cfg)


def _quiet_expected(record: logging.LogRecord) -> bool:
    """No traceback in the log for the time limit, or for a user's mistake (printed as one line instead)."""
    return not (record.exc_info and issubclass(record.exc_info[0], (_TimeUp, UserError)))


LONG_RECORD_LINES = 12  # a console record longer than this (the config, the model) is one line there


class _Shortened(logging.Formatter):
    """A console formatter that keeps the first line of a long record and says where the rest is: detectron2 logs
    its environment, the config file, the full config and the model, ~600 lines at every start, which buried the
    training's own lines in a job's log. Its log.txt keeps them whole."""

    def __init__(self, inner: logging.Formatter, where: str):
        super().__init__()
        self.inner, self.where = inner, where

    def format(self, record: logging.LogRecord) -> str:
        text = self.inner.format(record)
        lines = text.splitlines()
        if len(lines) <= LONG_RECORD_LINES:
            return text
        return f"{lines[0].rstrip(':')} ({len(lines) - 1} lines: in {self.where})"


def _console_lines(log_file: str, *loggers: logging.Logger) -> None:
    """detectron2's console lines: long records shortened (``_Shortened``); plain text where the console is not a
    terminal (it coloured them with ANSI escapes whether or not it was: a SLURM job's log held hundreds), a terminal
    keeps its colours."""
    for logger in loggers:
        for handler in logger.handlers:
            stream = getattr(handler, "stream", None)
            # the console's: detectron2 writes log.txt through a StreamHandler too, which keeps every line
            if not isinstance(handler, logging.StreamHandler) or stream not in (sys.stdout, sys.stderr):
                continue
            if not getattr(stream, "isatty", lambda: False)():
                handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s]: %(message)s", datefmt="%m/%d %H:%M:%S"))
            handler.setFormatter(_Shortened(handler.formatter or logging.Formatter(), log_file))


def train_main(tc: TrainConfig, classes: list[str], device: str, normalization: ByPixelType) -> None:
    """Runs in every training process (``normalization``: ``training_normalization``'s, found before they start)."""
    detectron2_ready()
    _stop_on_signals()  # in each training process
    # a full disk under log.txt: one error line at the end, not a "--- Logging error ---" block per record (48 blocks,
    # ~970 lines, before the error in a job's log)
    logging.raiseExceptions = False
    from detectron2.engine import default_setup
    from detectron2.utils import comm

    train_set = load_coco(tc.train, tc.images)
    register(TRAIN_SET, train_set)
    if tc.val:
        val_set = load_coco(tc.val, tc.val_images or tc.images, classes=classes)
        register(VAL_SET, replace(val_set, records=window_records(val_set.records, training_crop(tc))))
    cfg = build_cfg(tc, classes, device)
    Path(cfg.OUTPUT_DIR).mkdir(parents=True, exist_ok=True)
    if not sys.stdout.isatty():  # default_setup colours the config it logs (pygments) for a terminal or not
        import detectron2.engine.defaults as d2_defaults

        d2_defaults._highlight = lambda code, filename: code
    # the loggers default_setup makes (setup_logger is cached by its arguments: these calls make them, its own find
    # them), given their console lines before it logs the environment, the config file and the full config
    from detectron2.utils.logger import setup_logger

    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="fvcore")
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank())
    _console_lines(str(Path(cfg.OUTPUT_DIR) / "log.txt"), logging.getLogger("detectron2"), logging.getLogger("fvcore"))
    default_setup(cfg, _Args(tc))
    logging.getLogger("detectron2.engine.train_loop").addFilter(_quiet_expected)
    cpu_amp = None
    if tc.amp and device == "cpu":
        from .predict.detectron2_predictor import amp_dtype

        cpu_amp = amp_dtype(device)
    trainer = make_trainer(cfg, normalization, tc.max_minutes, bool(tc.val), cpu_amp, training_crop(tc))
    trainer.resume_or_load(resume=tc.resume)
    start_iter, t0 = trainer.start_iter, time.perf_counter()
    stopped_early = False
    try:
        trainer.train()
    except _TimeUp:
        stopped_early = True
        if tc.val and not _STOP["signal"]:  # a signal's grace period is for the checkpoint: --resume evaluates later
            trainer.test(cfg, trainer.model)
        if comm.is_main_process():
            trainer.checkpointer.save("model_final")
    elapsed = time.perf_counter() - t0
    if comm.is_main_process():
        last = trainer.iter + 1 if stopped_early else trainer.iter  # iterations completed
        write_model_dir(tc, cfg, classes, normalization, train_set, last - start_iter, elapsed, stopped_early, last)
    comm.synchronize()


class _Args:
    """What detectron2's default_setup reads from argparse args."""

    def __init__(self, tc: TrainConfig):
        self.config_file, self.eval_only, self.resume = tc.config, False, tc.resume

    def __repr__(self) -> str:  # detectron2 logs the command line's arguments
        return f"--config {self.config_file}{' --resume' if self.resume else ''}"


def write_model_dir(tc, cfg, classes, normalization, train_set, iters, elapsed, stopped_early, last_iter) -> Path:
    out = Path(tc.out)
    work = Path(cfg.OUTPUT_DIR)
    best = work / "model_best.pth"
    source = best if best.exists() else work / "model_final.pth"
    shutil.copyfile(source, out / "model_final.pth")
    final = cfg.clone()
    final.defrost()
    final.MODEL.WEIGHTS = ""
    final.DATASETS.TRAIN, final.DATASETS.TEST = (), ()
    (out / "config.yaml").write_text(final.dump())
    crop = training_crop(tc)  # the size the model was trained at, where images were larger
    # the size of the median training image, as trained (each image counts: a few odd-sized crops beside many whole
    # slices trained at the crop must not set it, as a median of the distinct sizes let them)
    sizes = sorted(min(max(r["height"], r["width"]), crop or np.inf) for r in train_set.records)
    tile = tc.tile or int(sizes[len(sizes) // 2])
    metrics = _last_eval(work)
    model = ModelDir(
        path=out, classes=list(classes), tile=tile,
        overlap=tc.overlap if tc.overlap is not None else max(16, (tile // 8) // 2 * 2),
        pixel_size_nm=list(parse_pixel_size(tc.pixel_size)) if tc.pixel_size else None,
        exclusive=train_set.exclusive_classes(),
        normalization={"method": "percentile", "low": float(tc.percentiles[0]), "high": float(tc.percentiles[1]),
                       "training_intensities": normalization.to_dict()},  # per pixel type: [low, high]
        training={
            "config": str(tc.config), "weights": source.name, "iterations": int(iters), "last_iter": int(last_iter),
            "seconds": round(elapsed, 1), "iters_per_s": round(iters / elapsed, 4) if elapsed else None,
            "images_per_s": round(iters * cfg.SOLVER.IMS_PER_BATCH / elapsed, 3) if elapsed else None,
            "amp": tc.amp, "crop": crop, "stopped_by_time_limit": stopped_early and not _STOP["signal"],
            "stopped_by_signal": _STOP["signal"] if stopped_early else None, "train_images": len(train_set.records),
            "skipped": dict(train_set.skipped), "validation": metrics,
        },
    )  # fmt: skip
    model.save()
    return out


def _last_eval(work: Path) -> dict | None:
    """The last COCO evaluation detectron2 logged to metrics.json (segm/... and bbox/... scalars)."""
    import json

    path = work / "metrics.json"
    if not path.exists():
        return None
    last = None
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if any(k.startswith("segm/") for k in row):
            last = {k: (None if isinstance(v, float) and v != v else v)  # NaN (no such objects) is not JSON
                    for k, v in row.items() if k.startswith(("segm/", "bbox/")) or k == "iteration"}  # fmt: skip
    return last


# -- processes ----------------------------------------------------------------------------------------------------


def _cpu_worker(local_rank, main_func, world, procs, machine_rank, dist_url, args):
    import torch
    import torch.distributed as dist

    detectron2_ready()
    from detectron2.engine import defaults
    from detectron2.utils import comm

    rank = machine_rank * procs + local_rank
    dist.init_process_group("gloo", init_method=dist_url, world_size=world, rank=rank, timeout=timedelta(minutes=30))
    for machine in range(world // procs):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(machine * procs, (machine + 1) * procs)))
        if machine == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    # DefaultTrainer wraps the model with device_ids=[local_rank]; a CPU model takes none
    original = defaults.create_ddp_model
    defaults.create_ddp_model = lambda model, **kw: original(model, **{**kw, "device_ids": None})
    comm.synchronize()
    main_func(*args)


def _user_errors_to(errors: str, main_func, *args) -> None:
    """Runs ``main_func`` in a training process: a UserError raised there (or in its data loader's workers, which
    torch raises again with their traceback inside the message) is written as one line to a file in ``errors``, for
    the launching process to print instead of torch's traceback, and raised again to end the process."""
    try:
        main_func(*args)
    except UserError as e:
        line = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        line = line.split("UserError: ", 1)[-1] if "Original Traceback" in str(e) else line
        (Path(errors) / f"{os.getpid()}.txt").write_text(line)
        raise UserError(line) from None


@contextmanager
def _one_line_from_children():
    """A folder for ``_user_errors_to``: where a training process ended with a UserError, the launching process
    raises it (the first one written) as one line, not torch's report of the process that failed."""
    with tempfile.TemporaryDirectory(prefix="cellseg-train-errors-") as errors:
        try:
            yield errors
        except UserError:
            raise
        except Exception:
            written = sorted(Path(errors).glob("*.txt"), key=lambda p: p.stat().st_mtime_ns)
            if written:
                raise UserError(written[0].read_text()) from None
            raise


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def launch(main_func, args: tuple, tc: TrainConfig) -> None:
    """detectron2's ``launch`` on GPUs; on CPUs the same process layout with gloo (v0.6's launch needs CUDA)."""
    detectron2_ready()
    world = (tc.num_gpus or tc.cpu_procs) * tc.num_machines
    if world == 1 and not tc.num_gpus:
        main_func(*args)
        return
    dist_url = _dist_url(tc)
    with _one_line_from_children() as errors:
        main_func, args = _user_errors_to, (errors, main_func, *args)
        if tc.num_gpus:
            from detectron2.engine import launch as d2_launch

            d2_launch(main_func, tc.num_gpus, tc.num_machines, tc.machine_rank, dist_url=dist_url, args=args)
            return
        import torch.multiprocessing as mp

        mp.start_processes(_cpu_worker, nprocs=tc.cpu_procs, start_method="spawn",
                           args=(main_func, world, tc.cpu_procs, tc.machine_rank, dist_url, args))  # fmt: skip


def _dist_url(tc: TrainConfig) -> str:
    if tc.dist_url != "auto":
        return tc.dist_url
    if tc.num_machines > 1:
        raise UserError("with --num-machines > 1, pass --dist-url tcp://HEAD_HOST:PORT (the same on every machine)")
    return f"tcp://127.0.0.1:{_free_port()}"


def train(tc: TrainConfig) -> Path:
    """Validate everything a user can get wrong here, in this process, then launch the training processes (the
    options' values were checked by ``config.check_options``; an API caller's are checked here)."""
    check_options("train", asdict(tc))
    check_output_folder(tc.out)
    import torch

    if tc.num_gpus and not torch.cuda.is_available():
        raise UserError(f"--num-gpus {tc.num_gpus}: no CUDA GPU is visible; use --cpu-procs N to train on CPUs")
    if tc.num_gpus and tc.num_gpus > torch.cuda.device_count():
        raise UserError(f"--num-gpus {tc.num_gpus}: only {torch.cuda.device_count()} GPUs are visible")
    if tc.num_machines > 1 and not 0 <= tc.machine_rank < tc.num_machines:
        raise UserError(f"--machine-rank {tc.machine_rank} must be in 0..{tc.num_machines - 1}")
    detectron2_ready()
    train_set = load_coco(tc.train, tc.images)
    print(train_set.summary())
    check_class_names(train_set.classes)  # here, not when the trained model's first run writes its layers
    if tc.val:
        val_set = load_coco(tc.val, tc.val_images or tc.images, classes=train_set.classes,
                            images_option="--val-images" if tc.val_images else "--images")  # fmt: skip
        print(val_set.summary())
        if not any(r["annotations"] for r in val_set.records):
            raise UserError(f"--val {tc.val} has no usable annotation of the training classes "
                            f"({', '.join(train_set.classes)}; its categories: {', '.join(val_set.categories)}; see "
                            "the summary above)")  # fmt: skip
    if not any(r["annotations"] for r in train_set.records):
        raise UserError(f"{tc.train} has no usable annotation (see the summary above)")
    out = Path(tc.out)
    manifest = out / MANIFEST
    if manifest.exists() and not tc.resume:
        raise UserError(f"{out} already holds a model; pass --resume to continue its training or choose another --out")
    if manifest.exists() and (before := load_json(manifest).get("classes")) != train_set.classes:
        # the checkpoint's heads would keep their classes' order under other names, or be started over
        raise UserError(f"--resume: {out} was trained on classes {', '.join(map(str, before or []))}, but {tc.train} "
                        f"has {', '.join(train_set.classes)}; resume with the same classes, or train a new --out")  # fmt: skip
    if tc.resume and not (out / "train" / "last_checkpoint").exists():
        # not refused: a job script that always passes --resume (a requeued SLURM job) starts this way the first time
        logging.getLogger("cellseg_batch").warning(
            f"--resume: {out} holds no checkpoint yet (no {out / 'train' / 'last_checkpoint'}); training starts at "
            "iteration 0 from the weights")
    device = "cuda" if tc.num_gpus else "cpu"
    build_cfg(tc, train_set.classes, device)  # config errors and weights downloads surface here, once
    # every image read (seconds for thousands): after the quick checks above
    normalization = training_normalization(train_set.records, tc.percentiles, more=val_set.records if tc.val else [])
    out.mkdir(parents=True, exist_ok=True)  # only now: a mistake found above leaves no folder behind
    _STOP["signal"] = None
    replaced = _stop_on_signals()
    try:
        launch(train_main, (tc, train_set.classes, device, normalization), tc)
    finally:  # the caller's handlers again (the demo goes on to `run`, which a SIGTERM must stop as usual)
        for sig, handler in replaced.items():
            signal.signal(sig, handler)
    return out

