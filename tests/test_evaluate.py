"""Tests for cellseg_batch.evaluate on small synthetic label stacks."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from skimage.metrics import adapted_rand_error, variation_of_information

from cellseg_batch.errors import UserError
from cellseg_batch.evaluate import _MaskAP, _match, evaluate, format_table, load_scores
from cellseg_batch.read import ArrayVolume

SHAPE = (10, 64, 64)


def blobs() -> np.ndarray:
    """Four ellipsoids, ids 1..4, on a (10, 64, 64) stack."""
    zz, yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    lab = np.zeros(SHAPE, np.uint32)
    for i, (cz, cy, cx, r) in enumerate([(5, 14, 14, 8), (4, 42, 18, 9), (5, 18, 46, 9), (6, 47, 47, 7)], 1):
        lab[((zz - cz) / 4) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1] = i
    return lab


def boxes(*specs) -> np.ndarray:
    """Boxes (id, z0, z1, y0, y1, x0, x1) on a (10, 64, 64) stack."""
    lab = np.zeros(SHAPE, np.uint64)
    for i, z0, z1, y0, y1, x0, x1 in specs:
        lab[z0:z1, y0:y1, x0:x1] = i
    return lab


def run(pred, gt, **kw) -> dict:
    res = evaluate({"mito": ArrayVolume(pred)}, {"mito": ArrayVolume(gt)}, **kw)
    json.dumps(res, allow_nan=False)  # JSON-ready: no numpy types, no NaN
    return res


def test_identical_is_perfect():
    gt = blobs()
    r = run(gt.copy(), gt)["classes"]["mito"]
    assert r["ap"] == r["ap50"] == r["ap75"] == 1.0
    assert r["n_pred"] == r["n_gt"] == r["exact"] == 4
    assert r["tp"] == [4] * 10
    for key in ("precision", "recall", "f1"):
        assert r[f"{key}@0.5"] == r[f"{key}@0.5:0.95"] == 1.0
    assert r["vi_split"] == pytest.approx(0, abs=1e-12) and r["vi_merge"] == pytest.approx(0, abs=1e-12)
    assert r["are"] == pytest.approx(0, abs=1e-12)


def test_split_and_miss_counts():
    # gt: A (4x10x10 = 400 voxels), B, C. The prediction cuts A into 3 columns (120 voxels, IoU 0.3) and 7
    # (280 voxels, IoU 0.7), misses B and finds C exactly.
    a, b, c = (1, 0, 4, 0, 10, 0, 10), (2, 0, 4, 20, 30, 0, 10), (3, 5, 9, 40, 50, 40, 50)
    gt = boxes(a, b, c)
    pred = boxes((11, 0, 4, 0, 10, 0, 3), (12, 0, 4, 0, 10, 3, 10), (13, 5, 9, 40, 50, 40, 50))
    r = run(pred, gt)["classes"]["mito"]
    assert (r["n_pred"], r["n_gt"], r["exact"]) == (3, 3, 1)
    # IoU 0.7 counts at thresholds 0.5..0.7 (5 of them), the exact match at all 10
    assert r["tp"] == [2] * 5 + [1] * 5
    assert r["precision@0.5"] == r["recall@0.5"] == r["f1@0.5"] == pytest.approx(2 / 3)
    assert r["precision@0.5:0.95"] == r["recall@0.5:0.95"] == r["f1@0.5:0.95"] == pytest.approx(0.5)
    assert r["vi_split"] > 1e-3
    # a split (and a miss) leave every same-prediction voxel pair inside one gt object: precision stays 1
    assert r["are_precision"] == pytest.approx(1.0) and r["are_recall"] < 1


def test_merge():
    gt = boxes((1, 0, 4, 0, 10, 0, 10), (2, 0, 4, 0, 10, 10, 16))
    pred = boxes((7, 0, 4, 0, 10, 0, 16))  # both gt objects in one
    r = run(pred, gt)["classes"]["mito"]
    assert r["vi_merge"] > 1e-3 and r["vi_split"] == pytest.approx(0, abs=1e-12)
    assert r["are_recall"] == pytest.approx(1.0) and r["are_precision"] < 1
    assert (r["n_pred"], r["n_gt"], r["tp"][0]) == (1, 2, 1)  # IoU 400/640 with the larger object


def test_permuted_ids_score_as_identical():
    gt = blobs()
    # ids too large to pack two of them into one uint64 key exercise the rank fallback too
    new_ids = np.array([0, 2**63 + 5, 17, 2**40, 3], np.uint64)
    pred = new_ids[gt]
    assert run(pred, gt) == run(gt.copy(), gt)


def test_metrics_agree_with_whole_array_references():
    rng = np.random.default_rng(1)
    gt = blobs()
    pred = gt.copy()
    pred[:, :, 40:][pred[:, :, 40:] == 3] = 9  # a split
    pred[pred == 4] = 1  # a merge
    pred[pred == 2] = 0  # a miss
    pred[2:5, 55:62, 2:9] = 5  # a false positive
    scores = {int(i): float(rng.random()) for i in np.unique(pred) if i}
    r = run(pred, gt, scores={"mito": scores})["classes"]["mito"]
    split, merge = variation_of_information(gt, pred)
    are, sk_prec, sk_rec = adapted_rand_error(gt, pred)
    assert (r["vi_split"], r["vi_merge"]) == pytest.approx((split, merge))
    # skimage returns precision and recall swapped (scikit-image #6485); the result carries the documented ones
    assert (r["are"], r["are_precision"], r["are_recall"]) == pytest.approx((are, sk_rec, sk_prec))
    assert r["ap"] == pytest.approx(coco_ap(pred, gt, scores))


def coco_set(lab: np.ndarray, zs, scores: dict | None = None, label_ids: bool = False) -> COCO:
    """Slices ``zs`` of a label stack as a COCO set, each slice an image, masks encoded by pycocotools itself.
    Annotation ids count up, or are the label ids (``label_ids``: one slice only, as ids must be unique)."""
    anns = []
    for z in zs:
        for i in np.setdiff1d(lab[z], [0]):
            m = np.asfortranarray((lab[z] == i).astype(np.uint8))
            ann = {"id": int(i) if label_ids else len(anns) + 1, "image_id": z, "category_id": 1,
                   "segmentation": mask_utils.encode(m), "area": int(m.sum()), "iscrowd": 0}  # fmt: skip
            anns.append(ann | ({} if scores is None else {"score": scores[int(i)]}))
    c = COCO()
    images = [{"id": z, "height": lab.shape[1], "width": lab.shape[2]} for z in zs]
    c.dataset = {"images": images, "categories": [{"id": 1}], "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def coco_ap(pred, gt, scores) -> float:
    """AP of one standard COCOeval over all slices at once (its default maxDets of 100 per slice is plenty here)."""
    zs = range(len(gt))
    with contextlib.redirect_stdout(io.StringIO()):
        e = COCOeval(coco_set(gt, zs), coco_set(pred, zs, scores), "segm")
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats[0]


def test_ap_counts_every_instance_of_a_crowded_slice():
    # 256 instances on one slice: COCO's default cap of 100 detections per image would leave AP near 0.4
    lab = np.zeros((1, 64, 64), np.uint16)
    lab[0] = (np.arange(64)[:, None] // 4) * 16 + np.arange(64)[None, :] // 4 + 1
    r = run(lab.copy(), lab)["classes"]["mito"]
    assert r["n_gt_masks"] == r["n_pred_masks"] == 256
    assert r["ap"] == 1.0


def coco_records(pred: np.ndarray, gt: np.ndarray, scores: dict) -> list[dict]:
    """COCOeval's own per-slice match records, every detection kept, annotation ids = label ids."""
    out = []
    for z in range(len(gt)):
        with contextlib.redirect_stdout(io.StringIO()):
            e = COCOeval(coco_set(gt, [z], label_ids=True), coco_set(pred, [z], scores, label_ids=True), "segm")
            e.params = _MaskAP.params([z])
            e.evaluate()
        out.extend(r for r in e.evalImgs if r is not None)
    return out


