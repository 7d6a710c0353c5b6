"""Preview: a PNG of one slice with its instances drawn over it (each class its colour, each instance a shade)."""

from __future__ import annotations

import numpy as np

PALETTE = [
    (1.00, 0.85, 0.10), (0.95, 0.20, 0.20), (0.10, 0.80, 0.95), (0.30, 0.90, 0.30),
    (0.85, 0.35, 0.95), (1.00, 0.55, 0.10), (0.40, 0.50, 1.00), (0.90, 0.90, 0.90),
]  # fmt: skip


def class_colour(k: int) -> tuple[float, float, float]:
    """The colour of the ``k``-th class (RGB in 0..1): the same in the preview, the report and the viewers."""
    return PALETTE[k % len(PALETTE)]


def class_colour_hex(k: int) -> str:
    """``class_colour(k)`` as ``#rrggbb``."""
    return "#" + "".join(f"{round(255 * c):02x}" for c in class_colour(k))


def render(image: np.ndarray, layers: dict[str, np.ndarray], path, title: str = ""):
    """Draw ``layers`` (class -> 2D ids) over a greyscale ``image``; fills faint, outlines solid; a legend above and
    ``title`` below; a PNG at ``path`` (a file name or a binary file object, returned as given). Pillow only
    (matplotlib's import alone took longer than the whole drawing)."""
    from PIL import Image, ImageDraw

    img = image.astype(np.float32)
    finite = np.isfinite(img)  # a float volume's NaN (no data) is drawn black, +inf white: as the model saw them
    lo, hi = np.percentile(img[finite], (1, 99.5)) if finite.any() else (0, 1)
    grey = np.clip(np.where(np.isnan(img), 0, (np.nan_to_num(img, nan=0.0) - lo) / max(hi - lo, 1e-9)), 0, 1)
    rgb = np.repeat(grey[..., None].astype(np.float32), 3, axis=2)
    legend = []
    for k, (name, ids) in enumerate(layers.items()):
        colour = np.array(class_colour(k))
        inside = ids > 0
        # per-instance shade so that touching instances of one class stay distinguishable
        shade = 0.6 + 0.4 * ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1000)).astype(np.float32) / 1000
        rgb[inside] = 0.65 * rgb[inside] + 0.35 * colour * shade[inside][:, None]
        rgb[_inner_boundaries(ids)] = colour
        legend.append((f"{name} ({len(np.unique(ids[inside]))})", colour))
    h, w = grey.shape
    # small slices are drawn larger, so outlines stay visible; from ~510 px on, as they are (the report's gallery
    # pictures, 512 px: twice as large they were a 4x larger PNG for a 420 px figure)
    zoom = max(1, round(640 / max(h, w, 1)))
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8)).resize((w * zoom, h * zoom), Image.NEAREST)
    band = 24  # pixels for the legend above and the caption below
    canvas = Image.new("RGB", (w * zoom, h * zoom + 2 * band), "white")
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    x = 6
    for label, colour in legend:
        draw.rectangle([x, 7, x + 10, 17], fill=tuple(int(255 * c) for c in colour))
        draw.text((x + 14, 6), label, fill="black")
        x += 24 + int(draw.textlength(label))
    if title:
        draw.text((6, h * zoom + band + 6), title, fill="black")
    # zlib level 1: on a 1024² slice of the labels benchmark, 0.21 s against 1.07 s at Pillow's default (6), and
    # a smaller file (1.48 against 1.55 MB): noisy EM does not compress better for trying harder
    canvas.save(path, format="PNG", compress_level=1)
    return path


def _inner_boundaries(ids: np.ndarray) -> np.ndarray:
    """Labelled pixels with a 4-neighbour of another id (or background): the instances' outlines, drawn inside."""
    edge = np.zeros(ids.shape, bool)
    if ids.ndim != 2 or min(ids.shape) < 2:
        return ids > 0
    edge[1:] |= ids[1:] != ids[:-1]
    edge[:-1] |= ids[:-1] != ids[1:]
    edge[:, 1:] |= ids[:, 1:] != ids[:, :-1]
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    return edge & (ids > 0)


def render_output(output, path, z: int | None = None, max_size: int = 1024):
    """The preview of a written OME-Zarr output: slice ``z`` (default the middle one) at the first pyramid level
    that fits ``max_size``, or the top level's every n-th pixel where none does; without an image copy, the labels
    are drawn on black."""
    info = output.info
    nz = info["shape"][0]
    z = nz // 2 if z is None else z
    level = 0
    while level < info["levels"] - 1 and max(output.labels(info["classes"][0], level).shape[1:]) > max_size:
        level += 1
    # a pyramid stops at its chunk size (1024 px by default): a 512 px gallery picture from it takes every 2nd pixel
    # (0.27 against ~0.1 s to draw, a quarter of the PNG)
    step = -(-max(output.labels(info["classes"][0], level).shape[1:]) // max_size)
    layers = {name: np.asarray(output.labels(name, level)[z])[::step, ::step] for name in info["classes"]}
    shape = next(iter(layers.values())).shape
    image = np.asarray(output.image(level)[z])[::step, ::step] if info["image"] else np.zeros(shape)
    where = f"level {level}" + (f", 1 pixel in {step}" if step > 1 else "")
    return render(image, layers, path, title=f"{output.path.name}: slice {z}, {where}")
