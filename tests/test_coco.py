"""COCO files as annotation tools write them: how an image's file is found under --images, and labels -> COCO."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellseg_batch.coco import load_coco
from cellseg_batch.errors import UserError


def _coco_of(root: Path, file_names: list[str]) -> Path:
    """A COCO file naming ``file_names``, one square annotation each."""
    coco = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "cell"}]}
    for i, name in enumerate(file_names, 1):
        coco["images"].append({"id": i, "file_name": name, "width": 32, "height": 32})
        coco["annotations"].append({"id": i, "image_id": i, "category_id": 1, "segmentation": [[4, 4, 20, 4, 20, 20, 4, 20]]})
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path


def _images(root: Path, *names: str) -> Path:
    folder = root / "images"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32), 100, np.uint8)).save(folder / name)
    return folder


def _found(ann: Path, images: Path) -> list[str]:
    return [Path(r["file_name"]).relative_to(images).as_posix() for r in load_coco(ann, images).records]


def test_an_image_is_the_file_whose_path_ends_its_name_best(tmp_path):
    """Two volumes' slices of one base name: the file whose path under --images shares the longest end with the
    COCO name wins (not the first of that base name); equally good matches are refused, naming both, and so are
    several files of the name where the name's folder is none of theirs (volC/x.png was x.png at the top, silently:
    masks drawn on one section trained on another)."""
    images = _images(tmp_path, "x.png", "volA/x.png", "volB/x.png", "data/volB/z.png", "volA/y.png", "volB/y.png",
                     "only/w.png")  # fmt: skip
    names = ["/home/lab/project/volB/x.png", "volA/x.png", "/mnt/em/volA/x.png", "x.png", "/srv/volC/w.png",
             "project/data/volB/z.png", "../exports/volB/y.png"]  # fmt: skip
    assert _found(_coco_of(tmp_path, names), images) == [
        "volB/x.png", "volA/x.png", "volA/x.png", "x.png", "only/w.png", "data/volB/z.png", "volB/y.png"]  # fmt: skip
    with pytest.raises(UserError, match="matches both volA/y.png and volB/y.png under"):
        load_coco(_coco_of(tmp_path, ["/srv/volC/y.png"]), images)
    with pytest.raises(UserError, match="/srv/volC/x.png. matches both volA/x.png and volB/x.png under"):
        load_coco(_coco_of(tmp_path, ["/srv/volC/x.png"]), images)


def test_windows_paths_in_file_names_find_their_files(tmp_path):
    """makesense.ai and CVAT on Windows write file names with backslashes and a drive letter."""
    images = _images(tmp_path, "img_001.png", "volB/img_002.png", "volA/img_002.png")
    names = ["C:\\Users\\lab\\img_001.png", "D:\\data\\volB\\img_002.png", "volA\\img_002.png", ".\\img_001.png"]
    assert _found(_coco_of(tmp_path, names), images) == ["img_001.png", "volB/img_002.png", "volA/img_002.png",
                                                         "img_001.png"]  # fmt: skip


def test_labels_to_coco_refuses_a_mask_as_run_does_and_converts_its_pieces(tmp_path, capsys):
    """A pixel classifier's mask (one id in many pieces per slice) would be one COCO instance per tile and slice:
    refused in one line, as `run --predictor labels` refuses it (one shared check); its pieces given ids convert."""
    import tifffile
    from scipy import ndimage

    from cellseg_batch import cli

    yy, xx = np.mgrid[:256, :256]
    mask = np.zeros((256, 256), bool)
    for cy, cx in [(40, 40), (40, 200), (128, 128), (210, 60), (210, 200)]:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < 20**2
    pieces, n = ndimage.label(mask)
    for name, image in (("volume", np.where(mask, 200, 30)), ("mask", mask), ("pieces", pieces)):
        tifffile.imwrite(tmp_path / f"{name}.tif", np.repeat(image.astype(np.uint8)[None], 3, 0), photometric="minisblack")
    argv = ["convert", "labels-to-coco", tmp_path / "mask.tif", tmp_path / "volume.tif", "--classes", "cell", "--tile", 0]
    capsys.readouterr()
    assert cli.main([*argv, "--out", tmp_path / "mask_coco"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "id 1 covers 5 separate pieces in slice 0" in err[0] and "looks like a mask" in err[0]
    assert not (tmp_path / "mask_coco").exists()
    argv[2] = tmp_path / "pieces.tif"
    assert cli.main([*argv, "--out", tmp_path / "coco"]) == 0
    assert len(json.loads((tmp_path / "coco" / "train.json").read_text())["annotations"]) == 3 * n == 15


def test_polygons_give_back_exactly_the_mask(tmp_path):
    """Polygons (`convert --polygons`, `output-to-coco`) follow the pixels' edges: pycocotools fills them back to
    the same pixels (IoU 1) for discs, one-pixel objects, one-pixel lines and diagonals, objects at the image's
    corner, a ragged blob, and masks with holes (kept empty: each walked into from the outline, a keyhole)."""
    import cv2
    from pycocotools import mask as mask_util

    from cellseg_batch.coco import mask_polygons

    yy, xx = np.mgrid[:64, :64]
    shapes = {f"disc r{r}": (yy - 32) ** 2 + (xx - 31.5) ** 2 < r * r for r in (3, 6, 14.9)}
    for name, where in (("one pixel", np.s_[10, 20]), ("line", np.s_[30, 5:50]), ("corner", np.s_[54:, 50:])):
        shapes[name] = np.zeros((64, 64), bool)
        shapes[name][where] = True
    shapes["diagonal"] = np.eye(64, dtype=bool)
    shapes["blob"] = cv2.GaussianBlur(np.random.default_rng(0).random((64, 64)), (0, 0), 3) > 0.5
    # holes (the polygons of one piece walk into each hole and back along a cut of no width): a ring, a ring with an
    # island in its hole, a disc with three holes and a one-pixel hole, and noise (holes and specks everywhere)
    ring = ((yy - 32) ** 2 + (xx - 31.5) ** 2 < 400) & ((yy - 32) ** 2 + (xx - 31.5) ** 2 >= 100)
    shapes["ring"], shapes["ring and island"] = ring, ring | ((yy - 32) ** 2 + (xx - 31.5) ** 2 < 16)
    holes = (yy - 32) ** 2 + (xx - 31.5) ** 2 < 729
    for cy, cx, r in ((20, 25, 4), (40, 40, 6), (33, 18, 3)):
        holes &= (yy - cy) ** 2 + (xx - cx) ** 2 > r * r
    holes[30, 30] = False
    shapes["holes"] = holes
    shapes["noise"] = holes ^ (np.random.default_rng(1).random((64, 64)) < 0.08)
    for name, mask in shapes.items():
        back = mask_util.decode(mask_util.merge(mask_util.frPyObjects(mask_polygons(mask), 64, 64))).astype(bool)
        assert (back == mask).all(), name


def test_convert_into_a_folder_holding_a_coco_set_is_refused_and_overwrite_leaves_no_stale_file(tmp_path, capsys):
    """A second conversion into the same --out (fewer slices, no validation share) would have left the first's
    val.json and images beside the new train.json: its validation images were also training images."""
    import tifffile

    from cellseg_batch import cli as command

    labels = np.zeros((4, 64, 64), np.uint16)
    labels[:, 8:24, 8:24] = 1
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "vol.tif", np.where(labels > 0, 200, 30).astype(np.uint8), photometric="minisblack")
    argv = ["convert", "labels-to-coco", tmp_path / "lab.tif", tmp_path / "vol.tif", "--classes", "cell", "--tile", 0,
            "--out", tmp_path / "coco"]  # fmt: skip
    assert command.main([*argv, "--val-fraction", 0.5]) == 0
    assert (tmp_path / "coco" / "val.json").exists() and len(list((tmp_path / "coco" / "images").iterdir())) == 4
    capsys.readouterr()
    assert command.main([*argv, "--slices", "0:2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a COCO set" in err[0] and "--overwrite" in err[0]
    assert command.main([*argv, "--slices", "0:2", "--overwrite"]) == 0
    assert not (tmp_path / "coco" / "val.json").exists() and len(list((tmp_path / "coco" / "images").iterdir())) == 2


def test_a_refused_or_failed_conversion_leaves_nothing_and_its_rerun_is_not_refused(tmp_path, capsys, monkeypatch):
    """--val-fraction on one slice was refused after images/ was made: the rerun without it was then refused as a
    folder holding a COCO set. A conversion that fails halfway (a read error) removes what it wrote."""
    import tifffile

    from cellseg_batch import cli as command
    from cellseg_batch.read import TiffVolume

    labels = np.zeros((2, 64, 64), np.uint16)
    labels[:, 8:24, 8:24] = 1
    tifffile.imwrite(tmp_path / "lab.tif", labels, photometric="minisblack")
    tifffile.imwrite(tmp_path / "vol.tif", np.where(labels > 0, 200, 30).astype(np.uint8), photometric="minisblack")
    argv = ["convert", "labels-to-coco", tmp_path / "lab.tif", tmp_path / "vol.tif", "--classes", "cell", "--tile", 0,
            "--out", tmp_path / "coco", "--slices", "0:1"]  # fmt: skip
    assert command.main([*argv, "--val-fraction", 0.5]) == 2
    assert "none left to train on" in capsys.readouterr().err and not (tmp_path / "coco").exists()
    read = TiffVolume.read
    calls = []

    def failing(self, *args):
        calls.append(args)
        if len(calls) > 1:
            raise OSError("Input/output error")
        return read(self, *args)

    monkeypatch.setattr(TiffVolume, "read", failing)
    with pytest.raises(OSError):
        command.main([*argv[:-2], "--slices", "0:2"])
    assert not (tmp_path / "coco").exists()
    monkeypatch.setattr(TiffVolume, "read", read)
    assert command.main(argv) == 0 and (tmp_path / "coco" / "train.json").exists()


def test_label_rles_match_pycocotools_encode():
    from pycocotools import mask as mask_util

    from cellseg_batch.coco import label_rles

    lab = np.random.default_rng(2).integers(0, 6, (13, 11)).astype(np.uint64)
    lab[0, 0], lab[-1, -1] = 3, 5  # runs touching the first and last pixel
    rles = label_rles(lab)
    assert list(rles) == [1, 2, 3, 4, 5]
    for i, (rle, area) in rles.items():
        assert rle == mask_util.encode(np.asfortranarray((lab == i).astype(np.uint8)))
        assert area == int((lab == i).sum())


@pytest.mark.parametrize("polygons", [False, True])
def test_labels_to_coco_annotations_are_those_of_each_instance_s_whole_tile_mask(tmp_path, polygons):
    """The annotations come from the tile's runs (RLE) and each instance's box (polygons), not from one whole-tile
    mask per instance (minutes for a 2048 px slice of 16,384 cells); they must be what those masks give: instances
    at the tiles' edges and corners, in several pieces, one pixel, with holes."""
    from pycocotools import mask as mask_util

    from cellseg_batch.coco import labels_to_coco, mask_polygons
    from cellseg_batch.read import ArrayVolume, LabelLayer

    rng = np.random.default_rng(5)
    lab = np.kron(rng.integers(0, 40, (2, 12, 12)), np.ones((1, 6, 6), np.int64)).astype(np.uint16)
    lab[lab > 30] = 0
    lab[0, 30:40, 30:40], lab[0, 33:36, 33:36] = 77, 0  # a ring
    lab[1, 0, 71], lab[1, 5, 5] = 78, 78  # one-pixel pieces, one at a corner of a tile
    volume = ArrayVolume(rng.integers(0, 255, lab.shape).astype(np.uint8))
    paths = labels_to_coco(volume, [LabelLayer(ArrayVolume(lab), "cell")], tmp_path / "coco", tile=40,
                           polygons=polygons)  # fmt: skip
    data = json.loads(paths["train"].read_text())
    expected = []
    for image in data["images"]:
        z, y0, x0 = (int(part[1:]) for part in Path(image["file_name"]).stem.split("_"))
        ids = lab[z, y0 : y0 + image["height"], x0 : x0 + image["width"]]
        for i in np.unique(ids[ids > 0]):
            mask = ids == i
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            segm = mask_polygons(mask) if polygons else {"size": rle["size"], "counts": rle["counts"].decode()}
            expected.append((image["id"], int(mask.sum()), [float(v) for v in mask_util.toBbox(rle)], segm))
    found = [(a["image_id"], a["area"], a["bbox"], a["segmentation"]) for a in data["annotations"]]
    assert found == expected and len(found) > 50


