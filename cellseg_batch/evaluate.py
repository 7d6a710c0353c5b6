"""Evaluate: score predicted instance labels against ground truth: 2D mask AP (pycocotools), instance P/R/F1,
VI and adapted Rand error (scikit-image), per class, reading one slice at a time."""

from __future__ import annotations

import contextlib
import copy
import errno
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from .config import format_slice_list, parse_slice_list, slice_runs
from .errors import UserError
from .read import SliceRange, Volume, group_attrs

MODES = ("3d", "2d")
THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # IoU 0.5:0.05:0.95
COUNTS = ("n_pred", "n_gt", "exact", "n_pred_masks", "n_gt_masks", "n_unscored")  # summed, not averaged, in "mean"
_NO_CAP = 2**31 - 1  # COCOeval maxDets: keep every detection of a slice (EM slices hold hundreds of instances)
_ALL_AREAS = [[0.0, float("inf")]]


def load_scores(table_path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """class -> {instance id -> score} from a run's object table (Parquet; CSV with the same columns)."""
    import pyarrow as pa

    path = Path(table_path)
    if not path.is_file():
        raise UserError(f"{path} does not exist; give the run's object table (.parquet, or .csv)")
    try:
        if path.suffix.lower() == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read the object table {path} ({e}); give a .parquet or .csv file") from e
    missing = [c for c in ("id", "class", "score") if c not in table.column_names]
    if missing:
        raise UserError(f"the object table {path} lacks column(s) {missing}; it needs id, class and score")
    out: dict[str, dict[int, float]] = {}
    for i, name, score in zip(*(table[c].to_pylist() for c in ("id", "class", "score"))):
        if i is not None and name is not None and score is not None:
            out.setdefault(str(name), {})[int(i)] = float(score)
    return out


def evaluate(
    pred: dict[str, Volume],
    gt: dict[str, Volume],
    scores: dict[str, dict[int, float]] | None = None,
    slices: Sequence[int] | None = None,
    mode: str = "3d",
    z0: int = 0,
) -> dict:
    """Score each class both label sets hold; JSON-ready (floats, ints, lists, None where a metric is undefined).

    ``scores`` ranks predictions for AP (an id without a score, or no scores at all: 1.0). ``slices`` limits the
    evaluation to those z slices (a range, or any slices: a lab's annotated ones). ``mode="2d"``: every slice stands
    alone, an object is a (slice, id) pair; ``"3d"``: each run of consecutive slices is a sub-volume of its own.
    "mean" averages each metric over the scored classes (skipping None) and sums the counts. ``z0``: the volume's
    number of these labels' slice 0 (a run of part of a volume), for the slice numbers the result names.
    Without ``slices``, ground truth empty in some slices but not all gets a warning (``warnings``): a lab that
    annotated a few slices should evaluate those alone, as every prediction elsewhere counts as a false positive.
    """
    if mode not in MODES:
        raise UserError(f"unknown evaluation mode {mode!r}; use one of {list(MODES)}")
    shared = sorted(set(pred) & set(gt))
    if not shared:
        raise UserError(
            f"prediction and ground truth share no class: the prediction has {sorted(pred)}, the ground truth "
            f"has {sorted(gt)}; name the classes alike (label image names, or --gt-classes and --pred-classes for plain "
            "label stacks)"
        )
    for name in shared:
        if tuple(pred[name].shape) != tuple(gt[name].shape):
            p_shape, g_shape = tuple(pred[name].shape), tuple(gt[name].shape)
            hint = ("; ground truth of some of the volume's slices: say which with --gt-slices START:STOP (e.g. "
                    f"--gt-slices 0:{g_shape[0]})" if g_shape[0] < p_shape[0] and g_shape[1:] == p_shape[1:] else "")
            raise UserError(f"class {name!r}: the prediction has shape {p_shape} but the ground truth has {g_shape} "
                            f"(Z, Y, X); evaluate labels of the same volume{hint}")  # fmt: skip
        for vol in (pred[name], gt[name]):
            if np.dtype(vol.dtype).kind not in "ui":
                raise UserError(f"{vol.path} holds {vol.dtype} values; label images must hold integer ids")
    zs = _slice_list(slices, gt[shared[0]].shape[0])
    classes, annotated, objects = {}, set(), {}
    for name in shared:
        classes[name], marked, objects[name] = _score_class(pred[name], gt[name], zs, (scores or {}).get(name), mode)
        annotated |= marked
    if mode == "3d" and len(shared) > 1:
        _other_class(pred, gt, objects, classes, zs)
    return {
        "mode": mode,
        "slices": format_slice_list(z + z0 for z in zs),  # the volume's slice numbers, in --slices syntax
        "n_slices": len(zs),
        "n_runs": len(slice_runs(zs)),
        "gt_annotated_slices": format_slice_list(sorted(z + z0 for z in annotated)),
        "warnings": [] if slices is not None else _sparse_truth_warning(len(zs), sorted(z + z0 for z in annotated)),
        "thresholds": list(THRESHOLDS),
        "classes": classes,
        "mean": _mean(list(classes.values())),
        "unmatched": {"pred_only": sorted(set(pred) - set(gt)), "gt_only": sorted(set(gt) - set(pred))},
    }


MAX_NAMED_RUNS = 12  # runs of annotated slices a warning names (the result's gt_annotated_slices holds them all)


def _sparse_truth_warning(n_slices: int, annotated: list[int]) -> list[str]:
    """A warning where the ground truth is empty in some of the scored slices but not all: likely a lab's few
    annotated slices, where every prediction elsewhere would count as a false positive (or, in 3D, whole objects
    against truth objects a few slices thick). Only a warning: an empty truth slice can be real."""
    if not annotated or len(annotated) == n_slices:
        return []
    runs, listed = slice_runs(annotated), format_slice_list(annotated)
    hint = f"if only slices {listed} were annotated, evaluate them alone with --slices {listed}"
    if len(runs) > MAX_NAMED_RUNS:  # a line a person can read: the whole list is in the --json result
        first = format_slice_list([z for run in runs[:MAX_NAMED_RUNS] for z in run])
        hint = (f"if only those {len(annotated)} slices ({first},...) were annotated, evaluate them alone with "
                "--slices and the list the --json result holds as gt_annotated_slices")  # fmt: skip
    return [f"ground truth is empty in {n_slices - len(annotated)} of {n_slices} slices; {hint}"]


def evaluate_paths(pred: str, gt: str, gt_classes: str | None = None, slices: str | None = None,
                   mode: str = "3d", errors_png: str | None = None, pred_classes: str | None = None,
                   gt_slices: str | None = None) -> dict:  # fmt: skip
    """``cellseg-batch eval``: PRED is a run's OME-Zarr (scores from its object table where present), or another
    tool's 3D label stack with ``pred_classes``, scored by its own ids (its objects as that tool made them); GT an
    OME-Zarr with a labels group, or a label stack with ``gt_classes`` (a class name or a JSON id -> class map).
    ``gt_slices`` (START:STOP): the volume's slices the ground truth holds, where it holds only some of them (a
    lab's truth of a sub-range, in a file of its own); the slices both hold are scored."""
    from .read import check_3d_ids, check_label_stack, class_volumes, ngff_label_layers, open_label_layers

    for path, option in ((gt, "--gt-classes"), (pred, "--pred-classes")):
        if Path(path).suffix.lower() == ".json":  # a COCO file: eval reads label volumes
            raise UserError(f"{path} is a JSON file: eval scores label volumes (an OME-Zarr with labels/, or a label "
                            f"stack with {option}); COCO annotations are scored by `train --val` (mask AP of a "
                            "model on them), not read as ground truth here")  # fmt: skip
    if not pred_classes and ngff_label_layers(pred) is None:
        raise UserError(f"{pred} is not an OME-Zarr with a labels/ group; pass a cellseg-batch output, or give the "
                        "classes of another tool's label stack with --pred-classes")  # fmt: skip
    pred_layers = open_label_layers([pred], [pred_classes] if pred_classes else [], "--pred-classes")
    gt_layers = open_label_layers([gt], [gt_classes] if gt_classes else [], "--gt-classes")
    warnings = []
    for layer in (*pred_layers, *gt_layers):  # a background of -1 or 65535 would be scored as an object
        warnings += check_label_stack(layer, instances=False)
        if mode == "3d" and (pred_classes or layer in gt_layers):  # a run's own labels are 3D objects
            warnings += check_3d_ids(layer, "--mode 2d")
    pred_sets, gt_sets = class_volumes(pred_layers), class_volumes(gt_layers)
    table = Path(pred) / "cellseg" / "objects.parquet"
    scores = load_scores(table) if table.exists() and not pred_classes else None
    pred_depth, gt_depth = next(iter(pred_sets.values())).shape[0], next(iter(gt_sets.values())).shape[0]
    if gt_slices:  # truth of some of the volume's slices: both cut to the slices they share
        pred_sets, gt_sets, z0 = _shared_slices(pred, pred_sets, gt, gt_sets, gt_slices)
        held, volume_depth = "the prediction and the ground truth share", z0 + next(iter(pred_sets.values())).shape[0]
    else:  # a run of part of the volume (run --slices) against the whole volume's ground truth, or all of both
        z0, held, volume_depth = _run_offset(pred, pred_depth, gt_depth), "the prediction holds", gt_depth
        if z0 is not None:
            gt_sets = {name: SliceRange(volume, z0, pred_depth) for name, volume in gt_sets.items()}
    # --slices in the volume's numbering, as the run's --slices and --gt-slices are (an open STOP: where the data end)
    zs = parse_slice_list(slices, volume_depth) if slices else None
    if zs is not None and z0 is not None:
        depth = next(iter(pred_sets.values())).shape[0]
        if zs[0] < z0 or zs[-1] >= z0 + depth:
            raise UserError(f"--slices {slices}: {held} slices {z0}:{z0 + depth} of the volume only")
        zs = [z - z0 for z in zs]
    return _scored(pred_sets, gt_sets, scores, zs, mode, z0 or 0, warnings, errors_png, [*pred_layers, *gt_layers])


def _scored(pred_sets: dict, gt_sets: dict, scores, zs, mode: str, z0: int, warnings: list, errors_png,
            layers: list) -> dict:  # fmt: skip
    """``evaluate`` with the warnings found before it and after (``layers`` note the ids their class map lacks as
    their class views read them), the worst split drawn, and slices in the volume's numbers."""
    result = evaluate(pred_sets, gt_sets, scores=scores, slices=zs, mode=mode, z0=z0)
    result["warnings"] = warnings + result["warnings"] + [_unmapped_warning(layer) for layer in layers if layer.unmapped]
    if errors_png:
        worst = max(((c, r["errors"]["splits"][0]) for c, r in result["classes"].items() if r.get("errors", {}).get("splits")),
                    key=lambda cs: cs[1]["parts"][1]["voxels"], default=None)  # fmt: skip
        if worst is not None:
            # matplotlib adds .png to a name without a suffix: the name said is the file written
            name = errors_png if Path(errors_png).suffix else f"{errors_png}.png"
            try:
                drawn = draw_split(pred_sets[worst[0]], gt_sets[worst[0]], worst[1], name)
            except UserError as e:  # a full disk (``written``): the scores are still printed, --json written, then
                result["errors_png_failed"] = str(e)  # this said
            else:
                result["errors_png"] = {"class": worst[0], "gt": worst[1]["gt"], "path": str(drawn)}
    if z0:  # the errors' slices in the volume's numbers, as the header's and --slices are (a run of --slices 20:23)
        for r in result["classes"].values():
            for entry in (e for kind in ("splits", "merges", "false", "missed") for e in r.get("errors", {}).get(kind, [])):
                for part in (entry, *entry.get("parts", [])):
                    if "slices" in part:
                        part["slices"] = [z + z0 for z in part["slices"]]
    return result


@contextlib.contextmanager
def written(path: str, option: str):
    """Write an output file of ``option`` inside the block (its folders made first); a path that cannot be
    written is a one-line error naming it, not a traceback after the scores were printed."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        yield p
    except OSError as e:
        if p.is_file():  # no cut-off file that looks like a result
            p.unlink()
        way = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "give a file in a folder you can write"
        raise UserError(f"cannot write {option} {path} ({e.strerror}); {way}") from e


def _unmapped_warning(layer) -> str:
    """All the ids of a label stack that its class map lists no class for, found in the slices scored."""
    missing = sorted(layer.unmapped)
    listed = ", ".join(str(i) for i in missing[:20]) + (f" and {len(missing) - 20} more" if len(missing) > 20 else "")
    return (f"{layer.volume.path}: {len(missing)} ids in the slices scored have no class in its "
            f"{layer.option} map ({listed}): they are not scored; add them to the map to score them")


def _shared_slices(pred: str, pred_sets: dict, gt: str, gt_sets: dict, gt_slices: str) -> tuple[dict, dict, int]:
    """Both label sets cut to the volume slices both hold, and the first of those: the ground truth holds slices
    ``gt_slices`` (START:STOP) of the volume; a run's output those its run took (``run --slices``), else all."""
    from .config import parse_slices

    gt_depth, pred_depth = next(iter(gt_sets.values())).shape[0], next(iter(pred_sets.values())).shape[0]
    g0, g1 = parse_slices(gt_slices, None, "--gt-slices")
    if str(gt_slices).strip().endswith(":"):  # START: the truth's own depth from START
        g1 = g0 + gt_depth
    if g1 - g0 != gt_depth:
        raise UserError(f"--gt-slices {gt_slices} names {g1 - g0} slices, but {gt} holds {gt_depth}; give the volume's "
                        f"slices it holds, e.g. --gt-slices {g0}:{g0 + gt_depth}")  # fmt: skip
    recorded = _run_slices(pred)
    p0 = recorded[0] if recorded and recorded[1] - recorded[0] == pred_depth else 0
    lo, hi = max(p0, g0), min(p0 + pred_depth, g1)
    if lo >= hi:
        raise UserError(f"{pred} holds slices {p0}:{p0 + pred_depth} of the volume and the ground truth "
                        f"{g0}:{g1} (--gt-slices): they share none")  # fmt: skip
    cut = lambda sets, start: {name: SliceRange(v, lo - start, hi - lo) for name, v in sets.items()}  # noqa: E731
    return cut(pred_sets, p0), cut(gt_sets, g0), lo


def _run_offset(pred: str, pred_depth: int, gt_depth: int) -> int | None:
    """The first volume slice of a run's output that holds only some of the volume's slices (``run --slices``,
    recorded in the output), where the ground truth holds all of them; else None."""
    recorded = _run_slices(pred)
    if pred_depth == gt_depth or not recorded:
        return None
    z0, z1 = recorded
    if _volume_depth(pred) == pred_depth:  # the run took its whole volume (of fewer slices than the ground truth's):
        return None  # slices 0:N of its own volume are not slices 0:N of this one; the shapes differ
    return z0 if z1 - z0 == pred_depth and z1 <= gt_depth else None


def _run_slices(pred: str) -> list[int] | None:
    """[START, STOP] of the volume's slices a run's output holds, where its run took some (``run --slices``)."""
    recorded = ((group_attrs(pred) or {}).get("cellseg_batch") or {}).get("slices")
    return recorded if recorded and len(recorded) == 2 else None


def _volume_depth(pred: str) -> int | None:
    """The slices of the volume a run read (its report's input shape), where the report says."""
    import json

    try:
        return int(json.loads((Path(pred) / "cellseg" / "report.json").read_text())["input"]["shape"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _slice_list(slices: Sequence[int] | None, depth: int) -> list[int]:
    """The z slices to score, sorted and de-duplicated: all of them where ``slices`` is None."""
    if slices is None:
        return list(range(depth))
    zs = sorted({int(z) for z in slices})
    if not zs:
        raise UserError(f"slices {slices!r}: give at least one z slice")
    if zs[0] < 0 or zs[-1] >= depth:
        raise UserError(f"slices {zs[0]}..{zs[-1]} are out of range: the volumes have {depth} slices (0..{depth - 1})")
    return zs


def _score_class(pv: Volume, gv: Volume, zs: list[int], scores: dict[int, float] | None,
                 mode: str) -> tuple[dict, set[int], _Objects]:  # fmt: skip
    """Every metric of one class, the slices where its ground truth has any object, and its objects (matched or
    not, for the errors), from one pass over its slices (two 2D reads per slice)."""
    _, h, w = gv.shape
    ap = _MaskAP(scores)
    parts, annotated = [], set()
    for z in zs:
        p = np.asarray(pv.read(z, 0, h, 0, w)).astype(np.uint64, copy=False)
        g = np.asarray(gv.read(z, 0, h, 0, w)).astype(np.uint64, copy=False)
        pid, gid, n = _pair_counts(p.ravel(), g.ravel())
        ap.add_pairs(z, pid, gid, n)
        parts.append((np.full(len(n), z, np.uint64), pid, gid, n))
        if gid.max() > 0:  # gid lists the slice's ids: cheaper than another pass over its pixels
            annotated.add(z)
    z, pid, gid, n = (np.concatenate(a) for a in zip(*parts))
    # an object is an id within a segment: a slice (2d), or a run of consecutive slices (3d). Slices given as a list
    # of runs (a lab's annotated blocks) are scored run by run, each a sub-volume whose objects are cut at its ends,
    # as --slices START:STOP scores one, and the counts summed: the same numbers as one eval per run added up.
    # Refusing instead would leave such a lab to add them by hand; single-slice runs score as --mode 2d would.
    starts = np.array([run[0] for run in slice_runs(zs)], np.uint64)
    seg = z if mode == "2d" else (np.searchsorted(starts, z, side="right") - 1).astype(np.uint64)
    scores, objects = _instance_scores(z, seg, pid, gid, n)
    out = {**ap.result(), **scores}
    if mode == "3d":
        out["errors"] = {**_errors_per_run(z, seg, pid, gid, n), **objects.listed()}
    return out, annotated, objects


# -- why F1 is what it is: splits and merges ------------------------------------------------------------------------

MAX_LISTED = 50  # errors listed per kind and class (all are counted)
MAX_PARTS = 10  # parts listed per error (all are counted): a merge can hold thousands


def explain_errors(z, pid, gid, n, share: float = 0.5) -> dict:
    """The splits and merges behind a class's scores, from the slice-wise pair counts (3D objects).

    A predicted object is a *part* of a gt object when at least ``share`` of its voxels lie in it; a gt object with
    two or more parts is split. Symmetrically a gt object lies *in* a predicted one when at least ``share`` of its
    voxels do; a predicted object holding two or more is a merge. Each is listed with ids, voxel counts and slice
    ranges [first, last], worst first (a split by the size of its second-largest part, a merge by that of its
    second-largest gt object), its largest ``MAX_PARTS`` parts listed and all counted (``n_parts``)."""
    fg = (pid > 0) & (gid > 0)
    keys, inv = np.unique(np.stack([pid[fg], gid[fg]], 1), axis=0, return_inverse=True)
    inv = inv.ravel()
    inter = np.bincount(inv, weights=n[fg]).astype(np.int64)
    z0 = np.full(len(keys), np.iinfo(np.int64).max)
    z1 = np.full(len(keys), -1)
    np.minimum.at(z0, inv, z[fg].astype(np.int64))
    np.maximum.at(z1, inv, z[fg].astype(np.int64))
    p, g = keys[:, 0], keys[:, 1]
    out = {}
    for kind, whole, part, whole_ids, part_ids in (("splits", g, p, gid, pid), ("merges", p, g, pid, gid)):
        size_whole, size_part = _sizes(whole_ids, n, whole), _sizes(part_ids, n, part)
        rows = np.flatnonzero(inter >= share * size_part)
        rows = rows[np.lexsort((part[rows], -inter[rows], whole[rows]))]  # by object; its largest part first
        starts = np.flatnonzero(np.r_[True, whole[rows][1:] != whole[rows][:-1]]) if len(rows) else rows
        counts = np.diff(np.r_[starts, len(rows)])
        starts, counts = starts[counts >= 2], counts[counts >= 2]
        worst = np.lexsort((whole[rows[starts]], -inter[rows[starts + 1]]))[:MAX_LISTED]
        name = "gt" if kind == "splits" else "pred"
        out[f"n_{kind}"] = len(starts)
        out[kind] = []
        for first, count in zip(starts[worst].tolist(), counts[worst].tolist()):
            mine = rows[first : first + min(count, MAX_PARTS)]
            parts = [{"id": int(part[i]), "voxels": int(inter[i]), "slices": [int(z0[i]), int(z1[i])]} for i in mine]
            out[kind].append({name: int(whole[mine[0]]), "voxels": int(size_whole[mine[0]]), "n_parts": count,
                              "parts": parts})  # fmt: skip
    return out


def _errors_per_run(z, seg, pid, gid, n) -> dict:
    """``explain_errors`` of each run of slices (``seg``) on its own, merged: an object does not cross runs."""
    found = [explain_errors(z[m], pid[m], gid[m], n[m]) for m in (seg == s for s in np.unique(seg))]
    out = {}
    for kind, name in (("splits", "gt"), ("merges", "pred")):
        out[f"n_{kind}"] = sum(f[f"n_{kind}"] for f in found)
        listed = sorted((e for f in found for e in f[kind]), key=lambda e: (-e["parts"][1]["voxels"], e[name]))
        out[kind] = listed[:MAX_LISTED]
    return out


@dataclass
class _Side:
    """One side's objects of a class (background left out): (segment, id) rows in sorted order, voxels, first and
    last slice, best IoU with an object of the other side of the same class, matched at IoU 0.5 or not."""

    rows: np.ndarray
    voxels: np.ndarray
    first: np.ndarray
    last: np.ndarray
    best_iou: np.ndarray
    matched: np.ndarray

    def find(self, rows: np.ndarray) -> np.ndarray:
        """Indices of these (segment, id) rows, which must be among this side's."""
        as_records = [("seg", "<u8"), ("id", "<u8")]
        mine = np.ascontiguousarray(self.rows, np.uint64).view(as_records).ravel()
        return np.searchsorted(mine, np.ascontiguousarray(rows, np.uint64).view(as_records).ravel())


@dataclass
class _Objects:
    """A class's predicted and gt objects, and where an unmatched one is another class's object (``_other_class``):
    index -> (class, the other object's id, IoU)."""

    pred: _Side
    gt: _Side
    pred_is: dict = field(default_factory=dict)  # a false object that is a gt object of another class
    gt_as: dict = field(default_factory=dict)  # a missed object that is a predicted object of another class

    def listed(self) -> dict:
        """The false (predicted, unmatched at IoU 0.5) and missed (gt, unmatched) objects: counted, ``MAX_LISTED``
        listed with their slices and best IoU in their own class, class mistakes (another class's object: which)
        first, then the largest."""
        out = {}
        for kind, side, name, other, other_name, key in (
                ("false", self.pred, "id", self.pred_is, "gt", "truth"),
                ("missed", self.gt, "gt", self.gt_as, "pred", "predicted_as")):  # fmt: skip
            idx = np.flatnonzero(~side.matched)
            mistake = np.array([i in other for i in idx.tolist()], bool)  # listed first: the table names them
            idx = idx[np.lexsort((side.rows[idx, 1], -side.voxels[idx], ~mistake))]
            out[f"n_{kind}"] = len(idx)
            out[f"n_{kind}_other_class"] = int(mistake.sum())
            out[kind] = []
            for i in idx[:MAX_LISTED].tolist():
                entry = {name: int(side.rows[i, 1]), "voxels": int(side.voxels[i]),
                         "slices": [int(side.first[i]), int(side.last[i])], "best_iou": round(float(side.best_iou[i]), 3)}  # fmt: skip
                if i in other:
                    cls, j, iou = other[i]
                    entry[key] = {"class": cls, other_name: j, "iou": round(iou, 3)}
                out[kind].append(entry)
        return out


def _other_class(pred: dict[str, Volume], gt: dict[str, Volume], objects: dict[str, _Objects], classes: dict,
                 zs: list[int]) -> None:  # fmt: skip
    """Class mistakes: each false object of a class that is a gt object of another class (IoU >= 0.5 over the
    slices of its run) is marked so, and that gt object as found under the wrong class, in ``classes``' errors.
    One more read, of the slices that hold false objects only: the predicted class there and every other gt class."""
    depth = gt[next(iter(gt))].shape[0]
    starts = np.array([run[0] for run in slice_runs(zs)])
    where = {}  # class -> the slices its false objects lie in
    for name, obj in objects.items():
        false = ~obj.pred.matched
        cover = np.zeros(depth + 1, np.int64)
        np.add.at(cover, obj.pred.first[false], 1)
        np.add.at(cover, obj.pred.last[false] + 1, -1)
        where[name] = np.cumsum(cover)[:depth] > 0
    meets = {}  # (predicted class, gt class) -> [(segment, pred id, gt id, voxels)] of false objects
    for z in zs:
        todo = [a for a in objects if where[a][z]]
        if not todo:
            continue
        seg = np.uint64(np.searchsorted(starts, z, side="right") - 1)
        _, h, w = gt[todo[0]].shape
        truth = {}
        for a in todo:
            obj = objects[a]
            false_ids = obj.pred.rows[~obj.pred.matched & (obj.pred.rows[:, 0] == seg), 1]
            p = np.asarray(pred[a].read(z, 0, h, 0, w)).astype(np.uint64, copy=False).ravel()
            at = np.flatnonzero(_among(p, false_ids))  # only their pixels are counted: most of a slice is not
            if not len(at):
                continue
            for b in objects:
                if b == a:
                    continue
                if b not in truth:
                    truth[b] = np.asarray(gt[b].read(z, 0, h, 0, w)).astype(np.uint64, copy=False).ravel()
                g = truth[b][at]
                inside = g > 0  # pixels over this class's background cannot make a mistake
                if inside.any():
                    pid, gid, n = _pair_counts(p[at][inside], g[inside])
                    meets.setdefault((a, b), []).append(np.stack([np.full(len(n), seg), pid, gid, n], 1))
    best: dict = {}  # (predicted class, pred index) -> (IoU, gt class, gt index)
    for (a, b), parts in meets.items():
        keys, inv = np.unique(np.concatenate(parts)[:, :3], axis=0, return_inverse=True)
        inter = np.bincount(inv.ravel(), weights=np.concatenate(parts)[:, 3])
        pi, gi = objects[a].pred.find(keys[:, :2]), objects[b].gt.find(keys[:, [0, 2]])
        iou = inter / (objects[a].pred.voxels[pi] + objects[b].gt.voxels[gi] - inter)
        for k in np.flatnonzero(iou >= 0.5).tolist():
            if iou[k] > best.get((a, int(pi[k])), (0.0,))[0]:
                best[a, int(pi[k])] = (float(iou[k]), b, int(gi[k]))
    for (a, i), (iou, b, j) in best.items():
        objects[a].pred_is[i] = (b, int(objects[b].gt.rows[j, 1]), iou)
        if not objects[b].gt.matched[j]:
            objects[b].gt_as[j] = (a, int(objects[a].pred.rows[i, 1]), iou)
    for name, obj in objects.items():
        classes[name]["errors"].update(obj.listed())


def _among(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Which pixels hold one of ``ids`` (sorted): a lookup table where the labels' ids are small, else a binary
    search per pixel (no sort of the pixels, as ``np.isin`` would do)."""
    if not len(ids):
        return np.zeros(labels.shape, bool)
    top = int(labels.max())
    if top < 1 << 24:
        table = np.zeros(top + 1, bool)
        table[ids[ids <= top].astype(np.int64)] = True
        return table[labels]
    return ids[np.minimum(np.searchsorted(ids, labels), len(ids) - 1)] == labels


def _sizes(ids, n, of) -> np.ndarray:
    """The voxel count of each id in ``of``, from the pair counts' ids and counts."""
    u, inv = np.unique(ids, return_inverse=True)
    return np.bincount(inv.ravel(), weights=n).astype(np.int64)[np.searchsorted(u, of)]


def draw_split(pred: Volume, gt: Volume, split: dict, path: str | os.PathLike, max_slices: int = 12) -> Path:
    """A PNG of one split (an entry of ``errors["splits"]``): the gt object's slices side by side, cropped to its
    box, each predicted part in its own colour and the gt outline in white. Only the file's writing is reported as
    a path that cannot be written (``--errors-png``); an error reading the volumes stays that error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    lo = min(p["slices"][0] for p in split["parts"])
    hi = max(p["slices"][1] for p in split["parts"])
    zs = np.unique(np.linspace(lo, hi, min(max_slices, hi - lo + 1)).round().astype(int))
    _, h, w = gt.shape
    gts = [np.asarray(gt.read(int(k), 0, h, 0, w)) == split["gt"] for k in zs]
    preds = [np.asarray(pred.read(int(k), 0, h, 0, w)) for k in zs]
    ys, xs = np.nonzero(np.any(gts, axis=0))
    pad = 4
    y0, y1, x0, x1 = max(ys.min() - pad, 0), ys.max() + pad + 1, max(xs.min() - pad, 0), xs.max() + pad + 1
    colours = plt.get_cmap("tab10")
    part_ids = [p["id"] for p in split["parts"]]
    fig, axes = plt.subplots(1, len(zs), figsize=(1.6 * len(zs), 2.0), squeeze=False)
    for ax, k, gmask, p in zip(axes[0], zs, gts, preds):
        g, q = gmask[y0:y1, x0:x1], p[y0:y1, x0:x1]
        rgb = np.full((*g.shape, 3), 0.15)
        for i, pid in enumerate(part_ids):
            rgb[q == pid] = colours(i % 10)[:3]
        rgb[(q > 0) & ~np.isin(q, part_ids)] = 0.5
        rgb[g & ~ndimage.binary_erosion(g)] = 1.0
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(f"z {k}", fontsize=8)
        ax.axis("off")
    parts = ", ".join(f"{p['id']} (z {p['slices'][0]}-{p['slices'][1]})" for p in split["parts"][:4])
    fig.suptitle(f"gt {split['gt']} split into predicted {parts}", fontsize=8)
    fig.tight_layout()
    try:
        with written(path, "--errors-png") as p:
            fig.savefig(p, dpi=110)
    finally:
        plt.close(fig)
    return p


def _pair_counts(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pred id, gt id, voxel count) of every id pair that meets in a slice, background (0) included."""
    base = int(g.max()) + 1
    if (int(p.max()) + 1) * base <= 2**64:  # one sort over packed uint64 keys
        keys, n = np.unique(p * np.uint64(base) + g, return_counts=True)
        return keys // np.uint64(base), keys % np.uint64(base), n
    # ids too large to pack: pack their ranks instead
    pu, pi = np.unique(p, return_inverse=True)
    gu, gi = np.unique(g, return_inverse=True)
    keys, n = np.unique(pi.astype(np.uint64) * np.uint64(len(gu)) + gi.astype(np.uint64), return_counts=True)
    return pu[keys // np.uint64(len(gu))], gu[keys % np.uint64(len(gu))], n


# -- instance matching, VI, adapted Rand: all from one contingency table --------------------------------------------


def _instance_scores(z, seg, pid, gid, n) -> tuple[dict, _Objects]:
    """P/R/F1 of one-to-one IoU matching, VI and adapted Rand error from the slice-wise pair counts, and each side's
    objects with their match at IoU 0.5; an object is an id within a segment (``seg``: a slice, or a run of
    slices): the same id in another segment is another."""
    pu, pi, p_bg = _objects(seg, pid)
    gu, gi, g_bg = _objects(seg, gid)
    # rows: gt segments, columns: predicted ones; tocsr() sums a pair's counts over slices
    table = sp.coo_array((n.astype(np.float64), (gi.ravel(), pi.ravel())), shape=(len(gu), len(pu))).tocsr()
    g_size, p_size = table.sum(axis=1), table.sum(axis=0)
    cells = table.tocoo()
    obj = ~g_bg[cells.row] & ~p_bg[cells.col]
    gg, pp, inter = cells.row[obj], cells.col[obj], cells.data[obj]
    iou = inter / (p_size[pp] + g_size[gg] - inter)
    n_pred, n_gt = int((~p_bg).sum()), int((~g_bg).sum())
    matches = [_match(pp, gg, iou, t) for t in THRESHOLDS]
    tp = [len(m[0]) for m in matches]
    prf = [_prf(k, n_pred, n_gt) for k in tp]
    out = {
        "n_pred": n_pred,
        "n_gt": n_gt,
        "exact": int(((inter == p_size[pp]) & (inter == g_size[gg])).sum()),  # IoU == 1.0, counted without floats
        "tp": tp,
    }
    for i, key in enumerate(("precision", "recall", "f1")):
        out[f"{key}@0.5"] = prf[0][i]
        out[f"{key}@0.5:0.95"] = None if prf[0][i] is None else float(np.mean([m[i] for m in prf]))
    sides = []
    for u, idx, bg, size, mine, ends in ((pu, pi, p_bg, p_size, pp, matches[0][0]), (gu, gi, g_bg, g_size, gg, matches[0][1])):
        best = np.zeros(len(u))
        np.maximum.at(best, mine, iou)
        first, last = np.full(len(u), np.iinfo(np.int64).max), np.full(len(u), -1)
        np.minimum.at(first, idx, z.astype(np.int64))
        np.maximum.at(last, idx, z.astype(np.int64))
        matched = np.zeros(len(u), bool)
        matched[ends] = True
        rows = u if u.ndim == 2 else np.stack([np.full(len(u), seg[0], np.uint64), u], 1)
        keep = ~bg
        sides.append(_Side(rows[keep], np.ravel(size)[keep].astype(np.int64), first[keep], last[keep], best[keep],
                           matched[keep]))  # fmt: skip
    return {**out, **_vi_are(table, g_bg)}, _Objects(*sides)


def _objects(seg, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (segment, id) objects, each pair's object index, and which objects are background."""
    if seg.min() == seg.max():  # one segment (a whole range in 3D): a plain sort of the ids, much faster
        u, inv = np.unique(ids, return_inverse=True)
        return u, inv.ravel(), u == 0
    u, inv = np.unique(np.stack([seg, ids], 1), axis=0, return_inverse=True)
    return u, inv.ravel(), u[:, 1] == 0


def _prf(tp: int, n_pred: int, n_gt: int) -> tuple:
    if n_pred == 0 and n_gt == 0:
        return (None, None, None)  # nothing to find and nothing found: undefined, left out of the mean
    return (tp / n_pred if n_pred else 0.0, tp / n_gt if n_gt else 0.0, 2 * tp / (n_pred + n_gt))


def _match(pp: np.ndarray, gg: np.ndarray, iou: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """The best one-to-one matching of predicted to gt objects among pairs with IoU >= t: the matched objects'
    indices (``pp``'s and ``gg``'s values), pair by pair.

    The candidate pairs form a bipartite graph; each connected component is assigned on its own
    (linear_sum_assignment on a small dense matrix), so this scales to any number of objects. At t >= 0.5 almost
    every component is one pair (two objects can share a partner at IoU >= 0.5 only in exact ties at 0.5).
    """
    keep = iou >= t
    pp, gg, w = pp[keep], gg[keep], iou[keep]
    if not len(w):
        return pp, gg
    _, pr = np.unique(pp, return_inverse=True)
    _, gr = np.unique(gg, return_inverse=True)
    n_p = int(pr.max()) + 1
    nodes = n_p + int(gr.max()) + 1
    graph = sp.coo_array((np.ones(len(w)), (pr, n_p + gr)), shape=(nodes, nodes))
    comp = connected_components(graph, directed=False)[1][pr]
    size = np.bincount(comp)
    single = size[comp] == 1
    found_p, found_g = [pp[single]], [gg[single]]
    multi = np.flatnonzero(~single)
    multi = multi[np.argsort(comp[multi], kind="stable")]
    groups = np.split(multi, np.flatnonzero(np.diff(comp[multi])) + 1) if len(multi) else []
    for idx in groups:
        p_ids, r = np.unique(pp[idx], return_inverse=True)
        g_ids, c = np.unique(gg[idx], return_inverse=True)
        gain = np.zeros((r.max() + 1, c.max() + 1))
        # a candidate is worth 1 plus a share of its IoU that sums to < 1 over any matching: the assignment first
        # maximizes the number of matches (the TP count), then their IoU. Plain IoU-sum maximization could give
        # up one pair at IoU 0.5 for two pairs at 0.33 and lose a true positive.
        gain[r, c] = 1 + w[idx] / (2 * min(gain.shape))
        rows, cols = linear_sum_assignment(gain, maximize=True)
        ok = gain[rows, cols] > 0
        found_p.append(p_ids[rows[ok]])
        found_g.append(g_ids[cols[ok]])
    return np.concatenate(found_p), np.concatenate(found_g)


def _vi_are(table: sp.csr_array, g_bg: np.ndarray) -> dict:
    """VI (background is a segment, as in skimage's default) and adapted Rand error (gt background ignored)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    # skimage reads the table and ignores the images, but still checks that two images of one shape were passed
    stand_in = np.zeros(1, np.uint8)
    split, merge = variation_of_information(stand_in, stand_in, table=table / table.sum())  # rows: gt (image0)
    out = {"vi_split": float(split), "vi_merge": float(merge), "vi": float(split + merge)}
    # skimage divides its "precision" by the pairs of its table's rows and its "recall" by the columns' pairs:
    # swapped against its own docstring (scikit-image issue #6485). Rows = prediction gives the documented meaning
    # (precision: share of same-prediction voxel pairs that share a gt object), gt background dropped as skimage's
    # default ignore_labels=(0,) does.
    objects = table[~g_bg].T.tocsr()
    pairs = [float(s @ s - s.sum()) for s in (np.ravel(objects.sum(axis=1)), np.ravel(objects.sum(axis=0)))]
    if min(pairs) <= 0:  # no two voxels share a predicted or a gt segment: ARE is 0/0
        return {**out, "are": None, "are_precision": None, "are_recall": None}
    are, precision, recall = adapted_rand_error(table=objects)
    return {**out, "are": float(are), "are_precision": float(precision), "are_recall": float(recall)}


# -- 2D mask AP --------------------------------------------------------------------------------------------------


class _MaskAP:
    """COCO mask AP where each slice is one COCO image and each instance's cross-section one mask.

    Each slice's match records (COCOeval.evaluateImg's) are made here from the slice's pair counts: in a label image
    the masks of one side never overlap, so only pairs that meet can reach IoU 0.5, and COCO's greedy matching runs
    over those pairs alone instead of its loop over every detection and every gt (minutes for a slice of thousands
    of instances). The rule is COCO's, tie-breaks included, and pycocotools' accumulate() ranks the detections of
    all slices together, as one COCO evaluation would; the tests compare both with COCOeval itself.
    """

    def __init__(self, scores: dict[int, float] | None):
        self.scores = scores
        self.records: list = []
        self.img_ids: list[int] = []
        self.unscored: set[int] = set()
        self.n_pred = self.n_gt = 0
        self.thresholds = self.params([]).iouThrs

    @staticmethod
    def params(img_ids: list[int]):
        from pycocotools.cocoeval import Params

        p = Params(iouType="segm")
        p.imgIds, p.catIds = img_ids, [1]
        p.maxDets, p.areaRng, p.areaRngLbl = [_NO_CAP], _ALL_AREAS, ["all"]
        return p

    def add(self, z: int, p: np.ndarray, g: np.ndarray) -> None:
        """Add one slice given as its two 2D label images."""
        self.add_pairs(z, *_pair_counts(p.ravel().astype(np.uint64), g.ravel().astype(np.uint64)))

    def add_pairs(self, z: int, pid: np.ndarray, gid: np.ndarray, n: np.ndarray) -> None:
        """Add one slice given as its pair counts (``_pair_counts``: pred id, gt id, pixels; background included)."""
        p_ids, p_of = np.unique(pid, return_inverse=True)
        g_ids, g_of = np.unique(gid, return_inverse=True)
        p_area = np.bincount(p_of.ravel(), weights=n)
        g_area = np.bincount(g_of.ravel(), weights=n)
        p_fg, g_fg = p_ids != 0, g_ids != 0
        n_dt, n_gt = int(p_fg.sum()), int(g_fg.sum())
        if not n_dt and not n_gt:
            return  # COCOeval leaves empty images out of AP anyway
        self.n_gt, self.n_pred = self.n_gt + n_gt, self.n_pred + n_dt
        dt_ids = p_ids[p_fg]
        if self.scores is not None:
            self.unscored.update(int(i) for i in dt_ids if int(i) not in self.scores)
        scores = self.scores or {}
        dt_scores = np.array([scores.get(int(i), 1.0) for i in dt_ids], np.float64)
        # COCO's orders: detections by falling score, ties in load order (ids ascending); gt in load order
        rank = np.empty(n_dt, np.int64)
        rank[np.argsort(-dt_scores, kind="mergesort")] = np.arange(n_dt)
        # positions of each id among the detections / gt objects (background's position is never used)
        p_pos, g_pos = np.cumsum(p_fg) - 1, np.cumsum(g_fg) - 1
        both = p_fg[p_of.ravel()] & g_fg[g_of.ravel()]
        pi, gi, inter = p_of.ravel()[both], g_of.ravel()[both], n[both].astype(np.float64)
        iou = inter / (p_area[pi] + g_area[gi] - inter)  # as pycocotools' maskUtils.iou computes it
        thr = np.minimum(self.thresholds, 1 - 1e-10)
        keep = iou >= thr.min()  # a pair below every threshold never matches
        d, c, iou = rank[p_pos[pi[keep]]], g_pos[gi[keep]], iou[keep]
        order = np.lexsort((c, d))  # by detection rank, then gt order: COCO's loop order
        pairs = list(zip(d[order].tolist(), c[order].tolist(), iou[order].tolist()))
        dtm = np.zeros((len(thr), n_dt))
        gtm = np.zeros((len(thr), n_gt))
        g_label = g_ids[g_fg].astype(np.float64)
        dt_ranked = dt_ids[np.argsort(-dt_scores, kind="mergesort")]
        d_label = dt_ranked.astype(np.float64)  # match records hold ids as floats; only "matched or not" is read
        for t_i, t in enumerate(thr.tolist()):
            taken: set[int] = set()
            k = 0
            while k < len(pairs):
                det, best, m = pairs[k][0], t, -1
                while k < len(pairs) and pairs[k][0] == det:
                    _, gt, v = pairs[k]
                    k += 1
                    if gt in taken or v < best:
                        continue
                    best, m = v, gt  # the largest IoU wins; in a tie, the later gt, as in COCO's loop
                if m >= 0:
                    taken.add(m)
                    dtm[t_i, det], gtm[t_i, m] = g_label[m], d_label[det]
        self.img_ids.append(z)
        self.records.append({
            "image_id": z, "category_id": 1, "aRng": _ALL_AREAS[0], "maxDet": _NO_CAP,
            "dtIds": dt_ranked.tolist(), "gtIds": g_ids[g_fg].tolist(),
            "dtMatches": dtm, "gtMatches": gtm, "dtScores": np.sort(dt_scores, kind="mergesort")[::-1].tolist(),
            "gtIgnore": np.zeros(n_gt), "dtIgnore": np.zeros((len(thr), n_dt), bool),
        })  # fmt: skip

    def result(self) -> dict:
        from pycocotools.cocoeval import COCOeval

        out = {"ap": None, "ap50": None, "ap75": None}
        scores = np.concatenate([r["dtScores"] for r in self.records]) if self.records else np.zeros(0)
        unranked = len(scores) > 1 and scores.min() == scores.max()  # one detection: COCO's own curve is one point
        if unranked:
            out.update(self._one_operating_point())
        elif self.records:
            e = COCOeval(iouType="segm")
            e.params = self.params(self.img_ids)
            e._paramsEval = copy.deepcopy(e.params)
            e.evalImgs = self.records
            with contextlib.redirect_stdout(io.StringIO()):
                e.accumulate()
            precision = e.eval["precision"][:, :, 0, 0, -1]  # (IoU thresholds, recall points); -1: no gt at all
            thr = e.params.iouThrs
            for key, rows in (
                ("ap", precision),
                ("ap50", precision[np.isclose(thr, 0.5)]),
                ("ap75", precision[np.isclose(thr, 0.75)]),
            ):
                valid = rows[rows > -1]
                out[key] = float(valid.mean()) if valid.size else None
        out.update(n_pred_masks=self.n_pred, n_gt_masks=self.n_gt, n_unscored=len(self.unscored))
        out["ap_ranking"] = "one operating point" if unranked else "scores"
        return out

    def _one_operating_point(self) -> dict:
        """AP where every detection has one score (a label image without scores, the ``labels`` predictor): no
        ranking, so the curve is one point, (recall, precision) of all detections, and AP at each IoU threshold is
        that precision over the recall thresholds it reaches. COCO's accumulate would rank the tied detections by id
        and give a number that moves with the numbering (one true and one false object: 1.0 or 0.5)."""
        n_gt = sum(len(r["gtIds"]) for r in self.records)
        if not n_gt:
            return {}
        n_dt = sum(len(r["dtIds"]) for r in self.records)
        true = sum(((np.asarray(r["dtMatches"]) > 0).sum(axis=1) for r in self.records if len(r["dtIds"])),
                   np.zeros(len(self.thresholds)))  # fmt: skip
        recall, precision = true / n_gt, true / max(n_dt, 1)
        reached = (self.params([]).recThrs[None, :] <= recall[:, None]).mean(axis=1)  # COCO: searchsorted, "left"
        ap = precision * reached  # per IoU threshold
        return {"ap": float(ap.mean()), "ap50": float(ap[np.isclose(self.thresholds, 0.5)][0]),
                "ap75": float(ap[np.isclose(self.thresholds, 0.75)][0])}  # fmt: skip


def _mean(classes: list[dict]) -> dict:
    out: dict = {}
    for key, value in classes[0].items():
        if isinstance(value, (list, dict, str)):
            continue
        values = [c[key] for c in classes if c[key] is not None]
        if key in COUNTS:
            out[key] = int(sum(values))
        else:
            out[key] = float(np.mean(values)) if values else None
    return out


COLUMNS = (
    ("AP", "ap"),
    ("AP50", "ap50"),
    ("AP75", "ap75"),
    ("P@.5", "precision@0.5"),
    ("R@.5", "recall@0.5"),
    ("F1@.5", "f1@0.5"),
    ("F1@.5:.95", "f1@0.5:0.95"),
    ("VI split", "vi_split"),
    ("VI merge", "vi_merge"),
    ("ARE", "are"),
    ("n_pred", "n_pred"),
    ("n_gt", "n_gt"),
)


def format_table(result: dict) -> str:
    """A fixed-width table of an ``evaluate`` result: one row per class, then the mean."""
    rows = [*result["classes"].items(), ("mean", result["mean"])]
    name_w = max(5, *(len(name) for name, _ in rows))
    widths = [max(7, len(title)) for title, _ in COLUMNS]

    def cell(value, width):
        text = "-" if value is None else str(value) if isinstance(value, int) else f"{value:.3f}"
        return text.rjust(width)

    lines = ["class".ljust(name_w) + "".join("  " + t.rjust(wd) for (t, _), wd in zip(COLUMNS, widths))]
    lines.append("-" * len(lines[0]))
    for name, r in rows:
        if name == "mean":
            lines.append("-" * len(lines[0]))
        lines.append(name.ljust(name_w) + "".join("  " + cell(r.get(k), wd) for (_, k), wd in zip(COLUMNS, widths)))
    objects = "2D objects (slice, id)" if result["mode"] == "2d" else "3D objects" if result["n_runs"] == 1 else (
        f"3D objects within each of {result['n_runs']} runs of slices (cut at their ends)")  # fmt: skip
    lines.append(
        f"{result['n_slices']} slices ({result['slices']}); P/R/F1 match {objects}; AP over 2D masks; "
        "mean row: metrics averaged over classes, counts summed"
    )
    unranked = [name for name, r in result["classes"].items() if r.get("ap_ranking") == "one operating point"]
    if unranked:
        lines.append(f"{', '.join(unranked)}: the detections carry one score (no ranking): AP is that of one operating "
                     "point, precision x the share of recall thresholds reached")
    for name, r in result["classes"].items():
        e = r.get("errors")
        if e and (e["n_splits"] or e["n_merges"]):
            worst = [f"gt {s['gt']} -> pred {', '.join(str(p['id']) for p in s['parts'])} (z {s['parts'][0]['slices'][0]}-"
                     f"{s['parts'][0]['slices'][1]} / {s['parts'][1]['slices'][0]}-{s['parts'][1]['slices'][1]})"
                     for s in e["splits"][:3]]  # fmt: skip
            merged = [f"pred {m['pred']} <- gt {', '.join(str(p['id']) for p in m['parts'][:4])}"
                      + (f" and {m['n_parts'] - 4} more" if m["n_parts"] > 4 else "") for m in e["merges"][:3]]
            lines.append(
                f"{name}: {e['n_splits']} split(s) {'; '.join(worst)}  {e['n_merges']} merge(s) {'; '.join(merged)}"
            )
        if e and (e["n_false"] or e["n_missed"]):
            mistaken = [f"pred {f['id']} is {f['truth']['class']} {f['truth']['gt']} (z {_z_text(f['slices'])})"
                        for f in e["false"] if "truth" in f][:3]  # fmt: skip
            lines.append(
                f"{name}: {e['n_false']} false object(s)"
                + (f", {e['n_false_other_class']} of them other classes in the truth: {'; '.join(mistaken)}"
                   + ("; ..." if e["n_false_other_class"] > len(mistaken) else "") if e["n_false_other_class"] else "")
                + f"  {e['n_missed']} missed"
                + (f" ({e['n_missed_other_class']} found as another class)" if e["n_missed_other_class"] else "")
            )  # fmt: skip
    for side, label in (("pred_only", "prediction"), ("gt_only", "ground truth")):
        if result["unmatched"][side]:
            lines.append(f"not scored, only in the {label}: {', '.join(result['unmatched'][side])}")
    return "\n".join(lines)


def _z_text(slices: list[int]) -> str:
    return str(slices[0]) if slices[0] == slices[1] else f"{slices[0]}-{slices[1]}"
