"""The preview picture: instances drawn over the image, outlines in their class's colour, a legend with counts."""

import numpy as np
from PIL import Image

from cellseg_batch.preview import PALETTE, render


def test_outlines_take_the_class_colour_and_the_inside_is_tinted(tmp_path):
    image = np.full((700, 700), 128.0)
    image[0, 0] = 0  # a range for the percentile stretch
    cells = np.zeros((700, 700), np.uint32)
    cells[100:300, 100:300] = 7
    mitos = np.zeros_like(cells)
    mitos[400:450, 400:450] = 3
    path = render(image, {"cell": cells, "mitochondrion": mitos}, tmp_path / "p.png", "title")
    picture = np.asarray(Image.open(path).convert("RGB")).astype(int)
    band = (picture.shape[0] - 700) // 2
    assert picture.shape[1] == 700 and band > 0
    colour = [round(255 * c) for c in PALETTE[0]]
    assert list(picture[band + 100, 150]) == colour  # the cell's top edge
    assert list(picture[band + 400, 420]) == [round(255 * c) for c in PALETTE[1]]
    inside, outside = picture[band + 200, 200], picture[band + 600, 600]
    assert list(outside) == [outside[0]] * 3 and list(inside) != [inside[0]] * 3  # grey outside, tinted inside
    assert (picture[:band] < 250).any()  # the legend is drawn


def test_no_data_is_black_and_infinity_white_as_the_model_sees_them(tmp_path):
    """A float volume's +inf reaches the model as white (clipped to 255) but was drawn black."""
    image = np.linspace(0, 1, 700 * 700, dtype=np.float32).reshape(700, 700)
    image[100:120, 100:120], image[300:320, 300:320], image[500:520, 500:520] = np.inf, np.nan, -np.inf
    path = render(image, {"cell": np.zeros((700, 700), np.uint32)}, tmp_path / "p.png", "title")
    picture = np.asarray(Image.open(path).convert("L")).astype(int)
    band = (picture.shape[0] - 700) // 2
    assert picture.shape[1] == 700
    assert picture[band + 110, 110] == 255 and picture[band + 310, 310] == 0 and picture[band + 510, 510] == 0