def test_ap_match_records_are_cocoevals_own():
    """The sparse matching gives COCOeval.evaluateImg's records exactly: ties in score (load order), an exact IoU
    tie at 0.5 (the later gt wins), splits, merges, shifts, misses and false positives; and the same AP."""
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 9, (6, 6, 6))
    coarse[coarse > 6] = 0
    gt = np.kron(coarse, np.ones((1, 5, 5), np.int64)).astype(np.uint16)
    for z in range(len(gt)):
        gt[z][gt[z] > 0] += 10 * z  # each slice its own ids
    pred = np.roll(gt, 2, axis=2) * 3  # shifted, other ids
    pred[1][pred[1] == pred[1].max()] = 0  # a miss
    pred[2, :4, :4] = 999  # a false positive over parts of several objects
    pred[3, :, 15:][pred[3, :, 15:] > 0] += 1  # splits
    # an exact tie at IoU 0.5: one 4-pixel detection holds two 2-pixel gt objects whole
    gt[5], pred[5] = 0, 0
    gt[5, 0, 0:2], gt[5, 0, 2:4], pred[5, 0, 0:4] = 1, 2, 7
    ids = np.unique(pred)[1:]
    scores = {int(i): float(rng.choice([0.3, 0.6, 0.9])) for i in ids}  # few values: many ties
    ap = _MaskAP(scores)
    for z in range(len(gt)):
        ap.add(z, pred[z], gt[z])
    expected = coco_records(pred, gt, scores)
    assert len(ap.records) == len(expected) == len(gt)
    for mine, theirs in zip(ap.records, expected):
        for key in ("dtIds", "gtIds", "dtScores"):
            assert list(mine[key]) == list(theirs[key]), key
        for key in ("dtMatches", "gtMatches", "dtIgnore", "gtIgnore"):
            np.testing.assert_array_equal(np.asarray(mine[key], float), np.asarray(theirs[key], float), key)
    assert expected[-1]["dtMatches"][0].tolist() == [2.0]  # the tie went to the later gt, in both
    reference = COCOeval(iouType="segm")
    reference.params = _MaskAP.params(list(range(len(gt))))
    reference._paramsEval, reference.evalImgs = reference.params, expected
    with contextlib.redirect_stdout(io.StringIO()):
        reference.accumulate()
    precision = reference.eval["precision"][:, :, 0, 0, -1]
    assert ap.result()["ap"] == pytest.approx(float(precision[precision > -1].mean()))


