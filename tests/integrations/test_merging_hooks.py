"""Token merging wired into a tiny RefDiT and a tiny diffusers UNet: the apply/remove contract, caching."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

import tokensparse as ts
from tokensparse.generation import begin_generation
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging
from tokensparse.merging import TokenMergingConfig


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared, loaded 2-core machine two OpenMP threads run these tiny models ~15x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _randomize(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-zero init would make every block the identity
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


@pytest.fixture(scope="module")
def refdit() -> ts.RefDiT:
    return _randomize(ts.build_model("refdit-tiny", image_size=32))  # 8x8 target tokens


def _inputs(model: ts.RefDiT, seed: int = 0, batch: int = 2) -> tuple:
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    x = torch.randn(batch, 3, s, s, generator=g)
    refs = [torch.rand(batch, 3, s, s, generator=g) * 2 - 1]
    ids = torch.zeros(batch, 3, dtype=torch.long)
    return x, torch.full((batch,), 0.6), refs, ids


def _attn_lengths(model: nn.Module, attr: str = "attn") -> tuple[list[int], list]:
    """Record the token count each block's ``attr`` sees (registered after merging hooks: sees merged)."""
    seen: list[int] = []
    handles = [getattr(b, attr).register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
               for b in model.blocks]
    return seen, handles


# ---------------------------------------------------------------------------------------------- RefDiT


@torch.no_grad()
def test_refdit_identity_remove_and_replace(refdit: ts.RefDiT) -> None:
    args = _inputs(refdit)
    dense = refdit(*args)
    for identity in (TokenMergingConfig(), TokenMergingConfig(threshold=1.5),
                     TokenMergingConfig(threshold=float("inf"))):
        apply_token_merging(refdit, identity)
        assert torch.equal(refdit(*args), dense)
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5))
    merged = refdit(*args)
    assert not torch.equal(merged, dense)
    n_hooks = len(merging_state(refdit).handles)
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5))  # replaces, never stacks
    assert len(merging_state(refdit).handles) == n_hooks
    assert torch.equal(refdit(*args), merged)
    remove_token_merging(refdit)
    assert merging_state(refdit) is None
    assert torch.equal(refdit(*args), dense)
    remove_token_merging(refdit)  # no-op


@torch.no_grad()
def test_refdit_merges_target_tokens_only(refdit: ts.RefDiT) -> None:
    args = _inputs(refdit)
    mlp_seen: list[tuple[str, int]] = []
    handles = [b.mlp.register_forward_pre_hook(lambda m, a, k: mlp_seen.append((k["role"], a[0].shape[1])),
                                               with_kwargs=True) for b in refdit.blocks]
    refdit(*args)
    dense_ctx = {n for role, n in mlp_seen if role == "context"}
    mlp_seen.clear()
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5))
    seen, more = _attn_lengths(refdit)  # registered after the merging hooks: sees merged inputs
    handles += more
    for b in refdit.blocks:  # re-register so the mlp recorder runs after the merging pre-hook
        handles.append(b.mlp.register_forward_pre_hook(
            lambda m, a, k: mlp_seen.append(("merged-" + k["role"], a[0].shape[1])), with_kwargs=True))
    try:
        refdit(*args)
    finally:
        for h in handles:
            h.remove()
        remove_token_merging(refdit)
    assert seen == [32] * refdit.config.depth  # 64 target tokens, half merged away
    merged = {(role, n) for role, n in mlp_seen if role.startswith("merged-")}
    assert merged == {("merged-target", 32)} | {("merged-context", n) for n in dense_ctx}


@torch.no_grad()
def test_refdit_mlp_or_attn_only(refdit: ts.RefDiT) -> None:
    args = _inputs(refdit)
    dense = refdit(*args)
    outs = []
    for cfg in (TokenMergingConfig(ratio=0.5, merge_mlp=False), TokenMergingConfig(ratio=0.5, merge_attn=False)):
        apply_token_merging(refdit, cfg)
        outs.append(refdit(*args))
        remove_token_merging(refdit)
    assert not torch.equal(outs[0], dense) and not torch.equal(outs[1], dense)
    assert not torch.equal(outs[0], outs[1])


@torch.no_grad()
def test_refdit_adaptive_merges_more_at_lower_threshold(refdit: ts.RefDiT) -> None:
    args = _inputs(refdit)
    counts = []
    for thr in (0.95, 0.5, -1.0):
        apply_token_merging(refdit, TokenMergingConfig(threshold=thr))
        refdit(*args)
        counts.append(merging_state(refdit).merged_tokens)
        remove_token_merging(refdit)
    assert counts[0] <= counts[1] <= counts[2] == 48 * refdit.config.depth  # all sources of 64 tokens


