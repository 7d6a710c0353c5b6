"""Whole zarr chunks, coded with the array's own codecs and moved by its store in one synchronous call."""

from __future__ import annotations

import numpy as np


class ChunkIO:
    """Whole, aligned chunks (shards, where the array has them: the unit one writer owns) of a zarr array.

    On a local filesystem, chunks are coded here with the array's own codecs and moved by zarr's store in one
    synchronous call (``LocalStore.set_sync``, which writes atomically, and ``get_sync``): zarr-python's
    ``array[...]`` adds 1-2 ms of asyncio hand-offs per chunk (measured in benchmarks/REPORT.md), and every chunk
    this tool moves is whole. Reads take that path for zarr v2 arrays in C order and for unsharded zarr v3 arrays
    whose codecs are bytes plus at most one of zstd, blosc and gzip (what other tools write); writes for zarr v2
    (the output and the work store). Everything else takes the ordinary path, a chunk or shard in one call."""

    def __init__(self, array):
        meta = array.metadata
        self.array, self.chunks = array, tuple(array.shards or array.chunks)
        store = array.store_path.store
        codecs = _plain_codecs(array) if hasattr(store, "set_sync") and hasattr(store, "get_sync") else None
        self.direct_read = codecs is not None
        self.direct = self.direct_read and meta.zarr_format == 2  # writes
        if self.direct_read:
            from zarr.core.buffer import default_buffer_prototype

            self.dtype, self.codec, self.filters = codecs
            self.store, self.prefix = store, f"{array.store_path.path}/" if array.store_path.path else ""
            self.fill, self.key = meta.fill_value or 0, meta.encode_chunk_key
            self.buffer = default_buffer_prototype().buffer

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> None:
        """Write chunk (or shard) ``coords`` (grid index); ``data`` is the whole unit, cut short at the array's edge."""
        if not self.direct:
            self.array[tuple(slice(c * n, c * n + d) for c, n, d in zip(coords, self.chunks, data.shape))] = data
            return
        if data.shape != self.chunks:  # an edge chunk is stored whole, padded with the fill value
            full = np.full(self.chunks, self.fill, dtype=self.dtype)
            full[tuple(slice(0, d) for d in data.shape)] = data
            data = full
        raw = np.ascontiguousarray(data, dtype=self.dtype)
        for f in self.filters:  # zarr v2: filters first (the work store's CRC32C), then the compressor
            raw = f.encode(raw)
        blob = self.codec.encode(raw) if self.codec is not None else bytes(raw)
        self.store.set_sync(self.prefix + self.key(tuple(coords)), self.buffer.from_bytes(blob))

    def read(self, coords: tuple[int, ...], fill: bool = True) -> np.ndarray | None:
        """Chunk ``coords`` whole (edge chunks include their padding); where it was never written the fill value,
        or None with ``fill`` False (a chunk that should be there: the caller calls it missing)."""
        if not self.direct_read:
            return np.asarray(self.array[tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, self.chunks))])
        blob = self.store.get_sync(self.prefix + self.key(tuple(coords)))
        if blob is None:
            return np.full(self.chunks, self.fill, dtype=self.dtype) if fill else None
        data = blob.to_bytes()
        data = self.codec.decode(data) if self.codec is not None else data
        for f in reversed(self.filters):
            data = f.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)


def _plain_codecs(array) -> tuple[np.dtype, object, tuple] | None:
    """(stored dtype, compressor, filters) as numcodecs objects where this module can code the array's chunks
    itself; None where zarr must (sharding, transposes, checksums of zarr v3, F order, unknown codecs)."""
    meta = array.metadata
    if meta.zarr_format == 2:
        if meta.order != "C":
            return None
        return meta.dtype.to_native_dtype(), meta.compressor, tuple(meta.filters or ())
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, ZstdCodec

    if array.shards is not None or not meta.codecs or not isinstance(meta.codecs[0], BytesCodec):
        return None
    dtype = np.dtype(meta.data_type.to_native_dtype())
    endian = meta.codecs[0].endian
    if endian is not None and dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
    rest = meta.codecs[1:]
    if not rest:
        return dtype, None, ()
    if len(rest) > 1:
        return None
    # decoding needs no settings: a zstd frame, a blosc header and a gzip stream each say how they were made
    compressor = {ZstdCodec: numcodecs.Zstd, BloscCodec: numcodecs.Blosc, GzipCodec: numcodecs.GZip}.get(type(rest[0]))
    return (dtype, compressor(), ()) if compressor else None