def _one_image_set(root: Path, segmentations: list, categories=None, category_id=1, size=96) -> tuple[Path, Path]:
    """One 96 px image (a.png) and one annotation per segmentation, as a tool might write them."""
    folder = root / "img"
    folder.mkdir(exist_ok=True)
    Image.fromarray(np.full((size, size), 90, np.uint8)).save(folder / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": size, "height": size}],
            "categories": categories or [{"id": 1, "name": "cell"}],
            "annotations": [{"id": i, "image_id": 1, "category_id": category_id, "segmentation": s}
                            for i, s in enumerate(segmentations, 1)]}  # fmt: skip
    path = root / "ann.json"
    path.write_text(json.dumps(coco))
    return path, folder


def test_rle_masks_whose_runs_do_not_cover_the_image_are_skipped_and_counted(tmp_path):
    """pycocotools decodes an RLE that stops short from memory it never wrote (a 24 px mask came back as thousands of
    px, differently each time), and refuses one that runs long only when training reads it (a traceback mid-run):
    both, negative runs and a corrupt compressed string are skipped and counted at load."""
    from pycocotools import mask as mask_util

    square = np.zeros((96, 96), np.uint8, order="F")
    square[18:42, 18:42] = 1
    good = mask_util.encode(square)
    runs = [18 * 96 + 18, 24] + [72, 24] * 23  # column by column; the trailing background run left out, as some
    # home-made encoders do
    bad = [
        {"size": [96, 96], "counts": runs},  # short
        {"size": [96, 96], "counts": runs + [96 * 96]},  # long
        {"size": [96, 96], "counts": [-5, 100, 96 * 96 - 95]},  # negative
        {"size": [96, 96], "counts": "garbage!!"},  # not COCO's compressed format
        {"size": [96, 96], "counts": good["counts"].decode()[:-2]},  # compressed, cut short
    ]
    full = runs + [96 * 96 - sum(runs)]
    ok = [{"size": [96, 96], "counts": good["counts"].decode()}, {"size": [96, 96], "counts": full}]
    ann, folder = _one_image_set(tmp_path, bad + ok)
    s = load_coco(ann, folder)
    assert s.skipped == {"RLE masks whose runs do not add up to height x width": len(bad)}
    masks = [mask_util.decode(a["segmentation"]) for a in s.records[0]["annotations"]]
    assert len(masks) == 2 and all((m == square).all() for m in masks)


