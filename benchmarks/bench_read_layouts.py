"""Reading tile windows from zarr and TIFF layouts labs have: ms per window as `run`'s actors read them.

    python benchmarks/bench_read_layouts.py [--old PATH] [--rounds 2]

Layouts (uint8, random values): one slice stored as one chunk (8192², a microscope's single-slice export), a 5D
OME-Zarr (T, C, Z, Y, X with singleton T and C, 1024² chunks: bioformats2raw's layout), and chunks 64 slices deep
(64³: a volume chunked for 3D viewers); and one 8192² slice as a zlib-compressed TIFF with one strip per slice,
tifffile's default strips, and 512 px tiles (compressed TIFFs are read through tifffile's zarr view, not memory
mapped). Windows of 1056 px (1024 px tiles with their 32 px overlap), or 544 px
where the slice is 1024 px wide, row by row as an actor reads its tile positions, over a whole slice (the
single-slice volume) or 8 slices. ``--old``: a checkout measured the same way in alternating child processes.
Writes ``results/read_layouts.json``."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import beside_old, machine, save  # noqa: E402

LAYOUTS = {  # name: (shape, chunks, axes)
    "one slice, one chunk (1 x 8192²)": ((1, 8192, 8192), (1, 8192, 8192), "zyx"),
    "5D OME-Zarr, 1024² chunks (1 x 1 x 4 x 4096²)": ((1, 1, 4, 4096, 4096), (1, 1, 1, 1024, 1024), "tczyx"),
    "chunks 64 slices deep (64 x 1024², 64³ chunks)": ((64, 1024, 1024), (64, 64, 64), "zyx"),
}
TIFFS = {  # name: tifffile.imwrite options, for one 8192² uint8 slice
    "TIFF, zlib, one strip per slice (8192²)": {"compression": "zlib", "rowsperstrip": 8192},
    "TIFF, zlib, tifffile's default strips (8192²)": {"compression": "zlib"},
    "TIFF, zlib, 512 px tiles (8192²)": {"compression": "zlib", "tile": (512, 512)},
}


def make(folder: Path) -> dict[str, str]:
    import numpy as np
    import zarr

    rng, paths = np.random.default_rng(0), {}
    for k, (name, (shape, chunks, axes)) in enumerate(LAYOUTS.items()):
        path = paths[name] = str(folder / f"layout{k}.zarr")
        group = zarr.open_group(path, mode="w", zarr_format=2)
        group.create_array("0", data=rng.integers(0, 255, shape, dtype=np.uint8), chunks=chunks)
        group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in axes],
                                       "datasets": [{"path": "0", "coordinateTransformations": [
                                           {"type": "scale", "scale": [1.0] * len(axes)}]}]}]  # fmt: skip
    import tifffile

    # random grey levels over a slow ramp: compressible about as EM is (random values alone would not be)
    image = rng.integers(0, 40, (1, 8192, 8192), dtype=np.uint8) + (np.arange(8192) // 64).astype(np.uint8)
    for k, (name, options) in enumerate(TIFFS.items()):
        path = paths[name] = str(folder / f"layout{k}.tif")
        tifffile.imwrite(path, image, photometric="minisblack", **options)
    return paths


def measure(paths: dict[str, str]) -> dict[str, float]:
    """ms per window for each layout, read as an actor reads its windows (this process's ``cellseg_batch``)."""
    from cellseg_batch.read import open_volume

    result = {}
    for name, path in paths.items():
        volume = open_volume(path)
        nz, ny, nx = volume.shape
        w = min(1056, ny // 2 + 32)
        windows = [(z, y, x) for z in range(min(nz, 8)) for y in range(0, ny - w + 1, w - 64)
                   for x in range(0, nx - w + 1, w - 64)]  # fmt: skip
        start = time.perf_counter()
        for z, y, x in windows:
            volume.read(z, y, y + w, x, x + w)
        result[name] = round(1000 * (time.perf_counter() - start) / len(windows), 2)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--old", help="a checkout to measure beside this one (git worktree add /tmp/old REV)")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make(Path(tmp))  # made once, before any clock
        rows = [{"code": row["code"], "ms_per_window": row["result"]} for row in
                beside_old(args.old, args.rounds, "bench_read_layouts", f"measure({paths!r})")]  # fmt: skip
    summary = {name: {layout: [r["ms_per_window"][layout] for r in rows if r["code"] == name]
                      for layout in [*LAYOUTS, *TIFFS]} for name in dict.fromkeys(r["code"] for r in rows)}  # fmt: skip
    print(json.dumps(summary, indent=1))
    save("read_layouts", {"machine": machine(), "layouts": {k: {"shape": v[0], "chunks": v[1], "axes": v[2]}
                                                            for k, v in LAYOUTS.items()}, "tiffs": TIFFS, "rows": rows,
                          "summary": summary})  # fmt: skip


if __name__ == "__main__":
    main()
