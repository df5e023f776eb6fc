import math

import numpy as np
import pytest

from tokensparse import checks


def test_real_converts_and_bounds():
    assert checks.real("x", np.float32(0.5), 0, 1) == 0.5 and type(checks.real("x", 3)) is float
    assert checks.real("x", 0.0, 0.0, 1.0) == 0.0  # closed ends are allowed
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got 0"):
        checks.real("x", 0, 0, 1, lo_open=True)
    with pytest.raises(ValueError, match=r"y must be < 1"):
        checks.real("y", 1.0, hi=1, hi_open=True)
    with pytest.raises(ValueError, match="finite"):
        checks.real("x", math.nan, 0, 1)
    for bad in (True, "0.5", None, 1j):
        with pytest.raises(TypeError, match="x must be a number"):
            checks.real("x", bad)


def test_integer_and_flag():
    assert checks.integer("n", np.int64(4), lo=1) == 4 and type(checks.integer("n", np.int64(4))) is int
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        checks.integer("n", 0, lo=1)
    with pytest.raises(ValueError, match=r"n must be in \[0, 3\]"):
        checks.integer("n", 4, 0, 3)
    for bad in (2.0, False, "2"):
        with pytest.raises(TypeError, match="n must be an int"):
            checks.integer("n", bad)
    assert checks.flag("f", True) is True
    with pytest.raises(TypeError, match="f must be True or False"):
        checks.flag("f", 1)


def test_configs_name_the_bad_field():
    from tokensparse.train import DropConfig, TrainConfig

    with pytest.raises(ValueError, match="keep_min"):
        DropConfig(keep_min=0.6, keep_max=0.5)
    with pytest.raises(ValueError, match="p_full"):
        DropConfig(p_full=1.5)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)
    with pytest.raises(TypeError, match="batch_size"):
        TrainConfig(batch_size=8.0)
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(ema=1.5)
    with pytest.raises(ValueError, match=r"ema must be in \[0.0, 1.0\), got 1"):  # 1: the EMA weights never moved
        TrainConfig(ema=1)
    assert TrainConfig(ema=0.0).ema == 0.0


def test_real_calls_an_int_too_large_for_a_float_not_finite():
    with pytest.raises(ValueError, match="x must be finite"):  # was an OverflowError naming nothing
        checks.real("x", 10**400)
    assert checks.real("x", 10**300) == 1e300


def test_zero_d_tensors_read_as_their_scalars():
    import torch

    # torch.tensor(0.25) was a TypeError ("must be a number, got Tensor") where np.float32(0.25) was accepted
    assert checks.real("x", torch.tensor(0.25)) == 0.25 and type(checks.real("x", torch.tensor(3))) is float
    assert checks.integer("n", torch.tensor(4, dtype=torch.int32), lo=1) == 4
    assert type(checks.integer("n", torch.tensor(4))) is int
    assert checks.flag("f", torch.tensor(True)) is True
    with pytest.raises(ValueError, match=r"x must be in \(0, 1\], got 1.5"):
        checks.real("x", torch.tensor(1.5), 0, 1, lo_open=True)
    with pytest.raises(ValueError, match="x must be finite"):
        checks.real("x", torch.tensor(float("nan")))
    for bad, got in ((torch.tensor([0.25]), r"tensor of shape \(1,\) and dtype torch.float32"),
                     (torch.tensor(True), "dtype torch.bool"), (torch.tensor(1j), "dtype torch.complex64"),
                     (torch.tensor(0.25, device="meta"), "meta tensor")):
        with pytest.raises(TypeError, match=f"x must be a number, got .*{got}"):
            checks.real("x", bad)
    for bad in (torch.tensor(2.0), torch.tensor(True), torch.tensor([2])):
        with pytest.raises(TypeError, match="n must be an int, got a"):
            checks.integer("n", bad)
    for bad in (torch.tensor(1), torch.tensor([True])):
        with pytest.raises(TypeError, match="f must be True or False, got a"):
            checks.flag("f", bad)