def test_polygon_layouts_tools_write_load_as_polygons(tmp_path):
    """A flat [x, y, ...], point pairs, one more level of nesting and coordinates written as text are the same
    polygon (they were dropped as 'degenerate'); a value that is not a number or a stray point far outside the image
    (a 1e9 crashed the process in pycocotools) is skipped and counted; a box without a mask is said to be one."""
    from pycocotools import mask as mask_util

    flat = [18, 18, 42, 18, 42, 42, 18, 42]
    pairs = [[18, 18], [42, 18], [42, 42], [18, 42]]
    layouts = [[flat], flat, pairs, [pairs], [[flat]], [[str(v) for v in flat]]]
    bad = [[flat[:-1] + ["x"]], [flat[:-2] + [1e9, 42]], []]
    ann, folder = _one_image_set(tmp_path, layouts + bad)
    s = load_coco(ann, folder)
    assert s.skipped == {"polygons of values that are not numbers": 1, "annotations without segmentation (boxes only)": 1,
                         "polygons with a point more than an image's size outside it": 1}  # fmt: skip
    got = s.records[0]["annotations"]
    assert len(got) == len(layouts)
    expected = mask_util.decode(mask_util.frPyObjects([[float(v) for v in flat]], 96, 96))[..., 0]
    for a in got:
        assert all(isinstance(v, float) for p in a["segmentation"] for v in p)
        assert (mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], 96, 96))) == expected).all()


