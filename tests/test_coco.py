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
    COCO name wins (not the first of that base name); equally good matches are refused, naming both."""
    images = _images(tmp_path, "x.png", "volA/x.png", "volB/x.png", "data/volB/z.png", "volA/y.png", "volB/y.png")
    names = ["/home/lab/project/volB/x.png", "volA/x.png", "/mnt/em/volA/x.png", "x.png", "/srv/volC/x.png",
             "project/data/volB/z.png", "../exports/volB/y.png"]  # fmt: skip
    assert _found(_coco_of(tmp_path, names), images) == [
        "volB/x.png", "volA/x.png", "volA/x.png", "x.png", "x.png", "data/volB/z.png", "volB/y.png"]  # fmt: skip
    with pytest.raises(UserError, match="matches both volA/y.png and volB/y.png under"):
        load_coco(_coco_of(tmp_path, ["/srv/volC/y.png"]), images)


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
    corner, and a ragged blob (its holes filled: COCO polygons have none)."""
    import cv2
    from pycocotools import mask as mask_util
    from scipy import ndimage

    from cellseg_batch.coco import mask_polygons

    yy, xx = np.mgrid[:64, :64]
    shapes = {f"disc r{r}": (yy - 32) ** 2 + (xx - 31.5) ** 2 < r * r for r in (3, 6, 14.9)}
    for name, where in (("one pixel", np.s_[10, 20]), ("line", np.s_[30, 5:50]), ("corner", np.s_[54:, 50:])):
        shapes[name] = np.zeros((64, 64), bool)
        shapes[name][where] = True
    shapes["diagonal"] = np.eye(64, dtype=bool)
    shapes["blob"] = cv2.GaussianBlur(np.random.default_rng(0).random((64, 64)), (0, 0), 3) > 0.5
    for name, mask in shapes.items():
        back = mask_util.decode(mask_util.merge(mask_util.frPyObjects(mask_polygons(mask), 64, 64))).astype(bool)
        assert (back == ndimage.binary_fill_holes(mask)).all(), name


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