@torch.no_grad()
def test_refdit_center_reaches_the_matching(refdit: ts.RefDiT, monkeypatch: pytest.MonkeyPatch) -> None:
    """``center`` goes from the config to every matching the hooks compute."""
    import tokensparse.integrations.merging_core as hooks

    seen: list[bool] = []
    real = hooks.match_positions  # what the hooks call (match with the destinations' positions kept)
    monkeypatch.setattr(hooks, "match_positions", lambda *a, **kw: seen.append(kw["center"]) or real(*a, **kw))
    args = _inputs(refdit)
    for center in (True, False):
        apply_token_merging(refdit, TokenMergingConfig(ratio=0.5, center=center))
        refdit(*args)
        remove_token_merging(refdit)
    depth = refdit.config.depth
    assert seen == [True] * depth + [False] * depth


@torch.no_grad()
def test_refdit_cache_over_generate(refdit: ts.RefDiT) -> None:
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5, recompute_every=3))
    state = merging_state(refdit)
    ts.generate(refdit, [img], "", steps=5)
    depth = refdit.config.depth
    assert state.cache.misses == 2 * depth  # steps 0 and 3 compute; step 0's entry is hit at steps 1 and 2
    assert state.cache.hits == 3 * depth
    remove_token_merging(refdit)


@torch.no_grad()
def test_refdit_new_generation_never_reuses_matchings(refdit: ts.RefDiT) -> None:
    a = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    b = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    cfg = TokenMergingConfig(ratio=0.5, recompute_every=100)
    apply_token_merging(refdit, cfg)
    ts.generate(refdit, [a], "", steps=3, seed=5)
    second = ts.generate(refdit, [b], "", steps=3, seed=6)
    apply_token_merging(refdit, cfg)  # fresh state
    fresh = ts.generate(refdit, [b], "", steps=3, seed=6)
    remove_token_merging(refdit)
    assert torch.equal(second, fresh)


@torch.no_grad()
def test_bare_module_steps_from_timesteps(refdit: ts.RefDiT) -> None:
    x, _, refs, ids = _inputs(refdit, batch=1)
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5, recompute_every=100))
    state = merging_state(refdit)
    first = None
    for gen in range(2):
        for i, t in enumerate((1.0, 0.5, 0.5, 0.2)):  # the repeated 0.5 is a second (guidance) pass
            refdit(x + gen, torch.tensor([t]), refs, ids + 1 if i == 2 else ids)  # (another prompt)
            if gen == 0 and i == 0:
                first = state.cache._entries[("blocks.0", 0)][2]
        # timestep rose: generation 2 got a fresh cache; 2 passes per layer cached
        assert state.cache.misses == 2 * refdit.config.depth
    assert state.cache._entries[("blocks.0", 0)][2] is not first
    begin_generation(refdit)
    refdit(x, torch.tensor([0.1]), refs, ids)  # explicit boundary: even a lower t starts afresh
    assert state.cache.misses == refdit.config.depth
    remove_token_merging(refdit)


@torch.no_grad()
def test_composes_with_sparse_context(refdit: ts.RefDiT) -> None:
    args = _inputs(refdit)
    dense = refdit(*args)
    ts.apply_sparse_context(refdit, ts.SparseContextConfig(keep=0.5))
    sparse = refdit(*args)
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5))
    both = refdit(*args)
    remove_token_merging(refdit)
    assert torch.equal(refdit(*args), sparse)
    ts.remove_sparse_context(refdit)
    assert torch.isfinite(both).all() and not torch.equal(both, sparse)
    assert torch.equal(refdit(*args), dense)


def test_merging_on_the_kv_cache_is_exact() -> None:
    """Merging acts on target tokens only, so with the reference K/V cache it gives what it gives without."""
    model = _randomize(ts.build_model("refdit-tiny", image_size=32, ref_attends_target=False))
    g = torch.Generator().manual_seed(3)
    refs = [torch.rand(3, 32, 32, generator=g)]
    outs = {}
    for cache in (False, True):
        ts.apply_sparse_context(model, ts.SparseContextConfig(keep=0.5, selector="uniform", cache=cache))
        apply_token_merging(model, TokenMergingConfig(threshold=0.5, recompute_every=2))
        outs[cache] = ts.generate(model, refs, "red", steps=4, seed=0)
        assert merging_state(model).merged_tokens > 0
        remove_token_merging(model)
    ts.remove_sparse_context(model)
    assert torch.equal(outs[False], outs[True])


def test_bad_targets_and_configs(refdit: ts.RefDiT) -> None:
    for bad in (nn.Linear(2, 2), object(), "refdit"):
        with pytest.raises(TypeError, match="RefDiT"):
            apply_token_merging(bad, TokenMergingConfig(ratio=0.5))
        with pytest.raises(TypeError, match="remove_token_merging expected"):  # as remove_sparse_context
            remove_token_merging(bad)
    holder = type("SomePipeline", (), {"transformer": nn.Linear(2, 2)})()  # a pipeline whose model merging lacks
    with pytest.raises(TypeError, match="got SomePipeline, whose model is a Linear"):
        apply_token_merging(holder, TokenMergingConfig(ratio=0.5))
    unloaded = type("SomeModularPipeline", (), {"transformer": None})()  # its transformer not loaded yet
    with pytest.raises(TypeError, match=r"got SomeModularPipeline, whose \.transformer is None \(not loaded"):
        apply_token_merging(unloaded, TokenMergingConfig(ratio=0.5))
    assert remove_token_merging(refdit) is refdit  # never applied: a no-op
    with pytest.raises(TypeError, match="TokenMergingConfig"):
        apply_token_merging(refdit, {"ratio": 0.5})


