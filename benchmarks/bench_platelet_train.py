"""Train on part of a real SBF-SEM platelet slice on the CPU for a bounded time; score the held-out part.

Data: ../shared/data/platelet-em-24-z0 (Guay et al., Sci Rep 2021; one 800x800 uint16 slice, organelle instances
derived from the official semantic labels; see its SOURCE.md). The left 544 columns train (overlapping 256 px
tiles), the right 256 columns are held out; `run` then segments the held-out crop and `eval` scores it per class.

    python benchmarks/bench_platelet_train.py [--minutes 8]
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=8.0, help="training time limit")
    args = p.parse_args()
    if not DATA.exists():
        sys.exit(f"skipped: {DATA} is not here (the shared data folder beside the checkout)")
    import subprocess

    import tifffile

    from cellseg_batch.read import read_class_map

    image = tifffile.imread(DATA / "volume.tif")[0]
    labels = tifffile.imread(DATA / "labels.tif")[0]
    class_map = read_class_map(str(DATA / "classes.json"))
    rows = {"machine": machine(), "data": str(DATA), "split_x": SPLIT_X, "minutes": args.minutes}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_json = tiles_to_coco(image[:, :SPLIT_X], labels[:, :SPLIT_X], class_map, tmp / "train", step=96)
        held_img, held_lab = image[:, SPLIT_X:], labels[:, SPLIT_X:]
        tifffile.imwrite(tmp / "held.tif", held_img[None], photometric="minisblack")
        tifffile.imwrite(tmp / "held_labels.tif", held_lab[None], photometric="minisblack")
        (tmp / "classes.json").write_text(json.dumps({str(k): v for k, v in class_map.items()}))
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "cellseg_batch", "train", "--train", str(train_json), "--images",
                        str(tmp / "train" / "images"), "--config", str(REPO / "configs" / "demo_cpu.yaml"),
                        "--out", str(tmp / "model"), "--max-iter", "100000", "--max-minutes", str(args.minutes),
                        "--pixel-size", "40,10,10"], check=True, capture_output=True)  # fmt: skip
        train_s = time.perf_counter() - t0
        model = json.loads((tmp / "model" / "cellseg.json").read_text())
        subprocess.run([sys.executable, "-m", "cellseg_batch", "run", str(tmp / "held.tif"), "--model",
                        str(tmp / "model"), "--out", str(tmp / "held.zarr"), "--no-progress", "--score-threshold",
                        "0.3"], check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "cellseg_batch", "eval", str(tmp / "held.zarr"),
                        str(tmp / "held_labels.tif"), "--gt-classes", str(tmp / "classes.json"), "--mode", "2d",
                        "--json", str(tmp / "eval.json")], check=True, capture_output=True)  # fmt: skip
        result = json.loads((tmp / "eval.json").read_text())
    rows["training"] = {k: model["training"][k] for k in ("iterations", "seconds", "iters_per_s", "images_per_s",
                                                          "train_images")}  # fmt: skip
    rows["training"]["wall_s_with_startup"] = round(train_s, 1)
    rows["held_out"] = {name: {k: c[k] for k in ("ap", "ap50", "ap75", "n_pred", "n_gt")}
                        for name, c in result["classes"].items()}  # fmt: skip
    rows["held_out_mean"] = {k: result["mean"][k] for k in ("ap", "ap50", "ap75")}
    print(json.dumps(rows, indent=2))
    print(f"saved {save('platelet_train_cpu', rows)}")


if __name__ == "__main__":
    main()
