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
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(12, 3.4), gridspec_kw={"width_ratios": [2.2, 1.2, 1]})
    stages = [s for s in r["ceiling"]["stages"] if s["span_s"]]
    colours = ["#27a", "#a72", "#888", "#2a7", "#5c9", "#c94"]
    for i, s in enumerate(stages):
        t0, t1 = s["span_s"]
        a.barh(s["name"], t1 - t0, left=t0, color=colours[i % len(colours)])
    fixed = r["ceiling"]["fixed_s"]
    a.barh("ray start", fixed["ray_start"], left=0, color="#ccc")
    a.axvline(r["ceiling"]["time_s"]["total"], color="k", lw=0.8, ls=":")
    a.invert_yaxis()
    a.set_xlabel("seconds from the run's start (stages overlap)")
    a.set_title(f"labels predictor, {'x'.join(map(str, r['ceiling']['shape']))}, 2 cores", fontsize=9)
    names = ["run\n(image copy)", "floor\n(image copy)", "run\n--no-image"]
    values = [r["ceiling"]["mvoxel_per_s_end_to_end"], r["floor"]["mvoxel_per_s"],
              r["ceiling_no_image"]["mvoxel_per_s_end_to_end"]]  # fmt: skip
    b.bar(names, values, color=["#27a", "#888", "#5c9"])
    for i, v in enumerate(values):
        b.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    b.set_ylabel("MVoxel / s, end to end")
    b.set_title(f"run / floor = {r['ceiling_over_floor']:.2f}x (same output codecs)", fontsize=9)
    b.tick_params(axis="x", labelsize=8)
    mem = r["driver_memory"]
    c.bar([f"{m['shape'][0]}x{m['shape'][1]}x{m['shape'][2]}\n{m['mvoxel']:.0f} MVoxel" for m in mem],
          [m["driver_peak_rss_mb"] for m in mem], color="#a72")  # fmt: skip
    for i, m in enumerate(mem):
        c.text(i, m["driver_peak_rss_mb"], f"{m['driver_peak_rss_mb']:.0f} MB", ha="center", va="bottom", fontsize=8)
    c.set_ylabel("driver peak RSS (MB)")
    c.set_title("driver memory, volumes 8x apart", fontsize=9)
    c.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(HERE / "labels_ceiling_memory.png", dpi=110)


if __name__ == "__main__":
    detectron2_figure()
    labels_figure()
