"""Draw the pictures of docs/linking.md: the linking rule on small hand-made slices, resolved by the real code
(``cellseg_batch.link``: ``link_pair``, and ``_slice_shift``, ``_crossings``, ``_cut``, ``_leaves`` for a misaligned
section and a crossing). Run: ``python docs/make_linking_figures.py`` (writes docs/linking_*.png)."""

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
from cellseg_batch.link import (  # noqa: E402
    LinkRule,
    _crossings,
    _cut,
    _leaves,
    _paired_share,
    _Slice,
    _slice_shift,
    link_pair,
)
from cellseg_batch.stitch import FRAGMENT, contingency  # noqa: E402

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


def _as_slice(s):
    """A labelled slice as linking streams it (one fragment per instance): what ``_slice_shift`` votes with."""
    c, area = _centroids(s)
    n = len(area)
    frag = np.zeros(n, FRAGMENT)
    frag["area"], frag["sy"], frag["sx"] = area, c[:, 0] * area, c[:, 1] * area
    return _Slice(frag, np.arange(n), np.zeros(n, np.int16), area, np.ones(n), 0, np.zeros(n, bool), np.zeros(n, bool))


def _adjacent(a, b):
    """Rules 1-2 between adjacent slices a, b; where the vote finds b misaligned (``_slice_shift``), also with b moved
    back, kept where more of a's area then continues one-to-one (as ``_registered_links``). Pairs, overlaps, the
    in-place overlaps where b was moved back (else None), and the shift (or None)."""
    ia, ib, inter = _overlaps(a, b)
    (_, area_a), (_, area_b) = _centroids(a), _centroids(b)
    kinds_a, kinds_b = np.zeros(len(area_a), np.int16), np.zeros(len(area_b), np.int16)
    pairs, heal = link_pair(kinds_a, area_a, kinds_b, area_b, ia, ib, inter, 0.25, 0.5)
    shift = _slice_shift(_as_slice(a), _as_slice(b), LinkRule())
    if shift is not None:
        back = ndimage.shift(b, -shift, order=0)
        ja, jb, moved = _overlaps(a, back)
        moved_pairs, moved_heal = link_pair(kinds_a, area_a, kinds_b, area_b, ja, jb, moved, 0.25, 0.5)
        sa = _as_slice(a)
        if _paired_share(sa, moved_pairs, moved_heal) >= _paired_share(sa, pairs, heal) + 0.1:
            was = {(p, q): n for p, q, n in zip(ia, ib, inter)}
            in_place = {(p, q): was.get((p, q), 0) for p, q in zip(ja, jb)}
            return moved_pairs, (ja, jb, moved), in_place, shift
    return pairs, (ia, ib, inter), None, None


def link(slices):
    """Edges of the rule: between consecutive slices (a misaligned one moved back where the vote finds it), less those
    of crossings (``_crossings``: cut out, each a leaf of the largest instance below it), then across one missing
    slice (``None``: all of it missing) for the instances left without an edge there, each free one also tried where
    its drift from the slice before carries it (the larger overlap counts)."""
    nodes, edges, base, notes = [], [], [], []
    for s in slices:
        base.append(len(nodes))
        nodes += [] if s is None else list(range(1, int(s.max()) + 1))
    adjacent, shifts = {}, {}
    for i in range(len(slices) - 1):
        a, b = slices[i], slices[i + 1]
        if a is None or b is None:
            continue
        pairs, (ia, ib, inter), in_place, shift = _adjacent(a, b)
        adjacent[i] = np.array(pairs, np.int64).reshape(-1, 2)
        if shift is not None:
            shifts[i + 1] = shift
        (_, area_a), (_, area_b) = _centroids(a), _centroids(b)
        notes += _notes(i, i + 1, ia, ib, inter, area_a, area_b, pairs, in_place)
    cross = {k: _crossings(adjacent[k - 1], adjacent[k], int(slices[k].max())) for k in range(1, len(slices) - 1)
             if k - 1 in adjacent and k in adjacent}  # fmt: skip
    none = np.zeros(0, np.int64)
    forward, backward = set(), set()
    for i, pairs in adjacent.items():
        kept = _cut(pairs, cross.get(i, none), cross.get(i + 1, none))
        edges += [(base[i] + p, base[i + 1] + q) for p, q in kept]
        forward |= {base[i] + p for p, _ in kept} | {base[i] + p for p in cross.get(i, none)}
        backward |= {base[i + 1] + q for _, q in kept} | {base[i + 1] + q for q in cross.get(i + 1, none)}
        if len(cross.get(i + 1, none)):
            leaves = _leaves(pairs, cross[i + 1], _centroids(slices[i])[1])
            edges += [(base[i] + p, base[i + 1] + q) for p, q in leaves]
    for note in notes:  # edges cut at a crossing
        i, j, p, q = note[:4]
        if note[7] == "linked" and j == i + 1 and (p in cross.get(i, none) or q in cross.get(j, none)):
            note[7] = "linked, cut"
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
    return base, comp, notes, shifts