def test_scores_rank_false_positives():
    gt = boxes((1, 0, 1, 0, 10, 0, 10), (2, 0, 1, 20, 30, 0, 10), (3, 0, 1, 40, 50, 40, 50))
    pred = gt.copy()
    pred[0, 50:60, 0:10] = 4  # a false positive
    low = run(pred, gt, scores={"mito": {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.1}})["classes"]["mito"]
    high = run(pred, gt, scores={"mito": {1: 0.9, 2: 0.9, 3: 0.9, 4: 0.99}})["classes"]["mito"]
    assert low["ap"] == pytest.approx(1.0)
    assert high["ap"] < 0.9
    unscored = run(pred, gt, scores={"mito": {1: 0.9, 2: 0.9}})["classes"]["mito"]
    assert unscored["n_unscored"] == 2


def test_ap_without_scores_does_not_depend_on_how_the_ids_are_numbered():
    """A label image from another tool has no scores: its detections are not ranked, so AP is that of one operating
    point, the same whatever the ids. COCO's ranking of tied detections by id gave 1.0 or 0.5 for one true and one
    false object; the one point equals COCO's AP with the false detections ranked first (the pessimistic order
    reaches the same precision envelope)."""
    gt = boxes((1, 0, 4, 0, 10, 0, 10), (2, 0, 4, 20, 30, 0, 10), (3, 0, 4, 40, 50, 40, 50))
    pred = gt.copy()
    pred[pred == 3] = 0  # a miss
    pred[0:2, 50:60, 0:10] = 4  # a false positive in two slices
    swapped = np.array([0, 4, 2, 3, 1], np.uint64)[pred]  # the same detections, the false one numbered first
    one, two = (run(p, gt)["classes"]["mito"] for p in (pred, swapped))
    assert one["ap_ranking"] == two["ap_ranking"] == "one operating point"
    assert (one["ap"], one["ap50"], one["ap75"]) == (two["ap"], two["ap50"], two["ap75"])
    # 8 true masks of 12 gt masks, 8 of 10 detections: precision 0.8 up to recall 2/3 (67 of 101 thresholds)
    assert one["ap50"] == pytest.approx(0.8 * 67 / 101)
    assert one["ap"] == pytest.approx(coco_ap(pred, gt, {1: 0.5, 2: 0.5, 4: 0.9}))
    ranked = run(pred, gt, scores={"mito": {1: 0.5, 2: 0.5, 4: 0.9}})["classes"]["mito"]
    assert ranked["ap_ranking"] == "scores" and ranked["ap"] == pytest.approx(one["ap"])


