"""3D linking quality: the link rule before (adjacent slices only, as on main) and after (graph with gap bridging),
beside Cellpose's ``stitch3D`` (default threshold 0.25) run on the same 2D instances, on synthetic linking cases
(branches, touching neighbours, misaligned slices, missed detections) and on real EM data where any has 3D truth.

Usage: ``python benchmarks/bench_linking.py`` (``--real``: real 2D shapes under the faults of model output and
acquisitions, ``real_faults``; ``--real --only moved linking_real_moved.json``: only the faults whose names hold one
of the words, into that results file; cellpose, where wanted, from ``CELLPOSE_PATH``, e.g. a folder made by
``pip install --no-deps --target DIR cellpose fill-voids opencv-python-headless``). Writes
``results/linking.json``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import SHARED_DATA  # noqa: E402

from cellseg_batch.evaluate import evaluate  # noqa: E402
from cellseg_batch.read import ArrayVolume  # noqa: E402
from cellseg_batch.synth import LINK_CLASSES, write_linking_cases  # noqa: E402

SCENARIOS = {  # name: (shape, seed, dropout, shift)
    "branches+touching": ((24, 480, 480), 11, 0.0, 0.0),
    "dropout 5%": ((24, 480, 480), 12, 0.05, 0.0),
    "dropout 10%": ((24, 480, 480), 13, 0.10, 0.0),
    "shifted slices 20% + dropout 5%": ((24, 480, 480), 14, 0.05, 0.2),
    "dropout 5%, the test's volume": ((24, 640, 640), 1, 0.05, 0.0),  # tests/test_linking.py
    "shifted slices 20% + dropout 10%": ((24, 640, 640), 15, 0.10, 0.2),
}
KEYS = ("n_pred", "n_gt", "f1@0.5", "f1@0.5:0.95", "vi_split", "vi_merge")


def stitch3d():
    path = os.environ.get("CELLPOSE_PATH")
    if path:
        sys.path.insert(0, path)
    try:
        from cellpose.utils import stitch3D

        return stitch3D
    except ImportError as e:
        return str(e)


BASE = os.environ.get("BASE_REF", "04dad6e")  # main when the graph linking began: the rule before
DRIFT_BASE = os.environ.get("DRIFT_BASE_REF", "b101352")  # gap edges without drift, the last commit before it


def base_checkout(tmp: Path, ref: str) -> Path:
    """The package as of ``ref``, exported (git archive) to run in a subprocess."""
    out = tmp / f"base-{ref}"
    out.mkdir()
    archive = subprocess.run(["git", "-C", str(HERE.parent), "archive", ref, "cellseg_batch"], check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def pipeline(paths: dict, out: Path, gap: int | None, base: Path | None = None) -> tuple[dict, dict]:
    """The labels predictor through ``run``: this branch's package (link_gap ``gap``), or ``base``'s (before)."""
    import zarr

    args = ["run", paths["volume"], "--predictor", "labels", "--labels", paths["detections"], "--classes",
            paths["classes"], "--tile", 256, "--overlap", 16, "--no-progress", "--overwrite", "--out", out]  # fmt: skip
    if gap is not None:
        args += ["--link-gap", gap]
    root = base or HERE.parent  # run from there too: ``-m`` puts the working directory first on sys.path
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run([sys.executable, "-c", "import cellseg_batch, sys; print(cellseg_batch.__file__); "
                           "from cellseg_batch.cli import main; sys.exit(main(sys.argv[1:]))", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=root)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(root)), f"ran {proc.stdout.splitlines()[0]}, not the package in {root}"
    report = json.loads((out / "cellseg" / "report.json").read_text())
    link = next(s for s in report["stages"] if s["name"] == "link")
    return {c: np.asarray(zarr.open_array(str(out / "labels" / c / "0"), mode="r")[:]) for c in LINK_CLASSES}, link


def scores(pred: dict, truth: dict) -> dict:
    r = evaluate({c: ArrayVolume(pred[c]) for c in pred}, {c: ArrayVolume(truth[c]) for c in truth})
    return {c: {k: r["classes"][c][k] for k in KEYS} for c in LINK_CLASSES} | {"mean": {k: r["mean"][k] for k in KEYS}}


def main() -> None:
    import tifffile
    import zarr

    peer = stitch3d()
    results = {"peer": "cellpose.utils.stitch3D(stitch_threshold=0.25)" if callable(peer) else f"unavailable: {peer}"}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"before": (None, base_checkout(Path(tmp), BASE)),
                "gap 2, no drift": (None, base_checkout(Path(tmp), DRIFT_BASE))}  # fmt: skip
        runs |= {"after, gap 0": (0, None), "after, gap 1": (1, None), "after, gap 2 (default)": (2, None)}
        results["before"] = f"the package at {BASE} (git archive), same pipeline and options"
        results["gap 2, no drift"] = f"the package at {DRIFT_BASE} (gap edges without drift), default options"
        for name, (shape, seed, dropout, shift) in SCENARIOS.items():
            paths = write_linking_cases(Path(tmp) / f"s{seed}", shape, seed, dropout, shift)
            truth = {c: np.asarray(zarr.open_array(str(paths["truth"] / "labels" / c / "0"), mode="r")[:])
                     for c in LINK_CLASSES}  # fmt: skip
            row = {"shape": shape, "seed": seed, "dropout": dropout, "shift": shift}
            for i, (label, (gap, base)) in enumerate(runs.items()):
                pred, link = pipeline(paths, Path(tmp) / f"out{seed}_{i}.zarr", gap, base)
                row[label] = scores(pred, truth) | {"link_stage_s": link["seconds"]}
            if callable(peer):
                det = tifffile.imread(paths["detections"])
                classes = json.loads(paths["classes"].read_text())
                pred = {}
                t = time.perf_counter()
                for c in LINK_CLASSES:  # stitch3D is class-blind: one class at a time, as a user would
                    ids = np.array([int(k) for k, v in classes.items() if v == c] or [0])
                    lut = np.zeros(int(det.max()) + 1, np.uint32)
                    lut[ids] = np.arange(1, len(ids) + 1)
                    masks = lut[det]
                    pred[c] = np.stack(peer(masks.copy(), stitch_threshold=0.25)).astype(np.uint32)
                row["cellpose stitch3D"] = scores(pred, truth) | {"seconds": round(time.perf_counter() - t, 3)}
            results[name] = row
            print(name, json.dumps({k: v["mean"] for k, v in row.items() if isinstance(v, dict)}), flush=True)
    results["real_data"] = real_data()
    out = HERE / "results" / "linking.json"
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print("wrote", out)


def gap_cost(shape=(24, 1024, 1024)) -> dict:
    """What gap edges cost the link stage: a synthetic platelet volume (dense cells and organelles) through the
    labels predictor with 256 px tiles, link_gap 0, 2, and 2 but 0 for cells (which the generator stacks one empty
    slice apart); with the objects' F1 (the truth is exact, so any change is a wrong join)."""
    out = {"volume": "synth:{}x{}x{},seed=3".format(*shape), "tile": 256}
    with tempfile.TemporaryDirectory() as tmp:
        for i, gap in enumerate(("0", "2", "cell=0,2")):
            args = ["run", out["volume"], "--predictor", "labels", "--labels", out["volume"], "--tile", 256,
                    "--overlap", 32, "--no-progress", "--link-gap", gap, "--out", Path(tmp) / f"g{i}.zarr"]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
            subprocess.run([sys.executable, "-m", "cellseg_batch", *map(str, args)], check=True, capture_output=True,
                           env=env, cwd=HERE.parent)  # fmt: skip
            pred = Path(tmp) / f"g{i}.zarr"
            report = json.loads((pred / "cellseg" / "report.json").read_text())
            from cellseg_batch.evaluate import evaluate_paths

            f1 = {c: r["f1@0.5"] for c, r in evaluate_paths(str(pred), out["volume"])["classes"].items()}
            link = next(s for s in report["stages"] if s["name"] == "link")
            c = report["counts"]
            out[f"gap {gap}"] = {"link_stage_s": link["seconds"], "link_driver_cpu_s": link["driver_cpu_s"],
                                 "gap_seconds": c.get("gap_seconds"), "gap_tiles_read": c.get("gap_tiles_read"),
                                 "tiles": c["tiles"], "instances_2d": c["instances_2d"], "objects": c["objects"],
                                 "z_links_gap": c.get("z_links_gap"), "f1@0.5": f1}  # fmt: skip
    return out


