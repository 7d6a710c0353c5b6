"""The predictor contract: what a predictor returns for a tile, the registry, and painting overlapping masks."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np

from ..errors import UserError
from ..registry import Registry
from ..tiles import Box
from ..write import layer_name

# Local instance ids of a tile are uint16: a tile holds far fewer than 65535 instances (Mask R-CNN keeps 100-1000).
LOCAL_ID = np.uint16
MAX_LOCAL = np.iinfo(LOCAL_ID).max


@dataclass
class TileLabels:
    """A tile's instances: one label image per class (classes nest, so each has its own layer).

    ``labels[c]`` holds local ids 1..n of class c's instances (0 = none); ids are unique across layers, and
    ``classes[i - 1]`` / ``scores[i - 1]`` belong to local id i. Coordinates are the tile window's. Classes that
    exclude one another (``Plan.layer_of``) share the layer of the first of them: there, the instances of all of
    them, told apart by ``classes`` (the others' layers are empty). Stitching and linking then see a detection's
    class flip between tiles or slices as the same object; the object takes the class of most of its voxels,
    counting the runner-up classes below by score.
    """

    labels: np.ndarray  # (n_classes, h, w) uint16
    classes: np.ndarray  # (n,) int16
    scores: np.ndarray  # (n,) float32
    capped: bool = False  # the predictor gave the most instances it gives a tile: more may have been dropped
    # Where classes exclude one another, a model often gives one object twice, under two classes; the lower-scoring
    # detection is dropped (``paint_instances``), and its class and score stay with the instance it lay under, as
    # evidence for the object's class vote in 3D: (n,) int16, -1 where none, and (n,) float32.
    alt_classes: np.ndarray | None = None
    alt_scores: np.ndarray | None = None

    @property
    def count(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class PredictorSpec:
    """What the driver sends to each worker to build the same predictor there: a registry name and options."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    module: str | None = None  # imported on the worker first: it registers a predictor from outside this package


@dataclass
class Plan:
    """What the driver settles before any worker starts: how to build the predictor, and what it implies."""

    spec: PredictorSpec
    classes: list[str]
    needs_image: bool
    tile: int
    overlap: int
    percentiles: tuple[float, float] = (1.0, 99.5)
    pixel_size_nm: tuple[float, float, float] | None = None
    identity: dict[str, Any] = field(default_factory=dict)  # what a resume must find unchanged (files, sizes)
    layer_of: tuple[int, ...] | None = None  # class -> its label layer, where classes exclude one another (TileLabels)
    uses_gpu: bool = False  # actors get one GPU each where the cluster has GPUs
    zoom: tuple[float, float] = (1.0, 1.0)  # (y, x) volume pixels -> model pixels (--rescale; ``Predictor.rescaled``)
    ignored: tuple[str, ...] = ()  # options given that this predictor does not use (``given``): warned about


def given(options, *flags: str) -> tuple[str, ...]:
    """Those of ``flags`` (``--score-threshold``) that the run's options set: for ``Plan.ignored``."""
    return tuple(f for f in flags if getattr(options, f.lstrip("-").replace("-", "_"), None))


class Predictor(ABC):
    """Turns tile windows into TileLabels. Subclasses register with ``@register("name")``.

    ``needs_image``: whether ``predict`` gets the normalized image windows (the labels predictor reads its own).
    ``plan`` validates the run's options in the driver, cheaply (no model is loaded there).
    """

    name: ClassVar[str]
    needs_image: ClassVar[bool] = True
    rescales: ClassVar[bool] = False  # whether ``rescaled`` can feed it tiles at the model's pixel size (--rescale)
    classes: list[str]

    @classmethod
    @abstractmethod
    def plan(cls, options, volume) -> Plan:
        """Check ``options`` (the run configuration) against ``volume`` and say how to build this predictor."""

    @abstractmethod
    def predict(self, z: int, windows: list[Box], images: list[np.ndarray] | None) -> list[TileLabels]:
        """Instances of the windows of slice z; ``images`` are float32 (h, w) in [0, 255] after normalization."""

    @classmethod
    def rescaled(cls, plan: Plan, zoom: tuple[float, float], options) -> Plan:
        """``plan`` for a volume whose pixels are ``zoom`` (y, x) times the model's in size (--rescale): windows
        are resized by ``zoom`` before the model and its instances come back at the volume's pixels. Tile and
        overlap not given by the user are scaled so that the model sees tiles of its own size."""
        raise NotImplementedError(f"{cls.name} sets rescales but does not implement rescaled")

    @classmethod
    def identity_now(cls, plan: Plan):
        """``plan.identity`` as the predictor's inputs are now (a run checks before it finishes its output that none
        was rewritten while it read them), without ``plan``'s checks. Default: as planned (not checked again)."""
        return plan.identity

    def set_threads(self, threads: int) -> None:  # noqa: B027 - optional hook, most predictors use one thread
        """How many CPU threads this predictor may use (its actor reserved that many cores)."""

    def settings(self) -> dict:
        """What this predictor uses as built in its actor, where the options left the choice to the model or the
        machine (a device, a threshold from the model's config), for the run report. Optional."""
        return {}

    def step_times(self) -> dict[str, float]:
        """Seconds spent in named steps of ``predict`` (e.g. forward, paint) since the last call, for the run
        report's time per tile. Optional: without it the report shows ``predict`` as one step."""
        return {}


PREDICTORS = Registry("predictor")  # name -> Predictor subclass


def register(name: str):
    """Class decorator: ``@register("name")`` names a Predictor subclass and adds it to PREDICTORS."""

    def add(cls: type[Predictor]) -> type[Predictor]:
        cls.name = name
        return PREDICTORS.register(name, cls)

    return add


def resolve_predictor(name: str) -> type[Predictor]:
    """A registered predictor class; ``MODULE:NAME`` imports MODULE first, for predictors that register
    themselves from outside this package (``@register("NAME")``), e.g. ``--predictor mylab.models:unet``."""
    if ":" in name:
        module, _, name = name.rpartition(":")
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise UserError(f"--predictor: cannot import {module!r} ({e}); is it on PYTHONPATH on every node?") from e
    if name not in PREDICTORS:
        raise UserError(f"unknown predictor {name!r}; choose one of {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[name]


def build_predictor(spec: PredictorSpec) -> Predictor:
    if spec.module:
        importlib.import_module(spec.module)
    if spec.name not in PREDICTORS:
        raise UserError(f"unknown predictor {spec.name!r}; choose one of {', '.join(sorted(PREDICTORS))}")
    return PREDICTORS[spec.name](**spec.options)


def exclusive_groups(option: list[str] | None, classes: list[str], where: str,
                     default: list[list[str]] | None = None) -> list[list[str]]:
    """Groups of classes that exclude one another (a pixel is never two of them): ``--exclusive A,B`` (repeated
    for more groups; ``none``: no group) where given, else ``default``; every name (made a layer name as ``train``
    makes them: ``alpha granule`` is ``alpha_granule``) must be one of ``classes`` (``where`` says whose)."""
    if option is None:
        groups = default or []
    elif option == ["none"]:
        groups = []
    else:
        if "none" in option:
            raise UserError("--exclusive none stands alone: it turns every group off; leave out the other groups")
        groups = [[layer_name(c, "--exclusive") for c in item.split(",") if c.strip()] for item in option]
    seen: dict[str, int] = {}
    for k, group in enumerate(groups):
        unknown = [c for c in group if c not in classes]
        if unknown:
            raise UserError(f"--exclusive: {', '.join(unknown)} is not a class of {where} ({', '.join(classes)})")
        if option is not None and len(set(group)) < 2:  # a group of one excludes nothing: a typo of a pair, most likely
            raise UserError(f"--exclusive {','.join(group)}: a group needs two classes or more (A,B)")
        for c in set(group):
            if seen.setdefault(c, k) != k:  # two groups sharing a class are one group: their layers would disagree
                raise UserError(f"--exclusive: {c} is in two groups; give classes that exclude one another as one "
                                f"group: --exclusive {','.join(dict.fromkeys(groups[seen[c]] + group))}")  # fmt: skip
    return [list(dict.fromkeys(g)) for g in groups if len(set(g)) > 1]


def exclusive_layers(classes: list[str], groups: list[list[str]]) -> tuple[int, ...]:
    """Class index -> label layer: the classes of one exclusive group share the layer of the first of them."""
    layer_of = list(range(len(classes)))
    for group in groups:
        first = min(classes.index(c) for c in group)
        for c in group:
            layer_of[classes.index(c)] = first
    return tuple(layer_of)


def paint_instances(masks, classes, scores, n_classes: int, boxes=None, layer_of=None,
                    min_visible: float = 0.0) -> TileLabels:
    """Overlapping instance masks -> per-class label layers where, per pixel, the highest-scoring instance wins.

    ``masks`` is an (n, h, w) bool numpy array or torch tensor (a CUDA tensor is painted on its device).
    ``boxes`` (n, 4) x0, y0, x1, y1, where given, bound where each mask can be nonzero (saves work on the CPU).
    ``layer_of`` (n_classes,) ints: classes with the same number exclude one another (e.g. mitochondria and alpha
    granules: a pixel is never both) and are painted into one shared layer, layer ``layer_of[c]`` (the lowest
    class index of the group), so the highest-scoring instance wins across them too; by default every class has
    its own layer (classes nest: a mitochondrion inside its cell).
    ``min_visible``: an instance that keeps less than this share of its mask once higher-scoring ones are painted
    over it is dropped, not kept as a sliver (a duplicate of another class, or a box spanning two objects).
    Instances left with no visible pixel are dropped and ids renumbered so local ids stay dense. Equal scores are
    broken by input order, so the result is deterministic. A dropped instance of another class whose mask lies
    mostly under a kept one is that one's runner-up class (``alt_classes``, ``alt_scores``: the best such).
    """
    n = len(classes)
    h, w = masks.shape[-2:]
    if n > MAX_LOCAL:
        raise UserError(f"a tile produced {n} instances (at most {MAX_LOCAL}); use smaller tiles")
    classes = np.asarray(classes, dtype=np.int16)
    scores = np.asarray(scores, dtype=np.float32)
    layer_of = np.arange(n_classes) if layer_of is None else np.asarray(layer_of, dtype=np.int64)
    order = np.lexsort((-np.arange(n), scores))  # ascending score: later (higher rank) wins the pixel
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    area = np.zeros(n + 1, dtype=np.int64)  # mask pixels per rank, where min_visible needs them
    on_torch = type(masks).__module__.startswith("torch")
    if n and on_torch and masks.device.type != "cpu":
        layers = _paint_torch(masks, layer_of[classes], rank, n_classes)
        if min_visible > 0:
            area[rank] = masks.flatten(1).sum(1).cpu().numpy()
    else:
        masks = masks.cpu().numpy() if on_torch else np.asarray(masks)
        layers = np.zeros((n_classes, h, w), dtype=LOCAL_ID)
        for i in order:
            y0, y1, x0, x1 = _mask_box(boxes, i, h, w)
            mask = masks[i, y0:y1, x0:x1]
            layers[layer_of[classes[i]], y0:y1, x0:x1][mask] = rank[i]
            if min_visible > 0:
                area[rank[i]] = np.count_nonzero(mask)
    # ranks -> dense local ids, in rank order, for the instances that kept enough pixels (a count, not
    # np.unique: no sort of the tile's pixels)
    visible = np.bincount(layers.ravel(), minlength=n + 1)
    present = visible > 0
    if min_visible > 0:
        present &= visible >= min_visible * area
    present[0] = False
    kept = np.flatnonzero(present)
    instance = order[kept - 1]
    alt_classes, alt_scores = _runners_up(masks, boxes, layers, classes, scores, layer_of, order, present)
    if len(kept) < n:
        remap = np.zeros(n + 1, dtype=LOCAL_ID)
        remap[kept] = np.arange(1, len(kept) + 1)
        layers = remap[layers]
    # else every instance is visible: ranks are already the dense ids
    return TileLabels(layers, classes[instance], scores[instance], alt_classes=alt_classes[kept],
                      alt_scores=alt_scores[kept])  # fmt: skip


def without_no_data(tile: TileLabels, no_data: np.ndarray, min_visible: float = 0.5) -> TileLabels:
    """The tile's instances without the pixels where the volume holds no data (``no_data``: NaN, zero fill around
    registered sections, a blanked fold); an instance left with less than ``min_visible`` of its pixels is dropped
    (a model finds "objects" in fill: a cut-off half section was labelled one cell, joined to real cells in 3D), and
    ids renumbered so local ids stay dense."""
    n = tile.count
    if not n:
        return tile
    before = np.bincount(tile.labels.ravel(), minlength=n + 1)
    labels = np.where(no_data[None], 0, tile.labels).astype(LOCAL_ID, copy=False)
    after = np.bincount(labels.ravel(), minlength=n + 1)
    keep = (after > 0) & (after >= min_visible * before)
    keep[0] = False
    index = np.flatnonzero(keep[1:])
    if len(index) < n:
        remap = np.zeros(n + 1, dtype=LOCAL_ID)
        remap[index + 1] = np.arange(1, len(index) + 1)
        labels = remap[labels]
    alt = {name: getattr(tile, name)[index] for name in ("alt_classes", "alt_scores") if getattr(tile, name) is not None}
    return replace(tile, labels=labels, classes=tile.classes[index], scores=tile.scores[index], **alt)


def _mask_box(boxes, i: int, h: int, w: int) -> tuple[int, int, int, int]:
    """The rows and columns (y0, y1, x0, x1) where mask i can be nonzero: its box, or the whole tile."""
    if boxes is None:
        return 0, h, 0, w
    bx0, by0, bx1, by1 = np.asarray(boxes[i], dtype=np.float64)
    return max(int(np.floor(by0)), 0), min(int(np.ceil(by1)) + 1, h), max(int(np.floor(bx0)), 0), min(int(np.ceil(bx1)) + 1, w)


def _runners_up(masks, boxes, layers, classes, scores, layer_of, order, present) -> tuple[np.ndarray, np.ndarray]:
    """Per rank: the class and score of the best dropped detection of another class (``present`` False) whose
    mask lies at least half under the instance of that rank, in their shared layer; -1 and 0 where none. Only
    dropped detections are looked at: few per tile (duplicates and boxes over two objects)."""
    n = len(classes)
    alt_classes, alt_scores = np.full(n + 1, -1, np.int16), np.zeros(n + 1, np.float32)
    h, w = layers.shape[-2:]
    for r in np.flatnonzero(~present[1:]) + 1:  # ranks of dropped detections, lowest score first
        i = order[r - 1]
        y0, y1, x0, x1 = _mask_box(boxes, i, h, w)
        mask = masks[i, y0:y1, x0:x1]
        mask = mask.cpu().numpy() if type(mask).__module__.startswith("torch") else np.asarray(mask)
        under = layers[layer_of[classes[i]], y0:y1, x0:x1][mask]
        if not len(under):
            continue
        count = np.bincount(under, minlength=n + 1)
        count[0] = count[r] = 0  # the background, and what the dropped one won itself
        top = int(np.argmax(count))
        if count[top] * 2 >= len(under) and present[top] and classes[order[top - 1]] != classes[i]:
            # later (higher-scoring) dropped ones overwrite: each kept instance keeps its best runner-up
            alt_classes[top], alt_scores[top] = classes[i], scores[i]
    return alt_classes, alt_scores


def _paint_torch(masks, layer: np.ndarray, rank: np.ndarray, n_layers: int) -> np.ndarray:
    """Per layer and pixel, the highest rank among the masks painted into that layer (``layer[i]``: mask i's)."""
    import torch

    h, w = masks.shape[-2:]
    layers = torch.zeros((n_layers, h, w), dtype=torch.int32, device=masks.device)
    ranks = torch.as_tensor(rank, dtype=torch.int32, device=masks.device)
    cls = torch.as_tensor(layer, dtype=torch.int64, device=masks.device)
    for start in range(0, len(rank), 32):  # bounded memory: 32 masks at a time
        m = masks[start : start + 32].to(torch.int32) * ranks[start : start + 32, None, None]
        for c in torch.unique(cls[start : start + 32]).tolist():
            sel = cls[start : start + 32] == c
            layers[c] = torch.maximum(layers[c], m[sel].amax(0))
    return layers.cpu().numpy().astype(LOCAL_ID)
