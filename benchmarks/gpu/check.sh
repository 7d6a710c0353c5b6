#!/usr/bin/env bash
# The GPU check, in one command, writing everything under $OUT (the device tool's output folder):
#   check.log   this script's whole output
#   summary.json  versions, steps and their seconds, training, and the benchmark's rows (DefaultPredictor loop,
#                 run fp32 and run --amp per batch size, each with mask AP50 on the same windows)
#   detectron2_vs_defaultpredictor.json  the benchmark's own result file
#   summary.png  volume per second and mask AP50 of each row
#
#   bash benchmarks/gpu/check.sh                  # on the GPU machine, after install.sh (uses .gpuvenv)
#   DEVICE=cpu bash benchmarks/gpu/check.sh       # dry run here: current venv, a few iterations, tiny shapes
#
# Settings (environment): DEVICE (cuda), SHAPE (the benchmark volume Z,Y,X), BATCH_SIZES (4,16), ITERS (800, the
# demo's), MAX_MINUTES (training stops earlier if this runs out), TRAIN_SHAPE (12,1024,1024, the demo's),
# MODEL (an existing model directory: no training), WORK (scratch, /tmp/cellseg-gpucheck), OUT, PYTHON.
set -euo pipefail
export PYTHONUNBUFFERED=1

REPO=$(cd "$(dirname "$0")/../.." && pwd)
cd "$REPO"
DEVICE=${DEVICE:-cuda}
if [[ $DEVICE == cpu ]]; then   # the dry run: checks the script's logic, not the numbers
    : "${SHAPE:=2,512,512}" "${BATCH_SIZES:=2}" "${ITERS:=10}" "${MAX_MINUTES:=3}" "${TRAIN_SHAPE:=2,512,512}"
    : "${PYTHON:=$REPO/.venv/bin/python}" "${OUT:=/tmp/cellseg-gpucheck-out}" "${BENCH_TIMEOUT:=900}"
    TRAIN_WHERE=(--cpu-procs 1)
else
    : "${SHAPE:=4,2048,2048}" "${BATCH_SIZES:=4,16}" "${ITERS:=800}" "${MAX_MINUTES:=2.5}" "${TRAIN_SHAPE:=12,1024,1024}"
    : "${PYTHON:=$REPO/.gpuvenv/bin/python}" "${BENCH_TIMEOUT:=330}"
    TRAIN_WHERE=(--num-gpus 1)
fi
OUT=${OUT:?OUT is not set: the device tool sets it; elsewhere set OUT=DIR}
WORK=${WORK:-/tmp/cellseg-gpucheck}
MODEL=${MODEL:-}
mkdir -p "$OUT" "$WORK"
LOG=$OUT/check.log
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
[[ -x $PYTHON ]] || { echo "$PYTHON is missing: run benchmarks/gpu/install.sh PART first (see README.md)"; exit 1; }
BIN=$(dirname "$PYTHON")
export PATH="$BIN:$PATH"
STEPS=$WORK/steps.tsv
: >"$STEPS"
T0=$SECONDS

step() {  # step NAME CMD...: runs CMD, records its seconds and exit status
    local name=$1 t=$SECONDS rc=0
    shift
    echo "== $name ($(date -u +%T))"
    "$@" || rc=$?
    printf '%s\t%s\t%s\n' "$name" $((SECONDS - t)) "$rc" >>"$STEPS"
    echo "   $name: $((SECONDS - t)) s, exit $rc"
    return "$rc"
}