def real_data() -> str:
    """Real EM volumes with 3D ground truth in the shared data folder, if any."""
    root = SHARED_DATA
    if not root.exists():
        return f"skipped: no shared data at {root}"
    found = []
    for src in sorted(root.glob("*/SOURCE.md")):
        text = src.read_text().lower()
        if "no 3d linking" in text or "one slice" in text:
            continue
        found.append(src.parent.name)
    if not found:
        return (
            f"skipped: none of {sorted(p.name for p in root.iterdir())} has 3D instance truth (isbi2012: 2D "
            "instances only, no 3D linking; platelet-em-24-z0: one slice)"
        )
    return f"not run: {found} need a loader here"


# --real: the linking of real 2D shapes under the faults of real model output and acquisitions (see main's docstring)


def per_slice(labels: np.ndarray) -> np.ndarray:
    """Each slice's 4-connected pieces of each id as its own 2D instance, ids unique over the stack."""
    from skimage.measure import label

    out, top = np.zeros(labels.shape, np.uint32), 0
    for z, sl in enumerate(labels):
        pieces = label(sl, background=0, connectivity=1).astype(np.uint32)
        out[z] = np.where(pieces > 0, pieces + top, 0)
        top += int(pieces.max())
    return out


def platelet_3d(nz: int = 24, seed: int = 0) -> np.ndarray:
    """3D truth from the real platelet slice's organelles (its 2D shapes; its 1-5 px specks left out): each runs
    through a random run of slices (some cut by the volume's ends), shrinks towards its ends, and moves 0-2.5 px a
    slice on its own heading; larger ones are drawn first (a smaller one in front where they meet)."""
    import tifffile
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    section = tifffile.imread(SHARED_DATA / "platelet-em-24-z0" / "labels.tif")[0]
    h, w = section.shape
    truth = np.zeros((nz, h, w), np.uint32)
    areas = np.bincount(section.ravel())
    for i in sorted(np.flatnonzero(areas[1:] >= 20) + 1, key=lambda i: -areas[i]):
        ys, xs = np.nonzero(section == i)
        cy, cx = ys.mean(), xs.mean()
        length, centre = int(rng.integers(5, nz + 8)), rng.uniform(-2, nz + 1)
        speed, heading = rng.uniform(0, 2.5), rng.uniform(0, 2 * np.pi)
        for z in range(max(round(centre - length / 2), 0), min(round(centre + length / 2), nz)):
            t = (z - centre) / max(length / 2, 1)
            size = max(1 - t * t, 0.0) ** 0.25
            if size < 0.35:
                continue
            yy = np.clip(np.rint(cy + (ys - cy) * size + speed * np.sin(heading) * (z - centre)), 0, h - 1)
            xx = np.clip(np.rint(cx + (xs - cx) * size + speed * np.cos(heading) * (z - centre)), 0, w - 1)
            mask = np.zeros((h, w), bool)
            mask[yy.astype(int), xx.astype(int)] = True
            truth[z][ndimage.binary_closing(mask) if size < 1 else mask] = i
    return truth


