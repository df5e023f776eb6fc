import numpy as np
import pytest
import torch
from PIL import Image

from tokensparse.images import batch_images, to_tensor


def test_every_input_kind_gives_the_same_tensor():
    rgb = np.random.RandomState(0).randint(0, 256, (8, 8, 3), dtype=np.uint8)
    want = to_tensor(Image.fromarray(rgb))
    assert torch.equal(to_tensor(rgb), want)  # uint8 array
    assert torch.equal(to_tensor(torch.from_numpy(rgb).permute(2, 0, 1)), want)  # uint8 tensor: / 255
    assert torch.allclose(to_tensor(rgb.astype(np.float32) / 255), want)  # float array in [0, 1]
    assert torch.allclose(to_tensor(rgb.transpose(2, 0, 1).copy()), want)  # channels-first array
    dark = np.zeros((4, 4, 3), np.uint8)
    dark[0, 0] = 1
    assert float(to_tensor(dark).max()) == pytest.approx(1 / 255)  # a dark uint8 image stays dark


def test_grayscale_becomes_rgb():
    g = torch.rand(1, 8, 8)
    assert torch.equal(to_tensor(g), g.expand(3, 8, 8))
    assert batch_images([torch.rand(2, 1, 8, 8)])[0].shape == (2, 3, 8, 8)
    assert to_tensor(np.zeros((8, 8), np.uint8)).shape == (3, 8, 8)


@pytest.mark.parametrize("bad, err", [
    (torch.full((3, 4, 4), 200.0), ValueError), (torch.full((3, 4, 4), float("nan")), ValueError),
    (torch.full((3, 4, 4), -0.5), ValueError), (np.zeros((2, 3, 4, 4)), ValueError), ("img.png", TypeError),
])
def test_bad_images_raise(bad, err):
    with pytest.raises(err):
        to_tensor(bad)
