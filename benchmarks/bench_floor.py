"""The floor under the `labels` ceiling, and a codec comparison for the label layers.

1. **Floor**: the least work any tool must do on the input of `bench_labels.py` to produce the same output layers.
   It reads the cell and organelle stacks (and the image), splits the organelle stack into its classes by the class
   map (sorted search), and writes 4 label layers (cell + 3 organelle classes) and a copy of the image as zarr v2
   arrays with chunks (1, C, C). There is no stitching, linking or pyramid. A pool of processes handles one whole
   slice per task. All-zero label chunks are skipped by our own check, as in the pipeline. Wall time gives MVoxel/s
   (voxels = Z*Y*X), and the workers' CPU time MVoxel per CPU-second, which a shared machine disturbs less. Bytes
   on disk are counted per layer, and one slice of every output is checked against the input.
   Chunks are written through zarr-python, as the pipeline does, and once more for the default by encoding them and
   writing the chunk files directly, which shows what zarr-python's per-chunk overhead costs.
2. **Codecs**: the floor for each label dtype (uint32, uint64) x Blosc codec, and a micro-measure of numcodecs
   `.encode` / `.decode` (one Blosc thread, best of 3) on real C x C chunks: the cell layer, the largest organelle
   layer, and the work store's uint16 tile cores (all classes of one tile, ids renumbered per tile, as the `labels`
   predictor stores them); and, where the shared data folder is here, the ground truth of its real EM stacks as an
   output holds it (uint32 ids 1..n, 512 x 512 chunks). MB/s are of raw (uncompressed) bytes.

The pool is started before the clock starts (its start-up is reported apart), one untimed run warms it, and then
every combination runs in `--repeats` interleaved rounds, the best of which counts (the machine may be shared).
Nothing is fsynced, so the figures are CPU work, not disk speed. The default combination is uint32 + the first codec
of --codecs. Results go to results/floor_and_codecs.json, with the load average at the start and the end.

    python benchmarks/bench_floor.py [--shape 16,4096,4096] [--chunk 992] [--processes 2] [--codecs ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHARED_DATA, label_stacks, machine, save  # noqa: E402

# name -> (Blosc cname, clevel, shuffle); shuffle 0 = NOSHUFFLE, 1 = byte SHUFFLE, 2 = BITSHUFFLE
CODECS = {
    "lz4-5-noshuffle": ("lz4", 5, 0),  # the pipeline's output labels and tile store
    "lz4-5-shuffle": ("lz4", 5, 1),  # zarr's default for Blosc
    "lz4-5-bitshuffle": ("lz4", 5, 2),
    "zstd-1-bitshuffle": ("zstd", 1, 2),
    "zstd-1-noshuffle": ("zstd", 1, 0),
    "zstd-3-bitshuffle": ("zstd", 3, 2),  # the pipeline's image copy (wider than a byte)
    "lz4hc-5-bitshuffle": ("lz4hc", 5, 2),  # encodes 5-10x slower than lz4: per chunk only, not in the default floor
}
LABEL_DTYPES = ("uint32", "uint64")


def blosc(name: str, itemsize: int):
    import numcodecs

    cname, clevel, shuffle = CODECS[name]
    # shuffling 1-byte items does nothing (byte shuffle) or only costs time (bit shuffle): the image gets none
    return numcodecs.Blosc(cname, clevel, shuffle=shuffle if itemsize > 1 else numcodecs.Blosc.NOSHUFFLE)


def chunk_origins(shape, chunk: int):
    return [(y0, x0) for y0 in range(0, shape[1], chunk) for x0 in range(0, shape[2], chunk)]


class ClassMap:
    """Class index (0..n-1) of each organelle id by sorted search over the map's ids; -1 for background."""

    def __init__(self, path: Path):
        m = {int(k): v for k, v in json.loads(Path(path).read_text()).items()}
        self.names = sorted(set(m.values()))
        self.keys = np.array(sorted(m), dtype=np.uint32)
        self.values = np.array([self.names.index(m[int(k)]) for k in self.keys], dtype=np.int8)

    def pixel_classes(self, ids: np.ndarray) -> np.ndarray:
        out = np.full(ids.shape, -1, dtype=np.int8)
        fg = ids != 0
        v = ids[fg]
        pos = np.clip(np.searchsorted(self.keys, v), 0, len(self.keys) - 1)
        if (self.keys[pos] != v).any():
            raise ValueError(f"organelle id {int(v[self.keys[pos] != v][0])} is not in the class map")
        out[fg] = self.values[pos]
        return out


