from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokensparse.images import batch_images, save_png, to_pil, to_tensor


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


def test_numpy_batches_read_each_image_by_the_same_rule():
    hwc = np.random.RandomState(1).randint(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    want = torch.stack([to_tensor(Image.fromarray(a)) for a in hwc])
    assert torch.equal(to_tensor(hwc), want)  # (B, H, W, C)
    assert torch.equal(to_tensor(hwc.transpose(0, 3, 1, 2).copy()), want)  # (B, C, H, W)
    assert batch_images([hwc])[0].shape == (2, 3, 8, 8)
    assert torch.equal(to_tensor(torch.from_numpy(hwc)), want)  # a (B, H, W, C) tensor too, as the docs say
    frames = np.stack([np.full((8, 8, 3), 200.0), np.full((8, 8, 3), 1.0)])  # 0-255 frames, the 2nd near black
    torch.testing.assert_close(to_tensor(frames)[:, 0, 0, 0], torch.tensor([200 / 255, 1 / 255]))


def test_more_pil_modes_keep_their_values():
    v = np.array([[0, 1000, 40000, 65535]], np.uint16)
    want = torch.from_numpy(v / 65535.0).float()
    for mode in ("I;16", "I;16N"):  # native byte order too (it was clipped at 255 by convert("RGB"))
        torch.testing.assert_close(to_tensor(Image.frombytes(mode, (4, 1), v.tobytes()))[0], want)
    la = to_tensor(Image.new("La", (2, 2), (100, 255)))  # premultiplied alpha: no direct RGB conversion
    torch.testing.assert_close(la, torch.full((3, 2, 2), 100 / 255))


def test_grayscale_becomes_rgb():
    g = torch.rand(1, 8, 8)
    assert torch.equal(to_tensor(g), g.expand(3, 8, 8))
    assert batch_images([torch.rand(2, 1, 8, 8)])[0].shape == (2, 3, 8, 8)
    assert to_tensor(np.zeros((8, 8), np.uint8)).shape == (3, 8, 8)


@pytest.mark.parametrize("bad, err", [
    (torch.full((3, 4, 4), 200.0), ValueError), (torch.full((3, 4, 4), float("nan")), ValueError),
    (torch.full((3, 4, 4), -0.5), ValueError), (np.zeros((2, 2, 3, 4, 4)), ValueError),
    (np.zeros((0, 3, 4, 4)), ValueError), ("img.png", TypeError),
    (torch.rand(5), ValueError), (torch.tensor(0.5), ValueError), (torch.rand(1, 2, 3, 4, 4), ValueError),
    (torch.rand(0, 3, 4, 4), ValueError),
])
def test_bad_images_raise(bad, err):
    with pytest.raises(err):
        to_tensor(bad)


@pytest.mark.parametrize("empty", [torch.rand(0, 3, 4, 4), torch.rand(0, 4, 4, 3), np.zeros((0, 3, 4, 4)),
                                   np.zeros((0, 4, 4, 3), np.uint8)])
def test_an_empty_batch_is_named_as_empty(empty):
    # a batch of zero images got the generic "must be (H, W), (H, W, C) or (C, H, W), ..." shape message
    with pytest.raises(ValueError, match=r"empty batch of images \(zero images, shape \(0, ") as info:
        to_tensor(empty)
    assert "must be (H, W)" not in str(info.value)
    with pytest.raises(ValueError, match=r"reference 1: got an empty batch of images"):
        batch_images([torch.rand(3, 4, 4), empty])


@pytest.mark.parametrize("bad, shape", [
    (np.random.rand(8, 8, 5), "(8, 8, 5)"), (np.random.rand(2, 2, 8, 8), "(2, 2, 8, 8)"),
    (torch.rand(5, 8, 8), "(5, 8, 8)"), (torch.rand(2, 5, 8, 8), "(2, 5, 8, 8)"),
])
def test_a_wrong_channel_count_is_named_with_the_input_shape(bad, shape):
    with pytest.raises(ValueError, match="1, 3 or 4 channels") as info:
        to_tensor(bad)
    assert shape in str(info.value)


def test_one_rule_for_every_image_type(tmp_path):
    from PIL import Image

    from tokensparse.images import batch_images, load_rgb, to_tensor

    r = np.random.RandomState(0).rand(32, 32, 3).astype(np.float32)
    a = r.copy()
    a[0, 0, 0] = 1.0005  # resampling overshoot: still [0, 1], not 0-255
    assert abs(float(to_tensor(a).mean()) - float(a.mean())) < 1e-6
    g16 = (np.random.RandomState(1).rand(32, 32) * 65535).astype(np.uint16)
    for img in (Image.fromarray(g16), Image.fromarray(g16.astype(np.int32)),
                Image.fromarray((g16 / 65535).astype(np.float32)), g16):
        torch.testing.assert_close(to_tensor(img)[0], torch.from_numpy(g16 / 65535).float(), atol=1e-4, rtol=0)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert abs(np.asarray(load_rgb(tmp_path / "g16.png")).mean() / 255 - g16.mean() / 65535) < 0.01
    assert float(to_tensor(torch.ones(3, 8, 8, dtype=torch.bool)).max()) == 1.0
    t = torch.from_numpy(r)
    for x in (t, t.permute(2, 0, 1), (t * 255).round().to(torch.uint8), np.concatenate([r, r[..., :1]], -1)):
        torch.testing.assert_close(to_tensor(x), t.permute(2, 0, 1), atol=3e-3, rtol=0)  # HWC, CHW, uint8, RGBA
    assert to_tensor(t[..., 0]).shape == (3, 32, 32) == to_tensor(t[..., :1]).shape  # (H, W), (H, W, 1)
    for bad in (np.array([["a"]]), np.empty((2, 2), dtype=object), torch.rand(3, 4, 4, dtype=torch.complex64)):
        with pytest.raises(TypeError):
            to_tensor(bad)
    for bad in (torch.rand(3, 8, 8, device="meta"), torch.zeros(3, 8, 8, dtype=torch.uint8, device="meta"),
                torch.rand(3, 8, 8).to_sparse()):
        with pytest.raises(TypeError, match="must be dense and hold data"):
            to_tensor(bad)
    for bad in (torch.rand(2, 3, 8, 8), r, Image.fromarray((r * 255).astype(np.uint8))):
        with pytest.raises(TypeError, match="references must be a list"):
            batch_images(bad)
    with pytest.raises(ValueError, match="reference 1: image values must be finite"):
        batch_images([r, np.full((8, 8, 3), np.nan)])


def test_ambiguous_layouts_and_big_endian_16_bit():
    from PIL import Image

    from tokensparse.images import to_tensor

    assert to_tensor(np.random.rand(3, 8, 4)).shape == (3, 8, 4)  # channels first: width 4 is not alpha
    assert to_tensor(np.random.rand(4, 8, 8)).shape == (3, 8, 8)  # RGBA channels first
    assert to_tensor(np.random.rand(8, 8, 4)).shape == (3, 8, 8)  # RGBA channels last
    big = Image.frombytes("I;16B", (8, 8), np.full((8, 8), 300, ">u2").tobytes())
    assert abs(float(to_tensor(big).mean()) - 300 / 65535) < 1e-6


@pytest.mark.parametrize("mode", ["RGB", "I;16"])
def test_load_rgb_turns_a_photo_upright_by_its_exif_orientation(tmp_path, mode):
    from PIL import Image

    from tokensparse.images import load_rgb

    wide = np.zeros((20, 40), np.uint16 if mode == "I;16" else np.uint8)
    wide[:, :20] = np.iinfo(wide.dtype).max  # left half white
    im = Image.fromarray(np.stack([wide] * 3, -1) if mode == "RGB" else wide)
    exif = im.getexif()
    exif[0x0112] = 6  # a phone held upright: the stored pixels are shown turned 90 degrees clockwise
    im.save(tmp_path / "photo.png", exif=exif)
    up = np.asarray(load_rgb(tmp_path / "photo.png"))
    assert up.shape == (40, 20, 3)  # as viewers (and diffusers' load_image) show it: tall
    assert up[:20].min() == 255 and up[20:].max() == 0  # the white half on top


@pytest.mark.parametrize("bad", [torch.rand(4, 4, 3), torch.rand(1, 4, 4), torch.rand(1, 3, 4, 4), torch.rand(4, 4)])
def test_to_pil_refuses_a_tensor_that_is_not_3_h_w(bad, tmp_path):
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        to_pil(bad)  # (4, 4, 3) was read as RGBA 3x4 without a word
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        save_png(bad, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())
    assert to_pil(torch.rand(3, 4, 5)).size == (5, 4)


def test_batch_images_checks_batch():
    assert batch_images([torch.rand(3, 4, 4)], batch=2)[0].shape == (2, 3, 4, 4)
    for bad in (0, -1):  # were ignored: a batch of one came back
        with pytest.raises(ValueError, match="batch"):
            batch_images([torch.rand(3, 4, 4)], batch=bad)
    with pytest.raises(TypeError, match="batch must be an int"):  # failed inside expand()
        batch_images([torch.rand(3, 4, 4)], batch=2.5)


def test_to_pil_takes_any_float_dtype_and_refuses_integer_tensors(tmp_path):
    x = torch.rand(3, 4, 5)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # bfloat16 failed in numpy ("unsupported ScalarType")
        assert np.abs(np.asarray(to_pil(x.to(dtype)), dtype=float) - np.asarray(to_pil(x), dtype=float)).max() <= 2
    with pytest.raises(TypeError, match="float tensor"):  # uint8 128 was clamped to 1: a white image
        to_pil(torch.full((3, 4, 5), 128, dtype=torch.uint8))
    with pytest.raises(TypeError, match="float tensor"):
        save_png(torch.ones(3, 4, 5, dtype=torch.bool), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_load_rgb_names_a_path_that_is_not_one():
    from tokensparse.images import load_rgb

    for bad in (3, None, ["a.png"]):
        with pytest.raises(TypeError, match="load_rgb takes an image file path"):  # was PIL's AttributeError ('read')
            load_rgb(bad)


def test_a_tensor_that_requires_grad_converts_without_a_warning():
    import warnings

    image = torch.rand(3, 4, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when a tensor that requires grad becomes a Python float
        assert torch.equal(to_tensor(image), image.detach())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nan_or_inf_image_is_refused_and_nothing_is_written(value, tmp_path):
    image = torch.rand(3, 4, 5)
    image[1, 2, :3] = value  # a diverged model's output: NaN was written black, +/-inf white / black
    with pytest.raises(ValueError, match="3 of 60 values that are not finite"):
        to_pil(image)
    out = tmp_path / "sub" / "x.png"
    with pytest.raises(ValueError, match=r"cannot write .*x\.png: .*3 of 60 values that are not finite"):
        save_png(image.to(torch.bfloat16), out)
    assert not list(tmp_path.iterdir())  # no file, no temp file, no folder
    assert save_png(image.nan_to_num(0.0, 1.0, 0.0), out).is_file()


@pytest.mark.parametrize("mode", ["F", "CMYK", "YCbCr", "HSV"])
def test_save_png_writes_pil_modes_a_png_cannot_hold_as_rgb(tmp_path, mode):
    import numpy as np
    from PIL import Image

    if mode == "F":
        image = Image.fromarray(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), mode="F")
    else:
        image = Image.new("RGB", (4, 3), (200, 30, 90)).convert(mode)
    out = save_png(image, tmp_path / "x.png")  # was an OSError ("cannot write mode F as PNG")
    written = Image.open(out)
    assert written.mode == "RGB" and written.size == (4, 3)
    expect = to_pil(to_tensor(image))
    assert np.array_equal(np.asarray(written), np.asarray(expect))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_save_png_keeps_16_bit_grey(tmp_path):
    import numpy as np
    from PIL import Image

    image = Image.fromarray(np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    assert Image.open(save_png(image, tmp_path / "x.png")).getpixel((3, 2)) == 55000


@pytest.mark.parametrize("image", [torch.rand(3, 0, 4), Image.new("RGB", (0, 0))], ids=["tensor", "pil"])
def test_save_png_names_the_path_of_an_empty_image(image, tmp_path):
    path = tmp_path / "empty.png"
    with pytest.raises(ValueError, match=r"cannot write .*empty\.png: a PNG needs at least one pixel"):
        save_png(image, path)  # was PIL's "cannot write empty image", naming no file
    assert list(tmp_path.iterdir()) == []


def test_load_rgb_names_the_file_in_pils_decompression_bomb_warning(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    from tokensparse.images import LargeImageWarning, load_rgb

    Image.new("RGB", (64, 64), "red").save(tmp_path / "big.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, not over twice it: PIL warns
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = load_rgb(tmp_path / "big.png")
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (255, 0, 0)  # loaded all the same
    assert [w.category for w in caught] == [LargeImageWarning]  # PIL's own, which named no file, not shown too
    assert issubclass(LargeImageWarning, Image.DecompressionBombWarning)  # filters on PIL's category still apply
    assert caught[0].message.path == tmp_path / "big.png" and caught[0].filename == __file__  # the caller's line
    assert str(caught[0].message) == f"image {tmp_path / 'big.png'}: Image size (4096 pixels) exceeds limit of 3000 " \
                                     "pixels, could be decompression bomb DOS attack."
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # a user's filter on PIL's category
        load_rgb(tmp_path / "big.png")
    assert caught == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: an error naming the file
    with pytest.raises(ValueError, match="cannot read image .*big.png"):
        load_rgb(tmp_path / "big.png")


def test_a_large_image_warning_pickles_and_copies():
    import copy
    import pickle

    from tokensparse.images import LargeImageWarning

    w = LargeImageWarning("big.png", "Image size (100000000 pixels) exceeds limit")
    for again in (pickle.loads(pickle.dumps(w)), copy.copy(w)):  # __init__ needs both fields: args held one
        assert type(again) is LargeImageWarning and str(again) == str(w)
        assert (again.path, again.detail) == (w.path, w.detail)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "P-transparent", "RGB-transparent", "I;16"])
def test_load_rgba_keeps_the_files_alpha_and_load_rgbs_colours(tmp_path, mode):
    from tokensparse.images import load_rgb, load_rgba

    rng = np.random.RandomState(0)
    base = Image.fromarray((rng.rand(6, 5, 4) * 255).astype("uint8"), "RGBA")
    path = tmp_path / "x.png"
    if mode == "P-transparent":  # a palette whose entry 0 is transparent
        image = base.convert("RGB").convert("P")
        image.save(path, transparency=0)
        alpha = np.where(np.asarray(image) == 0, 0, 255)
    elif mode == "RGB-transparent":  # one transparent colour (a tRNS chunk)
        image = base.convert("RGB")
        colour = image.getpixel((0, 0))
        image.save(path, transparency=colour)
        alpha = np.where((np.asarray(image) == colour).all(-1), 0, 255)
    elif mode == "I;16":
        Image.fromarray((rng.rand(6, 5) * 65535).astype(np.uint16)).save(path)
        alpha = np.full((6, 5), 255)
    else:
        image = base.convert("RGB").convert(mode) if mode in ("P", "L") else base.convert(mode)
        image.save(path)
        alpha = np.asarray(image.getchannel("A")) if "A" in mode else np.full((6, 5), 255)
    rgba = load_rgba(path)
    assert rgba.mode == "RGBA" and rgba.size == (5, 6)
    assert np.array_equal(np.asarray(rgba.convert("RGB")), np.asarray(load_rgb(path)))  # load_rgb's colours exactly
    assert np.array_equal(np.asarray(rgba.getchannel("A")), alpha)


def test_load_rgba_names_a_file_it_cannot_read(tmp_path):
    from tokensparse.images import load_rgba

    (tmp_path / "x.png").write_text("no image")
    with pytest.raises(ValueError, match=f"cannot read image {tmp_path / 'x.png'}"):
        load_rgba(tmp_path / "x.png")
    with pytest.raises(TypeError, match="load_rgba takes an image file path"):
        load_rgba(None)


def test_save_pngs_writes_a_set_replacing_old_files_and_keeping_rgba(tmp_path):
    from tokensparse.images import save_pngs

    images = [Image.fromarray(np.full((4, 3, 4), i * 60, dtype=np.uint8), "RGBA") for i in range(3)]
    paths = [tmp_path / "sub" / f"out-layer{i}.png" for i in (1, 2, 3)]
    assert save_pngs(images[:1], paths[:1]) == paths[:1]
    assert save_pngs(images, paths) == paths  # the first is replaced, the folder already there
    for image, path in zip(images, paths):
        with Image.open(path) as im:
            assert im.mode == "RGBA" and np.array_equal(np.asarray(im), np.asarray(image))
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [p.name for p in paths]


def test_save_pngs_replaces_nothing_when_one_image_fails(tmp_path, monkeypatch):
    from tokensparse.images import save_pngs

    paths = [tmp_path / f"out-layer{i}.png" for i in (1, 2)]
    for path in paths:
        path.write_bytes(b"old")
    good = Image.new("RGBA", (2, 2))
    with pytest.raises(ValueError, match=f"cannot write {paths[1]}: to_pil"):  # refused before any file is written
        save_pngs([good, torch.full((3, 2, 2), float("nan"))], paths)
    save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if str(fp).startswith(str(tmp_path / ".out-layer2.png.")):
            raise OSError(28, "No space left on device")
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError, match=f"cannot write {paths[1]}: No space left on device"):
        save_pngs([good, good], paths)
    assert [p.read_bytes() for p in paths] == [b"old", b"old"]  # the first layer was written, not renamed
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]  # no temp file left
    monkeypatch.undo()
    with pytest.raises(OSError, match=f"cannot write {tmp_path / 'new' / 'a.png'}"):  # a folder on the way: removed
        (tmp_path / "new").mkdir()
        (tmp_path / "new" / "a.png").mkdir()  # a rename onto a folder fails
        save_pngs([good, good], [tmp_path / "new" / "b.png", tmp_path / "new" / "a.png"])


@pytest.mark.parametrize("images, paths, error, message", [
    ([], [], ValueError, "one path per image"),
    ([None], ["a.png", "b.png"], ValueError, "one path per image"),
    ([None, None], ["a.png", "./a.png"], ValueError, "given twice"),
    ([None], ["a.jpg"], ValueError, "must end in .png"),
    (None, ["a.png"], TypeError, "a list of images"),
])
def test_save_pngs_refuses_bad_arguments(tmp_path, images, paths, error, message):
    from tokensparse.images import save_pngs

    with pytest.raises(error, match=message):
        save_pngs(images, [tmp_path / p for p in paths])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not Path("/dev/fd").is_dir(), reason="needs /dev/fd (a pipe as a path)")
