"""Metrics against values known in closed form."""

import math

import pytest
import torch

from tokensparse.metrics import coarse_psnr, mean_ci95, psnr, ssim, summarize


def test_psnr_identical_and_known_mse():
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(x, x)).all()
    t = torch.full((2, 3, 8, 8), 0.5)
    p = t + torch.tensor([0.1, 0.01])[:, None, None, None]  # MSE 1e-2 and 1e-4
    assert torch.allclose(psnr(p, t), torch.tensor([20.0, 40.0]), atol=1e-3)
    assert psnr(p, t).shape == (2,)


def test_psnr_clamps_prediction():
    t = torch.ones(1, 3, 8, 8)
    assert torch.isinf(psnr(t + 5.0, t)).all()


def test_ssim_identical_and_ordered():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=g)
    assert torch.allclose(ssim(x, x), torch.ones(4), atol=1e-5)
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(noisy, x) < 1).all() and (ssim(noisier, x) < ssim(noisy, x)).all()
    small = torch.rand(2, 3, 8, 8, generator=g)
    assert torch.allclose(ssim(small, small), torch.ones(2), atol=1e-5)


def test_coarse_psnr_ignores_detail_but_sees_layout():
    t = torch.full((1, 3, 16, 16), 0.5)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2).float() * 0.2 - 0.1
    p = t + checker  # zero-mean detail in every 2x2 cell: MSE 0.01
    assert torch.allclose(psnr(p, t), torch.tensor([20.0]), atol=1e-3)
    assert torch.isinf(coarse_psnr(p, t, factor=2)).all()
    shifted = t + 0.1
    assert torch.allclose(coarse_psnr(shifted, t, factor=4), torch.tensor([20.0]), atol=1e-3)
    assert torch.equal(coarse_psnr(p, t, factor=1), psnr(p, t))
    for factor, err in ((0, ValueError), (-2, ValueError), (32, ValueError), (2.0, TypeError)):
        with pytest.raises(err, match="factor"):
            coarse_psnr(p, t, factor=factor)


def test_coarse_psnr_sees_the_edge_cells_a_factor_does_not_divide():
    t = torch.full((1, 3, 10, 10), 0.5)
    p = t.clone()
    p[..., 8:, :] += 0.3  # only the last two rows (and the partial cells) differ
    assert torch.isfinite(coarse_psnr(p, t, factor=4)).all()
    assert torch.equal(coarse_psnr(t, t, factor=4), psnr(t, t))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 4))


def test_integer_or_out_of_range_images_are_refused():
    x = torch.rand(2, 3, 16, 16)
    for metric in (psnr, ssim, coarse_psnr):
        with pytest.raises(TypeError, match="float tensor"):  # 0-255 would be scored as if in [0, 1]
            metric((x * 255).byte(), (x * 255).byte())
        with pytest.raises(ValueError, match=r"target images must be in \[0, 1\]"):
            metric(x, x * 255)
    assert ssim(x[:0], x[:0]).shape == (0,) and psnr(x[:0], x[:0]).shape == (0,)


def test_mean_ci95():
    m, h = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == pytest.approx(2.5)
    assert h == pytest.approx(1.96 * math.sqrt(5 / 3) / 2)
    m, h = mean_ci95([3.0])
    assert m == 3.0 and math.isnan(h)


def test_summarize_groups_by_task_and_family():
    vals = torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    tasks = ["recolor", "remove", "recolor", "place", "backdrop", "compose"]
    out = summarize({"psnr": vals}, tasks)
    assert out["per_task"]["recolor"]["psnr"]["mean"] == pytest.approx(20.0)
    assert out["per_task"]["recolor"]["psnr"]["n"] == 2
    assert out["per_family"]["editing"]["psnr"]["mean"] == pytest.approx(20.0)
    assert out["per_family"]["subject"]["psnr"]["mean"] == pytest.approx(45.0)
    assert list(out["per_family"]) == ["editing", "subject", "multi"]
    assert out["overall"]["psnr"]["mean"] == pytest.approx(35.0)
    with pytest.raises(ValueError):
        summarize({"psnr": vals[:3]}, tasks)


def test_float64_images_keep_their_precision():
    target = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    pred = target + 1e-12  # the same image in float32: psnr was inf, "identical"
    got = psnr(pred, target)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(240.0, abs=0.5)
    assert coarse_psnr(pred, target, 2).item() == pytest.approx(240.0, abs=0.5)
    assert ssim(pred, target).dtype == torch.float64
    assert psnr(pred.float(), target.float()).dtype == torch.float32  # float32 stays float32
    assert psnr(pred.half(), target.float()).dtype == torch.float32


def test_summarize_reports_the_open_family():
    out = summarize({"psnr": torch.tensor([10.0, 20.0, 30.0])}, ["scene", "place", "scene"])
    assert list(out["per_family"]) == ["subject", "open"]  # "open" was missing: its samples in no family
    assert out["per_family"]["open"]["psnr"] == {"mean": pytest.approx(20.0), "ci95": pytest.approx(19.6),
                                                 "n": 2}
    assert list(summarize({"psnr": torch.ones(2)}, ["scene", "scene"])["per_family"]) == ["open"]