def _notes(i, j, ia, ib, inter, area_a, area_b, pairs, in_place=None):
    linked = {(int(p), int(q)) for p, q in pairs}
    out = []
    for p, q, n in zip(ia, ib, inter):
        was = (in_place or {}).get((p, q), n)
        moved = f" (moved; in place IoA {was / area_a[p]:.2f})" if was != n else ""
        out.append([i, j, p, q, n / (area_a[p] + area_b[q] - n), n / area_a[p], n / area_b[q],
                    "linked" if (int(p), int(q)) in linked else "not linked", moved])  # fmt: skip
    return out


def draw(name, title, slices, caption, shown=None):
    """One figure: the slices side by side, coloured by object; under them the caption and the figures of the pairs
    (``shown``: only those of instance A of the earlier slice and the one it was linked or compared to). A section
    the vote found misaligned gets the slice before it drawn in grey beneath it, and an arrow for the step."""
    base, comp, notes, shifts = link(slices)
    if shown:
        notes = [note for note in notes if note[2] == 0 and note[7] != "not linked"]
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
        moved = k in shifts and k - 1 not in shifts  # the first of a pair of steps there and back: the moved one
        if moved:
            rgb[(slices[k - 1] > 0) & (s == 0)] = 0.85
        ax.imshow(rgb, interpolation="nearest")
        if moved:
            (y, x), (dy, dx) = _centroids(slices[k - 1])[0][0], shifts[k]
            ax.annotate(
                "",
                xy=(x + dx, y + dy),
                xytext=(x, y),
                arrowprops={"arrowstyle": "->", "color": "k", "lw": 1.2, "shrinkA": 0, "shrinkB": 0},
            )
        label = f"slice z+{k}" if k else "slice z"
        ax.set_title(label + (f", moved by ({shifts[k][0]}, {shifts[k][1]})" if moved else ""), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    text = "; ".join(f"{chr(65 + p)}{i}-{chr(65 + q)}{j}: IoU {iou:.2f}, IoA {ioa:.2f}/{iob:.2f}{moved} "
                     f"{ok}" for i, j, p, q, iou, ioa, iob, ok, moved in notes)  # fmt: skip
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
    # five small objects; section z+2 lies 6 px down and 7 px right of the others (a registration error)
    spots = [(10, 10, 4), (9, 30, 5), (24, 19, 4), (35, 8, 5), (34, 31, 4)]
    moved_by = {2: (6, 7)}
    draw(
        "misaligned",
        "misaligned section: z+2 moved as a whole, linked where it lies",
        [
            slice_of(*(disc(y + moved_by.get(k, (0, 0))[0], x + moved_by.get(k, (0, 0))[1], r) for y, x, r in spots))
            for k in range(4)
        ],  # fmt: skip
        "Where they lie (grey: z+1 beneath z+2), the sections of z+2 meet nothing of their own objects. The steps "
        "between the centroids of same-sized instances vote for one translation, z+1 -> z+2 and back to z+3; counted "
        "with z+2 moved back, every object continues one-to-one. Figures: A's pairs.",
        shown="A",
    )
    # two touching tubes that the 2D model merged into one instance in z+2 (a missed boundary)
    pair = [disc(24, 15, 8), disc(24, 32, 8)]
    joined = ndimage.binary_closing(pair[0] | pair[1], np.ones((5, 5)), border_value=0) | pair[0] | pair[1]
    draw(
        "crossing",
        "crossing: two touching objects merged in one section stay two",
        [slice_of(*pair), slice_of(*pair), slice_of(joined), slice_of(*pair)],
        "Two link to A2 from below (A1 one-to-one, B1 inside it) and two from above: a crossing, cut out (else one "
        "object). It joins the largest below (A1) as a leaf; gap edges bridge A1-A3 and B1-B3 over it.",
    )


if __name__ == "__main__":
    main()
