"""N5 volumes and label stacks (through tensorstore): axis order as N5-Java (Fiji) gives it, pixel size from the common
attribute conventions, container paths, one-line refusals, and a labels run from N5 equal to the same run from TIFF.
Every N5 here is written in the test: by hand, per the N5 spec, or by tensorstore."""

import gzip
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellseg_batch import cli as cellseg_cli
from cellseg_batch.errors import UserError
from cellseg_batch.read import open_label_layers, open_volume, volume_identity
from conftest import cli, labels_of

DATA = np.random.default_rng(1).integers(0, 4000, (5, 130, 150)).astype(np.uint16)  # (Z, Y, X): every side differs


def _write_by_hand(dataset: Path, zyx: np.ndarray, block_xyz=(64, 48, 2), attrs=None, root_attrs=True) -> None:
    """An N5 dataset per the spec: attributes.json lists dimensions and blockSize x first; the block at grid
    position (gx, gy, gz) is the file gx/gy/gz: uint16 mode 0, uint16 ndim, uint32 size of each dimension x first
    (all big-endian), then the block's pixels big-endian, x varying fastest."""
    dims = list(reversed(zyx.shape))
    dataset.mkdir(parents=True)
    meta = {"dimensions": dims, "blockSize": list(block_xyz[: len(dims)]), "dataType": zyx.dtype.name,
            "compression": {"type": "raw"}, **(attrs or {})}  # fmt: skip
    (dataset / "attributes.json").write_text(json.dumps(meta))
    root = next((p for p in [dataset, *dataset.parents] if p.name.endswith(".n5")), None)
    if root_attrs and root is not None and not (root / "attributes.json").exists():
        (root / "attributes.json").write_text('{"n5": "2.5.1"}')
    block = list(reversed(block_xyz[: len(dims)]))  # (z, y, x) or (y, x)
    for grid in np.ndindex(*[-(-n // b) for n, b in zip(zyx.shape, block)]):
        part = zyx[tuple(slice(g * b, (g + 1) * b) for g, b in zip(grid, block))]
        header = struct.pack(">HH", 0, part.ndim) + struct.pack(f">{part.ndim}I", *reversed(part.shape))
        # x fastest: the block's (z, y, x) array in C order is its (x, y, z) array in F order
        path = dataset.joinpath(*[str(g) for g in reversed(grid)])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(header + part.astype(part.dtype.newbyteorder(">")).tobytes(order="C"))


def _write_tensorstore(dataset: Path, zyx: np.ndarray, compression=None) -> None:
    import tensorstore as ts

    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(dataset)}, "create": True, "delete_existing": True,
                     "metadata": {"dimensions": list(reversed(zyx.shape)), "blockSize": [64, 48, 2],
                                  "dataType": zyx.dtype.name, "compression": compression or {"type": "gzip"}}}).result()  # fmt: skip
    store[...] = zyx.T  # tensorstore's n5 driver indexes x first, as attributes.json lists the dimensions


def _check(path, data=DATA):
    v = open_volume(path)
    assert v.shape == data.shape and v.dtype == data.dtype, v
    np.testing.assert_array_equal(v.read(2, 10, 70, 33, 149), data[2, 10:70, 33:149])
    np.testing.assert_array_equal(np.stack([v.read(z, 0, v.shape[1], 0, v.shape[2]) for z in range(v.shape[0])]), data)


def test_a_hand_written_n5_reads_as_z_y_x_reversed_from_its_x_first_dimensions(tmp_path):
    """The axis order found out: tensorstore's n5 driver indexes dimensions in attributes.json's order, x first; the
    reader reverses them, so the pixel the spec puts at (x, y, z) reads at [z, y, x] (N5-Java's and z5py's order)."""
    import tensorstore as ts

    _write_by_hand(tmp_path / "vol.n5" / "raw", DATA)
    raw = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(tmp_path / "vol.n5" / "raw")}}).result()
    assert raw.shape == (150, 130, 5)
    np.testing.assert_array_equal(raw[...].read().result(), DATA.T)
    _check(tmp_path / "vol.n5" / "raw")
    _check(tmp_path / "vol.n5")  # its one dataset
    _check(f"{tmp_path / 'vol.n5'}:raw")  # as file.h5:dataset