def test_2d_mode_treats_slices_independently():
    # gt reuses id 1 for a different object in every slice; the prediction gives each its own id
    gt = np.zeros(SHAPE, np.uint16)
    pred = np.zeros(SHAPE, np.uint16)
    for z in range(SHAPE[0]):
        x0 = 5 * z
        gt[z, 10:20, x0 : x0 + 8] = 1
        pred[z, 10:20, x0 : x0 + 8] = 100 + z
    r2 = run(pred, gt, mode="2d")["classes"]["mito"]
    assert (r2["n_pred"], r2["n_gt"], r2["exact"]) == (10, 10, 10)
    assert r2["f1@0.5:0.95"] == 1.0 and r2["ap"] == 1.0
    assert r2["vi_split"] == pytest.approx(0, abs=1e-12) and r2["are"] == pytest.approx(0, abs=1e-12)
    # in 3D the gt is one object cut into ten predictions: no match, a large split
    r3 = run(pred, gt)["classes"]["mito"]
    assert (r3["n_pred"], r3["n_gt"], r3["tp"][0]) == (10, 1, 0)
    assert r3["vi_split"] > 1e-3 and r3["ap"] == 1.0  # 2D masks are unaffected


def test_assignment_maximizes_matches():
    # pred 0 fits gt 0 (IoU 0.5) and gt 1 (0.55); pred 1 fits only gt 1. Greedy by IoU would pair pred 0 with
    # gt 1 and stop at one match; the assignment finds two.
    pp, gg, iou = np.array([0, 0, 1]), np.array([0, 1, 1]), np.array([0.5, 0.55, 0.5])
    assert sorted(zip(*map(list, _match(pp, gg, iou, 0.5)))) == [(0, 0), (1, 1)]
    assert list(map(list, _match(pp, gg, iou, 0.55))) == [[0], [1]]
    assert list(map(len, _match(pp, gg, iou, 0.6))) == [0, 0]


def test_slices_restrict_evaluation():
    gt = blobs()
    pred = gt.copy()
    pred[6:] = 0
    assert run(pred, gt, slices=range(0, 6))["classes"]["mito"]["vi"] == pytest.approx(0, abs=1e-12)
    assert run(pred, gt)["classes"]["mito"]["vi"] > 0
    with pytest.raises(UserError, match="out of range"):
        run(pred, gt, slices=range(5, 12))


def test_class_matching_and_table():
    gt, pred = blobs(), blobs()
    res = evaluate(
        {"mito": ArrayVolume(pred), "er": ArrayVolume(pred)},
        {"mito": ArrayVolume(gt), "cell": ArrayVolume(np.zeros(SHAPE, np.uint8))},
    )
    assert list(res["classes"]) == ["mito"]
    assert res["unmatched"] == {"pred_only": ["er"], "gt_only": ["cell"]}
    assert res["mean"]["f1@0.5"] == 1.0 and res["mean"]["n_gt"] == 4
    table = format_table(res)
    assert "mito" in table and "mean" in table and "only in the prediction: er" in table
    with pytest.raises(UserError, match=r"\['er'\].*\['cell'\]"):
        evaluate({"er": ArrayVolume(pred)}, {"cell": ArrayVolume(gt)})


def test_shape_mismatch():
    with pytest.raises(UserError, match=r"\(10, 64, 64\).*\(10, 64, 32\)"):
        evaluate({"mito": ArrayVolume(blobs())}, {"mito": ArrayVolume(blobs()[:, :, :32])})


def test_empty_class_metrics_are_none():
    empty = np.zeros(SHAPE, np.uint8)
    r = run(empty, empty)["classes"]["mito"]
    assert r["ap"] is None and r["f1@0.5"] is None and r["are"] is None
    assert "-" in format_table(run(empty, empty))


def test_label_stacks_from_files(tmp_path):
    import tifffile

    from cellseg_batch.read import class_volumes, open_label_layers

    gt = blobs()
    tifffile.imwrite(tmp_path / "gt.tif", gt.astype(np.uint16))
    pred = gt.copy()
    pred[pred == 4] = 0  # miss one "er" object
    tifffile.imwrite(tmp_path / "pred.tif", pred.astype(np.uint16))
    (tmp_path / "classes.json").write_text(json.dumps({"1": "mito", "2": "mito", "3": "er", "4": "er"}))
    label_set = [
        class_volumes(open_label_layers([str(tmp_path / f)], [str(tmp_path / "classes.json")]))
        for f in ("pred.tif", "gt.tif")
    ]
    res = evaluate(*label_set)
    assert sorted(res["classes"]) == ["er", "mito"]
    assert res["classes"]["mito"]["f1@0.5"] == 1.0
    assert (res["classes"]["er"]["n_pred"], res["classes"]["er"]["n_gt"]) == (1, 2)
    assert res["mean"]["recall@0.5"] == pytest.approx(0.75)