def test_polygons_normalised_to_0_1_are_refused_naming_the_fix(tmp_path):
    """Coordinates divided by the image's size (YOLO's layout, some converters') filled a pixel at the corner or
    none: 'degenerate' and one-pixel objects without a hint. A file of them is refused in one line saying how to
    fix it; one small object at the corner among pixel polygons is not."""
    normalised = [[0.1, 0.1, 0.4, 0.1, 0.4, 0.4, 0.1, 0.4], [0.5, 0.5, 0.9, 0.5, 0.9, 0.9]]
    ann, folder = _one_image_set(tmp_path, normalised)
    with pytest.raises(UserError, match="all 2 polygon annotations lie within 0..1.*multiply each x by the image's"):
        load_coco(ann, folder)
    corner_pixel = [[0, 0, 1, 0, 1, 1, 0, 1]]
    ann, folder = _one_image_set(tmp_path, [corner_pixel, [[18, 18, 42, 18, 42, 42, 18, 42]]])
    assert len(load_coco(ann, folder).records[0]["annotations"]) == 2


def test_category_ids_as_text_class_names_tools_allow_and_unused_classes(tmp_path):
    """Category ids "1" and 1 are one (as image ids were); 'alpha granule' becomes the class alpha_granule (a label
    layer's name), said; a class with no annotation is named (the model would never learn it); a list as a
    category id is an unknown category, not a traceback."""
    cats = [{"id": "1", "name": "alpha granule"}, {"id": 2, "name": "mito"}]
    ann, folder = _one_image_set(tmp_path, [[[18, 18, 42, 18, 42, 42]]] * 2, categories=cats, category_id=1)
    data = json.loads(ann.read_text())
    data["annotations"].append(dict(data["annotations"][0], id=9, category_id=[1]))
    ann.write_text(json.dumps(data))
    s = load_coco(ann, folder)
    assert s.classes == ["alpha_granule", "mito"] and len(s.records[0]["annotations"]) == 2
    assert s.skipped == {"unknown categories": 1}
    summary = s.summary()
    assert "'alpha granule' -> alpha_granule" in summary and "no usable annotation of class(es) mito" in summary
    assert "not among the file's categories (alpha_granule, mito): 'id [1]' (1)" in summary, summary
    # the same file as the validation set of a model with a class spelt otherwise: the unknown category is named,
    # with the class it likely means; a class it lacks is not measured (not 'never learnt': the training set teaches)
    s = load_coco(ann, folder, classes=["Mito", "alpha_granule"])
    summary = s.summary()
    assert "not among the training set's classes (Mito, alpha_granule): 'id [1]' (1)" in summary, summary
    assert "no usable annotation of class(es) Mito: their AP is not measured on this set" in summary, summary
    s = load_coco(ann, folder, classes=["Alpha-Granule", "cell"])
    assert "'alpha_granule' (2; the class 'Alpha-Granule'?)" in s.summary(), s.summary()