def test_a_2d_n5_dataset_is_one_slice(tmp_path):
    _write_by_hand(tmp_path / "slice.n5" / "em", DATA[0])
    v = open_volume(tmp_path / "slice.n5" / "em")
    assert v.shape == (1, 130, 150)
    np.testing.assert_array_equal(v.read(0, 3, 90, 7, 140), DATA[0, 3:90, 7:140])


def test_a_gzip_n5_written_by_tensorstore_is_x_first_on_disk_and_reads_as_z_y_x(tmp_path):
    _write_tensorstore(tmp_path / "vol.n5" / "raw", DATA)
    meta = json.loads((tmp_path / "vol.n5" / "raw" / "attributes.json").read_text())
    assert meta["dimensions"] == [150, 130, 5] and meta["compression"]["type"] == "gzip"
    block = (tmp_path / "vol.n5" / "raw" / "1" / "0" / "2").read_bytes()  # x block 1, y block 0, z block 2
    mode, ndim, *size = struct.unpack(">HHIII", block[:16])
    assert (mode, ndim, size) == (0, 3, [64, 48, 2])  # tensorstore writes edge blocks whole (the hand writer cuts)
    pixels = np.frombuffer(gzip.decompress(block[16:]), ">u2").reshape(2, 48, 64)  # x fastest
    np.testing.assert_array_equal(pixels[0], DATA[4, 0:48, 64:128])  # z 4, the last slice: 5 is padding
    _check(tmp_path / "vol.n5" / "raw")


@pytest.mark.parametrize("attrs, nm", [
    ({"resolution": [4, 5, 30]}, (30.0, 5.0, 4.0)),  # BigDataViewer's N5, CellMap: nm, x first
    ({"pixelResolution": {"dimensions": [0.004, 0.005, 0.03], "unit": "um"}}, (30.0, 5.0, 4.0)),  # n5-ij (Fiji)
    ({"pixelResolution": {"dimensions": [0.004, 0.005, 0.03], "unit": "µm"}}, (30.0, 5.0, 4.0)),
    ({"pixelResolution": {"dimensions": [4, 5, 30], "unit": "nm"}}, (30.0, 5.0, 4.0)),
    ({"pixelResolution": {"dimensions": [4, 5, 30], "unit": "pixel"}}, None),  # no length: unknown
    ({"transform": {"axes": ["z", "y", "x"], "scale": [30, 5, 4], "units": ["nm", "nm", "nm"],
                    "translate": [0, 0, 0]}}, (30.0, 5.0, 4.0)),  # cosem (OpenOrganelle): axes named
    ({"transform": {"axes": ["x", "y", "z"], "scale": [0.004, 0.005, 0.03], "units": ["micrometer"] * 3}},
     (30.0, 5.0, 4.0)),
    ({}, None),
])  # fmt: skip
def test_n5_pixel_size_from_the_common_attributes(tmp_path, attrs, nm):
    _write_by_hand(tmp_path / "vol.n5" / "raw", DATA, attrs=attrs)
    v = open_volume(tmp_path / "vol.n5" / "raw")
    assert v.pixel_size_nm == (pytest.approx(nm) if nm else None)
    assert v.origin_nm is None


def test_a_cosem_n5_crop_says_where_its_first_voxel_is(tmp_path):
    """OpenOrganelle's crops carry a ``translate`` (units per axis): the run's output starts there (test_ngff)."""
    transform = {"axes": ["z", "y", "x"], "scale": [8, 8, 8], "units": ["nm", "nm", "nm"], "translate": [1.6, 800, 0]}
    _write_by_hand(tmp_path / "vol.n5" / "raw", DATA, attrs={"transform": transform})
    assert open_volume(tmp_path / "vol.n5" / "raw").origin_nm == pytest.approx((1.6, 800.0, 0.0))


