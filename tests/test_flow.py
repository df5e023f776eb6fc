import pytest
import torch

from tokensparse.flow import euler, flow_loss, interpolate, noise_like, timesteps, velocity


def test_path_endpoints_and_velocity():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert torch.equal(interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(2)), eps)
    t = torch.tensor([0.3, 0.7])
    assert torch.allclose(interpolate(x0, eps, t + 1e-3) - interpolate(x0, eps, t), 1e-3 * velocity(x0, eps),
                          atol=1e-5)


def test_euler_with_exact_velocity_recovers_data():
    x0, eps = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    out = euler(lambda x, t: velocity(x0, eps), eps.clone(), timesteps(7, shift=3.0))
    assert torch.allclose(out, x0, atol=1e-5)
    assert float(flow_loss(lambda x, t: velocity(x0, eps), x0, eps, torch.rand(1))) == 0.0


def test_timesteps_monotone_and_shifted():
    ts_ = timesteps(10, shift=3.0)
    assert ts_[0] == 1 and ts_[-1] == 0 and bool((ts_[1:] < ts_[:-1]).all())
    assert float(ts_[5]) > 0.5  # shift spends more steps near noise


def test_noise_is_per_sample():
    a = noise_like((2, 3, 4, 4), [5, 6])
    b = noise_like((1, 3, 4, 4), [6])
    assert torch.equal(a[1], b[0])


@pytest.mark.parametrize("kwargs, err", [
    (dict(steps=0), ValueError), (dict(steps=2.5), TypeError), (dict(steps=True), TypeError),
    (dict(steps=3, shift=0.0), ValueError), (dict(steps=3, shift=-1.0), ValueError),
    (dict(steps=3, shift=float("nan")), ValueError), (dict(steps=3, shift=float("inf")), ValueError),
])
def test_timesteps_refuse_bad_values(kwargs, err):
    with pytest.raises(err, match="steps" if "shift" not in kwargs else "shift"):
        timesteps(**kwargs)


def test_noise_seeds_must_be_ints_a_generator_takes():
    for bad, err in ((1.7, TypeError), (-1, ValueError), (2**64, ValueError)):
        with pytest.raises(err, match="seed"):
            noise_like((1, 1, 2, 2), [bad])
    assert noise_like((1, 1, 2, 2), [2**63]).shape == (1, 1, 2, 2)  # seed + i past 2**63 - 1 is fine


def test_timesteps_stay_in_zero_one_for_every_shift():
    for shift in (1.32, 1.57, 2.14, 0.2, 0.4, 16.98, 1e-4, 1e4):  # float32 rounding put t[0] at 1.0000001
        ts_ = timesteps(28, shift=shift)
        assert ts_[0] == 1 and ts_[-1] == 0 and bool(((ts_ >= 0) & (ts_ <= 1)).all()), shift


def test_euler_continues_from_what_the_callback_leaves_or_returns():
    # like diffusers' callback_on_step_end (its returned "latents"): the callback may steer the sample
    timesteps_ = timesteps(3)
    x = torch.ones(1, 1, 2, 2)

    def denoise(x, t):
        return torch.zeros_like(x)

    assert torch.equal(euler(denoise, x.clone(), timesteps_, lambda i, s: s.mul_(2)), 8 * x)  # in place
    assert torch.equal(euler(denoise, x.clone(), timesteps_, lambda i, s: s * 2), 8 * x)  # returned
    assert euler(denoise, x.clone(), timesteps_, lambda i, s: (s * 2).double()).dtype == torch.float32
    seen = []
    assert torch.equal(euler(denoise, x.clone(), timesteps_, lambda i, s: seen.append(s) or True), x)  # ignored
    assert len(seen) == 3
    with pytest.raises(ValueError, match=r"callback returned a tensor of shape \(1, 4\) after step 0"):
        euler(denoise, x.clone(), timesteps_, lambda i, s: s.reshape(1, 4))
    with pytest.raises(TypeError, match="callback returned a torch.int64 tensor"):
        euler(denoise, x.clone(), timesteps_, lambda i, s: s.long())


def test_a_step_count_past_max_steps_is_named():
    # steps=10**12 failed allocating its times ("DefaultCPUAllocator: can't allocate memory"), naming no argument
    with pytest.raises(ValueError, match=r"steps must be in \[1, 100000\], got 1000000000000"):
        timesteps(10**12)
    from tokensparse.flow import MAX_STEPS

    assert timesteps(MAX_STEPS).shape == (MAX_STEPS + 1,)
