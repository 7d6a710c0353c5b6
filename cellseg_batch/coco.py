"""COCO: read annotation files as annotation tools export them, and turn label volumes into COCO (and back).

Reading accepts what makesense.ai, CVAT and labelme converters write: polygons and RLE (compressed or not),
category ids that are not 1..N, images named by file name under an images folder, 8- and 16-bit greyscale (RGB
files of grey pixels too). What cannot be used is skipped and counted by reason; a file that cannot be read at
all is a one-line error.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_util

from .config import check_output_folder
from .errors import UserError
from .read import SliceRange, group_attrs, load_json, one_slice, open_volume, to_zyx
from .tiles import Box, side_by_side
from .write import layer_name

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
    notes: list[str] = field(default_factory=list)  # what a user should check: names missing, renamed, unmatched
    categories: list[str] = field(default_factory=list)  # the class names the file's categories give, all of them

    def summary(self) -> str:
        n = sum(len(r["annotations"]) for r in self.records)
        text = f"{self.path.name}: {len(self.records)} images, {n} instances, classes {', '.join(self.classes)}"
        if self.crowd:
            text += f"; {self.crowd} of them flagged iscrowd (as CVAT exports masks), taken as instances"
        if self.skipped:
            text += "; skipped " + ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
        return "\n  ".join([text, *self.notes])

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
    """An image file as a 2D array in its own dtype, as ``run`` reads a volume's slices, so that a model trains on
    the values it will see: TIFF and PNG through the volume readers (``read.one_slice``), other formats (JPEG)
    through Pillow by the same rule: grey + alpha gives its grey, RGB(A) the mean of R, G and B, singleton axes
    are dropped."""
    path = Path(path)
    why = "training images must be single greyscale slices"
    if path.suffix.lower() in (".tif", ".tiff", ".png"):
        volume = one_slice(str(path), why)
        # a copy in memory: an uncompressed TIFF reads as a view of its mapped file, which training would hold
        return np.array(volume.read(0, 0, volume.shape[1], 0, volume.shape[2]))
    try:
        from PIL import Image

        with Image.open(path) as im:
            if im.mode == "P":  # its pixels are indices into a colour table, not intensities
                raise UserError(f"{path} holds colour-table indices (mode P), not intensities; save it as 8/16-bit greyscale")
            image = np.asarray(im)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot read image {path} ({e})") from e
    (_, h, w), axes = to_zyx(image.shape, "YX" if image.ndim == 2 else "YXS", str(path), why)
    return axes.grey(image[axes.window(0, 0, h, 0, w)])


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
    """A usable segmentation (polygons as lists of floats, or compressed RLE) and None, or None and why it was
    skipped. Nothing reaches pycocotools unchecked: an RLE whose runs do not cover the image exactly (pycocotools
    decodes a short one from memory it never wrote, and refuses a long one only when training reads it), or a
    polygon with a point far outside the image (a stray 1e9 crashed the process) is skipped and counted."""
    if isinstance(segm, list):
        polys = _polygons(segm)
        if polys is None:
            return None, "polygons of values that are not numbers"
        polys = [p for p in polys if len(p) >= 6 and len(p) % 2 == 0]
        if not polys:
            return None, "degenerate polygons" if segm else "annotations without segmentation (boxes only)"
        flat = np.concatenate([np.asarray(p) for p in polys])
        xs, ys = flat[0::2], flat[1::2]
        if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= w or ys.min() >= h:
            return None, "annotations outside the image"
        if xs.min() < -w or ys.min() < -h or xs.max() > 2 * w or ys.max() > 2 * h:
            return None, "polygons with a point more than an image's size outside it"
        rle = mask_util.merge(mask_util.frPyObjects(polys, h, w))
        if mask_util.area(rle) == 0:
            return None, "degenerate polygons"
        return polys, None
    if isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if not isinstance(segm["size"], list) or [_key(v) for v in segm["size"]] != [h, w]:
            return None, "RLE of another image size"
        counts = segm["counts"]
        runs = _rle_runs(counts.encode() if isinstance(counts, str) else counts) if isinstance(counts, (str, bytes)) \
            else counts if isinstance(counts, list) and all(_whole(v) for v in counts) else None  # fmt: skip
        if runs is None or any(v < 0 for v in runs) or sum(runs) != h * w:
            return None, "RLE masks whose runs do not add up to height x width"
        if isinstance(counts, list):
            rle = mask_util.frPyObjects({"size": [h, w], "counts": [int(v) for v in counts]}, h, w)
        else:
            rle = {"size": [h, w], "counts": counts.encode() if isinstance(counts, str) else counts}
        if mask_util.area(rle) == 0:
            return None, "empty masks"
        return rle, None
    return None, "annotations without segmentation"


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _polygons(segm: list) -> list[list[float]] | None:
    """COCO's polygons ``[[x, y, x, y, ...], ...]`` from the layouts tools write: that, one flat ``[x, y, ...]``,
    point pairs ``[[x, y], ...]``, a list of such, or one of these nested once more; coordinates written as text
    ("18.5") are numbers. None where a value is not a finite number."""

    def one(p) -> list[float] | None | bool:  # a polygon, None (values not numbers), False (not one polygon)
        if not isinstance(p, list):
            return False
        if all(isinstance(v, list) and len(v) == 2 for v in p) and p:  # point pairs
            p = [v for pair in p for v in pair]
        if any(isinstance(v, list) for v in p):
            return False
        try:
            values = [float(v) for v in p if not isinstance(v, bool)]
        except (TypeError, ValueError):
            return None
        return values if len(values) == len(p) and all(np.isfinite(values)) else None

    whole = one(segm)
    if whole is not False:
        return None if whole is None else [whole]
    out = []
    for part in segm:
        got = one(part)
        if got is False:  # nested once more: a list of polygons
            got = _polygons(part) if isinstance(part, list) and part and all(isinstance(q, list) for q in part) else None
            if got is None:
                return None
            out.extend(got)
        elif got is None:
            return None
        else:
            out.append(got)
    return out


def _rle_runs(counts: bytes) -> list[int] | None:
    """The runs of a compressed RLE string (COCO's format, as pycocotools' ``rleFrString`` reads it: 6-bit digits
    from '0', a run the difference to the one two before); None where it is not one."""
    runs: list[int] = []
    x = k = 0
    for ch in counts:
        c = ch - 48
        if not 0 <= c < 64:
            return None
        x |= (c & 0x1F) << (5 * k)
        k += 1
        if not c & 0x20:  # the run's last digit
            if c & 0x10:
                x |= -1 << (5 * k)
            if len(runs) > 2:
                x += runs[-2]
            runs.append(x)
            x = k = 0
    return runs if k == 0 else None


def load_coco(json_path: str | Path, images: str | Path, classes: list[str] | None = None,
              images_option: str = "--images") -> CocoSet:  # fmt: skip
    """Resolve a COCO file against its images folder into detectron2 dataset dicts.

    ``classes`` fixes the class order (e.g. the training set's, for its validation set); by default classes are
    the categories sorted by id. Category ids need not be 1..N: they map to class indices by name.
    """
    json_path, images = Path(json_path), Path(images)
    if not images.is_dir():
        raise UserError(f"{images_option} {images}: " + ("a file; give the folder that holds the images"
                                                          if images.is_file() else "no such folder"))  # fmt: skip
    data = _load_coco_json(json_path)
    cats, notes = _categories(data["categories"], json_path)
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
    records, crowd, missing, seen, twice, unknown, partial = [], 0, [], {}, [], Counter(), []
    polygons_seen = polygons_within_1 = 0  # normalised coordinates (0..1) fill a pixel or none: say so, once
    find_image = _ImageFinder(images)
    for img in data["images"]:
        if not isinstance(img, dict) or "id" not in img or "file_name" not in img:
            skipped["malformed images"] += 1
            continue
        path = find_image(str(img["file_name"]))
        if path is None:
            skipped["missing image files"] += 1
            missing.append(str(img["file_name"]))
            if by_image.get(_key(img["id"])):
                skipped["annotations of missing images"] += len(by_image[_key(img["id"])])
            continue
        if path in seen:  # its annotations train twice, or contradict each other
            twice.append((seen[path], img["file_name"], path))
        seen[path] = img["file_name"]
        h, w = _size(img, json_path)
        if (h, w) != (real := _image_size(path)) and h and w:  # masks and the model's tile size follow the file
            raise UserError(f"{json_path}: image {img['file_name']!r} is {real[0]}x{real[1]} px but the file gives "
                            f"height {h} and width {w}; correct them or leave them out")  # fmt: skip
        h, w = real
        annotations, unusable = [], 0
        for a in by_image.get(_key(img["id"]), []):
            name = cats.get(_key(a.get("category_id")))
            if name is None or name not in index:
                skipped["unknown categories"] += 1
                unknown[name if name is not None else f"id {a.get('category_id')!r}"] += 1
                continue
            polys = _polygons(a["segmentation"]) if isinstance(a.get("segmentation"), list) else None
            if polys and all(len(p) for p in polys):
                polygons_seen += 1
                polygons_within_1 += all(0 <= v <= 1 for p in polys for v in p)
            segm, why = _segmentation(a.get("segmentation"), int(h), int(w))
            if why:
                skipped[why] += 1
                unusable += 1
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
        if unusable and annotations:  # the image trains, and those objects in it with it, as background
            partial.append((img["file_name"], unusable))
    if polygons_seen >= 2 and polygons_within_1 == polygons_seen:
        raise UserError(f"{json_path}: all {polygons_seen} polygon annotations lie within 0..1: coordinates "
                        "normalised to the image's size (as YOLO's are)? COCO polygons are in pixels: multiply each x "
                        "by the image's width and each y by its height")  # fmt: skip
    if missing:
        notes.append(f"not found under {images}: {find_image.describe(missing)}")
    if twice:
        (a, b, path), n = twice[0], len(twice)
        notes.append(f"{n} image(s) listed more than once (the first: {a!r} and {b!r}, both {path}): their "
                     "annotations train once per listing")  # fmt: skip
    if find_image.by_name_only:
        (said, found), n = find_image.by_name_only[0], len(find_image.by_name_only)
        notes.append(f"{n} image(s) found by file name alone in another folder than the COCO file names (the first: "
                     f"{said!r} -> {found}); check that --images holds the images these annotations were made on")  # fmt: skip
    if not records:
        raise UserError(f"{json_path}: none of its {len(data['images'])} images was found under {images} "
                        f"({find_image.describe(missing)})")  # fmt: skip
    if partial:
        (name, n), more = partial[0], sum(k for _, k in partial[1:])
        notes.append(f"{len(partial)} image(s) train with objects whose annotation has no usable mask (boxes only, "
                     f"degenerate polygons; the first: {name!r}, {n}{f', then {more} more' if more else ''}): those "
                     "objects are taught as background there; draw their masks, or leave those images out")  # fmt: skip
    empty = sum(not r["annotations"] for r in records)
    if empty and empty < len(records) and classes is None:  # a training set (a validation set scores them all)
        notes.append(f"{empty} image(s) hold no usable annotation: training leaves them out (the config's "
                     "DATALOADER.FILTER_EMPTY_ANNOTATIONS; set it False to train on them as background)")  # fmt: skip
    if unknown:  # a category spelt otherwise than the training set's ('Alpha Granule'), or an id no category has
        said = []
        for name, n in unknown.most_common(5):
            like = [c for c in names if re.sub(r"[^a-z0-9]", "", c.lower()) == re.sub(r"[^a-z0-9]", "", name.lower())]
            said.append(f"{name!r} ({n}{f'; the class {like[0]!r}?' if like else ''})")
        whose = "the training set's classes" if classes else "the file's categories"
        notes.append(f"annotations of categories not among {whose} ({', '.join(names)}): {', '.join(said)}")
    counted = Counter(a["category_id"] for r in records for a in r["annotations"])
    unused = [name for i, name in enumerate(names) if not counted[i]]
    if unused and any(counted.values()):
        notes.append(f"no usable annotation of class(es) {', '.join(unused)}: "
                     + ("their AP is not measured on this set" if classes else
                        "the model gets such a class and never learns it; annotate some or remove the category"))  # fmt: skip
    return CocoSet(json_path, names, records, +skipped, crowd, notes, list(dict.fromkeys(cats.values())))


def _categories(categories: list, json_path: Path) -> tuple[dict, list[str]]:
    """Category id (as ``_key`` gives it: 1, 1.0 and "1" are one) -> class name, and notes. A name that cannot
    name a label layer (``alpha granule``, as annotation tools allow) becomes one (``alpha_granule``), said in a
    note; two names that would become one are refused."""
    cats, renamed, notes = {}, {}, []
    for c in categories:
        if not isinstance(c, dict) or "id" not in c or not c.get("name"):
            raise UserError(f"{json_path}: every category needs an id and a name, got {c!r}")
        name = str(c["name"]).strip()
        layer = layer_name(name, f"{json_path}: category")
        if renamed.setdefault(layer, name) != name:
            raise UserError(f"{json_path}: categories {renamed[layer]!r} and {name!r} would both be class {layer!r} "
                            "(a label layer's name: letters, digits, '_', '-', '.'); rename one")  # fmt: skip
        cats[_key(c["id"])] = layer
    changed = [f"{name!r} -> {layer}" for layer, name in renamed.items() if layer != name]
    if changed:
        notes.append(f"class names as label layers name them (letters, digits, '_', '-', '.'): {', '.join(changed)}")
    return cats, notes


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
    refused, naming both, as are several files of the name where no folder of the name is theirs (``day1_task/s.png``
    among ``s.png``, ``day1/s.png`` and ``day2/s.png``)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_name: dict[str, list[tuple[str, ...]]] | None = None
        self._paths: dict[tuple[str, ...], Path] = {}
        self.by_name_only: list[tuple[str, Path]] = []  # found in another folder than the name gives

    def describe(self, missing: list[str], most: int = 3) -> str:
        """The first of the ``missing`` names, each with the file it most likely means (same name but for case or
        image type: .png for .tif, .tiff for .tif) where the folder holds one."""
        if not missing:
            return "every image is there"
        said = []
        for name in missing[:most]:
            parts = _nfc(_name_parts(name))
            near = self._near(parts[-1]) if parts else []
            said.append(f"{name!r}" + (f" (there is {'/'.join(near[0])})" if near else ""))
        more = f" and {len(missing) - most} more" if len(missing) > most else ""
        return ", ".join(said) + more

    def _near(self, name: str) -> list[tuple[str, ...]]:
        def loose(n: str) -> str:  # an image's name less case and image type (an export may convert png to tif)
            stem, dot, ext = n.lower().rpartition(".")
            return stem if dot and ext in {"tif", "tiff", "png", "jpg", "jpeg", "bmp"} else n.lower()

        want = loose(name)
        return [rel for key, rels in self._files().items() if loose(key) == want for rel in rels]

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
        parts = _nfc(parts)  # one name to a user, two to the file system: macOS writes names decomposed (NFD)
        found = self._files().get(parts[-1], [])
        if not found:
            return None
        # the longest common end; of equal ones, a file whose whole path under the folder ends the name
        scores = [(_common_suffix(rel, parts), _common_suffix(rel, parts) == len(rel)) for rel in found]
        best = [rel for rel, score in zip(found, scores) if score == max(scores)]
        if max(scores)[0] == 1 and len(parts) > 1 and len(found) > 1:
            best = found  # only the file name matches, and several files have it: no folder of the name tells which
        if len(best) > 1:
            a, b = ("/".join(rel) for rel in best[:2])
            raise UserError(f"image {file_name!r} matches both {a} and {b} under {self.folder}; give its path relative "
                            "to --images in the COCO file, or point --images at the folder that holds it")  # fmt: skip
        path = self._paths[best[0]]
        if _common_suffix(best[0], parts) < min(len(best[0]), len(parts)):  # both name a folder, and they differ
            self.by_name_only.append((file_name, path))
        return path

    def _files(self) -> dict[str, list[tuple[str, ...]]]:
        """File name -> the paths under the folder that end in it, as NFC parts (``_paths`` gives each file)."""
        if self._by_name is None:
            self._by_name, self._paths = {}, {}
            for path in sorted(self.folder.rglob("*")):
                if path.is_file():
                    rel = _nfc(path.relative_to(self.folder).parts)
                    self._by_name.setdefault(rel[-1], []).append(rel)
                    self._paths[rel] = path
        return self._by_name


def _nfc(parts: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(unicodedata.normalize("NFC", p) for p in parts)


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
    """A binary mask as COCO polygons (for annotation tools that edit polygons), along the pixels' edges:
    pycocotools fills them back to exactly the mask (a contour through the edge pixels' centres lost half a pixel
    all round: IoU 0.63 for a disc of 26 px, one-pixel objects and lines gone). Traced on the mask upsampled 2x,
    where each sub-pixel on a contour stands for the corner of its pixel it touches: sub-pixel 2i (the left or top
    half of pixel i) for edge i, 2i + 1 for edge i + 1. COCO polygons have no holes (a piece's polygons are filled
    and joined), so each hole is walked from its piece's outline and back along one cut of no width (a keyhole):
    pycocotools fills even-odd, so the hole stays empty. Outer contours alone filled the holes (a section of an
    ISBI neurite at IoU 0.68)."""
    import cv2

    up = np.kron(mask.astype(np.uint8), np.ones((2, 2), np.uint8))
    contours, hierarchy = cv2.findContours(up, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    corners = [(c.reshape(-1, 2) + 1) // 2 for c in contours]
    out = []
    for k, (_, _, hole, parent) in enumerate(hierarchy[0]):
        if parent != -1 or len(corners[k]) < 3:  # a hole: walked from its outline below
            continue
        outline = corners[k]
        while hole != -1:  # the hole from the outline's corner nearest to one of its own, and back
            ring = corners[hole]
            i, j = np.unravel_index(((outline[:, None] - ring[None]) ** 2).sum(-1).argmin(), (len(outline), len(ring)))
            ring = np.roll(ring, -j, axis=0)
            outline = np.concatenate([outline[: i + 1], ring, ring[:1], outline[i:]])
            hole = hierarchy[0][hole][0]  # the next hole of this outline
        out.append(outline.reshape(-1).astype(float).tolist())
    return out


def _polygons_in_box(ids: np.ndarray, i: int, bbox: list[float]) -> list[list[float]]:
    """``mask_polygons`` of instance ``i`` traced in its box (XYWH) and a margin of one pixel, in the image's
    coordinates: the contours of the whole-image mask, at the cost of the box."""
    x, y, w, h = (int(v) for v in bbox)
    y0, x0 = max(y - 1, 0), max(x - 1, 0)
    crop = ids[y0 : y + h + 1, x0 : x + w + 1] == i
    return [[v + (x0 if k % 2 == 0 else y0) for k, v in enumerate(p)] for p in mask_polygons(crop)]


def labels_to_coco(volume, layers, out: str | Path, tile: int = 512, slices: range | None = None,
                   val_fraction: float = 0.0, polygons: bool = False, min_area: int = 1,
                   overwrite: bool = False, z_offset: int = 0, display=None) -> dict[str, Path]:  # fmt: skip
    """Cut a volume and its label layers into image tiles plus COCO files (train.json, and val.json when
    ``val_fraction`` > 0: whole slices, evenly spaced, go to validation). Tiles are named by their slice in the
    input volume's numbering (``z_offset``: the volume slice of slice 0, a run of part of its volume).

    One annotation per instance id per tile, of the class its layer gives it; masks as RLE, or polygons for
    tools that edit them. Tiles are written in the volume's own dtype (PNG for 8/16-bit, TIFF otherwise), so
    training normalizes them exactly as ``run`` normalizes the volume; with ``display`` (a ``Normalization``), as
    8-bit PNGs stretched by it, for annotation tools that show 8-bit images only (``output_to_coco_display``). A folder that already holds a COCO set is
    refused without ``overwrite``, which removes it first: a set written over another would keep its stale images
    and val.json (validation images that are also training images)."""
    import shutil

    out = Path(out)
    check_output_folder(out)
    img_dir = out / "images"
    held = [p for p in (img_dir, out / "train.json", out / "val.json") if p.exists()]
    if held and not overwrite:
        raise UserError(f"{out} already holds a COCO set ({', '.join(p.name for p in held)}); pass --overwrite to "
                        "replace it, or choose another --out")  # fmt: skip
    names = [n for layer in layers for n in layer.class_names]
    nz, ny, nx = volume.shape
    zs = list(slices or range(nz))
    n_val = int(round(len(zs) * val_fraction))
    if val_fraction > 0 and n_val == 0:  # asked for a validation set: one slice at least, never none silently
        if len(zs) < 2:
            raise UserError(f"--val-fraction {val_fraction}: {len(zs)} slice to convert, none left to train on; "
                            "convert more slices or leave --val-fraction out")  # fmt: skip
        n_val = 1
    val_z = set(zs[len(zs) // (2 * n_val)::max(1, len(zs) // n_val)][:n_val]) if n_val else set()
    # only now, every mistake found: a refused conversion left an images/ folder that made its rerun refused too
    for p in held:
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()
    made_out = not out.exists()
    img_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _write_coco_set(volume, layers, out, img_dir, names, zs, val_z, tile, min_area, polygons, z_offset,
                               display)  # fmt: skip
    except BaseException:  # a read error or Ctrl-C halfway: no half-written set that looks like one
        shutil.rmtree(img_dir, ignore_errors=True)
        for name in ("train.json", "val.json"):
            (out / name).unlink(missing_ok=True)
        if made_out:
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write_coco_set(volume, layers, out: Path, img_dir: Path, names, zs, val_z, tile, min_area, polygons,
                    z_offset, display=None) -> dict[str, Path]:  # fmt: skip
    """``labels_to_coco``'s images and annotations, once its checks have passed."""
    from PIL import Image

    ny, nx = volume.shape[1:]
    categories = [{"id": i + 1, "name": n, "supercategory": "em"} for i, n in enumerate(names)]
    sets = {"train": {"images": [], "annotations": [], "categories": categories},
            "val": {"images": [], "annotations": [], "categories": categories}}  # fmt: skip
    tile = tile or max(ny, nx)
    suffix = ".png" if volume.dtype in (np.uint8, np.uint16) or display is not None else ".tif"
    ann_id = 0
    for z in zs:
        split = sets["val" if z in val_z else "train"]
        for y0, y1, x0, x1 in side_by_side(ny, nx, tile):
            name = f"z{z + z_offset:05d}_y{y0:05d}_x{x0:05d}{suffix}"
            image = volume.read(z, y0, y1, x0, x1)
            if display is not None:
                image = np.rint(display.apply(image)).astype(np.uint8)
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


def output_to_coco_display(output: str, volume):
    """How ``output-to-coco`` writes a run's images: None (their own pixels) for 8-bit volumes; else the stretch to
    0..255 the run gave the model (its report's, or estimated as ``run`` does), for 8-bit PNGs. Annotation tools and
    browsers show 8-bit images: a 16-bit PNG of 12-bit data showed near black (its high byte, 0-15), a TIFF tile of
    an int16 or float volume not at all. Training reads the 8-bit tiles like any (per pixel type, ``train``)."""
    import json

    from .normalize import Normalization, estimate

    if volume.dtype == np.uint8:
        return None
    try:
        said = json.loads((Path(output) / "cellseg" / "report.json").read_text())["plan"]["normalization"]
        return Normalization.fixed(said["low"], said["high"], invert=bool(said.get("invert", False)))
    except (OSError, ValueError, KeyError, TypeError):
        return estimate(volume)


def output_volume(output: str, volume_path: str | None, depth: int):
    """The image of a run's output and the volume slice its slice 0 is: its image copy, or ``volume_path`` (the
    volume it was run on: the slices the run took are cut from it)."""
    info = (group_attrs(output) or {}).get("cellseg_batch") or {}
    recorded = info.get("slices")
    first = int(recorded[0]) if isinstance(recorded, list) and len(recorded) == 2 and recorded[1] - recorded[0] == depth \
        else 0  # fmt: skip
    if volume_path is None:
        if info.get("image") is False:
            raise UserError(f"{output} holds no image copy (it was run with --no-image); pass --volume VOLUME, the "
                            "volume it was run on")  # fmt: skip
        return open_volume(output), first
    volume = open_volume(volume_path)
    if volume.shape[0] != depth and first and first + depth <= volume.shape[0]:
        volume = SliceRange(volume, first, depth)
    return volume, first