def _bdv(root: Path) -> None:
    """BigDataViewer's N5 layout: setupN/timepointN/sN, each level a dataset; n5-viewer's pixelResolution on the
    multiscale group."""
    for setup in ("setup0", "setup1"):
        _write_by_hand(root / setup / "timepoint0" / "s0", DATA, attrs={"downsamplingFactors": [1, 1, 1]})
        _write_by_hand(root / setup / "timepoint0" / "s1", DATA[::2, ::2, ::2], attrs={"downsamplingFactors": [2, 2, 2]})  # fmt: skip
        (root / setup / "timepoint0" / "attributes.json").write_text(
            json.dumps({"pixelResolution": {"dimensions": [8, 8, 40], "unit": "nm"}}))  # fmt: skip


def test_an_n5_of_several_datasets_is_refused_suggesting_level_s0(tmp_path):
    root = tmp_path / "vol.n5"
    _bdv(root)
    with pytest.raises(UserError) as e:
        open_volume(root)
    line = str(e.value)
    assert "\n" not in line and "holds 4 image datasets" in line, line
    assert f"{root}/setup0/timepoint0/s1" in line and line.endswith(f"name one, e.g. {root}/setup0/timepoint0/s0")
    with pytest.raises(UserError, match=f"holds 2 image datasets .*e.g. {root}/setup1/timepoint0/s0$"):
        open_volume(root / "setup1")  # a group: its own datasets
    v = open_volume(root / "setup1" / "timepoint0" / "s0")
    assert v.pixel_size_nm == (40.0, 8.0, 8.0)  # level 0: its multiscale group's pixel size
    _check(root / "setup1" / "timepoint0" / "s0")
    _check(root / "setup0" / "timepoint0" / "s1", DATA[::2, ::2, ::2])
    assert open_volume(root / "setup0" / "timepoint0" / "s1").pixel_size_nm is None  # a lower level: not s0's


def test_one_dataset_anywhere_in_a_container_is_read(tmp_path):
    """Of an N5 holding one image dataset deep in groups (and a small one, not an image), ``vol.n5`` reads it; a
    container not named .n5 is recognized by its attributes.json."""
    _write_by_hand(tmp_path / "vol.n5" / "volumes" / "raw", DATA)
    _write_by_hand(tmp_path / "vol.n5" / "lut", np.zeros((256, 3), np.uint8))
    _check(tmp_path / "vol.n5")
    _write_by_hand(tmp_path / "container" / "raw", DATA)
    (tmp_path / "container" / "attributes.json").write_text('{"n5": "2.5.1"}')
    _check(tmp_path / "container")