def moved(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """A 2D array translated by (dy, dx), zeros shifted in."""
    out = np.zeros_like(a)
    h, w = a.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = a[max(-dy, 0) : h - max(dy, 0),
                                                                      max(-dx, 0) : w - max(dx, 0)]  # fmt: skip
    return out


def faults(n: int, seed: int = 100) -> dict:
    """name -> fault(det, truth) -> (det, truth): the 2D instances as a model would miss, split, merge or add them,
    and the sections as an acquisition would lose, repeat or misalign them (truth moved alike)."""
    from scipy import ndimage

    m = n // 2

    def rng(k):
        return np.random.default_rng(seed + k)

    def sections(fn):  # a fault of whole sections: det and truth alike
        return lambda d, t: (per_slice(fn(d)), fn(t))

    def per_instance(d, fn):
        out = d.copy()
        for z in range(len(d)):
            fn(out[z], z)
        return per_slice(out)

    def blank(zs):
        return lambda d, t: (np.where(np.isin(np.arange(len(d)), zs)[:, None, None], 0, d), t)

    def shift(z, dy, dx):
        return sections(lambda a: np.concatenate([a[:z], moved(a[z], dy, dx)[None], a[z + 1 :]]))

    def drop(share, k, zs=None):  # of all 2D instances, or of those of the slices ``zs``
        def fn(d, t):
            ids = np.unique(d if zs is None else d[zs])[1:]
            return np.where(np.isin(d, rng(k).choice(ids, round(share * len(ids)), replace=False)), 0, d), t

        return fn

    def both(first, then):
        return lambda d, t: then(*first(d, t))

    def split(d, t):  # a tenth of the instances of 60 px or more cut across their long axis
        top = [int(d.max()) + 1]

        def cut(sl, z):
            for i, box in enumerate(ndimage.find_objects(sl)):
                ys, xs = np.nonzero(sl[box] == i + 1) if box else ((), ())
                if box is None or r.random() >= 0.1 or len(ys) < 60:
                    continue
                axis = np.linalg.eigh(np.cov(np.stack([ys, xs])))[1][:, -1]
                along = (ys - ys.mean()) * axis[0] + (xs - xs.mean()) * axis[1]
                sl[box][ys[along > 0.5], xs[along > 0.5]] = top[0]
                sl[box][ys[np.abs(along) <= 0.5], xs[np.abs(along) <= 0.5]] = 0
                top[0] += 1

        r = rng(4)
        return per_instance(d, cut), t

    def merge(d, t):  # a tenth of the instances merged with a neighbour within 3 px, the gap filled
        def join(sl, z):
            done = set()
            for i in r.permutation(np.unique(sl)[1:]):
                if i in done or r.random() >= 0.1:
                    continue
                near = ndimage.binary_dilation(sl == i, iterations=3)
                other = [j for j in np.unique(sl[near]) if j not in done and j not in (0, i)]
                if other:
                    sl[(sl == other[0]) | (near & ndimage.binary_dilation(sl == other[0], iterations=3) & (sl == 0))] = i  # fmt: skip
                    done |= {i, other[0]}

        r = rng(5)
        return per_instance(d, join), t

    def specks(d, t):  # 10 false discs of radius 2-4 px a slice, in the background
        top = [int(d.max()) + 1]

        def add(sl, z):
            yy, xx = np.mgrid[: sl.shape[0], : sl.shape[1]]
            for _ in range(10):
                cy, cx, rad = r.integers(0, sl.shape[0]), r.integers(0, sl.shape[1]), r.integers(2, 5)
                sl[((yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad) & (sl == 0)] = top[0]
                top[0] += 1

        r = rng(6)
        return per_instance(d, add), t

    def grow(px):  # every instance eroded (px < 0) or grown into the background
        def fn(sl, z):
            if px < 0:
                size = 2 * -px + 1
                sl[(ndimage.maximum_filter(sl, size) != sl) | (ndimage.minimum_filter(sl, size) != sl)] = 0
            for _ in range(max(px, 0)):
                sl[:] = np.where(sl > 0, sl, ndimage.grey_dilation(sl, footprint=ndimage.generate_binary_structure(2, 1)))  # fmt: skip

        return lambda d, t: (per_instance(d, fn), t)

    jitter = rng(1).integers(-4, 5, (n, 2))
    two_moved = both(shift(m, 8, -6), shift(m + 1, 8, -6))
    slow = sections(lambda a: np.stack([moved(s, round(0.8 * z), round(0.6 * z)) for z, s in enumerate(a)]))
    jittered = sections(lambda a: np.stack([moved(s, *map(int, jitter[z])) for z, s in enumerate(a)]))
    return {
        "clean": lambda d, t: (d, t),
        "1 section missing": blank([m]),
        "2 adjacent sections missing": blank([m, m + 1]),
        "a section imaged twice": sections(lambda a: np.concatenate([a[: m + 1], a[m : m + 1], a[m + 1 :]])),
        "a section moved 5 px": shift(m, 3, -4),
        "a section moved 10 px": shift(m, 8, -6),
        "a section moved 20 px": shift(m, 16, -12),
        # a section that registered badly beside missed detections (a real stack has both): gap edges to realign
        "a section moved 10 px, 10% missed before it": both(drop(0.10, 7, [m - 1]), shift(m, 8, -6)),
        "2 sections moved 10 px, 10% missed before them": both(drop(0.10, 8, [m - 1]), two_moved),
        "slow drift (1 px a section)": slow,
        "every section moved by up to 4 px": jittered,
        "5% of 2D instances missed": drop(0.05, 2),
        "20% of 2D instances missed": drop(0.20, 3),
        "10% split in two": split,
        "10% merged with a neighbour": merge,
        "false specks (10 a section)": specks,
        "eroded by 2 px": grow(-2),
        "grown by 2 px": grow(2),
        "every 2nd section": sections(lambda a: a[::2]),
        "every 3rd section": sections(lambda a: a[::3]),
    }


def stitch3d_or_copy():
    """Cellpose's stitch3D where cellpose imports, else the same lines re-implemented here (cellpose 3-4's, with its
    reset of the id counter after an empty section)."""
    peer = stitch3d()
    if callable(peer):
        return peer, "cellpose.utils.stitch3D"

    def copy(masks, stitch_threshold=0.25):
        masks = masks.astype(np.int64)
        top = masks[0].max()
        for i in range(len(masks) - 1):
            a, b = masks[i + 1], masks[i]
            overlap = np.zeros((a.max() + 1, b.max() + 1))
            np.add.at(overlap, (a.ravel(), b.ravel()), 1)
            with np.errstate(invalid="ignore"):
                iou = overlap / (overlap.sum(1, keepdims=True) + overlap.sum(0, keepdims=True) - overlap)
            iou = np.nan_to_num(iou)[1:, 1:]
            if not iou.size:
                top = masks[i + 1].max()
                continue
            iou[iou < stitch_threshold] = 0.0
            iou[iou < iou.max(axis=0)] = 0.0
            new = iou.max(axis=1) == 0.0
            lut = np.append(0, iou.argmax(axis=1) + 1)
            lut[1:][new] = np.arange(top + 1, top + new.sum() + 1)
            top += new.sum()
            masks[i + 1] = lut[masks[i + 1]]
        return masks

    return copy, "stitch3D re-implemented (cellpose not importable)"


def run_stack(det: np.ndarray, out: Path, base: Path | None = None, extra: tuple = ()) -> np.ndarray:
    """One class of 2D instances through ``run --predictor labels`` (256 px tiles, then the options ``extra``): this
    checkout, or ``base``."""
    import tifffile
    import zarr

    out.mkdir(parents=True)
    tifffile.imwrite(out / "det.tif", det)
    tifffile.imwrite(out / "vol.tif", np.where(det > 0, 60, 200).astype(np.uint8))
    root = base or HERE.parent
    args = ["run", out / "vol.tif", "--predictor", "labels", "--labels", out / "det.tif", "--classes", "obj", "--tile",
            256, "--overlap", 16, "--no-progress", "--no-image", "--out", out / "out.zarr", *extra]  # fmt: skip
    subprocess.run([sys.executable, "-c", "import sys; from cellseg_batch.cli import main; sys.exit(main(sys.argv[1:]))",
                    *map(str, args)], check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(root)},
                   cwd=root)  # fmt: skip
    return np.asarray(zarr.open_array(str(out / "out.zarr" / "labels" / "obj" / "0"), mode="r")[:])


def real_faults(only: list[str] | None = None) -> dict:
    """``--real``: the platelet slice's organelles as 3D objects (``platelet_3d``), each fault of ``faults`` alone,
    linked by this checkout and by the package at ``REAL_BASE_REF`` (default: the last commit before the rules for
    misaligned sections and crossings), F1@0.5 and VI against the truth; beside stitch3D and the best any linking
    can do with those 2D instances (each takes the truth id most of its pixels have). The ISBI ssTEM stack has no
    3D truth: its clean 2D instances are linked and how much of its volume the largest objects hold is reported.
    ``only``: just the faults whose names hold one of these (no ISBI). ``REAL_AFTER_ARGS``: options of this
    checkout's runs (e.g. ``--min-slices auto``), recorded."""
    if not (SHARED_DATA / "platelet-em-24-z0").exists():
        return {"skipped": f"no shared data at {SHARED_DATA}"}
    peer, peer_name = stitch3d_or_copy()
    truth = platelet_3d()
    det = per_slice(truth)
    ref = os.environ.get("REAL_BASE_REF", "ba94679")
    extra = tuple(os.environ.get("REAL_AFTER_ARGS", "").split())
    out = {"truth": "platelet-em-24-z0's organelles, platelet_3d(24, seed 0)", "before": ref, "peer": peer_name,
           "after_options": " ".join(extra)}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        base = base_checkout(Path(tmp), ref)
        for k, (name, fault) in enumerate(faults(len(truth)).items()):
            if only and not any(part in name for part in only):
                continue
            d, t = fault(det, truth)
            m = d > 0
            pairs, counts = np.unique(np.stack([d[m], t[m]]), axis=1, return_counts=True)
            order = np.lexsort((-counts, pairs[0]))
            best = np.zeros(int(d.max()) + 1, np.uint32)
            best[pairs[0][order][::-1]] = pairs[1][order][::-1]  # the last write of each id: its largest share
            row = {"before": run_stack(d, Path(tmp) / f"b{k}", base), "after": run_stack(d, Path(tmp) / f"a{k}", extra=extra),
                   "stitch3D": np.asarray(peer(d.copy(), stitch_threshold=0.25)).astype(np.uint32),
                   "best possible": best[d]}  # fmt: skip
            out[name] = {label: one_class(pred, t) for label, pred in row.items()}
            print(name, json.dumps({label: r["f1@0.5"] for label, r in out[name].items()}), flush=True)
        isbi = SHARED_DATA / "isbi2012-drosophila-sstem" / "labels.tif"
        if isbi.exists() and not only:
            import tifffile

            det = per_slice(tifffile.imread(isbi)[:, :384, :384])
            out["isbi2012 (no 3D truth)"] = {label: dense_proxies(det, pred) for label, pred in (
                ("before", run_stack(det, Path(tmp) / "ib", base)), ("after", run_stack(det, Path(tmp) / "ia", extra=extra)),
                ("stitch3D", np.asarray(peer(det.copy(), stitch_threshold=0.25))))}  # fmt: skip
    return out


def one_class(pred: np.ndarray, truth: np.ndarray) -> dict:
    r = evaluate({"obj": ArrayVolume(pred)}, {"obj": ArrayVolume(truth)})["classes"]["obj"]
    return {k: r[k] for k in KEYS}


def dense_proxies(det: np.ndarray, pred: np.ndarray) -> dict:
    """Without 3D truth: objects, 2D instances that share their object with another of their slice (merges, where
    objects do not branch), and the share of the volume the 5 largest objects hold."""
    shared = 0
    for d, p in zip(det, pred):
        pairs = np.unique(np.stack([p[d > 0], d[d > 0]]), axis=1)
        shared += len(pairs[0]) - len(np.unique(pairs[0]))
    sizes = np.bincount(pred.ravel())[1:]
    return {"objects": int((sizes > 0).sum()), "2d_instances": int(len(np.unique(det)) - 1),
            "sharing_a_slice": shared, "top5_share": round(float(np.sort(sizes)[-5:].sum() / sizes.sum()), 3)}  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--real"]:  # --real [--only NAME-PART ... OUT.json]: some faults, into results/OUT.json
        only = sys.argv[3:-1] if sys.argv[2:3] == ["--only"] else None
        path = HERE / "results" / (sys.argv[-1] if only else "linking_real.json")
        path.write_text(json.dumps(real_faults(only), indent=1, default=str) + "\n")
        print("wrote", path)
    elif sys.argv[1:] == ["--cost"]:
        cost = gap_cost()
        path = HERE / "results" / "linking_gap_cost.json"
        path.write_text(json.dumps(cost, indent=1) + "\n")
        print(json.dumps(cost, indent=1))
    else:
        main()