# -- the floor: one slice per task, in a pool of processes -------------------------------------------------------
_ARRAYS: dict[str, object] = {}


def _init_worker() -> None:
    import numcodecs
    import zarr

    numcodecs.blosc.set_nthreads(1)  # one process per core
    zarr.config.set({"threading.max_workers": 1})


def _array(path: str, mode: str):
    import zarr

    if path not in _ARRAYS:
        with zarr.config.set({"array.write_empty_chunks": True}):  # we skip all-zero chunks ourselves
            _ARRAYS[path] = zarr.open_array(path, mode=mode)
    return _ARRAYS[path]


class ChunkFiles:
    """Whole chunks written as the pipeline writes them (``cellseg_batch.write.ChunkIO``: encoded by the array's
    codec, handed to zarr's store in one call), without zarr-python's per-write machinery."""

    def __init__(self, array):
        from cellseg_batch.chunks import ChunkIO

        self.io, self.chunk = ChunkIO(array), array.chunks[1:]

    def __setitem__(self, box, block: np.ndarray) -> None:
        z, ys, xs = box
        self.io.write((z, ys.start // self.chunk[0], xs.start // self.chunk[1]), block[None])


def _floor_slice(z: int, inputs: dict, outputs: dict, class_map: ClassMap, dtype: str, chunk: int, writer: str):
    """Slice z of every output layer; returns the CPU seconds this process spent on it (all its threads)."""
    cpu0 = time.process_time()
    image = np.asarray(_array(inputs["volume"], "r")[z])
    cells = np.asarray(_array(inputs["cells"], "r")[z])
    orgs = np.asarray(_array(inputs["organelles"], "r")[z])
    classes = class_map.pixel_classes(orgs)
    if writer == "zarr":
        out = {name: _array(path, "r+") for name, path in outputs.items()}
    else:
        out = {name: ChunkFiles(_array(path, "r+")) for name, path in outputs.items()}
    for y0, x0 in chunk_origins((0, *cells.shape), chunk):
        win = (slice(y0, y0 + chunk), slice(x0, x0 + chunk))
        box = (z, *win)
        out["image"][box] = image[win]
        c = cells[win]
        if c.any():
            out["cell"][box] = c.astype(dtype, copy=False)
        o, k = orgs[win], classes[win]
        if o.any():
            for i, name in enumerate(class_map.names):
                layer = np.where(k == i, o, 0).astype(dtype, copy=False)
                if layer.any():
                    out[name][box] = layer
    return time.process_time() - cpu0


def check(outputs: dict, inputs: dict, class_map: ClassMap, z: int) -> None:
    """The output's slice z holds the input: the image, the cells, and the organelles split by class."""
    import zarr

    def read(path):
        return np.asarray(zarr.open_array(str(path), mode="r")[z])

    orgs = read(inputs["organelles"])
    classes = class_map.pixel_classes(orgs)
    assert np.array_equal(read(outputs["image"]), read(inputs["volume"])), "image copy differs"
    assert np.array_equal(read(outputs["cell"]), read(inputs["cells"])), "cell layer differs"
    for i, name in enumerate(class_map.names):
        assert np.array_equal(read(outputs[name]), np.where(classes == i, orgs, 0)), f"{name} layer differs"


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def floor(
    shape, dtype: str, codec: str, pool, inputs: dict, class_map: ClassMap, chunk: int, tmp: Path, writer: str = "zarr",
    image_codec: str | None = None,
) -> dict:
    """Wall time and output bytes of the floor with one label dtype and codec (and ``image_codec`` for the image
    copy, default ``codec``). writer "zarr" writes chunks through zarr-python, "files" as the pipeline does."""
    import zarr

    out = tmp / f"floor_{dtype}_{codec}_{writer}"
    t0 = time.perf_counter()
    outputs = {}
    for name, dt in [("image", "uint8"), ("cell", dtype)] + [(n, dtype) for n in class_map.names]:
        outputs[name] = str(out / name)
        zarr.create_array(outputs[name], shape=shape, chunks=(1, chunk, chunk), dtype=dt, fill_value=0,
                          zarr_format=2, compressors=blosc(image_codec or codec if name == "image" else codec,
                                                           np.dtype(dt).itemsize),
                          chunk_key_encoding={"name": "v2", "separator": "/"}, overwrite=True)  # fmt: skip
    src = {k: str(v) for k, v in inputs.items() if k != "classes"}
    futures = [pool.submit(_floor_slice, z, src, outputs, class_map, dtype, chunk, writer) for z in range(shape[0])]
    cpu = sum(f.result() for f in futures)
    wall = time.perf_counter() - t0
    check(outputs, inputs, class_map, shape[0] // 2)
    sizes = {name: disk_bytes(Path(p)) for name, p in outputs.items()}
    label_bytes = sum(v for k, v in sizes.items() if k != "image")
    shutil.rmtree(out)
    voxels = int(np.prod(shape))
    return {"dtype": dtype, "codec": codec, "image_codec": image_codec or codec, "writer": writer, "wall_s": round(wall, 3), "mvoxel_per_s": round(voxels / 1e6 / wall, 2),
            "worker_cpu_s": round(cpu, 3), "mvoxel_per_cpu_s": round(voxels / 1e6 / cpu, 2),
            "label_bytes": label_bytes, "image_bytes": sizes["image"], "bytes_per_layer": sizes,
            "label_bytes_per_voxel": round(label_bytes / voxels, 4)}  # fmt: skip


# -- codec micro-measure on real chunks --------------------------------------------------------------------------
def sample_chunks(shape, inputs: dict, class_map: ClassMap, chunk: int, n: int) -> dict[str, list[np.ndarray]]:
    """n non-empty C x C chunks, spread over the volume, of the cell layer, of the organelle layer with the most
    foreground, and the uint16 tile cores of the work store (n_classes x C x C, ids renumbered per tile)."""
    import fastremap
    import zarr

    cells_in = zarr.open_array(str(inputs["cells"]), mode="r")
    orgs_in = zarr.open_array(str(inputs["organelles"]), mode="r")
    origins = [(z, y0, x0) for z in range(shape[0]) for y0, x0 in chunk_origins(shape, chunk)
               if y0 + chunk <= shape[1] and x0 + chunk <= shape[2]]  # fmt: skip
    picks = [origins[i] for i in np.linspace(0, len(origins) - 1, min(n * 3, len(origins))).astype(int)]
    cells, orgs, cores = [], [[] for _ in class_map.names], []
    for z, y0, x0 in picks:
        c = np.asarray(cells_in[z, y0 : y0 + chunk, x0 : x0 + chunk])
        o = np.asarray(orgs_in[z, y0 : y0 + chunk, x0 : x0 + chunk])
        k = class_map.pixel_classes(o)
        cells.append(c)
        for i in range(len(class_map.names)):
            orgs[i].append(np.where(k == i, o, 0))
        core = np.zeros((1 + len(class_map.names), chunk, chunk), np.uint16)
        local_c, _ = fastremap.renumber(c, preserve_zero=True, in_place=False)
        core[0] = local_c
        local_o, _ = fastremap.renumber(o, preserve_zero=True, in_place=False)
        local_o = local_o.astype(np.uint16) + np.where(local_o > 0, int(local_c.max()), 0).astype(np.uint16)
        for i in range(len(class_map.names)):
            core[1 + i] = np.where(k == i, local_o, 0)
        cores.append(core)
    best = int(np.argmax([sum(int((a != 0).sum()) for a in layer) for layer in orgs]))

    def nonempty(chunks):
        return [a for a in chunks if a.any()][:n]

    return {"cell": nonempty(cells), class_map.names[best]: nonempty(orgs[best]), "tile_core_uint16": cores[:n]}


def real_chunks(side: int = 512) -> dict[str, list[np.ndarray]]:
    """The ground truth of each real EM stack in the shared data folder (``CELLSEG_SHARED_DATA``, else
    ../shared/data), as an output holds it: ids renumbered 1..n in uint32, cut into side x side chunks. Empty where
    the folder is absent (said on the console)."""
    import fastremap
    import tifffile

    stacks = sorted(SHARED_DATA.glob("*/labels.tif"))
    if not stacks:
        print(f"codecs on real label images: skipped, no */labels.tif under {SHARED_DATA}")
    out = {}
    for path in stacks:
        labels = tifffile.imread(path)
        labels = labels.reshape(-1, *labels.shape[-2:])
        ids, _ = fastremap.renumber(labels.astype(np.uint32), preserve_zero=True, in_place=False)
        ids = ids.astype(np.uint32)
        out[f"real:{path.parent.name}"] = [np.ascontiguousarray(ids[z, y : y + side, x : x + side])
                                           for z in range(len(ids)) for y in range(0, ids.shape[1] - side + 1, side)
                                           for x in range(0, ids.shape[2] - side + 1, side)]  # fmt: skip
    return out


def micro(chunks: list[np.ndarray], codec_name: str, repeats: int = 3) -> dict:
    """Encode and decode MB/s (of raw bytes, best of `repeats` passes over all chunks) and the compression ratio."""
    codec = blosc(codec_name, chunks[0].dtype.itemsize)
    raw = sum(a.nbytes for a in chunks)
    enc_s = dec_s = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        encoded = [codec.encode(a) for a in chunks]
        t1 = time.perf_counter()
        for b in encoded:
            codec.decode(b)
        t2 = time.perf_counter()
        enc_s, dec_s = min(enc_s, t1 - t0), min(dec_s, t2 - t1)
    packed = sum(len(b) for b in encoded)
    return {"codec": codec_name, "dtype": str(chunks[0].dtype), "chunks": len(chunks),
            "encode_mb_per_s": round(raw / 1e6 / enc_s, 1), "decode_mb_per_s": round(raw / 1e6 / dec_s, 1),
            "encode_ms_per_chunk": round(enc_s * 1e3 / len(chunks), 3),
            "decode_ms_per_chunk": round(dec_s * 1e3 / len(chunks), 3),
            "ratio": round(raw / packed, 1)}  # fmt: skip


# -- main --------------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="16,4096,4096", help="volume (Z,Y,X), as in bench_labels.py")
    p.add_argument("--chunk", type=int, default=992, help="output chunk size C: chunks are (1, C, C)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--codecs", default="lz4-5-noshuffle,lz4-5-shuffle,zstd-1-noshuffle,zstd-3-bitshuffle",
                   help=f"floor codecs, the first is the default; of {', '.join(CODECS)}")  # fmt: skip
    p.add_argument("--repeats", type=int, default=2, help="rounds of the floor runs; the best of each counts")
    p.add_argument("--micro-chunks", type=int, default=20, help="chunks per layer in the codec micro-measure")
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split(","))
    codecs = args.codecs.split(",")
    unknown = set(codecs) - set(CODECS)
    if unknown:
        p.error(f"unknown codec(s) {', '.join(sorted(unknown))}")

    import numcodecs

    numcodecs.blosc.set_nthreads(1)
    rows: dict = {"machine": machine(), "shape": list(shape), "chunk": args.chunk, "processes": args.processes,
                  "repeats": args.repeats}  # fmt: skip
    t0 = time.perf_counter()
    inputs = label_stacks(shape)
    rows["input_ready_s"] = round(time.perf_counter() - t0, 1)
    class_map = ClassMap(inputs["classes"])

    # 2b. per-chunk codec speed (in this process, one Blosc thread)
    samples = sample_chunks(shape, inputs, class_map, args.chunk, args.micro_chunks)
    rows["micro"] = []
    for layer, chunks in samples.items():
        dtypes = ["uint16"] if layer == "tile_core_uint16" else LABEL_DTYPES
        for dt in dtypes:
            typed = [a.astype(dt, copy=False) for a in chunks]
            for name in CODECS:
                rows["micro"].append({"layer": layer, **micro(typed, name)})

    for layer, chunks in real_chunks().items():  # real label images, where the shared data folder is here
        for name in CODECS:
            rows["micro"].append({"layer": layer, **micro(chunks, name)})

    # 1 + 2a. the floor for each dtype x codec through zarr-python, and the default once more writing the chunk
    # files itself; after one untimed warm-up run, in `repeats` interleaved rounds, the best of which counts
    default = ("uint32", codecs[0], "zarr")
    combos = [default] + [(dt, c, "zarr") for dt in LABEL_DTYPES for c in codecs if (dt, c, "zarr") != default]
    combos.append(("uint32", codecs[0], "files"))
    with tempfile.TemporaryDirectory(prefix="cellseg-floor-") as tmp:
        t0 = time.perf_counter()
        pool = ProcessPoolExecutor(args.processes, mp_context=get_context("spawn"), initializer=_init_worker)
        list(pool.map(time.sleep, [0.2] * args.processes))  # every worker started (spawned, imported) and idle
        rows["pool_start_s"] = round(time.perf_counter() - t0 - 0.2, 2)
        with pool:
            run = partial(floor, shape, pool=pool, inputs=inputs, class_map=class_map, chunk=args.chunk, tmp=Path(tmp))
            rows["warmup_wall_s"] = run(*default[:2], writer=default[2])["wall_s"]
            rounds = [[run(dt, c, writer=w) for dt, c, w in combos] for _ in range(args.repeats)]
    rows["floor"] = []
    for results in zip(*rounds):
        best = min(results, key=lambda r: r["wall_s"])
        rows["floor"].append({**best, "wall_s_each": [r["wall_s"] for r in results],
                              "worker_cpu_s_each": [r["worker_cpu_s"] for r in results]})  # fmt: skip
    rows["machine"]["load_avg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print_tables(rows)
    print(f"saved {save('floor_and_codecs', rows)}")


def print_tables(rows: dict) -> None:
    print(f"\nfloor, shape {rows['shape']}, chunk {rows['chunk']}, {rows['processes']} processes "
          f"(load avg {rows['machine']['load_avg_at_start'][0]} -> {rows['machine']['load_avg_at_end'][0]})")  # fmt: skip
    print(f"{'dtype':7} {'codec':20} {'writer':6} {'best s':>7} {'MVoxel/s':>9} {'MVox/CPU-s':>10} {'label MB':>9} "
          f"{'image MB':>9}  each s")  # fmt: skip
    for r in rows["floor"]:
        print(f"{r['dtype']:7} {r['codec']:20} {r['writer']:6} {r['wall_s']:7.2f} {r['mvoxel_per_s']:9.1f} "
              f"{r['mvoxel_per_cpu_s']:10.1f} "
              f"{r['label_bytes'] / 1e6:9.1f} {r['image_bytes'] / 1e6:9.1f}  {r['wall_s_each']}")  # fmt: skip
    print("\ncodec per chunk (1 thread): encode / decode MB/s of raw bytes, ratio")
    print(f"{'layer':30} {'dtype':7} {'codec':20} {'enc MB/s':>9} {'dec MB/s':>9} {'ratio':>7}")
    for r in rows["micro"]:
        print(f"{r['layer']:30} {r['dtype']:7} {r['codec']:20} {r['encode_mb_per_s']:9.0f} "
              f"{r['decode_mb_per_s']:9.0f} {r['ratio']:7.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
