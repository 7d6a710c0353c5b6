"""Figures for REPORT.md from results/*.json (run after the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def detectron2_figure() -> None:
    path = RESULTS / "detectron2_vs_defaultpredictor.json"
    if not path.exists():
        return
    r = json.loads(path.read_text())
    names = ["DefaultPredictor\nloop (1st)", "DefaultPredictor\nloop (2nd)", "run, batch 4\nsteady state",
             "run, batch 1\nsteady state", "run, batch 4\npredict stage", "run, batch 1\npredict stage",
             "run, batch 4\nend to end", "run, batch 1\nend to end"]  # fmt: skip
    values = [r["baseline_1"]["tiles_per_s"], r["baseline_2"]["tiles_per_s"],
              r["run_batch4"]["predict_steady_tiles_per_s"], r["run_batch1"]["predict_steady_tiles_per_s"],
              r["run_batch4"]["predict_tiles_per_s"], r["run_batch1"]["predict_tiles_per_s"],
              r["run_batch4"]["end_to_end_tiles_per_s"], r["run_batch1"]["end_to_end_tiles_per_s"]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.bar(names, values, color=["#888", "#888", "#a72", "#c94", "#2a7", "#5c9", "#27a", "#59c"])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("tiles / s")
    ax.set_title(f"Mask R-CNN on {r['machine']['cpus']} CPU cores, {r['shape']} volume, same tiles and weights",
                 fontsize=9)  # fmt: skip
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "detectron2_throughput.png", dpi=110)


def labels_figure() -> None:
    path = RESULTS / "labels_ceiling_and_memory.json"
    if not path.exists():
        return
    r = json.loads(path.read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    for label, key, colour in (("with image copy", "ceiling", "#27a"), ("--no-image", "ceiling_no_image", "#5c9")):
        t = r[key]["time_s"]
        stages = [k for k in ("predict", "stitch_after_predict", "link", "write", "finish") if k in t]
        a.barh([f"{s}" for s in stages], [t[s] for s in stages], alpha=0.7, label=f"{label}: "
               f"{r[key]['mvoxel_per_s_end_to_end']:.1f} MVoxel/s end to end", color=colour)  # fmt: skip
    a.set_xlabel("seconds")
    a.set_title(f"labels predictor, {r['ceiling']['shape']} voxels", fontsize=9)
    a.legend(fontsize=7)
    mem = r["driver_memory"]
    b.bar([f"{m['shape'][0]}x{m['shape'][1]}x{m['shape'][2]}\n{m['mvoxel']:.0f} MVoxel" for m in mem],
          [m["driver_peak_rss_mb"] for m in mem], color="#a72")  # fmt: skip
    for i, m in enumerate(mem):
        b.text(i, m["driver_peak_rss_mb"], f"{m['driver_peak_rss_mb']:.0f} MB", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("driver peak RSS (MB)")
    b.set_title("driver memory, volumes 8x apart", fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "labels_ceiling_memory.png", dpi=110)


if __name__ == "__main__":
    detectron2_figure()
    labels_figure()
