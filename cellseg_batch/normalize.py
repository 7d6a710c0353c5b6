"""The one intensity normalization that run and train share: volume percentiles mapped to [0, 255].

Intensity p_low (default the 1st percentile) maps to 0 and p_high (99.5th) to 255, clipped. For ``run`` the
percentiles come from a deterministic sample of the volume being segmented (evenly spaced slices, fixed windows), so
8-bit, 16-bit and float acquisitions reach the model on the same scale; ``train`` computes them the same way over
its training images, for each pixel type on its own (``ByPixelType``: 8- and 16-bit tiles in one training set each
reach the model on that scale, as an 8- and a 16-bit volume do in ``run``). Models therefore see contrast-stretched greyscale, replicated to 3 channels. Zero fill around
registered sections and NaN (no data) are left out of the percentiles, and NaN reaches the model as black.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .errors import UserError
from .read import Volume


@dataclass(frozen=True)
class Normalization:
    low: float
    high: float
    percentiles: tuple[float, float] | None = (1.0, 99.5)  # None: LOW,HIGH given (--normalization), not sampled
    blank: str = field(default="", compare=False)  # why the sample had no contrast to stretch ("": it had)
    # the volume's contrast is the opposite of the training images' (``run --invert``): high maps to 0, low to 255
    invert: bool = False
    # 0 is fill around registered sections, not tissue (``_without_padding``): left out of the percentiles, and
    # ``run`` labels no object there
    zero_is_fill: bool = False
    # sampled slices whose intensity lies far from the others' (a damaged or differently exposed section), left out
    # of the percentiles (``_typical_slices``): (slice, its median, the others' median)
    odd_slices: tuple = field(default=(), compare=False)

    @classmethod
    def fixed(cls, low: float, high: float, invert: bool = False) -> Normalization:
        """LOW,HIGH as given (``--normalization``, or a run's report), not from percentiles: those are None (they
        were NaN, which made the run's report.json invalid JSON)."""
        return cls(float(low), float(high), None, invert=invert)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """float32 in [0, 255]."""
        scale = np.float32(255.0 / max(self.high - self.low, 1e-12))
        if self.invert:
            out = (np.float32(self.high) - image.astype(np.float32)) * scale
        else:
            out = (image.astype(np.float32) - np.float32(self.low)) * scale
        if image.dtype.kind == "f":  # NaN (no data in a float volume) becomes black: in the model, one NaN pixel
            np.nan_to_num(out, copy=False, nan=0.0)  # spreads through every convolution and norm of its tile
        return np.clip(out, 0.0, 255.0, out=out)

    def no_data(self, image: np.ndarray) -> np.ndarray | None:
        """Where a raw window holds no data, or None where none is: NaN and inf, and where 0 is the volume's fill,
        its zeros in regions of ``FILL_MIN_REGION`` px or more (fill is a frame, a wedge, a stripe, a cut-off part;
        a small patch of zeros is dark tissue clipped by the export). ``run`` keeps objects out of it
        (``predict.base.without_no_data``)."""
        where = ~np.isfinite(image) if image.dtype.kind == "f" else None
        zeros = image == 0 if self.zero_is_fill else None
        if zeros is not None and zeros.any():
            import cc3d

            regions = cc3d.connected_components(zeros, connectivity=8)
            large = np.bincount(regions.ravel()) >= FILL_MIN_REGION
            large[0] = False
            zeros = large[regions]
            where = zeros if where is None else where | zeros
        return where if where is not None and where.any() else None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ByPixelType:
    """One ``Normalization`` per pixel type (numpy dtype name), each applied to the images of its type: the training
    images' counterpart of ``run`` giving every volume its own."""

    by_type: dict[str, Normalization]

    def apply(self, image: np.ndarray) -> np.ndarray:
        normalization = self.by_type.get(image.dtype.name)
        if normalization is None:  # an image file replaced since the types were read
            raise UserError(f"a training image of pixel type {image.dtype.name} appeared after training started (the "
                            f"images read before were {', '.join(self.by_type)}); restart training")  # fmt: skip
        return normalization.apply(image)

    def to_dict(self) -> dict:
        return {name: [n.low, n.high] for name, n in self.by_type.items()}


PADDING_SHARE = 0.05  # zeros this common are fill around registered sections, not tissue
# Rarer zeros are fill where they stand apart from the tissue's values: at least FILL_MIN_SHARE of the sample, and
# FILL_SPIKE times as many as the values within 1% of the range above 0. A 4 px zero border around 512 px slices
# (3% of the pixels) made the 1st percentile 0 and dimmed every slice the model saw.
FILL_MIN_SHARE, FILL_SPIKE = 0.001, 10
FILL_MIN_REGION = 256  # px: zeros of a fill volume in a connected region this large are no data (``no_data``)


def from_samples(samples: list[np.ndarray], percentiles: tuple[float, float] = (1.0, 99.5)) -> Normalization:
    samples = _with_contrast(samples)
    values = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in samples])
    finite = values[np.isfinite(values)]
    tissue = _without_padding(finite)
    zero_is_fill = tissue.size < finite.size
    finite = tissue
    if finite.size == 0:
        return Normalization(0.0, 1.0, tuple(percentiles), blank="no sampled pixel has a value (all NaN)")
    low, high = np.percentile(finite, percentiles)
    blank = ""
    if high <= low:  # a constant image: keep it constant instead of dividing by zero
        blank = f"every sampled pixel is {low:g}" if finite.min() == finite.max() else (
            f"at least {percentiles[1] - percentiles[0]:g}% of the sampled pixels are {low:g}")  # fmt: skip
        high = low + 1.0
    return Normalization(float(low), float(high), tuple(float(p) for p in percentiles), blank, zero_is_fill=zero_is_fill)