def test_missing_images_are_named_with_the_file_they_likely_mean_and_other_folders_are_said(tmp_path):
    """Images not found were only counted; now the first are named, with the file of the same name but for case or
    .tif/.tiff beside them. An image found by its name alone in another folder than the COCO file gives (another
    volume's slice of the same name) is said, and so is an image listed twice."""
    images = _images(tmp_path, "volB/a.png", "b.png", "C.PNG", "d.tiff", "café.png", "e.tif")
    import unicodedata

    names = ["volA/a.png", "B.png", "c.png", "d.tif", unicodedata.normalize("NFD", "café.png"), "b.png", "./b.png"]
    s = load_coco(_coco_of(tmp_path, names), images)
    found = [Path(r["file_name"]).relative_to(images).as_posix() for r in s.records]
    assert found == ["volB/a.png", "café.png", "b.png", "b.png"]  # a decomposed é is the same name
    summary = s.summary()
    assert "'B.png' (there is b.png), 'c.png' (there is C.PNG), 'd.tif' (there is d.tiff)" in summary
    assert "found by file name alone in another folder" in summary and "'volA/a.png' ->" in summary
    assert "listed more than once (the first: 'b.png' and './b.png'" in summary
    with pytest.raises(UserError, match=r"none of its 1 images was found under .* \('B.png' \(there is b.png\)\)"):
        load_coco(_coco_of(tmp_path, ["B.png"]), images)
    with pytest.raises(UserError, match=r"\('e.png' \(there is e.tif\)\)"):  # converted to TIFF after annotating
        load_coco(_coco_of(tmp_path, ["e.png"]), images)
    with pytest.raises(UserError, match=r"--images .*e.tif: a file; give the folder that holds the images"):
        load_coco(_coco_of(tmp_path, ["e.png"]), images / "e.tif")


