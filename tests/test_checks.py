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


def test_real_calls_an_int_too_large_for_a_float_not_finite():
    with pytest.raises(ValueError, match="x must be finite"):  # was an OverflowError naming nothing
        checks.real("x", 10**400)
    assert checks.real("x", 10**300) == 1e300
