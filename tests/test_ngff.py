"""The OME-Zarr output as NGFF readers see it: every pyramid level overlays level 0 in world coordinates."""

import numpy as np
import pytest
import zarr

from cellseg_batch.write import Output


def _multiscale(group_path) -> dict:
    attrs = zarr.open_group(str(group_path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs)["multiscales"][0]


def _to_world(dataset: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of Y and X from a dataset's coordinateTransformations."""
    t = {c["type"]: c[c["type"]] for c in dataset["coordinateTransformations"]}
    return np.array(t["scale"][1:]), np.array(t["translation"][1:])


@pytest.mark.parametrize("fmt", ["ngff-0.4", "ngff-0.5"])
def test_every_level_overlays_level_0_in_world_coordinates(tmp_path, fmt):
    """Small objects at odd positions: at each level, the label found at a pixel is the level-0 label at that
    pixel's world position; and the image level's centroid of a bright square is the level-0 centroid within a
    quarter of a level-0 pixel (a wrong translation is off by 0.5 or more at every level). The translation is
    each layer's own: 0 for subsampled labels, (2^k - 1)/2 pixels for the mean-pooled image."""
    shape, chunk, pixel = (1, 136, 120), 16, (40.0, 8.0, 6.0)
    labels = np.zeros(shape[1:], np.uint32)
    labels[37:60, 21:46] = 7  # odd edges: a level pixel a half pixel off lands on the wrong side of one
    labels[61:64, 90:101] = 9
    image = np.full(shape[1:], 10, np.uint8)
    image[48:80, 32:64] = 250  # on the 16 px grid of level 4: mean pooling keeps its centroid exactly
    out = Output(tmp_path / "o.zarr")
    out.create(shape, chunk, ["c"], np.uint8, pixel, {}, np.uint32, fmt=fmt)
    out.write_levels("c", 0, 0, 0, labels, 1)
    out.write_levels(None, 0, 0, 0, image, 1)
    out.build_pyramid(0)
    out.finalize(pixel)
    levels = out.info["levels"]
    assert levels == 5  # 136 -> 68 -> 34 -> 17 -> 9 px: level 4 is 16x subsampled

    def centroid(img, scale, shift):  # intensity above the background, in world units
        w = img.astype(float) - 10
        ys, xs = np.indices(img.shape)
        return np.array([(w * ys).sum(), (w * xs).sum()]) / w.sum() * scale + shift

    label_ms, image_ms = _multiscale(out.path / "labels" / "c"), _multiscale(out.path)
    s0, t0 = _to_world(image_ms["datasets"][0])
    assert s0.tolist() == [8.0, 6.0] and t0.tolist() == [0.0, 0.0]
    full_centroid = centroid(image, s0, t0)
    for k in range(1, levels):
        scale, shift = _to_world(label_ms["datasets"][k])
        level = np.asarray(out.labels("c", k)[0])
        ys, xs = np.indices(level.shape)
        iy = (ys * scale[0] + shift[0] - t0[0]) / s0[0]  # level-0 pixel (centre) under each level pixel centre
        ix = (xs * scale[1] + shift[1] - t0[1]) / s0[1]
        assert np.allclose(iy, np.round(iy)) and np.allclose(ix, np.round(ix)), f"level {k} labels fall between pixels"
        found = labels[np.floor(iy + 0.5).astype(int), np.floor(ix + 0.5).astype(int)]
        np.testing.assert_array_equal(level, found, err_msg=f"labels level {k}")
        assert 7 in level, f"the object is gone at level {k}"
        scale, shift = _to_world(image_ms["datasets"][k])
        err = np.abs(centroid(np.asarray(out.image(k)[0]), scale, shift) - full_centroid) / s0
        assert (err < 0.25).all(), f"image level {k}: centroid {err} level-0 pixels off"


# -- NGFF 0.5: zarr v3, sharded -------------------------------------------------------------------------------------

TALL = "synth:2x4200x300,seed=2"  # 4200 px: two write blocks (4096 px) per slice, so two shards per level-0 slice


def _data_files(path) -> list:
    """Chunk or shard files of every array (metadata and the cellseg/ folder left out)."""
    return [p for p in path.rglob("*") if p.is_file() and p.name not in ("zarr.json", ".zarray", ".zattrs", ".zgroup")
            and "cellseg" not in p.relative_to(path).parts]  # fmt: skip


def test_ngff_05_is_sharded_has_the_04_labels_and_opens_in_ngff_readers(tmp_path):
    """A 0.4 run kept its tiles; its output, left unfinished, is resumed by the same settings but not by 0.5 (the
    format is part of the output's fingerprint); with --overwrite the 0.5 output is re-merged from the kept tiles.
    It holds the same labels and image at every level, one file per shard (not per chunk), and ome-zarr-py,
    ome-zarr-models and zarr 3 open it; eval and output-to-coco read it like the 0.4 one. Two runs: 52 s in all on
    2 busy cores, most of it Ray's start."""
    import json
    import shutil

    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from cellseg_batch.cli import main
    from cellseg_batch.config import RunConfig
    from cellseg_batch.errors import UserError
    from cellseg_batch.evaluate import evaluate_paths
    from cellseg_batch.run.job import Run
    from cellseg_batch.synth import CLASSES
    from conftest import cli

    args = [TALL, "--predictor", "labels", "--labels", TALL, "--chunk", 128, "--work-dir", tmp_path / "work",
            "--keep-tiles", "--no-progress", "--out", tmp_path / "o.zarr"]  # fmt: skip
    cli("run", *args)
    o4, o5 = tmp_path / "o4.zarr", tmp_path / "o.zarr"
    shutil.copytree(o5, o4)
    attrs = json.loads((o5 / ".zattrs").read_text())  # as a run killed before it finished leaves it
    attrs["cellseg_batch"]["status"] = "incomplete"
    (o5 / ".zattrs").write_text(json.dumps(attrs))
    same = dict(predictor="labels", labels=[TALL], chunk=128, work_dir=str(tmp_path / "work"), keep_tiles=True)
    assert Run(RunConfig(TALL, str(o5), **same))._prepare() == "resume"  # the settings' own check, without Ray
    with pytest.raises(UserError, match="unfinished run with other settings"):
        Run(RunConfig(TALL, str(o5), **same, format="ngff-0.5"))._prepare()
    cli("run", *args, "--format", "ngff-0.5", "--overwrite")
    report = json.loads((o5 / "cellseg" / "report.json").read_text())
    assert report["mode"] == "reuse-predictions" and report["counts"]["tiles_predicted_now"] == 0

    root = zarr.open_group(str(o5), mode="r")
    assert root.metadata.zarr_format == 3 and root.attrs["ome"]["version"] == "0.5"
    assert zarr.open_group(str(o5 / "labels"), mode="r").attrs["ome"] == {"version": "0.5", "labels": list(CLASSES)}
    levels = root.attrs["cellseg_batch"]["levels"]
    for name in [None, *CLASSES]:
        path = "" if name is None else f"labels/{name}/"
        for k in range(levels):
            a, b = zarr.open_array(str(o4 / f"{path}{k}"), mode="r"), root[f"{path}{k}"]
            np.testing.assert_array_equal(a[:], b[:], err_msg=f"{path}{k}")
            assert a.metadata.zarr_format == 2 and a.chunks == b.chunks == (1, 128, 128)
            assert b.metadata.dimension_names == ("z", "y", "x")
    # shards: a write block's footprint at each level it writes (4096 px at level 0, cut to the 300 px width in
    # whole chunks); level 6 (66 x 5 px), built by the pyramid task, is one chunk
    assert [root[str(k)].shards[1:] for k in range(levels)] == [
        (4096, 384), (2048, 256), (1024, 128), (512, 128), (256, 128), (128, 128), (128, 128)]  # fmt: skip
    n4, n5 = len(_data_files(o4)), len(_data_files(o5))
    image5 = len(_data_files(o5)) - sum(len(_data_files(o5 / "labels" / c)) for c in CLASSES)
    assert image5 == 2 * (2 * 6 + 1)  # 2 slices x (2 shards at levels 0-5, 1 at level 6): one file per shard
    assert (n4, n5) == (843, 116), (n4, n5)  # 0.4: a file per chunk (all-zero label chunks left out), 0.5: per shard

    nodes = list(Reader(parse_url(str(o5)))())
    assert nodes[0].metadata["name"] == "image" and len(nodes[0].data) == levels
    labels = {n.metadata["name"]: n for n in nodes if n.first(Label)}
    assert sorted(labels) == sorted(CLASSES)
    np.testing.assert_array_equal(np.asarray(labels["cell"].data[2]), root["labels/cell/2"][:])
    import ome_zarr_models.v04 as v04
    import ome_zarr_models.v05 as v05

    for version, group in ((v04, zarr.open_group(str(o4), mode="r")), (v05, root)):  # metadata against the spec
        version.Image.from_zarr(group)
        for name in CLASSES:
            version.ImageLabel.from_zarr(group[f"labels/{name}"])

    result = evaluate_paths(str(o5), str(o4))
    assert all(c["exact"] == c["n_gt"] == c["n_pred"] > 0 for c in result["classes"].values())
    for out in (o4, o5):
        assert main(["convert", "output-to-coco", str(out), "--out", str(tmp_path / f"coco-{out.name}"),
                     "--slices", "1:2"]) == 0  # fmt: skip
    coco4, coco5 = (json.loads((tmp_path / f"coco-{o.name}" / "train.json").read_text()) for o in (o4, o5))
    assert coco4["annotations"] == coco5["annotations"] and len(coco5["annotations"]) > 0


def test_an_unknown_format_is_refused_in_one_line(tmp_path, capsys):
    from cellseg_batch.cli import main

    out = tmp_path / "o.zarr"
    assert main(["run", "synth:2x64x64", "--predictor", "labels", "--labels", "synth:2x64x64", "--out", str(out),
                 "--format", "ngff-0.6"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err == "cellseg-batch: error: --format 'ngff-0.6': choose one of ngff-0.4, ngff-0.5\n" and not out.exists()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.float32])
def test_image_levels_are_2x2_means_without_overflow_or_wrapping(dtype):
    """Each image level is the rounded mean of 2x2 pixels of the one below (an odd edge averaged with itself), at
    the ends of the pixel type's range too: signed images keep their negative pixels."""
    from cellseg_batch.write import _mean2x2

    lo, hi = (np.iinfo(dtype).min, np.iinfo(dtype).max) if np.dtype(dtype).kind in "ui" else (-1e6, 1e6)
    block = np.random.default_rng(3).uniform(lo, hi, (9, 7)).astype(dtype)
    block[:2, :2] = hi  # a corner at the top of the range
    padded = np.pad(block.astype(np.float64), ((0, 1), (0, 1)), mode="edge")
    mean = (padded[0::2, 0::2] + padded[1::2, 0::2] + padded[0::2, 1::2] + padded[1::2, 1::2]) / 4
    want = np.floor(mean + 0.5) if np.dtype(dtype).kind in "ui" else mean
    got = _mean2x2(block)
    assert got.dtype == dtype and got.shape == (5, 4)
    np.testing.assert_allclose(got.astype(np.float64), want.astype(dtype).astype(np.float64), rtol=1e-6)
    assert got[0, 0] == hi


def test_a_crop_of_a_larger_volume_keeps_its_place(tmp_path):
    """An OME-Zarr crop (its datasets translated, as webKnossos, OpenOrganelle and ome-zarr crops write them) was
    run as if at (0, 0, 0): labels written without the image copy (a TB volume's usual run) did not overlay their
    own input in a viewer. Its origin, then the first slice run, then each level's own shift."""
    import json

    from cellseg_batch.read import open_volume
    from conftest import cli

    cells = np.zeros((4, 96, 80), np.uint32)
    cells[:, 10:40, 10:50], cells[:, 50:90, 20:70] = 1, 2
    image = (cells * 90 + 20).astype(np.uint8)
    origin = [1200.0, 4000.0, 800.0]  # nm: a crop 40 slices and 800 x 200 px into its volume
    for name, data in (("img", image), ("seg", cells)):  # NGFF 0.4 as ome-zarr-py writes a translated image
        root = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="w", zarr_format=2)
        root.create_array("0", shape=data.shape, dtype=data.dtype, chunks=(1, 32, 32))[:] = data
        root.attrs["multiscales"] = [{
            "version": "0.4", "axes": [{"name": a, "type": "space", "unit": "nanometer"} for a in "zyx"],
            "datasets": [{"path": "0", "coordinateTransformations": [
                {"type": "scale", "scale": [30.0, 5.0, 4.0]}, {"type": "translation", "translation": origin}]}],
        }]  # fmt: skip
    assert open_volume(tmp_path / "img.zarr").origin_nm == tuple(origin)
    cli("run", tmp_path / "img.zarr", "--predictor", "labels", "--labels", tmp_path / "seg.zarr", "--classes", "cell",
        "--tile", 64, "--overlap", 16, "--slices", "1:4", "--no-progress", "--out", tmp_path / "o.zarr")  # fmt: skip
    for group, kind_shift in ((tmp_path / "o.zarr" / "labels" / "cell", 0.0), (tmp_path / "o.zarr", 1.0)):
        for k, dataset in enumerate(_multiscale(group)["datasets"]):
            t = {c["type"]: c[c["type"]] for c in dataset["coordinateTransformations"]}["translation"]
            shift = kind_shift * (2**k - 1) / 2  # the mean-pooled image's levels sit half their pooling further
            assert t == pytest.approx([origin[0] + 30.0, origin[1] + shift * 5.0, origin[2] + shift * 4.0]), (group, k)
    report = json.loads((tmp_path / "o.zarr" / "cellseg" / "report.json").read_text())
    assert report["input"]["origin_nm"] == origin
    assert report["output"]["origin_nm"] == [origin[0] + 30.0, *origin[1:]]  # where its first slice (1) lies


def test_a_no_image_output_is_found_from_its_labels_group_and_viewed_in_place(tmp_path):
    """--no-image (a TB volume's usual run): its root is no image, so NGFF readers find the label images from
    labels/ (ome-zarr-py found nothing from the root, through image-label sources naming that root as their image);
    `view` reads their metadata (it served level 0 from memory with the first slice run placed at z 0)."""
    import ome_zarr_models.v04 as v04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    from cellseg_batch.view import open_scene
    from conftest import cli

    out = tmp_path / "o.zarr"
    cli("run", "synth:6x160x160,seed=3", "--predictor", "labels", "--labels", "synth:6x160x160,seed=3", "--tile", 96,
        "--overlap", 16, "--chunk", 64, "--slices", "2:5", "--no-image", "--no-progress", "--out", out)  # fmt: skip
    root = zarr.open_group(str(out), mode="r")
    classes = root.attrs["cellseg_batch"]["classes"]
    nodes = [n for n in Reader(parse_url(str(out / "labels")))() if n.first(Label)]
    assert sorted(n.metadata["name"] for n in nodes) == sorted(classes) and len(nodes[0].data) == 3
    for name in classes:
        group = root[f"labels/{name}"]
        assert "source" not in group.attrs["image-label"]  # there is no image for it to name
        v04.ImageLabel.from_zarr(group)
        z = {c["type"]: c[c["type"]] for c in _multiscale(out / "labels" / name)["datasets"][0]["coordinateTransformations"]}
        assert z["translation"][0] == 2 * z["scale"][0]  # slice 2 first
    scene = open_scene(out)
    assert scene.ngff and scene.image is None and scene.pixel_size_nm == (40.0, 10.0, 10.0)


def test_the_output_attributes_give_the_pixel_size_its_ngff_metadata_gives(tmp_path):
    """A resume given another --pixel-size (it changes no voxel) wrote the new one into NGFF and the report, while the
    output's own attributes kept the first run's."""
    out = Output(tmp_path / "o.zarr")
    out.create((2, 32, 32), 16, ["cell"], None, (40.0, 10.0, 10.0), {"version": "test"}, labels_dtype=np.uint32)
    out.finalize((50.0, 8.0, 8.0))
    scale = zarr.open_group(str(out.path / "labels" / "cell")).attrs["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == [50.0, 8.0, 8.0]
    assert out.info["pixel_size_nm"] == [50.0, 8.0, 8.0]