def test_a_large_image_read_from_a_pipe_loads_the_file_read_once(tmp_path, monkeypatch):
    import io
    import os
    import warnings

    from PIL import Image

    from tokensparse.images import LargeImageWarning, load_rgb

    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")  # 4096 pixels, a few hundred bytes: fits a pipe
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, not over twice it: PIL warns
    read, write = os.pipe()
    try:
        os.write(write, png.getvalue())
        os.close(write)  # `--ref <(cat big.png)`: the data once, then the end
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            image = load_rgb(f"/dev/fd/{read}")  # was: opened again, empty: "cannot read image ... cannot identify"
    finally:
        os.close(read)
    assert image.size == (64, 64) and image.getpixel((0, 0)) == (255, 0, 0)
    assert [w.category for w in caught] == [LargeImageWarning] and caught[0].filename == __file__


def test_pils_other_warnings_on_open_still_reach_the_caller(tmp_path, monkeypatch):
    import warnings

    from PIL import Image

    from tokensparse.images import load_rgb

    Image.new("RGB", (8, 8), "red").save(tmp_path / "r.png")
    real_open = Image.open

    def open_warning(*args, **kwargs):
        warnings.warn("a plugin's own warning", UserWarning, stacklevel=2)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", open_warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_rgb(tmp_path / "r.png")
    assert [str(w.message) for w in caught] == ["a plugin's own warning"]
