"""COCO: read annotation files as annotation tools export them, and turn label volumes into COCO (and back).

Reading accepts what makesense.ai, CVAT and labelme converters write: polygons and RLE (compressed or not),
category ids that are not 1..N, images named by file name under an images folder, 8- and 16-bit greyscale (RGB
files of grey pixels too). What cannot be used is skipped and counted by reason; a file that cannot be read at
all is a one-line error.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from .errors import UserError
from .read import load_json
from .tiles import Box, side_by_side

MAX_COCO_BYTES = 2**30  # a COCO file larger than this is refused before it is read
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


@dataclass
class CocoSet:
    """A COCO file resolved against its images: detectron2 dataset dicts, class names, what was skipped."""

    path: Path
    classes: list[str]
    records: list[dict]
    skipped: Counter = field(default_factory=Counter)
    crowd: int = 0  # masks flagged iscrowd (CVAT's mask export) taken as instances

    def summary(self) -> str:
        n = sum(len(r["annotations"]) for r in self.records)
        text = f"{self.path.name}: {len(self.records)} images, {n} instances, classes {', '.join(self.classes)}"
        if self.crowd:
            text += f"; {self.crowd} of them flagged iscrowd (as CVAT exports masks), taken as instances"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        return text

    def exclusive_classes(self, nested_ioa: float = 0.5) -> list[list[str]]:
        """Groups of classes that exclude one another in these annotations: they appear in the same images, and no
        instance of one lies mostly (overlap / own area >= ``nested_ioa``) inside an instance of the other (a
        mitochondrion and an alpha granule), unlike classes that nest (a mitochondrion inside its cell). Built in
        class order: a class joins the first group it excludes every member of. Classes never seen together,
        or nested even once, stay apart: with no evidence, nothing is suppressed at prediction."""
        n = len(self.classes)
        together = np.zeros((n, n), bool)
        nested = np.zeros((n, n), bool)
        for r in self.records:
            anns = [a for a in r["annotations"] if not a.get("iscrowd")]
            cls = np.array([a["category_id"] for a in anns], dtype=np.int64)
            if len(np.unique(cls)) < 2:
                continue
            present = np.unique(cls)
            together[np.ix_(present, present)] = True
            rles = [_rle(a["segmentation"], r["height"], r["width"]) for a in anns]
            # iou() with every "ground truth" marked crowd: overlap / area of the first argument's mask (IoA)
            ioa = np.asarray(mask_util.iou(rles, rles, [1] * len(rles))).reshape(len(rles), len(rles))
            i, j = np.nonzero(ioa >= nested_ioa)
            nested[cls[i], cls[j]] = True
        apart = together & ~nested & ~nested.T
        groups: list[list[int]] = []
        for c in range(n):
            home = next((g for g in groups if all(apart[c, m] for m in g)), None)
            if home is None:
                groups.append([c])
            else:
                home.append(c)
        return [[self.classes[c] for c in g] for g in groups if len(g) > 1]


def _rle(segm, h: int, w: int) -> dict:
    """One compressed RLE for a usable segmentation (polygons or RLE, as ``_segmentation`` returns it)."""
    return segm if isinstance(segm, dict) else mask_util.merge(mask_util.frPyObjects(segm, h, w))


def read_grey(path: str | Path) -> np.ndarray:
    """An image file as a 2D array in its own dtype (8/16-bit, float); RGB(A) of equal channels becomes grey."""
    path = Path(path)
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            image = tifffile.imread(path)
        else:
            from PIL import Image

            with Image.open(path) as im:
                if im.mode == "P":  # its pixels are indices into a colour table, not intensities
                    raise UserError(f"{path} holds colour-table indices (mode P), not intensities; save it as 8/16-bit greyscale")
                image = np.asarray(im)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read image {path} ({e})") from e
    if image.ndim == 3 and image.shape[-1] in (3, 4):
        rgb = image[..., :3]
        image = rgb[..., 0] if (rgb == rgb[..., :1]).all() else (rgb @ np.array([0.299, 0.587, 0.114])).astype(np.float32)
    if image.ndim != 2:
        raise UserError(f"{path} has shape {image.shape}; training images must be single greyscale slices")
    return image


def _load_coco_json(path: Path) -> dict:
    data = load_json(path, max_bytes=MAX_COCO_BYTES)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a COCO file: its top level must be an object")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UserError(f"{path} is not a COCO file: it has no '{key}' list")
    if not data["categories"]:
        raise UserError(f"{path} defines no categories")
    return data


def _segmentation(segm, h: int, w: int) -> tuple[object | None, str | None]:
    """A usable segmentation (polygons or compressed RLE) and None, or None and why it was skipped."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None, "degenerate polygons"
        flat = np.concatenate([np.asarray(p, dtype=np.float64) for p in polys])
        if not np.isfinite(flat).all():
            return None, "degenerate polygons"
        xs, ys = flat[0::2], flat[1::2]
        if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= w or ys.min() >= h:
            return None, "annotations outside the image"
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        if mask_util.area(rle) == 0:
            return None, "degenerate polygons"
        return polys, None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [h, w]:
            return None, "RLE of another image size"
        rle = mask_util.frPyObjects(segm, h, w) if isinstance(segm["counts"], list) else segm
        if isinstance(rle.get("counts"), str):
            rle = {"size": rle["size"], "counts": rle["counts"].encode()}
        if mask_util.area(rle) == 0:
            return None, "empty masks"
        return rle, None
    return None, "annotations without segmentation"