def test_fid_orders_distributions():
    from tokensparse.data import heldout
    from tokensparse.features import FeatureNet
    from tokensparse.metrics import fid

    torch.manual_seed(0)
    net = FeatureNet().eval()
    scenes = torch.stack([s.target for s in heldout("open", 96)])
    same = fid(scenes[:48], scenes[48:], net)
    other = fid(scenes[:48], torch.rand(48, 3, 32, 32), net)
    assert 0 <= same < other
    with pytest.raises(ValueError, match="N >= 2"):
        fid(scenes[:1], scenes, net)
    with pytest.raises(TypeError, match="float tensor"):
        fid((scenes * 255).byte(), scenes, net)
    with pytest.raises(ValueError, match="one size"):
        fid(scenes, scenes[..., :16, :16], net)
    with pytest.raises(ValueError, match="at least 8x8"):  # FeatureNet takes H, W >= 8
        fid(scenes[..., :4, :4], scenes[..., :4, :4], net)
    with pytest.raises(ValueError, match="batch_size"):
        fid(scenes, scenes, net, batch_size=0)


def test_summarize_names_bad_tasks_and_values():
    with pytest.raises(TypeError, match="list of task names"):  # was "unknown task names ['c', 'e', 'l', ...]"
        summarize({"psnr": torch.zeros(7)}, "recolor")
    with pytest.raises(ValueError, match="at least one sample"):  # was mean_ci95's "needs at least one value"
        summarize({"psnr": torch.zeros(0)}, [])
    with pytest.raises(TypeError, match="'psnr' must be a tensor"):  # was an AttributeError
        summarize({"psnr": [1.0, 2.0]}, ["recolor", "recolor"])


def test_fid_refuses_nan_images():
    from tokensparse.features import FeatureNet
    from tokensparse.metrics import fid

    net = FeatureNet().eval()
    x = torch.rand(4, 3, 32, 32)
    bad = x.clone()
    bad[1, 0, 3, 3] = float("nan")
    with pytest.raises(ValueError, match="generated images must be finite"):  # was a crash in MKL (segfault)
        fid(bad, x, net)
    with pytest.raises(ValueError, match="real images must be finite, got 1 of 12288 values NaN or inf"):
        fid(x, bad, net)
    with pytest.raises(ValueError, match="generated images must be finite"):  # inf was clamped to white, silently
        fid(x.masked_fill(x > 0.5, float("inf")), x, net)
    with pytest.raises(ValueError, match=r"real images must be in \[0, 1\], got \[.*, 5\]"):  # was clamped, silently
        fid(x, x * 5, net)
    assert math.isfinite(fid(x * 5, x, net))  # generated images are scored as displayed (clamped), like psnr's pred


def test_images_without_pixels_are_refused():
    for shape in ((2, 3, 0, 0), (2, 3, 8, 0), (2, 0, 8, 8)):
        x = torch.rand(shape)
        for metric in (psnr, ssim, coarse_psnr):  # psnr was nan, ssim a torchmetrics kernel_size error
            with pytest.raises(ValueError, match="at least one pixel"):
                metric(x, x)


def test_summarize_names_per_sample_that_is_not_a_mapping():
    with pytest.raises(TypeError, match="per_sample must be a dict"):  # was an AttributeError ('list' has no 'items')
        summarize([torch.zeros(2)], ["recolor", "recolor"])


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_images_are_refused_naming_the_argument(value):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    bad = x.clone()
    bad[1, :, 3, :2] = value  # a diverged model: psnr / ssim were NaN, inf clamped and scored as a pixel value
    for metric in (psnr, ssim, coarse_psnr):
        with pytest.raises(ValueError, match="pred images must be finite, got 6 of 1536 values NaN or inf"):
            metric(bad, x)
        with pytest.raises(ValueError, match="target images must be finite, got 6 of 1536"):  # not "in [0, 1]"
            metric(x, bad)
    assert torch.isfinite(psnr(x, x.flip(0))).all()


def test_mean_ci95_names_values_of_a_wrong_type_or_nan():
    for bad, got in (("12", "the string '12'"), (None, "NoneType"), (["1", "2"], "list"), ({1: 2}, "dict"),
                     (torch.tensor([1j, 2j]), "complex64 tensor")):  # "12" was torch's "new(): invalid data type 'str'"
        with pytest.raises(TypeError, match=f"values must be a real tensor or a sequence of real numbers, got .*{got}"):
            mean_ci95(bad)
    with pytest.raises(ValueError, match="values is empty"):
        mean_ci95([])
    with pytest.raises(ValueError, match="values must not hold NaN, got 1 of 3"):  # was (nan, nan), silently
        mean_ci95([1.0, float("nan"), 3.0])
    m, h = mean_ci95(torch.tensor([float("inf"), 30.0]))  # psnr of identical images: kept, as the mean it gives
    assert m == math.inf and math.isnan(h)
    assert mean_ci95(torch.tensor([1, 3])) == pytest.approx((2.0, 1.96))  # integer values still welcome


def test_summarize_names_the_metric_and_tasks_that_are_wrong():
    tasks = ["recolor", "remove", "recolor"]
    with pytest.raises(ValueError, match="'psnr': values must not hold NaN, got 1 of 3"):  # was a NaN mean
        summarize({"ssim": torch.ones(3), "psnr": torch.tensor([20.0, float("nan"), 30.0])}, tasks)
    with pytest.raises(TypeError, match="'psnr': values must be a real tensor"):
        summarize({"psnr": torch.ones(3, dtype=torch.complex64)}, tasks)
    with pytest.raises(TypeError, match="tasks must be task names"):  # was "unhashable type: 'list'"
        summarize({"psnr": torch.ones(2)}, [["recolor"], "remove"])
    with pytest.raises(ValueError, match="per_sample is empty"):  # was a summary with no numbers in it
        summarize({}, tasks)