@torch.no_grad()
def test_a_config_that_merges_no_sublayer_of_the_model_is_refused(refdit: ts.RefDiT) -> None:
    x, t, refs, p = _inputs(refdit)
    dense = refdit(x, t, refs, p)
    apply_token_merging(refdit, TokenMergingConfig(ratio=0.5))
    with pytest.raises(ValueError, match="merges no sublayer of RefDiT.*merge_cross"):  # RefDiT has no cross-attn
        apply_token_merging(refdit, TokenMergingConfig(ratio=0.5, merge_attn=False, merge_mlp=False, merge_cross=True))
    state = merging_state(refdit)
    assert state is not None and state.cfg.ratio == 0.5  # a failed apply leaves the earlier config in place
    remove_token_merging(refdit)
    assert torch.equal(refdit(x, t, refs, p), dense)


# ------------------------------------------------------------------------------------------ diffusers UNet

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    )
    return model.eval()


def _unet_inputs(seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(2, 5, 16, generator=g)


def _blocks(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]


@torch.no_grad()
def test_unet_identity_remove_replace(unet: nn.Module) -> None:
    args = _unet_inputs()
    dense = unet(*args).sample
    apply_token_merging(unet, TokenMergingConfig())
    assert torch.equal(unet(*args).sample, dense)
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5))
    merged = unet(*args).sample
    assert not torch.equal(merged, dense)
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5))
    assert torch.equal(unet(*args).sample, merged)
    remove_token_merging(unet)
    assert torch.equal(unet(*args).sample, dense)


@torch.no_grad()
def test_unet_levels_and_sublayers(unet: nn.Module) -> None:
    args = _unet_inputs()
    seen: dict[str, list[int]] = {"attn1": [], "attn2": [], "ff": []}
    for cfg, expect in (
        (TokenMergingConfig(ratio=0.5), {"attn1": 128, "attn2": 256, "ff": 128}),
        (TokenMergingConfig(ratio=0.5, merge_cross=True, merge_mlp=False), {"attn1": 128, "attn2": 128, "ff": 256}),
    ):
        apply_token_merging(unet, cfg)
        handles = [getattr(b, name).register_forward_pre_hook(
            lambda m, a, k, name=name: seen[name].append(a[0].shape[1] if a else k["hidden_states"].shape[1]),
            with_kwargs=True) for b in _blocks(unet) for name in seen]
        try:
            unet(*args)
        finally:
            for h in handles:
                h.remove()
        for name, n in expect.items():
            # top level: 16x16 = 256 tokens; the 8x8 level is left alone (max_downsample=1)
            assert set(seen[name]) == {n, 64}, name
            seen[name].clear()
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5, max_downsample=2))
    handles = [b.attn1.register_forward_pre_hook(lambda m, a: seen["attn1"].append(a[0].shape[1]))
               for b in _blocks(unet)]
    unet(*args)
    for h in handles:
        h.remove()
    remove_token_merging(unet)
    assert sorted(set(seen["attn1"])) == [32, 128]


class _Scheduler:
    def __init__(self) -> None:
        self.timesteps = torch.tensor([900, 600, 300])

    def set_timesteps(self, n: int) -> None:
        self.timesteps = torch.linspace(900, 100, n).long()


class _Pipe:
    """The part of a diffusers pipeline token merging uses: ``.unet`` and ``.scheduler.set_timesteps``."""

    def __init__(self, unet: nn.Module) -> None:
        self.unet, self.scheduler = unet, _Scheduler()

    def __call__(self, sample: torch.Tensor, ctx: torch.Tensor, steps: int = 3) -> torch.Tensor:
        self.scheduler.set_timesteps(steps)
        for t in self.scheduler.timesteps:
            sample = sample - 0.1 * self.unet(sample, t, ctx).sample
        return sample


@torch.no_grad()
def test_unet_pipeline_generations(unet: nn.Module) -> None:
    x, _, ctx = _unet_inputs()
    pipe = _Pipe(unet)
    dense = pipe(x, ctx)
    cfg = TokenMergingConfig(threshold=0.3, recompute_every=2)
    apply_token_merging(pipe, cfg)
    state = merging_state(pipe)
    assert state is merging_state(unet)
    pipe(x + 1, ctx, steps=4)
    assert state.cache.misses == 3 * 2  # 3 top-level blocks (1 down, 2 up), steps 0 and 2
    out = pipe(x, ctx, steps=4)
    apply_token_merging(pipe, cfg)
    assert torch.equal(pipe(x, ctx, steps=4), out)  # nothing carried over from the x + 1 generation
    remove_token_merging(pipe)
    assert "set_timesteps" not in pipe.scheduler.__dict__  # scheduler unwrapped
    assert torch.equal(pipe(x, ctx), dense)