def load_coco(json_path: str | Path, images: str | Path, classes: list[str] | None = None) -> CocoSet:
    """Resolve a COCO file against its images folder into detectron2 dataset dicts.

    ``classes`` fixes the class order (e.g. the training set's, for its validation set); by default classes are
    the categories sorted by id. Category ids need not be 1..N: they map to class indices by name.
    """
    json_path, images = Path(json_path), Path(images)
    if not images.is_dir():
        raise UserError(f"images folder {images} does not exist")
    data = _load_coco_json(json_path)
    cats = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or "id" not in c or not c.get("name"):
            raise UserError(f"{json_path}: every category needs an id and a name, got {c!r}")
        cats[c["id"]] = str(c["name"])
    # categories of one name (a tool's export that repeats a class) are one class
    names = classes or list(dict.fromkeys(cats[i] for i in sorted(cats, key=lambda k: (str(type(k)), k))))
    index = {name: i for i, name in enumerate(names)}
    skipped: Counter = Counter()
    by_image: dict = {}
    for a in data["annotations"]:
        if not isinstance(a, dict) or "image_id" not in a:
            skipped["malformed annotations"] += 1
            continue
        by_image.setdefault(_key(a["image_id"]), []).append(a)
    files_of: dict = {}
    for img in data["images"]:
        if isinstance(img, dict) and "id" in img:
            files_of.setdefault(_key(img["id"]), []).append(str(img.get("file_name")))
    for image_id, files in files_of.items():
        if len(files) > 1:  # their annotations cannot be told apart
            raise UserError(f"{json_path}: image id {image_id} is given to {len(files)} images ({', '.join(files[:3])}); "
                            "every image needs an id of its own")  # fmt: skip
    skipped["annotations of images not in the file"] = sum(len(v) for k, v in by_image.items() if k not in files_of)
    records, crowd = [], 0
    find_image = _ImageFinder(images)
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            skipped["malformed images"] += 1
            continue
        path = find_image(str(img["file_name"]))
        if path is None:
            skipped["missing image files"] += 1
            if by_image.get(img["id"]):
                skipped["annotations of missing images"] += len(by_image[img["id"]])
            continue
        h, w = _size(img, json_path)
        if (h, w) != (real := _image_size(path)) and h and w:  # masks and the model's tile size follow the file
            raise UserError(f"{json_path}: image {img['file_name']!r} is {real[0]}x{real[1]} px but the file gives "
                            f"height {h} and width {w}; correct them or leave them out")  # fmt: skip
        h, w = real
        annotations = []
        for a in by_image.get(_key(img["id"]), []):
            name = cats.get(a.get("category_id"))
            if name is None or name not in index:
                skipped["unknown categories"] += 1
                continue
            segm, why = _segmentation(a.get("segmentation"), int(h), int(w))
            if why:
                skipped[why] += 1
                continue
            box = mask_util.toBbox(_rle(segm, int(h), int(w)))
            x0, y0, bw, bh = (float(v) for v in box)
            if bw <= 0 or bh <= 0 or x0 >= w or y0 >= h or x0 + bw <= 0 or y0 + bh <= 0:
                skipped["annotations outside the image"] += 1
                continue
            # CVAT exports masks as RLE flagged iscrowd; detectron2 would leave crowd regions out of training
            crowd += a.get("iscrowd") in (1, True, "1")
            annotations.append({"bbox": [x0, y0, bw, bh], "bbox_mode": 1, "segmentation": segm,
                                "category_id": index[name], "iscrowd": 0})  # fmt: skip
        records.append({"file_name": str(path), "height": int(h), "width": int(w), "image_id": img["id"],
                        "annotations": annotations})  # fmt: skip
    if not records:
        raise UserError(f"{json_path}: none of its {len(data['images'])} images was found under {images}")
    return CocoSet(json_path, names, records, +skipped, crowd)


