"""Draw the pictures of docs/linking.md: the linking rule on small hand-made slices, resolved by the real code
(``cellseg_batch.link.link_pair``). Run: ``python docs/make_linking_figures.py`` (writes docs/linking_*.png)."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402
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


def _overlaps(a, b):
    ia, ib, inter = contingency(a, b)
    return ia.astype(np.int64) - 1, ib.astype(np.int64) - 1, inter


def _centroids(s):
    ys, xs = np.mgrid[:SIZE, :SIZE]
    area = np.bincount(s.ravel(), minlength=int(s.max()) + 1)[1:]
    return np.stack([np.bincount(s.ravel(), weights=g.ravel())[1:] / area for g in (ys, xs)], axis=1), area


def link(slices):
    """Edges of the rule: between consecutive slices, then across one missing slice (``None``: all of it missing)
    for the instances left without an edge there, each free one also tried where its drift from the slice before
    carries it (the larger overlap counts)."""
    nodes, edges, base, notes = [], [], [], []
    for s in slices:
        base.append(len(nodes))
        nodes += [] if s is None else list(range(1, int(s.max()) + 1))
    forward, backward = set(), set()
    for i in range(len(slices) - 1):
        a, b = slices[i], slices[i + 1]
        if a is None or b is None:
            continue
        ia, ib, inter = _overlaps(a, b)
        (_, area_a), (_, area_b) = _centroids(a), _centroids(b)
        pairs, _ = link_pair(np.zeros(len(area_a), np.int16), area_a, np.zeros(len(area_b), np.int16), area_b, ia, ib,
                             inter, 0.25, 0.5)  # fmt: skip
        edges += [(base[i] + p, base[i + 1] + q) for p, q in pairs]
        forward |= {base[i] + p for p, _ in pairs}
        backward |= {base[i + 1] + q for _, q in pairs}
        notes += _notes(i, i + 1, ia, ib, inter, area_a, area_b, pairs)
    for i in range(len(slices) - 2):
        a, b = slices[i], slices[i + 2]
        if a is None or b is None:
            continue
        (c_a, area_a), (_, area_b) = _centroids(a), _centroids(b)
        free_a = np.array([base[i] + p not in forward for p in range(len(area_a))])
        free_b = np.array([base[i + 2] + q not in backward for q in range(len(area_b))])
        if not (free_a.any() or free_b.any()):
            continue
        ia, ib, inter = _overlaps(a, b)
        best = {(p, q): n for p, q, n in zip(ia, ib, inter)}
        in_place = dict(best)
        if i > 0 and slices[i - 1] is not None:  # drift: the step to its partners in the slice before, carried on
            c_prev, area_prev = _centroids(slices[i - 1])
            for p in np.flatnonzero(free_a):
                prev = [e[0] - base[i - 1] for e in edges if e[1] == base[i] + p and e[0] >= base[i - 1]]
                if not prev:
                    continue
                drift = np.average(c_prev[prev], axis=0, weights=area_prev[prev]) - c_a[p]
                moved = ndimage.shift((a == p + 1).astype(np.uint8), np.rint(-2 * drift), order=0)
                for _, q, n in zip(*_overlaps(moved, b)):
                    best[(p, q)] = max(best.get((p, q), 0), n)
        ia, ib = (np.array([k[j] for k in best], np.int64) for j in (0, 1))
        inter = np.array(list(best.values()), np.int64)
        pairs, _ = link_pair(np.zeros(len(area_a), np.int16), area_a, np.zeros(len(area_b), np.int16), area_b, ia, ib,
                             inter, 0.25, 0.5, free_a=free_a, free_b=free_b)  # fmt: skip
        edges += [(base[i] + p, base[i + 2] + q) for p, q in pairs]
        keep = free_a[ia] | free_b[ib]
        notes += _notes(i, i + 2, ia[keep], ib[keep], inter[keep], area_a, area_b, pairs, in_place)
    n = len(nodes)
    e = np.array(edges, np.int64).reshape(-1, 2)
    _, comp = connected_components(coo_matrix((np.ones(len(e)), (e[:, 0], e[:, 1])), shape=(n, n)), directed=False)
    return base, comp, notes


def _notes(i, j, ia, ib, inter, area_a, area_b, pairs, in_place=None):
    linked = {(int(p), int(q)) for p, q in pairs}
    out = []
    for p, q, n in zip(ia, ib, inter):
        was = (in_place or {}).get((p, q), n)
        moved = f" (moved; in place IoA {was / area_a[p]:.2f})" if was != n else ""
        out.append((i, j, p, q, n / (area_a[p] + area_b[q] - n), n / area_a[p], n / area_b[q],
                    (int(p), int(q)) in linked, moved))  # fmt: skip
    return out


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
    text = "; ".join(f"{chr(65 + p)}{i}-{chr(65 + q)}{j}: IoU {iou:.2f}, IoA {ioa:.2f}/{iob:.2f}{moved} "
                     f"{'linked' if ok else 'not linked'}" for i, j, p, q, iou, ioa, iob, ok, moved in notes)  # fmt: skip
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
    # two arms closing in on each other, 4 px a slice; the left one is missed in the slice before they join
    arms = [slice_of(disc(20, 8 + 4 * k, 5), disc(28, 40 - 4 * k, 5)) for k in range(3)]
    draw(
        "drift",
        "gap with drift: an arm missed just before it joins its sibling",
        [arms[0], arms[1], slice_of(disc(28, 32, 5)), slice_of(disc(24, 24, 11, 7))],
        "A1 has no partner in z+2; where it lies, it hardly meets A3 (IoA < 0.5), but moved on by its drift from z "
        "(2 slices x 4 px) it lies inside A3: it joins. Figures: the larger overlap of the two.",
    )


if __name__ == "__main__":
    main()