def test_an_n5_label_stack_and_its_identity(tmp_path):
    ids = (DATA // 1000).astype(np.uint64)
    _write_tensorstore(tmp_path / "lab.n5" / "seg", ids)
    (layer,) = open_label_layers([str(tmp_path / "lab.n5" / "seg")], ["cell"])
    np.testing.assert_array_equal(layer.volume.read(3, 0, 130, 0, 150), ids[3])
    before = volume_identity(layer.volume)
    assert before == volume_identity(open_volume(tmp_path / "lab.n5" / "seg"))
    _write_tensorstore(tmp_path / "lab.n5" / "seg", ids + 1)  # rewritten: its blocks are new files
    assert volume_identity(open_volume(tmp_path / "lab.n5" / "seg")) != before


BAD = {
    "missing dataset": ("vol.n5/nope", "has no dataset 'nope'; its image datasets: raw"),
    "missing container": ("none.n5", "does not exist"),
    "not N5": ("empty.n5", "is not an N5 container"),
    "a file": ("file.n5", "is a file, not an N5 container"),
    "varlength": ("varlength.n5/raw", "has pixel type object; convert it"),
    "unknown type": ("unknown.n5/raw", "has the N5 data type 'bits'; convert it"),
    "lz4": ("lz4.n5/raw", 'cannot open .* as N5 .*"lz4" is not registered'),
    "5D": ("five.n5/raw", "has shape \\(1, 2, 5, 130, 150\\) and names no axes"),
    "bad block": ("damaged.n5/raw", "cannot read slice 0 of .* a block may be damaged"),
}


@pytest.fixture(scope="module")
def bad(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    _write_by_hand(root / "vol.n5" / "raw", DATA)
    (root / "empty.n5").mkdir()
    (root / "file.n5").write_text("not a folder")
    for name, change in [("varlength", {"dataType": "object"}), ("unknown", {"dataType": "bits"}),
                         ("lz4", {"compression": {"type": "lz4"}})]:  # fmt: skip
        _write_by_hand(root / f"{name}.n5" / "raw", DATA[:1], attrs=change)
    _write_by_hand(root / "five.n5" / "raw", np.zeros((1, 2, 5, 130, 150), np.uint8), block_xyz=(64, 64, 1, 1, 1))
    _write_by_hand(root / "damaged.n5" / "raw", DATA)
    (root / "damaged.n5" / "raw" / "0" / "0" / "0").write_bytes(b"\0\0\0\3 cut short")
    return root


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_n5_is_refused_in_one_line(bad, case):
    path, message = BAD[case]
    with pytest.raises(UserError, match=message) as e:
        v = open_volume(bad / path)
        v.read(0, 0, 64, 0, 64)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("case", ["missing dataset", "lz4", "bad block"])
def test_a_bad_n5_given_to_run_is_one_line_and_writes_nothing(capsys, bad, case):
    """As test_bad_input: exit status 2, one line naming the N5, nothing created."""
    path = bad / BAD[case][0]
    before = sorted(bad.rglob("*"))
    capsys.readouterr()
    rc = cellseg_cli.main(["run", str(path), "--predictor", "labels", "--labels", str(path), "--classes", "cell",
                           "--out", str(bad / "out.zarr"), "--no-progress"])  # fmt: skip
    lines = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("cellseg-batch: error: "), lines
    assert path.parent.name in lines[0] or path.name in lines[0], lines
    assert re.search(BAD[case][1], lines[0]), lines
    assert sorted(bad.rglob("*")) == before


def test_a_labels_run_from_n5_equals_the_same_run_from_tiff(tmp_path):
    rng = np.random.default_rng(7)
    blocks = (rng.permutation(4 * 8 * 12) + 1).reshape(4, 8, 12)  # an id per block and slice, linked by overlap
    cells = np.repeat(np.repeat(blocks, 20, 1), 16, 2).astype(np.uint32)  # 4 x 160 x 192
    image = (cells * 20 % 256).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", cells, photometric="minisblack")
    _write_by_hand(tmp_path / "vol.n5" / "raw", image, block_xyz=(64, 64, 1))
    _write_tensorstore(tmp_path / "lab.n5" / "seg", cells)
    args = ("--predictor", "labels", "--classes", "cell", "--tile", 96, "--overlap", 16, "--no-progress")
    cli("run", tmp_path / "vol.n5" / "raw", "--labels", tmp_path / "lab.n5" / "seg", *args, "--out", tmp_path / "n5.zarr")  # fmt: skip
    cli("run", tmp_path / "vol.tif", "--labels", tmp_path / "lab.tif", *args, "--out", tmp_path / "tif.zarr")
    from_n5, from_tif = labels_of(tmp_path / "n5.zarr", "cell"), labels_of(tmp_path / "tif.zarr", "cell")
    assert from_n5.shape == (4, 160, 192) and from_n5.any()
    np.testing.assert_array_equal(from_n5, from_tif)
