"""Readers: TIFF (multi-page, BigTIFF, 2D, ImageJ, OME, tiled, RGB, several images), image sequences, zarr v2/v3 and
OME-Zarr, HDF5, MRC, NumPy .npy, read window by window."""

import json

import numcodecs
import numpy as np
import pytest
import tifffile
import zarr

from cellseg_batch.errors import UserError
from cellseg_batch.normalize import Normalization, estimate
from cellseg_batch.read import open_label_layers, open_volume, read_class_map

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


@pytest.mark.parametrize("kwargs", [{"compression": "lzw"}, {"compression": "zstd", "tile": (64, 64)},
                                    {"compression": "lzw", "predictor": True}, {"byteorder": ">"}])  # fmt: skip
def test_tiff_codecs_and_byte_orders_microscopes_write(tmp_path, kwargs):
    tifffile.imwrite(tmp_path / "v.tif", DATA, photometric="minisblack", **kwargs)
    _check(tmp_path / "v.tif")


def test_a_tiff_codec_missing_here_is_named_when_the_volume_opens(tmp_path):
    """Without imagecodecs tifffile cannot decode LZW: the error says so at open, not at the run's first tile."""
    import subprocess
    import sys

    tifffile.imwrite(tmp_path / "v.tif", DATA, photometric="minisblack", compression="lzw")
    code = ("import sys; sys.modules['imagecodecs'] = None\n"
            "from cellseg_batch.read import open_volume\n"
            f"open_volume({str(tmp_path / 'v.tif')!r})")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode != 0 and "LZW-compressed, which needs the imagecodecs package" in proc.stderr, proc.stderr


