"""Read: open EM volumes and label stacks lazily (TIFF/BigTIFF/OME-TIFF, image sequences, HDF5, zarr v2/v3, OME-Zarr,
N5 (through tensorstore), MRC, NumPy .npy, synthetic) as 2D windows."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import UserError
from .registry import Registry
from .runs import label_runs
from .write import layer_name

SPATIAL = "ZYX"
# tifffile logs what it finds wrong in a damaged file on lines of its own; here that becomes one UserError line
logging.getLogger("tifffile").setLevel(logging.CRITICAL)


# what a header may declare: beyond these, a file is refused before anything is sized by its shape (the largest EM
# volumes are ~10^15 voxels; a slice of 2^36 pixels is a 262144^2 mosaic)
MAX_VOXELS, MAX_SLICE_PIXELS = 2**50, 2**36


def check_shape(shape: tuple[int, int, int], path: str) -> None:
    """Refuse a declared (Z, Y, X) shape no real volume has: a damaged or hostile header."""
    if math.prod(shape) > MAX_VOXELS or shape[1] * shape[2] > MAX_SLICE_PIXELS:
        raise UserError(
            f"{path} declares the shape {shape}, beyond what this tool reads ({MAX_SLICE_PIXELS} pixels a slice, "
            f"{MAX_VOXELS} voxels); its header is damaged or it is not a volume"
        )


class Volume:
    """A (Z, Y, X) greyscale volume read one 2D window at a time; picklable (workers reopen it by path)."""

    kind = "volume"
    origin_nm: tuple[float, float, float] | None = None  # where voxel (0, 0, 0) sits (Z, Y, X nm), if the file says

    def __init_subclass__(cls, **kwargs):
        # every reader's windows come back in native byte order (fastremap, cc3d and zarr refuse big-endian ids and
        # numpy's 'Q'/'q' aliases of uint64/int64), readers added with register_opener included
        super().__init_subclass__(**kwargs)
        if "read" in cls.__dict__:
            cls.read = _native_windows(cls.__dict__["read"])

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self.shape, dtype, self.pixel_size_nm = self._inspect()
        self.dtype = native(dtype)
        check_shape(self.shape, path)

    def __getstate__(self):
        # open file handles stay behind (thread-local); the receiving process reopens by path
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def identity(self) -> list:
        """What tells this input from an edited one (the resume check): a file's size and modification time."""
        p = Path(getattr(self, "_file", self.path))  # the file of a path that names a part of it (file.tif:1)
        return [p.stat().st_size, p.stat().st_mtime_ns] if p.is_file() else []

    @property
    def rgb(self) -> bool:
        """Stored as RGB/RGBA: windows are read as the mean of R, G and B."""
        axes = getattr(self, "_axes", None)
        return axes is not None and axes.rgb

    def read(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The window [y0:y1, x0:x1] of slice z, as a 2D array of the volume's dtype."""
        raise NotImplementedError

    def _inspect(self) -> tuple[tuple[int, int, int], np.dtype, tuple[float, float, float] | None]:
        raise NotImplementedError


def volume_identity(volume: Volume) -> list:
    """What a resumed run compares to tell an input from an edited or another one: its resolved path, shape, pixel
    type and what the reader can tell of its contents (``Volume.identity``)."""
    p = Path(volume.path)
    return [str(p.resolve()) if p.exists() else volume.path, list(volume.shape), str(volume.dtype), *volume.identity()]


def native(dtype) -> np.dtype:
    """A pixel type in its canonical native form: '>u4' (big-endian) as uint32, numpy's 'Q' (ulonglong, what
    tifffile gives for 64-bit pixels) as uint64, the type zarr and the label tools know."""
    return np.dtype(np.dtype(dtype).newbyteorder("=").str)


def _native_windows(read: Callable) -> Callable:
    @functools.wraps(read)
    def native_read(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        window = read(self, z, y0, y1, x0, x1)
        want = native(window.dtype)
        return window if window.dtype is want else window.astype(want, copy=False).view(want)  # swapped once here

    return native_read


def _check_dtype(dtype: np.dtype, path: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":  # "convert it to float32" would send a label stack on to the next refusal
        raise UserError(f"{path} has pixel type bool, a mask: save an image as uint8, and a label stack as integer ids, "
                        "one per object (e.g. scipy.ndimage.label on each slice)")  # fmt: skip
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UserError(f"{path} has pixel type {dtype}; convert it to uint8, uint16 or float32")
    return native(dtype)


SAMPLES = {1: "greyscale", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}  # samples per pixel read, as named to a user


@dataclass(frozen=True)
class AxisMap:
    """Where Z, Y and X (and a sample axis) sit in a stored array, and how a 2D window is cut from it.

    ``template`` has one entry per stored axis: "Z", "Y", "X", "S" (samples), or 0 for a singleton axis; ``samples``
    is the length of "S": 2 grey + alpha, 3 RGB, 4 RGBA."""

    template: tuple
    samples: int = 1

    def window(self, z: int, y0: int, y1: int, x0: int, x1: int) -> tuple:
        image = slice(0, 3) if self.rgb else slice(0, 1)  # alpha is not image
        cut = {"Z": z, "Y": slice(y0, y1), "X": slice(x0, x1), "S": image}
        return tuple(cut[a] if isinstance(a, str) else a for a in self.template)

    @property
    def rgb(self) -> bool:
        return self.samples >= 3

    def grey(self, window: np.ndarray) -> np.ndarray:
        """A window as cut, as 2D greyscale: RGB becomes the mean of R, G and B (ImageJ's unweighted conversion;
        greyscale EM saved as RGB has three equal channels, so its values come back unchanged); grey + alpha its
        grey."""
        if "S" not in self.template:
            return window
        axis = [a for a in self.template if a in ("Y", "X", "S")].index("S")
        if not self.rgb:
            return window.take(0, axis=axis)
        mean = window.mean(axis=axis)
        return np.rint(mean).astype(window.dtype) if window.dtype.kind in "ui" else mean.astype(window.dtype)


def _plain_axes(shape: tuple[int, ...], path: str) -> str:
    """The axes of an array that names none (a plain zarr array, an HDF5 dataset): (Y, X), (Z, Y, X), or 4D with one
    singleton axis first or last (the channel axis of a greyscale export), which is dropped."""
    axes = _unnamed_axes(shape)
    if axes is None:
        raise UserError(f"{path} has shape {tuple(shape)} and names no axes; give a (Z, Y, X) or (Y, X) array, or a 4D "
                        "one with one singleton axis first or last, e.g. (1, Z, Y, X)")  # fmt: skip
    return axes


def _unnamed_axes(shape: tuple[int, ...]) -> str | None:
    if len(shape) == 4:
        return "QZYX" if shape[0] == 1 else "ZYXQ" if shape[-1] == 1 else None
    return {2: "YX", 3: "ZYX"}.get(len(shape))


def to_zyx(shape: tuple[int, ...], axes: str, path: str, hint: str) -> tuple[tuple[int, int, int], AxisMap]:
    """Map an array's axes to (Z, Y, X): singleton extra axes are dropped wherever they are, a missing Z becomes
    one slice, and grey + alpha, RGB or RGBA samples (2, 3 or 4) are kept for ``AxisMap.grey``."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise UserError(f"{path}: {len(shape)}D data with axes {axes!r}; {hint}")
    if 0 in shape:
        raise UserError(f"{path} is empty (shape {shape})")
    kept = [a for a, n in zip(axes, shape) if n > 1 or a in "YX"]
    samples = shape[axes.index("S")] if "S" in kept else 1
    if samples not in SAMPLES:
        raise UserError(f"{path} is multi-sample ({shape}); convert it to a greyscale stack")
    rest = [a for a in kept if a != "S"]
    if "S" in kept and len(rest) == 2 and axes.index("S") < axes.index("Y"):
        # tifffile (and others) store a (3, Y, X) or (4, Y, X) array as one planar RGB image by default: that is far
        # more often a 3-slice stack than a colour image
        raise UserError(f"{path} is one planar {SAMPLES[samples]} image of shape {shape}; if its planes are slices, "
                        "save it as a greyscale stack (tifffile: photometric='minisblack')")  # fmt: skip
    if rest[-2:] != ["Y", "X"]:
        raise UserError(f"{path} has axes {axes!r}; the last two axes must be Y and X ({hint})")
    if len(rest) > 3 or (len(rest) == 3 and rest[0] not in "ZQIT"):
        raise UserError(
            f"{path} has shape {shape} with axes {axes!r}: more than one non-singleton axis besides Y and X; {hint}"
        )
    template = tuple((a if a in "YXS" else "Z") if (n > 1 or a in "YX") else 0 for a, n in zip(axes, shape))
    size = dict(zip(template, shape))
    return (size.get("Z", 1), size["Y"], size["X"]), AxisMap(template, samples)


class ChunkCache:
    """Windows cut from whole decoded chunks of a zarr array (a zarr volume's, or tifffile's zarr view of a compressed
    or tiled TIFF: its strips or tiles), kept per thread (LRU, ``CACHE_BYTES``) for the windows after."""

    CACHE_BYTES = 128 * 2**20  # decoded chunks kept per thread: a row of tiles reads each chunk once

    def _read_chunks(self, arr, z, y0, y1, x0, x1) -> np.ndarray:
        """A window assembled from whole decoded chunks, kept (LRU) for the windows that overlap this one: tile
        windows overlap and straddle chunk borders, so without this each chunk would be decoded up to 4 times; a
        chunk several slices deep serves the next slices too (an actor gets the same tile position slice after
        slice), where it was decoded again for each. Any axes the volume has (5D OME-Zarr's singleton T and C)."""
        template = self._axes.template
        cy, cx = arr.chunks[template.index("Y")], arr.chunks[template.index("X")]
        out = np.empty((y1 - y0, x1 - x0), dtype=arr.dtype)
        for by in range(y0 // cy, (y1 - 1) // cy + 1):
            for bx in range(x0 // cx, (x1 - 1) // cx + 1):
                block = self._chunk(arr, z, by, bx)
                ya, yb = max(y0, by * cy), min(y1, (by + 1) * cy)
                xa, xb = max(x0, bx * cx), min(x1, (bx + 1) * cx)
                out[ya - y0 : yb - y0, xa - x0 : xb - x0] = block[ya - by * cy : yb - by * cy, xa - bx * cx : xb - bx * cx]
        return out

    def _chunk(self, arr, z: int, by: int, bx: int) -> np.ndarray:
        cache = getattr(self._local, "chunks", None)
        if cache is None:
            cache = self._local.chunks = OrderedDict()
            self._local.chunk_bytes = 0
        template, chunks = self._axes.template, arr.chunks
        at = {"Z": z, "Y": by * chunks[template.index("Y")], "X": bx * chunks[template.index("X")]}
        key = tuple(at.get(a, 0) // c for a, c in zip(template, chunks))  # singleton axes: index 0
        plane = tuple(z % c if a == "Z" else slice(None) if a in ("Y", "X") else 0 for a, c in zip(template, chunks))
        if key in cache:
            cache.move_to_end(key)
            return cache[key][plane]
        io = getattr(self._local, "chunk_io", None)  # a zarr volume's own arrays; not tifffile's views
        if io is not None and io.direct_read:  # whole: edge chunks with their padding
            block = cache[key] = io.read(key)
        else:  # e.g. a sharded array (ChunkIO's units are its shards): one chunk of a shard through zarr
            block = cache[key] = np.asarray(arr[tuple(slice(k * c, (k + 1) * c) for k, c in zip(key, chunks))])
        self._local.chunk_bytes += block.nbytes
        while self._local.chunk_bytes > self.CACHE_BYTES and len(cache) > 1:
            self._local.chunk_bytes -= cache.popitem(last=False)[1].nbytes
        return block[plane]


class MappedVolume(ChunkCache, Volume):
    """A volume read from one array that each thread opens once (memory-mapped, or a lazy zarr view): windows are cut
    from it through ``_axes``. Subclasses give ``_open_array``."""

    def _open_array(self):
        raise NotImplementedError

    def _array(self):
        arr = getattr(self._local, "arr", None)
        if arr is None:
            arr = self._local.arr = self._open_array()
        return arr

    def read(self, z, y0, y1, x0, x1):
        arr = self._array()
        try:
            if not isinstance(arr, np.ndarray) and "S" not in self._axes.template:
                # tifffile's zarr view (compressed or tiled): each strip or tile decoded once, not for every window
                # it touches (a row of 1024 px tiles across a 16384 px slice decoded each strip 16 times)
                return self._read_chunks(arr, z, y0, y1, x0, x1)
            return self._axes.grey(np.asarray(arr[self._axes.window(z, y0, y1, x0, x1)]))
        except Exception as e:  # tifffile/zarr/numpy raise many types for damaged data
            raise UserError(f"cannot read slice {z} of {self.path} ({e}); the file may be truncated or corrupt") from e


TIFF_SERIES = re.compile(r"^(?P<file>.*\.(?:tif|tiff|btf))[:/](?P<series>\d+)$", re.IGNORECASE)


class TiffVolume(MappedVolume):
    """Multi-page TIFF, BigTIFF, ImageJ hyperstacks, 2D TIFF (one slice); memory-mapped where the layout allows. Of
    a TIFF of several images (series: an OME-TIFF's positions, stacks appended to one file), ``file.tif:N`` (or
    ``file.tif/N``, as ``file.h5:dataset``) reads image N, from 0; ``file.tif`` alone reads the first, where the
    others are smaller (pyramid levels, thumbnails)."""

    def _inspect(self):
        import tifffile

        match = TIFF_SERIES.match(self.path)
        self._file, chosen = (match["file"], int(match["series"])) if match else (self.path, None)
        self._series = chosen or 0
        if not os.path.isfile(self._file):
            raise UserError(f"{self._file} does not exist")
        try:
            self._flags = {"is_shaped": False} if _one_series_per_page(self._file) else {}
            with tifffile.TiffFile(self._file, **self._flags) as tf:
                if not tf.series:
                    raise UserError(f"{self.path} holds no image data")
                if self._series >= len(tf.series):
                    raise UserError(f"{self._file} holds {_images(tf.series)}; there is no image {chosen}: name one "
                                    f"of 0 to {len(tf.series) - 1} ({self._file}:N)")  # fmt: skip
                series = tf.series[self._series]
                headers = _page_headers(tf, series)
                self._check_complete(tf, series, headers)
                self._check_pages(headers)  # first: pages of another size can read as images of their own
                if chosen is None:
                    _check_one_image(tf.series, self.path)
                axes = series.axes
                if tf.is_imagej and axes.startswith("C") and (tf.imagej_metadata or {}).get("channels", 1) > 1:
                    raise UserError(f"{self.path} is an ImageJ stack of {series.shape[0]} channels; save one channel")
                if axes[0] == "C" and len(axes) == 3:
                    axes = "Z" + axes[1:]  # an ImageJ stack saved without hyperstack axes reads as channels
                zyx, self._axes = to_zyx(series.shape, axes, self.path, "save it as a Z, Y, X stack")
                dtype = _check_dtype(series.dtype, self.path)
                self._check_codec(series)
                pixel = _tiff_pixel_size(tf, self._series)
        except UserError:
            raise
        except Exception as e:  # tifffile raises many types for a damaged file (struct.error, RuntimeError, ...)
            raise UserError(f"cannot read {self.path} as TIFF ({e}); check that it is a complete TIFF file") from e
        return zyx, dtype, pixel

    def _check_complete(self, tf, series, pages: list) -> None:
        size = os.path.getsize(self._file)
        if any(page is None for page in pages):
            raise UserError(f"{self.path} is truncated or corrupt (a page cannot be read)")
        # what the file says it holds (tifffile's or ImageJ's metadata) against the images its pages give: a file
        # cut short loses its last pages (or gains phantom ones) and can still read as a valid-looking stack
        images = math.prod(n for n, a in zip(series.shape, series.axes) if a not in "YXS")
        said = None
        if tf.is_shaped:
            shaped = tf.shaped_metadata or ()  # one entry a series
            shape = ((shaped[self._series] if self._series < len(shaped) else {}) or {}).get("shape") or [0, 0, 0]
            said = math.prod(shape) // max(1, math.prod(series.keyframe.shape))  # its shape over one page's
        elif tf.is_imagej:
            said = (tf.imagej_metadata or {}).get("images", 1)
        if said is not None and (said != images or series.kind.lower() not in ("shaped", "imagej")):
            raise UserError(f"{self.path} is truncated or corrupt: its metadata says {said} images, its pages give "
                            f"{images}")  # fmt: skip
        ends = [o + c for page in pages for o, c in zip(getattr(page, "dataoffsets", ()) or (),
                                                       getattr(page, "databytecounts", ()) or ())]  # fmt: skip
        if series.dataoffset is not None:  # contiguous: pages past the first may be implied by the shape alone
            ends.append(series.dataoffset + series.nbytes)
        if any(end > size for end in ends):
            raise UserError(f"{self.path} is truncated: its image data ends beyond the file's {size} bytes")

    def _check_pages(self, pages: list) -> None:
        """Every page read as a slice has the size, pixel type and storage of the first: tifffile reads a series'
        pages through its first page's header (and judges a series uniform by 3 sampled pages), so an odd page would be
        read as garbage or be left out."""
        for page in pages:
            if page.hash != pages[0].hash and not page.is_reduced:  # reduced: a pyramid level or thumbnail
                raise UserError(_odd_page(self.path, page, pages[0]))

    def _check_codec(self, series) -> None:
        """A compression tifffile cannot decode here fails now, not at the first tile of a started run."""
        import tifffile

        compression = series.keyframe.compression
        try:
            tifffile.TIFF.DECOMPRESSORS[compression]
        except KeyError as e:
            name = tifffile.COMPRESSION(compression).name if compression in set(tifffile.COMPRESSION) else compression
            raise UserError(f"{self.path} is {name}-compressed, which needs the imagecodecs package here: pip install "
                            "imagecodecs (it is a dependency of cellseg-batch; reinstall it)") from e  # fmt: skip

    def _open_array(self):
        import tifffile
        import zarr

        try:
            return tifffile.memmap(self._file, mode="r", series=self._series, **self._flags)
        except (ValueError, OSError):
            # level 0: a pyramid (OME-TIFF's SubIFDs) would give a zarr group of all its levels
            store = tifffile.imread(self._file, aszarr=True, series=self._series, level=0, **self._flags)
            return zarr.open(store, mode="r")


def _check_one_image(series: list, path: str) -> None:
    """``file.tif`` alone reads its first series (image); later ones smaller in Y or X (pyramid levels written as
    series, thumbnails, a slide's label and macro images) are left out. One of the first's slice size (an OME-TIFF's
    positions, stacks appended to one file) or larger (an overview written before the stack) may as well be the
    volume: refused, naming the images and how to choose one, not read as the first alone."""

    def side(s) -> tuple[int, int]:
        return s.keyframe.imagelength, s.keyframe.imagewidth

    first = series[0]
    others = [i for i, s in enumerate(series[1:], 1)
              if side(s) == side(first) or math.prod(s.shape) > math.prod(first.shape)]  # fmt: skip
    if others:
        raise UserError(f"{path} holds {_images(series)}, more than one of which may be the volume; name the one to "
                        f"read: {path}:N, N from 0 (e.g. {path}:{others[0]})")  # fmt: skip


def _images(series: list) -> str:
    """The images (series) of a TIFF, for a message: '3 images (5x130x150 uint16, ...)'."""
    images = ", ".join(f"{'x'.join(map(str, s.shape))} {s.dtype}" for s in series[:4])
    more = f" and {len(series) - 4} more" if len(series) > 4 else ""
    return f"{len(series)} image{'s' if len(series) > 1 else ''} ({images}{more})"


def _page_headers(tf, series) -> list:
    """The pages read as slices, each by its own header (None for one that cannot be read). Where no metadata says
    what the series is (uniform, generic), every page of the file is a slice, as Fiji reads it. ~80 µs a page: headers
    are parsed, no pixels decoded."""
    import tifffile

    pages = tf.pages
    useframes, pages.useframes = pages.useframes, False  # each page's own header, not the first page's
    try:
        if series.kind.lower() in ("uniform", "generic"):
            return [pages[i] for i in range(len(pages))]
        # virtual frames (ImageJ's > 4 GB files, contiguous stacks) have no header of their own: the first page's
        return [p.aspage() if isinstance(p, tifffile.TiffFrame) and not p.is_virtual else p for p in series.pages]
    finally:
        pages.useframes = useframes


def _one_series_per_page(path: str) -> bool:
    """Written by tifffile one 2D page at a time (``TiffWriter.write`` per slice): each page is a "shaped" series of
    its own, where tifffile would give the first slice alone; read without that metadata, the pages are one stack."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        # the first two pages each a series of one page: a stack written at once after a thumbnail (a series of one
        # page, then one of many) is several series, the first of which is not the stack
        return len(tf.pages) > 1 and all(_one_page_series(tf.pages[i]) for i in (0, 1))


def _one_page_series(page) -> bool:
    if not page.is_shaped:
        return False
    try:
        said = json.loads(page.shaped_description or "")
    except ValueError:  # tifffile's pre-2018 "shape=(...)" description, or not tifffile's: as tifffile reads it
        return False
    shape = said.get("shape") if isinstance(said, dict) else None
    return isinstance(shape, list) and math.prod(shape) == math.prod(page.shape)


def _page_size(page) -> str:
    return f"{'x'.join(map(str, page.shape))} {page.dtype}"


def _odd_page(path: str, page, first) -> str:
    """The one line that names a page unlike the first and how it differs."""
    size = _page_size
    if size(page) == size(first):  # same size and type, other compression, strips or tiles
        return (f"{path}: page {page.index} (from 0) is stored unlike page 0 ({page.compression.name} compression, "
                f"{'tiles' if page.is_tiled else 'strips'}), which tifffile cannot read as one stack; resave it "
                "(e.g. Fiji: File > Save As > Tiff)")  # fmt: skip
    return (f"{path}: page {page.index} (from 0) is {size(page)}, but page 0 is {size(first)}: every page of a "
            "stack must have the same size and pixel type; resave it with matching pages")  # fmt: skip


NM_PER_UNIT = {"nm": 1.0, "um": 1000.0, "µm": 1000.0, "\u03bcm": 1000.0, "micron": 1000.0, "microns": 1000.0,
               "mm": 1e6, "cm": 1e7, "m": 1e9, "Å": 0.1, "\u212b": 0.1, "pm": 1e-3}  # µ: the micro sign or Greek mu


# X/YResolution tags (no ImageJ unit) that give pixels larger than this are the dpi image programs write by default
# (72, 96, 300 dpi: 353, 265, 85 um), not a microscope's pixel size
MAX_TAG_PIXEL_NM = 20_000.0


def _tiff_pixel_size(tf, index: int = 0) -> tuple[float | None, float, float] | None:
    """(z, y, x) in nm of image (series) ``index`` from OME-XML (PhysicalSize*), else the X/YResolution tags and
    ImageJ's unit and spacing; z is None where not recorded."""
    if tf.is_ome:
        ome = _ome_pixel_size(tf, index)
        if ome:
            return ome
    tags = tf.series[index].keyframe.tags
    if "XResolution" not in tags:
        return None
    ij = tf.imagej_metadata or {}
    unit = str(ij.get("unit", "")).replace("\\u00B5", "u").replace("µ", "u")
    nm_per_unit = NM_PER_UNIT.get(unit)
    from_tags = nm_per_unit is None
    if from_tags and "ResolutionUnit" in tags:
        nm_per_unit = {2: 2.54e7, 3: 1e7}.get(int(tags["ResolutionUnit"].value))  # per inch, per cm
    # pixels per unit along X, and along Y where the file gives YResolution (ImageJ writes both; they differ for
    # pixels that are not square)
    per_unit = [tags[name].value for name in ("YResolution", "XResolution") if name in tags]
    if not nm_per_unit or any(not num for num, _ in per_unit):
        return None
    y, x = (nm_per_unit * den / num for num, den in (per_unit if len(per_unit) == 2 else per_unit * 2))
    if from_tags and max(y, x) > MAX_TAG_PIXEL_NM:  # a print or screen resolution (72 dpi: 352,778 nm), not a pixel size
        return None
    z = float(ij["spacing"]) * nm_per_unit if "spacing" in ij and ij.get("unit") else None
    return (z, y, x)


def _ome_pixel_size(tf, index: int) -> tuple[float | None, float, float] | None:
    import tifffile

    try:
        image = tifffile.xml2dict(tf.ome_metadata)["OME"]["Image"]
        pixels = (image[index] if isinstance(image, list) else image)["Pixels"]
    except Exception:  # OME-XML that does not parse or lacks an image: no pixel size, as without OME
        return None

    def size(axis: str) -> float | None:
        value = pixels.get(f"PhysicalSize{axis}")
        unit = NM_PER_UNIT.get(str(pixels.get(f"PhysicalSize{axis}Unit", "µm")))  # OME's default unit is µm
        try:
            return float(value) * unit if value is not None and unit and float(value) > 0 else None
        except (TypeError, ValueError):
            return None

    y, x = size("Y"), size("X")
    return (size("Z"), y, x) if y and x else None


class ZarrVolume(ChunkCache, Volume):
    """A zarr v2/v3 array, or the level-0 array of an OME-Zarr (NGFF 0.4/0.5) multiscale image."""

    is_label_image = False  # an NGFF label image (``image-label``): a segmentation, not an image to segment

    def _inspect(self):
        import zarr

        try:
            node = zarr.open(self.path, mode="r")
        except Exception as e:
            raise UserError(f"cannot open {self.path} as zarr ({e})") from e
        axes, pixel = None, None
        self._array_path = self.path
        if isinstance(node, zarr.Group):
            base, ms = self.path.rstrip("/"), multiscales(node.attrs)
            self.is_label_image = ngff_attr(node.attrs, "image-label") is not None
            if ms is None:
                base, ms = self._one_image(node, base)
            level0 = finest_level(ms)
            self._array_path = f"{base}/{level0['path']}"
            node = zarr.open(self._array_path, mode="r")
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", []))
            pixel = ngff_pixel_size(ms, level0)
            self.origin_nm = ngff_origin(ms, level0)
        if axes is None or len(axes) != node.ndim:
            axes = _plain_axes(node.shape, self.path)
        zyx, self._axes = to_zyx(node.shape, axes, self.path, "pass a 3D (Z, Y, X) array")
        return zyx, _check_dtype(node.dtype, self.path), pixel

    def _one_image(self, group, base: str) -> tuple[str, dict]:
        """The OME-Zarr image of a group without multiscales of its own: bioformats2raw's layout (bfconvert, Fiji's
        OME-Zarr export) keeps each image (series) in a subgroup, ``0``, ``1``, ...; one image is read, several
        are named. Any other group is refused naming the images or arrays it holds."""
        images = sorted((name for name, sub in group.groups() if multiscales(sub.attrs)), key=_natural_key)
        if len(images) == 1 and "bioformats2raw.layout" in dict(group.attrs):
            return f"{base}/{images[0]}", multiscales(group[images[0]].attrs)
        named = [f"{base}/{name}" for name in images] or [f"{base}/{name}" for name, _ in sorted(group.arrays())]
        kind = "OME-Zarr images" if images else "arrays"
        hint = f"; pass one of its {kind}: {', '.join(named[:3])}{' ...' if len(named) > 3 else ''}" if named else ""
        raise UserError(f"{self.path} is a zarr group without OME-Zarr multiscales{hint}")

    def identity(self) -> list:
        """What tells this array from an edited one (the resume check), without listing its (maybe millions of)
        chunks: its metadata document (shape, dtype, chunks, codecs, fill value, attributes) and the size and
        modification time of the first and the centre chunk (shard) of its first, middle and last slices (the centre
        holds labels where the corner is empty), a missing one as missing. That catches an array rewritten (zarr
        writes each chunk as a new file), resized, re-encoded or with slices added or cut; it cannot catch a chunk
        rewritten in place that is not one of those sampled (one edited tile of a slice in between)."""
        import zarr

        arr = zarr.open(self._array_path, mode="r")
        meta = json.dumps(arr.metadata.to_dict(), sort_keys=True, default=str)
        out: list = [hashlib.sha256(meta.encode()).hexdigest()[:16]]
        root = getattr(arr.store_path.store, "root", None)  # a local directory; other stores: the metadata alone
        if root is None:
            return out
        chunks, template = arr.shards or arr.chunks, self._axes.template
        nz, ny, nx = self.shape
        for z, y, x in [(z, y, x) for z in sorted({0, nz // 2, nz - 1}) for y, x in ((0, 0), (ny // 2, nx // 2))]:
            at = {"Z": z, "Y": y, "X": x}
            key = arr.metadata.encode_chunk_key(tuple(at.get(a, 0) // c for a, c in zip(template, chunks)))
            chunk = Path(root, arr.store_path.path, key)
            stat = chunk.stat() if chunk.is_file() else None
            out.append([key, stat.st_size, stat.st_mtime_ns] if stat else [key, "missing"])
        return out

    def _array(self):
        arr = getattr(self._local, "arr", None)
        if arr is None:
            import zarr

            from .chunks import ChunkIO

            arr = self._local.arr = zarr.open(self._array_path, mode="r")
            self._local.chunk_io = ChunkIO(arr)
        return arr

    def read(self, z, y0, y1, x0, x1):
        arr = self._array()
        try:
            if "S" not in self._axes.template:  # samples (RGB) are made grey from the window instead
                return self._read_chunks(arr, z, y0, y1, x0, x1)
            return self._axes.grey(np.asarray(arr[self._axes.window(z, y0, y1, x0, x1)]))
        except Exception as e:
            raise UserError(f"cannot read slice {z} of {self.path} ({e}); a chunk may be missing or corrupt") from e


def ngff_attr(attrs, key: str):
    """An OME-Zarr attribute of a group's ``attrs``, NGFF 0.4 (at the top, in ``.zattrs``) or 0.5 (under ``ome``, in
    ``zarr.json``); None where absent."""
    attrs = dict(attrs)
    value = attrs.get(key)
    return value if value is not None else attrs.get("ome", {}).get(key)


def multiscales(attrs) -> dict | None:
    """The first ``multiscales`` entry of a group's ``attrs`` (NGFF 0.4 or 0.5), else None."""
    ms = ngff_attr(attrs, "multiscales")
    return ms[0] if ms else None


def group_attrs(path: str | Path) -> dict | None:
    """The attributes of the zarr group (v2 or v3) at ``path``; None where there is none."""
    import zarr

    try:
        return dict(zarr.open_group(str(path), mode="r").attrs)
    except (FileNotFoundError, ValueError, zarr.errors.GroupNotFoundError, zarr.errors.ContainsArrayError):
        return None


NGFF_NM_PER_UNIT = {"nanometer": 1.0, "micrometer": 1000.0, "millimeter": 1e6, "centimeter": 1e7, "meter": 1e9,
                    "angstrom": 0.1, "picometer": 1e-3}  # NGFF's (UDUNITS-2) names of the lengths EM pixels have


def _transform(node: dict, kind: str = "scale") -> list | None:
    """The ``kind`` ("scale" or "translation") transform of a multiscale or of one of its datasets (NGFF
    ``coordinateTransformations``)."""
    transforms = node.get("coordinateTransformations")
    return next((t.get(kind) for t in transforms if isinstance(t, dict) and t.get("type") == kind), None) if (
        isinstance(transforms, list)) else None  # fmt: skip


def finest_level(ms: dict) -> dict:
    """The dataset of a multiscale with the finest pixels: the first, as NGFF orders them, unless their scales
    say that another is finer (a file that lists its levels smallest first)."""
    levels = ms["datasets"]
    scales = [_transform(level) for level in levels]
    if len(levels) < 2 or not all(isinstance(s, list) and all(isinstance(v, (int, float)) for v in s) for s in scales):
        return levels[0]
    return levels[min(range(len(levels)), key=lambda k: (float(np.prod(scales[k])), k))]


def ngff_pixel_size(ms: dict, level0: dict) -> tuple[float, float, float] | None:
    """Z, Y, X nm of a multiscale's dataset ``level0`` (its scale transform, times the multiscale's own where it
    has one, as NGFF 0.4+ applies it after each dataset's; and the axes' units), else None."""
    axes = ms.get("axes", [])
    scale = _transform(level0)
    if not scale or len(scale) != len(axes):
        return None
    overall = _transform(ms)
    if overall is not None:
        if len(overall) != len(axes) or not all(isinstance(v, (int, float)) for v in [*scale, *overall]):
            return None
        scale = [a * b for a, b in zip(scale, overall)]
    out = {}
    for a, s in zip(axes, scale):
        # an axis without a unit (ome-zarr-py's default, this tool's output of a volume of unknown pixel size) or
        # with one that is not a length has a scale in no known unit: its pixel size is unknown, not that many nm
        nm = NGFF_NM_PER_UNIT.get(a.get("unit")) if isinstance(a, dict) else None
        if nm and a.get("name", "").lower() in ("z", "y", "x") and isinstance(s, (int, float)) and s > 0:
            out[a["name"].lower()] = s * nm
    if "y" not in out or "x" not in out:
        return None
    return (out.get("z", out["y"]), out["y"], out["x"])


def ngff_origin(ms: dict, level0: dict) -> tuple[float, float, float] | None:
    """Z, Y, X nm of the first voxel of a multiscale's dataset ``level0`` (a crop of a larger volume): its translation,
    then the multiscale's own scale and translation, as NGFF 0.4+ applies them; None where there is none, or where
    an axis has no length unit."""
    axes = ms.get("axes", [])
    own, scale, shift = (_transform(level0, "translation"), _transform(ms), _transform(ms, "translation"))
    if own is None and shift is None:
        return None
    own, scale, shift = own or [0.0] * len(axes), scale or [1.0] * len(axes), shift or [0.0] * len(axes)
    numbers = [*own, *scale, *shift]
    if not len(own) == len(scale) == len(shift) == len(axes) or not all(_is_number(v) for v in numbers):
        return None
    out = {}
    for a, t, s, u in zip(axes, own, scale, shift):
        name = a.get("name", "").lower() if isinstance(a, dict) else str(a).lower()
        if name in ("z", "y", "x"):
            nm = NGFF_NM_PER_UNIT.get(a.get("unit")) if isinstance(a, dict) else None
            if nm is None:
                return None
            out[name] = (t * s + u) * nm
    return _origin(out.get("z", 0.0), out.get("y", 0.0), out.get("x", 0.0))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _origin(*zyx: float) -> tuple[float, float, float] | None:
    """An origin worth carrying: None where it is the default, (0, 0, 0)."""
    return tuple(float(v) for v in zyx) if any(zyx) else None


HDF5_PATH = re.compile(r"^(?P<file>.*\.(?:h5|hdf5|hdf))(?:[:/](?P<dataset>.+))?$", re.IGNORECASE)


class Hdf5Volume(Volume):
    """A 3D (or 2D) dataset of an HDF5 file (CREMI, ilastik, Fiji's HDF5 export): ``file.h5`` where it holds one such
    dataset, else ``file.h5/group/name`` (or ``file.h5:group/name``). Pixel size from ``resolution`` (nm, CREMI) or
    ``element_size_um`` (ilastik, Fiji); axes from ilastik's ``axistags``."""

    def _inspect(self):
        import h5py

        match = HDF5_PATH.match(self.path)
        self._file, name = match["file"], match["dataset"]
        if not os.path.isfile(self._file):
            raise UserError(f"{self._file} does not exist")
        try:
            with h5py.File(self._file, "r") as f:
                images = []
                f.visititems(lambda key, node: images.append(key) if _hdf5_image(node) else None)
                if name is None:
                    if len(images) != 1:
                        listed = ", ".join(images[:8]) or "none"
                        raise UserError(f"{self.path} holds {len(images)} image datasets ({listed}); name one: "
                                        f"{self._file}/DATASET")  # fmt: skip
                    name = images[0]
                node = f.get(name)
                if not isinstance(node, h5py.Dataset):
                    raise UserError(f"{self._file} has no dataset {name!r}; its image datasets: "
                                    f"{', '.join(images[:8]) or 'none'}")  # fmt: skip
                self._dataset = name
                axes = _hdf5_axes(node) or _plain_axes(node.shape, self.path)
                zyx, self._axes = to_zyx(node.shape, axes, self.path, "name a (Z, Y, X) dataset")
                self.origin_nm = _hdf5_origin(node.attrs)
                return zyx, _check_dtype(node.dtype, self.path), _hdf5_pixel_size(node.attrs)
        except UserError:
            raise
        except Exception as e:  # h5py raises OSError for a file that is not HDF5, KeyError/ValueError for odd nodes
            raise UserError(f"cannot read {self.path} as HDF5 ({e}); check that it is a complete HDF5 file") from e

    def identity(self) -> list:
        stat = os.stat(self._file)
        return [self._dataset, stat.st_size, stat.st_mtime_ns]

    def read(self, z, y0, y1, x0, x1):
        dataset = getattr(self._local, "dataset", None)
        try:
            if dataset is None:
                import h5py

                dataset = self._local.dataset = h5py.File(self._file, "r")[self._dataset]
            return self._axes.grey(np.asarray(dataset[self._axes.window(z, y0, y1, x0, x1)]))
        except Exception as e:
            raise UserError(f"cannot read slice {z} of {self.path} ({e}); the file may be truncated or corrupt") from e


MIN_IMAGE_SIDE = 16  # an HDF5 dataset narrower than this is not counted as an image (lookup tables, transforms)


def _hdf5_image(node) -> bool:
    """A dataset that can be a volume: what ``file.h5`` alone chooses among (a (256, 3) lookup table is not one)."""
    import h5py

    if not isinstance(node, h5py.Dataset):
        return False
    axes = _hdf5_axes(node)
    return axes is not None and all(node.shape[axes.index(a)] >= MIN_IMAGE_SIDE for a in "YX" if a in axes)


def _hdf5_axes(node) -> str | None:
    """ilastik's ``axistags``, else the axes of an array that names none; None where neither applies."""
    tags = node.attrs.get("axistags")  # ilastik: JSON {"axes": [{"key": "z"}, ...]}
    if tags is not None:
        try:
            keys = "".join(a["key"] for a in json.loads(tags)["axes"]).upper().replace("C", "S")
            if len(keys) == node.ndim:
                return keys
        except (ValueError, KeyError, TypeError):
            pass
    return _unnamed_axes(node.shape)


def _hdf5_origin(attrs) -> tuple[float, float, float] | None:
    """CREMI's ``offset`` (Z, Y, X nm: where a padded or cropped volume sits in the whole), else None."""
    try:
        offset = [float(v) for v in np.ravel(attrs.get("offset", []))]
    except (TypeError, ValueError):
        return None
    return _origin(*offset) if len(offset) == 3 and all(map(math.isfinite, offset)) else None


def _hdf5_pixel_size(attrs) -> tuple[float | None, float, float] | None:
    for key, nm in (("resolution", 1.0), ("element_size_um", 1000.0)):
        value = attrs.get(key)
        try:
            sizes = [float(v) * nm for v in np.ravel(value)] if value is not None else []
        except (TypeError, ValueError):
            continue
        if len(sizes) in (2, 3) and all(v > 0 for v in sizes):
            return (sizes[0], sizes[1], sizes[2]) if len(sizes) == 3 else (None, sizes[0], sizes[1])
    return None


N5_PATH = re.compile(r"^(?P<root>.*?\.n5)(?:[:/](?P<dataset>.*))?$", re.IGNORECASE)
N5_MAX_GROUPS = 10000  # folders a container search looks through (a dataset's block folders are not entered)


class N5Volume(Volume):
    """A 2D or 3D dataset of an N5 container, read through tensorstore: ``vol.n5`` where it holds one image dataset,
    else ``vol.n5/group/name`` (or ``vol.n5:group/name``). N5 lists dimensions x first (x the fastest axis of a
    block) and tensorstore indexes them so: they are read reversed, as (Z, Y, X). Pixel size from cosem's
    ``transform``, n5-ij's ``pixelResolution`` or ``resolution`` (nm, x first: BigDataViewer, CellMap), of the
    dataset or, for level ``s0``, of its multiscale group."""

    CACHE_BYTES = 128 * 2**20  # decoded blocks kept per thread: a row of tiles reads each block once

    def _inspect(self):
        match = N5_PATH.match(self.path)
        root, name = (match["root"], match["dataset"]) if match else (self.path, None)
        name = (name or "").strip("/") or None
        if not os.path.exists(root):
            raise UserError(f"{root} does not exist")
        if not os.path.isdir(root):
            raise UserError(f"{root} is a file, not an N5 container (a folder holding attributes.json); give the "
                            "container's folder")  # fmt: skip
        node = Path(root, name) if name else Path(root)
        attrs = _n5_attrs(node) if node.is_dir() else None
        if not _n5_dataset(attrs):  # a group or the container: its one image dataset (the container is searched once)
            images = _n5_images(Path(root), Path(root))
            if not images and _n5_attrs(Path(root)) is None and not _n5_images(Path(root), Path(root), any_shape=True):
                raise UserError(f"{root} is not an N5 container: it holds no attributes.json and no N5 dataset")
            if not node.is_dir():
                listed = ", ".join(images[:8]) or "none"
                raise UserError(f"{root} has no dataset {name!r}; its image datasets: {listed}")
            under = _n5_images(Path(root), node) if name else images
            if len(under) != 1:
                raise UserError(_n5_choose(self.path, root, under, images))
            name = under[0]
            node, attrs = Path(root, name), _n5_attrs(Path(root, name))
        self._dir, self._dataset = str(node), name or ""
        dims, kind = attrs.get("dimensions"), attrs.get("dataType")
        if not (isinstance(dims, list) and dims and all(isinstance(n, int) and n >= 0 for n in dims)):
            raise UserError(f"{self.path}: its attributes.json has no valid N5 dimensions ({dims!r})")
        shape = tuple(reversed(dims))  # N5's x-first order, as (..., Z, Y, X)
        try:
            dtype = np.dtype(str(kind))
        except TypeError:
            raise UserError(f"{self.path} has the N5 data type {kind!r}; convert it to uint8, uint16 or "
                            "float32") from None  # fmt: skip
        dtype = _check_dtype(dtype, self.path)
        zyx, self._axes = to_zyx(shape, _plain_axes(shape, self.path), self.path, "name a (Z, Y, X) dataset")
        self._block = tuple(reversed(attrs.get("blockSize") or dims))
        check_shape(zyx, self.path)  # before tensorstore opens it
        self._local.arr = self._open()  # now: an unsupported compression is refused before the run starts
        pixel, self.origin_nm = _n5_pixel_size(attrs), _n5_origin(attrs)
        if pixel is None and Path(self._dir).name == "s0":  # a multiscale's level 0: its group's pixel size
            factors = attrs.get("downsamplingFactors")
            if not isinstance(factors, list) or all(f == 1 for f in factors):
                group = _n5_attrs(Path(self._dir).parent) or {}
                pixel, self.origin_nm = _n5_pixel_size(group), self.origin_nm or _n5_origin(group)
        return zyx, dtype, pixel

    def _open(self):
        import tensorstore as ts

        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": self._dir}}
        try:
            context = ts.Context({"cache_pool": {"total_bytes_limit": self.CACHE_BYTES}})
            return ts.open(spec, read=True, context=context).result().T  # .T: dimensions x first -> (Z, Y, X)
        except Exception as e:  # ValueError for what tensorstore cannot open (compression, metadata)
            raise UserError(f"cannot open {self.path} as N5 ({_ts_error(e)})") from e

    def identity(self) -> list:
        """What tells this dataset from an edited one (the resume check), without listing its blocks: its
        attributes.json and the size and modification time of the first and the centre block of its first, middle
        and last slices (see ``ZarrVolume.identity``)."""
        meta = Path(self._dir, "attributes.json").read_bytes()
        out: list = [self._dataset, hashlib.sha256(meta).hexdigest()[:16]]
        nz, ny, nx = self.shape
        for z, y, x in [(z, y, x) for z in sorted({0, nz // 2, nz - 1}) for y, x in ((0, 0), (ny // 2, nx // 2))]:
            at = {"Z": z, "Y": y, "X": x}
            grid = [at.get(a, 0) // b if isinstance(a, str) else 0 for a, b in zip(self._axes.template, self._block)]
            key = "/".join(str(i) for i in reversed(grid))  # block files are named x first
            block = Path(self._dir, key)
            stat = block.stat() if block.is_file() else None
            out.append([key, stat.st_size, stat.st_mtime_ns] if stat else [key, "missing"])
        return out

    def read(self, z, y0, y1, x0, x1):
        arr = getattr(self._local, "arr", None)
        if arr is None:
            arr = self._local.arr = self._open()
        y1, x1 = min(y1, self.shape[1]), min(x1, self.shape[2])  # as numpy cuts a window (tensorstore refuses)
        try:
            return self._axes.grey(np.asarray(arr[self._axes.window(z, y0, y1, x0, x1)].read().result()))
        except Exception as e:
            raise UserError(f"cannot read slice {z} of {self.path} ({_ts_error(e)}); a block may be damaged") from e


def _ts_error(e: Exception) -> str:
    """tensorstore's message without its status code and the spec it appends."""
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", str(e), flags=re.DOTALL)
    return re.sub(r"^[A-Z_]+: ", "", text).replace("\n", " ")


def _n5_attrs(folder: Path) -> dict | None:
    """A folder's N5 attributes.json; None where it has none or it is not a JSON object."""
    try:
        attrs = json.loads(Path(folder, "attributes.json").read_text())
    except (OSError, ValueError):
        return None
    return attrs if isinstance(attrs, dict) else None


def _n5_dataset(attrs: dict | None) -> bool:
    return isinstance(attrs, dict) and "dimensions" in attrs and "dataType" in attrs


def _n5_images(root: Path, under: Path, any_shape: bool = False) -> list[str]:
    """The datasets under ``under`` that can be a volume ((Z, Y, X) or (Y, X), X and Y at least MIN_IMAGE_SIDE; all
    datasets with ``any_shape``), as paths from ``root``, in natural order; a dataset's block folders are not
    entered."""
    found, todo, seen = [], [under], 0
    while todo and seen < N5_MAX_GROUPS:
        folder = todo.pop()
        seen += 1
        attrs = _n5_attrs(folder)
        if _n5_dataset(attrs):
            dims = attrs["dimensions"]
            shape = tuple(reversed(dims)) if isinstance(dims, list) else ()
            axes = _unnamed_axes(shape) if all(isinstance(n, int) for n in shape) else None
            if any_shape or axes is not None and all(shape[axes.index(a)] >= MIN_IMAGE_SIDE for a in "YX"):
                found.append(folder.relative_to(root).as_posix())
            continue
        try:
            folders = [f for f in folder.iterdir() if f.is_dir() and not f.name.startswith(".")]
        except OSError:
            continue
        todo.extend(sorted(folders, reverse=True))
    return sorted(found, key=_natural_key)


def _n5_choose(path: str, root: str, under: list[str], images: list[str]) -> str:
    """The one line that says a path holds no or several image datasets, naming them (level s0 first suggested)."""
    if not under:
        listed = ", ".join(images[:8]) or "none"
        return (f"{path} holds no 2D or 3D N5 dataset of {MIN_IMAGE_SIDE} px or more a side; the container's image "
                f"datasets: {listed}")  # fmt: skip
    levels = [name for name in under if name.rsplit("/", 1)[-1] == "s0"]
    more = f" and {len(under) - 6} more" if len(under) > 6 else ""
    listed = ", ".join(f"{root}/{name}" for name in under[:6]) + more
    return f"{path} holds {len(under)} image datasets ({listed}); name one, e.g. {root}/{(levels or under)[0]}"


def _n5_pixel_size(attrs: dict) -> tuple[float | None, float, float] | None:
    """(z, y, x) nm from cosem's ``transform`` (axes named, with units), n5-ij's ``pixelResolution`` (x first, with a
    unit) or ``resolution`` (x first, nm: BigDataViewer's N5, CellMap); None where none gives X and Y."""
    t = attrs.get("transform")
    if isinstance(t, dict) and all(isinstance(t.get(k), list) for k in ("axes", "scale", "units")):
        sizes = {str(a).lower(): _scaled(s, u) for a, s, u in zip(t["axes"], t["scale"], t["units"])}
        if sizes.get("y") and sizes.get("x") and len(t["axes"]) == len(t["scale"]) == len(t["units"]):
            return (sizes.get("z"), sizes["y"], sizes["x"])
    pr = attrs.get("pixelResolution")
    if isinstance(pr, dict) and isinstance(pr.get("dimensions"), list):
        found = _x_first([_scaled(s, pr.get("unit")) for s in pr["dimensions"]])
        if found:
            return found
    if isinstance(attrs.get("resolution"), list):
        return _x_first([_scaled(s, "nm") for s in attrs["resolution"]])
    return None


def _n5_origin(attrs: dict) -> tuple[float, float, float] | None:
    """(z, y, x) nm of the first voxel from cosem's ``transform`` (its ``translate``, axes named, with units)."""
    t = attrs.get("transform")
    if not isinstance(t, dict) or not all(isinstance(t.get(k), list) for k in ("axes", "translate", "units")):
        return None
    if not len(t["axes"]) == len(t["translate"]) == len(t["units"]):
        return None
    at = {}
    for a, v, u in zip(t["axes"], t["translate"], t["units"]):
        nm = _nm_per(u)
        if not (_is_number(v) and nm):
            return None
        at[str(a).lower()] = float(v) * nm
    return _origin(at.get("z", 0.0), at.get("y", 0.0), at.get("x", 0.0))


def _scaled(size, unit) -> float | None:
    """A size in ``unit`` (nm, um, µm, micrometer, ...) as nm; None where either is not a length."""
    nm = _nm_per(unit)
    return float(size) * nm if nm and _is_number(size) and size > 0 else None


def _nm_per(unit) -> float | None:
    """Nanometres in one ``unit`` as EM files name it (nm, um, µm, micrometer, ...); None where it is no length."""
    return NM_PER_UNIT.get(str(unit)) or NGFF_NM_PER_UNIT.get(str(unit).lower())


def _x_first(sizes: list) -> tuple[float | None, float, float] | None:
    """(z, y, x) of sizes listed x first, (x, y) or (x, y, z)."""
    if len(sizes) not in (2, 3) or not (sizes[0] and sizes[1]):
        return None
    return (sizes[2] if len(sizes) == 3 else None, sizes[1], sizes[0])


MRC_SUFFIXES = (".mrc", ".mrcs", ".st", ".rec", ".ali", ".map")
IMOD_STAMP = 1146047817  # "IMOD" at byte 152: the imodFlags after it are set (IMOD's mrc_format.txt)


class MrcVolume(MappedVolume):
    """An MRC (MRC2014, CCP4) file: IMOD's .st/.ali/.rec, SerialEM and Thermo Fisher (FEI) stacks, .map, RELION's .mrcs.
    Sections are Z (a 2D file is one slice), memory-mapped. Pixel size from the voxel size (Å; 0 is unset). Mode 0
    bytes are unsigned (uint8) where IMOD wrote them so or where the header's maximum is above 127, signed (int8, as
    MRC2014 defines mode 0) otherwise."""

    def _inspect(self):
        data, header, voxel = _open_mrc(self.path)
        self._unsigned = int(header.mode) == 0 and _mrc_bytes_unsigned(header)
        self._local.arr = self._view(data)
        axes = _plain_axes(data.shape, self.path)  # (Y, X), (Z, Y, X); a stack of volumes (Z/mz, mz, Y, X) if one
        zyx, self._axes = to_zyx(data.shape, axes, self.path, "save it as one (Z, Y, X) stack")
        return zyx, _check_dtype(self._local.arr.dtype, self.path), _mrc_pixel_size(header, voxel)

    def _view(self, data: np.ndarray) -> np.ndarray:
        return data.view(np.uint8) if self._unsigned else data

    def _open_array(self):
        return self._view(_open_mrc(self.path)[0])


def _open_mrc(path: str):
    """The data (memory-mapped), header and voxel size (Å) of an MRC file; a one-line error where it cannot be read.
    Permissive: a file without the "MAP " stamp (pre-2000 MRC, some older writers) or with an unset machine stamp is
    read as mrcfile reads it, with its warnings; a damaged one gives no data, and they say why."""
    import warnings

    import mrcfile

    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            # the memmap stays valid once the file is closed (it holds its own mapping)
            with mrcfile.mmap(path, mode="r", permissive=True) as mrc:
                data, header, voxel = mrc.data, mrc.header.copy(), mrc.voxel_size.copy()
    except Exception as e:  # mrcfile raises ValueError for a header cut short, OSError for what cannot be opened
        raise UserError(f"cannot read {path} as MRC ({e}); check that it is a complete MRC file") from e
    if data is None:
        raise UserError(_mrc_damage(path, header, [str(w.message) for w in warned]))
    return data, header, voxel


def _mrc_damage(path: str, header, warned: list[str]) -> str:
    """The one line that says why an MRC file's data cannot be read: truncated where its size says so."""
    import mrcfile.utils

    try:
        itemsize = mrcfile.utils.dtype_from_mode(header.mode).itemsize
        shape = (int(header.nz), int(header.ny), int(header.nx))
        start, size = 1024 + int(header.nsymbt), os.path.getsize(path)
        if min(shape) > 0 and start + math.prod(shape) * itemsize > size:
            return (f"{path} is truncated: its header says {'x'.join(map(str, shape))} (Z, Y, X) pixels of mode "
                    f"{int(header.mode)} ({start + math.prod(shape) * itemsize} bytes with the header), the file has "
                    f"{size} bytes")  # fmt: skip
    except ValueError:  # a mode mrcfile does not know: what it warned says so
        pass
    return f"cannot read {path} as MRC ({'; '.join(warned) or 'no data'}); check that it is a complete MRC file"


def _mrc_bytes_unsigned(header) -> bool:
    """Mode 0 bytes as their writer meant them. IMOD writes unsigned bytes unless bit 0 of its imodFlags says signed
    (all unsigned before IMOD 4.2.23); other writers follow MRC2014 (signed), except where the header's maximum is
    above 127, which signed bytes cannot hold."""
    stamp, flags = np.frombuffer(header.tobytes()[152:160], dtype=header.nx.dtype)
    if stamp == IMOD_STAMP:
        return not flags & 1
    return float(header.dmax) > 127


def _mrc_pixel_size(header, voxel) -> tuple[float | None, float, float] | None:
    """(z, y, x) nm from the voxel size (Å along X, Y, Z), mapped to the columns, rows and sections (mapc, mapr,
    maps; 1, 2, 3 in EM stacks); an axis whose size is 0 (unset) is unknown."""
    angstrom = (float(voxel.x), float(voxel.y), float(voxel.z))
    order = [int(header.mapc), int(header.mapr), int(header.maps)]
    col, row, sec = (angstrom[i - 1] / 10 for i in (order if sorted(order) == [1, 2, 3] else [1, 2, 3]))
    if not (col > 0 and row > 0 and math.isfinite(col * row)):
        return None
    return (sec if sec > 0 and math.isfinite(sec) else None, row, col)


class NpyVolume(MappedVolume):
    """A NumPy array saved with ``np.save`` (.npy), (Z, Y, X) or (Y, X), memory-mapped; no pixel size."""

    def _inspect(self):
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0  # fmt: skip
                shape, fortran, dtype = read_header(f)
        except Exception as e:  # ValueError for what is not .npy or a damaged header
            raise UserError(f"cannot read {self.path} as a NumPy .npy file ({e}); save the volume with np.save") from e
        dtype = _check_dtype(dtype, self.path)  # before mapping: an object array cannot be mapped
        zyx, self._axes = to_zyx(shape, _plain_axes(shape, self.path), self.path, "save a (Z, Y, X) array")
        if fortran and zyx[0] > 1:
            # each slice would be spread over the whole file: every window read would touch all of it
            raise UserError(f"{self.path} is saved in Fortran (column-major) order; save it in C order: "
                            "np.save(path, np.ascontiguousarray(array))")  # fmt: skip
        self._local.arr = self._open_array()
        return zyx, dtype, None

    def _open_array(self):
        try:
            return np.load(self.path, mmap_mode="r")
        except Exception as e:  # ValueError "mmap length is greater than file size": cut short
            raise UserError(f"cannot read {self.path} ({e}); the file may be truncated: save it again with "
                            "np.save") from e  # fmt: skip


def _refuse_npz(path: str) -> Volume:
    """A .npz archive holds several named arrays, none of them the volume by definition: the error names them."""
    try:
        with np.load(path) as archive:
            names = archive.files
    except Exception as e:
        raise UserError(f"cannot read {path} as a NumPy .npz archive ({e})") from e
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise UserError(f"{path} is a NumPy .npz archive of {len(names)} array(s) ({listed or 'none'}); save the volume "
                    f"as a .npy of its own: np.save('volume.npy', np.load({path!r})[{(names or ['NAME'])[0]!r}])")  # fmt: skip


SEQUENCE_SUFFIXES = (".tif", ".tiff", ".png")


def _natural_key(name: str) -> list:
    """slice_2 before slice_10: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def sequence_files(path: str) -> list[Path] | None:
    """The 2D images a folder (or a glob pattern such as ``sections/*.tif``) holds, in natural order; None where
    ``path`` is neither."""
    p = Path(path)
    if any(c in p.name for c in "*?["):
        files = [f for f in p.parent.glob(p.name) if f.is_file() and not f.name.startswith(".")]
        if not files:
            raise UserError(f"no file matches {path}")
    elif p.is_dir():
        files = [f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")
                 and f.suffix.lower() in SEQUENCE_SUFFIXES]  # fmt: skip
        if not files:
            return None
    else:
        return None
    kinds = sorted({".tif" if f.suffix.lower() == ".tiff" else f.suffix.lower() for f in files})
    if len(kinds) > 1 or kinds[0] not in SEQUENCE_SUFFIXES:
        raise UserError(f"{path} holds {', '.join(kinds)} files; an image sequence is one kind of 2D image (.tif or "
                        f".png): move the others out or give a pattern such as {p / '*.tif'}")  # fmt: skip
    return sorted(files, key=lambda f: _natural_key(f.name))


def numbering_gaps(files: list[str]) -> str | None:
    """Where the numbers of a sequence's files jump by more than their usual step (``slice_2``, ``slice_5``: sections
    lost, or files left out), said for a warning; None where they run evenly or the names hold no one number each.
    The files are read as consecutive slices, so objects would be linked across the missing sections."""
    numbers = []
    for f in files:
        runs = re.findall(r"\d+", Path(f).stem)
        if not runs:
            return None
        numbers.append(int(runs[-1]))
    steps = np.diff(numbers)
    if len(steps) < 2 or (steps <= 0).any():
        return None
    usual = int(np.bincount(steps).argmax())
    jumps = np.flatnonzero(steps > usual)
    if not len(jumps):
        return None
    said = ", ".join(f"{Path(files[i]).name} -> {Path(files[i + 1]).name}" for i in jumps[:3])
    more = f" and {len(jumps) - 3} more" if len(jumps) > 3 else ""
    return (f"the file numbers jump {len(jumps)} time(s) by more than their step of {usual} ({said}{more}): the files "
            f"are read as consecutive slices, so objects are linked across what is missing there; put an empty (or "
            f"repeated) image in each missing slice's place where sections were lost (report.json lists the file of "
            f"each slice: input.slice_files)")


class ImageSequence(Volume):
    """A folder (or glob pattern) of 2D TIFF or PNG images, one slice per file in natural order: what FIB-SEM and
    serial-section acquisitions often write. Every file's header is checked when it opens (same size, samples and
    pixel type). Windows are read from the slice's file as from a one-slice stack (memory-mapped where uncompressed);
    the file read last stays open in each thread.

    A label stack (``labels``, as ``open_label_volume`` opens it) may mix integer widths of one signedness, as tools
    that save each slice in the smallest type that holds its ids write it (uint8 where a slice has < 256 ids, uint16
    elsewhere): it reads as the widest, every id unchanged. An image sequence may not: its intensities are normalized
    together, so 8-bit slices beside 16-bit ones would be on another scale."""

    def __init__(self, path: str, labels: bool | None = None):
        self.labels = getattr(_OPENING, "labels", False) if labels is None else labels
        super().__init__(path)

    def _inspect(self):
        self.files = [str(f) for f in sequence_files(self.path)]
        first = one_slice(self.files[0])
        shape, dtype, rgb = first.shape[1:], first.dtype, first.rgb
        widths: dict[np.dtype, list[str]] = {dtype: [self.files[0]]}  # pixel type -> its files
        for f in self.files[1:]:
            other, other_dtype, samples = _slice_header(f)
            other_rgb = samples in (3, 4)
            if other == shape and other_rgb == rgb and samples in SAMPLES and other_dtype in widths:
                widths[other_dtype].append(f)
                continue
            said = (f"{f} is {other[0]}x{other[1]} {other_dtype}{' RGB' if other_rgb else ''}, but {self.files[0]} is "
                    f"{shape[0]}x{shape[1]} {dtype}{' RGB' if rgb else ''}: ")  # fmt: skip
            if other != shape:
                raise UserError(said + f"every slice of a sequence must have one size; crop or pad it to "
                                f"{shape[0]}x{shape[1]}, or move it out")  # fmt: skip
            if samples not in SAMPLES:
                raise UserError(f"{f} has {samples} samples per pixel; save every slice of a sequence as greyscale")
            if other_rgb != rgb:
                raise UserError(said + "RGB and greyscale slices do not mix in a sequence; save every slice as "
                                "greyscale")  # fmt: skip
            if other_dtype.kind != dtype.kind or dtype.kind not in "ui":  # read as one type, values would change
                kinds = {dtype.kind, other_dtype.kind}  # meaning: ids as intensities, negative ids as large ones
                mix = "integer and float" if kinds == {"f", "u"} or kinds == {"f", "i"} else \
                    "signed and unsigned" if kinds == {"i", "u"} else f"{other_dtype} and {dtype}"  # fmt: skip
                raise UserError(said + f"{mix} slices do not mix in a sequence; save every slice as one pixel type "
                                f"(e.g. {dtype})")  # fmt: skip
            widths[other_dtype] = [f]  # an integer of another width, same signedness: read as the widest (labels)
        self.rgb_files = rgb  # the run report's warning; each file is read as what it is
        if len(widths) > 1:
            wide = max(widths, key=lambda t: t.itemsize)
            if not self.labels:
                narrow = min((t for t in widths if t != wide), key=lambda t: len(widths[t]))
                raise UserError(
                    f"{self.path}: {len(widths[narrow])} slice(s) are {narrow} (the first {widths[narrow][0]}) "
                    f"but {len(widths[wide])} {'is' if len(widths[wide]) == 1 else 'are'} {wide} (the first "
                    f"{widths[wide][0]}); an image sequence's slices "
                    f"are normalized together, so they must share one pixel type: save every slice as {wide} "
                    f"(rescaled, if the {narrow} ones were exported at fewer bits)"
                )
            dtype = wide
        return (len(self.files), *shape), dtype, first.pixel_size_nm

    @property
    def rgb(self) -> bool:
        return getattr(self, "rgb_files", False)

    def identity(self) -> list:
        # names, sizes and times: a slice re-exported in another type changes them; the widest type is in
        # volume_identity's dtype
        stats = [(Path(f).name, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in self.files]
        return [hashlib.sha256(repr(stats).encode()).hexdigest()[:16]]

    def read(self, z, y0, y1, x0, x1):
        held = getattr(self._local, "slice", None)
        if held is None or held[0] != z:
            held = self._local.slice = (z, one_slice(self.files[z]))
        return held[1].read(0, y0, y1, x0, x1).astype(self.dtype, copy=False)  # a narrower label slice promoted


_OPENING = threading.local()  # what the volume opening in this thread is for (labels: open_label_volume)


def open_label_volume(path: str) -> Volume:
    """A label stack's volume: as ``open_volume`` opens it, except that a sequence may mix integer widths."""
    before, _OPENING.labels = getattr(_OPENING, "labels", False), True
    try:
        return open_volume(path)
    finally:
        _OPENING.labels = before


PNG_MODES = {"L": ("u1", 1), "I;16": ("<u2", 1), "I;16B": (">u2", 1), "I": ("<i4", 1), "F": ("<f4", 1),
             "RGB": ("u1", 3), "RGBA": ("u1", 4), "LA": ("u1", 2)}  # Pillow's modes: pixel type, samples


class PngImage(Volume):
    """One 2D PNG as a one-slice volume (greyscale 8/16-bit; RGB read as grey), decoded at its first read."""

    def _inspect(self):
        (ny, nx), dtype, samples = _png_header(self.path)
        shape, axes = ((ny, nx), "YX") if samples == 1 else ((ny, nx, samples), "YXS")  # as Pillow gives the pixels
        zyx, self._axes = to_zyx(shape, axes, self.path, "save greyscale images")
        return zyx, _check_dtype(dtype, self.path), None

    def read(self, z, y0, y1, x0, x1):
        data = getattr(self._local, "data", None)
        if data is None:
            from PIL import Image

            try:
                with Image.open(self.path) as im:
                    pixels = np.asarray(im)
                data = self._local.data = self._axes.grey(pixels[self._axes.window(0, 0, None, 0, None)])
            except Exception as e:
                raise UserError(f"cannot read {self.path} as PNG ({e}); the file may be truncated or corrupt") from e
        return data[y0:y1, x0:x1]


def _png_header(path: str) -> tuple[tuple[int, int], np.dtype, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            size, mode = (im.height, im.width), im.mode
    except Exception as e:
        raise UserError(f"cannot read {path} as an image ({e}); check that it is a complete PNG file") from e
    if mode not in PNG_MODES:
        kind = "colour-table indices (mode P), not intensities" if mode == "P" else f"mode {mode}"
        raise UserError(f"{path} is a PNG of {kind}; save it as 8/16-bit greyscale")
    dtype, samples = PNG_MODES[mode]
    return size, np.dtype(dtype), samples


def one_slice(path: str, why: str = "an image sequence holds one 2D image per file") -> Volume:
    """A 2D TIFF or PNG as a one-slice volume (a sequence's slice, a training image); more slices are refused."""
    volume = PngImage(path) if path.lower().endswith(".png") else TiffVolume(path)
    if volume.shape[0] != 1:
        raise UserError(f"{path} holds {volume.shape[0]} slices; {why}")
    return volume


def _slice_header(path: str) -> tuple[tuple[int, int], np.dtype, int]:
    """(Y, X), pixel type and samples per pixel (``SAMPLES``) from a file's header alone (thousands of files are
    checked when a sequence opens). A TIFF of more than one page is opened whole: a stack among the slices is
    refused here, before the run starts, while one slice with a thumbnail page is not."""
    if path.lower().endswith(".png"):
        size, dtype, samples = _png_header(path)
        return size, native(dtype), samples
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]  # the pixel type as the first slice's volume has it
            header = (page.imagelength, page.imagewidth), native(page.dtype), page.samplesperpixel
            pages = len(tf.pages)  # one IFD offset more to read where there is one page
    except Exception as e:
        raise UserError(f"cannot read {path} as TIFF ({e}); check that it is a complete TIFF file") from e
    if pages > 1:
        one_slice(path)
    return header


class SliceRange(Volume):
    """Slices ``z0`` .. ``z0 + depth - 1`` of a volume, as a volume of their own."""

    def __init__(self, volume: Volume, z0: int, depth: int):
        self.volume, self.z0, self.depth = volume, z0, depth
        super().__init__(f"{volume.path}[z {z0}:{z0 + depth}]")

    def _inspect(self):
        return (self.depth, *self.volume.shape[1:]), self.volume.dtype, self.volume.pixel_size_nm

    def read(self, z, y0, y1, x0, x1):
        return self.volume.read(self.z0 + z, y0, y1, x0, x1)


class ArrayVolume(Volume):
    """An in-memory array as a Volume (tests, small label sets built on the fly)."""

    def __init__(self, array: np.ndarray, name: str = "<array>"):
        self._data = array if array.ndim == 3 else array[None]
        super().__init__(name)

    def _inspect(self):
        return self._data.shape, _check_dtype(self._data.dtype, self.path), None

    def read(self, z, y0, y1, x0, x1):
        return self._data[z, y0:y1, x0:x1]


VOLUME_OPENERS = Registry("volume opener")  # path suffix (".tif") or URI scheme ("synth:") -> path -> Volume
LABEL_OPENERS = Registry("label opener")  # URI scheme -> URI -> the label layers it carries (synthetic truth)


def register_opener(match: str, opener: Callable[[str], Volume]) -> None:
    """Add a reader: ``match`` is a path suffix (".tif") or a URI scheme ("synth:"); each can be added once."""
    VOLUME_OPENERS.register(match, opener)


register_opener(".tif", TiffVolume)
register_opener(".tiff", TiffVolume)
register_opener(".btf", TiffVolume)
register_opener(".zarr", ZarrVolume)
register_opener(".png", PngImage)
for _suffix in MRC_SUFFIXES:
    register_opener(_suffix, MrcVolume)
register_opener(".npy", NpyVolume)
register_opener(".npz", _refuse_npz)
# synth imports this module, so its entries are imported only when a synth: URI is opened
VOLUME_OPENERS.register_lazy("synth:", "cellseg_batch.synth:open_synthetic")
LABEL_OPENERS.register_lazy("synth:", "cellseg_batch.synth:open_synthetic_labels")


def _scheme(path: str, registry: Registry) -> str | None:
    return next((m for m in registry if m.endswith(":") and path.startswith(m)), None)


def open_volume(path: str | os.PathLike) -> Volume:
    """Open a volume for window reads, choosing the reader by URI scheme, suffix or zarr metadata."""
    path = str(path)
    scheme = _scheme(path, VOLUME_OPENERS)
    if scheme:
        return VOLUME_OPENERS[scheme](path)
    p = Path(path)
    if HDF5_PATH.match(path):
        return Hdf5Volume(path)
    if TIFF_SERIES.match(path):
        return TiffVolume(path)
    if N5_PATH.match(path):
        return N5Volume(path)
    if any(c in p.name for c in "*?["):
        return ImageSequence(path)
    if not p.exists():
        raise UserError(f"{path} does not exist")
    suffixes = [m for m in VOLUME_OPENERS if not m.endswith(":") and p.name.lower().endswith(m)]
    if suffixes:
        return VOLUME_OPENERS[max(suffixes, key=len)](path)  # the longest: ".ome.tif" before ".tif"
    if p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        return ZarrVolume(path)
    if p.is_dir() and any(part.lower().endswith(".zarr") for part in p.parts):
        return ZarrVolume(path)
    if p.is_dir() and sequence_files(path):
        return ImageSequence(path)
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"{path} is an empty file")
    if p.is_dir() and (p / "attributes.json").is_file():  # N5's metadata document, a container not named .n5
        return N5Volume(path)
    raise UserError(f"{path}: unknown volume format; give a .tif/.tiff (multi-page or BigTIFF), a .zarr, an .h5, an "
                    "N5 (.n5), an MRC (.mrc, .st, .rec, .ali, .map), a NumPy .npy, or a folder of 2D .tif or .png slices")  # fmt: skip


# -- label stacks ------------------------------------------------------------------------------------------------


@dataclass
class LabelLayer:
    """A label stack whose nonzero ids carry classes: one class for every id, or a map from id to class name."""

    volume: Volume
    classes: str | dict[int, str]
    option: str = "--classes"  # the option that gave the classes, for messages (eval: --gt-classes)
    # ids read through its class views (``ClassView``) that the class map lists no class for, and the windows
    # (z, y0, y1, x0, x1) they were looked for in: each class's view reads the same windows
    unmapped: set = field(default_factory=set, compare=False, repr=False)
    unmapped_looked: set = field(default_factory=set, compare=False, repr=False)

    @property
    def class_names(self) -> list[str]:
        return [self.classes] if isinstance(self.classes, str) else sorted(set(self.classes.values()))

    def classify(self, ids: np.ndarray, names: list[str]) -> np.ndarray:
        """Class index (in ``names``) of each id, -1 for an id the class map does not list. Ids can be large and
        sparse (a map of a few ids up to 2**40 costs a few entries, not a table that long)."""
        ids = np.asarray(ids)
        if isinstance(self.classes, str):
            return np.full(ids.shape, names.index(self.classes), dtype=np.int16)
        # keys of the ids' own kind: int64 keys against uint64 ids compare as float64, which cannot tell ids apart
        # from 2**53 up (ids from 2**60 found unmapped); keys the ids cannot hold match none
        key_type = np.uint64 if ids.dtype.kind == "u" else np.int64
        if getattr(self, "_keys", None) is None or self._names != names or self._keys.dtype != key_type:
            info = np.iinfo(key_type)
            keys = np.array([k for k in sorted(self.classes) if info.min <= k <= info.max], dtype=key_type)
            self._keys, self._names = keys, list(names)
            self._values = np.array([names.index(self.classes[int(k)]) for k in keys], dtype=np.int16)
        if len(self._keys) == 0:
            return np.full(ids.shape, -1, dtype=np.int16)
        pos = np.clip(np.searchsorted(self._keys, ids), 0, len(self._keys) - 1)
        return np.where(self._keys[pos] == ids, self._values[pos], np.int16(-1)).astype(np.int16)


def load_json(path: str | Path, max_bytes: int = 2**30):
    """A user's JSON file, or a one-line error saying why it cannot be read (one over ``max_bytes`` is not read)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    size = path.stat().st_size
    if size > max_bytes:
        raise UserError(f"{path} is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB such a file "
                        "may be; is it the right file?")  # fmt: skip
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a byte-order mark some Windows tools write
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


MAX_CLASS_MAP_BYTES = 64 * 2**20  # a million ids with their names fit in a tenth of it


def read_class_map(spec: str, option: str = "--classes") -> str | dict[int, str]:
    """A ``--classes`` value (``option``'s): a JSON file mapping label ids to class names, the same map written out
    (``{"1": "mitochondrion"}``), or one class name for every id. Names become label layer names as ``train`` makes
    them of annotation categories (``layer_name``: ``alpha granule`` is ``alpha_granule``)."""
    p = Path(spec)
    if spec.lstrip().startswith("{"):
        try:
            data = json.loads(spec)
        except ValueError as e:
            raise UserError(f"{option} {spec!r} is not valid JSON ({e}); give a class name, a .json file, or a map "
                            "such as '{\"1\": \"mitochondrion\"}' (quoted for the shell)") from e  # fmt: skip
    elif not p.suffix.lower() == ".json":
        if not spec or "/" in spec:
            raise UserError(f"{option} {spec!r}: give a class name or a .json file mapping ids to class names")
        return layer_name(spec, option)
    else:
        data = load_json(p, max_bytes=MAX_CLASS_MAP_BYTES)
    if isinstance(data, dict) and isinstance(data.get("instance_class"), dict):
        data = data["instance_class"]
    elif isinstance(data, dict) and isinstance(data.get("classes"), dict) and not isinstance(data.get("instance_class"), dict):
        # a dataset's list of classes ({"classes": {"1": name}}) with no id -> class map: one class is every id's
        names = [v for v in data["classes"].values() if isinstance(v, str) and v]
        if len(names) == 1:
            return layer_name(names[0], spec)
        raise UserError(f"{spec} lists the classes {', '.join(map(str, data['classes'].values()))} but not which label "
                        f"ids are which; give a JSON mapping ids to class names, e.g. {{\"1\": \"mitochondrion\"}}")  # fmt: skip
    example = '{"1": "mitochondrion", "2": "alpha_granule"}'
    if not isinstance(data, dict) or not data:
        raise UserError(f"{spec} must map label ids to class names, e.g. {example}")
    out: dict[int, str] = {}
    for k, v in data.items():
        try:
            i = int(k)
        except ValueError:
            raise UserError(
                f"{spec}: key {k!r} is not a label id; it must map ids to class names, e.g. {example}"
            ) from None
        if i == 0 and isinstance(v, str) and v.strip("_ ").lower() in BACKGROUND_NAMES:
            continue  # a class map that names the background (CVAT, semantic tools): 0 is background anyway
        if i <= 0 or not isinstance(v, str) or not v:
            raise UserError(f"{spec}: entry {k!r}: {v!r} must map a positive label id to a class name (0 is the "
                            "background of a label stack, and can only be named so: \"0\": \"background\")")  # fmt: skip
        out[i] = layer_name(v, f"{spec}: entry {k!r}")
    if not out:
        raise UserError(f"{spec} names only the background; give the class of each label id, e.g. {example}")
    return out


SPECK_PIXELS = 4  # pieces this small are stray pixels: a label stack whose ids come in many of them is noisy, not a mask
BACKGROUND_NAMES = {"background", "bg", "back", "none", "unlabeled", "unlabelled", "ignore", "void", "empty"}


def check_label_stack(layer: LabelLayer, side: int = 1024, instances: bool = True) -> list[str]:
    """Refuse, when a run (or a conversion) starts, a label stack that is not 2D instance ids: negative ids, ids its
    class map lacks, a background other than 0 (``refuse_*`` below), and a semantic mask: an id in many separate
    pieces in a slice (a pixel classifier's binary output). Each id of a tile is one 2D instance (pieces of one object
    that a tile window cuts apart, joined outside it, must stay one), so a mask's pieces would be one instance per
    tile and the objects would depend on the tile size. Checked in the central ``side`` px of the first, middle and
    last slices (by ``run --predictor labels`` and ``convert labels-to-coco``, whose annotations would be such pieces
    too). ``instances`` False (``eval``'s 3D labels, whose objects may lie in several pieces of a slice): only the
    background checks (ids the class map lacks are not refused: a map may leave classes out on purpose, to score
    some; ``ClassView`` notes them all as eval reads them)."""
    nz, h, w = layer.volume.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    warnings, said_mask = [], False
    for z in sorted({0, nz // 2, nz - 1}):
        ids = layer.volume.read(z, y0, min(h, y0 + side), x0, min(w, x0 + side))
        refuse_image(layer.volume.path, ids, z)
        refuse_other_background(layer.volume.path, ids, z)
        if not instances:
            refuse_top_background(layer.volume.path, ids, z)
            if ids.any() and not said_mask:
                values, counts = np.unique(_pieces(ids)[1][1:], return_counts=True)
                most = int(counts.argmax())
                if said_mask := counts[most] >= MASK_PIECES and len(values) <= 8:  # a few ids in many pieces: classes
                    warnings.append(f"{layer.volume.path}: id {values[most]} covers {counts[most]} separate pieces "
                                    f"in slice {z}, and the slice holds {len(values)} id(s): a semantic mask (one id "
                                    "per class)? each id is scored as one object")  # fmt: skip
            continue
        refuse_unmapped(layer, ids, z)
        if not ids.any():
            continue
        pieces, of_piece = _pieces(ids)
        values, counts = np.unique(of_piece[1:], return_counts=True)
        most = int(counts.argmax())
        if counts[most] >= MASK_PIECES or (counts[most] >= 3 and len(values) <= 2):  # instance ids: rarely 3 pieces
            sizes = np.bincount(pieces.reshape(-1))[1:][of_piece[1:] == values[most]]
            if np.median(sizes) <= SPECK_PIXELS:  # most pieces are specks: noise on instance labels, not a mask
                raise UserError(
                    f"{layer.volume.path}: id {values[most]} covers {counts[most]} separate pieces in slice {z}, most "
                    f"of {SPECK_PIXELS} pixels or fewer: stray pixels (label noise) around instances? remove pieces "
                    "smaller than an object first (e.g. skimage.morphology.remove_small_objects on each id, or a "
                    "majority filter); giving each piece its own id would make every speck an object"
                )  # fmt: skip
            raise UserError(
                f"{layer.volume.path}: id {values[most]} covers {counts[most]} separate pieces in slice {z}; this "
                "looks like a mask, not 2D instance labels: give each piece its own id first (e.g. "
                "scipy.ndimage.label on each slice, or cellseg-batch's own output)"
            )
        refuse_top_background(layer.volume.path, ids, z)
    return warnings


MASK_PIECES = 8  # an id in this many separate pieces of a slice is a mask's, not one object's


def _pieces(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A slice's connected pieces of equal id (8-connected) and the id of each piece."""
    import cc3d

    pieces = cc3d.connected_components(ids if ids.flags.writeable else ids.copy(), connectivity=8)
    runs = label_runs(pieces)
    of_piece = np.zeros(int(pieces.max()) + 1, np.int64)  # the id of each piece
    if runs is None:
        of_piece[pieces.reshape(-1)] = ids.reshape(-1)
    else:
        of_piece[runs.values[0]] = ids.reshape(-1)[runs.starts]
    return pieces, of_piece


# of the ids two adjacent slices share, the share that overlaps itself there: 0.95-1.0 in 3D labels measured (the demo's
# truth and prediction, every 3rd slice of them, a platelet stack), 0.22 in ISBI 2012's neurites numbered per slice
PER_SLICE_SHARE = 0.5
PER_SLICE_SHARE_NUMBERED = 0.9  # ... where each slice's ids are 1..n, as per-slice tools number them


def check_3d_ids(layer: LabelLayer, option: str, side: int = 1024) -> list[str]:
    """Refuse, for a 3D score, a stack whose ids restart in every slice (Cellpose/StarDist per-slice masks, per-slice
    exports of 2D annotation tools): id k of one slice and id k of the next are unrelated objects, and scored as one
    object through z they made 98 false splits of 99 (F1 0.38 for labels equal to the prediction). Told where many
    of the ids two adjacent slices share (8 at least, over three pairs of slices) lie elsewhere in the other slice, as
    an object's id in 3D labels does not; a stricter share where each slice's ids are 1..n (numbered in raster order
    per slice, objects that stay in place keep their number by chance). ``option``: what scores it per slice.

    Returns a warning where no id continues into the next slice at all (among 16 or more): each section its own
    object, as 2D annotations numbered through the stack are (ISBI 2012's truth: 3D F1 0.15 against a good
    segmentation, each section a whole object)."""
    nz, h, w = layer.volume.shape
    y0, x0 = max(0, (h - side) // 2), max(0, (w - side) // 2)
    shared = alike = seen = 0
    numbered = True  # every slice read holds the ids 1..n
    for z in sorted({min(z, nz - 2) for z in (nz // 4, nz // 2, 3 * nz // 4)} if nz >= 2 else ()):
        a, b = (layer.volume.read(k, y0, min(h, y0 + side), x0, min(w, x0 + side)) for k in (z, z + 1))
        ids_a, ids_b = np.unique(a[a != 0]), np.unique(b[b != 0])
        numbered &= all(len(ids) == 0 or int(ids[-1]) == len(ids) for ids in (ids_a, ids_b))
        both = np.intersect1d(ids_a, ids_b)
        shared, seen = shared + len(both), seen + len(ids_a)
        alike += len(np.intersect1d(both, np.unique(a[(a == b) & (a != 0)])))
    if shared >= 8 and alike < (PER_SLICE_SHARE_NUMBERED if numbered else PER_SLICE_SHARE) * shared:
        raise UserError(
            f"{layer.volume.path}: its ids restart in every slice ({shared - alike} of {shared} ids found in two "
            f"adjacent slices lie apart there): 2D labels per slice, not 3D objects, so a 3D score would take "
            f"unrelated sections for one object; score them per slice with {option}, or link them into 3D objects "
            f"first (cellseg-batch run VOLUME --predictor labels --labels STACK)"
        )  # fmt: skip
    if shared == 0 and seen >= 16:
        return [f"{layer.volume.path}: none of its {seen} ids in the slices looked at goes on into the next slice: "
                f"each 2D section is its own object, so a 3D score counts sections as whole objects; if they were "
                f"annotated per section, score them per slice with {option}"]  # fmt: skip
    return []


LABEL_SMOOTHNESS = 0.5  # a label stack's foreground pixels mostly share their right neighbour's id; an image's not


def refuse_image(path: str, ids: np.ndarray, z: int) -> None:
    """Refuse an image given where a label stack belongs (the volume as ``eval``'s truth, or as ``--labels``): its
    grey levels would be refused later for a reason that misleads (a grey value taken for a background id, or for a
    mask in many pieces). Told by its pixels: in a label stack most foreground pixels have their right neighbour's
    id (only object borders differ), in an image of tissue few have its exact grey value. Only where most pixels
    are nonzero and their values repeat, as in an image (grey levels: 250 values in ISBI's 512 x 512 px, 15,863 in a
    platelet slice's 640,000): labels of objects a few pixels wide have many borders and much background, and
    supervoxels of a pixel or two each have a value for almost every pixel."""
    if ids.dtype.kind == "b" or ids.ndim != 2 or ids.shape[1] < 2:
        return
    fg = (ids[:, :-1] != 0) | (ids[:, 1:] != 0)
    nonzero = np.count_nonzero(ids)
    if fg.sum() < 1024 or nonzero < ids.size / 2 or len(np.unique(ids)) > nonzero / 2:
        return
    same = float((ids[:, :-1] == ids[:, 1:])[fg].mean())
    if same < LABEL_SMOOTHNESS:
        raise UserError(
            f"{path} looks like an image, not a label stack: {same:.0%} of the foreground pixels of slice {z} have "
            f"their neighbour's value (in labels most do: one id fills each object); give the label stack (0 "
            "background, an id per object)"
        )


def refuse_other_background(path: str, ids: np.ndarray, z: int) -> None:
    """Refuse negative ids (-1 is a common 'background' or 'ignore' of int32 label images) when the run starts, not
    when a tile first reads one."""
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        low = int(ids.min())
        negative = np.unique(ids[ids < 0])
        if len(negative) > 2:  # many negative ids: unsigned ids written to a signed type wrap around below 0
            unsigned = f"uint{8 * ids.dtype.itemsize}"
            raise UserError(
                f"{path} holds {len(negative)} different negative label ids in slice {z} (down to {low}): unsigned "
                f"ids saved as signed {ids.dtype} (ids over {np.iinfo(ids.dtype).max} wrap around)? read them as "
                f"unsigned and save again (numpy: labels.view(np.{unsigned})); setting them to 0 would delete objects"
            )  # fmt: skip
        raise UserError(
            f"{path} holds the negative label id {low} in slice {z} ({_share(ids, low)} of the part "
            f"read); label ids must be 0 (background) or positive: if {low} marks background or 'ignore', set it "
            f"to 0 first (numpy: labels[labels < 0] = 0)"
        )


def refuse_top_background(path: str, ids: np.ndarray, z: int) -> None:
    """Refuse a stack whose background is the largest value of its type (65535, 4294967295: what some tools write
    for background or 'ignore') instead of 0: it would become one object spread over every slice. Caught where that
    id covers more of the checked window than any other; an object that merely has that id is not refused."""
    top = np.iinfo(ids.dtype).max
    if ids.size == 0 or ids.max() != top:
        return
    values, counts = np.unique(ids, return_counts=True)
    if values[counts.argmax()] == top:
        raise UserError(
            f"{path}: id {top}, the largest {ids.dtype} value, covers {_share(ids, top)} of the part of slice {z} "
            f"read, more than any other id; it looks like background or 'ignore', which must be 0 in a "
            f"label stack: set it to 0 first (numpy: labels[labels == {top}] = 0)"
        )


def refuse_unmapped(layer: LabelLayer, ids: np.ndarray, z: int) -> None:
    """Refuse ids that the layer's class map lists no class for when the run starts (a tile would refuse the first
    it reads, once the run is under way), naming all of them that the checked window holds."""
    said = unmapped(layer, ids, z)
    if said:
        raise UserError(f"{said}: add those ids to it (or set them to 0 in the stack)")


def unmapped(layer: LabelLayer, ids: np.ndarray, z: int) -> str | None:
    """What to say of the ids of ``ids`` that the layer's class map lists no class for; None where there are none."""
    if isinstance(layer.classes, str) or not ids.any():
        return None
    present, missing = unmapped_ids(layer, ids)
    if not len(missing):
        return None
    listed = ", ".join(str(i) for i in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
    known = np.array(sorted(layer.classes))
    return (f"{layer.volume.path}: {len(missing)} of the {len(present)} ids in the part of slice {z} checked have no "
            f"class in its {layer.option} map ({listed}); the map lists {len(known)} ids, {known[0]}..{known[-1]}")


def unmapped_ids(layer: LabelLayer, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The nonzero ids ``ids`` holds, and those of them the layer's class map lists no class for."""
    runs = label_runs(ids)
    present = np.unique(ids if runs is None else runs.values[0])
    present = present[present != 0]
    return present, present[layer.classify(present, layer.class_names) < 0]


def _share(ids: np.ndarray, value: int) -> str:
    return f"{np.count_nonzero(ids == value) / ids.size:.0%}"


def open_label_layers(paths: list[str], class_specs: list[str], option: str = "--classes") -> list[LabelLayer]:
    """Label stacks with their classes: ``--labels A --classes a.json --labels B --classes cell``; ``option``: the
    option that gives the classes where it is not ``run``'s ``--classes`` (eval's ``--gt-classes``: one stack).

    An OME-Zarr holding a ``labels/`` group (this tool's output, or ``synth`` truth) gives one layer per label
    image, named by it; there ``--classes`` is not needed.
    """
    layers: list[LabelLayer] = []
    groups = [ngff_label_layers(path) for path in paths]
    plain = [path for path, group in zip(paths, groups) if group is None]
    # opened first: a path that does not exist is the mistake to name, not the count of classes it would need
    volumes = {path: open_label_volume(path) for path in plain}
    if len(class_specs) != len(plain) and option != "--classes":
        raise UserError(f"{plain[0]} is a label stack without class names: give its classes with {option} (a class "
                        "name, or a JSON map of ids to class names)" if plain else
                        f"{paths[0]} is an OME-Zarr whose labels/ group names its classes: drop {option}")  # fmt: skip
    if len(class_specs) != len(plain):
        raise UserError(
            f"{len(plain)} label stack(s) need classes but {len(class_specs)} --classes were given; put one "
            "--classes (a class name, or a JSON map of ids to class names) after each --labels stack"
        )
    specs = iter(class_specs)
    for path, group in zip(paths, groups):
        if group is not None:
            layers.extend(group)
            continue
        volume = volumes[path]
        if volume.rgb:
            raise UserError(f"{path} is RGB; a label stack holds one integer id per pixel: save it as a greyscale "
                            "(Z, Y, X) stack")  # fmt: skip
        if volume.dtype.kind not in "ui":
            raise UserError(f"{path} holds {volume.dtype} values; a label stack must hold integer ids: where its "
                            "values are whole numbers (Fiji saves labels as 32-bit float), save it as integers "
                            "(numpy: labels.astype(np.uint32))")  # fmt: skip
        layers.append(LabelLayer(volume, read_class_map(next(specs), option), option))
    names = [n for layer in layers for n in layer.class_names]
    if not layers:
        raise UserError("no label stacks given; pass --labels PATH --classes CLASSES")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise UserError(f"class {dup[0]!r} comes from more than one label stack; give each class one stack")
    shapes = {layer.volume.shape for layer in layers}
    if len(shapes) > 1:
        raise UserError(f"the label stacks differ in shape: {sorted(shapes)}")
    return layers


def ngff_label_layers(path: str) -> list[LabelLayer] | None:
    """The label images of an OME-Zarr's ``labels/`` group, one layer each (class = label name); else None."""
    scheme = _scheme(path, LABEL_OPENERS)
    if scheme:
        return LABEL_OPENERS[scheme](path)
    p = Path(path)
    labels = p / "labels"
    if not p.is_dir() or not labels.is_dir() or N5_PATH.match(path):  # an N5 may hold a dataset named labels
        return None
    import zarr

    try:
        names = ngff_attr(zarr.open_group(str(labels), mode="r").attrs, "labels")
    except Exception as e:
        raise UserError(f"cannot open {labels} as an OME-Zarr labels group ({e})") from e
    if not names:
        raise UserError(f"{labels} lists no label images; is {path} complete?")
    return [LabelLayer(ZarrVolume(str(labels / name)), name) for name in names]


class ClassView(Volume):
    """One class of a label layer as its own volume: ids of other classes read as 0."""

    def __init__(self, layer: LabelLayer, name: str):
        self.layer, self.name = layer, name
        self._ids = None if isinstance(layer.classes, str) else np.array(
            sorted(i for i, n in layer.classes.items() if n == name), dtype=np.int64
        )
        super().__init__(f"{layer.volume.path}[{name}]")

    def _inspect(self):
        return self.layer.volume.shape, self.layer.volume.dtype, self.layer.volume.pixel_size_nm

    def read(self, z, y0, y1, x0, x1):
        ids = self.layer.volume.read(z, y0, y1, x0, x1)
        # every slice read is checked, not only those check_label_stack saw when eval started: a slice exporter's
        # -1 or 65535 background in one slice would be scored as an object (or a wrapped id) there
        refuse_other_background(self.layer.volume.path, ids, z)
        refuse_top_background(self.layer.volume.path, ids, z)
        if self._ids is None:
            return ids
        # the ids the class map lacks, noted on the layer by whichever of its classes is read (eval names them all
        # once scored: the check when it starts reads a window of three slices)
        if (z, y0, y1, x0, x1) not in self.layer.unmapped_looked:
            self.layer.unmapped_looked.add((z, y0, y1, x0, x1))
            self.layer.unmapped.update(unmapped_ids(self.layer, ids)[1].tolist())
        return np.where(np.isin(ids, self._ids), ids, 0).astype(ids.dtype, copy=False)


def class_volumes(layers: list[LabelLayer]) -> dict[str, Volume]:
    """class name -> a volume of that class's instance ids, over all layers."""
    return {name: ClassView(layer, name) for layer in layers for name in layer.class_names}
