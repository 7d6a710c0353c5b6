"""The ``detectron2`` predictor: a trained Mask R-CNN from a model directory, several tiles per forward pass.

Speed, same weights (measured in benchmarks/REPORT.md):
- the model runs in channels-last memory format: oneDNN's convolutions and group norm are faster on NHWC tensors
  on the CPU (and tensor cores want it on GPUs); the detections are the same;
- greyscale tiles go in as one channel, not three equal ones: the ResNet stem's kernel is summed over its input
  channels (``fold_grey_input``), the same result to float rounding at a third of the stem's input;
- ``amp``: mixed precision, float16 on a CUDA GPU, bfloat16 on a CPU that has bfloat16 instructions (AVX512-BF16,
  AMX). Not bit-identical: masks move by a pixel here and there; the benchmark checks mask AP against fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import numpy as np

from ..d2compat import detectron2_ready
from ..errors import UserError
from ..model_dir import ModelDir
from ..tiles import Box
from .base import (
    Plan,
    Predictor,
    PredictorSpec,
    TileLabels,
    exclusive_groups,
    exclusive_layers,
    given,
    paint_instances,
    register,
)

# A detection that keeps less than half its mask once higher-scoring detections (of its class, or of a class it
# excludes) are painted over it is dropped: it duplicates another object under another class, or its box spans two
# objects; what would be left of it is a sliver, a false object in 3D.
MIN_VISIBLE = 0.5


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    return device


def load_config(model: ModelDir, device: str = "cpu", score_threshold: float | None = None):
    """The model directory's detectron2 config, set up for tiled inference on ``device`` (no test-time resize)."""
    detectron2_ready()
    from detectron2.config import get_cfg

    cfg = get_cfg()
    try:
        cfg.merge_from_file(str(model.config_path))
    except Exception as e:
        raise UserError(f"{model.config_path} is not a detectron2 config this version can read ({e})") from e
    cfg.MODEL.WEIGHTS = str(model.weights_path)
    cfg.MODEL.DEVICE = device
    if score_threshold is not None:
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    check_class_count(model, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
    return cfg


def check_class_count(model: ModelDir, num_classes: int | None) -> None:
    """cellseg.json's classes against the config's MODEL.ROI_HEADS.NUM_CLASSES (None: not known yet)."""
    if num_classes is not None and len(model.classes) != num_classes:
        raise UserError(f"{model.path}: cellseg.json lists {len(model.classes)} classes but the config has "
                        f"MODEL.ROI_HEADS.NUM_CLASSES={num_classes}; correct one of them")  # fmt: skip


def written_class_count(model: ModelDir) -> int | None:
    """MODEL.ROI_HEADS.NUM_CLASSES as the model's config.yaml writes it, read without detectron2 (the driver does
    not import it), so that a mismatch is refused before the actors start; None where the file leaves it to a
    _BASE_ or the defaults (the actors check the merged config)."""
    import yaml

    try:
        return int(yaml.safe_load(model.config_path.read_text())["MODEL"]["ROI_HEADS"]["NUM_CLASSES"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


@register("detectron2")
class Detectron2Predictor(Predictor):
    rescales = True

    def __init__(self, model_dir: str, device: str = "auto", score_threshold: float | None = None, amp: bool = False,
                 exclusive: list[list[str]] | None = None, min_visible: float = MIN_VISIBLE,
                 zoom: tuple[float, float] | None = None):  # fmt: skip
        import torch

        detectron2_ready()
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.model_dir = ModelDir.load(model_dir)
        self.classes = list(self.model_dir.classes)
        self.device = pick_device(device)
        self.cfg = load_config(self.model_dir, self.device, score_threshold)
        self.amp_dtype = amp_dtype(self.device) if amp else None
        self.model = build_model(self.cfg).eval()
        DetectionCheckpointer(self.model).load(self.cfg.MODEL.WEIGHTS)
        self.model.to(memory_format=torch.channels_last)
        self.channels = fold_grey_input(self.model)
        self._torch = torch
        self.times = {"forward": 0.0, "paint": 0.0}
        self.exclusive = [list(g) for g in exclusive or []]
        self.layer_of = np.array(exclusive_layers(self.classes, self.exclusive))
        self.min_visible = min_visible
        self.zoom = tuple(zoom) if zoom and tuple(zoom) != (1.0, 1.0) else None

    def settings(self) -> dict:
        return {"device": str(self.cfg.MODEL.DEVICE), "score_threshold": float(self.cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST),
                "amp": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype is not None else None,
                "exclusive": self.exclusive, "detections_per_tile": int(self.cfg.TEST.DETECTIONS_PER_IMAGE)}  # fmt: skip

    @classmethod
    def plan(cls, options, volume) -> Plan:
        if not options.model:
            raise UserError("--model DIR is required (a model directory written by `cellseg-batch train`)")
        model = ModelDir.load(options.model)
        check_class_count(model, written_class_count(model))
        norm = model.normalization
        # --exclusive, else what `train` found in the annotations
        exclusive = exclusive_groups(options.exclusive, model.classes, str(model.path), model.exclusive)
        return Plan(
            spec=PredictorSpec(
                cls.name,  # a subclass registered under another name is built as itself in the actors
                {"model_dir": str(model.path.resolve()), "device": options.device,
                 "score_threshold": options.score_threshold, "amp": options.amp,
                 "exclusive": exclusive},
            ),  # fmt: skip
            classes=list(model.classes),
            needs_image=True,
            tile=options.tile or model.tile,
            overlap=options.overlap if options.overlap is not None else model.overlap,
            percentiles=(float(norm.get("low", 1.0)), float(norm.get("high", 99.5))),
            pixel_size_nm=tuple(model.pixel_size_nm) if model.pixel_size_nm else None,
            identity=cls._identity(model),
            uses_gpu=True,
            ignored=given(options, "--labels", "--classes"),
            layer_of=exclusive_layers(model.classes, exclusive),
        )

    @staticmethod
    def _identity(model: ModelDir) -> dict:
        stat = model.weights_path.stat()
        return {"weights": [str(model.weights_path.resolve()), stat.st_size, stat.st_mtime_ns],
                "config": model.config_path.read_text()}  # fmt: skip

    @classmethod
    def identity_now(cls, plan: Plan) -> dict:
        return cls._identity(ModelDir.load(plan.spec.options["model_dir"]))

    @classmethod
    def rescaled(cls, plan: Plan, zoom: tuple[float, float], options) -> Plan:
        def volume_pixels(model_pixels: int, even: bool) -> int:
            step = 2 if even else 1
            return max(step, step * round(model_pixels / min(zoom) / step))

        return replace(
            plan, zoom=tuple(zoom), spec=replace(plan.spec, options={**plan.spec.options, "zoom": list(zoom)}),
            tile=options.tile or volume_pixels(plan.tile, False),
            overlap=options.overlap if options.overlap is not None else volume_pixels(plan.overlap, True),
        )  # fmt: skip

    def set_threads(self, threads: int) -> None:
        self._torch.set_num_threads(max(1, threads))

    def predict(self, z: int, windows: list[Box], images: list[np.ndarray] | None) -> list[TileLabels]:
        torch = self._torch
        # a window of one value (a blank or missing section, zero fill around registered ones, a saturated slice)
        # holds no structure: the model is not asked, since it finds objects in a black tile (a slice of zeros read
        # as two cells over 80% of it, which linking then joined to every cell above and below)
        blank = [not image.size or image.min() == image.max() for image in images]
        inputs = []
        for image in (image for image, empty in zip(images, blank) if not empty):
            # greyscale -> the 3 channels the backbone was built for; the tile keeps its size unless --rescale
            t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
            height, width = t.shape
            if self.zoom:  # to the model's pixel size; detectron2 pastes the masks back at (height, width)
                size = (max(1, round(height * self.zoom[0])), max(1, round(width * self.zoom[1])))
                t = torch.nn.functional.interpolate(t[None, None], size=size, mode="bilinear", antialias=True,
                                                    align_corners=False)[0, 0]  # fmt: skip
            inputs.append({"image": t.expand(self.channels, *t.shape), "height": height, "width": width})
        t0 = time.perf_counter()
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        with torch.inference_mode(), torch.autocast(device_type, self.amp_dtype, enabled=self.amp_dtype is not None):
            outputs = iter(self.model(inputs) if inputs else [])
        t1 = time.perf_counter()
        result = []
        for image, empty in zip(images, blank):
            if empty:
                result.append(paint_instances(np.zeros((0, *image.shape), bool), [], [], len(self.classes)))
                continue
            inst = next(outputs)["instances"]
            result.append(
                replace(paint_instances(
                    inst.pred_masks,
                    inst.pred_classes.cpu().numpy(),
                    inst.scores.float().cpu().numpy(),
                    len(self.classes),
                    boxes=inst.pred_boxes.tensor.float().cpu().numpy(),
                    layer_of=self.layer_of,
                    min_visible=self.min_visible,
                ), capped=len(inst) >= self.cfg.TEST.DETECTIONS_PER_IMAGE)  # detectron2 keeps the top ones by score
            )
        self.times["forward"] += t1 - t0
        self.times["paint"] += time.perf_counter() - t1
        return result

    def step_times(self) -> dict[str, float]:
        times, self.times = self.times, {"forward": 0.0, "paint": 0.0}
        return times


def fold_grey_input(model) -> int:
    """Let ``model`` take greyscale tiles as one channel where that gives the same result; returns the number of
    input channels it takes now (1, or 3 where it is left as it was).

    A greyscale tile reaches the model as three equal channels. Where the pixel mean and std are the same for the
    three (``configs/base_em.yaml``: 128 and 64), the normalized channels are equal too, and a convolution of three
    equal channels is the convolution of one with the kernel summed over its input channels; zero padding stays
    zero. So the ResNet stem's first convolution (detectron2's ``BasicStem``) gets the summed kernel and the
    pixel mean and std one channel: the same features to float rounding, and a stem about twice as fast on the
    CPU. Other backbones, and per-channel means (ImageNet's), are left as they are."""
    import torch

    stem = getattr(getattr(model.backbone, "bottom_up", None), "stem", None)
    conv = getattr(stem, "conv1", None)
    mean, std = model.pixel_mean.flatten(), model.pixel_std.flatten()
    if (not isinstance(conv, torch.nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1 or len(mean) != 3
            or len(std) != 3 or not bool((mean == mean[0]).all() and (std == std[0]).all())):  # fmt: skip
        return 3
    with torch.no_grad():
        weight = conv.weight.sum(1, keepdim=True).contiguous(memory_format=torch.channels_last)
    conv.weight = torch.nn.Parameter(weight, requires_grad=False)
    conv.in_channels = 1
    conv.register_forward_pre_hook(_one_channel_as_channels_last)
    model.pixel_mean = model.pixel_mean[:1].clone()
    model.pixel_std = model.pixel_std[:1].clone()
    return 1


def _one_channel_as_channels_last(conv, args):
    """A one-channel NCHW batch is also channels-last in memory, but its strides say NCHW, and oneDNN then writes
    the stem's output NCHW: the stem's norm and pooling run on NCHW and res2 converts back, which costs more than
    the fold saves. Strides that say channels-last (the same memory) keep the whole backbone channels-last."""
    (x,) = args
    if x.dim() == 4 and x.shape[1] == 1 and x.is_contiguous():
        x = x.as_strided(x.shape, (x.stride(0), 1, x.stride(2), x.stride(3)))
    return (x,)


def amp_dtype(device: str):
    """The mixed-precision type for ``device``: float16 on CUDA, bfloat16 on a CPU with native bfloat16; None
    (full precision, with a warning) on a CPU without it, where bfloat16 would be emulated and slower."""
    import torch

    if device.startswith("cuda"):
        return torch.float16
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    logging.getLogger("cellseg_batch").warning("--amp: this CPU has no native bfloat16; running in float32")
    return None
