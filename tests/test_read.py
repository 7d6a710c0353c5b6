"""Readers: TIFF (multi-page, BigTIFF, 2D, ImageJ, tiled), zarr v2/v3 and OME-Zarr, read window by window."""

import numpy as np
import pytest
import tifffile
import zarr

from cellseg_batch.errors import UserError
from cellseg_batch.normalize import Normalization, estimate
from cellseg_batch.read import open_volume, read_class_map

DATA = np.random.default_rng(1).integers(0, 4000, (5, 130, 150)).astype(np.uint16)


def _check(path, data=DATA):
    v = open_volume(path)
    assert v.shape == data.shape and v.dtype == data.dtype
    np.testing.assert_array_equal(v.read(2, 10, 70, 33, 149), data[2, 10:70, 33:149])
    np.testing.assert_array_equal(v.read(v.shape[0] - 1, 0, data.shape[1], 0, data.shape[2]), data[-1])


@pytest.mark.parametrize("kwargs", [{}, {"bigtiff": True}, {"compression": "zlib"},
                                    {"compression": "zlib", "tile": (64, 64)}, {"imagej": True, "metadata": {"axes": "ZYX"}}])  # fmt: skip
def test_tiff_variants(tmp_path, kwargs):
    tifffile.imwrite(tmp_path / "v.tif", DATA, **kwargs)
    _check(tmp_path / "v.tif")


def test_2d_tiff_is_one_slice(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", DATA[0])
    v = open_volume(tmp_path / "v.tif")
    assert v.shape == (1, 130, 150)
    np.testing.assert_array_equal(v.read(0, 5, 9, 5, 9), DATA[0, 5:9, 5:9])


@pytest.mark.parametrize("fmt", [2, 3])
def test_zarr_arrays(tmp_path, fmt):
    a = zarr.create_array(str(tmp_path / "v.zarr"), shape=DATA.shape, chunks=(1, 64, 64), dtype=DATA.dtype,
                          zarr_format=fmt)  # fmt: skip
    a[:] = DATA
    _check(tmp_path / "v.zarr")


def test_ome_zarr_level_0_with_pixel_size(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    store = parse_url(str(tmp_path / "img.zarr"), mode="w").store
    root = zarr.group(store=store)
    write_image(DATA, root, axes="zyx", scaler=None,
                coordinate_transformations=[[{"type": "scale", "scale": [40.0, 5.0, 5.0]}]])  # fmt: skip
    _check(tmp_path / "img.zarr")


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_dtypes(tmp_path, dtype):
    data = (DATA / 16).astype(dtype)
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    _check(tmp_path / "v.tif", data)


def test_bool_volume_is_refused(tmp_path):
    zarr.create_array(str(tmp_path / "b.zarr"), shape=(2, 8, 8), dtype=bool)
    with pytest.raises(UserError, match="pixel type"):
        open_volume(tmp_path / "b.zarr")


def test_normalization_is_the_same_for_8_and_16_bit_versions_of_a_volume(tmp_path):
    base = np.random.default_rng(2).integers(20, 230, (3, 200, 200)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", base, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", base.astype(np.uint16) * 257, photometric="minisblack")
    na, nb = estimate(open_volume(tmp_path / "a.tif")), estimate(open_volume(tmp_path / "b.tif"))
    np.testing.assert_allclose(na.apply(base[0]), nb.apply(base[0].astype(np.uint16) * 257), atol=1e-3)
    n = Normalization(10, 110)
    np.testing.assert_allclose(n.apply(np.array([0, 10, 60, 110, 200])), [0, 0, 127.5, 255, 255])


@pytest.mark.parametrize("text,match", [("{", "not valid JSON"), ('{"a": "x"}', "not a label id"),
                                        ('{"1": 5}', "class name"), ("[]", "must map")])  # fmt: skip
def test_bad_class_maps(tmp_path, text, match):
    (tmp_path / "c.json").write_text(text)
    with pytest.raises(UserError, match=match):
        read_class_map(str(tmp_path / "c.json"))


def test_class_map_forms(tmp_path):
    (tmp_path / "flat.json").write_text('{"1": "mito", "2": "cell"}')
    (tmp_path / "nested.json").write_text('{"instance_class": {"1": "mito"}, "note": "x"}')
    assert read_class_map(str(tmp_path / "flat.json")) == {1: "mito", 2: "cell"}
    assert read_class_map(str(tmp_path / "nested.json")) == {1: "mito"}
    assert read_class_map("cell") == "cell"
