"""Border fill (stitching rule 4) with a real model: the same synthetic volumes segmented by a demo model with and
without ``--no-border-fill``; the pixels filled, how many of them are true foreground of their class, and mask AP /
3D F1 against the truth.

Usage: ``python benchmarks/bench_border_fill.py --model demo/model`` (a `make demo` model). Writes
``results/border_fill.json``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save, segment_and_score  # noqa: E402

from cellseg_batch.synth import CLASSES, write_synthetic  # noqa: E402
from cellseg_batch.write import Output  # noqa: E402

VOLUMES = [((10, 768, 768), 2), ((8, 1536, 1536), 7)]  # (shape, seed): the demo's test volume, and a larger one
LINK_GAP = "cell=0,2"  # as the demo (its synthetic cells are stacked one empty slice apart)


def segment(model: str, data: dict, out: Path, fill: bool) -> dict:
    seconds, report, result = segment_and_score(data, out, model=model, link_gap=LINK_GAP, border_fill=fill)
    return {"border_fill": fill, "seconds": round(seconds, 1), "tiles_per_slice": report["plan"]["tiles_per_slice"],
            "border_fill_pixels": report["merge_quality"]["border_fill_pixels"],
            **{k: round(result["mean"][k], 4) for k in ("ap50", "ap", "ap75", "f1@0.5", "f1@0.5:0.95")}}  # fmt: skip


def filled_pixels(with_fill: Path, without: Path, truth: Path) -> dict:
    """Per class: the pixels that differ between the two outputs, and how many of them are the class in the truth."""
    out = {}
    for name in CLASSES:
        a, b, t = (np.asarray(Output(str(root)).labels(name)[:]) for root in (with_fill, without, truth))
        diff = a != b
        out[name] = {"filled": int(diff.sum()), "true": int((diff & (t > 0)).sum())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for shape, seed in VOLUMES:
            data = write_synthetic(Path(tmp) / f"v{seed}", shape, seed=seed)
            outs = {fill: Path(tmp) / f"v{seed}_{fill}.zarr" for fill in (False, True)}
            runs = [segment(args.model, data, outs[fill], fill) for fill in (False, True)]
            row = {"shape": list(shape), "seed": seed, "runs": runs,
                   "filled": filled_pixels(outs[True], outs[False], data["truth"])}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(save("border_fill", {"machine": machine(), "model": args.model, "rows": rows}))


if __name__ == "__main__":
    main()
