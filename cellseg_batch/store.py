"""The run's work store: per-tile predictions, per-slice fragment tables and edges, and what makes runs resumable.

Layout of ``<out>.work/`` (on a filesystem every Ray node sees):

    run.json             the run's configuration and its fingerprints (a resume must match them)
    tiles.zarr/          predicted tile labels, one chunk per tile: (Z, NY, NX, classes, tile, tile) uint16
    frag/zNNNNNN.part    fragment records of a slice still being predicted (append-only, one record per tile)
    frag/zNNNNNN.npy     a predicted slice's fragment table (all tiles), written once the slice is complete
    post/                stitch/link products and write markers; invalidated when stitch or link settings change

Actors write tile chunks (one writer per chunk); only the driver writes everything else. Files are written to a
temporary name and renamed, and a tile counts as done only once its fragment record is on disk, so killing any
process at any moment leaves a state from which the same command continues.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np

from .tiles import TileGrid, TileKey

# One row per fragment: a tile's instance, with what the merge and the object table need from its core pixels.
FRAGMENT = np.dtype(
    [
        ("iy", "<u4"), ("ix", "<u4"), ("local", "<u2"), ("cls", "<i2"), ("score", "<f4"),
        ("area", "<i8"), ("y0", "<i4"), ("x0", "<i4"), ("y1", "<i4"), ("x1", "<i4"),
        ("sy", "<f8"), ("sx", "<f8"),
    ]
)  # fmt: skip


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


class WorkStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.frag_dir = self.root / "frag"
        self.post_dir = self.root / "post"
        self.tiles_path = self.root / "tiles.zarr"

    # -- run metadata -------------------------------------------------------------------------------------------
    def read_run(self) -> dict | None:
        p = self.root / "run.json"
        return json.loads(p.read_text()) if p.exists() else None

    def write_run(self, run: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / "run.json", (json.dumps(run, indent=2, default=str) + "\n").encode())

    def reset(self, keep_predictions: bool) -> None:
        """Forget stitch/link/write progress; with ``keep_predictions`` False also every prediction."""
        if not keep_predictions:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            shutil.rmtree(self.post_dir, ignore_errors=True)

    def create(self, n_slices: int, grid: TileGrid, n_classes: int) -> None:
        import numcodecs
        import zarr

        self.root.mkdir(parents=True, exist_ok=True)
        self.frag_dir.mkdir(exist_ok=True)
        self.post_dir.mkdir(exist_ok=True)
        if not self.tiles_path.exists():
            zarr.create_array(
                str(self.tiles_path),
                shape=(n_slices, grid.ny, grid.nx, n_classes, grid.tile, grid.tile),
                chunks=(1, 1, 1, n_classes, grid.tile, grid.tile),
                dtype="uint16",
                fill_value=0,
                zarr_format=2,
                # written once, read a few times, deleted at the end: speed over ratio (~100x on label tiles)
                compressors=numcodecs.Blosc("lz4", 5, shuffle=numcodecs.Blosc.SHUFFLE),
                chunk_key_encoding={"name": "v2", "separator": "/"},
            )

    # -- tiles (written by actors) ------------------------------------------------------------------------------
    def tiles(self):
        from .write import open_array

        return open_array(self.tiles_path)

    # -- fragment records (driver only) -------------------------------------------------------------------------
    def _part(self, z: int) -> Path:
        return self.frag_dir / f"z{z:06d}.part"

    def _table(self, z: int) -> Path:
        return self.frag_dir / f"z{z:06d}.npy"

    def append_records(self, z: int, records: list[tuple[TileKey, np.ndarray]]) -> None:
        """Append tile records to the slice's log: length-prefixed pickles, flushed and fsynced."""
        with open(self._part(z), "ab") as f:
            for rec in records:
                blob = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
                f.write(struct.pack("<Q", len(blob)) + blob)
            f.flush()
            os.fsync(f.fileno())

    def read_records(self, z: int) -> dict[TileKey, np.ndarray]:
        """The complete records of a slice's log; a record cut short by a kill is ignored (its tile reruns)."""
        out: dict[TileKey, np.ndarray] = {}
        p = self._part(z)
        if not p.exists():
            return out
        data = p.read_bytes()
        pos = 0
        while pos + 8 <= len(data):
            (n,) = struct.unpack_from("<Q", data, pos)
            if pos + 8 + n > len(data):
                break
            try:
                key, table = pickle.loads(data[pos + 8 : pos + 8 + n])
            except Exception:
                break
            out[TileKey(*key)] = table
            pos += 8 + n
        return out

    def complete_slice(self, z: int, records: dict[TileKey, np.ndarray]) -> None:
        """All tiles of slice z are predicted: write its fragment table (raster order) and drop the log."""
        keys = sorted(records)
        table = np.concatenate([records[k] for k in keys]) if keys else np.zeros(0, FRAGMENT)
        save_npy(self._table(z), table)
        self._part(z).unlink(missing_ok=True)

    def slice_done(self, z: int) -> bool:
        return self._table(z).exists()

    def fragments(self, z: int) -> np.ndarray:
        return np.load(self._table(z))

    # -- stitch/link/write products (driver only) ---------------------------------------------------------------
    def post(self, name: str) -> Path:
        path = self.post_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def marker(self, stage: str, z: int) -> Path:
        d = self.post_dir / stage
        d.mkdir(parents=True, exist_ok=True)
        return d / f"z{z:06d}"

    def mark(self, stage: str, z: int) -> None:
        self.marker(stage, z).touch()

    def marked(self, stage: str, z: int) -> bool:
        return self.marker(stage, z).exists()

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file())
