"""Draw the pictures of docs/linking.md: the linking rule on small hand-made slices, resolved by the real code
(``cellseg_batch.link.link_pair``). Run: ``python docs/make_linking_figures.py`` (writes docs/linking_*.png)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.sparse import coo_matrix  # noqa: E402
from scipy.sparse.csgraph import connected_components  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from cellseg_batch.link import link_pair  # noqa: E402
from cellseg_batch.stitch import contingency  # noqa: E402

SIZE = 48


def disc(cy, cx, r, ry=None):
    y, x = np.mgrid[:SIZE, :SIZE]
    return ((y - cy) / (ry or r)) ** 2 + ((x - cx) / r) ** 2 <= 1


def slice_of(*masks):
    out = np.zeros((SIZE, SIZE), np.uint16)
    for i, m in enumerate(masks, 1):
        out[m & (out == 0)] = i
    return out


def link(slices, gap_from=None):
    """Edges of the rule between consecutive slices (``None``: a missing slice, bridged from the one before)."""
    nodes, edges, base = [], [], []
    for s in slices:
        base.append(len(nodes))
        nodes += [] if s is None else list(range(1, int(s.max()) + 1))
    notes = []
    for i in range(len(slices) - 1):
        a, j = slices[i], i + 1
        b = slices[j]
        if a is None:
            continue
        if b is None:  # gap: pair with the slice after the missing one
            j, b = i + 2, slices[i + 2]
        na, nb = int(a.max()), int(b.max())
        ia, ib, inter = contingency(a, b)
        area_a = np.bincount(a.ravel(), minlength=na + 1)[1:]
        area_b = np.bincount(b.ravel(), minlength=nb + 1)[1:]
        pairs, _ = link_pair(np.zeros(na, np.int16), area_a, np.zeros(nb, np.int16), area_b, ia.astype(np.int64) - 1,
                             ib.astype(np.int64) - 1, inter, 0.25, 0.5)  # fmt: skip
        for p, q in pairs:
            edges.append((base[i] + p, base[j] + q))
        for p, q, n in zip(ia - 1, ib - 1, inter):
            iou = n / (area_a[p] + area_b[q] - n)
            linked = any(e == (base[i] + p, base[j] + q) for e in edges)
            notes.append((i, j, p, q, iou, n / area_a[p], n / area_b[q], linked))
    n = len(nodes)
    e = np.array(edges, np.int64).reshape(-1, 2)
    _, comp = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)), directed=False)
    return base, comp, notes


def draw(name, title, slices, caption):
    base, comp, notes = link(slices)
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(slices), figsize=(2.0 * len(slices), 2.6))
    for k, (ax, s) in enumerate(zip(axes, slices)):
        rgb = np.ones((SIZE, SIZE, 3))
        if s is None:
            ax.text(SIZE / 2, SIZE / 2, "missed\ndetection", ha="center", va="center", fontsize=8, color="0.4")
        else:
            for i in range(1, int(s.max()) + 1):
                rgb[s == i] = colours(int(comp[base[k] + i - 1]) % 10)[:3]
                ys, xs = np.nonzero(s == i)
                ax.text(xs.mean(), ys.mean(), chr(ord("A") + i - 1) + str(k), ha="center", va="center", fontsize=7)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"slice z+{k}" if k else "slice z", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    text = "; ".join(f"{chr(65 + p)}{i}-{chr(65 + q)}{j}: IoU {iou:.2f}, IoA {ioa:.2f}/{iob:.2f} "
                     f"{'linked' if ok else 'not linked'}" for i, j, p, q, iou, ioa, iob, ok in notes)  # fmt: skip
    fig.suptitle(title, fontsize=9)
    fig.text(0.5, 0.02, caption + "\n" + text, ha="center", fontsize=6, wrap=True)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(HERE / f"linking_{name}.png", dpi=100)
    plt.close(fig)


def main():
    arm = [slice_of(disc(24, 24, 9)), slice_of(disc(24, 18, 7), disc(24, 30, 7)), slice_of(disc(24, 13, 6),
                                                                                            disc(24, 35, 6))]  # fmt: skip
    draw(
        "branch",
        "branch: one section splits into two (same colour: one object)",
        arm,
        "A1 continues A0 (best IoU, one-to-one); B1 is left unpaired and lies mostly inside A0 (IoA >= 0.5): it joins.",
    )
    draw(
        "merge",
        "merge: two sections join into one",
        arm[::-1],
        "The same rule read the other way: the unpaired section joins the one it lies mostly inside.",
    )
    tube = [slice_of(disc(24, 20 + 2 * k, 9)) for k in range(4)]
    draw(
        "gap",
        "gap: a missed detection in z+1 does not cut the object",
        [tube[0], None, tube[2], tube[3]],
        "A0 has no partner in z+1, so it is tried against z+2 (link_gap 1): IoU >= 0.25, the edge bridges the gap.",
    )
    touch = [slice_of(disc(24, 12 + 5 * k, 8), disc(24, 29 + 5 * k, 8)) for k in range(3)]  # leaning
    draw(
        "touching",
        "touching neighbours stay apart",
        touch,
        "Each section keeps its own partner (one-to-one), so the overlap with the neighbour's partner adds no edge.",
    )


if __name__ == "__main__":
    main()
