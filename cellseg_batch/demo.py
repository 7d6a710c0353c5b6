"""Demo: the whole workflow on synthetic EM, on a CPU: synthesize -> COCO -> train -> run -> eval -> picture."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# Sized for a 2-core CPU: the training slices give 256 px tiles (cells span tiles: stitching is exercised), the
# test volume is a different seed.
TRAIN_SHAPE = (12, 1024, 1024)
TEST_SHAPE = (10, 768, 768)
TILE = 256
# The synthetic cells are stacked in z one empty slice apart, which a gap link (for missed detections) would join;
# the demo model finds every cell section, so cells get no gap (see cellseg_batch/link.py, rule 3).
LINK_GAP = "cell=0,2"


def demo(out: str | Path, iterations: int = 720, overwrite: bool = True) -> dict:
    from .coco import labels_to_coco
    from .config import RunConfig
    from .evaluate import evaluate_paths, format_table
    from .read import ngff_label_layers, open_volume
    from .run import run
    from .synth import write_synthetic
    from .train import TrainConfig, train

    out = Path(out)
    config = CONFIGS / "demo_cpu.yaml"
    if not config.exists():
        raise UserError(f"{config} is missing; run the demo from a checkout of cellseg-batch")
    times = {}

    def step(name: str, fn):
        print(f"== {name}", flush=True)
        t = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - t, 1)
        return result

    train_data = step("synthesize training volume", lambda: write_synthetic(out / "train", TRAIN_SHAPE, seed=1, overwrite=overwrite))
    coco = step("convert its labels to COCO", lambda: labels_to_coco(
        open_volume(train_data["volume"]), ngff_label_layers(str(train_data["truth"])), out / "coco", tile=TILE,
        val_fraction=1 / 6, overwrite=overwrite))  # fmt: skip
    model = out / "model"
    if model.exists() and overwrite:
        import shutil

        shutil.rmtree(model)
    step("train Mask R-CNN on the CPU", lambda: train(TrainConfig(
        train=str(coco["train"]), images=str(coco["images"]), val=str(coco["val"]), config=str(config),
        out=str(model), max_iter=iterations, eval_period=0, tile=TILE, overlap=32, amp=True,
        pixel_size=",".join(str(v) for v in (40.0, 10.0, 10.0)))))  # fmt: skip
    from .model_dir import ModelDir

    if ModelDir.load(model).training.get("stopped_by_signal"):  # SIGTERM stopped the training: stop the demo too
        raise KeyboardInterrupt
    test_data = step("synthesize a test volume", lambda: write_synthetic(out / "test", TEST_SHAPE, seed=2, overwrite=overwrite))
    seg = out / "test.seg.zarr"
    step("segment it: cellseg-batch run", lambda: run(RunConfig(
        volume=str(test_data["volume"]), model=str(model), out=str(seg), overwrite=True, link_gap=LINK_GAP)))  # fmt: skip
    result = step("evaluate against the ground truth", lambda: evaluate_paths(str(seg), str(test_data["truth"])))
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result))
    per_class = {c: {"mask_ap50": r["ap50"], "f1_3d@0.5": r["f1@0.5"], "objects": r["n_pred"], "true": r["n_gt"],
                     "false": r["errors"]["n_false"], "false_other_class": r["errors"]["n_false_other_class"],
                     "missed": r["errors"]["n_missed"], "splits": r["errors"]["n_splits"], "merges": r["errors"]["n_merges"]}
                 for c, r in result["classes"].items()}  # fmt: skip
    summary = {"times_s": times, "mask_ap50_mean": result["mean"]["ap50"], "mask_ap_mean": result["mean"]["ap"],
               "f1_3d_mean": result["mean"]["f1@0.5"], "classes": per_class,
               "run_report": str(seg / "cellseg" / "report.json"),
               "run_report_html": str(seg / "cellseg" / "report.html")}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    scores = "\n".join(f"  {c:<20} mask AP50 {v['mask_ap50']:.3f}   3D F1@0.5 {v['f1_3d@0.5']:.3f} "
                       f"({v['objects']} objects for {v['true']} true: {_errors_text(v)})" for c, v in per_class.items())  # fmt: skip
    print(f"""
demo finished in {sum(times.values()):.0f} s; mean over classes: mask AP50 {result['mean']['ap50']:.3f} (2D, per slice),
3D F1@0.5 {result['mean']['f1@0.5']:.3f} (whole objects: a split or a merge counts against it)
{scores}
  model      {model}/ (cellseg.json, config.yaml, model_final.pth; training log in {model}/train/)
  volume     {test_data['volume']} (truth: {test_data['truth']})
  result     {seg}  (OME-Zarr: labels/<class>/, cellseg/objects.parquet, cellseg/report.json)
  picture    {seg}/cellseg/preview.png
  report     {seg}/cellseg/report.html  (look at the result: cellseg-batch view {seg})
  scores     {out}/eval.json
""")
    return summary


def _errors_text(v: dict) -> str:
    """What a class's 3D F1 lost, in words: false objects (and how many are another class's), misses, splits,
    merges (``eval --json`` lists each)."""
    other = f" ({v['false_other_class']} are another class in the truth)" if v["false_other_class"] else ""
    parts = [f"{v['false']} false{other}" if v["false"] else "", f"{v['missed']} missed" if v["missed"] else "",
             f"{v['splits']} split" if v["splits"] else "", f"{v['merges']} merged" if v["merges"] else ""]  # fmt: skip
    return ", ".join(p for p in parts if p) or "none wrong"