def test_load_scores(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "id": pa.array([1, 2, 7], pa.uint64()),
            "class": ["mito", "mito", "er"],
            "score": [0.5, 0.25, 1.0],
            "volume": [1, 2, 3],
        }
    )
    pq.write_table(table, tmp_path / "objects.parquet")
    pcsv.write_csv(table, tmp_path / "objects.csv")
    expected = {"mito": {1: 0.5, 2: 0.25}, "er": {7: 1.0}}
    assert load_scores(tmp_path / "objects.parquet") == expected
    assert load_scores(tmp_path / "objects.csv") == expected
    pq.write_table(table.drop(["score"]), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="score"):
        load_scores(tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="does not exist"):
        load_scores(tmp_path / "missing.parquet")


@pytest.fixture(scope="module")
def sparse_truth(tmp_path_factory):
    """A 12-slice volume of four boxes through every slice, its run with the full truth as the prediction (exact),
    and a truth annotated at slices 2, 6, 9 only and one at blocks 0:3 and 7:10 only (0 elsewhere)."""
    import tifffile

    from conftest import cli

    root = tmp_path_factory.mktemp("sparse")
    full = np.zeros((12, 64, 64), np.uint16)
    for i, (y, x) in enumerate([(4, 4), (4, 36), (36, 4), (36, 36)], 1):
        full[:, y : y + 20, x : x + 20] = i
    tifffile.imwrite(root / "full.tif", full, photometric="minisblack")
    for name, keep in (("slices.tif", [2, 6, 9]), ("blocks.tif", [0, 1, 2, 7, 8, 9])):
        sparse = np.zeros_like(full)
        sparse[keep] = full[keep]
        tifffile.imwrite(root / name, sparse, photometric="minisblack")
    cli("run", root / "full.tif", "--predictor", "labels", "--labels", root / "full.tif", "--classes", "cell",
        "--tile", 32, "--overlap", 8, "--out", root / "pred.zarr", "--no-progress", "--no-image")  # fmt: skip
    return root


def test_eval_of_a_few_annotated_slices_scores_them_alone(sparse_truth):
    from conftest import cli

    root = sparse_truth
    cli("eval", root / "pred.zarr", root / "slices.tif", "--gt-classes", "cell", "--slices", "9,2,6,2", "--mode", "2d",
        "--json", root / "e.json")  # fmt: skip
    result = json.loads((root / "e.json").read_text())
    r = result["classes"]["cell"]
    assert (result["slices"], result["n_slices"], result["warnings"]) == ("2,6,9", 3, [])
    assert r["f1@0.5"] == 1.0 and r["ap50"] == 1.0 and (r["n_pred"], r["n_gt"]) == (12, 12)


def test_eval_in_3d_scores_each_run_of_listed_slices_as_its_own_sub_volume(sparse_truth):
    from conftest import cli

    root = sparse_truth
    proc = cli("eval", root / "pred.zarr", root / "blocks.tif", "--gt-classes", "cell", "--slices", "0:3,7:10",
               "--json", root / "e.json")  # fmt: skip
    result = json.loads((root / "e.json").read_text())
    r = result["classes"]["cell"]
    # each box is one object in each block (cut at the block's ends), found exactly
    assert (result["n_runs"], r["n_pred"], r["n_gt"], r["exact"], r["f1@0.5"]) == (2, 8, 8, 8, 1.0)
    assert "within each of 2 runs of slices" in proc.stdout


def test_eval_warns_where_the_truth_is_empty_in_some_slices(sparse_truth):
    from conftest import cli

    root = sparse_truth
    proc = cli("eval", root / "pred.zarr", root / "slices.tif", "--gt-classes", "cell", "--mode", "2d",
               "--json", root / "e.json")  # fmt: skip
    warning = ("ground truth is empty in 9 of 12 slices; if only slices 2,6,9 were annotated, evaluate them alone "
               "with --slices 2,6,9")  # fmt: skip
    assert proc.stderr.strip() == f"cellseg-batch: warning: {warning}"
    result = json.loads((root / "e.json").read_text())
    assert result["warnings"] == [warning] and result["gt_annotated_slices"] == "2,6,9"
    assert result["classes"]["cell"]["precision@0.5"] == pytest.approx(0.25)  # scores unchanged: a warning only
    blocks = cli("eval", root / "pred.zarr", root / "blocks.tif", "--gt-classes", "cell")
    assert "empty in 6 of 12 slices; if only slices 0:3,7:10 were annotated" in blocks.stderr
    assert cli("eval", root / "pred.zarr", root / "full.tif", "--gt-classes", "cell").stderr == ""