def test_configs_take_zero_d_tensors_for_numbers():
    import torch

    import tokensparse as ts

    t = torch.tensor
    cfg = ts.SparseContextConfig(keep=t(0.25), mass=t(0.5), min_keep=t(0.125), seed=t(3), cache=t(True))
    assert (cfg.keep, cfg.mass, cfg.min_keep, cfg.seed, cfg.cache) == (0.25, 0.5, 0.125, 3, True)
    assert type(cfg.keep) is float and type(cfg.seed) is int
    assert ts.SparseContextConfig(selector="uniform", count=t(5)).count == 5
    merge = ts.TokenMergingConfig(ratio=t(0.5), recompute_every=t(5), recompute_steps=t([0, 3]), max_downsample=t(2))
    assert (merge.ratio, merge.recompute_every, merge.recompute_steps, merge.max_downsample) == (0.5, 5, (0, 3), 2)
    assert ts.TokenMergingConfig(threshold=t(0.75)).threshold == 0.75
    sg = ts.SparseGuidanceConfig(scale=t(2.0), strong=t(0.5), weak=t(0.75), weak_keep=t(0.5), null_weak=t(False))
    assert (sg.scale, sg.strong, sg.weak, sg.weak_keep, sg.null_weak) == (2.0, 0.5, 0.75, 0.5, False)
    assert ts.CFGConfig(scale=t(3.0), interval=(t(0.0), t(0.5))).scale == 3.0
    with pytest.raises(TypeError, match=r"keep must be a number, got a tensor of shape \(2,\)"):
        ts.SparseContextConfig(keep=t([0.25, 0.5]))
    with pytest.raises(TypeError, match="count must be an int, got a tensor of shape \\(\\) and dtype torch.float32"):
        ts.SparseContextConfig(count=t(5.0))


def test_zero_d_numpy_arrays_read_as_their_scalars_like_zero_d_tensors():
    import torch

    import tokensparse as ts

    # np.array(1) was "must be an int, got ndarray" where torch.tensor(1) and np.int64(1) were accepted
    assert checks.integer("n", np.array(4), lo=1) == 4 and type(checks.integer("n", np.array(4))) is int
    assert checks.seed("seed", np.array(1, dtype=np.uint8)) == 1
    assert checks.real("x", np.array(0.25)) == 0.25 and type(checks.real("x", np.array(3))) is float
    assert checks.flag("f", np.array(True)) is True
    assert ts.SparseContextConfig(keep=np.array(0.25), seed=np.array(3), cache=np.array(False)).seed == 3
    assert ts.SparseContextConfig(keep=np.array(0.25)) == ts.SparseContextConfig(keep=torch.tensor(0.25))
    with pytest.raises(ValueError, match="x must be finite"):
        checks.real("x", np.array(np.inf))
    with pytest.raises(ValueError, match=r"seed must be in \[0, "):
        checks.seed("seed", np.array(-1))
    # the dtype decides as for numpy scalars: no float for an int, no number for a flag, no bool for a number
    for check, bad, got in ((checks.integer, np.array(2.0), "an int, got float64"),
                            (checks.flag, np.array(1), "True or False, got int64"),
                            (checks.real, np.array(True), "a number, got bool"),
                            (checks.real, np.array(1j), "a number, got complex128"),
                            (checks.real, np.array([0.5]), r"a number, got a numpy array of shape \(1,\) and dtype "
                                                           "float64"),
                            (checks.integer, np.zeros((2, 2), dtype=int), r"an int, got a numpy array of shape "
                                                                          r"\(2, 2\)")):
        with pytest.raises(TypeError, match=f"v must be {got}"):
            check("v", bad)
    assert checks.scalar(np.array(3)) == 3 and checks.scalar(torch.tensor(2.5)) == 2.5
    assert checks.scalar([1]) == [1] and checks.scalar(torch.tensor([1])).shape == (1,)
