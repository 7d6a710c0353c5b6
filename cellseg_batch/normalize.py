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
    percentiles: tuple[float, float] = (1.0, 99.5)
    blank: str = field(default="", compare=False)  # why the sample had no contrast to stretch ("": it had)
    # the volume's contrast is the opposite of the training images' (``run --invert``): high maps to 0, low to 255
    invert: bool = False
    # 0 is fill around registered sections, not tissue (``_without_padding``): left out of the percentiles, and
    # ``run`` labels no object there
    zero_is_fill: bool = False

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


def sample_volume(volume: Volume, max_slices: int = 16, window: int = 512, per_slice: int = 4) -> list[np.ndarray]:
    """Deterministic sample: up to ``max_slices`` evenly spaced slices, ``per_slice`` windows spread over each."""
    nz, ny, nx = volume.shape
    zs = np.unique(np.linspace(0, nz - 1, min(nz, max_slices)).round().astype(int))
    wy, wx = min(window, ny), min(window, nx)
    rng = np.random.default_rng(0)
    out = []
    for z in zs:
        for _ in range(per_slice if (ny > wy or nx > wx) else 1):
            y0 = int(rng.integers(0, ny - wy + 1))
            x0 = int(rng.integers(0, nx - wx + 1))
            out.append(volume.read(int(z), y0, y0 + wy, x0, x0 + wx))
    return out


def estimate(volume: Volume, percentiles: tuple[float, float] = (1.0, 99.5), invert: bool = False) -> Normalization:
    """The volume's ``percentiles`` mapped to [0, 255]; with ``invert``, those of the volume's negative (the low
    percentile of the negative is the volume's 100 - high one), so that a volume and its negative given with
    ``invert`` reach the model as the same image."""
    if not invert:
        return from_samples(sample_volume(volume), percentiles)
    flipped = (100.0 - percentiles[1], 100.0 - percentiles[0])
    return replace(from_samples(sample_volume(volume), flipped), invert=True)
