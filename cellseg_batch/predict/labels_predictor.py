"""The ``labels`` predictor: serves existing 2D instance label stacks tile by tile, one layer per class.

With it, segmentations made by any other tool are stitched and linked into 3D by the same pipeline, and the
stitching is checked against ground truth with no model involved.
"""

from __future__ import annotations

import fastremap
import numpy as np

from ..errors import UserError
from ..read import (
    LabelLayer,
    check_label_stack,
    open_label_layers,
    refuse_other_background,
    refuse_top_background,
    volume_identity,
)
from ..runs import label_runs
from ..tiles import Box
from .base import (
    LOCAL_ID,
    MAX_LOCAL,
    Plan,
    Predictor,
    PredictorSpec,
    TileLabels,
    exclusive_groups,
    exclusive_layers,
    given,
    register,
)

DEFAULT_TILE, DEFAULT_OVERLAP = 1024, 32  # exact labels need only a few shared pixels to match


@register("labels")
class LabelsPredictor(Predictor):
    needs_image = False

    def __init__(self, layers: list[LabelLayer], layer_of: list[int] | None = None):
        self.layers = layers
        self.classes = [name for layer in layers for name in layer.class_names]
        self.layer_of = list(layer_of) if layer_of else list(range(len(self.classes)))

    @classmethod
    def plan(cls, options, volume) -> Plan:
        if not options.labels:
            raise UserError("--predictor labels needs --labels PATH (and --classes after each plain label stack)")
        layers = open_label_layers(options.labels, options.classes)
        for layer in layers:
            if layer.volume.shape != volume.shape:
                raise UserError(
                    f"label stack {layer.volume.path} has shape {layer.volume.shape} but the volume has {volume.shape}"
                )
            check_label_stack(layer)
        classes = [n for layer in layers for n in layer.class_names]
        layer_of = _exclusive_layers(options.exclusive, layers, classes)
        return Plan(
            spec=PredictorSpec(cls.name, {"layers": layers, **({"layer_of": layer_of} if layer_of else {})}),
            classes=classes,
            needs_image=False,
            tile=options.tile or DEFAULT_TILE,
            overlap=options.overlap if options.overlap is not None else DEFAULT_OVERLAP,
            identity=cls._identity(layers),
            layer_of=layer_of,
            ignored=given(options, "--model", "--score-threshold", "--amp"),
        )

    @staticmethod
    def _identity(layers) -> dict:
        return {"stacks": [[volume_identity(layer.volume), layer.classes] for layer in layers]}

    @classmethod
    def identity_now(cls, plan: Plan) -> dict:
        return cls._identity(plan.spec.options["layers"])


    def predict(self, z: int, windows: list[Box], images=None) -> list[TileLabels]:
        return [self._tile(z, w) for w in windows]

    def _tile(self, z: int, window: Box) -> TileLabels:
        layers = np.zeros((len(self.classes), *window.shape), dtype=LOCAL_ID)
        classes: list[np.ndarray] = []
        offset = 0
        for layer in self.layers:
            ids = layer.volume.read(z, *window)
            # every tile read is checked, not only the slices check_label_stack saw when the run started
            refuse_other_background(layer.volume.path, ids, z)
            local, original = renumber(ids)  # original: local id -> the stack's id
            if ids.dtype.kind in "ui" and original.max() == np.iinfo(ids.dtype).max:  # rare: the check costs then
                refuse_top_background(layer.volume.path, ids, z)
            n = len(original) - 1
            if offset + n > MAX_LOCAL:
                # a tile's ids shrink with its area: a side that would hold ~half the limit at this density
                side = max(16, int(max(window.shape) * (MAX_LOCAL / 2 / (offset + n)) ** 0.5) // 16 * 16)
                raise UserError(f"a {window.shape[0]} x {window.shape[1]} px tile of slice {z} holds {offset + n} "
                                f"label ids, more than the {MAX_LOCAL} a tile can; use a smaller tile, e.g. "
                                f"--tile {side}")  # fmt: skip
            cls = layer.classify(original[1:], self.classes)
            if (cls < 0).any():
                raise UserError(
                    f"label id {int(original[1:][cls < 0][0])} in slice {z} of {layer.volume.path} has no class in "
                    "its class map"
                )
            # each class's ids into its own layer (classes of one stack that exclude one another share a layer),
            # numbered after the stacks before
            target = np.asarray(self.layer_of)[cls]
            if n and offset == 0 and (target == target[0]).all():
                layers[target[0]] = local
            elif n:
                # from the stack's foreground pixels only: a lookup over the whole window (np.take) casts every
                # index to intp first, 2-6 ms per class and tile, where organelles cover a few % of it
                flat = local.reshape(-1)
                where = np.flatnonzero(flat != 0)  # through a bool mask: 5x faster than on the ids
                ids = flat[where].astype(LOCAL_ID)  # + offset must not wrap a uint8
                layer_of_pixel = target[ids - 1]
                for layer in np.unique(target):
                    mine = layer_of_pixel == layer
                    layers[layer].reshape(-1)[where[mine]] = ids[mine] + offset
            classes.append(cls)
            offset += n
        cls_all = np.concatenate(classes) if classes else np.zeros(0, np.int16)
        return TileLabels(layers, cls_all, np.ones(len(cls_all), dtype=np.float32))


def renumber(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(local, original): a 2D label image's ids renumbered 1..n in the order they first appear (raster order), 0
    kept as 0, as ``fastremap.renumber`` numbers them; ``original[k]`` is the id local k stands for (``original[0]``
    is 0). Label images come in runs along rows, so the ids are renumbered per run and the runs spread back: 0.7-1.1
    against 1.55 ms with fastremap for a 1088² window of the benchmark's stacks (measured); a noise-like image
    (``runs.label_runs`` finds none) through fastremap."""
    runs = label_runs(ids)
    id_type = np.uint64 if ids.dtype == np.uint64 else np.int64  # uint64 ids from 2**63 up kept as they are
    if runs is None:
        local, mapping = fastremap.renumber(ids, preserve_zero=True, in_place=False)
        original = np.zeros(len(mapping) + (0 not in mapping), id_type)
        for orig, new in mapping.items():
            original[new] = orig
        return local, original
    ids_of_runs = runs.values[0]
    unique, first, which = np.unique(ids_of_runs, return_index=True, return_inverse=True)
    labelled = np.flatnonzero(unique != 0)
    order = labelled[np.argsort(first[labelled], kind="stable")]  # labelled ids, in the order they first appear
    new = np.zeros(len(unique), np.min_scalar_type(len(order)))
    new[order] = np.arange(1, len(order) + 1)
    original = np.zeros(len(order) + 1, id_type)
    original[1:] = unique[order]
    return np.repeat(new[which.reshape(-1)], runs.lengths).reshape(ids.shape), original


def _exclusive_layers(option: list[str] | None, layers: list[LabelLayer], classes: list[str]) -> tuple[int, ...] | None:
    """``--exclusive A,B``: classes of one label stack (its class map) that may stand for the same object, e.g. a
    2D tool that calls a mitochondrion an alpha granule in some slices: they share a layer, so that stitching and
    linking follow the object across the change and it takes the class of most of its voxels."""
    groups = exclusive_groups(option, classes, "the --labels stacks")
    for group in groups:
        if len({i for i, layer in enumerate(layers) for c in group if c in layer.class_names}) > 1:
            raise UserError(f"--exclusive {','.join(group)}: these classes come from different --labels stacks, whose "
                            "pixels may overlap; only classes of one stack (one class map) exclude one another")  # fmt: skip
    return exclusive_layers(classes, groups) if groups else None
