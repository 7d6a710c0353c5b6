"""Synthetic SBF-SEM-like EM volumes with exact ground truth, generated lazily window by window, deterministic by seed.

Model: the plane is cut into jittered boxes (y strips, x boxes per strip, z boxes per column, each level with its
own random phase). Each box is a *site* holding at most one platelet-like cell (an ellipsoid with a flattened
z profile) and its organelles (mitochondria, alpha granules, canalicular vessels), all drawn from an RNG keyed by
(seed, site). An object never leaves its site's box and every box leaves its last row, column and slice empty,
so objects of different sites are always >= 1 voxel apart and a window only has to visit the sites it overlaps.

Every object is a convex solid rasterised exactly, by pixel centres, as one run of pixels per row. When a site is
built, each object's runs are checked over the whole volume (clipped to its bounds) and the object keeps the
longest run of slices where every cross-section is one 4-connected region at least ~2.5 px thick and adjacent
sections overlap (IoU >= 0.32 or >= 62 % of the smaller one); organelles keep only slices where their cell is kept.
These are the guarantees the tests check and the pipeline's exactness tests rely on.

Units: voxel (z, y, x) = (40, 10/scale, 10/scale) nm. ``scale`` is the xy resolution: objects are ``scale`` times
larger in pixels, while extents in slices do not change. One slice is 4 * scale xy pixels thick.
At scale 1 a 512 x 512 slice shows about 4-8 cells, ~10 granules, a few mitochondria and vessel sections.
"""

from __future__ import annotations

import functools
import math
import re
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import UserError
from .read import LabelLayer, Volume

CLASSES = ("cell", "mitochondrion", "alpha_granule", "canalicular_vessel")
DTYPES = ("uint8", "uint16")
SLICE_NM, PIXEL_NM = 40.0, 10.0  # at scale 1

# Site grid at scale 1 (px, slices): pitch and boundary jitter.
_PITCH, _JITTER = 240, 60
_ZPITCH, _ZJITTER = 21, 4
_EMPTY = 0.03  # chance that a site has no cell, so the lattice is less regular
# Organelles per cell (min, max); max is also the id stride of a class. Larger ones are placed first.
_COUNTS = {"canalicular_vessel": (0, 3), "mitochondrion": (0, 3), "alpha_granule": (2, 8)}
_TRIES = 40
_INSIDE = 0.9  # organelles stay within this fraction of their cell (normalised), far from its trimmed caps
_MIN_SEMI = 2.0  # px: keeps organelles >= ~4 px thick at small scales
_MIN_AREA = 9
_THICK = 2.5  # a section must have area >= _THICK * its bbox diagonal (width >= ~2.5 px for convex sets)

# Appearance (0..1, resin bright) and Poisson-Gaussian noise: sigma^2 = _GAIN * I + _READ.
_BG, _CYTO, _RIM = 0.86, 0.56, 0.28
_LOOK = {"mitochondrion": (0.33, 0.22), "alpha_granule": (0.42, 0.36), "canalicular_vessel": (0.80, 0.42)}
_CRISTA = 0.17
_GAIN, _READ = 0.005, 0.002
_PSF = 1.0  # px
_BOX = np.full(5, 0.2)  # cytoplasm mottling kernel
_BLOCK = 256  # noise is drawn per fixed block so every pixel's value is independent of the window
_RANGE = {"uint8": (0.0, 255.0), "uint16": (8000.0, 42000.0)}

_M64 = (1 << 64) - 1
_OFF = 1 << 20  # makes site and block indices non-negative for SeedSequence
_TAG_SITE, _TAG_NOISE = 11, 12
_EMPTY_RUN = (1 << 40, -(1 << 40))


def _mix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def _uniform(*keys: int) -> float:
    """A uniform [0, 1) number from integer keys (splitmix64): the grid needs millions of these, cheaply."""
    h = 0
    for k in keys:
        h = _mix(h ^ (k & _M64))
    return (h >> 11) * 2.0**-53


def _k2(u: float, p: float) -> float:
    """Squared relative section size at normalised height u of a z profile |u|^p + k^p = 1; -1 outside.

    Scalar math on purpose: numpy's SIMD pow may differ in the last bit with array length, and the runs of a
    section must not depend on how many slices are computed at once.
    """
    u = abs(u)
    return math.pow(1.0 - math.pow(u, p), 2.0 / p) if u < 1.0 else -1.0