summarize() {
    local rc=$?
    set +e
    echo "== summary (exit $rc after $((SECONDS - T0)) s)"
    "$PYTHON" - "$OUT" "$WORK" "$STEPS" "$rc" "$DEVICE" "$MODEL" "$SHAPE" <<'PYEOF'
import json, sys
from pathlib import Path

out, work, steps, rc, device, model, shape = sys.argv[1:]
out, work = Path(out), Path(work)
s = {"exit_status": int(rc), "device": device, "shape": shape,
     "steps": [dict(zip(("name", "seconds", "exit"), map(lambda v: int(v) if v.lstrip("-").isdigit() else v,
                                                           line.split("\t"))))
               for line in Path(steps).read_text().splitlines() if line]}
try:
    import torch
    s["torch"] = torch.__version__
    s["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        s["gpu"] = torch.cuda.get_device_name(0)
except Exception as e:  # noqa: BLE001
    s["torch"] = f"not importable: {e}"
model_dir = Path(model) if model else work / "model"
metrics = model_dir / "train" / "metrics.json"
if metrics.exists():
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    if rows:
        keep = ("iteration", "total_loss", "loss_mask", "time", "lr")
        s["training"] = {"model": str(model_dir), "first": {k: rows[0].get(k) for k in keep},
                         "last": {k: rows[-1].get(k) for k in keep}}
bench = out / "detectron2_vs_defaultpredictor.json"
if bench.exists():
    r = json.loads(bench.read_text())
    table = {}
    for name, row in r.items():
        if not isinstance(row, dict) or not (name.startswith("loop") or name.startswith("run_")):
            continue
        acc = row.get("accuracy") or {}
        table[name] = {"tiles": row.get("tiles"),
                       "seconds": row.get("seconds", row.get("end_to_end_s")),
                       "mvoxel_per_s": row.get("mvoxel_per_s"),
                       # the loop: windows per second of its timed part; run: the actors' steady prediction rate
                       "tiles_per_s": row.get("tiles_per_s", row.get("predict_steady_tiles_per_s")),
                       "mask_ap50_mean": acc.get("mask_ap50_mean"),
                       "ap50_minus_loop": row.get("ap50_minus_loop"),
                       "volume_per_s_vs_loop": row.get("volume_per_s_vs_loop")}
    s["benchmark"] = table
    amp = {}
    for name in table:
        if name.startswith("run_amp_"):
            fp32 = table.get(name.replace("run_amp_", "run_fp32_"))
            if fp32 and fp32["mask_ap50_mean"] is not None and table[name]["mask_ap50_mean"] is not None:
                amp[name.replace("run_amp_", "")] = {
                    "ap50_amp_minus_fp32": table[name]["mask_ap50_mean"] - fp32["mask_ap50_mean"],
                    "speed_amp_over_fp32": fp32["seconds"] / table[name]["seconds"]}
    s["amp_vs_fp32"] = amp
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(table)
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].barh(names, [table[n]["mvoxel_per_s"] or 0 for n in names])
        ax[0].set_xlabel("Mvoxel/s, end to end")
        ax[1].barh(names, [table[n]["mask_ap50_mean"] or 0 for n in names])
        ax[1].set_xlabel("mask AP50 (mean over classes; loop_2 is not scored)")
        ax[1].set_xlim(0, 1)
        ax[1].set_yticklabels([])
        fig.suptitle(f"{s.get('gpu', device)}, volume {shape}")
        fig.tight_layout()
        fig.savefig(out / "summary.png", dpi=80)
    except Exception as e:  # noqa: BLE001
        s["figure_error"] = str(e)
(out / "summary.json").write_text(json.dumps(s, indent=2) + "\n")
print(json.dumps(s, indent=2))
PYEOF
    exec >&- 2>&-   # let tee write the log's end before the device tool collects $OUT
    wait "$TEE_PID" 2>/dev/null
    exit "$rc"
}
trap summarize EXIT

echo "== cellseg-batch GPU check: DEVICE=$DEVICE SHAPE=$SHAPE BATCH_SIZES=$BATCH_SIZES ITERS=$ITERS OUT=$OUT"
echo "   $(uname -srm), $(nproc) CPUs, $(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi
else
    echo "   no nvidia-smi"
fi
"$PYTHON" - "$DEVICE" <<'PYEOF'
import sys

import torch
import torchvision

print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "torchvision", torchvision.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
print("cuda available:", torch.cuda.is_available(), "devices:", torch.cuda.device_count())
if torch.cuda.is_available():
    print("device 0:", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("DEVICE=cuda but torch sees no CUDA device")
PYEOF
step doctor cellseg-batch doctor || echo "   (doctor's complaints are reported, not fatal)"

if [[ -z $MODEL ]]; then
    # the demo's recipe (cellseg_batch/demo.py): synthetic training volume seed 1, 256 px COCO tiles with a sixth
    # of the slices for validation, configs/demo_cpu.yaml, tile 256 / overlap 32, 40,10,10 nm
    MODEL=$WORK/model
    rm -rf "$WORK/train" "$WORK/coco" "$MODEL"
    step synth-train cellseg-batch synth "$WORK/train" --shape "$TRAIN_SHAPE" --seed 1
    step convert cellseg-batch convert labels-to-coco "$WORK/train/truth.zarr" "$WORK/train/volume.tif" \
        --out "$WORK/coco" --tile 256 --val-fraction 0.1667
    VAL=()   # a tiny dry-run volume has no slice left for validation
    [[ -f $WORK/coco/val.json ]] && VAL=(--val "$WORK/coco/val.json")
    step train cellseg-batch train --train "$WORK/coco/train.json" --images "$WORK/coco/images" \
        "${VAL[@]}" --config configs/demo_cpu.yaml --out "$MODEL" "${TRAIN_WHERE[@]}" \
        --max-iter "$ITERS" --max-minutes "$MAX_MINUTES" --eval-period 0 --tile 256 --overlap 32 \
        --pixel-size 40,10,10
else
    echo "== using the model in $MODEL (no training)"
fi

step bench timeout --signal=INT --kill-after=20 "$BENCH_TIMEOUT" \
    "$PYTHON" benchmarks/bench_detectron2.py --model "$MODEL" --device "$DEVICE" --batch-sizes "$BATCH_SIZES" \
    --shape "$SHAPE" --results "$OUT"
