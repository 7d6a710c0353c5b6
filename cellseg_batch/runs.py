"""Runs of equal values along the rows of label images: what counting per run instead of per pixel builds on."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .errors import UserError

if TYPE_CHECKING:
    from .read import LabelLayer

SHORT_RUNS = 4  # label images whose runs average fewer pixels (noise-like) are counted pixel by pixel


class Runs(NamedTuple):
    """Runs of equal values in images of ``shape`` (``label_runs``): flat start and length of each run, and each
    image's value on it."""

    starts: np.ndarray
    lengths: np.ndarray
    values: list[np.ndarray]
    shape: tuple[int, ...]

    def joint(self, other: Runs) -> Runs:
        """The runs of this image and ``other`` (one image each, same shape) together: a run ends where either's does."""
        # both sorted: a stable sort (timsort) merges them in one pass, ~15x faster than np.union1d's quicksort
        starts = np.concatenate([self.starts, other.starts])
        starts.sort(kind="stable")
        new = np.empty(len(starts), bool)
        new[:1] = True
        np.not_equal(starts[1:], starts[:-1], out=new[1:])
        starts = starts[new]
        values = [mine.values[0][np.searchsorted(mine.starts, starts, side="right") - 1] for mine in (self, other)]
        return Runs(starts, np.diff(starts, append=int(np.prod(self.shape))), values, self.shape)


def label_runs(*images: np.ndarray) -> Runs | None:
    """Runs of equal values in all of ``images`` (same shape, 1D or 2D) in raster order, a new run at each row
    start; None where the runs average fewer than ``SHORT_RUNS`` pixels. Instance masks come in long runs (a 1024²
    cell layer: ~10k runs for 1M pixels), so what is counted per run instead of per pixel costs a comparison pass
    and little more."""
    flats = [np.ascontiguousarray(im).reshape(-1) for im in images]
    change = np.empty(flats[0].size, bool)
    if change.size:
        change[0] = True
        np.not_equal(flats[0][1:], flats[0][:-1], out=change[1:])
        if len(flats) > 1:
            differs = np.empty(change.size - 1, bool)
            for flat in flats[1:]:
                change[1:] |= np.not_equal(flat[1:], flat[:-1], out=differs)
        change[:: max(1, images[0].shape[-1])] = True
    starts = np.flatnonzero(change)
    if len(starts) * SHORT_RUNS > change.size:
        return None
    return Runs(starts, np.diff(starts, append=change.size), [flat[starts] for flat in flats], images[0].shape)


def refuse_masks(layer: LabelLayer, side: int = 1024) -> None:
    """Refuse a semantic mask given as a label stack: an id in many separate pieces in a slice (a pixel classifier's
    binary output). Each id of a tile is one 2D instance (pieces of one object that a tile window cuts apart, joined
    outside it, must stay one), so a mask's pieces would be one instance per tile and the objects would depend on the
    tile size. Checked in the central ``side`` px of the first, middle and last slices (by ``run --predictor labels``
    and ``convert labels-to-coco``, whose annotations would be such pieces too)."""
    import cc3d

    nz, h, w = layer.volume.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    for z in sorted({0, nz // 2, nz - 1}):
        ids = layer.volume.read(z, y0, min(h, y0 + side), x0, min(w, x0 + side))
        refuse_other_background(layer, ids, z)
        refuse_unmapped(layer, ids, z)
        if not ids.any():
            continue
        pieces = cc3d.connected_components(ids if ids.flags.writeable else ids.copy(), connectivity=8)
        runs = label_runs(pieces)
        of_piece = np.zeros(int(pieces.max()) + 1, np.int64)  # the id of each piece
        if runs is None:
            of_piece[pieces.reshape(-1)] = ids.reshape(-1)
        else:
            of_piece[runs.values[0]] = ids.reshape(-1)[runs.starts]
        values, counts = np.unique(of_piece[1:], return_counts=True)
        most = int(counts.argmax())
        if counts[most] >= 8 or (counts[most] >= 3 and len(values) <= 2):  # instance ids: rarely 3 pieces
            raise UserError(
                f"{layer.volume.path}: id {values[most]} covers {counts[most]} separate pieces in slice {z}; this "
                "looks like a mask, not 2D instance labels: give each piece its own id first (e.g. "
                "scipy.ndimage.label on each slice, or cellseg-batch's own output)"
            )
        refuse_top_background(layer, ids, z)


def refuse_other_background(layer: LabelLayer, ids: np.ndarray, z: int) -> None:
    """Refuse negative ids (-1 is a common 'background' or 'ignore' of int32 label images) when the run starts, not
    when a tile first reads one."""
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        low = int(ids.min())
        raise UserError(
            f"{layer.volume.path} holds the negative label id {low} in slice {z} ({_share(ids, low)} of the part "
            f"checked); label ids must be 0 (background) or positive: if {low} marks background or 'ignore', set it "
            f"to 0 first (numpy: labels[labels < 0] = 0)"
        )


def refuse_top_background(layer: LabelLayer, ids: np.ndarray, z: int) -> None:
    """Refuse a stack whose background is the largest value of its type (65535, 4294967295: what some tools write
    for background or 'ignore') instead of 0: it would become one object spread over every slice. Caught where that
    id covers more of the checked window than any other; an object that merely has that id is not refused."""
    top = np.iinfo(ids.dtype).max
    if ids.size == 0 or ids.max() != top:
        return
    values, counts = np.unique(ids, return_counts=True)
    if values[counts.argmax()] == top:
        raise UserError(
            f"{layer.volume.path}: id {top}, the largest {ids.dtype} value, covers {_share(ids, top)} of the part of "
            f"slice {z} checked, more than any other id; it looks like background or 'ignore', which must be 0 in a "
            f"label stack: set it to 0 first (numpy: labels[labels == {top}] = 0)"
        )


def refuse_unmapped(layer: LabelLayer, ids: np.ndarray, z: int) -> None:
    """Refuse ids that the layer's class map lists no class for when the run starts (a tile would refuse the first
    it reads, once the run is under way), naming all of them that the checked window holds."""
    if isinstance(layer.classes, str) or not ids.any():
        return
    runs = label_runs(ids)
    present = np.unique(ids if runs is None else runs.values[0])
    present = present[present != 0]
    missing = present[layer.classify(present, layer.class_names) < 0]
    if len(missing):
        listed = ", ".join(str(i) for i in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        known = np.array(sorted(layer.classes))
        raise UserError(
            f"{layer.volume.path}: {len(missing)} of the {len(present)} ids in the part of slice {z} checked have no "
            f"class in its --classes map ({listed}); the map lists {len(known)} ids, {known[0]}..{known[-1]}: add "
            "those ids to it (or set them to 0 in the stack)"
        )


def _share(ids: np.ndarray, value: int) -> str:
    return f"{np.count_nonzero(ids == value) / ids.size:.0%}"