def test_slices_given_as_any_list_are_scored_alone():
    gt = blobs()
    pred = gt.copy()
    pred[[1, 3, 7]] = 0  # lost where the list does not look
    r = run(pred, gt, slices=[6, 0, 2, 0], mode="2d")
    assert (r["slices"], r["n_slices"]) == ("0,2,6", 3) and r["classes"]["mito"]["f1@0.5"] == 1.0
    with pytest.raises(UserError, match="out of range"):
        run(pred, gt, slices=[0, 10])


def test_the_warning_of_many_annotated_slices_stays_readable():
    gt = np.zeros((60, 8, 8), np.uint8)
    gt[::4, 2:6, 2:6] = 1  # 15 single annotated slices
    res = evaluate({"mito": ArrayVolume(gt.copy())}, {"mito": ArrayVolume(gt)})
    assert res["gt_annotated_slices"] == ",".join(str(z) for z in range(0, 60, 4))
    (warning,) = res["warnings"]
    assert warning.startswith("ground truth is empty in 45 of 60 slices; if only those 15 slices (0,4,8,")
    assert "44,...)" in warning and "gt_annotated_slices" in warning and "52" not in warning


def test_another_tools_3d_segmentation_is_scored_by_its_own_ids(tmp_path):
    """``eval PRED --pred-classes``: another tool's label stack, its objects as that tool made them. Two objects
    stacked end to end with one footprint stay two (``run --predictor labels`` would link them into one)."""
    import tifffile

    from conftest import cli

    truth = np.zeros((6, 48, 48), np.uint16)
    truth[:3, 8:24, 8:24], truth[3:, 8:24, 8:24], truth[:, 30:44, 30:44] = 1, 2, 3
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    tifffile.imwrite(tmp_path / "other.tif", (truth * 7).astype(np.uint32), photometric="minisblack")  # own ids
    cli("eval", tmp_path / "other.tif", tmp_path / "truth.tif", "--pred-classes", "mito", "--gt-classes", "mito",
        "--json", tmp_path / "e.json")  # fmt: skip
    r = json.loads((tmp_path / "e.json").read_text())["classes"]["mito"]
    assert (r["n_pred"], r["n_gt"], r["f1@0.5"]) == (3, 3, 1.0)
    refused = cli("eval", tmp_path / "other.tif", tmp_path / "truth.tif", "--gt-classes", "mito", check=False)
    assert refused.returncode == 2 and "--pred-classes" in refused.stderr, refused.stderr