@pytest.mark.parametrize("planar", [False, True])
def test_rgb_em_is_read_as_the_mean_of_its_channels(tmp_path, planar):
    """Greyscale EM exported as RGB (three equal channels) reads back as the grey values; colour as their mean."""
    grey = (DATA // 16).astype(np.uint8)
    rgb = np.stack([grey, grey, grey], axis=1 if planar else -1)  # (Z, S, Y, X) or (Z, Y, X, S)
    tifffile.imwrite(tmp_path / "grey.tif", rgb, photometric="rgb", planarconfig="separate" if planar else "contig")
    _check(tmp_path / "grey.tif", grey)
    assert open_volume(tmp_path / "grey.tif").rgb
    colour = np.stack([grey, grey // 2, np.zeros_like(grey)], axis=-1)
    tifffile.imwrite(tmp_path / "colour.tif", colour, photometric="rgb")
    expected = np.rint(colour.astype(np.float64).mean(axis=-1)).astype(np.uint8)
    _check(tmp_path / "colour.tif", expected)


def test_grey_with_alpha_is_read_as_its_grey(tmp_path):
    """Grey + alpha (Fiji, GIMP and Pillow "LA" exports) was refused as multi-sample: the grey is the image."""
    from PIL import Image

    grey = (DATA // 16).astype(np.uint8)
    alpha = np.full_like(grey, 255)
    tifffile.imwrite(tmp_path / "la.tif", np.stack([grey, alpha], axis=-1), photometric="minisblack",
                     extrasamples=["unassalpha"])  # fmt: skip
    _check(tmp_path / "la.tif", grey)
    assert not open_volume(tmp_path / "la.tif").rgb  # its grey values are not a mean of colours
    (tmp_path / "seq").mkdir()
    for z, image in enumerate(grey):  # a sequence mixing L and LA slices reads as one greyscale stack
        frame = Image.fromarray(np.stack([image, alpha[z]], axis=-1), "LA") if z % 2 else Image.fromarray(image)
        frame.save(tmp_path / "seq" / f"s{z}.png")
    _check(tmp_path / "seq", grey)
    tifffile.imwrite(tmp_path / "five.tif", np.stack([grey] * 5, axis=-1), photometric="minisblack", planarconfig="contig")
    with pytest.raises(UserError, match="multi-sample"):
        open_volume(tmp_path / "five.tif")


def test_three_planes_stored_as_one_planar_rgb_image_are_refused(tmp_path):
    """tifffile writes a (3, Y, X) array as one planar RGB image by default: more likely 3 slices than colour."""
    tifffile.imwrite(tmp_path / "v.tif", (DATA[:3] // 16).astype(np.uint8))
    with pytest.raises(UserError, match="one planar RGB image of shape .* save it as a greyscale stack"):
        open_volume(tmp_path / "v.tif")


def test_singleton_axes_anywhere_are_dropped(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", DATA[..., None], photometric="minisblack")  # (Z, Y, X, 1)
    _check(tmp_path / "v.tif")
    tifffile.imwrite(tmp_path / "w.tif", DATA[:, None], photometric="minisblack")  # (Z, 1, Y, X)
    _check(tmp_path / "w.tif")


def test_a_tiff_written_one_page_at_a_time_is_read_as_every_page(tmp_path):
    """TiffWriter.write once per slice gives each page a "shaped" series of its own: all of them are the stack (as
    Fiji reads it), not the first slice alone; pages that cannot stack are named."""
    with tifffile.TiffWriter(tmp_path / "v.tif") as w:
        for image in DATA:
            w.write(image, photometric="minisblack")
    _check(tmp_path / "v.tif")
    with tifffile.TiffWriter(tmp_path / "odd.tif") as w:
        for z, image in enumerate(DATA):
            w.write(image[:100] if z == 3 else image, photometric="minisblack")
    with pytest.raises(UserError, match=r"odd.tif: page 3 \(from 0\) is 100x150 uint16, but page 0 is 130x150 uint16"):
        open_volume(tmp_path / "odd.tif")


@pytest.mark.parametrize("pages", [8, 5])  # tifffile: a uniform series from 8 pages on (3 sampled), generic below
@pytest.mark.parametrize("odd", ["size", "type"])
def test_a_multi_page_tiff_with_one_odd_page_is_refused_naming_it(tmp_path, pages, odd):
    """PIL (save_all) writes no metadata: a page of another size or pixel type must not be read as garbage or be
    left out of the stack."""
    from PIL import Image

    images = [Image.fromarray(image) for image in np.concatenate([DATA, DATA])[:pages]]
    images[4] = Image.fromarray(DATA[4, :100] if odd == "size" else (DATA[4] // 256).astype(np.uint8))
    images[0].save(tmp_path / "v.tif", save_all=True, append_images=images[1:])
    shown = "100x150 uint16" if odd == "size" else "130x150 uint8"
    with pytest.raises(UserError, match=rf"v.tif: page 4 \(from 0\) is {shown}, but page 0 is 130x150 uint16"):
        open_volume(tmp_path / "v.tif")
    images[4] = Image.fromarray(DATA[4])
    images[0].save(tmp_path / "v.tif", save_all=True, append_images=images[1:])
    assert open_volume(tmp_path / "v.tif").shape == (pages, 130, 150)


def test_ome_tiff_pixel_size(tmp_path):
    tifffile.imwrite(tmp_path / "v.ome.tif", DATA, photometric="minisblack",
                     metadata={"axes": "ZYX", "PhysicalSizeX": 4.0, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 4.0,
                               "PhysicalSizeYUnit": "nm", "PhysicalSizeZ": 0.05})  # fmt: skip
    v = open_volume(tmp_path / "v.ome.tif")
    assert v.pixel_size_nm == (50.0, 4.0, 4.0)  # PhysicalSizeZ without a unit: OME's default, µm
    _check(tmp_path / "v.ome.tif")


@pytest.mark.parametrize("unit, nm", [("µm", 4.0), ("\u03bcm", 4.0), ("nm", 0.004), ("\u212b", 0.0004)])
def test_ome_tiff_units_as_writers_spell_them(tmp_path, unit, nm):
    """µ as the micro sign (OME's) or the Greek letter mu, Å as a letter or the Angstrom sign: the Greek mu was no
    unit, so the file's pixel size was unknown and the model's taken without a word."""
    tifffile.imwrite(tmp_path / "v.ome.tif", DATA, photometric="minisblack", metadata={
        "axes": "ZYX", "PhysicalSizeX": 0.004, "PhysicalSizeXUnit": unit, "PhysicalSizeY": 0.004,
        "PhysicalSizeYUnit": unit})  # fmt: skip
    assert open_volume(tmp_path / "v.ome.tif").pixel_size_nm == pytest.approx((None, nm, nm))


def test_an_ome_tiff_pyramid_in_subifds_is_read_at_level_0(tmp_path):
    """OME-TIFF pyramids (bfconvert, QuPath, tifffile's subifds) keep the lower levels in SubIFDs of each page: the
    first window read failed ('path ... is not a string') as tifffile gave a zarr group of all levels."""
    with tifffile.TiffWriter(tmp_path / "p.ome.tif", bigtiff=True) as tw:
        options = {"tile": (64, 64), "photometric": "minisblack", "compression": "zlib"}
        tw.write(DATA, subifds=2, metadata={"axes": "ZYX", "PhysicalSizeX": 0.004, "PhysicalSizeY": 0.004}, **options)
        tw.write(DATA[:, ::2, ::2], subfiletype=1, **options)
        tw.write(DATA[:, ::4, ::4], subfiletype=1, **options)
    assert open_volume(tmp_path / "p.ome.tif").pixel_size_nm == (None, 4.0, 4.0)
    _check(tmp_path / "p.ome.tif")


def test_a_tiff_of_several_images_is_read_from_the_first_only_where_it_is_the_largest(tmp_path):
    """Series after the first (pyramid levels, a thumbnail after the stack) are left out; a thumbnail or overview
    written before the stack is refused, naming the images and how to name the stack (it was 'page 1 is 130x150, but
    page 0 is 16x18: resave it with matching pages', which it has)."""
    with tifffile.TiffWriter(tmp_path / "after.tif") as tw:
        tw.write(DATA, photometric="minisblack")
        tw.write(DATA[:, ::2, ::2], photometric="minisblack")
        tw.write(DATA[0, ::8, ::8], photometric="minisblack")
    _check(tmp_path / "after.tif")
    with tifffile.TiffWriter(tmp_path / "before.tif") as tw:
        tw.write(DATA[0, ::8, ::8], photometric="minisblack")
        tw.write(DATA, photometric="minisblack")
    with pytest.raises(UserError, match=r"before.tif holds 2 images \(17x19 uint16, 5x130x150 uint16\), more than one "
                                        r"of which may be the volume; name the one to read: .*before.tif:N, N from 0 "
                                        r"\(e.g. .*before.tif:1\)$"):  # fmt: skip
        open_volume(tmp_path / "before.tif")
    _check(f"{tmp_path / 'before.tif'}:1")


def test_a_tiff_of_several_full_size_images_is_read_at_the_one_named(tmp_path):
    """Stacks appended to one TIFF (tifffile's append=True) and an OME-TIFF of several positions were read as their
    first image alone, the others left out without a word: refused naming them, and ``file.tif:N`` (or ``/N``, as
    ``file.h5:dataset``) reads image N with its own pixel size."""
    tifffile.imwrite(tmp_path / "two.tif", DATA, photometric="minisblack")
    tifffile.imwrite(tmp_path / "two.tif", DATA // 2, photometric="minisblack", append=True)
    with pytest.raises(UserError, match=r"two.tif holds 2 images \(5x130x150 uint16, 5x130x150 uint16\), more than one "
                                        r"of which may be the volume; name the one to read: .*two.tif:N"):  # fmt: skip
        open_volume(tmp_path / "two.tif")
    _check(f"{tmp_path / 'two.tif'}:0")
    _check(f"{tmp_path / 'two.tif'}:1", DATA // 2)
    _check(f"{tmp_path / 'two.tif'}/1", DATA // 2)
    assert open_volume(f"{tmp_path / 'two.tif'}:1").identity()  # the file's size and time: the resume check
    with pytest.raises(UserError, match=r"two.tif holds 2 images .*; there is no image 2: name one of 0 to 1"):
        open_volume(f"{tmp_path / 'two.tif'}:2")
    with tifffile.TiffWriter(tmp_path / "positions.ome.tif", ome=True) as tw:
        for data, nm in ((DATA, 0.004), (DATA[:3] // 2, 0.008)):
            tw.write(data, photometric="minisblack", metadata={"axes": "ZYX", "PhysicalSizeX": nm, "PhysicalSizeY": nm})
    with pytest.raises(UserError, match=r"positions.ome.tif holds 2 images \(5x130x150 uint16, 3x130x150 uint16\)"):
        open_volume(tmp_path / "positions.ome.tif")
    _check(f"{tmp_path / 'positions.ome.tif'}:1", DATA[:3] // 2)
    assert open_volume(f"{tmp_path / 'positions.ome.tif'}:1").pixel_size_nm == pytest.approx((None, 8.0, 8.0))
    assert open_volume(f"{tmp_path / 'positions.ome.tif'}:0").pixel_size_nm == pytest.approx((None, 4.0, 4.0))


def _write_sequence(folder, data, kind):
    from PIL import Image

    folder.mkdir()
    for z, image in enumerate(data):  # unpadded numbers: natural order must put slice_2 before slice_10
        if kind == "png":
            Image.fromarray(image).save(folder / f"slice_{z}.png")
        else:
            tifffile.imwrite(folder / f"slice_{z}.tif", image, photometric="minisblack",
                             **({"compression": "lzw"} if kind == "lzw" else {}))  # fmt: skip


@pytest.mark.parametrize("kind", ["tif", "lzw", "png"])
def test_a_folder_of_2d_images_is_a_volume_in_natural_order(tmp_path, kind):
    data = np.concatenate([DATA, DATA // 2, DATA[:2] // 3])  # 12 slices: slice_10, slice_11 exist
    _write_sequence(tmp_path / "seq", data, kind)
    (tmp_path / "seq" / "notes.txt").write_text("acquisition log")  # other files in the folder are not slices
    _check(tmp_path / "seq", data)
    for z in (2, 10, 11):
        np.testing.assert_array_equal(open_volume(tmp_path / "seq").read(z, 0, 130, 0, 150), data[z])
    suffix = "png" if kind == "png" else "tif"
    _check(f"{tmp_path / 'seq'}/slice_*.{suffix}", data)  # a glob pattern
    picked = open_volume(f"{tmp_path / 'seq'}/slice_1?.{suffix}")  # slice_10, slice_11
    np.testing.assert_array_equal(picked.read(1, 0, 130, 0, 150), data[11])


def test_an_image_sequence_that_does_not_fit_together_is_refused_naming_the_file(tmp_path):
    _write_sequence(tmp_path / "seq", DATA, "tif")
    tifffile.imwrite(tmp_path / "seq" / "slice_9.tif", DATA[0, :100], photometric="minisblack")
    with pytest.raises(UserError, match=r"slice_9.tif is 100x150 uint16, but .*slice_0.tif is 130x150 uint16"):
        open_volume(tmp_path / "seq")
    (tmp_path / "seq" / "slice_9.tif").unlink()
    tifffile.imwrite(tmp_path / "seq" / "slice_5.png", (DATA[0] // 256).astype(np.uint8))
    with pytest.raises(UserError, match=r"holds .png, .tif files"):
        open_volume(tmp_path / "seq")
    (tmp_path / "seq" / "slice_5.png").unlink()
    tifffile.imwrite(tmp_path / "seq" / "slice_0.tif", DATA[:2], photometric="minisblack")
    with pytest.raises(UserError, match="slice_0.tif holds 2 slices; an image sequence holds one 2D image per file"):
        open_volume(tmp_path / "seq")
    # a stack among the slices is refused when the sequence opens (it was found by the run's first read of it),
    # a slice saved with a thumbnail page is a slice
    _write_sequence(tmp_path / "seq2", DATA, "tif")
    with tifffile.TiffWriter(tmp_path / "seq2" / "slice_3.tif") as w:
        w.write(DATA[3], photometric="minisblack")
        w.write(DATA[3, ::4, ::4], photometric="minisblack", subfiletype=1)  # a reduced image: the thumbnail
    _check(tmp_path / "seq2")
    tifffile.imwrite(tmp_path / "seq2" / "slice_4.tif", DATA[:2], photometric="minisblack")
    with pytest.raises(UserError, match="slice_4.tif holds 2 slices; an image sequence holds one 2D image per file"):
        open_volume(tmp_path / "seq2")
    with pytest.raises(UserError, match="no file matches"):
        open_volume(tmp_path / "seq" / "*.png")


def test_an_edited_slice_changes_a_sequence_identity(tmp_path):
    """The resume check compares it: a re-exported slice must not be taken for the one a work store holds."""
    import os

    _write_sequence(tmp_path / "seq", DATA, "tif")
    before = open_volume(tmp_path / "seq").identity()
    assert open_volume(tmp_path / "seq").identity() == before
    path = tmp_path / "seq" / "slice_3.tif"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert open_volume(tmp_path / "seq").identity() != before


def _label_slices(dtypes):
    """Per-slice instance ids as label exporters write them: each slice in its own pixel type, ids of a 16/32-bit
    slice above what 8 bits hold."""
    blocks = np.zeros((96, 112), np.int64)
    for k, (y, x) in enumerate([(4, 4), (4, 60), (50, 4), (50, 60)]):
        blocks[y : y + 40, x : x + 48] = k + 1
    return [np.where(blocks > 0, blocks + (0 if np.dtype(t).itemsize == 1 else 250 * z + 1000), 0).astype(t)
            for z, t in enumerate(dtypes)]  # fmt: skip


@pytest.mark.parametrize("kind, dtypes, wide", [("png", ["u1", "<u2", "u1", "<u2"], np.uint16),
                                                 ("tif", ["u1", "<u4", ">u2", "u1"], np.uint32)])  # fmt: skip
def test_a_label_sequence_of_mixed_integer_widths_reads_as_the_widest(tmp_path, kind, dtypes, wide):
    """Label exports that save each slice in the smallest type holding its ids (8-bit where a slice has < 256 ids):
    the stack reads as the widest type, every id unchanged; the header check opens no slice's pixels."""
    from cellseg_batch.read import volume_identity

    slices = _label_slices(dtypes)
    _write_sequence(tmp_path / "seq", slices, kind)
    (layer,) = open_label_layers([str(tmp_path / "seq")], ["cell"])
    v = layer.volume
    assert v.shape == (4, 96, 112) and v.dtype is np.dtype(wide)
    for z, ids in enumerate(slices):
        window = v.read(z, 3, 90, 2, 111)
        assert window.dtype is np.dtype(wide)
        np.testing.assert_array_equal(window, ids[3:90, 2:111])
    assert volume_identity(v)[2] == str(np.dtype(wide))
    assert open_label_layers([str(tmp_path / "seq")], ["cell"])[0].volume.identity() == v.identity()


def test_an_image_sequence_of_8_and_16_bit_slices_is_refused_saying_why(tmp_path):
    """Intensities are normalized over slices together: 8-bit slices beside 16-bit ones would be on another scale
    (near black), so an image volume must be one type; the same files as a label stack read (above)."""
    data = [DATA[0], (DATA[1] // 16).astype(np.uint8), DATA[2], (DATA[3] // 16).astype(np.uint8), DATA[4]]
    _write_sequence(tmp_path / "seq", data, "png")
    with pytest.raises(UserError) as e:
        open_volume(tmp_path / "seq")
    said = str(e.value)
    assert "2 slice(s) are uint8 (the first " in said and "slice_1.png" in said and "3 are uint16" in said, said
    assert "save every slice as uint16" in said and "\n" not in said


@pytest.mark.parametrize("odd, why", [
    (np.zeros((96, 112), np.float32), "integer and float slices do not mix"),
    (np.zeros((96, 112), np.int16), "signed and unsigned slices do not mix"),
    (np.zeros((80, 112), np.uint16), "every slice of a sequence must have one size; crop or pad it to 96x112"),
    (np.zeros((96, 112, 3), np.uint8), "RGB and greyscale slices do not mix in a sequence"),
])  # fmt: skip
def test_a_label_sequence_whose_slices_read_as_one_type_would_change_meaning_is_refused(tmp_path, odd, why):
    """Only integer widths of one signedness are promoted: float beside integer, signed beside unsigned, another
    size, RGB beside greyscale are refused in one line naming the file and what to do."""
    import re

    _write_sequence(tmp_path / "seq", _label_slices(["u1", "<u2", "u1"]), "tif")
    tifffile.imwrite(tmp_path / "seq" / "slice_3.tif", odd, photometric="rgb" if odd.ndim == 3 else "minisblack")
    for opened in (lambda p: open_label_layers([p], ["cell"]), open_volume):
        with pytest.raises(UserError, match=re.escape(why)) as e:
            opened(str(tmp_path / "seq"))
        assert str(e.value).startswith(str(tmp_path / "seq" / "slice_3.tif")) and "\n" not in str(e.value)


def test_hdf5_datasets_as_cremi_ilastik_and_fiji_write_them(tmp_path):
    import h5py

    with h5py.File(tmp_path / "cremi.hdf", "w") as f:  # CREMI: volumes/raw with resolution in nm, labels beside it
        f.create_dataset("volumes/raw", data=DATA, chunks=(1, 64, 64), compression="gzip")
        f["volumes/raw"].attrs["resolution"] = (40.0, 4.0, 4.0)
        f.create_dataset("volumes/labels/neuron_ids", data=DATA.astype(np.uint64))
        f["volumes/labels/neuron_ids"].attrs["offset"] = (1520.0, 3644.0, 3644.0)  # CREMI's padded volumes: nm
    for path in (f"{tmp_path / 'cremi.hdf'}/volumes/raw", f"{tmp_path / 'cremi.hdf'}:volumes/raw"):
        _check(path)
        assert open_volume(path).pixel_size_nm == (40.0, 4.0, 4.0) and open_volume(path).origin_nm is None
    assert open_volume(f"{tmp_path / 'cremi.hdf'}/volumes/labels/neuron_ids").origin_nm == (1520.0, 3644.0, 3644.0)
    with pytest.raises(UserError, match=r"holds 2 image datasets \(volumes/labels/neuron_ids, volumes/raw\); name one"):
        open_volume(tmp_path / "cremi.hdf")
    with pytest.raises(UserError, match="has no dataset 'volumes/rwa'; its image datasets: volumes/labels"):
        open_volume(f"{tmp_path / 'cremi.hdf'}/volumes/rwa")
    with h5py.File(tmp_path / "ilastik.h5", "w") as f:  # one dataset, z y x c with c = 1, axistags
        f.create_dataset("exported_data", data=DATA[..., None])
        f["exported_data"].attrs["axistags"] = json.dumps({"axes": [{"key": k} for k in "zyxc"]})
        f["exported_data"].attrs["element_size_um"] = (0.05, 0.005, 0.005)
    _check(tmp_path / "ilastik.h5")
    assert open_volume(tmp_path / "ilastik.h5").pixel_size_nm == (50.0, 5.0, 5.0)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(UserError, match="cannot read .*text.h5 as HDF5"):
        open_volume(tmp_path / "text.h5")


def test_an_hdf5_file_with_one_image_and_a_lookup_table_opens_alone(tmp_path):
    """Only datasets that can be a volume count for ``file.h5`` alone: a (256, 3) colour table beside the image is not
    a second image to choose from."""
    import h5py

    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("raw", data=DATA)
        f.create_dataset("lut", data=np.zeros((256, 3), np.uint8))
        f.create_dataset("meta/offsets", data=np.zeros((5, 2), np.int64))
    _check(tmp_path / "v.h5")
    with pytest.raises(UserError, match=r"has no dataset 'meta'; its image datasets: raw$"):
        open_volume(f"{tmp_path / 'v.h5'}/meta")


@pytest.mark.parametrize("shape", [(1, *DATA.shape), (*DATA.shape, 1)])
def test_a_plain_4d_zarr_with_one_singleton_axis_is_a_zyx_volume(tmp_path, shape):
    a = zarr.create_array(str(tmp_path / "v.zarr"), shape=shape, chunks=(1, 1, 64, 64)[: len(shape)], dtype=DATA.dtype)
    a[:] = DATA.reshape(shape)
    _check(tmp_path / "v.zarr")
    zarr.create_array(str(tmp_path / "w.zarr"), shape=(2, *DATA.shape), dtype=DATA.dtype)
    with pytest.raises(UserError, match=r"w.zarr has shape \(2, 5, 130, 150\) and names no axes; give a \(Z, Y, X\)"):
        open_volume(tmp_path / "w.zarr")


def test_an_imagej_stack_of_channels_is_refused_in_plain_words(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.concatenate([DATA, DATA])[:8], imagej=True, metadata={"axes": "CYX"})
    with pytest.raises(UserError, match=r"v.tif is an ImageJ stack of 8 channels; save one channel"):
        open_volume(tmp_path / "v.tif")


ZARR_LAYOUTS = {  # zarr format and codecs as other tools write them: each read the same, chunk by chunk or through zarr
    "v2": dict(zarr_format=2),
    "v2-F-order": dict(zarr_format=2, order="F"),
    "v2-zlib": dict(zarr_format=2, compressors=numcodecs.Zlib()),
    "v3": dict(zarr_format=3),
    "v3-blosc": dict(zarr_format=3, compressors=zarr.codecs.BloscCodec(cname="lz4")),
    "v3-gzip": dict(zarr_format=3, compressors=zarr.codecs.GzipCodec()),
    "v3-raw-big-endian": dict(zarr_format=3, serializer=zarr.codecs.BytesCodec(endian="big"), compressors=None),
    "v3-sharded": dict(zarr_format=3, shards=(1, 128, 128)),
    "v3-crc32c": dict(zarr_format=3, compressors=[zarr.codecs.ZstdCodec(), zarr.codecs.Crc32cCodec()]),
}


@pytest.mark.parametrize("layout", ZARR_LAYOUTS)
def test_zarr_arrays(tmp_path, layout):
    a = zarr.create_array(str(tmp_path / "v.zarr"), shape=DATA.shape, chunks=(1, 64, 64), dtype=DATA.dtype,
                          fill_value=7, **ZARR_LAYOUTS[layout])  # fmt: skip
    a[:] = DATA
    _check(tmp_path / "v.zarr")
    a[1] = 7  # chunks all fill value: zarr stores none of them, and they read as the fill value
    np.testing.assert_array_equal(open_volume(tmp_path / "v.zarr").read(1, 5, 130, 60, 150), 7)


@pytest.mark.parametrize("layout", ["v2", "v3-sharded"])
def test_a_rewritten_zarr_array_changes_its_identity(tmp_path, layout):
    """The resume check compares it: a zarr whose data were rewritten must not be taken for the one a work store
    holds (a directory had no identity); unchanged, it is the same. Sampled chunks only, none listed."""
    a = zarr.create_array(str(tmp_path / "v.zarr"), shape=DATA.shape, chunks=(1, 64, 64), dtype=DATA.dtype,
                          **ZARR_LAYOUTS[layout])  # fmt: skip
    a[:] = DATA
    before = open_volume(tmp_path / "v.zarr").identity()
    assert before and open_volume(tmp_path / "v.zarr").identity() == before
    a[:] = DATA // 2  # every chunk written anew, and smaller: other sizes whatever the clock's resolution
    assert open_volume(tmp_path / "v.zarr").identity() != before
    again = open_volume(tmp_path / "v.zarr").identity()
    a[2] = 0  # the middle slice's chunks all fill value: zarr deletes them
    assert open_volume(tmp_path / "v.zarr").identity() != again


DIRECT = {"v2", "v2-zlib", "v3", "v3-blosc", "v3-gzip", "v3-raw-big-endian", "v3-crc32c"}  # coded by ChunkIO itself


@pytest.mark.parametrize("layout", ZARR_LAYOUTS)
def test_chunk_io_writes_what_zarr_reads(tmp_path, layout):
    """Whole chunks (edge chunks cut short) written by ChunkIO, coded by itself where it can, read back by zarr and by
    ChunkIO as written; a flipped bit in a checksummed chunk is an error, not other pixels."""
    from cellseg_batch.chunks import ChunkIO

    a = zarr.create_array(str(tmp_path / "v.zarr"), shape=DATA.shape, chunks=(1, 64, 64), dtype=DATA.dtype,
                          fill_value=7, **ZARR_LAYOUTS[layout])  # fmt: skip
    io = ChunkIO(a)
    assert io.direct == (layout in DIRECT)
    (_, sy, sx) = io.chunks
    for z in range(DATA.shape[0]):
        for y in range(0, DATA.shape[1], sy):
            for x in range(0, DATA.shape[2], sx):
                io.write((z, y // sy, x // sx), DATA[z : z + 1, y : y + sy, x : x + sx])
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "v.zarr"), mode="r")[:], DATA)
    ny, nx = (n // side for n, side in zip(DATA.shape[1:], (sy, sx)))  # the last unit of each row and column
    edge = io.read((3, ny, nx))[0, : DATA.shape[1] - ny * sy, : DATA.shape[2] - nx * sx]  # read whole, with padding
    np.testing.assert_array_equal(edge, DATA[3, ny * sy :, nx * sx :])
    if layout == "v3-crc32c":
        chunk = tmp_path / "v.zarr" / "c" / "3" / str(ny) / str(nx)
        raw = bytearray(chunk.read_bytes())
        raw[len(raw) // 2] ^= 4
        chunk.write_bytes(bytes(raw))
        with pytest.raises((ValueError, RuntimeError), match="checksum"):
            io.read((3, ny, nx))


def test_ome_zarr_level_0_with_pixel_size(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    store = parse_url(str(tmp_path / "img.zarr"), mode="w").store
    root = zarr.group(store=store)
    write_image(DATA, root, axes="zyx", scaler=None,
                coordinate_transformations=[[{"type": "scale", "scale": [40.0, 5.0, 5.0]}]])  # fmt: skip
    _check(tmp_path / "img.zarr")


@pytest.mark.parametrize("series", [1, 2])
def test_a_bioformats2raw_ome_zarr_is_read_at_its_one_image(tmp_path, series):
    """bioformats2raw (bfconvert, Fiji's OME-Zarr export) puts each image in a subgroup 0, 1, ... of a root without
    multiscales: the root was refused as 'a zarr group without OME-Zarr multiscales', with no hint of the image."""
    from ome_zarr.writer import write_image

    root = zarr.open_group(str(tmp_path / "b2r.zarr"), mode="w", zarr_format=2)
    root.attrs["bioformats2raw.layout"] = 3
    for i in range(series):
        write_image(DATA[None, None], root.create_group(str(i)), axes="tczyx", scale={"z": 0.04, "y": 0.005, "x": 0.005},
                    axes_units=dict.fromkeys("zyx", "micrometer"))  # fmt: skip
    root.create_group("OME").attrs["series"] = [str(i) for i in range(series)]
    if series == 1:
        _check(tmp_path / "b2r.zarr")
        assert open_volume(tmp_path / "b2r.zarr").pixel_size_nm == pytest.approx((40.0, 5.0, 5.0))
    else:
        with pytest.raises(UserError, match=r"without OME-Zarr multiscales; pass one of its OME-Zarr images: .*b2r.zarr/0, "
                                            r".*b2r.zarr/1$"):  # fmt: skip
            open_volume(tmp_path / "b2r.zarr")
    _check(tmp_path / "b2r.zarr" / "0")


@pytest.mark.parametrize("unit, scale, nm", [
    ("micrometer", [0.04, 0.005, 0.005], (40.0, 5.0, 5.0)), ("nanometer", [40.0, 5.0, 5.0], (40.0, 5.0, 5.0)),
    (None, [40.0, 5.0, 5.0], None), (None, [1.0, 1.0, 1.0], None), ("pixel", [1.0, 1.0, 1.0], None),
])  # fmt: skip
def test_ome_zarr_pixel_size_is_known_only_in_a_unit_of_length(tmp_path, unit, scale, nm):
    """ome-zarr-py writes scale 1 and no unit by default (so does this tool's output of a volume of unknown pixel
    size): that is no pixel size, not 1 nm, which made run warn of a 10x mismatch and --rescale refuse it."""
    from ome_zarr.io import parse_url
    from ome_zarr.writer import write_image

    root = zarr.group(store=parse_url(str(tmp_path / "img.zarr"), mode="w").store)
    write_image(DATA, root, axes="zyx", scale=dict(zip("zyx", scale)),
                axes_units=dict.fromkeys("zyx", unit) if unit else None)  # fmt: skip
    assert open_volume(tmp_path / "img.zarr").pixel_size_nm == nm


@pytest.mark.parametrize("smallest_first", [False, True])
def test_ome_zarr_scale_of_the_whole_multiscale_and_levels_out_of_order(tmp_path, smallest_first):
    """NGFF 0.4+ lets a multiscale carry a scale of its own, applied after each level's: it was ignored, so a file
    with level scales of 1 and the pixel size there read as 1000 nm (micrometer axes) without a word. And a file
    listing its levels smallest first had its 2x smaller level taken as the volume."""
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    levels = [("0", DATA, [1.0, 1.0, 1.0]), ("1", DATA[:, ::2, ::2], [1.0, 2.0, 2.0])]
    for name, data, _ in levels:
        root.create_array(name, shape=data.shape, dtype=data.dtype, chunks=data.shape)[:] = data
    datasets = [{"path": name, "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                for name, _, scale in levels]  # fmt: skip
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": datasets[::-1] if smallest_first else datasets,
        "coordinateTransformations": [{"type": "scale", "scale": [0.03, 0.004, 0.004]}],
    }]  # fmt: skip
    _check(tmp_path / "img.zarr")
    assert open_volume(tmp_path / "img.zarr").pixel_size_nm == pytest.approx((30.0, 4.0, 4.0))


@pytest.mark.parametrize("level, whole, origin", [
    ([2.0, 10.0, 0.0], None, (2000.0, 10000.0, 0.0)),  # the dataset's translation, micrometer axes
    ([2.0, 10.0, 0.0], {"scale": [0.03, 0.004, 0.004], "translation": [1.0, 0.0, 0.5]}, (1060.0, 40.0, 500.0)),
    (None, {"translation": [0.0, 0.0, 0.0]}, None),  # at (0, 0, 0): nothing to carry
    ([2.0, 10.0, "0"], None, None),  # not a number: unknown, not a guess
])  # fmt: skip
def test_an_ome_zarr_crop_says_where_its_first_voxel_is(tmp_path, level, whole, origin):
    """Where voxel (0, 0, 0) sits: the dataset's translation, then the multiscale's scale and translation (NGFF 0.4+);
    the output's translations start there (test_ngff)."""
    root = zarr.open_group(str(tmp_path / "img.zarr"), mode="w", zarr_format=2)
    root.create_array("0", shape=DATA.shape, dtype=DATA.dtype, chunks=DATA.shape)[:] = DATA
    transforms = [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]
    transforms += [{"type": "translation", "translation": level}] if level else []
    root.attrs["multiscales"] = [{
        "version": "0.4", "axes": [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": transforms}],
        **({"coordinateTransformations": [{"type": k, k: v} for k, v in whole.items()]} if whole else {}),
    }]  # fmt: skip
    assert open_volume(tmp_path / "img.zarr").origin_nm == (pytest.approx(origin) if origin else None)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_dtypes(tmp_path, dtype):
    data = (DATA / 16).astype(dtype)
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    _check(tmp_path / "v.tif", data)


def _big_endian(tmp_path, kind, data):
    """``data`` stored big-endian as microscopes (Bio-Formats, older Macs, ImageJ's 'Motorola' TIFFs) and zarr v2 or
    HDF5 writers with '>' types store it; its path."""
    import h5py

    if kind == "tiff":
        tifffile.imwrite(tmp_path / "v.tif", data.astype(data.dtype.newbyteorder(">")), byteorder=">",
                         photometric="minisblack")  # fmt: skip
        return tmp_path / "v.tif"
    if kind == "sequence":  # each slice's header is checked against the first slice's volume: native both
        (tmp_path / "seq").mkdir()
        for z, image in enumerate(data):
            tifffile.imwrite(tmp_path / "seq" / f"{z}.tif", image.astype(data.dtype.newbyteorder(">")), byteorder=">")
        return tmp_path / "seq"
    if kind == "zarr-v2":
        zarr.create_array(str(tmp_path / "v.zarr"), data=data.astype(data.dtype.newbyteorder(">")), zarr_format=2)
        return tmp_path / "v.zarr"
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("labels", data=data.astype(data.dtype.newbyteorder(">")))
    return tmp_path / "v.h5"


@pytest.mark.parametrize("kind", ["tiff", "sequence", "zarr-v2", "hdf5"])
def test_a_big_endian_label_stack_is_read_in_native_byte_order(tmp_path, kind):
    """fastremap and cc3d refuse big-endian ids ("Big-endian buffer not supported"): every window comes back native,
    and the volume says it is."""
    import fastremap

    ids = DATA.astype(np.uint32) * 70000
    v = open_volume(_big_endian(tmp_path, kind, ids))
    assert v.dtype is np.dtype(np.uint32)
    window = v.read(2, 10, 70, 33, 149)
    assert window.dtype is np.dtype(np.uint32)
    np.testing.assert_array_equal(window, ids[2, 10:70, 33:149])
    np.testing.assert_array_equal(fastremap.unique(window), np.unique(ids[2, 10:70, 33:149]))


@pytest.mark.parametrize("dtype", [np.uint64, np.int64])
def test_64_bit_tiff_pixels_are_plain_uint64_and_int64(tmp_path, dtype):
    """tifffile gives numpy's 'Q'/'q' (ulonglong/longlong) for 64-bit pixels, which zarr refuses for the output
    arrays: the volume and its windows use uint64/int64 proper."""
    data = DATA.astype(dtype) * 2**40
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    v = open_volume(tmp_path / "v.tif")
    assert v.dtype is np.dtype(dtype)
    out = zarr.create_array(str(tmp_path / "out.zarr"), shape=v.shape, chunks=(1, 64, 64), dtype=v.dtype)
    out[2, 10:70, 33:149] = window = v.read(2, 10, 70, 33, 149)
    assert window.dtype is np.dtype(dtype)
    np.testing.assert_array_equal(out[2, 10:70, 33:149], data[2, 10:70, 33:149])


def test_bool_volume_is_refused(tmp_path):
    zarr.create_array(str(tmp_path / "b.zarr"), shape=(2, 8, 8), dtype=bool)
    with pytest.raises(UserError, match="pixel type"):
        open_volume(tmp_path / "b.zarr")


def test_a_bool_label_stack_is_refused_with_advice_that_a_label_stack_can_follow(tmp_path):
    """A bool mask given as --labels: the advice is integer ids per object, not float32 (which --labels refuses)."""
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((3, 32, 32), bool), photometric="minisblack")
    with pytest.raises(UserError, match="bool") as refused:
        open_label_layers([str(tmp_path / "mask.tif")], ["cell"])
    assert "float32" not in str(refused.value) and "integer ids" in str(refused.value)


def test_normalization_is_the_same_for_8_and_16_bit_versions_of_a_volume(tmp_path):
    base = np.random.default_rng(2).integers(20, 230, (3, 200, 200)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", base, photometric="minisblack")
    tifffile.imwrite(tmp_path / "b.tif", base.astype(np.uint16) * 257, photometric="minisblack")
    na, nb = estimate(open_volume(tmp_path / "a.tif")), estimate(open_volume(tmp_path / "b.tif"))
    np.testing.assert_allclose(na.apply(base[0]), nb.apply(base[0].astype(np.uint16) * 257), atol=1e-3)
    n = Normalization(10, 110)
    np.testing.assert_allclose(n.apply(np.array([0, 10, 60, 110, 200])), [0, 0, 127.5, 255, 255])


def test_zero_fill_around_registered_sections_does_not_move_the_normalization(tmp_path):
    """Aligned ssTEM stacks are padded with 0 to a common rectangle: the tissue's percentiles must stay what they
    are without the padding (a 1st percentile of 0 would dim every slice the model sees)."""
    tissue = np.random.default_rng(3).integers(60, 220, (4, 400, 400)).astype(np.uint8)
    padded = tissue.copy()
    padded[:, :, :120] = 0  # 30% of every slice is fill
    for name, data in (("tissue", tissue), ("padded", padded)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, photometric="minisblack")
    plain, filled = estimate(open_volume(tmp_path / "tissue.tif")), estimate(open_volume(tmp_path / "padded.tif"))
    assert abs(filled.low - plain.low) <= 2 and abs(filled.high - plain.high) <= 2, (plain, filled)
    assert filled.low >= 60
    dark = tissue.copy()
    dark[:, :2, :2] = 0  # a few black pixels are image, not fill: they still count
    tifffile.imwrite(tmp_path / "dark.tif", dark, photometric="minisblack")
    assert estimate(open_volume(tmp_path / "dark.tif")).low == plain.low


def test_a_thin_zero_border_or_a_blanked_fold_does_not_move_the_normalization(tmp_path):
    """Zero fill below 5% of the sample (a 4 px border around 512 px slices, a fold blanked in one section) stands
    apart from the tissue's values: left out of the percentiles and recorded as fill (``zero_is_fill``: run keeps
    objects out of it). Before, either made the 1st percentile 0. Zeros as common as the values beside them (dark
    8-bit tissue reaching 0) are image: kept, and no fill."""
    rng = np.random.default_rng(3)
    tissue = rng.integers(15000, 60000, (4, 512, 512)).astype(np.uint16)
    framed = tissue.copy()
    framed[:, :4] = framed[:, -4:] = framed[:, :, :4] = framed[:, :, -4:] = 0  # 3.1% of every slice
    fold = tissue.copy()
    fold[1, 200:240] = 0  # 1.9% of the sample
    dark = rng.integers(0, 200, (4, 512, 512)).astype(np.uint8)  # uniform: 0 is as common as 1 or 2
    for name, data in (("tissue", tissue), ("framed", framed), ("fold", fold), ("dark", dark)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, photometric="minisblack")
    plain = estimate(open_volume(tmp_path / "tissue.tif"))
    assert not plain.zero_is_fill and plain.no_data(tissue[0]) is None
    for name in ("framed", "fold"):
        n = estimate(open_volume(tmp_path / f"{name}.tif"))
        assert abs(n.low - plain.low) < 100 and abs(n.high - plain.high) < 100 and n.zero_is_fill, (name, n, plain)
    assert (estimate(open_volume(tmp_path / "framed.tif")).no_data(framed[0]) == (framed[0] == 0)).all()
    clipped = framed[0].copy()
    clipped[100:110, 100:110] = 0  # a small patch of zeros inside the tissue: dark tissue clipped, not fill
    assert (estimate(open_volume(tmp_path / "framed.tif")).no_data(clipped) == (framed[0] == 0)).all()
    n = estimate(open_volume(tmp_path / "dark.tif"))
    assert not n.zero_is_fill and n.low == np.percentile(dark, 1.0)


def test_a_section_much_darker_than_the_others_is_left_out_of_the_normalization(tmp_path):
    """A section imaged at a quarter of the others' brightness set the 1st percentile for every slice; it is left out
    and named (``odd_slices``). A slow drift over the stack (10% either way) is no odd section."""
    tissue = np.random.default_rng(3).integers(60, 220, (16, 200, 200)).astype(np.uint8)
    dark = tissue.copy()
    dark[7] = dark[7] // 4
    drift = (tissue * np.linspace(0.9, 1.1, 16)[:, None, None]).astype(np.uint8)
    for name, data in (("tissue", tissue), ("dark", dark), ("drift", drift)):
        tifffile.imwrite(tmp_path / f"{name}.tif", data, photometric="minisblack")
    plain, n = estimate(open_volume(tmp_path / "tissue.tif")), estimate(open_volume(tmp_path / "dark.tif"))
    assert abs(n.low - plain.low) <= 1 and abs(n.high - plain.high) <= 1, (n, plain)
    assert [z for z, _, _ in n.odd_slices] == [7] and not plain.odd_slices
    assert not estimate(open_volume(tmp_path / "drift.tif")).odd_slices


@pytest.mark.parametrize("fill", [0, 255, 137])
def test_a_blank_or_saturated_slice_does_not_move_the_normalization(tmp_path, fill):
    """A section lost and filled with one value (white, black, grey) is no tissue: the percentiles stay those of the
    other slices (a white slice in 16 made the 99.5th percentile 255, dimming every slice the model saw)."""
    tissue = np.random.default_rng(3).integers(60, 220, (16, 200, 200)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "tissue.tif", tissue, photometric="minisblack")
    tissue[7] = fill
    tifffile.imwrite(tmp_path / "lost.tif", tissue, photometric="minisblack")
    assert estimate(open_volume(tmp_path / "lost.tif")) == estimate(open_volume(tmp_path / "tissue.tif"))


def test_nan_in_a_float_volume_reaches_the_model_as_black(tmp_path):
    """No-data NaN (stitched mosaics, masked acquisitions) must not reach the model: one NaN pixel spreads through
    every convolution and group norm of its tile and wipes out the tile's detections."""
    data = DATA.astype(np.float32)
    data[1, 20:40, 30:60] = np.nan
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    n = estimate(open_volume(tmp_path / "v.tif"))
    assert np.isfinite([n.low, n.high]).all()
    image = n.apply(data[1])
    assert np.isfinite(image).all() and (image[20:40, 30:60] == 0).all()
    np.testing.assert_array_equal(image[60:], n.apply(DATA[1, 60:].astype(np.float32)))


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


def test_class_names_become_layer_names_as_train_makes_them(tmp_path):
    """'alpha granule' is the class train makes alpha_granule of (a makesense.ai category); run's and eval's class
    options were refused it (eval: 'share no class' against the model's alpha_granule). A map may be given as the
    JSON itself; a name with nothing to name a layer is refused in one line."""
    (tmp_path / "m.json").write_text('{"1": "alpha granule", "2": "cell/membrane"}')
    assert read_class_map(str(tmp_path / "m.json")) == {1: "alpha_granule", 2: "cell_membrane"}
    assert read_class_map("alpha granule") == "alpha_granule"
    assert read_class_map(' {"3": "mito"}', "--gt-classes") == {3: "mito"}
    with pytest.raises(UserError, match=r"--gt-classes '\{\"3\": ' is not valid JSON"):
        read_class_map('{"3": ', "--gt-classes")
    with pytest.raises(UserError, match=r"'\?\?' cannot name a class"):
        read_class_map("??")
    from cellseg_batch.config import parse_class_minimums
    from cellseg_batch.predict.base import exclusive_groups

    classes = ["alpha_granule", "mito"]
    assert exclusive_groups(["alpha granule, mito"], classes, "the model") == [classes]
    assert parse_class_minimums("alpha granule=3,1", classes, "--min-voxels") == (3, 1)


def test_a_class_list_of_one_class_names_every_id(tmp_path):
    """A dataset's classes file that lists its classes but maps no ids ({"classes": {"1": name}}, as ISBI 2012's
    2D-instance stack ships) was refused as 'key classes is not a label id': one class is every id's class; with
    several, the file cannot say which id is which, and the error says so."""
    (tmp_path / "one.json").write_text(json.dumps({"classes": {"1": "neurite"}, "note": "every id is a neurite"}))
    assert read_class_map(str(tmp_path / "one.json")) == "neurite"
    (tmp_path / "two.json").write_text(json.dumps({"classes": {"1": "a", "2": "b"}}))
    with pytest.raises(UserError, match=r"lists the classes a, b but not which label ids are which"):
        read_class_map(str(tmp_path / "two.json"))


def _write_mrc(path, data, voxel_size=None):
    import mrcfile

    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        if voxel_size is not None:
            mrc.voxel_size = voxel_size  # Å along X, Y, Z
    return path


@pytest.mark.parametrize("suffix", [".mrc", ".st", ".rec", ".ali", ".map", ".mrcs"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.uint16])  # modes 1, 2, 6
def test_mrc_stacks_as_imod_serialem_and_fei_write_them(tmp_path, suffix, dtype):
    """FIB-SEM and serial-section stacks from IMOD, SerialEM, Thermo Fisher: sections are Z, the voxel size (Å) is
    the pixel size in nm; they were 'unknown volume format'."""
    data = (DATA // 2).astype(dtype)
    path = _write_mrc(tmp_path / f"v{suffix}", data, voxel_size=(40.0, 40.0, 300.0))
    _check(path, data)
    assert open_volume(path).pixel_size_nm == pytest.approx((30.0, 4.0, 4.0))


def test_a_2d_mrc_is_one_slice_and_an_unset_voxel_size_is_unknown(tmp_path):
    path = _write_mrc(tmp_path / "v.mrc", DATA[0])
    v = open_volume(path)
    assert v.shape == (1, 130, 150) and v.pixel_size_nm is None
    np.testing.assert_array_equal(v.read(0, 5, 9, 5, 9), DATA[0, 5:9, 5:9])


def test_mrc_mode_0_bytes_are_read_as_their_writer_meant_them(tmp_path):
    """Mode 0 is signed bytes in MRC2014 (mrcfile's int8), but IMOD writes unsigned bytes unless its imodFlags say
    signed: read as int8 they would wrap (200 as -56), the brightest pixels darkest."""
    signed = (DATA // 32 - 60).astype(np.int8)
    _check(_write_mrc(tmp_path / "signed.mrc", signed), signed)
    grey = (DATA // 16).astype(np.uint8)  # up to 249
    for flags, expected in ((0, grey), (1, grey.view(np.int8))):  # IMOD's bit 0: bytes are signed
        path = _write_mrc(tmp_path / f"imod{flags}.mrc", grey.view(np.int8))
        raw = bytearray(path.read_bytes())
        raw[152:160] = np.array([1146047817, flags], "<i4").tobytes()  # imodStamp, imodFlags
        path.write_bytes(bytes(raw))
        _check(path, expected)
    path = _write_mrc(tmp_path / "old.mrc", grey.view(np.int8))
    with __import__("mrcfile").open(path, mode="r+") as mrc:
        mrc.header.dmax = 249  # no IMOD stamp, but a maximum only unsigned bytes hold
    _check(path, grey)


@pytest.mark.parametrize("damage, match", [
    ("cut", r"v.mrc is truncated: its header says 5x130x150 \(Z, Y, X\) pixels of mode 1 \(\d+ bytes with the header\), "
            r"the file has \d+ bytes"),
    ("header", r"cannot read .*v.mrc as MRC \(Couldn't read enough bytes for MRC header\)"),
    ("text", r"cannot read .*v.mrc as MRC \(Map ID string not found"),
])  # fmt: skip
def test_a_damaged_mrc_is_refused_in_one_line(tmp_path, damage, match):
    path = _write_mrc(tmp_path / "v.mrc", DATA.astype(np.int16))
    raw = path.read_bytes()
    path.write_bytes({"cut": raw[:-1000], "header": raw[:500], "text": b"acquisition log\n" * 200}[damage])
    with pytest.raises(UserError, match=match) as refused:
        open_volume(path)
    assert "\n" not in str(refused.value)


def test_an_mrc_label_stack_is_read_as_label_stacks_in_other_formats_are(tmp_path):
    ids = (DATA // 500).astype(np.int16)
    (layer,) = open_label_layers([str(_write_mrc(tmp_path / "labels.mrc", ids))], ["cell"])
    np.testing.assert_array_equal(layer.volume.read(3, 0, 130, 0, 150), ids[3])
    with pytest.raises(UserError, match="holds float32 values; a label stack must hold integer ids"):
        open_label_layers([str(_write_mrc(tmp_path / "float.mrc", ids.astype(np.float32)))], ["cell"])


@pytest.mark.parametrize("data", [DATA, DATA[0], DATA[None]])
def test_npy_arrays_are_zyx_volumes(tmp_path, data):
    np.save(tmp_path / "v.npy", data)
    v, zyx = open_volume(tmp_path / "v.npy"), data.reshape(-1, 130, 150)
    assert v.pixel_size_nm is None and v.shape == zyx.shape
    np.testing.assert_array_equal(v.read(zyx.shape[0] - 1, 10, 70, 33, 149), zyx[-1, 10:70, 33:149])


@pytest.mark.parametrize("array, match", [
    (np.asfortranarray(DATA), r"v.npy is saved in Fortran \(column-major\) order; save it in C order"),
    (np.array([DATA[0], None], dtype=object), "v.npy has pixel type object; convert it to uint8"),
    (np.stack([DATA, DATA]), r"v.npy has shape \(2, 5, 130, 150\) and names no axes; give a \(Z, Y, X\)"),
])  # fmt: skip
def test_npy_arrays_that_are_no_volume_are_refused_saying_what_to_do(tmp_path, array, match):
    np.save(tmp_path / "v.npy", array, allow_pickle=True)
    with pytest.raises(UserError, match=match):
        open_volume(tmp_path / "v.npy")


def test_a_truncated_npy_or_an_npz_archive_is_refused_in_one_line(tmp_path):
    np.save(tmp_path / "v.npy", DATA)
    (tmp_path / "v.npy").write_bytes((tmp_path / "v.npy").read_bytes()[:-100])
    with pytest.raises(UserError, match="v.npy .*the file may be truncated: save it again with np.save"):
        open_volume(tmp_path / "v.npy")
    np.savez(tmp_path / "v.npz", raw=DATA, labels=DATA)
    with pytest.raises(UserError, match=r"v.npz is a NumPy .npz archive of 2 array\(s\) \(raw, labels\); save the "
                                        r"volume as a .npy of its own: np.save\('volume.npy', np.load\(.*\)\['raw'\]\)"):  # fmt: skip
        open_volume(tmp_path / "v.npz")


def test_run_on_an_mrc_stack_with_mrc_labels(tmp_path):
    """``run x.mrc --predictor labels --labels y.mrc``: an IMOD volume and its label stack through the whole pipeline."""
    from conftest import cli, labels_of

    ids = np.zeros((3, 64, 64), np.int16)
    ids[:, 8:30, 10:40], ids[:, 40:60, 20:50] = 1, 2
    _write_mrc(tmp_path / "v.mrc", np.where(ids > 0, 200, 30).astype(np.int16), voxel_size=(50.0, 50.0, 300.0))
    _write_mrc(tmp_path / "labels.mrc", ids)
    cli("run", tmp_path / "v.mrc", "--predictor", "labels", "--labels", tmp_path / "labels.mrc", "--classes", "cell",
        "--no-progress", "--no-image", "--out", tmp_path / "out.zarr")  # fmt: skip
    out = labels_of(tmp_path / "out.zarr", "cell")
    assert out.shape == ids.shape and len(np.unique(out[out > 0])) == 2
    np.testing.assert_array_equal(out > 0, ids > 0)


def test_a_class_map_may_name_the_background(tmp_path):
    """Class maps from annotation tools name 0 ("0": "background", "_background_"): it is skipped, as 0 is the
    background of every label stack; 0 named as an object class, or a map of the background alone, is refused."""
    path = tmp_path / "classes.json"
    for background in ("background", "_background_", "Background"):
        path.write_text(json.dumps({"0": background, "1": "mitochondrion", "2": "alpha_granule"}))
        assert read_class_map(str(path)) == {1: "mitochondrion", 2: "alpha_granule"}
    path.write_text(json.dumps({"0": "cell", "1": "mitochondrion"}))
    with pytest.raises(UserError, match="0 is the background of a label stack"):
        read_class_map(str(path))
    path.write_text(json.dumps({"0": "background"}))
    with pytest.raises(UserError, match="names only the background"):
        read_class_map(str(path))


@pytest.mark.parametrize("resolution,unit,expected", [
    ((72, 72), "INCH", None),  # what image programs write by default: no pixel size at all
    ((300, 300), "INCH", None),
    ((1e6, 1e6), "CENTIMETER", (10.0, 10.0)),  # 10 nm pixels given in the tags: kept
    ((1e6, 5e5), "CENTIMETER", (20.0, 10.0)),  # pixels that are not square: Y from YResolution (it took X's)
])  # fmt: skip
def test_a_print_resolution_in_the_tiff_tags_is_not_a_pixel_size(tmp_path, resolution, unit, expected):
    # tifffile's resolution is (X, Y) pixels per unit
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((2, 32, 32), np.uint8), resolution=resolution, resolutionunit=unit)
    size = open_volume(tmp_path / "v.tif").pixel_size_nm
    assert size is None if expected is None else size == pytest.approx((None, *expected))


def test_an_imagej_tiff_with_pixels_that_are_not_square_keeps_each_axis_size(tmp_path):
    """ImageJ's calibration: x 4 nm, y 6 nm, z 50 nm (Y was read from XResolution: [50, 4, 4])."""
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 32, 32), np.uint8), imagej=True, resolution=(1 / 0.004, 1 / 0.006),
                     metadata={"axes": "ZYX", "unit": "um", "spacing": 0.05})  # fmt: skip
    assert open_volume(tmp_path / "v.tif").pixel_size_nm == pytest.approx((50.0, 6.0, 4.0))


def test_a_sequence_whose_file_numbers_jump_is_warned_about_and_its_files_recorded(tmp_path):
    """slice_0, 1, 2, 5, 10, 11: sections lost or files left out were read as consecutive slices with no word, and
    linked across the gap; the run warns, naming the jumps, and the report lists each slice's file. An even step
    (every 2nd section exported) is no jump."""
    from cellseg_batch.read import numbering_gaps
    from conftest import cli

    assert numbering_gaps([f"s_{i}.png" for i in (0, 2, 4, 6)]) is None
    assert numbering_gaps(["a.png", "b.png", "c.png"]) is None
    said = numbering_gaps([f"d/slice_{i:03d}.tif" for i in (0, 1, 2, 5, 6, 10)])
    assert said.startswith("the file numbers jump 2 time(s) by more than their step of 1 (slice_002.tif -> "
                           "slice_005.tif, slice_006.tif -> slice_010.tif)"), said  # fmt: skip
    folder = tmp_path / "sections"
    folder.mkdir()
    labels = np.zeros((4, 64, 64), np.uint16)
    labels[:, 10:30, 10:30] = 1
    for z, number in enumerate((0, 1, 2, 7)):
        tifffile.imwrite(folder / f"slice_{number}.tif", (labels[z] * 100).astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(tmp_path / "labels.tif", labels, photometric="minisblack")
    done = cli("run", folder, "--predictor", "labels", "--labels", tmp_path / "labels.tif", "--classes", "cell",
               "--out", tmp_path / "out.zarr", "--no-progress", "--no-image")  # fmt: skip
    report = json.loads((tmp_path / "out.zarr" / "cellseg" / "report.json").read_text())
    assert report["input"]["slice_files"] == ["slice_0.tif", "slice_1.tif", "slice_2.tif", "slice_7.tif"]
    assert any("slice_2.tif -> slice_7.tif" in w for w in report["warnings"])
    assert "slice_2.tif -> slice_7.tif" in done.stderr


@pytest.mark.parametrize("shape, chunks, axes", [
    ((1, 1, 6, 70, 90), (1, 1, 1, 32, 32), "tczyx"),  # bioformats2raw / OME-Zarr 5D: T and C singleton
    ((6, 70, 90), (4, 32, 32), "zyx"),  # chunks several slices deep
    ((1, 70, 90), (1, 70, 90), "zyx"),  # one slice, one chunk
    ((1, 2, 6, 70, 90), (1, 1, 3, 32, 32), "tczyx"),  # ... with a second channel: refused, not read wrong
])  # fmt: skip
def test_zarr_windows_come_from_cached_whole_chunks_whatever_the_axes(tmp_path, shape, chunks, axes, monkeypatch):
    """Windows are cut from decoded chunks kept for the next windows; 5D OME-Zarr and chunks several slices deep
    decoded every chunk again for each window and slice (80x slower per tile on a 16000² slice)."""
    from cellseg_batch.chunks import ChunkIO

    data = np.random.default_rng(0).integers(0, 60000, shape, dtype=np.uint16)
    root = zarr.open_group(str(tmp_path / "v.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=data, chunks=chunks)
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a} for a in axes],
                                  "datasets": [{"path": "0", "coordinateTransformations": [
                                      {"type": "scale", "scale": [1.0] * len(axes)}]}]}]  # fmt: skip
    if shape[1] == 2 and len(shape) == 5:
        with pytest.raises(UserError, match="more than one non-singleton axis"):
            open_volume(tmp_path / "v.zarr")
        return
    decoded = []
    read = ChunkIO.read
    monkeypatch.setattr(ChunkIO, "read", lambda self, coords, fill=True: decoded.append(coords) or read(self, coords, fill))
    v = open_volume(tmp_path / "v.zarr")
    cube = data.reshape(-1, *shape[-2:])
    assert v.shape == cube.shape
    for z in range(cube.shape[0]):
        for y0, x0 in ((0, 0), (20, 30), (38, 58)):
            assert np.array_equal(v.read(z, y0, y0 + 32, x0, x0 + 32), cube[z, y0 : y0 + 32, x0 : x0 + 32])
    cz, cy, cx = chunks[-3:] if len(chunks) > 2 and shape[-3] > 1 else (1, *chunks[-2:])
    touched = {(z // cz, by, bx) for z in range(cube.shape[0]) for y0, x0 in ((0, 0), (20, 30), (38, 58))
               for by in range(y0 // cy, (y0 + 31) // cy + 1) for bx in range(x0 // cx, (x0 + 31) // cx + 1)}  # fmt: skip
    assert len(decoded) == len(set(decoded)) == len(touched)  # each chunk decoded once, through the cache


@pytest.mark.parametrize("layout", [{"compression": "zlib"}, {"compression": "zlib", "rowsperstrip": 70},
                                    {"compression": "zlib", "tile": (32, 32)}, {"tile": (32, 32)}])  # fmt: skip
def test_compressed_or_tiled_tiffs_are_read_through_cached_strips_and_tiles(tmp_path, layout):
    """tifffile's zarr view of a compressed or tiled TIFF decoded each strip or tile again for every window that
    touched it (a strip as wide as the slice: once per tile of its row; 380 ms a tile at 8192² in a sweep)."""
    data = np.random.default_rng(1).integers(0, 60000, (3, 70, 90), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack", **layout)
    v = open_volume(tmp_path / "v.tif")
    for z in range(3):
        for y0, x0 in ((0, 0), (20, 30), (38, 58)):
            assert np.array_equal(v.read(z, y0, y0 + 32, x0, x0 + 32), data[z, y0 : y0 + 32, x0 : x0 + 32])
    assert len(v._local.chunks) > 0  # the windows came from kept strips or tiles