# -- windows of large annotated images (``train --crop``) -----------------------------------------------------------


@dataclass(frozen=True)
class MaskCut:
    """One annotation's mask cut to its box, and where the box lies in the image."""

    category_id: int
    box: Box
    mask: np.ndarray  # bool, the box's shape


def mask_cuts(record: dict) -> list[MaskCut]:
    """A record's annotations as masks cut to their boxes. Made once per image: each window of it then takes its
    masks by slicing (decoding a 4096 px slice's masks for every window would cost more than the training step).
    Polygons are drawn by pycocotools in a frame 2 px around their points, cut by the image's edges where they
    cross them: the pixels of a drawing in the whole image (a frame as tight as the pixels' box, or one it clips,
    gives other pixels along the edge), for ~0.1 ms instead of ~30 ms a polygon in a 4096 px slice. An RLE is
    decoded whole, once."""
    h, w = record["height"], record["width"]
    cuts = []
    for a in record["annotations"]:
        segm = a["segmentation"]
        if isinstance(segm, list):
            xy = np.concatenate([np.asarray(p, dtype=np.float64) for p in segm])
            frame = Box(max(int(np.floor(xy[1::2].min())) - 2, 0), min(int(np.ceil(xy[1::2].max())) + 2, h),
                        max(int(np.floor(xy[0::2].min())) - 2, 0), min(int(np.ceil(xy[0::2].max())) + 2, w))  # fmt: skip
            if frame.y0 >= frame.y1 or frame.x0 >= frame.x1:
                continue
            moved = [[v - (frame.x0 if i % 2 == 0 else frame.y0) for i, v in enumerate(p)] for p in segm]
            mask, origin = mask_util.decode(mask_util.merge(mask_util.frPyObjects(moved, *frame.shape))) > 0, frame
        else:
            mask, origin = mask_util.decode(segm) > 0, Box(0, h, 0, w)
        cut = _cut_to_pixels(a["category_id"], mask, origin)
        if cut is not None:
            cuts.append(cut)
    return cuts


def _cut_to_pixels(category_id: int, mask: np.ndarray, origin: Box) -> MaskCut | None:
    """A mask lying at ``origin``, cut to the box of its pixels (None: it has none)."""
    ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
    if not len(ys):
        return None
    box = Box(origin.y0 + int(ys[0]), origin.y0 + int(ys[-1]) + 1, origin.x0 + int(xs[0]), origin.x0 + int(xs[-1]) + 1)
    return MaskCut(category_id, box, mask[box.relative_to(origin)])


