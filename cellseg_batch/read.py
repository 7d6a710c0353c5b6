"""Read: open EM volumes and label stacks lazily (TIFF/BigTIFF, zarr v2/v3, OME-Zarr, synthetic) as 2D windows."""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .registry import Registry

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

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self.shape, self.dtype, self.pixel_size_nm = self._inspect()
        check_shape(self.shape, path)

    def __getstate__(self):
        # open file handles stay behind (thread-local); the receiving process reopens by path
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __repr__(self):
        return f"{type(self).__name__}({self.path!r}, shape={self.shape}, dtype={self.dtype})"

    def read(self, z: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The window [y0:y1, x0:x1] of slice z, as a 2D array of the volume's dtype."""
        raise NotImplementedError

    def _inspect(self) -> tuple[tuple[int, int, int], np.dtype, tuple[float, float, float] | None]:
        raise NotImplementedError


def _check_dtype(dtype: np.dtype, path: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "uif" or dtype.itemsize > 8:
        raise UserError(f"{path} has pixel type {dtype}; convert it to uint8, uint16 or float32")
    return dtype


def _to_zyx(shape: tuple[int, ...], axes: str, path: str, hint: str) -> tuple[tuple[int, int, int], tuple]:
    """Map an array's axes to (Z, Y, X): singleton extra axes are dropped, a missing Z becomes one slice."""
    axes = axes.upper()
    if len(axes) != len(shape):
        raise UserError(f"{path}: {len(shape)}D data with axes {axes!r}; {hint}")
    if "S" in axes and shape[axes.index("S")] > 1:
        raise UserError(f"{path} is RGB/multi-sample ({shape}); convert it to a greyscale stack")
    if not axes.endswith("YX"):
        raise UserError(f"{path} has axes {axes!r}; the last two axes must be Y and X ({hint})")
    index: list = []
    z_axis = None
    for i, a in enumerate(axes[:-2]):
        if shape[i] == 1:
            index.append(0)
        elif z_axis is None and a in "ZQIT":
            z_axis = i
            index.append(slice(None))
        else:
            raise UserError(
                f"{path} has shape {shape} with axes {axes!r}: more than one non-singleton axis besides Y and X; "
                f"{hint}"
            )
    if 0 in shape:
        raise UserError(f"{path} is empty (shape {shape})")
    zyx = (shape[z_axis] if z_axis is not None else 1, shape[-2], shape[-1])
    if z_axis is None:
        index.append(None)  # adds the one-slice Z axis back
    return zyx, tuple(index)


class TiffVolume(Volume):
    """Multi-page TIFF, BigTIFF, ImageJ hyperstacks, 2D TIFF (one slice); memory-mapped where the layout allows."""

    def _inspect(self):
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tf:
                if not tf.series:
                    raise UserError(f"{self.path} holds no image data")
                series = tf.series[0]
                axes = series.axes
                if tf.is_imagej and axes.startswith("C") and (tf.imagej_metadata or {}).get("channels", 1) > 1:
                    raise UserError(f"{self.path} is a {series.shape[0]}-channel ImageJ stack; save one channel")
                if axes[0] == "C" and len(axes) == 3:
                    axes = "Z" + axes[1:]  # an ImageJ stack saved without hyperstack axes reads as channels
                zyx, self._index = _to_zyx(series.shape, axes, self.path, "save it as a Z, Y, X stack")
                dtype = _check_dtype(series.dtype, self.path)
                self._check_complete(tf, series)
                pixel = _tiff_pixel_size(tf)
        except UserError:
            raise
        except Exception as e:  # tifffile raises many types for a damaged file (struct.error, RuntimeError, ...)
            raise UserError(f"cannot read {self.path} as TIFF ({e}); check that it is a complete TIFF file") from e
        return zyx, dtype, pixel

    def _check_complete(self, tf, series) -> None:
        size = os.path.getsize(self.path)
        pages = series.pages if len(series.pages) <= 4096 else [series.pages[0], series.pages[-1]]
        if any(page is None for page in pages):
            raise UserError(f"{self.path} is truncated or corrupt (a page cannot be read)")
        # what the file says it holds (tifffile's or ImageJ's metadata) against the images its pages give: a file
        # cut short loses its last pages (or gains phantom ones) and can still read as a valid-looking stack
        images = math.prod(n for n, a in zip(series.shape, series.axes) if a not in "YXS")
        said = None
        if tf.is_shaped:
            shape = ((tf.shaped_metadata or [{}])[0] or {}).get("shape") or [0, 0, 0]
            said = math.prod(shape[:-3] if "S" in series.axes else shape[:-2])
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

    def _array(self):
        arr = getattr(self._local, "arr", None)
        if arr is None:
            import tifffile
            import zarr

            try:
                arr = tifffile.memmap(self.path, mode="r")
            except (ValueError, OSError):
                store = tifffile.imread(self.path, aszarr=True)
                arr = zarr.open(store, mode="r")
            self._local.arr = arr
        return arr

    def read(self, z, y0, y1, x0, x1):
        arr = self._array()
        index = [z if isinstance(i, slice) else i for i in self._index if i is not None]
        if self.shape[0] == 1 and None in self._index:
            index = [i for i in self._index if i is not None]
        try:
            return np.asarray(arr[tuple(index) + (slice(y0, y1), slice(x0, x1))])
        except Exception as e:  # tifffile/zarr raise many types for damaged data
            raise UserError(f"cannot read slice {z} of {self.path} ({e}); the file may be truncated or corrupt") from e


def _tiff_pixel_size(tf) -> tuple[float | None, float, float] | None:
    """(z, y, x) in nm from the X/YResolution tags and ImageJ's unit and spacing; z is None where not recorded."""
    tags = tf.pages[0].tags
    if "XResolution" not in tags:
        return None
    num, den = tags["XResolution"].value
    ij = tf.imagej_metadata or {}
    unit = str(ij.get("unit", "")).replace("\\u00B5", "u").replace("µ", "u")
    nm_per_unit = {"um": 1000.0, "micron": 1000.0, "nm": 1.0, "mm": 1e6}.get(unit)
    if nm_per_unit is None and "ResolutionUnit" in tags:
        nm_per_unit = {2: 2.54e7, 3: 1e7}.get(int(tags["ResolutionUnit"].value))  # per inch, per cm
    if not nm_per_unit or not num:
        return None
    xy = nm_per_unit * den / num
    z = float(ij["spacing"]) * nm_per_unit if "spacing" in ij and ij.get("unit") else None
    return (z, xy, xy)


class ZarrVolume(Volume):
    """A zarr v2/v3 array, or the level-0 array of an OME-Zarr (NGFF 0.4/0.5) multiscale image."""

    def _inspect(self):
        import zarr

        try:
            node = zarr.open(self.path, mode="r")
        except Exception as e:
            raise UserError(f"cannot open {self.path} as zarr ({e})") from e
        axes, pixel = None, None
        self._array_path = self.path
        if isinstance(node, zarr.Group):
            ms = multiscales(node.attrs)
            if ms is None:
                arrays = sorted(name for name, _ in node.arrays())
                hint = f"; pass one of its arrays, e.g. {self.path}/{arrays[0]}" if arrays else ""
                raise UserError(f"{self.path} is a zarr group without OME-Zarr multiscales{hint}")
            level0 = ms["datasets"][0]
            self._array_path = f"{self.path.rstrip('/')}/{level0['path']}"
            node = zarr.open(self._array_path, mode="r")
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", []))
            pixel = ngff_pixel_size(ms, level0)
        if axes is None or len(axes) != node.ndim:
            axes = {2: "YX", 3: "ZYX"}.get(node.ndim, "?" * node.ndim)
        zyx, self._index = _to_zyx(node.shape, axes, self.path, "pass a 3D (Z, Y, X) array")
        return zyx, _check_dtype(node.dtype, self.path), pixel

    def _array(self):
        arr = getattr(self._local, "arr", None)
        if arr is None:
            import zarr

            arr = self._local.arr = zarr.open(self._array_path, mode="r")
        return arr

    CACHE_BYTES = 128 * 2**20  # decoded chunks kept per thread: a row of tiles reads each chunk once

    def read(self, z, y0, y1, x0, x1):
        index = [z if isinstance(i, slice) else i for i in self._index if i is not None]
        arr = self._array()
        try:
            if arr.ndim == 3 and arr.chunks[0] == 1 and self._index == (slice(None),):  # Z, Y, X
                return self._read_chunks(arr, z, y0, y1, x0, x1)
            return np.asarray(arr[tuple(index) + (slice(y0, y1), slice(x0, x1))])
        except Exception as e:
            raise UserError(f"cannot read slice {z} of {self.path} ({e}); a chunk may be missing or corrupt") from e

    def _read_chunks(self, arr, z, y0, y1, x0, x1) -> np.ndarray:
        """A window assembled from whole decoded chunks, kept (LRU) for the windows that overlap this one: tile
        windows overlap and straddle chunk borders, so without this each chunk would be decoded up to 4 times."""
        _, cy, cx = arr.chunks
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
        key = (z, by, bx)
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        _, cy, cx = arr.chunks
        block = cache[key] = np.asarray(arr[z, by * cy : (by + 1) * cy, bx * cx : (bx + 1) * cx])
        self._local.chunk_bytes += block.nbytes
        while self._local.chunk_bytes > self.CACHE_BYTES and len(cache) > 1:
            self._local.chunk_bytes -= cache.popitem(last=False)[1].nbytes
        return block


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


def ngff_pixel_size(ms: dict, level0: dict) -> tuple[float, float, float] | None:
    """Z, Y, X nm of a multiscale's dataset ``level0`` (its scale transform and the axes' units), else None."""
    axes = ms.get("axes", [])
    scale = next((t["scale"] for t in level0.get("coordinateTransformations", []) if t.get("type") == "scale"), None)
    if not scale or len(scale) != len(axes):
        return None
    to_nm = {"nanometer": 1.0, "micrometer": 1000.0, "millimeter": 1e6, "angstrom": 0.1}
    out = {}
    for a, s in zip(axes, scale):
        if isinstance(a, dict) and a.get("name", "").lower() in "zyx":
            out[a["name"].lower()] = s * to_nm.get(a.get("unit", "nanometer"), 1.0)
    if "y" not in out or "x" not in out:
        return None
    return (out.get("z", out["y"]), out["y"], out["x"])


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
    if not p.exists():
        raise UserError(f"{path} does not exist")
    suffixes = [m for m in VOLUME_OPENERS if not m.endswith(":") and p.name.lower().endswith(m)]
    if suffixes:
        return VOLUME_OPENERS[max(suffixes, key=len)](path)  # the longest: ".ome.tif" before ".tif"
    if p.is_dir() and any((p / m).exists() for m in ("zarr.json", ".zarray", ".zgroup")):
        return ZarrVolume(path)
    if p.is_dir() and any(part.lower().endswith(".zarr") for part in p.parts):
        return ZarrVolume(path)
    if p.is_file() and p.stat().st_size == 0:
        raise UserError(f"{path} is an empty file")
    raise UserError(f"{path}: unknown volume format; give a .tif/.tiff (multi-page or BigTIFF) or a .zarr")


# -- label stacks ------------------------------------------------------------------------------------------------


@dataclass
class LabelLayer:
    """A label stack whose nonzero ids carry classes: one class for every id, or a map from id to class name."""

    volume: Volume
    classes: str | dict[int, str]

    @property
    def class_names(self) -> list[str]:
        return [self.classes] if isinstance(self.classes, str) else sorted(set(self.classes.values()))

    def classify(self, ids: np.ndarray, names: list[str]) -> np.ndarray:
        """Class index (in ``names``) of each id, -1 for an id the class map does not list. Ids can be large and
        sparse (a map of a few ids up to 2**40 costs a few entries, not a table that long)."""
        ids = np.asarray(ids)
        if isinstance(self.classes, str):
            return np.full(ids.shape, names.index(self.classes), dtype=np.int16)
        if getattr(self, "_keys", None) is None or self._names != names:
            keys = np.array(sorted(self.classes), dtype=np.int64)
            self._keys, self._names = keys, list(names)
            self._values = np.array([names.index(self.classes[int(k)]) for k in keys], dtype=np.int16)
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
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from e


MAX_CLASS_MAP_BYTES = 64 * 2**20  # a million ids with their names fit in a tenth of it


def read_class_map(spec: str) -> str | dict[int, str]:
    """A ``--classes`` value: a JSON file mapping label ids to class names, or one class name for every id."""
    p = Path(spec)
    if not p.suffix.lower() == ".json":
        if not spec or "/" in spec:
            raise UserError(f"--classes {spec!r}: give a class name or a .json file mapping ids to class names")
        return spec
    data = load_json(p, max_bytes=MAX_CLASS_MAP_BYTES)
    if isinstance(data, dict) and isinstance(data.get("instance_class"), dict):
        data = data["instance_class"]
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
        if i <= 0 or not isinstance(v, str) or not v:
            raise UserError(f"{spec}: entry {k!r}: {v!r} must map a positive label id to a class name")
        out[i] = v
    return out


def open_label_layers(paths: list[str], class_specs: list[str]) -> list[LabelLayer]:
    """Label stacks with their classes: ``--labels A --classes a.json --labels B --classes cell``.

    An OME-Zarr holding a ``labels/`` group (this tool's output, or ``synth`` truth) gives one layer per label
    image, named by it; there ``--classes`` is not needed.
    """
    layers: list[LabelLayer] = []
    groups = [ngff_label_layers(path) for path in paths]
    plain = [path for path, group in zip(paths, groups) if group is None]
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
        volume = open_volume(path)
        if volume.dtype.kind not in "ui":
            raise UserError(f"{path} holds {volume.dtype} values; a label stack must hold integer ids")
        layers.append(LabelLayer(volume, read_class_map(next(specs))))
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
    if not p.is_dir() or not labels.is_dir():
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
        if self._ids is None:
            return ids
        return np.where(np.isin(ids, self._ids), ids, 0).astype(ids.dtype, copy=False)


def class_volumes(layers: list[LabelLayer]) -> dict[str, Volume]:
    """class name -> a volume of that class's instance ids, over all layers."""
    return {name: ClassView(layer, name) for layer in layers for name in layer.class_names}