@pytest.mark.parametrize("kind", ["la.png", "singleton.tif", "colour.png", "colour.jpg"])
def test_training_images_read_as_run_reads_slices(tmp_path, kind):
    """Grey + alpha and a singleton axis are greyscale (they were refused); colour is the mean of R, G and B as
    `run` reads a volume (it was a luminance-weighted float: a model trained on other values than it sees)."""
    from cellseg_batch.coco import read_grey
    from cellseg_batch.read import open_volume

    grey = np.random.default_rng(0).integers(0, 256, (40, 50)).astype(np.uint8)
    path = tmp_path / kind
    if kind == "la.png":
        Image.fromarray(np.stack([grey, np.full_like(grey, 255)], -1), "LA").save(path)
        expected = grey
    elif kind == "singleton.tif":
        import tifffile

        tifffile.imwrite(path, grey[..., None])  # (Y, X, 1), as numpy arrays of one channel are saved
        expected = grey
    else:
        colour = np.stack([grey, grey // 2, np.zeros_like(grey)], -1)
        Image.fromarray(colour).save(path, **({"quality": 100, "subsampling": 0} if kind.endswith("jpg") else {}))
        if kind.endswith("png"):
            expected = open_volume(str(path)).read(0, 0, 40, 0, 50)
            assert (expected == np.rint(colour.mean(-1))).all()
        else:
            expected = np.rint(np.asarray(Image.open(path)).astype(float).mean(-1)).astype(np.uint8)
    got = read_grey(path)
    assert got.shape == (40, 50) and got.dtype == np.uint8
    assert (got == expected).all()


def test_output_to_coco_of_a_run_of_some_slices_names_them_as_the_volume_does(tmp_path, capsys):
    """A `run --slices 2:5` output's tiles were named z00000.. and --slices in the volume's numbering refused; a
    --no-image output without --volume gave a zarr error. And --val-fraction too small for the slices still gives
    one validation slice (it gave none, silently); an --out that is a file is one line (it was a traceback)."""
    import tifffile

    from cellseg_batch import cli
    from conftest import cli as run_cli

    cells = np.zeros((6, 64, 64), np.uint16)
    for z in range(6):
        cells[z, 8:30, 8:30], cells[z, 36:60, 30:58] = 1, 2
    image = (np.arange(6)[:, None, None] * 20 + cells * 50).astype(np.uint8)
    tifffile.imwrite(tmp_path / "vol.tif", image, photometric="minisblack")
    tifffile.imwrite(tmp_path / "lab.tif", cells, photometric="minisblack")
    out = tmp_path / "part.zarr"
    run_cli("run", tmp_path / "vol.tif", "--predictor", "labels", "--labels", tmp_path / "lab.tif", "--classes", "cell",
            "--slices", "2:5", "--no-image", "--tile", 64, "--out", out, "--no-progress")  # fmt: skip
    argv = ["convert", "output-to-coco", str(out), "--tile", "0"]
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(tmp_path / "a")]) == 2
    assert "holds no image copy (it was run with --no-image); pass --volume VOLUME" in capsys.readouterr().err
    assert cli.main([*argv, "--volume", str(tmp_path / "vol.tif"), "--slices", "0:3", "--out", str(tmp_path / "b")]) == 2
    assert "holds slices 2:5 of its volume" in capsys.readouterr().err
    assert cli.main([*argv, "--volume", str(tmp_path / "vol.tif"), "--slices", "3:5", "--val-fraction", "0.1",
                     "--out", str(tmp_path / "c")]) == 0  # fmt: skip
    sets = {name: json.loads((tmp_path / "c" / f"{name}.json").read_text()) for name in ("train", "val")}
    names = sorted(i["file_name"] for s in sets.values() for i in s["images"])
    assert names == ["z00003_y00000_x00000.png", "z00004_y00000_x00000.png"] and len(sets["val"]["images"]) == 1
    for name in names:  # the pixels of the slice the name says
        assert (np.asarray(Image.open(tmp_path / "c" / "images" / name)) == image[int(name[1:6])]).all()
    (tmp_path / "file").write_text("")
    assert cli.main([*argv, "--volume", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "file" / "d")]) == 2
    assert "is a file; give a folder" in capsys.readouterr().err
    config = Path(__file__).resolve().parent.parent / "configs" / "demo_cpu.yaml"
    assert cli.main(["train", "--train", str(tmp_path / "c" / "train.json"), "--images", str(tmp_path / "c" / "images"),
                     "--config", str(config), "--out", str(tmp_path / "file")]) == 2  # fmt: skip
    assert "--out " in (err := capsys.readouterr().err) and "is a file; give a folder" in err