def window_parts(cuts: list[MaskCut], window: Box) -> list[MaskCut]:
    """The masks of one window of an image: the part of each inside it, cut to its pixels, its box in the window's
    coordinates; a mask with no pixel inside is left out."""
    out = []
    for cut in cuts:
        inside = cut.box.intersect(window)
        if inside is None:
            continue
        at = Box(inside.y0 - window.y0, inside.y1 - window.y0, inside.x0 - window.x0, inside.x1 - window.x0)
        part = _cut_to_pixels(cut.category_id, cut.mask[inside.relative_to(cut.box)], at)
        if part is not None:
            out.append(part)
    return out


def window_annotations(cuts: list[MaskCut], window: Box) -> list[dict]:
    """The annotations of one window of an image (``window_parts``) as COCO annotations: RLE and box."""
    out = []
    for part in window_parts(cuts, window):
        mask = np.zeros(window.shape, np.uint8, order="F")
        mask[part.box.y0 : part.box.y1, part.box.x0 : part.box.x1] = part.mask
        box = [float(v) for v in (part.box.x0, part.box.y0, part.box.x1 - part.box.x0, part.box.y1 - part.box.y0)]
        out.append({"bbox": box, "bbox_mode": 1, "segmentation": mask_util.encode(mask),
                    "category_id": part.category_id, "iscrowd": 0})  # fmt: skip
    return out


def window_records(records: list[dict], crop: int) -> list[dict]:
    """Images larger than ``crop`` px on a side as the windows that partition them (``tiles.side_by_side``), each a
    record of its own (``window``: its box in the image, annotations cut to it); the others as they are. Image ids
    are numbered anew (a window is an image to COCO evaluation)."""
    out = []
    for r in records:
        if not crop or max(r["height"], r["width"]) <= crop:
            out.append(r)
            continue
        cuts = mask_cuts(r)
        for window in side_by_side(r["height"], r["width"], crop):
            out.append({**r, "height": window.shape[0], "width": window.shape[1], "window": tuple(window),
                        "annotations": window_annotations(cuts, window)})  # fmt: skip
    return [{**r, "image_id": i + 1} for i, r in enumerate(out)]


def _image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header where PIL can read it."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # e.g. a TIFF codec PIL lacks: the whole image, as training will read it
        image = read_grey(path)
        return image.shape[0], image.shape[1]


def _key(image_id):
    """An image id as annotations may refer to it: 7, 7.0 and "7" are one image (exports differ in the type)."""
    try:
        return int(image_id) if float(image_id) == int(float(image_id)) else str(image_id)
    except (TypeError, ValueError, OverflowError):
        return str(image_id)


def _size(img: dict, json_path: Path) -> tuple[int, int]:
    """The image's height and width as the COCO file gives them (0 where absent: read from the image)."""
    try:
        return int(float(img.get("height") or 0)), int(float(img.get("width") or 0))
    except (TypeError, ValueError) as e:
        raise UserError(f"{json_path}: image {img.get('file_name')!r} has height {img.get('height')!r} and width "
                        f"{img.get('width')!r}; give whole numbers of pixels or leave them out") from e  # fmt: skip


def _name_parts(file_name: str) -> tuple[str, ...]:
    """A COCO ``file_name`` as path components, whichever system wrote it: ``C:\\Users\\lab\\a.png`` (Windows,
    makesense.ai and CVAT exports there), ``/home/u/a.png``, ``./vol/a.png``. A drive letter is dropped."""
    parts = [p for p in re.split(r"[\\/]+", file_name) if p not in ("", ".")]
    if parts and re.fullmatch(r"[A-Za-z]:", parts[0]):
        parts = parts[1:]
    return tuple(parts)


