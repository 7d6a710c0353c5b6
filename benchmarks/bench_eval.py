"""`eval`'s 2D mask AP on crowded slices, beside a standard pycocotools COCOeval of the same slice.

One slice of a grid of square instances (the prediction shifted by 3 px, its first columns cut, random scores), at
several instance counts. `cellseg-batch eval` (``evaluate``: pair counts, its sparse COCO matching, pycocotools'
accumulate) against what a lab would write by hand: one RLE per instance (``pycocotools.mask.encode``), COCO,
COCOeval.evaluate() and accumulate(). Both AP values are printed; they must be equal.

Usage: ``python benchmarks/bench_eval.py [--counts 256,1024,4096] [--cocoeval-max 4096]``. Writes
``results/eval_dense.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save  # noqa: E402

from cellseg_batch.evaluate import _MaskAP, evaluate  # noqa: E402
from cellseg_batch.read import ArrayVolume  # noqa: E402

CELL = 16  # px side of each instance


def grid_slice(n_objects: int) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    side = int(round(n_objects**0.5))
    cell_of = np.arange(side * CELL) // CELL
    gt = (cell_of[:, None] * side + cell_of[None, :] + 1).astype(np.uint32)
    pred = np.roll(gt, 3, axis=1)
    pred[:, :5] = 0
    rng = np.random.default_rng(0)
    return pred, gt, {int(i): float(rng.random()) for i in np.unique(pred)[1:]}


def cocoeval_ap(pred: np.ndarray, gt: np.ndarray, scores: dict[int, float]) -> float:
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image = {"id": 0, "height": gt.shape[0], "width": gt.shape[1]}

    def coco(lab, scored):
        anns = []
        for i in np.setdiff1d(lab, [0]):
            m = np.asfortranarray((lab == i).astype(np.uint8))
            ann = {"id": int(i), "image_id": 0, "category_id": 1, "segmentation": mask_utils.encode(m),
                   "area": int(m.sum()), "iscrowd": 0}  # fmt: skip
            anns.append(ann | ({"score": scores[int(i)]} if scored else {}))
        c = COCO()
        c.dataset = {"images": [image], "categories": [{"id": 1}], "annotations": anns}
        c.createIndex()
        return c

    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco(gt, False), coco(pred, True), "segm")
        e.params = _MaskAP.params([0])  # every detection kept (no cap of 100), one area range
        e.evaluate()
        e.accumulate()
    precision = e.eval["precision"][:, :, 0, 0, -1]
    return float(precision[precision > -1].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--counts", default="256,1024,4096,16384", help="instances per slice")
    ap.add_argument("--cocoeval-max", type=int, default=4096, help="largest count also run through plain COCOeval")
    args = ap.parse_args()
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        pred, gt, scores = grid_slice(count)
        t = time.perf_counter()
        ours = evaluate({"c": ArrayVolume(pred[None])}, {"c": ArrayVolume(gt[None])}, scores={"c": scores})
        row = {"instances": count, "slice_px": gt.shape[0], "eval_s": round(time.perf_counter() - t, 3),
               "eval_ap": ours["classes"]["c"]["ap"]}  # fmt: skip
        if count <= args.cocoeval_max:
            t = time.perf_counter()
            row["cocoeval_ap"] = cocoeval_ap(pred, gt, scores)
            row["cocoeval_s"] = round(time.perf_counter() - t, 3)
            row["speedup"] = round(row["cocoeval_s"] / row["eval_s"], 1)
            assert row["cocoeval_ap"] == row["eval_ap"], row
        print(row, flush=True)
        rows.append(row)
    print(save("eval_dense", {"machine": machine(), "rows": rows}))


if __name__ == "__main__":
    main()
