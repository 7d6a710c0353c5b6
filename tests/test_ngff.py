"""The OME-Zarr output as NGFF readers see it: every pyramid level overlays level 0 in world coordinates."""

import numpy as np
import zarr

from cellseg_batch.write import Output


def _multiscale(group_path) -> dict:
    attrs = zarr.open_group(str(group_path), mode="r").attrs.asdict()
    return attrs.get("ome", attrs)["multiscales"][0]


def _to_world(dataset: dict) -> tuple[np.ndarray, np.ndarray]:
    """(scale, translation) of Y and X from a dataset's coordinateTransformations."""
    t = {c["type"]: c[c["type"]] for c in dataset["coordinateTransformations"]}
    return np.array(t["scale"][1:]), np.array(t["translation"][1:])


def test_every_level_overlays_level_0_in_world_coordinates(tmp_path):
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
    out.create(shape, chunk, ["c"], np.uint8, pixel, {}, np.uint32)
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