class _ImageFinder:
    """Finds a COCO image's file under the images folder. Tools write bare names, relative paths or absolute paths
    of the annotator's machine (Windows ones too): the file whose path under the folder shares the longest end with
    the name wins (``volB/x.png`` for ``D:\\proj\\volB\\x.png``, not ``volA/x.png`` or ``x.png``), searched for deeper
    in the folder (once) where the whole name is not a path under it; two files that match equally well are
    refused, naming both."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_name: dict[str, list[tuple[str, ...]]] | None = None

    def __call__(self, file_name: str) -> Path | None:
        if Path(file_name).is_absolute() and Path(file_name).is_file():  # the annotator's own path, on this machine
            return Path(file_name)
        parts = _name_parts(file_name)
        if ".." in parts:  # what follows the last "..": never a file outside the folder
            parts = parts[len(parts) - parts[::-1].index("..") :]
        if not parts:
            return None
        if (self.folder.joinpath(*parts)).is_file():  # the whole name: no file can match it better
            return self.folder.joinpath(*parts)
        found = self._files().get(parts[-1], [])
        if not found:
            return None
        # the longest common end; of equal ones, a file whose whole path under the folder ends the name
        scores = [(_common_suffix(rel, parts), _common_suffix(rel, parts) == len(rel)) for rel in found]
        best = [rel for rel, score in zip(found, scores) if score == max(scores)]
        if len(best) > 1:
            a, b = ("/".join(rel) for rel in best[:2])
            raise UserError(f"image {file_name!r} matches both {a} and {b} under {self.folder}; give its path relative "
                            "to --images in the COCO file, or point --images at the folder that holds it")  # fmt: skip
        return self.folder.joinpath(*best[0])

    def _files(self) -> dict[str, list[tuple[str, ...]]]:
        if self._by_name is None:
            self._by_name = {}
            for path in sorted(self.folder.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(self.folder).parts
                    self._by_name.setdefault(rel[-1], []).append(rel)
        return self._by_name


def _common_suffix(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


# -- label volumes -> COCO ----------------------------------------------------------------------------------------


def label_rles(lab: np.ndarray) -> dict[int, tuple[dict, int]]:
    """id -> (compressed COCO RLE, area) of every instance in a 2D label image, ids ascending, from one pass over
    its runs (one whole-image mask per instance costs the image's size for each: minutes for a 4096 px slice of
    thousands of instances)."""
    h, w = lab.shape
    flat = lab.ravel(order="F")  # COCO RLE runs go down the columns
    starts = np.flatnonzero(np.r_[True, flat[1:] != flat[:-1]])
    ends = np.r_[starts[1:], flat.size]
    ids = flat[starts]
    keep = np.flatnonzero(ids != 0)
    keep = keep[np.argsort(ids[keep], kind="stable")]  # runs grouped by id, in image order within an id
    if not len(keep):
        return {}
    starts, ends, ids = starts[keep], ends[keep], ids[keep]
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    uncompressed, areas = [], {}
    for i, s, e in zip(ids[first], np.split(starts, first[1:]), np.split(ends, first[1:])):
        edges = np.column_stack([s, e]).ravel()  # counts alternate background, foreground, ..., from pixel 0
        counts = np.diff(edges, prepend=0)
        if edges[-1] < flat.size:
            counts = np.r_[counts, flat.size - edges[-1]]
        uncompressed.append({"size": [h, w], "counts": counts})
        areas[int(i)] = int((e - s).sum())
    rles = mask_util.frPyObjects(uncompressed, h, w)
    return {i: (rle, area) for (i, area), rle in zip(areas.items(), rles)}


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """Outer contours of a binary mask as COCO polygons (for annotation tools that edit polygons), along the pixels'
    edges: pycocotools fills them back to exactly the mask, holes filled (a contour through the edge pixels' centres
    lost half a pixel all round: IoU 0.63 for a disc of 26 px, one-pixel objects and lines gone). Traced on the mask
    upsampled 2x, where each sub-pixel on a contour stands for the corner of its pixel it touches: sub-pixel 2i
    (the left or top half of pixel i) for edge i, 2i + 1 for edge i + 1."""
    import cv2

    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [((c.reshape(-1) + 1) // 2).astype(float).tolist() for c in contours if len(c) >= 3]


def _polygons_in_box(ids: np.ndarray, i: int, bbox: list[float]) -> list[list[float]]:
    """``mask_polygons`` of instance ``i`` traced in its box (XYWH) and a margin of one pixel, in the image's
    coordinates: the contours of the whole-image mask, at the cost of the box."""
    x, y, w, h = (int(v) for v in bbox)
    y0, x0 = max(y - 1, 0), max(x - 1, 0)
    crop = ids[y0 : y + h + 1, x0 : x + w + 1] == i
    return [[v + (x0 if k % 2 == 0 else y0) for k, v in enumerate(p)] for p in mask_polygons(crop)]


def labels_to_coco(volume, layers, out: str | Path, tile: int = 512, slices: range | None = None,
                   val_fraction: float = 0.0, polygons: bool = False, min_area: int = 1,
                   overwrite: bool = False) -> dict[str, Path]:  # fmt: skip
    """Cut a volume and its label layers into image tiles plus COCO files (train.json, and val.json when
    ``val_fraction`` > 0: whole slices, evenly spaced, go to validation).

    One annotation per instance id per tile, of the class its layer gives it; masks as RLE, or polygons for
    tools that edit them. Tiles are written in the volume's own dtype (PNG for 8/16-bit, TIFF otherwise), so
    training normalizes them exactly as ``run`` normalizes the volume. A folder that already holds a COCO set is
    refused without ``overwrite``, which removes it first: a set written over another would keep its stale images
    and val.json (validation images that are also training images)."""
    import shutil

    from PIL import Image

    out = Path(out)
    img_dir = out / "images"
    held = [p for p in (img_dir, out / "train.json", out / "val.json") if p.exists()]
    if held and not overwrite:
        raise UserError(f"{out} already holds a COCO set ({', '.join(p.name for p in held)}); pass --overwrite to "
                        "replace it, or choose another --out")  # fmt: skip
    for p in held:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    img_dir.mkdir(parents=True, exist_ok=True)
    names = [n for layer in layers for n in layer.class_names]
    nz, ny, nx = volume.shape
    zs = list(slices or range(nz))
    n_val = int(round(len(zs) * val_fraction))
    val_z = set(zs[len(zs) // (2 * n_val)::max(1, len(zs) // n_val)][:n_val]) if n_val else set()
    categories = [{"id": i + 1, "name": n, "supercategory": "em"} for i, n in enumerate(names)]
    sets = {"train": {"images": [], "annotations": [], "categories": categories},
            "val": {"images": [], "annotations": [], "categories": categories}}  # fmt: skip
    tile = tile or max(ny, nx)
    suffix = ".png" if volume.dtype in (np.uint8, np.uint16) else ".tif"
    ann_id = 0
    for z in zs:
        split = sets["val" if z in val_z else "train"]
        for y0, y1, x0, x1 in side_by_side(ny, nx, tile):
            name = f"z{z:05d}_y{y0:05d}_x{x0:05d}{suffix}"
            image = volume.read(z, y0, y1, x0, x1)
            if suffix == ".png":
                Image.fromarray(image).save(img_dir / name)
            else:
                import tifffile

                tifffile.imwrite(img_dir / name, image)
            image_id = len(sets["train"]["images"]) + len(sets["val"]["images"]) + 1
            split["images"].append({"id": image_id, "file_name": name, "height": y1 - y0, "width": x1 - x0})
            for layer in layers:
                ids = np.asarray(layer.volume.read(z, y0, y1, x0, x1))
                rles = label_rles(ids)
                present = np.array(list(rles), dtype=ids.dtype)
                for i, cls in zip(rles, layer.classify(present, names)):
                    rle, area = rles[i]
                    if cls < 0 or area < min_area:  # ids the class map leaves out are not annotated
                        continue
                    bbox = [float(v) for v in mask_util.toBbox(rle)]
                    segm = (_polygons_in_box(ids, i, bbox) if polygons
                            else {"size": rle["size"], "counts": rle["counts"].decode()})  # fmt: skip
                    if polygons and not segm:
                        continue
                    ann_id += 1
                    split["annotations"].append({
                        "id": ann_id, "image_id": image_id, "category_id": int(cls) + 1, "iscrowd": 0,
                        "area": area, "bbox": bbox, "segmentation": segm,
                    })  # fmt: skip
    paths = {"images": img_dir}
    for split, data in sets.items():
        if data["images"]:
            paths[split] = out / f"{split}.json"
            paths[split].write_text(json.dumps(data))
    return paths