@torch.no_grad()
def test_begin_generation_separates_one_step_calls_on_a_bare_model(unet: nn.Module) -> None:
    # one-step use of a bare UNet: calls at one timestep are passes of one step (guidance), which draw the step's
    # destinations and match their own tokens, so a pass merges as on a fresh model whatever passes came before;
    # a caller-marked new generation too
    (xa, t, ctx), (xb, _, _) = _unet_inputs(0), _unet_inputs(1)
    cfg = TokenMergingConfig(ratio=0.5)
    apply_token_merging(unet, cfg)
    fresh = unet(xb, t, ctx).sample
    apply_token_merging(unet, cfg)
    unet(xa, t, ctx)
    assert torch.equal(unet(xb, t, ctx).sample, fresh)  # a second pass of the step (was: other draws than alone)
    unet(xa, t, ctx)
    ts.begin_generation(unet)
    assert torch.equal(unet(xb, t, ctx).sample, fresh)
    remove_token_merging(unet)
    assert not torch.equal(unet(xb, t, ctx).sample, fresh)  # it did merge


@torch.no_grad()
def test_swapped_scheduler_still_starts_generations(unet: nn.Module) -> None:
    """``pipe.scheduler = ...`` after apply: one-step calls at one timestep still get a fresh cache each."""
    x, _, ctx = _unet_inputs()
    pipe = _Pipe(unet)
    results = []
    for inputs in ([x], [x + 1, x]):
        apply_token_merging(pipe, TokenMergingConfig(ratio=0.5, recompute_every=4))
        pipe.scheduler = _Scheduler()  # not wrapped by apply
        results.append([pipe(sample, ctx, steps=1) for sample in inputs][-1])
        assert "set_timesteps" in pipe.scheduler.__dict__  # the new scheduler is wrapped now
        remove_token_merging(pipe)
    assert torch.equal(results[1], results[0])  # the x + 1 call's matchings were not reused for x


def test_config_snapshot_and_numpy_scalars(unet: nn.Module) -> None:
    import numpy as np

    cfg = TokenMergingConfig(ratio=np.float32(0.5), recompute_every=np.int64(2), seed=np.int64(1))
    assert type(cfg.ratio) is float and type(cfg.recompute_every) is int and type(cfg.seed) is int
    apply_token_merging(unet, cfg)
    cfg.ratio = 0.0  # editing the caller's object after apply changes nothing
    assert merging_state(unet).cfg.ratio == 0.5
    remove_token_merging(unet)


@torch.no_grad()
def test_unet_without_top_level_attention_warns(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    torch.manual_seed(0)
    sdxl_like = diffusers.UNet2DConditionModel(  # no attention at the top level, as in SDXL
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
    ).eval()
    args = _unet_inputs()
    with caplog.at_level(logging.WARNING, logger="tokensparse.integrations.merging_hooks"):
        apply_token_merging(sdxl_like, TokenMergingConfig(ratio=0.5))
        sdxl_like(*args)
        sdxl_like(*args)
        assert caplog.text.count("merged nothing") == 1 and "max_downsample=2" in caplog.text
        caplog.clear()
        apply_token_merging(sdxl_like, TokenMergingConfig(ratio=0.5, max_downsample=2))
        sdxl_like(*args)
        assert "merged nothing" not in caplog.text and merging_state(sdxl_like).merged_tokens > 0
    remove_token_merging(sdxl_like)


@torch.no_grad()
def test_pixart_merges_on_its_patch_grid_and_reads_positional_timesteps() -> None:
    """PixArt patchifies 2x2: its token grid is the latent's / 2, which max_downsample=1 must merge."""
    torch.manual_seed(0)
    pix = _randomize(diffusers.PixArtTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, out_channels=8, cross_attention_dim=16, norm_num_groups=4, use_additional_conditions=False,
    ), std=0.05)
    g = torch.Generator().manual_seed(0)
    x, ehs = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 5, 16, generator=g)
    cond = {"resolution": None, "aspect_ratio": None}
    dense = pix(x, ehs, torch.tensor([500, 500]), added_cond_kwargs=cond).sample
    apply_token_merging(pix, TokenMergingConfig(ratio=0.5))
    seen = []
    handles = [b.attn1.register_forward_pre_hook(lambda m, a, k: seen.append((a or (k["hidden_states"],))[0].shape[1]),
                                                 with_kwargs=True) for b in _blocks(pix)]
    merged = pix(x, ehs, torch.tensor([700, 700]), added_cond_kwargs=cond).sample  # timestep given positionally
    for h in handles:
        h.remove()
    assert set(seen) == {24} and not torch.equal(merged, dense)  # 8x6 = 48 tokens, half merged
    assert merging_state(pix).tracker._last_t == 700.0
    remove_token_merging(pix)
    assert torch.equal(pix(x, ehs, torch.tensor([500, 500]), added_cond_kwargs=cond).sample, dense)


