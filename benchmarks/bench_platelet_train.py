"""Train on part of a real SBF-SEM platelet slice on the CPU for a bounded time; score the held-out part.

Data: ../shared/data/platelet-em-24-z0 (Guay et al., Sci Rep 2021; one 800x800 uint16 slice, organelle instances
derived from the official semantic labels; see its SOURCE.md). The left 544 columns train (overlapping 256 px
tiles), the right 256 columns are held out; `run` then segments the held-out crop and `eval` scores it per class.
With ``--compare-crop``, the same training part is also given as one whole image (as an annotation tool exports a
slice) and trained with ``train --crop 256`` (random 256 px windows), the two alternating, for the same iterations.

    python benchmarks/bench_platelet_train.py [--minutes 8]
    python benchmarks/bench_platelet_train.py --compare-crop --iterations 300 [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, machine, save  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DATA = SHARED_DATA / "platelet-em-24-z0"
SPLIT_X = 544


def tiles_to_coco(image: np.ndarray, labels: np.ndarray, class_map: dict, out: Path, step: int) -> Path:
    """Overlapping 256 px tiles of one slice as COCO (RLE), through the same converter users run."""
    from cellseg_batch.coco import labels_to_coco
    from cellseg_batch.read import ArrayVolume, LabelLayer

    crops_img, crops_lab = [], []
    h, w = image.shape
    for y0 in sorted({*range(0, h - 256, step), h - 256}):
        for x0 in sorted({*range(0, w - 256, step), w - 256}):
            crops_img.append(image[y0 : y0 + 256, x0 : x0 + 256])
            crops_lab.append(labels[y0 : y0 + 256, x0 : x0 + 256])
    layer = LabelLayer(ArrayVolume(np.stack(crops_lab)), class_map)
    return labels_to_coco(ArrayVolume(np.stack(crops_img)), [layer], out, tile=256)["train"]


def whole_to_coco(image: np.ndarray, labels: np.ndarray, class_map: dict, out: Path) -> Path:
    """The training part as one image, as an annotation tool exports an annotated slice."""
    from cellseg_batch.coco import labels_to_coco
    from cellseg_batch.read import ArrayVolume, LabelLayer

    layer = LabelLayer(ArrayVolume(labels[None]), class_map)
    return labels_to_coco(ArrayVolume(image[None]), [layer], out, tile=0)["train"]


def train_and_score(tmp: Path, name: str, train_json: Path, limit: list[str], crop: list[str]) -> dict:
    """Train (a limit: --max-minutes or --max-iter), segment the held-out part, score it."""
    import subprocess

    model, seg = tmp / f"model_{name}", tmp / f"held_{name}.zarr"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "cellseg_batch", "train", "--train", str(train_json), "--images",
                    str(train_json.parent / "images"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
                    "--out", str(model), *limit, *crop, "--pixel-size", "40,10,10"], check=True,
                   capture_output=True)  # fmt: skip
    train_s = time.perf_counter() - t0
    manifest = json.loads((model / "cellseg.json").read_text())
    subprocess.run([sys.executable, "-m", "cellseg_batch", "run", str(tmp / "held.tif"), "--model", str(model),
                    "--out", str(seg), "--no-progress", "--score-threshold", "0.3"], check=True,
                   capture_output=True)  # fmt: skip
    subprocess.run([sys.executable, "-m", "cellseg_batch", "eval", str(seg), str(tmp / "held_labels.tif"),
                    "--gt-classes", str(tmp / "classes.json"), "--mode", "2d", "--json", str(tmp / "eval.json")],
                   check=True, capture_output=True)  # fmt: skip
    result = json.loads((tmp / "eval.json").read_text())
    training = {k: manifest["training"].get(k) for k in ("iterations", "seconds", "iters_per_s", "images_per_s",
                                                          "train_images", "crop")}  # fmt: skip
    return {"training": {**training, "tile": manifest["tile"], "wall_s_with_startup": round(train_s, 1)},
            "held_out": {c: {k: r[k] for k in ("ap", "ap50", "ap75", "n_pred", "n_gt")}
                         for c, r in result["classes"].items()},
            "held_out_mean": {k: result["mean"][k] for k in ("ap", "ap50", "ap75")}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="training time limit")
    p.add_argument("--compare-crop", action="store_true", help="also train on the part as one image, --crop 256")
    p.add_argument("--iterations", type=int, help="train this many iterations instead of --minutes")
    p.add_argument("--rounds", type=int, default=1, help="with --compare-crop: alternations of the two")
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} is not here (the shared data folder beside the checkout)")
    import tifffile

    from cellseg_batch.read import read_class_map

    image = tifffile.imread(DATA / "volume.tif")[0]
    labels = tifffile.imread(DATA / "labels.tif")[0]
    class_map = read_class_map(str(DATA / "classes.json"))
    limit = ["--max-iter", str(args.iterations)] if args.iterations else \
        ["--max-iter", "100000", "--max-minutes", str(args.minutes)]  # fmt: skip
    rows = {"machine": machine(), "data": str(DATA), "split_x": SPLIT_X, "limit": limit}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tiles_json = tiles_to_coco(image[:, :SPLIT_X], labels[:, :SPLIT_X], class_map, tmp / "train", step=96)
        held_img, held_lab = image[:, SPLIT_X:], labels[:, SPLIT_X:]
        tifffile.imwrite(tmp / "held.tif", held_img[None], photometric="minisblack")
        tifffile.imwrite(tmp / "held_labels.tif", held_lab[None], photometric="minisblack")
        (tmp / "classes.json").write_text(json.dumps({str(k): v for k, v in class_map.items()}))
        if not args.compare_crop:
            rows.update(train_and_score(tmp, "tiles", tiles_json, limit, []))
        else:
            whole_json = whole_to_coco(image[:, :SPLIT_X], labels[:, :SPLIT_X], class_map, tmp / "whole")
            rows["rounds"] = []
            for _ in range(args.rounds):
                rows["rounds"].append({
                    "tiles (28 overlapping 256 px tiles)": train_and_score(tmp, "tiles", tiles_json, limit, []),
                    "whole (one 800 x 544 image, --crop 256)": train_and_score(tmp, "whole", whole_json, limit,
                                                                               ["--crop", "256"]),
                })  # fmt: skip
                for name in ("tiles", "whole"):
                    import shutil

                    shutil.rmtree(tmp / f"model_{name}")
    print(json.dumps(rows, indent=2))
    print(f"saved {save('platelet_train_crop' if args.compare_crop else 'platelet_train_cpu', rows)}")


if __name__ == "__main__":
    main()
