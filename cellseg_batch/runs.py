"""Runs of equal values along the rows of label images: what counting per run instead of per pixel builds on."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

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