# ------------------------------------------------------------------------------------------- FLUX / FLUX.2


def _flux_models() -> list[tuple[str, nn.Module]]:
    from diffusers import FluxTransformer2DModel
    from diffusers.models.transformers.transformer_flux2 import Flux2Transformer2DModel

    torch.manual_seed(0)
    flux = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                  pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))
    flux2 = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                    axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
    return [("flux", _randomize(flux, std=0.05)), ("flux2", _randomize(flux2, std=0.05))]


def _flux_inputs(kind: str, h: int = 8, w: int = 8) -> dict:
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols] + ([zeros] if kind == "flux2" else []), -1).float()
    kw = {"hidden_states": torch.randn(2, h * w, 8, generator=g),
          "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
          "timestep": torch.tensor([0.7, 0.7]), "img_ids": img_ids, "txt_ids": torch.zeros(5, img_ids.shape[1])}
    if kind == "flux":
        kw["pooled_projections"] = torch.randn(2, 8, generator=g)
    return kw


@torch.no_grad()
def test_flux_double_stream_blocks() -> None:
    for kind, model in _flux_models():
        kw = _flux_inputs(kind)
        dense = model(**kw).sample
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        seen: list[int] = []
        handles = [b.attn.register_forward_pre_hook(lambda m, a, k, seen=seen: seen.append(
            k["hidden_states"].shape[1]), with_kwargs=True) for b in model.transformer_blocks]
        merged = model(**kw).sample
        for h in handles:
            h.remove()
        assert seen == [32, 32], kind  # 64 image tokens, half merged away, in both double-stream blocks
        for only, n_single in ((dict(merge_attn=False), 5 + 64), (dict(merge_mlp=False), 5 + 32)):
            apply_token_merging(model, TokenMergingConfig(ratio=0.5, **only))
            assert _first_attn_input(model, kw)[2].shape[1] == n_single, (kind, only)  # text + image
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        assert torch.isfinite(merged).all() and not torch.equal(merged, dense), kind
        remove_token_merging(model)
        assert torch.equal(model(**kw).sample, dense), kind


