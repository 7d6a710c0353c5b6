"""`run --rescale` on volumes at other pixel sizes than the model's: the same synthetic scene drawn at 20, 10 and 5 nm
pixels (``synth --scale``), segmented by a model trained at 10 nm, with and without ``--rescale``; mask AP50 and 3D
F1@0.5 against each volume's own truth.

Usage: ``python benchmarks/bench_rescale.py --model demo/model`` (a `make demo` model). Writes
``results/rescale.json``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, segment_and_score  # noqa: E402

from cellseg_batch.synth import write_synthetic  # noqa: E402

SHAPE = (10, 768, 768)  # the demo's test volume at scale 1 (10 nm pixels)
SEED = 2
LINK_GAP = "cell=0,2"  # as the demo (its synthetic cells are stacked one empty slice apart)


def one(model: str, data: dict, out: Path, rescale: bool) -> dict:
    seconds, report, result = segment_and_score(data, out, model=model, link_gap=LINK_GAP, rescale=rescale)
    return {"rescale": rescale, "seconds": round(seconds, 1), "tile": report["plan"]["tile"],
            "overlap": report["plan"]["overlap"], "tiles_per_slice": report["plan"]["tiles_per_slice"],
            "mask_ap50_mean": round(result["mean"]["ap50"], 3), "f1_3d_mean": round(result["mean"]["f1@0.5"], 3),
            "f1_3d": {c: round(r["f1@0.5"], 3) for c, r in result["classes"].items()},
            "objects": {c: [r["n_pred"], r["n_gt"]] for c, r in result["classes"].items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--scales", default="0.5,1,2", help="synth --scale values (pixel size 10/scale nm)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (float(s) for s in args.scales.split(",")):
            shape = (SHAPE[0], round(SHAPE[1] * scale), round(SHAPE[2] * scale))
            data = write_synthetic(Path(tmp) / f"s{scale}", shape, seed=SEED, scale=scale)
            for rescale in ((False,) if scale == 1 else (False, True)):
                row = {"scale": scale, "pixel_nm": 10 / scale, "shape": list(shape),
                       **one(args.model, data, Path(tmp) / f"s{scale}_{rescale}.zarr", rescale)}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(save("rescale", {"machine": machine(), "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
