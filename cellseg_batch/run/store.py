"""The work store: what the stages of a run hand each other on disk, under one path scheme, and how each knows a unit is done.

Layout of ``<out>.work/`` (on a filesystem every Ray node sees):

    run.json                 the run's configuration and fingerprints (a resume must match them)
    cores.zarr               tile cores as predicted: (Z, classes, NY*m, NX*m) uint16 tile-local ids, one chunk
                             (slot) of m = grid.core_max pixels per tile, the core at its top left; written once by
                             the actor, read by the write blocks it meets (once, where it lies inside one)
    bands.zarr               what stitching needs of each tile: (4 sides, classes, 2h, tile) uint16, the window's
                             labels within h = max(overlap/2, 1) pixels of each core border, flattened into one
                             chunk per tile of a (Z, NY, NX * size) array (one folder per tile row, not per tile:
                             cheaper to write and to delete)
    frag/zNNNNNN.part        fragment records of slice z while it is predicted (append-only npy blocks)
    frag/zNNNNNN.npy         slice z's fragment table (all tiles, raster order), once every tile is predicted
    zov/zNNNNNN.part         z-overlap blocks between slices z and z+1 that actors computed from memory
    zov/dD/zNNNNNN.part      the same between slices z and z+D, D = 2 .. 1 + the largest link gap (for gap edges)
    post/edges/zNNNNNN.npz   slice z's stitch matches, touching count, and its complete z-overlaps with z+1
    post/objects.npy         the object table; post/link_stats.json its counts
    post/inst/zNNNNNN.npy    fragment -> 2D instance of slice z (made and used by linking)
    post/lut/zNNNNNN.npy     fragment -> object id of slice z
    post/done/<stage>/<unit> markers of finished write, image and pyramid units

Only the driver writes frag/, zov/ and post/; actors write tile chunks (one writer per chunk). Files are written
under a temporary name and renamed, and a tile counts as done only once its record is in the log, so killing any
process at any moment leaves a state from which the same command continues. Everything is data (npy, npz, JSON,
zarr): nothing in a work directory is executed or unpickled. Every file is read by a verified load: tile chunks
(zarr v3) carry a CRC32C of their compressed bytes, and a file that is truncated, garbage or missing where it should
exist raises ``StoreDamage``, on which the run forgets what depends on it and computes it again
(``WorkStore.repair``): never used, never a traceback.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..stitch import FRAGMENT, ZOVERLAP, Fills, SliceStitch
from ..tiles import TileGrid


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array, allow_pickle=False)
    os.replace(tmp, path)


def save_npz(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _codecs() -> dict:
    """The tile arrays' codecs (zarr v3): Blosc lz4 without shuffle (written once, read once, deleted at the end:
    speed over ratio; on the benchmark's tile cores 2.2 -> 1.2 ms to encode and 1.1 -> 0.6 ms to decode against byte
    shuffle, both 110-140x), then a CRC32C of the compressed bytes (google-crc32c), which is what lies on the disk:
    checking ~100x fewer bytes than a checksum of the pixels, and no copy of them."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return dict(zarr_format=3, compressors=[BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec()])


# what numpy, zipfile, blosc and the CRC32C check raise for a file or chunk that is not what was written
DAMAGE = (OSError, ValueError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile)


class StoreDamage(Exception):
    """A work-store file or chunk failed its verified load; ``z``: the slice whose predictions it holds (None: a
    product of stitching, linking or writing, which are computed again from the predictions)."""

    def __init__(self, path: str, z: int | None = None):
        super().__init__(str(path), z)
        self.path, self.z = str(path), z

    def __str__(self) -> str:
        return f"{self.path} is damaged (truncated, garbage or missing)"


def verified(load, path: Path, z: int | None = None):
    """``load(path)``, or StoreDamage where the file cannot be what the store wrote."""
    try:
        return load(path)
    except DAMAGE as e:
        raise StoreDamage(path, z) from e


def _npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The file's arrays (``keys``: only those; a missing one is damage)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in (keys or f.files)}  # read now: a damaged member fails here, not where it is used


class WorkStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._core_io = self._bands_io = None  # opened on first use, in the process that uses them

    # -- paths: the one place that names the store's files ----------------------------------------------------
    @property
    def cores_path(self) -> Path:
        return self.root / "cores.zarr"

    @property
    def bands_path(self) -> Path:
        return self.root / "bands.zarr"

    def _slice_file(self, folder: str, z: int, suffix: str) -> Path:
        return self.root / folder / f"z{z:06d}{suffix}"

    def fragments_path(self, z: int) -> Path:
        return self._slice_file("frag", z, ".npy")

    def fragments_log(self, z: int) -> Path:
        return self._slice_file("frag", z, ".part")

    def zoverlaps_log(self, z: int, d: int = 1) -> Path:
        """The log of z-overlap blocks between slices z and z + d."""
        return self._slice_file("zov" if d == 1 else f"zov/d{d}", z, ".part")

    def edges_path(self, z: int) -> Path:
        return self._slice_file("post/edges", z, ".npz")

    def gaps_path(self, z: int) -> Path:
        return self._slice_file("post/gaps", z, ".npz")

    def instances_path(self, z: int) -> Path:
        return self._slice_file("post/inst", z, ".npy")

    def lut_path(self, z: int) -> Path:
        return self._slice_file("post/lut", z, ".npy")

    @property
    def objects_path(self) -> Path:
        return self.root / "post" / "objects.npy"

    @property
    def link_stats_path(self) -> Path:
        return self.root / "post" / "link_stats.json"

    def _marks_dir(self, stage: str) -> Path:
        return self.root / "post" / "done" / stage

    def marker(self, stage: str, unit: tuple[int, ...]) -> Path:
        return self._marks_dir(stage) / "_".join(str(int(u)) for u in unit)

    # -- run metadata -------------------------------------------------------------------------------------------
    @property
    def run_path(self) -> Path:
        return self.root / "run.json"

    def is_foreign(self) -> bool:
        """A folder that holds files, none of them the store's: not to be filled, nor deleted at the end."""
        if not self.root.is_dir():
            return False
        names = {p.name for p in self.root.iterdir()}
        return bool(names) and not names & {"run.json", "cores.zarr", "bands.zarr", "frag", "zov", "post"}

    def read_run(self) -> dict | None:
        p = self.run_path
        try:
            return json.loads(p.read_text()) if p.exists() else None
        except (OSError, ValueError):
            return None  # a damaged run.json matches no fingerprint: the run starts over

    def write_run(self, run: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.run_path, (json.dumps(run, indent=2, default=str) + "\n").encode())

    def reset(self, keep_predictions: bool) -> str | None:
        """Forget stitch/link/write progress; with ``keep_predictions`` False also every prediction. What could not be
        deleted (a file and why, None where all is gone): progress left behind would pass for this run's, so a caller
        about to run refuses to go on; one at the end only says so."""
        failed: list[str] = []

        def note(_fn, path, exc_info) -> None:
            if not isinstance(exc_info[1], FileNotFoundError):  # gone already (or never made): nothing to delete
                failed.append(f"{path} ({getattr(exc_info[1], 'strerror', None) or exc_info[1]})")

        shutil.rmtree(self.root if not keep_predictions else self.root / "post", onerror=note)
        return failed[0] if failed else None

    def clear(self, keep_predictions: bool) -> None:
        """``reset``, refused in one line where something is left: before a run, whose stages would take it as done."""
        if left := self.reset(keep_predictions):
            raise UserError(f"cannot delete the work store's {left}; remove {self.root} by hand (or let this user "
                            "delete it) and run again")  # fmt: skip

    def create(self, n_slices: int, grid: TileGrid, n_classes: int) -> None:
        import zarr

        for d in ("frag", "zov", "post"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        m, h = grid.core_max, grid.band
        common = dict(dtype="uint16", fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}, **_codecs())
        if not self.cores_path.exists():
            zarr.create_array(str(self.cores_path), shape=(n_slices, n_classes, grid.ny * m, grid.nx * m),
                              chunks=(1, n_classes, m, m), **common)  # fmt: skip
        if not self.bands_path.exists():
            size = 4 * n_classes * 2 * h * grid.tile
            zarr.create_array(str(self.bands_path), shape=(n_slices, grid.ny, grid.nx * size), chunks=(1, 1, size),
                              **common)  # fmt: skip

    # -- tile arrays (written by actors) ------------------------------------------------------------------------
    def cores(self):
        from ..write import open_array

        return open_array(self.cores_path)

    def bands(self):
        from ..write import open_array

        return open_array(self.bands_path)

    def write_bands(self, z: int, iy: int, ix: int, bands: np.ndarray) -> None:
        """Store tile (z, iy, ix)'s bands (``stitch.tile_bands``): one chunk."""
        from ..chunks import ChunkIO

        if self._bands_io is None:
            self._bands_io = ChunkIO(self.bands())
        self._bands_io.write((z, iy, ix), bands.reshape(1, 1, -1))

    def band_row(self, grid: TileGrid, z: int, iy: int) -> np.ndarray:
        """The bands of tile row iy of slice z: (NX, 4, classes, 2h, tile); zeros where a tile had no instance."""
        from ..chunks import ChunkIO

        if self._bands_io is None:
            self._bands_io = ChunkIO(self.bands())
        row = [self._bands_io.read((z, iy, ix))[0, 0] for ix in range(grid.nx)]  # unwritten: zeros
        return np.stack(row).reshape(grid.nx, 4, -1, 2 * grid.band, grid.tile)

    def core(self, grid: TileGrid, z: int, iy: int, ix: int, written: bool = False) -> np.ndarray:
        """The core of tile (z, iy, ix) from its slot: (classes, h, w) tile-local ids (zeros: no instance there).
        ``written``: the caller knows the tile has instances, so a missing chunk is damage too."""
        from ..chunks import ChunkIO

        if self._core_io is None:
            self._core_io = ChunkIO(self.cores())
        h, w = grid.core(iy, ix).shape
        where = self.cores_path / f"{z}/0/{iy}/{ix}"  # the chunk's file
        chunk = verified(lambda _: self._core_io.read((z, 0, iy, ix), fill=not written), where, z)
        if chunk is None:
            raise StoreDamage(where, z)
        return chunk[0, :, :h, :w]

    def check_bands(self, z: int, written: list[tuple[int, int]]) -> None:
        """StoreDamage where a band chunk of a tile with fragments (``written``) is missing: zarr would read it as
        zeros, and stitching would silently find no match there."""
        for iy, ix in written:
            chunk = self.bands_path / f"{z}/{iy}/{ix}"
            if not chunk.exists():
                raise StoreDamage(chunk, z)

    def repair(self, damage: StoreDamage) -> None:
        """Forget what a damaged file holds and everything made from it: a slice's predictions (it is predicted
        again), and every stitch, link and write product (made again from the predictions)."""
        if damage.z is not None:
            self.fragments_path(damage.z).unlink(missing_ok=True)
            self.fragments_log(damage.z).unlink(missing_ok=True)
        self.clear(keep_predictions=True)

    # -- logs (driver only) -------------------------------------------------------------------------------------
    @staticmethod
    def _append(path: Path, blocks: list[tuple[tuple[int, int, int], np.ndarray]]) -> None:
        """Append (key, rows) blocks as npy arrays: a block cut short by a kill is ignored. Not fsynced: what a killed
        process wrote is kept by the OS, and a machine crash that loses the last records costs their tiles a second
        prediction (a record that survives its tile's chunks is found as damage). fsync per append took ~18% of the
        driver's samples at 2,000 tiles/s (bench_driver.py's replay predictor)."""
        buf = io.BytesIO()
        for key, rows in blocks:
            np.save(buf, np.asarray(key, dtype=np.int64), allow_pickle=False)
            np.save(buf, rows, allow_pickle=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            f.write(buf.getvalue())

    @staticmethod
    def _read(path: Path, dtype: np.dtype, cut: bool = True) -> list[tuple[tuple[int, int, int], np.ndarray]]:
        """The log's records up to the first that is cut short or garbage; with ``cut`` (the driver's reads) the
        log is cut there, so that what is appended next is read (the tiles of the records lost are predicted
        again)."""
        out = []
        if not path.exists():
            return out
        with open(path, "r+b" if cut else "rb") as f:
            good = 0
            while True:
                try:
                    key = np.load(f, allow_pickle=False)
                    rows = np.load(f, allow_pickle=False)
                except (ValueError, EOFError, OSError):
                    break  # the end, or a record cut short: its tile is predicted again
                if key.shape != (3,) or rows.dtype != dtype:
                    break
                out.append((tuple(int(v) for v in key), rows))
                good = f.tell()
            if cut:
                f.truncate(good)
        return out

    def append_fragments(self, z: int, records: list[tuple[tuple[int, int, int], np.ndarray]]) -> None:
        self._append(self.fragments_log(z), records)

    def read_fragment_log(self, z: int) -> dict[tuple[int, int, int], np.ndarray]:
        return dict(self._read(self.fragments_log(z), FRAGMENT))

    def complete_slice(self, z: int, records: dict[tuple[int, int, int], np.ndarray]) -> None:
        """Every tile of slice z is predicted: write its fragment table (raster order) and drop the log."""
        keys = sorted(records)
        table = np.concatenate([records[k] for k in keys]) if keys else np.zeros(0, FRAGMENT)
        save_npy(self.fragments_path(z), table)
        self.fragments_log(z).unlink(missing_ok=True)

    def holds_predictions(self) -> bool:
        """Whether any tile's predictions are kept here (a slice's fragment log or table)."""
        folder = self.root / "frag"
        return folder.is_dir() and any(folder.iterdir())

    def slice_done(self, z: int) -> bool:
        return self.fragments_path(z).exists()

    def fragments(self, z: int) -> np.ndarray:
        frag = verified(_npy, self.fragments_path(z), z)
        if frag.dtype != FRAGMENT:
            raise StoreDamage(self.fragments_path(z), z)
        return frag

    def append_zoverlaps(self, z: int, blocks: list[tuple[tuple[int, int, int], np.ndarray]], d: int = 1) -> None:
        self._append(self.zoverlaps_log(z, d), blocks)

    def read_zoverlaps(self, z: int, d: int = 1) -> dict[tuple[int, int], np.ndarray]:
        """The z-overlap blocks between slices z and z + d logged so far, by tile position. Logs of d >= 2 are read
        by the gap units' workers, which never write here: one cut short by a killed driver is read up to the cut
        and left as it is (the positions after it are counted from the tile cores)."""
        blocks = self._read(self.zoverlaps_log(z, d), ZOVERLAP, cut=d == 1)
        return {(iy, ix): rows for (_, iy, ix), rows in blocks}

    # -- stitch and link products (driver only) -----------------------------------------------------------------
    def write_edges(self, z: int, stitched: SliceStitch, overlaps: np.ndarray) -> None:
        """Slice z's stitch products (``stitch.SliceStitch``) and its complete z-overlaps with slice z+1."""
        save_npz(self.edges_path(z), pairs=stitched.pairs, overlaps=overlaps,
                 touching_unmatched=np.array(stitched.touching_unmatched), fill_patches=stitched.fills.patches,
                 fill_ids=stitched.fills.ids)  # fmt: skip
        self.zoverlaps_log(z).unlink(missing_ok=True)

    def edges(self, z: int) -> dict[str, np.ndarray]:
        edges = verified(_npz, self.edges_path(z))
        if {"pairs", "overlaps", "touching_unmatched", "fill_patches", "fill_ids"} - set(edges):
            raise StoreDamage(self.edges_path(z))
        return edges

    def fills(self, z: int) -> Fills:
        """Slice z's border fills (``stitch`` rule 4), without reading the rest of its edges (the z-overlaps)."""
        return self.fills_of(verified(lambda p: _npz(p, ("fill_patches", "fill_ids")), self.edges_path(z)))

    @staticmethod
    def fills_of(edges: dict[str, np.ndarray]) -> Fills:
        return Fills(edges["fill_patches"], edges["fill_ids"])

    def stitched(self, z: int) -> bool:
        return self.edges_path(z).exists()

    def write_gap_overlaps(self, z: int, rows: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        save_npz(self.gaps_path(z), **{f"{k}{d}": r for d, pair in rows.items() for k, r in zip("dm", pair)})

    def gap_overlaps(self, z: int) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
        """The gap unit's rows for slice z with slice z + d, per d (``link.gap_overlaps``: its z-overlaps and its
        moved instances' overlaps); None where that stage did not run, or ran before moved rows were counted."""
        if not self.gaps_path(z).exists():
            return None
        saved = verified(_npz, self.gaps_path(z))
        ds = {int(k[1:]) for k in saved}
        if any(f"d{d}" not in saved or f"m{d}" not in saved for d in ds):
            return None
        return {d: (saved[f"d{d}"], saved[f"m{d}"]) for d in sorted(ds)}

    def write_instances(self, z: int, instances: np.ndarray) -> None:
        save_npy(self.instances_path(z), instances)

    def instances(self, z: int) -> np.ndarray:
        return verified(_npy, self.instances_path(z))

    def write_lut(self, z: int, object_ids: np.ndarray) -> None:
        save_npy(self.lut_path(z), object_ids)

    def lut(self, z: int) -> np.ndarray:
        return verified(_npy, self.lut_path(z))

    def objects(self) -> np.ndarray:
        return verified(_npy, self.objects_path)

    def write_link_stats(self, stats: dict) -> None:
        atomic_write_bytes(self.link_stats_path, json.dumps(stats).encode())

    def link_stats(self) -> dict:
        return verified(lambda p: json.loads(p.read_text()), self.link_stats_path)

    def mark(self, stage: str, unit: tuple[int, ...]) -> None:
        p = self.marker(stage, unit)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch()

    def marks(self, stage: str) -> set[tuple[int, ...]]:
        """Every unit marked done for a stage, from one directory listing (not a file check per unit)."""
        folder = self._marks_dir(stage)
        if not folder.is_dir():
            return set()
        return {tuple(int(v) for v in p.name.split("_")) for p in folder.iterdir() if p.name[0].isdigit()}
