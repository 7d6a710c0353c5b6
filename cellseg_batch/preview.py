"""Preview: a PNG of one slice with its instances drawn over it (each class its colour, each instance a shade)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PALETTE = [
    (1.00, 0.85, 0.10), (0.95, 0.20, 0.20), (0.10, 0.80, 0.95), (0.30, 0.90, 0.30),
    (0.85, 0.35, 0.95), (1.00, 0.55, 0.10), (0.40, 0.50, 1.00), (0.90, 0.90, 0.90),
]  # fmt: skip


def render(image: np.ndarray, layers: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Draw ``layers`` (class -> 2D ids) over a greyscale ``image``; fills faint, outlines solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from skimage.segmentation import find_boundaries

    img = image.astype(np.float64)
    lo, hi = np.percentile(img, (1, 99.5)) if img.size else (0, 1)
    grey = np.clip((img - lo) / max(hi - lo, 1e-9), 0, 1)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    handles = []
    for k, (name, ids) in enumerate(layers.items()):
        colour = np.array(PALETTE[k % len(PALETTE)])
        inside = ids > 0
        # per-instance shade so that touching instances of one class stay distinguishable
        shade = 0.6 + 0.4 * ((ids.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1000)).astype(np.float64) / 1000
        rgb[inside] = 0.65 * rgb[inside] + 0.35 * colour * shade[inside][:, None]
        edge = find_boundaries(ids, mode="inner") & inside
        rgb[edge] = colour
        handles.append(Patch(color=colour, label=f"{name} ({len(np.unique(ids[inside]))})"))
    h, w = grey.shape
    zoom = max(1.0, 640 / max(h, w))  # small slices are drawn larger, so outlines stay visible
    band = 40  # pixels for the legend above and the caption below
    fig = plt.figure(figsize=(w * zoom / 100, (h * zoom + 2 * band) / 100), dpi=100)
    ax = fig.add_axes([0, band / (h * zoom + 2 * band), 1, h * zoom / (h * zoom + 2 * band)])
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=min(4, len(handles)), fontsize=8, frameon=False)
    if title:
        fig.text(0.01, 0.01, title, fontsize=8)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def render_output(output, path: str | Path, z: int | None = None, max_size: int = 1024) -> Path:
    """The preview of a written OME-Zarr output: slice ``z`` (default the middle one) at the first pyramid level
    that fits ``max_size``; without an image copy, the labels are drawn on black."""
    info = output.info
    nz = info["shape"][0]
    z = nz // 2 if z is None else z
    level = 0
    while level < info["levels"] - 1 and max(output.labels(info["classes"][0], level).shape[1:]) > max_size:
        level += 1
    layers = {name: np.asarray(output.labels(name, level)[z]) for name in info["classes"]}
    shape = next(iter(layers.values())).shape
    image = np.asarray(output.image(level)[z]) if info["image"] else np.zeros(shape)
    return render(image, layers, path, title=f"{output.path.name}: slice {z}, level {level}")