def test_output_to_coco_writes_8_bit_images_an_annotation_tool_shows(tmp_path, capsys):
    """A run of 12-bit data kept as 16-bit: its tiles were 16-bit PNGs that browsers and tools show by their high
    byte (0-15 here: near black), an int16 volume's were TIFFs they cannot open. output-to-coco writes 8-bit PNGs
    stretched as the run stretched the volume; 8-bit volumes keep their own pixels."""
    import tifffile

    from cellseg_batch import cli
    from conftest import cli as run_cli

    cells = np.zeros((3, 64, 64), np.uint16)
    cells[:, 8:30, 8:30], cells[:, 36:60, 30:58] = 1, 2
    rng = np.random.default_rng(0)
    for dtype, scale in ((np.uint16, 4095 / 255), (np.int16, 4095 / 255)):
        image = (rng.integers(40, 90, cells.shape) + cells * 60) * scale
        tifffile.imwrite(tmp_path / "vol.tif", image.astype(dtype), photometric="minisblack")
        tifffile.imwrite(tmp_path / "lab.tif", cells, photometric="minisblack")
        out = tmp_path / f"{np.dtype(dtype).name}.zarr"
        run_cli("run", tmp_path / "vol.tif", "--predictor", "labels", "--labels", tmp_path / "lab.tif", "--classes",
                "cell", "--tile", 64, "--out", out, "--no-progress")  # fmt: skip
        capsys.readouterr()
        coco = tmp_path / f"coco_{np.dtype(dtype).name}"
        assert cli.main(["convert", "output-to-coco", str(out), "--tile", "0", "--out", str(coco)]) == 0
        assert f"the {np.dtype(dtype).name} images as 8-bit PNGs" in capsys.readouterr().out
        names = [i["file_name"] for i in json.loads((coco / "train.json").read_text())["images"]]
        assert len(names) == 3 and all(n.endswith(".png") for n in names)
        shown = np.asarray(Image.open(coco / "images" / names[0]))
        assert shown.dtype == np.uint8 and shown.max() == 255 and shown.min() < 40  # stretched, not the high byte
        assert len(load_coco(coco / "train.json", coco / "images").records) == 3


def test_objects_left_without_a_mask_in_an_image_that_trains_and_images_left_out_are_said(tmp_path):
    """An image trains with the objects whose annotation has no usable mask (a box only, a two-point polygon) as
    background, and detectron2 leaves out images with no usable annotation: both were only in the skipped counts
    (or detectron2's log), and are said now."""
    square = [[18, 18, 42, 18, 42, 42, 18, 42]]
    ann, folder = _one_image_set(tmp_path, [square, [], [[5, 5, 9, 9]]])
    data = json.loads(ann.read_text())
    Image.fromarray(np.full((96, 96), 90, np.uint8)).save(folder / "b.png")
    data["images"].append({"id": 2, "file_name": "b.png", "width": 96, "height": 96})
    ann.write_text(json.dumps(data))
    summary = load_coco(ann, folder).summary()
    assert "1 image(s) train with objects whose annotation has no usable mask (boxes only, degenerate polygons; " \
           "the first: 'a.png', 2)" in summary, summary  # fmt: skip
    assert "1 image(s) hold no usable annotation: training leaves them out" in summary, summary
    assert "hold no usable annotation" not in load_coco(ann, folder, classes=["cell"]).summary()  # validation