def _with_contrast(samples: list[np.ndarray]) -> list[np.ndarray]:
    """Sampled windows of one value hold no tissue (a missing section filled white or black, a saturated one): they
    are left out, unless every window is one. One white slice in 16 sampled made the 99.5th percentile its 255."""
    finite = [np.asarray(s)[np.isfinite(s)] for s in samples]
    varied = [s for s, f in zip(samples, finite) if f.size and f.min() < f.max()]
    return varied or samples


def _without_padding(values: np.ndarray) -> np.ndarray:
    """Registered or stitched sections are filled out to a rectangle with 0 (TrakEM2, elastix, Fiji), and folds or
    cut-off parts of a section are blanked with it: where 0 makes up at least ``PADDING_SHARE`` of the sample, or
    at least ``FILL_MIN_SHARE`` and stands apart from the tissue's values (``FILL_SPIKE``), it is left out of the
    percentiles, which would otherwise follow the fill's share instead of the tissue's contrast. A few zeros among
    dark tissue values are image and stay. (Saturated bright pixels are kept: they are image.)"""
    fill = values == 0
    zeros = int(np.count_nonzero(fill))
    if not zeros or zeros == values.size or zeros < FILL_MIN_SHARE * values.size:
        return values
    rest = values[~fill]
    if zeros >= PADDING_SHARE * values.size:
        return rest
    size = np.abs(rest)
    near = np.count_nonzero(size <= 0.01 * np.percentile(size, 99.5))
    return rest if zeros >= FILL_SPIKE * near else values


def sample_volume(volume: Volume, max_slices: int = 16, window: int = 512,
                  per_slice: int = 4) -> dict[int, list[np.ndarray]]:  # fmt: skip
    """Deterministic sample: up to ``max_slices`` evenly spaced slices, ``per_slice`` windows spread over each; by
    slice."""
    nz, ny, nx = volume.shape
    zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
    wy, wx = min(window, ny), min(window, nx)
    rng = np.random.default_rng(0)
    out = {}
    for z in zs.tolist():
        for _ in range(per_slice if (ny > wy or nx > wx) else 1):
            y0 = int(rng.integers(0, ny - wy + 1))
            x0 = int(rng.integers(0, nx - wx + 1))
            out.setdefault(z, []).append(volume.read(z, y0, y0 + wy, x0, x0 + wx))
    return out


ODD_SHIFT = 0.25  # a sampled slice whose median lies this share of the sample's range from the others' is odd


def _typical_slices(by_slice: dict[int, list[np.ndarray]]) -> tuple[list[int], tuple]:
    """The sampled slices whose intensity is like the others', and the odd ones: (slice, its median, the median of
    all) where a slice's median (its tissue: zeros and no data left out) lies more than ``ODD_SHIFT`` of the
    sample's 1-99.5 percentile range from the median of the slices' medians. A section imaged darker, brighter or
    through a fold would otherwise set the contrast of every slice (one at 25% brightness among six: the 1st
    percentile from 15295 to 5794, half the mitochondria of the other slices lost). Fewer than three slices, or
    odd ones not fewer than the rest, leave all in."""
    tissue = {}
    for z, windows in by_slice.items():
        values = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in windows])
        values = values[np.isfinite(values) & (values != 0)]
        if values.size:
            tissue[z] = values
    if len(tissue) < 3:
        return list(by_slice), ()
    medians = {z: float(np.median(v)) for z, v in tissue.items()}
    middle = float(np.median(list(medians.values())))
    low, high = np.percentile(np.concatenate(list(tissue.values())), (1.0, 99.5))
    odd = [z for z, m in medians.items() if abs(m - middle) > ODD_SHIFT * (high - low)]
    if not odd or 2 * len(odd) >= len(tissue):
        return list(by_slice), ()
    return [z for z in by_slice if z not in odd], tuple((z, medians[z], middle) for z in odd)


def estimate(volume: Volume, percentiles: tuple[float, float] = (1.0, 99.5), invert: bool = False) -> Normalization:
    """The volume's ``percentiles`` mapped to [0, 255], from its sampled slices less the odd ones
    (``_typical_slices``); with ``invert``, those of the volume's negative (the low percentile of the negative is
    the volume's 100 - high one), so that a volume and its negative given with ``invert`` reach the model as the
    same image."""
    by_slice = sample_volume(volume)
    kept, odd = _typical_slices(by_slice)
    samples = [w for z in kept for w in by_slice[z]]
    if not invert:
        return replace(from_samples(samples, percentiles), odd_slices=odd)
    flipped = (100.0 - percentiles[1], 100.0 - percentiles[0])
    return replace(from_samples(samples, flipped), invert=True, odd_slices=odd)