def _runs_from(lo: np.ndarray, hi: np.ndarray, empty: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = np.where(empty, _EMPTY_RUN[0], np.ceil(lo)).astype(np.int64)
    hi = np.where(empty, _EMPTY_RUN[1], np.floor(hi)).astype(np.int64)
    return lo, hi


class _Ellipsoid:
    """Sections {q: q'Bq <= k(z)^2} with a centre moving linearly in z: any 3D ellipsoid (p=2), or a cell (p>2)."""

    __slots__ = ("c", "v", "b", "half", "p", "ext")

    def __init__(self, c, v, b, half, p, ext):
        self.c = tuple(map(float, c))  # (y, x, z) px
        self.v = tuple(map(float, v))  # centre shift (y, x) per px of z
        self.b = tuple(map(float, b))  # (byy, bxy, bxx)
        self.half, self.p = float(half), float(p)
        self.ext = tuple(map(float, ext))  # (y, x) half extents over all z

    @classmethod
    def solid(cls, c, axes: np.ndarray, semi: np.ndarray) -> _Ellipsoid:
        """From centre, principal axes (columns, (y, x, z)) and semi-axes, by completing the square in z."""
        a = axes @ np.diag(semi**-2.0) @ axes.T
        bmat, bz = a[:2, :2], a[:2, 2]
        w = np.linalg.solve(bmat, bz)
        half = 1.0 / math.sqrt(a[2, 2] - bz @ w)
        ext = np.sqrt(np.diag(axes @ np.diag(semi**2.0) @ axes.T))[:2]
        return cls(c, -w, (bmat[0, 0], bmat[0, 1], bmat[1, 1]), half, 2.0, ext)

    def bounds(self, dz: float) -> tuple[int, int, int, int, int, int]:
        """Inclusive (z0, z1, y0, y1, x0, x1) voxel bounds."""
        cy, cx, cz = self.c
        return (math.ceil((cz - self.half) / dz), math.floor((cz + self.half) / dz),
                math.floor(cy - self.ext[0]), math.ceil(cy + self.ext[0]),
                math.floor(cx - self.ext[1]), math.ceil(cx + self.ext[1]))

    def runs(self, zpx: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """First and last pixel (inclusive) of each row ys at each height zpx; (nz, ny) int arrays."""
        cy, cx, cz = self.c
        byy, bxy, bxx = self.b
        t = zpx - cz
        k2 = np.array([_k2(float(ti) / self.half, self.p) for ti in t])[:, None]
        ccy, ccx = (cy + t * self.v[0])[:, None], (cx + t * self.v[1])[:, None]
        dy = ys[None, :] - ccy
        g = bxy * dy
        disc = g * g - bxx * (byy * dy * dy - k2)
        root = np.sqrt(np.maximum(disc, 0.0))
        return _runs_from(ccx + (-g - root) / bxx, ccx + (-g + root) / bxx, (disc < 0) | (k2 <= 0))


class _Capsule:
    """A segment swept by an ellipsoidal ball (r in xy, rz in z): in z stretched by r/rz it is a round capsule."""

    __slots__ = ("p0", "p1", "r", "rz", "_s", "_e", "_len")

    def __init__(self, p0, p1, r: float, rz: float):
        self.p0, self.p1 = tuple(map(float, p0)), tuple(map(float, p1))  # (y, x, z) px
        self.r, self.rz = float(r), float(rz)
        self._s = self.r / self.rz
        d = np.subtract(p1, p0) * (1.0, 1.0, self._s)
        self._len = float(np.linalg.norm(d))
        self._e = tuple(map(float, d / self._len))

    def degenerate(self) -> bool:
        """Axes (almost) along or across x make the row-interval formulas divide by ~0."""
        ex = abs(self._e[1])
        return ex < 1e-6 or 1.0 - ex * ex < 1e-6

    def bounds(self, dz: float) -> tuple[int, int, int, int, int, int]:
        (y0, x0, z0), (y1, x1, z1) = self.p0, self.p1
        r, rz = self.r, self.rz
        return (math.ceil((min(z0, z1) - rz) / dz), math.floor((max(z0, z1) + rz) / dz),
                math.floor(min(y0, y1) - r), math.ceil(max(y0, y1) + r),
                math.floor(min(x0, x1) - r), math.ceil(max(x0, x1) + r))

    def runs(self, zpx: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Row y of the plane at height h: union of (cylinder within the end planes) and the two end balls, an
        # interval since the capsule is convex. X is x relative to p0.
        ey, ex, ez = self._e
        r2 = self.r * self.r
        y0, x0, z0 = self.p0
        y1, x1, z1 = self.p1
        h = (zpx * self._s)[:, None]
        dy, dh = ys[None, :] - y0, h - z0 * self._s
        t0 = ey * dy + ez * dh
        alpha = 1.0 - ex * ex
        beta = ex * t0
        disc = beta * beta - alpha * (dy * dy + dh * dh - t0 * t0 - r2)
        root = np.sqrt(np.maximum(disc, 0.0))
        s0, s1 = -t0 / ex, (self._len - t0) / ex
        lo_c = np.maximum((beta - root) / alpha, np.minimum(s0, s1))
        hi_c = np.minimum((beta + root) / alpha, np.maximum(s0, s1))
        ok_c = (disc >= 0) & (lo_c <= hi_c)
        rem0 = r2 - dy * dy - dh * dh
        dy1, dh1 = ys[None, :] - y1, h - z1 * self._s
        rem1 = r2 - dy1 * dy1 - dh1 * dh1
        q0, q1 = np.sqrt(np.maximum(rem0, 0.0)), np.sqrt(np.maximum(rem1, 0.0))
        big = np.inf
        lo = np.minimum(np.minimum(np.where(ok_c, lo_c, big), np.where(rem0 >= 0, -q0, big)),
                        np.where(rem1 >= 0, x1 - x0 - q1, big))
        hi = np.maximum(np.maximum(np.where(ok_c, hi_c, -big), np.where(rem0 >= 0, q0, -big)),
                        np.where(rem1 >= 0, x1 - x0 + q1, -big))
        empty = ~(ok_c | (rem0 >= 0) | (rem1 >= 0))
        return _runs_from(np.where(empty, 0.0, x0 + lo), np.where(empty, 0.0, x0 + hi), empty)


def _fit(shape, dz: float, vol: tuple[int, int, int], zlim: tuple[int, int]):
    """The object's visible extent: longest chain of valid slices within zlim (half-open) and the volume.

    Returns (z0, z1, bbox, voxels) with z0:z1 half-open and bbox (z0, z1, y0, y1, x0, x1) half-open, or None.
    """
    bz0, bz1, by0, by1, bx0, bx1 = shape.bounds(dz)
    z0, z1 = max(bz0, zlim[0], 0), min(bz1 + 1, zlim[1], vol[0])
    y0, y1 = max(by0, 0), min(by1 + 1, vol[1])
    if z0 >= z1 or y0 >= y1 or bx0 >= vol[2] or bx1 < 0:
        return None
    zs, ys = np.arange(z0, z1), np.arange(y0, y1)
    lo, hi = shape.runs(zs * dz, ys)
    lo, hi = np.maximum(lo, 0), np.minimum(hi, vol[2] - 1)
    n = np.maximum(hi - lo + 1, 0)
    full = n > 0
    area, rows = n.sum(1), full.sum(1)
    first, last = full.argmax(1), full.shape[1] - 1 - full[:, ::-1].argmax(1)
    both = full[:, 1:] & full[:, :-1]
    touching = np.minimum(hi[:, 1:], hi[:, :-1]) - np.maximum(lo[:, 1:], lo[:, :-1]) >= 0
    xmin, xmax = np.where(full, lo, vol[2]).min(1), np.where(full, hi, -1).max(1)
    diag = np.hypot(rows, xmax - xmin + 1)
    good = ((area >= _MIN_AREA) & (area >= _THICK * diag) & (last - first + 1 == rows)
            & np.where(both, touching, True).all(1))
    inter = np.where(full[1:] & full[:-1],
                     np.maximum(np.minimum(hi[1:], hi[:-1]) - np.maximum(lo[1:], lo[:-1]) + 1, 0), 0).sum(1)
    union = area[1:] + area[:-1] - inter
    linked = (50 * inter >= 16 * union) | (50 * inter >= 31 * np.minimum(area[1:], area[:-1]))
    best, start = (0, 0), None
    for i in range(len(zs)):
        if not good[i]:
            start = None
            continue
        if start is None or not linked[i - 1]:
            start = i
        if i + 1 - start > best[1] - best[0]:
            best = (start, i + 1)
    a, b = best
    if a == b:
        return None
    keep = full[a:b].any(0)
    ky = np.flatnonzero(keep)
    bbox = (z0 + a, z0 + b, y0 + int(ky[0]), y0 + int(ky[-1]) + 1, int(xmin[a:b].min()), int(xmax[a:b].max()) + 1)
    return z0 + a, z0 + b, bbox, int(area[a:b].sum())


class _Object:
    """A placed object: its shape, the slices [z0, z1) it shows in, its bbox and voxel count in the volume."""

    __slots__ = ("id", "cls", "parent", "shape", "z0", "z1", "bbox", "voxels", "look")

    def __init__(self, oid: int, cls: str, parent: int | None, shape, fit, look=None):
        self.id, self.cls, self.parent, self.shape, self.look = oid, cls, parent, shape, look
        self.z0, self.z1, self.bbox, self.voxels = fit

    def info(self) -> dict:
        return {"id": self.id, "class": self.cls, "parent": self.parent, "bbox": self.bbox, "voxels": self.voxels}


def _seg_dist(p0, p1, q0, q1) -> float:
    """Distance between 3D segments p0p1 and q0q1 (Ericson, Real-Time Collision Detection 5.1.9), plain floats."""
    d1 = [b - a for a, b in zip(p0, p1)]
    d2 = [b - a for a, b in zip(q0, q1)]
    r = [a - b for a, b in zip(p0, q0)]
    a, e, f = _dot(d1, d1), _dot(d2, d2), _dot(d2, r)
    c, b = _dot(d1, r), _dot(d1, d2)
    eps = 1e-12
    if a <= eps and e <= eps:
        s = t = 0.0
    elif a <= eps:
        s, t = 0.0, min(max(f / e, 0.0), 1.0)
    elif e <= eps:
        s, t = min(max(-c / a, 0.0), 1.0), 0.0
    else:
        denom = a * e - b * b
        s = min(max((b * f - c * e) / denom, 0.0), 1.0) if denom > eps else 0.0
        t = (b * s + f) / e
        if t < 0.0:
            s, t = min(max(-c / a, 0.0), 1.0), 0.0
        elif t > 1.0:
            s, t = min(max((b - c) / a, 0.0), 1.0), 1.0
    return math.dist([p + s * d for p, d in zip(p0, d1)], [q + t * d for q, d in zip(q0, d2)])


def _dot(u, v) -> float:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _direction(rise: float, turn: float) -> tuple[float, float, float]:
    """Unit (y, x, z) vector with z component ``rise`` and azimuth ``turn`` (uniform rise: uniform on the sphere)."""
    flat = math.sqrt(max(1.0 - rise * rise, 0.0))
    return flat * math.sin(turn), flat * math.cos(turn), rise


def _frame(major: tuple[float, float, float], roll: np.ndarray) -> np.ndarray:
    """Orthonormal axes (columns) with the first along ``major``, rolled by the direction ``roll``."""
    m = np.array(major)
    side = _cross(m, roll)
    side /= math.sqrt(side @ side)
    return np.stack([m, side, _cross(m, side)], axis=1)


def _cross(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.array([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])


class SyntheticEM:
    """A lazily generated synthetic volume: ``image`` and per-class ``labels`` of any window of any slice.

    ``pixel_size_nm`` is (40, 10/scale, 10/scale): scale sets the xy resolution, so objects are ``scale`` times
    larger in xy pixels and keep their extent in slices. Ids are unique per class while the volume spans fewer
    than 2**29 sites (~6e14 voxels at scale 1, scale**2 times fewer at other scales); beyond that they wrap.
    """

    def __init__(self, shape: tuple[int, int, int], seed: int = 0, *, dtype: str = "uint8", scale: float = 1.0):
        if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and n > 0 for n in shape):
            raise UserError(f"synthetic volume shape {tuple(shape)} must be three positive integers (Z, Y, X)")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise UserError(f"synthetic seed {seed!r} must be a non-negative integer")
        try:
            dtype = np.dtype(dtype).name
        except TypeError:
            dtype = str(dtype)
        if dtype not in DTYPES:
            raise UserError(f"synthetic dtype {dtype!r} is not supported; use uint8 or uint16")
        if not (isinstance(scale, (int, float)) and 0.25 <= scale <= 4.0):
            raise UserError(f"synthetic scale {scale!r} must be a number from 0.25 to 4")
        self.shape = tuple(int(n) for n in shape)
        self.seed, self.scale, self.dtype = int(seed), float(scale), np.dtype(dtype)
        self.classes = CLASSES
        self.pixel_size_nm = (SLICE_NM, PIXEL_NM / self.scale, PIXEL_NM / self.scale)
        self._dz = SLICE_NM / PIXEL_NM * self.scale  # one slice in xy pixels
        self._pitch, self._jitter = round(_PITCH * self.scale), round(_JITTER * self.scale)
        Z, Y, X = self.shape
        # Site index strides: i >= -2, j >= -3, k >= -3 for any box that can reach the volume.
        self._nx = (X + self._jitter) // self._pitch + 5
        self._nz = (Z + _ZJITTER) // _ZPITCH + 5
        self._rim = max(1, round(2.5 * self.scale))
        # An image pixel depends on the phantom within the blur radius, which depends on labels within the rim
        # width and on the texture within the mottling radius (2).
        self._margin = math.ceil(3 * _PSF) + max(self._rim, 2) + 1
        self._gap = math.sqrt(2.0 + self._dz**2) + 0.5  # no two voxels 26-adjacent: |dx|,|dy| <= 1, |dz| <= dz
        self._site = functools.lru_cache(maxsize=8192)(self._make_site)  # ~14 kB per site

    def __getstate__(self):
        return {"shape": self.shape, "seed": self.seed, "dtype": self.dtype.name, "scale": self.scale}

    def __setstate__(self, state):
        self.__init__(**state)

    def __repr__(self):
        return f"SyntheticEM({self.uri!r})"

    @property
    def uri(self) -> str:
        return "synth:{}x{}x{},seed={},dtype={},scale={:g}".format(*self.shape, self.seed, self.dtype.name, self.scale)

    @classmethod
    def from_uri(cls, uri: str) -> SyntheticEM:
        """``synth:ZxYxX[,seed=N][,dtype=uint8|uint16][,scale=F]``, e.g. ``synth:24x512x512,seed=3,scale=0.5``."""
        usage = "give synth:ZxYxX[,seed=N][,dtype=uint8|uint16][,scale=F], e.g. synth:24x512x512,seed=3"
        if not isinstance(uri, str) or not uri.startswith("synth:"):
            raise UserError(f"{uri!r} is not a synthetic volume URI; {usage}")
        head, *options = uri[len("synth:"):].split(",")
        m = re.fullmatch(r"(\d+)x(\d+)x(\d+)", head.strip(), re.ASCII)
        if m is None:
            raise UserError(f"{uri!r}: the shape {head!r} must be ZxYxX positive integers; {usage}")
        kwargs: dict = {}
        for option in options:
            key, sep, value = (s.strip() for s in option.partition("="))
            if not sep or key not in ("seed", "dtype", "scale") or key in kwargs:
                raise UserError(f"{uri!r}: bad or repeated option {option!r}; {usage}")
            try:
                kwargs[key] = {"seed": int, "scale": float, "dtype": str}[key](value)
            except ValueError:
                raise UserError(f"{uri!r}: {key}={value!r} is not a valid value; {usage}") from None
        return cls(tuple(int(g) for g in m.groups()), **kwargs)

    # -- public reads ------------------------------------------------------------------------------------------

    def labels(self, cls: str, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """3D instance ids (uint32, 0 = none) of class ``cls`` in window [y0:y1, x0:x1] of slice z."""
        if cls not in CLASSES:
            raise UserError(f"unknown synthetic class {cls!r}; choose one of {', '.join(CLASSES)}")
        y0, y1, x0, x1 = self._clip(z, y0, y1, x0, x1)
        return self._raster(z, y0, y1, x0, x1, (cls,))[0][cls]

    def image(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The EM image of window [y0:y1, x0:x1] of slice z, in the volume's dtype."""
        y0, y1, x0, x1 = self._clip(z, y0, y1, x0, x1)
        m = self._margin
        ry0, ry1, rx0, rx1 = y0 - m, y1 + m, x0 - m, x1 + m
        lab, painted = self._raster(z, ry0, ry1, rx0, rx1, CLASSES)
        tex, shot = self._noise(z, ry0, ry1, rx0, rx1)
        # Resin: faint grain. Cytoplasm: mottling plus sparse dark specks (ribosome/glycogen-like).
        # (correlate1d sums each pixel's neighbours in a fixed order; uniform_filter's running sum would make
        # the last bits depend on where the window starts.)
        mottle = ndimage.correlate1d(ndimage.correlate1d(tex, _BOX, axis=0), _BOX, axis=1)
        img = np.where(lab["cell"] > 0, _CYTO + 0.4 * mottle + 0.07 * tex - 0.25 * (tex > 0.47), _BG + 0.035 * tex)
        # Cells come before their organelles in ``painted``; objects of a class never touch, so each one's edge
        # can be found in its own box.
        for obj, sub, mask in painted:
            width = 2 * self._rim + 1 if obj.cls == "cell" else 3
            edge = mask & (ndimage.minimum_filter(mask.view(np.uint8), width, mode="constant") == 0)
            region = img[sub]
            if obj.cls == "cell":
                region[mask] += obj.look
                region[edge] = _RIM
            else:
                inner, dark = _LOOK[obj.cls]
                region[mask] = inner
                region[edge] = dark
            if obj.cls == "mitochondrion":
                self._cristae(obj, region, sub, mask & ~edge, ry0, rx0)
        img = ndimage.gaussian_filter(img, _PSF, truncate=3.0)[m:-m, m:-m]
        img *= 1.0 + 0.03 * math.sin(2 * math.pi * z / 61.0 + 2 * math.pi * _uniform(self.seed, 7))  # slow drift
        img += np.sqrt(_GAIN * np.maximum(img, 0.0) + _READ) * shot[m:-m, m:-m]
        lo, span = _RANGE[self.dtype.name]
        return np.rint(lo + span * np.clip(img, 0.0, 1.0)).astype(self.dtype)

    def objects(self, cls: str | None = None, z_range: tuple[int, int] | None = None) -> list[dict]:
        """Every object (id, class, parent cell id, half-open voxel bbox (z0, z1, y0, y1, x0, x1), voxel count)
        visible in the volume, optionally of one class and touching slices z_range; cost grows with the volume."""
        if cls is not None and cls not in CLASSES:
            raise UserError(f"unknown synthetic class {cls!r}; choose one of {', '.join(CLASSES)}")
        z0, z1 = z_range if z_range is not None else (0, self.shape[0])
        out = []
        for i in self._strips(0, self.shape[1]):
            for j in self._boxes(i, 0, self.shape[2]):
                for k in self._layers(i, j, max(z0, 0), min(z1, self.shape[0])):
                    out += [o.info() for o in self._site(i, j, k)
                            if (cls is None or o.cls == cls) and o.z0 < z1 and o.z1 > z0]
        return sorted(out, key=lambda o: (CLASSES.index(o["class"]), o["id"]))

    # -- the site grid -----------------------------------------------------------------------------------------

    def _clip(self, z, y0, y1, x0, x1):
        Z, Y, X = self.shape
        if not 0 <= z < Z:
            raise IndexError(f"slice {z} is outside the synthetic volume's {Z} slices")
        y0, x0 = min(max(y0, 0), Y), min(max(x0, 0), X)
        return y0, min(max(y1, y0), Y), x0, min(max(x1, x0), X)

    def _jit(self, amount: int, *key: int) -> int:
        return round(amount * (2.0 * _uniform(self.seed, *key) - 1.0))

    def _phase(self, pitch: int, *key: int) -> int:
        return int(pitch * _uniform(self.seed, *key))

    # Box boundaries: y strips i, x boxes j within strip i, z layers k within column (i, j); each level has its
    # own phase so boxes do not line up across strips or columns.
    def _ybound(self, i):
        return i * self._pitch + self._jit(self._jitter, 1, i)

    def _xbound(self, i, j):
        return j * self._pitch + self._phase(self._pitch, 2, i) + self._jit(self._jitter, 3, i, j)

    def _zbound(self, i, j, k):
        return k * _ZPITCH + self._phase(_ZPITCH, 4, i, j) + self._jit(_ZJITTER, 5, i, j, k)

    @staticmethod
    def _span(lo, hi, bound, pitch, jitter, phase):
        """Indices n of the intervals [bound(n), bound(n+1)) that meet [lo, hi)."""
        for n in range((lo - phase - jitter) // pitch - 1, (hi - phase + jitter) // pitch + 1):
            if bound(n) < hi and bound(n + 1) > lo:
                yield n

    def _strips(self, y0, y1):
        return self._span(y0, y1, self._ybound, self._pitch, self._jitter, 0)

    def _boxes(self, i, x0, x1):
        phase = self._phase(self._pitch, 2, i)
        return self._span(x0, x1, lambda j: self._xbound(i, j), self._pitch, self._jitter, phase)

    def _layers(self, i, j, z0, z1):
        phase = self._phase(_ZPITCH, 4, i, j)
        return self._span(z0, z1, lambda k: self._zbound(i, j, k), _ZPITCH, _ZJITTER, phase)

    def _sites(self, z, y0, y1, x0, x1):
        for i in self._strips(y0, y1):
            for j in self._boxes(i, x0, x1):
                for k in self._layers(i, j, z, z + 1):
                    yield self._site(i, j, k)

    def _id(self, site: int, cls: str, slot: int) -> int:
        stride = 1 if cls == "cell" else _COUNTS[cls][1]
        return (site * stride + slot) % 0xFFFFFFFF + 1

    # -- objects -----------------------------------------------------------------------------------------------

    def _make_site(self, i: int, j: int, k: int) -> tuple[_Object, ...]:
        ya, yb, xa, xb = self._ybound(i), self._ybound(i + 1), self._xbound(i, j), self._xbound(i, j + 1)
        za, zb = self._zbound(i, j, k), self._zbound(i, j, k + 1)
        rng = np.random.default_rng([_TAG_SITE, self.seed, i + _OFF, j + _OFF, k + _OFF])
        if rng.random() < _EMPTY:
            return ()
        # The cell stays inside (a - 1, b - 1) on every axis, leaving the box's last row/column/slice empty.
        # Follow the box's long side (with some slack) so that cells fill their boxes: density ~40-50 %.
        room_y, room_x = (yb - ya - 1) / 2.0, (xb - xa - 1) / 2.0
        ratio = min(max(max(room_y, room_x) / min(room_y, room_x) * rng.uniform(0.9, 1.4), 1.0), 2.2)
        theta = (math.pi / 2 if room_y > room_x else 0.0) + rng.normal(0.0, 0.3)
        e1, e2 = (math.sin(theta), math.cos(theta)), (math.cos(theta), -math.sin(theta))
        unit_y = math.hypot(ratio * e1[0], e2[0])
        unit_x = math.hypot(ratio * e1[1], e2[1])
        b = rng.uniform(0.9, 0.98) * min(room_y / unit_y, room_x / unit_x)
        a = ratio * b
        cy = rng.uniform(ya - 0.5 + b * unit_y, yb - 1.5 - b * unit_y)
        cx = rng.uniform(xa - 0.5 + b * unit_x, xb - 1.5 - b * unit_x)
        dz = self._dz
        half = rng.uniform(0.88, 0.98) * (zb - za - 1) * dz / 2.0
        cz = rng.uniform((za - 0.5) * dz + half, (zb - 1.5) * dz - half)
        bmat = (e1[0] ** 2 / a**2 + e2[0] ** 2 / b**2, e1[0] * e1[1] / a**2 + e2[0] * e2[1] / b**2,
                e1[1] ** 2 / a**2 + e2[1] ** 2 / b**2)
        cell = _Ellipsoid((cy, cx, cz), (0.0, 0.0), bmat, half, rng.choice((3.0, 4.0, 6.0)), (b * unit_y, b * unit_x))
        look = rng.uniform(-0.05, 0.05)
        fit = _fit(cell, dz, self.shape, (0, self.shape[0]))
        if fit is None:
            return ()
        site = ((i + 2) * self._nx + j + 3) * self._nz + k + 3
        cid = self._id(site, "cell", 0)
        objs = [_Object(cid, "cell", None, cell, fit, look)]
        geom = ((cy, cx, cz), e1, e2, a, b, half)
        placed: list = []
        for cls, (lo, hi) in _COUNTS.items():
            slot = 0
            for _ in range(lo + int((hi - lo + 1) * math.sqrt(rng.random()))):  # skewed up: more sections show some
                made = self._place(rng, cls, geom, placed)
                if made is None:
                    continue
                shape, look = made
                ofit = _fit(shape, dz, self.shape, fit[:2])
                if ofit is not None:
                    objs.append(_Object(self._id(site, cls, slot), cls, cid, shape, ofit, look))
                    slot += 1
        return tuple(objs)

    def _place(self, rng, cls, geom, placed):
        """An organelle inside the cell, >= the 26-connectivity gap from those placed, via bounding capsules."""
        (cy, cx, cz), e1, e2, a, b, half = geom
        s = self.scale
        for _ in range(_TRIES):
            q, g = rng.random(10), rng.standard_normal(3)
            if cls == "canalicular_vessel":
                r = max((5.0 + 4.0 * q[0]) * s, _MIN_SEMI)
                rad = max(r, 1.5 * self._dz)  # >= 1.5 slices thick in z
                run = max((20.0 + 40.0 * q[1]) * s - r, 0.5)
                # Any orientation that can fit the cell's thickness: long vessels lie flatter.
                rise = min(max((0.6 * half - rad) / run, 0.0), 1.0) * (2.0 * q[2] - 1.0)
                major = _direction(rise, 2 * math.pi * q[3])
            else:
                if cls == "mitochondrion":
                    width = (7.0 + 5.5 * q[0]) * s
                    semi = np.array([(12.5 + 17.5 * q[1]) * s, width, width * (0.8 + 0.2 * q[2])])
                    major = _direction(math.sin(1.2 * q[3] - 0.6), 2 * math.pi * q[4])
                else:
                    semi = (8.0 + 8.0 * q[0]) * s * np.array([1.0, 0.8 + 0.2 * q[1], 0.8 + 0.2 * q[2]])
                    major = _direction(2.0 * q[3] - 1.0, 2 * math.pi * q[4])
                # Thin cells get smaller organelles rather than none.
                semi = np.maximum(semi * min(1.0, 0.45 * min(b, half) / max(semi[1], semi[2])), _MIN_SEMI)
                semi[0] = semi.max()
                rad = max(semi[1], semi[2])  # the ellipsoid lies in the capsule of its major axis and this radius
                run = semi[0] - rad
            # A centre where the bounding ball fits (|(n_i + rad / axis_i)_i| <= _INSIDE, n the normalised position
            # in the cell; z last, in the room the in-plane position leaves), then a sure test of the whole capsule.
            # Elongated ones are treated as balls reaching as far as their ends, on each axis.
            flat = rad + run * math.hypot(major[0], major[1])
            ra, rb, rz = flat / a, flat / b, (rad + run * abs(major[2])) / half
            disk = math.sqrt(max(_INSIDE**2 - rz * rz, 0.0)) - math.hypot(ra, rb)
            if disk <= 0.0:
                continue
            turn = 2 * math.pi * q[9]
            na, nb = disk * math.sqrt(q[5]) * math.cos(turn), disk * math.sqrt(q[5]) * math.sin(turn)
            nz = (2.0 * q[6] - 1.0) * (math.sqrt(max(_INSIDE**2 - (abs(na) + ra) ** 2 - (abs(nb) + rb) ** 2, 0.0)) - rz)
            ra, rb, rz = rad / a, rad / b, rad / half
            c = (cy + a * na * e1[0] + b * nb * e2[0], cx + a * na * e1[1] + b * nb * e2[1], cz + half * nz)
            p0 = tuple(ci - run * m for ci, m in zip(c, major))
            p1 = tuple(ci + run * m for ci, m in zip(c, major))
            n = [(abs(e1[0] * (p[0] - cy) + e1[1] * (p[1] - cx)) / a,
                  abs(e2[0] * (p[0] - cy) + e2[1] * (p[1] - cx)) / b, abs(p[2] - cz) / half) for p in (p0, p1)]
            # |n + T^-1 d| for |d| <= rad is at most |n| + rad |T^-1| and at most |(n_i + rad / axis_i)_i|; both
            # are convex along the segment, so its ends give their maxima.
            loose = max(math.hypot(*ni) for ni in n) + rad / min(b, half)
            axial = max(math.hypot(ni[0] + ra, ni[1] + rb, ni[2] + rz) for ni in n)
            if min(loose, axial) > _INSIDE:
                continue
            if any(math.dist(c, qc) - run - qrun < rad + qrad + self._gap and
                   _seg_dist(p0, p1, q0, q1) < rad + qrad + self._gap for qc, qrun, q0, q1, qrad in placed):
                continue
            if cls == "canalicular_vessel":
                shape, look = _Capsule(p0, p1, r, rad), None
                if shape.degenerate():
                    continue
            else:
                roll = g / math.sqrt(g @ g)
                shape = _Ellipsoid.solid(c, _frame(major, roll), semi)
                flat = math.hypot(major[0], major[1])
                look = ((major[0] / flat, major[1] / flat) if flat > 1e-3 else (1.0, 0.0), (6.0 + 4.0 * q[7]) * s,
                        q[8])
            placed.append((c, run, p0, p1, rad))
            return shape, look
        return None

    # -- rasterisation -----------------------------------------------------------------------------------------

    def _raster(self, z, y0, y1, x0, x1, classes):
        """Label arrays of ``classes`` for a window (which may extend beyond the volume), and what was painted."""
        out = {c: np.zeros((y1 - y0, x1 - x0), np.uint32) for c in classes}
        painted = []
        zpx = np.array([z], dtype=np.float64) * self._dz
        for site in self._sites(z, y0, y1, x0, x1):
            for obj in site:
                if obj.cls not in out or not obj.z0 <= z < obj.z1:
                    continue
                _, _, by0, by1, bx0, bx1 = obj.shape.bounds(self._dz)
                ya, yb, xa, xb = max(by0, y0), min(by1 + 1, y1), max(bx0, x0), min(bx1 + 1, x1)
                if ya >= yb or xa >= xb:
                    continue
                lo, hi = obj.shape.runs(zpx, np.arange(ya, yb))
                cols = np.arange(xa, xb)
                mask = (cols >= lo[0][:, None]) & (cols <= hi[0][:, None])
                sub = (slice(ya - y0, yb - y0), slice(xa - x0, xb - x0))
                out[obj.cls][sub][mask] = obj.id
                painted.append((obj, sub, mask))
        return out, painted

    def _noise(self, z, y0, y1, x0, x1) -> tuple[np.ndarray, np.ndarray]:
        """A texture field (uniform, zero mean) and shot noise (unit variance, triangular: three uniforms cost less
        than two normals) for a region, drawn per fixed block keyed by position."""
        out = np.empty((3, y1 - y0, x1 - x0), np.float32)
        n = _BLOCK
        for by in range(y0 // n, (y1 - 1) // n + 1):
            for bx in range(x0 // n, (x1 - 1) // n + 1):
                rng = np.random.default_rng([_TAG_NOISE, self.seed, z, by + _OFF, bx + _OFF])
                block = rng.random((3, n, n), dtype=np.float32)
                ya, yb, xa, xb = max(y0, by * n), min(y1, by * n + n), max(x0, bx * n), min(x1, bx * n + n)
                out[:, ya - y0:yb - y0, xa - x0:xb - x0] = block[:, ya - by * n:yb - by * n, xa - bx * n:xb - bx * n]
        return out[0] - 0.5, (out[1] + out[2] - 1.0) * math.sqrt(6.0)

    def _cristae(self, obj, region, sub, mask, y0, x0):
        """Dark lines across the mitochondrion's long axis (triangle wave: no transcendental per-pixel math)."""
        (ay, ax), period, phase = obj.look
        cy, cx, _ = obj.shape.c
        ys = np.arange(y0 + sub[0].start, y0 + sub[0].stop)[:, None]
        xs = np.arange(x0 + sub[1].start, x0 + sub[1].stop)[None, :]
        t = ((ys - cy) * ay + (xs - cx) * ax) / period + phase
        line = (t - np.floor(t) < 0.22) & mask
        region[line] = _CRISTA


# -- volumes -----------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _generator(shape, seed, dtype, scale) -> SyntheticEM:
    """One generator (and site cache) per parameter set and process, shared by the image and label volumes."""
    return SyntheticEM(shape, seed, dtype=dtype, scale=scale)


class SyntheticVolume(Volume):
    """A synthetic volume's image (``layer`` None) or one class's label ids; pickles as its URI and layer only."""

    def __init__(self, uri: str, layer: str | None = None):
        self.layer = layer
        super().__init__(uri)

    def __getstate__(self):
        return {**super().__getstate__(), "layer": self.layer}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._em = self._open()

    def _open(self) -> SyntheticEM:
        em = SyntheticEM.from_uri(self.path)
        return _generator(em.shape, em.seed, em.dtype.name, em.scale)

    def _inspect(self):
        self._em = self._open()
        if self.layer is not None and self.layer not in CLASSES:
            raise UserError(f"unknown synthetic class {self.layer!r}; choose one of {', '.join(CLASSES)}")
        dtype = self._em.dtype if self.layer is None else np.dtype(np.uint32)
        return self._em.shape, dtype, self._em.pixel_size_nm

    def read(self, z, y0, y1, x0, x1):
        if self.layer is None:
            return self._em.image(z, y0, y1, x0, x1)
        return self._em.labels(self.layer, z, y0, y1, x0, x1)


def open_synthetic(uri: str) -> SyntheticVolume:
    """The image of ``synth:ZxYxX[,seed=N][,dtype=...][,scale=F]`` as a Volume."""
    return SyntheticVolume(uri)


def open_synthetic_labels(uri: str) -> list[LabelLayer]:
    """The ground truth of a synthetic URI: one label layer per class, named by it."""
    return [LabelLayer(SyntheticVolume(uri, cls), cls) for cls in CLASSES]


def write_synthetic(out: str | Path, shape: tuple[int, int, int], seed: int = 0, fmt: str = "tif",
                    dtype: str = "uint8", scale: float = 1.0, overwrite: bool = False) -> dict[str, Path]:  # fmt: skip
    """``cellseg-batch synth``: the image as ``volume.tif`` (BigTIFF when large) or ``volume.zarr``, and the
    ground truth as ``truth.zarr``, an OME-Zarr in the layout ``run`` writes (image plus one label layer per
    class), so that ``eval`` and the ``labels`` predictor read it directly. Written slice by slice."""
    import tifffile
    import zarr

    from .write import Output

    gen = SyntheticEM(tuple(shape), seed, dtype=dtype, scale=scale)
    out = Path(out)
    paths = {"volume": out / f"volume.{fmt}", "truth": out / "truth.zarr"}
    if any(p.exists() for p in paths.values()) and not overwrite:
        raise UserError(f"{out} already holds a synthetic volume; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    for p in paths.values():
        if p.is_dir():
            shutil.rmtree(p)
    nz, ny, nx = gen.shape
    chunk = min(512, max(ny, nx))
    truth = Output(paths["truth"])
    truth.create(gen.shape, chunk, list(CLASSES), gen.dtype, gen.pixel_size_nm, {"synthetic": gen.uri}, np.uint32)
    layers = {cls: truth.labels(cls, 0) for cls in CLASSES}
    image_out = truth.image(0)

    def slices():
        for z in range(nz):
            image = np.zeros((ny, nx), gen.dtype)
            for y0 in range(0, ny, chunk):  # a band of rows at a time: labels never held for a whole slice
                y1 = min(y0 + chunk, ny)
                image[y0:y1] = gen.image(z, y0, y1, 0, nx)
                image_out[z, y0:y1] = image[y0:y1]
                for cls, arr in layers.items():
                    arr[z, y0:y1] = gen.labels(cls, z, y0, y1, 0, nx)
            truth.build_pyramid(z)
            yield image

    pz, py, _ = gen.pixel_size_nm
    if fmt == "zarr":
        volume = zarr.create_array(str(paths["volume"]), shape=gen.shape, chunks=(1, chunk, chunk), dtype=gen.dtype)
        for z, image in enumerate(slices()):
            volume[z] = image
    else:
        # ImageJ metadata records the pixel size, z spacing included, where ImageJ's 4 GB limit allows it
        if gen.dtype.itemsize * nz * ny * nx < 2**32 - 2**25:
            where = {"imagej": True, "resolution": (1e3 / py, 1e3 / py),
                     "metadata": {"spacing": pz / 1e3, "unit": "um", "axes": "ZYX"}}  # fmt: skip
        else:
            where = {"bigtiff": True, "resolution": (1e7 / py, 1e7 / py), "resolutionunit": "CENTIMETER"}
        tifffile.imwrite(paths["volume"], slices(), shape=gen.shape, dtype=gen.dtype, **where)
    truth.finalize(gen.pixel_size_nm)
    return paths


# -- linking cases: what 3D linking must get right ------------------------------------------------------------------

LINK_CLASSES = ("mitochondrion", "canalicular_vessel")
LINK_CASES = ("branch", "merge", "touching", "straight")
_LINK_PITCH = 80  # px at scale 1: one case per square, far enough apart never to touch


def _tube(shape_zyx, dz: float, p0, p1, r: float, y0: int, x0: int, size: int) -> tuple[tuple, np.ndarray]:
    """Voxels within ``r`` px of segment p0-p1 ((y, x, z) px; z in slices * dz): a slice of the volume and its mask,
    limited to the case's square [y0, y0 + size) x [x0, x0 + size)."""
    zs = np.arange(shape_zyx[0]) * dz
    ys, xs = np.arange(y0, y0 + size), np.arange(x0, x0 + size)
    p, q = np.asarray(p0, float), np.asarray(p1, float)
    d = q - p
    grid = np.stack(np.meshgrid(ys, xs, zs, indexing="ij"), -1)  # (y, x, z, 3)
    t = np.clip(((grid - p) @ d) / (d @ d), 0.0, 1.0)
    dist = np.linalg.norm(grid - (p + t[..., None] * d), axis=-1)
    return (slice(None), slice(y0, y0 + size), slice(x0, x0 + size)), (dist <= r).transpose(2, 0, 1)


def linking_cases(shape: tuple[int, int, int], seed: int = 0, dropout: float = 0.0, shift: float = 0.0,
                  scale: float = 1.0) -> dict:  # fmt: skip
    """Small volumes that 3D linking must get right, with exact truth: one case per square of the plane, drawn by
    ``seed``: a Y-shaped tube (``branch``: one section splits into two going up; ``merge``: two join), two tubes
    of one class touching side by side along their whole length, both leaning the same way (``touching``), or a
    straight leaning tube (``straight``); classes mitochondrion (thicker) and canalicular_vessel.

    ``shift``: the share of slices moved as a whole by a few px (section misalignment; truth and detections alike).
    ``dropout``: the share of 2D instances deleted from the detections (missed detections; truth keeps them).
    Returns ``truth`` (class -> (Z, Y, X) uint32 3D ids), ``detections`` ((Z, Y, X) uint32 2D instances: every
    4-connected section of every object gets its own id, as 2D ground truth or a 2D model gives them),
    ``classes`` (detection id -> class name), ``cases`` (3D id -> (class, case)) and ``dropped`` (how many)."""
    nz, ny, nx = (int(n) for n in shape)
    if not 0.0 <= dropout < 1.0 or not 0.0 <= shift <= 1.0:
        raise UserError(f"dropout {dropout} must be in [0, 1) and shift {shift} in [0, 1]")
    rng = np.random.default_rng([_TAG_SITE, seed, 99])
    dz, pitch = SLICE_NM / PIXEL_NM * scale, round(_LINK_PITCH * scale)
    truth = {c: np.zeros((nz, ny, nx), np.uint32) for c in LINK_CLASSES}
    cases, next_id, top = {}, 1, (nz - 1) * dz
    for y0 in range(0, ny - pitch + 1, pitch):
        for x0 in range(0, nx - pitch + 1, pitch):
            case = LINK_CASES[int(rng.integers(len(LINK_CASES)))]
            cls = LINK_CLASSES[int(rng.integers(2))]
            r = (rng.uniform(6.0, 8.5) if cls == "mitochondrion" else rng.uniform(4.0, 6.0)) * scale
            cy, cx = y0 + pitch / 2, x0 + pitch / 2
            lean = rng.uniform(0, 2 * math.pi)
            ly, lx = math.sin(lean), math.cos(lean)
            z_lo, z_hi = rng.uniform(0.05, 0.2) * top, rng.uniform(0.8, 0.95) * top
            if case in ("branch", "merge"):
                # the arms leave the joint steeply (0.5-1.0 radius per slice, each way) until they are 2.6-3.6 radii
                # from the axis, then run on straight up (or down)
                spread, step = rng.uniform(2.6, 3.6) * r, rng.uniform(0.5, 1.0) * r
                joint = rng.uniform(0.35, 0.55) * top
                trunk_end, arm_end = (z_lo, z_hi) if case == "branch" else (z_hi, z_lo)
                bend = joint + math.copysign(spread / step * dz, arm_end - joint)
                tubes = [((cy, cx, trunk_end), (cy, cx, joint))]
                for s in (-1, 1):
                    ay, ax = cy + s * spread * ly, cx + s * spread * lx
                    tubes += [((cy, cx, joint), (ay, ax, bend)), ((ay, ax, bend), (ay, ax, arm_end))]
                parts = [tubes]
            elif case == "touching":
                tilt = rng.uniform(0.0, 1.2) * r  # both lean the same way, along the line between them
                off = r + 0.5
                parts = [
                    [
                        (
                            (cy + s * off * ly - tilt * ly, cx + s * off * lx - tilt * lx, z_lo),
                            (cy + s * off * ly + tilt * ly, cx + s * off * lx + tilt * lx, z_hi),
                        )
                    ]
                    for s in (-1, 1)
                ]
            else:
                tilt = rng.uniform(0.0, 2.0) * r
                parts = [[((cy - tilt * ly, cx - tilt * lx, z_lo), (cy + tilt * ly, cx + tilt * lx, z_hi))]]
            for tubes in parts:
                for p0, p1 in tubes:
                    where, mask = _tube((nz, ny, nx), dz, p0, p1, r, y0, x0, pitch)
                    truth[cls][where][mask] = next_id
                cases[next_id] = (cls, case)
                next_id += 1
    # misaligned sections: the whole slice moves (a few px, at most a third of the thinnest tube)
    for z in np.flatnonzero(rng.random(nz) < shift):
        dy, dx = rng.integers(-2, 3, size=2) * max(1, round(scale))
        for arr in truth.values():
            arr[z] = ndimage.shift(arr[z], (dy, dx), order=0, mode="constant")
    detections = np.zeros((nz, ny, nx), np.uint32)
    classes, dropped, n = {}, 0, 0
    for z in range(nz):
        for cls in LINK_CLASSES:
            sections, count = ndimage.label(truth[cls][z] > 0)  # objects of a class never share a pixel
            if count == 0:
                continue
            # touching objects are one foreground component: split it by the truth ids, each part its own section
            ids = sections.astype(np.int64) * (next_id + 1) + truth[cls][z]
            for key in np.unique(ids[ids > 0]):
                part, k = ndimage.label(ids == key)
                for i in range(1, k + 1):
                    if rng.random() < dropout:
                        dropped += 1
                        continue
                    n += 1
                    detections[z][part == i] = n
                    classes[str(n)] = cls
    return {"truth": truth, "detections": detections, "classes": classes, "cases": cases, "dropped": dropped}


def write_linking_cases(out: str | Path, shape: tuple[int, int, int], seed: int = 0, dropout: float = 0.0,
                        shift: float = 0.0, overwrite: bool = False) -> dict[str, Path]:  # fmt: skip
    """``cellseg-batch synth --linking``: ``linking_cases`` written as ``volume.tif`` (a plain rendering),
    ``detections.tif`` with ``detections.json`` (the 2D instances, for ``--predictor labels``) and ``truth.zarr``
    (3D truth in the layout ``run`` writes, for ``eval``)."""
    import json

    import tifffile

    from .write import Output

    data = linking_cases(tuple(shape), seed, dropout, shift)
    out = Path(out)
    paths = {"volume": out / "volume.tif", "detections": out / "detections.tif", "classes": out / "detections.json",
             "truth": out / "truth.zarr"}  # fmt: skip
    if any(p.exists() for p in paths.values()) and not overwrite:
        raise UserError(f"{out} already holds a synthetic volume; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if paths["truth"].is_dir():
        shutil.rmtree(paths["truth"])
    fg = sum((a > 0).astype(np.uint8) for a in data["truth"].values())
    image = np.where(fg > 0, 70, 200).astype(np.uint8)
    pixel = (SLICE_NM, PIXEL_NM, PIXEL_NM)
    tifffile.imwrite(paths["volume"], image)
    tifffile.imwrite(paths["detections"], data["detections"])
    paths["classes"].write_text(json.dumps(data["classes"]))
    truth = Output(paths["truth"])
    truth.create(image.shape, min(512, max(shape[1:])), list(LINK_CLASSES), image.dtype, pixel,
                 {"synthetic": f"linking-cases seed={seed} dropout={dropout} shift={shift}"}, np.uint32)  # fmt: skip
    truth.image(0)[:] = image
    for cls, arr in data["truth"].items():
        truth.labels(cls, 0)[:] = arr
    for z in range(image.shape[0]):
        truth.build_pyramid(z)
    truth.finalize(pixel)
    return paths