def _first_attn_input(model: nn.Module, kw: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(output, attention inputs of the first double-stream block (image stream) and of the first
    single-stream block (text + image)) of one call."""
    box: list[Tensor] = []
    handles = [blocks[0].attn.register_forward_pre_hook(lambda m, a, k: box.append(k["hidden_states"]),
                                                        with_kwargs=True)
               for blocks in (model.transformer_blocks, model.single_transformer_blocks)]
    out = model(**kw).sample
    for h in handles:
        h.remove()
    return out, box[0], box[1]


@torch.no_grad()
@pytest.mark.parametrize("refs_first", [False, True], ids=["refs-after", "refs-before"])
def test_flux_merges_the_target_grid_and_passes_reference_tokens(refs_first: bool) -> None:
    # FLUX.1 Kontext / FLUX.2 append reference tokens (other T ids) after the target; FLUX.2's K/V-extract
    # call puts them first. Either way only the target grid merges; reference tokens pass unmerged.
    for kind, model in _flux_models():
        kw = _flux_inputs(kind)
        g = torch.Generator().manual_seed(1)
        ref_hs, ref_ids = torch.randn(2, 48, 8, generator=g), _flux_inputs(kind, 6, 8)["img_ids"].clone()
        ref_ids[:, 0] = 10
        parts = [(ref_hs, ref_ids), (kw["hidden_states"], kw["img_ids"])]
        if not refs_first:
            parts.reverse()
        kw_ref = dict(kw, hidden_states=torch.cat([p[0] for p in parts], 1),
                      img_ids=torch.cat([p[1] for p in parts], 0))
        dense, dense_in, _ = _first_attn_input(model, kw_ref)
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        merged, merged_in, single_in = _first_attn_input(model, kw_ref)
        assert merged_in.shape[1] == 32 + 48, kind  # 64 target tokens, half merged; 48 reference tokens
        assert single_in.shape[1] == 5 + 32 + 48, kind  # single-stream: 5 text tokens first
        ref_rows = slice(0, 48) if refs_first else slice(32, None)
        dense_ref_rows = slice(0, 48) if refs_first else slice(64, None)
        assert torch.equal(merged_in[:, ref_rows], dense_in[:, dense_ref_rows]), kind
        assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
        assert merging_state(model).merged_tokens > 0
        remove_token_merging(model)
        assert torch.equal(model(**kw_ref).sample, dense), kind


@torch.no_grad()
def test_flux_target_not_one_grid_is_not_merged(caplog: pytest.LogCaptureFixture) -> None:
    kind, model = _flux_models()[0]
    kw = _flux_inputs(kind)
    ids = kw["img_ids"].clone()
    ids[::2, 0] = 1  # target and reference tokens interleaved: no leading or trailing target grid
    kw = dict(kw, img_ids=ids)
    dense = model(**kw).sample
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(model(**kw).sample, dense)
    assert "merged nothing" in caplog.text
    remove_token_merging(model)


@torch.no_grad()
def test_flux_ip_adapter_output_is_unmerged_too() -> None:
    # FLUX.1's IP-Adapter processor returns a third, image-stream output: it is unmerged like the first
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    kind, model = _flux_models()[0]
    for b in model.transformer_blocks:
        b.attn.set_processor(FluxIPAdapterAttnProcessor(16, 12, num_tokens=(4,)))
    kw = _flux_inputs(kind)
    ip = torch.randn(2, 4, 12, generator=torch.Generator().manual_seed(0))
    kw["joint_attention_kwargs"] = {"ip_hidden_states": [ip]}
    dense = model(**kw).sample
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    merged = model(**kw).sample
    assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
    remove_token_merging(model)
    assert torch.equal(model(**kw).sample, dense)


@torch.no_grad()
def test_identical_calls_at_one_timestep_repeat_their_output_and_the_cache_stays_bounded() -> None:
    # a fixed-timestep loop (evaluation, timing) on a bare transformer: identical calls give identical outputs,
    # and however many distinct calls share a timestep, the cache keeps at most MAX_PASSES passes per layer
    from tokensparse.merging import MAX_PASSES

    kind, model = _flux_models()[1]
    kw = _flux_inputs(kind)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    first = model(**kw).sample
    other = model(**dict(kw, hidden_states=kw["hidden_states"] + 1)).sample  # another pass at this timestep
    assert torch.equal(model(**kw).sample, first) and not torch.equal(other, first)
    for i in range(3 * MAX_PASSES):
        model(**dict(kw, hidden_states=kw["hidden_states"] * (1 + i / 100)))
    n_layers = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    assert len(merging_state(model).cache) <= n_layers * MAX_PASSES
    remove_token_merging(model)


@torch.no_grad()
def test_sd3_joint_blocks_merge_the_image_side() -> None:
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    sd3 = _randomize(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,)).eval(), std=0.05)  # SD3.5-style attn2 in block 0
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(2, 4, 16, 12, generator=g),
          "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
          "pooled_projections": torch.randn(2, 8, generator=g), "timestep": torch.tensor([500, 500])}
    dense = sd3(**kw).sample
    apply_token_merging(sd3, TokenMergingConfig(ratio=0.5))
    seen: list[tuple[str, int]] = []
    for i, blk in enumerate(sd3.transformer_blocks):
        for name in ("attn", "attn2", "ff"):
            if getattr(blk, name, None) is not None:
                getattr(blk, name).register_forward_pre_hook(lambda m, a, k, n=f"{i}.{name}": seen.append(
                    (n, (a or (k["hidden_states"],))[0].shape[1])), with_kwargs=True)
    merged = sd3(**kw).sample
    assert seen == [("0.attn", 24), ("0.attn2", 24), ("0.ff", 24), ("1.attn", 24), ("1.ff", 24)]  # 8x6 -> 24
    assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
    remove_token_merging(sd3)
    assert torch.equal(sd3(**kw).sample, dense)


@torch.no_grad()
def test_a_model_called_without_a_latent_grid_says_so(caplog: pytest.LogCaptureFixture) -> None:
    # a model of BasicTransformerBlocks over (B, D) embeddings (diffusers' PriorTransformer is refused up front)
    class EmbeddingMixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from diffusers.models.attention import BasicTransformerBlock

            self.block = BasicTransformerBlock(8, 2, 4)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            return self.block(hidden_states[:, None].expand(-1, 4, -1)).mean(1)

    torch.manual_seed(0)
    model = EmbeddingMixer().eval()
    x = torch.randn(2, 8)
    dense = model(x)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING):
        out = model(x)
        model(x)
    assert torch.equal(out, dense) and merging_state(model).merged_tokens == 0
    assert caplog.text.count("(B, C, H, W) latent") == 1 and "a 2-D tensor" in caplog.text
    assert "merged nothing" not in caplog.text  # the specific reason replaces the generic warning
    remove_token_merging(model)


def test_video_models_are_rejected() -> None:
    # UNet3DConditionModel is built of BasicTransformerBlocks, but its tokens span frames
    video = diffusers.UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(TypeError, match="video"):
        apply_token_merging(video, TokenMergingConfig(ratio=0.5))


@torch.no_grad()
def test_chunked_feed_forward_runs_unmerged_and_says_so(unet: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    x, t, ctx = _unet_inputs()
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5, merge_mlp=False))
    attn_only = unet(x, t, ctx).sample
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5))
    for blk in _blocks(unet):
        blk.set_chunk_feed_forward(16, dim=1)  # what enable_forward_chunking does: ff sees slices of 16 tokens
    try:
        with caplog.at_level(logging.WARNING):
            chunked = unet(x, t, ctx).sample
        assert "enable_forward_chunking" in caplog.text
        torch.testing.assert_close(chunked, attn_only)  # attention merged, the chunked ff not
    finally:
        for blk in _blocks(unet):
            blk.set_chunk_feed_forward(None, dim=0)
        remove_token_merging(unet)


@torch.no_grad()
def test_deepcopy_of_a_merged_model_is_independent(unet: nn.Module, caplog: pytest.LogCaptureFixture) -> None:
    import copy

    x, t, ctx = _unet_inputs()
    dense = unet(x, t, ctx).sample
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5))
    merged = unet(x, t, ctx).sample
    twin = copy.deepcopy(unet)
    state, twin_state = merging_state(unet), merging_state(twin)
    assert twin_state is not state and twin_state.model is twin
    before = state.merged_tokens
    with caplog.at_level(logging.WARNING):
        assert torch.equal(twin(x, t, ctx).sample, merged)  # the copy's hooks run on the copy's state
    assert "merged nothing" not in caplog.text
    assert state.merged_tokens == before and twin_state.merged_tokens > 0
    remove_token_merging(twin)
    assert torch.equal(twin(x, t, ctx).sample, dense) and torch.equal(unet(x, t, ctx).sample, merged)
    remove_token_merging(unet)


@pytest.mark.filterwarnings("ignore::UserWarning:torch")  # dynamo's notes on tracing the hooks
def test_merging_applied_to_and_removed_from_a_compiled_model_takes_effect(caplog: pytest.LogCaptureFixture) -> None:
    from ..conftest import make_refs, randomize

    torch.manual_seed(0)
    model = randomize(ts.build_model("refdit-tiny"))
    refs = make_refs(1)

    def gen() -> torch.Tensor:
        return ts.generate(model, refs, "place", steps=1, seed=0)

    dense = gen()
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    merged = gen()
    ts.remove_token_merging(model)
    assert not torch.equal(merged, dense)
    model.compile(backend="eager")  # in place; compiled code does not see hooks added to sub-modules later
    assert torch.equal(gen(), dense)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert "torch.compiler.reset()" in caplog.text
    assert torch.equal(gen(), merged)
    ts.remove_token_merging(model)
    assert torch.equal(gen(), dense)


@pytest.mark.filterwarnings("ignore::UserWarning:torch")  # dynamo's notes on tracing the hooks
@torch.no_grad()
def test_merging_applied_to_a_torch_compile_wrapper_reads_positional_arguments(unet: nn.Module) -> None:
    # pipe.unet = torch.compile(pipe.unet): the wrapper's forward is (*args, **kwargs), and pipelines pass the
    # UNet's sample and timestep positionally; they were not found, so nothing merged ("no sample" warning)
    args = _unet_inputs()
    apply_token_merging(unet, TokenMergingConfig(ratio=0.5))
    merged = unet(*args).sample
    remove_token_merging(unet)
    compiled = torch.compile(unet, backend="eager")
    try:
        apply_token_merging(compiled, TokenMergingConfig(ratio=0.5))
        assert torch.equal(compiled(*args).sample, merged) and merging_state(compiled).merged_tokens > 0
        remove_token_merging(compiled)
    finally:
        torch.compiler.reset()


@pytest.mark.filterwarnings("ignore::UserWarning:torch")  # dynamo's notes on tracing the hooks
@torch.no_grad()
def test_a_torch_compile_wrapper_and_its_model_share_one_merging(unet: nn.Module) -> None:
    # apply_token_merging(pipe), then pipe.unet = torch.compile(pipe.unet): applying again through the wrapper
    # stacked a second merging on the model's (a shape error in FLUX), removing through it left the model merged
    args = _unet_inputs()
    dense = unet(*args).sample
    cfg = TokenMergingConfig(ratio=0.5)
    apply_token_merging(unet, cfg)
    merged = unet(*args).sample
    compiled = torch.compile(unet, backend="eager")
    try:
        assert merging_state(compiled) is merging_state(unet)
        apply_token_merging(compiled, cfg)
        assert torch.equal(compiled(*args).sample, merged)
        remove_token_merging(compiled)
        assert merging_state(unet) is None and torch.equal(unet(*args).sample, dense)
        apply_token_merging(compiled, cfg)  # the other way round
        assert merging_state(unet) is merging_state(compiled)
        apply_token_merging(unet, cfg)
        assert torch.equal(compiled(*args).sample, merged)
        remove_token_merging(unet)
        assert merging_state(compiled) is None and torch.equal(compiled(*args).sample, dense)
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in (compiled, *unet.modules()))
    finally:
        torch.compiler.reset()


@torch.no_grad()
def test_a_one_row_target_grid_merges_nothing_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    kind, model = _flux_models()[0]
    kw = _flux_inputs(kind, h=1, w=9)  # a grid, but no 2x2 cell to merge within
    dense = model(**kw).sample
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING):
        assert torch.equal(model(**kw).sample, dense)
    assert "merged nothing" in caplog.text and "at least 2x2" in caplog.text
    remove_token_merging(model)


def test_gradient_checkpointing_recomputes_with_the_forwards_matchings() -> None:
    from diffusers import UNet2DConditionModel
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).train()
    x, ctx, null = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.zeros(2, 5, 16)

    def reentrant(module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=True)

    def grads(mode: str | None, calls: list) -> list[torch.Tensor]:
        unet.zero_grad(set_to_none=True)
        if mode is None:
            unet.disable_gradient_checkpointing()
        else:
            unet.enable_gradient_checkpointing(*([reentrant] if mode == "reentrant" else []))
        begin_generation(unet)
        loss = sum(unet(x, torch.tensor(t), c).sample.pow(2).mean() for t, c in calls)
        loss.backward()
        assert not merging_state(unet)._recorded  # every recorded matching used up by its recomputation
        return [p.grad.clone() for p in unet.parameters()]

    # two forwards before one backward: the second at a higher timestep (a new generation), so when the first
    # one's blocks are recomputed the step and the cache have moved on; or two passes of one step whose first
    # blocks see the same input (CFG: only the text differs) but use different matchings
    for calls in ([(500.0, ctx), (700.0, ctx)], [(500.0, ctx), (500.0, null)]):
        for cfg in (TokenMergingConfig(ratio=0.5), TokenMergingConfig(threshold=0.5)):
            apply_token_merging(unet, cfg)
            plain = grads(None, calls)
            assert merging_state(unet).merged_tokens > 0
            assert all(torch.equal(a, b) for a, b in zip(plain, grads("plain", calls))), cfg
            # reentrant checkpointing recomputes differently, by float rounding, with or without merging
            assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(plain, grads("reentrant", calls))), cfg
            remove_token_merging(unet)


def test_remove_refuses_an_unmerged_video_model_like_apply() -> None:
    from diffusers import UNet3DConditionModel

    video = UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=16, attention_head_dim=4,
        norm_num_groups=4)
    with pytest.raises(TypeError, match="video"):
        apply_token_merging(video, TokenMergingConfig(ratio=0.5))
    with pytest.raises(TypeError, match="video"):
        remove_token_merging(video)


@torch.no_grad()
def test_per_sample_timesteps_never_reuse_another_batchs_matchings(refdit: ts.RefDiT) -> None:
    """A batch whose samples are at different timesteps (training) is no step of one generation: with
    recompute_every > 1 its matchings are computed from its own tokens, not reused from the batch before."""
    cfg = TokenMergingConfig(ratio=0.5, recompute_every=4)
    x, _, refs, ids = _inputs(refdit, seed=0)
    y = _inputs(refdit, seed=1)[0]
    t1, t2 = torch.tensor([0.9, 0.3]), torch.tensor([0.5, 0.8])  # first sample's t falls: read as the next step
    fresh = []
    for t in (t2, torch.tensor([0.5, 0.5])):
        apply_token_merging(refdit, cfg)
        fresh.append(refdit(y, t, refs, ids))
    apply_token_merging(refdit, cfg)
    state = merging_state(refdit)
    refdit(x, t1, refs, ids)
    assert torch.equal(refdit(y, t2, refs, ids), fresh[0])
    # after a mixed batch, a uniform one does not continue it either
    refdit(x, t1, refs, ids)
    assert torch.equal(refdit(y, torch.tensor([0.5, 0.5]), refs, ids), fresh[1])
    assert state.cache.hits == 0
    # uniform timesteps still step through one generation and reuse between recomputes
    refdit(y, torch.tensor([0.4, 0.4]), refs, ids)
    assert state.cache.hits == refdit.config.depth
    remove_token_merging(refdit)


def test_every_pass_of_a_step_draws_the_same_destinations():
    from tokensparse.models.zoo import randomize_zero_init

    torch.manual_seed(0)
    model = randomize_zero_init(ts.build_model("refdit-tiny").eval())
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    g = torch.Generator().manual_seed(0)
    size = model.config.image_size
    refs = [torch.rand(3, size, size, generator=g)]
    plain = ts.generate(model, refs, "place the subject top left", steps=4, seed=0)
    cfg1 = ts.generate(model, refs, "place the subject top left", steps=4, seed=0, guidance=ts.CFGConfig(scale=1.0))
    assert torch.equal(plain, cfg1)  # was up to 0.5 apart: the null pass moved the conditional pass's draws
    state = merging_state(model)
    assert state.destination_generator("a").initial_seed() != state.destination_generator("b").initial_seed()