@pytest.mark.parametrize("background", [-1, 65535])
def test_eval_refuses_ground_truth_whose_background_is_not_0(tmp_path, background):
    """A truth stack with background -1 (int32) or 65535 (uint16), as `run --labels` refuses it: scored, the
    background would be one more true object in every slice."""
    import tifffile

    from conftest import cli

    pred = np.zeros((3, 64, 64), np.uint16)
    pred[:, 8:24, 8:24] = 1
    truth = np.where(pred > 0, 1, background).astype(np.int32 if background < 0 else np.uint16)
    tifffile.imwrite(tmp_path / "pred.tif", pred, photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    done = cli("eval", tmp_path / "pred.tif", tmp_path / "truth.tif", "--pred-classes", "cell", "--gt-classes", "cell",
               check=False)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "truth.tif" in done.stderr and "set it to 0 first" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_split_and_merge_lists_follow_their_definition_worst_first_and_stay_short():
    """Splits and merges as defined (a part: an object with at least half its voxels inside the other side's),
    checked against a plain count per object pair; a merge of 40 gt objects lists its 10 largest and counts 40."""
    from cellseg_batch.evaluate import MAX_PARTS

    rng = np.random.default_rng(4)
    gt = np.kron(rng.permutation(8 * 8 * 8).reshape(2, 16, 16) + 1, np.ones((3, 4, 4), np.int64)).astype(np.uint32)
    pred = gt * 4
    for i in rng.choice(np.unique(gt), 60, replace=False):  # splits into 2-3 parts along z or y
        zz, yy, _ = np.nonzero(gt == i)
        pred[gt == i] = i * 4 + (zz > zz.min()) + (yy > yy.min() + 1 if i % 3 == 0 else 0)
    pred[np.isin(gt, np.unique(gt)[-40:])] = 10**6  # one merge of 40 objects
    pred[np.isin(gt, np.unique(gt)[-44:-40])] = 10**6 + 1  # and one of 4
    errors = evaluate({"m": ArrayVolume(pred)}, {"m": ArrayVolume(gt)})["classes"]["m"]["errors"]
    for kind, whole, part, key in (("splits", gt, pred, "gt"), ("merges", pred, gt, "pred")):
        pairs = {}
        for w, q in zip(whole.ravel(), part.ravel()):
            pairs[w, q] = pairs.get((w, q), 0) + 1
        size = dict(zip(*np.unique(part, return_counts=True)))
        found = {}
        for (w, q), k in pairs.items():
            if w and q and k >= 0.5 * size[q]:
                found.setdefault(int(w), []).append((-k, int(q)))
        expected = {w: sorted(v) for w, v in found.items() if len(v) >= 2}
        order = sorted(expected, key=lambda w: (expected[w][1][0], w))[:50]
        assert errors[f"n_{kind}"] == len(expected)
        assert [e[key] for e in errors[kind]] == order
        for e in errors[kind]:
            assert e["n_parts"] == len(expected[e[key]])
            assert [(-p["voxels"], p["id"]) for p in e["parts"]] == expected[e[key]][:MAX_PARTS]
    big = next(m for m in errors["merges"] if m["pred"] == 10**6)
    assert big["n_parts"] == 40 and len(big["parts"]) == MAX_PARTS
    table = format_table(evaluate({"m": ArrayVolume(pred)}, {"m": ArrayVolume(gt)}))
    assert "and 36 more" in table


def test_false_and_missed_objects_name_the_class_they_are_in_the_truth(monkeypatch):
    """A false object of one class that is a gt object of another (IoU >= 0.5 in 3D) is a class mistake: listed on
    both sides; a false object with nothing under it, and one that duplicates a found object of another class, are
    told apart; slices given as two runs cut objects into one per run, each matched on its own."""
    shape = (6, 40, 40)
    gm, gg, pm, pg = (np.zeros(shape, np.uint16) for _ in range(4))
    gm[0:4, 2:8, 2:8] = pm[0:4, 2:8, 2:8] = 1  # a mitochondrion found
    gg[1:5, 12:18, 2:8] = 7  # a granule ...
    pm[1:5, 12:18, 2:9] = 5  # ... called a mitochondrion, one column wider: IoU 144 / 168
    pm[2, 30:34, 30:34] = 6  # a false object over nothing
    gg[0:3, 22:28, 22:28] = pg[0:3, 22:28, 22:28] = 8  # a granule found, and also called a mitochondrion
    pm[0:3, 22:28, 22:28] = 9
    gg[0:6, 30:36, 2:8] = 3  # a granule missed
    r = evaluate({"mito": ArrayVolume(pm), "granule": ArrayVolume(pg)}, {"mito": ArrayVolume(gm), "granule": ArrayVolume(gg)})
    mito, gran = r["classes"]["mito"]["errors"], r["classes"]["granule"]["errors"]
    assert (mito["n_false"], mito["n_false_other_class"], mito["n_missed"]) == (3, 2, 0)
    assert [(f["id"], f["voxels"], f["slices"], f.get("truth")) for f in mito["false"]] == [
        (5, 168, [1, 4], {"class": "granule", "gt": 7, "iou": round(144 / 168, 3)}),
        (9, 108, [0, 2], {"class": "granule", "gt": 8, "iou": 1.0}),
        (6, 16, [2, 2], None),
    ]
    assert (gran["n_false"], gran["n_missed"], gran["n_missed_other_class"]) == (0, 2, 1)
    # class mistakes are listed first (the table names them), then the largest: 7 before the larger 3
    assert [(m["gt"], m["slices"], m.get("predicted_as")) for m in gran["missed"]] == [
        (7, [1, 4], {"class": "mito", "pred": 5, "iou": round(144 / 168, 3)}), (3, [0, 5], None)]
    text = format_table(r)
    assert "mito: 3 false object(s), 2 of them other classes in the truth: pred 5 is granule 7 (z 1-4); pred 9 is granule 8 (z 0-2)" in text
    assert "granule: 0 false object(s)  2 missed (1 found as another class)" in text
    # where more are false than are listed, the class mistakes are among those listed (they were left out, by size,
    # and the table said '2 of them other classes in the truth: ; ...')
    monkeypatch.setattr("cellseg_batch.evaluate.MAX_LISTED", 1)
    few = evaluate({"mito": ArrayVolume(pm), "granule": ArrayVolume(pg)},
                   {"mito": ArrayVolume(gm), "granule": ArrayVolume(gg)})  # fmt: skip
    assert [m["gt"] for m in few["classes"]["granule"]["errors"]["missed"]] == [7]
    monkeypatch.undo()
    # two runs of slices: 0-2 and 4-5; the mistaken granule is two objects in each class, both mistaken
    r = evaluate({"mito": ArrayVolume(pm), "granule": ArrayVolume(pg)}, {"mito": ArrayVolume(gm), "granule": ArrayVolume(gg)},
                 slices=[0, 1, 2, 4, 5])  # fmt: skip
    mito, gran = r["classes"]["mito"]["errors"], r["classes"]["granule"]["errors"]
    assert sorted((f["id"], f["slices"], f.get("truth", {}).get("gt")) for f in mito["false"]) == [
        (5, [1, 2], 7), (5, [4, 4], 7), (6, [2, 2], None), (9, [0, 2], 8)]
    assert (gran["n_missed"], gran["n_missed_other_class"]) == (4, 2)  # granule 3 in both runs, 7 in both


def test_labels_numbered_anew_in_every_slice_are_refused_for_a_3d_score(tmp_path):
    """Ground truth whose ids restart in every slice (per-slice masks of Cellpose or a 2D annotation tool) was scored
    as 3D objects: id k of each slice one object through z (ISBI's neurites numbered so: F1 0.38 against themselves).
    A 3D score refuses it and names --mode 2d, which scores it; 3D labels of the same objects pass."""
    import tifffile
    from scipy import ndimage

    from conftest import cli

    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[:128, :128]
    truth = np.zeros((12, 128, 128), np.uint16)
    for k in range(1, 41):  # granules of 2-4 slices, here and there
        (cy, cx), z0, n = rng.integers(8, 120, 2), int(rng.integers(0, 10)), int(rng.integers(2, 5))
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= 25
        if not truth[z0 : z0 + n][:, ndimage.binary_dilation(disc, iterations=2)].any():  # apart from the others
            truth[z0 : z0 + n][:, disc] = k
    per_slice = np.stack([ndimage.label(s > 0)[0] for s in truth]).astype(np.uint16)
    for name, data in (("truth", truth), ("per_slice", per_slice)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, photometric="minisblack")
    args = ("--pred-classes", "granule", "--gt-classes", "granule")
    proc = cli("eval", tmp_path / "truth.tif", tmp_path / "per_slice.tif", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "per_slice.tif: its ids restart in every slice" in proc.stderr and "--mode 2d" in proc.stderr
    proc = cli("eval", tmp_path / "per_slice.tif", tmp_path / "truth.tif", *args, check=False)  # as the prediction
    assert proc.returncode == 2 and "per_slice.tif: its ids restart in every slice" in proc.stderr
    scored = cli("eval", tmp_path / "truth.tif", tmp_path / "per_slice.tif", *args, "--mode", "2d").stdout
    assert re.search(r"^granule +1\.000 ", scored, re.M), scored
    assert re.search(r"^granule +1\.000 ", cli("eval", tmp_path / "truth.tif", tmp_path / "truth.tif", *args).stdout,
                     re.M)  # fmt: skip
    # each section its own id, numbered through the stack (ISBI 2012's truth): scored, with a warning naming --mode 2d
    through = per_slice.astype(np.uint32)
    for z in range(1, len(through)):
        through[z][through[z] > 0] += through[:z].max()
    tifffile.imwrite(tmp_path / "through.tif", through, photometric="minisblack")
    proc = cli("eval", tmp_path / "truth.tif", tmp_path / "through.tif", *args)
    assert "through.tif: none of its" in proc.stderr and "goes on into the next slice" in proc.stderr, proc.stderr
    assert "per slice with --mode 2d" in proc.stderr
    assert "none of its" not in cli("eval", tmp_path / "truth.tif", tmp_path / "truth.tif", *args).stderr


def test_errors_of_a_run_of_part_of_the_volume_name_the_volumes_slices(tmp_path):
    """A run of --slices 2:5 scored against the whole volume's truth: its missed object lies in volume slices 3-4,
    and the errors say so, as the header's slices do (they said 1-2, the run's own numbers)."""
    import tifffile

    from conftest import cli

    labels = np.zeros((6, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    truth = labels.copy()
    truth[3:5, 40:50, 40:50] = 2  # not in the labels the run links: missed
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "truth.tif", truth, photometric="minisblack")
    out = tmp_path / "out.zarr"
    cli("run", tmp_path / "labels.tif", "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes",
        "cell", "--slices", "2:5", "--out", out, "--no-progress")  # fmt: skip
    cli("eval", out, tmp_path / "truth.tif", "--gt-classes", "cell", "--json", tmp_path / "e.json")
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["slices"] == "2:5"
    assert [(m["gt"], m["slices"]) for m in result["classes"]["cell"]["errors"]["missed"]] == [(2, [3, 4])]
