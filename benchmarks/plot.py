"""Figures for REPORT.md from results/*.json (run after the benchmarks)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def detectron2_figure(name: str = "detectron2_vs_defaultpredictor") -> None:
    """Left: volume per second of the DefaultPredictor loop and of `run`, end to end, with mask AP50 on the same
    windows. Right: where a tile's time goes (ms per tile, per step) in the loop and in `run`'s actors."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return
    r = json.loads(path.read_text())
    runs = [k for k in r if k.startswith("run_")]
    loops = ["loop_1", "loop_2"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1.1, 1.4]})
    labels = ["DefaultPredictor\nloop (1st)", "DefaultPredictor\nloop (2nd)"] + [
        f"run {k.split('_')[1]}\nbatch {k.split('_b')[-1].replace('_', ' ')}" for k in runs]
    values = [r[k]["mvoxel_per_s"] for k in loops + runs]
    ap = [r["loop_1"]["accuracy"]["mask_ap50_mean"], None] + [r[k]["accuracy"]["mask_ap50_mean"] for k in runs]
    a.bar(labels, values, color=["#888", "#aaa"] + ["#27a", "#5c9", "#a72", "#c94"][: len(runs)])
    for i, (v, p) in enumerate(zip(values, ap)):
        a.text(i, v, f"{v:.2f}" + (f"\nAP50 {p:.3f}" if p is not None else ""), ha="center", va="bottom", fontsize=8)
    a.set_ylabel("MVoxel / s, end to end")
    a.set_ylim(0, max(values) * 1.3)
    title = (f"{'x'.join(map(str, r['shape']))}, {r['loop_1']['tiles']} tiles, {r['machine']['cpus']} cores, "
             f"device {r.get('device', 'cpu')}")  # fmt: skip
    if "predictor_on_loop_windows" in r:  # the faster model path alone, on the loop's windows (no stitching)
        title += f"\nrun's predictor on the loop's windows: AP50 {r['predictor_on_loop_windows']['mask_ap50_mean']:.3f}"
    a.set_title(title, fontsize=9)
    a.tick_params(axis="x", labelsize=7)
    steps = ["read", "normalize", "forward", "paste", "paint", "store"]
    colours = dict(zip(steps, ["#888", "#bbb", "#27a", "#5c9", "#a72", "#c94"]))
    rows = [("DefaultPredictor loop", r["loop_1"]["ms_per_tile"])] + [
        (f"run {k.split('_')[1]} b{k.split('_b')[-1]} (actor)", r[k]["ms_per_tile"]) for k in runs]
    seen: set = set()
    for y, (_, ms) in enumerate(rows):
        left = 0.0
        for step in steps:
            if step in ms:
                b.barh(y, ms[step], left=left, color=colours[step], label=None if step in seen else step)
                seen.add(step)
                left += ms[step]
        b.text(left, y, f" {left:.0f} ms", va="center", fontsize=8)
    b.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    b.invert_yaxis()
    b.set_xlabel("ms per tile in one process (forward includes detectron2's post-processing)", fontsize=8)
    b.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=110)


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
    detectron2_figure("detectron2_vs_defaultpredictor_session22")
    labels_figure()
