"""Whole zarr chunks, coded with the array's own codecs and moved by its store in one synchronous call."""

from __future__ import annotations

import numpy as np


class ChunkIO:
    """Whole, aligned chunks (shards, where the array has them: the unit one writer owns) of a zarr array.

    On a local filesystem, chunks are coded here with the array's own codecs and moved by zarr's store in one
    synchronous call (``LocalStore.set_sync``, which writes atomically, and ``get_sync``): zarr-python's
    ``array[...]`` adds 1-2 ms of asyncio hand-offs per chunk (measured in benchmarks/REPORT.md), and every chunk
    this tool moves is whole. That path reads and writes zarr v2 arrays in C order, and unsharded zarr v3 arrays
    whose codecs are bytes, at most one of zstd, blosc and gzip, and optionally a crc32c checksum after it (what
    other tools write, and the work store). Everything else takes the ordinary path, a chunk or shard in one call."""

    def __init__(self, array):
        self.array, self.chunks = array, tuple(array.shards or array.chunks)
        store = array.store_path.store
        coding = _plain_codecs(array) if hasattr(store, "set_sync") and hasattr(store, "get_sync") else None
        self.direct = self.direct_read = coding is not None
        if self.direct:
            from zarr.core.buffer import default_buffer_prototype

            self.dtype, self.before, self.codec, self.after = coding
            self.store, self.prefix = store, f"{array.store_path.path}/" if array.store_path.path else ""
            self.fill, self.key = array.metadata.fill_value or 0, array.metadata.encode_chunk_key
            self.buffer = default_buffer_prototype().buffer

    def write(self, coords: tuple[int, ...], data: np.ndarray) -> None:
        """Write chunk (or shard) ``coords`` (grid index); ``data`` is the whole unit, cut short at the array's edge."""
        if not self.direct:
            self.array[tuple(slice(c * n, c * n + d) for c, n, d in zip(coords, self.chunks, data.shape))] = data
            return
        if data.shape != self.chunks:  # an edge chunk is stored whole, padded with the fill value
            full = np.zeros(self.chunks, self.dtype) if self.fill == 0 else np.full(self.chunks, self.fill, self.dtype)
            full[tuple(slice(0, d) for d in data.shape)] = data
            data = full
        blob = np.ascontiguousarray(data, dtype=self.dtype)
        for f in self.before:  # zarr v2: filters (e.g. a CRC32C of the pixels), then the compressor
            blob = f.encode(blob)
        blob = self.codec.encode(blob) if self.codec is not None else blob
        for f in self.after:  # zarr v3: checksums of the compressed bytes
            blob = f.encode(blob)
        self.store.set_sync(self.prefix + self.key(tuple(coords)), self.buffer.from_bytes(_as_bytes(blob)))

    def read(self, coords: tuple[int, ...], fill: bool = True) -> np.ndarray | None:
        """Chunk ``coords`` whole (edge chunks include their padding); where it was never written the fill value,
        or None with ``fill`` False (a chunk that should be there: the caller calls it missing). A checksum that
        does not match raises ValueError or RuntimeError."""
        if not self.direct_read:
            return np.asarray(self.array[tuple(slice(c * n, (c + 1) * n) for c, n in zip(coords, self.chunks))])
        blob = self.store.get_sync(self.prefix + self.key(tuple(coords)))
        if blob is None:
            return np.full(self.chunks, self.fill, dtype=self.dtype) if fill else None
        data = blob.to_bytes()
        for f in reversed(self.after):
            data = f.decode(data)
        data = self.codec.decode(data) if self.codec is not None else data
        for f in reversed(self.before):
            data = f.decode(data)
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)


def _as_bytes(blob) -> bytes:
    return blob if isinstance(blob, bytes) else np.ascontiguousarray(blob).view(np.uint8).tobytes()


def _plain_codecs(array) -> tuple[np.dtype, tuple, object, tuple] | None:
    """(stored dtype, filters before the compressor, compressor, checksums after it) as numcodecs objects where this
    module can code the array's chunks itself; None where zarr must (sharding, transposes, F order, other codecs)."""
    meta = array.metadata
    if meta.zarr_format == 2:
        if meta.order != "C":
            return None
        return meta.dtype.to_native_dtype(), tuple(meta.filters or ()), meta.compressor, ()
    import numcodecs
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, GzipCodec, ZstdCodec

    if array.shards is not None or not meta.codecs or not isinstance(meta.codecs[0], BytesCodec):
        return None
    dtype = np.dtype(meta.data_type.to_native_dtype())
    endian = meta.codecs[0].endian
    if endian is not None and dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if endian.value == "little" else ">")
    rest = list(meta.codecs[1:])
    after = ()
    if rest and isinstance(rest[-1], Crc32cCodec):
        rest.pop()
        after = (numcodecs.CRC32C(location="end"),)  # the v3 codec's layout: 4 little-endian bytes after the data
    if not rest:
        return dtype, (), None, after
    if len(rest) > 1:
        return None
    codec = rest[0]
    if isinstance(codec, ZstdCodec):
        compressor = numcodecs.Zstd(level=codec.level, checksum=codec.checksum)
    elif isinstance(codec, BloscCodec):
        shuffle = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
                   "bitshuffle": numcodecs.Blosc.BITSHUFFLE}[getattr(codec.shuffle, "value", codec.shuffle)]  # fmt: skip
        compressor = numcodecs.Blosc(codec.cname.value if hasattr(codec.cname, "value") else codec.cname,
                                     codec.clevel, shuffle=shuffle, blocksize=codec.blocksize)  # fmt: skip
    elif isinstance(codec, GzipCodec):
        compressor = numcodecs.GZip(level=codec.level)
    else:
        return None
    return dtype, (), compressor, after
