"""The per-block merging machinery (:mod:`tokensparse.integrations.merging_core`): where a generation starts (steps
and generations read from the calls), and other hooks on the same sublayers: diffusers' caches that hand back a
sublayer's output of an earlier step are refused, block-level ones stack."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import tokensparse as ts
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging
from tokensparse.merging import TokenMergingConfig
from tokensparse.models.zoo import randomize_zero_init

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
if importlib.util.find_spec("diffusers") is not None:
    import diffusers

H = W = 6  # a 6x6 grid of image tokens


def _flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4)).eval()


def _inputs(t: float, h: int = H, w: int = W) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return {"hidden_states": torch.randn(1, h * w, 8, generator=g), "encoder_hidden_states": torch.randn(1, 4, 16,
                                                                                                         generator=g),
            "pooled_projections": torch.randn(1, 8, generator=g), "timestep": torch.tensor([t]),
            "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(4, 3), "return_dict": False}


@torch.no_grad()
def _generate(model: nn.Module) -> list[torch.Tensor]:
    """Three steps of a bare loop (falling timesteps: one generation), in the cache context diffusers' caches read."""
    with model.cache_context("cond"):
        return [model(**_inputs(t))[0] for t in (0.9, 0.6, 0.3)]


@needs_diffusers
def test_diffusers_caches_reusing_a_merged_sublayers_output_are_refused() -> None:
    # Pyramid Attention Broadcast / TaylorSeer hand back (or extrapolate from) an attention's output of an earlier
    # step: under merging, that step's merged tokens, which this step's matching unmerged into the wrong tokens
    # (silently at a ratio; a threshold merging another count failed deep inside the block)
    model = _flux()
    merged = _generate(apply_token_merging(model, TokenMergingConfig(threshold=0.2)))
    pab = diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                    spatial_attention_timestep_skip_range=(-1, 2000),
                                                    current_timestep_callback=lambda: 500)
    model.enable_cache(pab)  # after apply: refused at the call, before anything runs
    with pytest.raises(ValueError, match=r"PyramidAttentionBroadcastHook on transformer_blocks\.0\.attn.*disable_"):
        _generate(model)
    with pytest.raises(ValueError, match="PyramidAttentionBroadcastHook on single_transformer_blocks.0.attn"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # before apply: refused there
    assert merging_state(model).cfg.threshold == 0.2  # the failed apply left the earlier one in place
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # the MLPs carry no cache: fine
    assert all(torch.isfinite(x).all() for x in _generate(model)) and merging_state(model).merged_tokens > 0
    model.disable_cache()
    apply_token_merging(model, TokenMergingConfig(threshold=0.2))
    assert all(torch.equal(a, b) for a, b in zip(_generate(model), merged))
    model.enable_cache(diffusers.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1))
    with pytest.raises(ValueError, match="TaylorSeerCacheHook on"):
        _generate(model)
    model.disable_cache()
    remove_token_merging(model)


@needs_diffusers
def test_a_block_level_diffusers_cache_stacks_with_merging() -> None:
    model = _flux()
    model.enable_cache(diffusers.FirstBlockCacheConfig(threshold=0.5))  # caches whole blocks' (unmerged) outputs
    apply_token_merging(model, TokenMergingConfig(threshold=0.2))
    assert all(torch.isfinite(x).all() for x in _generate(model)) and merging_state(model).merged_tokens > 0
    remove_token_merging(model)
    model.disable_cache()


@needs_diffusers
def test_smoothed_energy_guidance_on_a_merged_attention_is_refused() -> None:
    # a modular pipeline's SEG guider hooks an attention's to_q for its pass and blurs the queries as a square grid of
    # the sequence: under merging they are fewer and out of grid order, so the blur mixed unrelated tokens silently
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.smoothed_energy_guidance_utils import SmoothedEnergyGuidanceHook

    model = _flux()
    merged = _generate(apply_token_merging(model, TokenMergingConfig(ratio=0.5)))
    registry = HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0].attn.to_q)
    registry.register_hook(SmoothedEnergyGuidanceHook(blur_sigma=1.0), "seg")  # as the guider does for its pass
    with pytest.raises(ValueError, match=r"Smoothed Energy Guidance \(SmoothedEnergyGuidanceHook on "
                                         r"transformer_blocks\.0\.attn\.to_q\)"):
        _generate(model)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # its attention runs unmerged: fine
    assert all(torch.isfinite(x).all() for x in _generate(model))
    registry.remove_hook("seg")  # the guider's cleanup after its pass
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert all(torch.equal(a, b) for a, b in zip(_generate(model), merged))
    remove_token_merging(model)


# ------------------------------------------------------------------------------------- where generations start

EVERY_100 = TokenMergingConfig(ratio=0.5, recompute_every=100)  # reuses step 0's matchings for the whole generation


@pytest.fixture(scope="module")
def refdit() -> ts.RefDiT:
    torch.manual_seed(0)
    return randomize_zero_init(ts.build_model("refdit-tiny", image_size=32).eval())  # 8x8 target tokens


def _call(model: ts.RefDiT, t: float, seed: int = 1, batch: int = 1) -> tuple:
    g = torch.Generator().manual_seed(seed)
    s = model.config.image_size
    refs = [torch.rand(batch, 3, s, s, generator=g) * 2 - 1]
    return torch.randn(batch, 3, s, s, generator=g), torch.full((batch,), t), refs, torch.zeros(batch, 3,
                                                                                                 dtype=torch.long)


def _fresh(model: nn.Module, call: tuple | dict, grad: bool = False) -> torch.Tensor:
    """What ``call`` computes as the first call of a freshly merged model (step 0 of a new generation)."""
    apply_token_merging(model, EVERY_100)
    with torch.set_grad_enabled(grad):
        out = model(**call)[0] if isinstance(call, dict) else model(*call)
    return out.detach()


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad])
def test_a_training_step_after_a_generation_starts_a_new_one(refdit: ts.RefDiT, mode) -> None:
    """A grad-enabled call (a training step with a fresh timestep) after a generation, at a timestep below the
    generation's last (0.25 at 4 steps), was read as its next step and reused its matchings: from another image, and
    under inference_mode made of inference tensors, which failed the call ("Inference tensors cannot be saved for
    backward")."""
    call = _call(refdit, t=0.1)
    want = _fresh(refdit, call, grad=True)
    apply_token_merging(refdit, EVERY_100)
    state = merging_state(refdit)
    with mode():
        ts.generate(refdit, [torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(2))], "", steps=4)
    assert state.cache.hits > 0  # the generation reused its matchings
    out = refdit(*call)
    assert state.tracker.step == 0 and state.cache.hits == 0  # step 0 of a new generation
    assert torch.equal(out.detach(), want)
    out.pow(2).mean().backward()  # its matchings are its own: autograd can save them
    refdit.zero_grad(set_to_none=True)
    remove_token_merging(refdit)


@torch.no_grad()
def test_a_batch_that_shrinks_part_way_continues_the_generation(refdit: ts.RefDiT) -> None:
    """diffusers' dynamic CFG: a callback drops the unconditional half of the batch part-way through a generation;
    the steps after it are still that generation's (step numbers, destination draws, recompute schedule)."""
    apply_token_merging(refdit, EVERY_100)
    state = merging_state(refdit)
    generation = None
    for step, (t, batch) in enumerate(((0.9, 2), (0.8, 2), (0.7, 1), (0.6, 1))):
        refdit(*_call(refdit, t, seed=3, batch=batch))
        generation = state.tracker.generation if generation is None else generation
        assert (state.tracker.generation, state.tracker.step) == (generation, step), t
    assert state.cache.hits > 0  # each batch size reuses its first step's matchings (batch 2 ones do not fit batch 1)
    remove_token_merging(refdit)


@needs_diffusers
@torch.no_grad()
def test_a_step_on_another_grid_starts_a_new_generation() -> None:
    model = _flux()
    call = _inputs(0.3, h=4, w=4)
    want = _fresh(model, call)
    apply_token_merging(model, EVERY_100)
    for t in (0.9, 0.6):
        model(**_inputs(t))  # 6x6
    assert torch.equal(model(**call)[0], want)
    assert merging_state(model).tracker.step == 0
    remove_token_merging(model)


def test_a_switch_into_or_out_of_inference_mode_starts_a_new_generation(refdit: ts.RefDiT) -> None:
    call = _call(refdit, t=0.6)
    for first, then in ((torch.no_grad, torch.inference_mode), (torch.inference_mode, torch.no_grad)):
        with then():
            want = _fresh(refdit, call)
        apply_token_merging(refdit, EVERY_100)
        with first():
            for t in (0.9, 0.6):
                refdit(*_call(refdit, t))
        with then():  # an identical call at the same timestep, but not under the same mode
            assert torch.equal(refdit(*call), want)
        assert merging_state(refdit).tracker.step == 0
    remove_token_merging(refdit)


def test_passes_of_a_step_may_differ_in_batch_and_grad_mode(refdit: ts.RefDiT) -> None:
    """CFG-style passes keep sharing their step: SD3's skip-layer-guidance pass (batch 1 beside the batch-2 CFG call,
    only in some steps), Attend-and-Excite's grad-enabled passes (batch 1) before its no-grad CFG pass (batch 2), in
    its first steps. A step whose first call is like one of the previous step's continues the generation."""
    apply_token_merging(refdit, EVERY_100)
    state = merging_state(refdit)
    schedule = {0.9: ["grad", "cfg"], 0.8: ["grad", "grad", "cfg"], 0.7: ["cfg"], 0.6: ["cfg", "slg"],
                0.5: ["cfg", "slg"], 0.4: ["cfg"]}
    generation = None
    for step, (t, passes) in enumerate(schedule.items()):
        for kind in passes:
            with torch.set_grad_enabled(kind == "grad"):
                refdit(*_call(refdit, t, seed=len(kind), batch=2 if kind == "cfg" else 1))
            generation = state.tracker.generation if generation is None else generation
            assert (state.tracker.generation, state.tracker.step) == (generation, step), (t, kind)
    assert state.cache.hits > 0
    remove_token_merging(refdit)


@needs_diffusers
def test_a_training_step_after_a_diffusers_generation_under_inference_mode_runs() -> None:
    model = _flux()
    call = _inputs(0.1)  # below the generation's last timestep
    want = _fresh(model, call, grad=True)
    apply_token_merging(model, EVERY_100)
    with torch.inference_mode():
        _generate(model)
    out = model(**call)[0]
    assert torch.equal(out.detach(), want)
    out.pow(2).mean().backward()  # failed: "Inference tensors cannot be saved for backward"
    remove_token_merging(model)


def test_kept_destinations_are_the_ones_drawn_and_repeat_across_generations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The destination positions a state keeps per (step, layer, grid, device, inference mode) are the ones its
    generator draws; a later generation gets them back without drawing again, and its outputs are the same."""
    from tokensparse.integrations import merging_core
    from tokensparse.merging import destination_positions, random_destinations

    torch.manual_seed(0)
    model = randomize_zero_init(ts.build_model("refdit-tiny").eval())
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    state = merging_state(model)
    src_pos, dst_pos = state.destinations("blocks.0", (4, 6), torch.device("cpu"))
    want = destination_positions(random_destinations(4, 6, state.destination_generator("blocks.0")))
    assert torch.equal(src_pos, want[0]) and torch.equal(dst_pos, want[1])
    assert state.destinations("blocks.0", (4, 6), torch.device("cpu"))[0] is src_pos  # kept
    with torch.inference_mode():  # kept apart: inference tensors must not reach a grad-recording step
        inside = state.destinations("blocks.0", (4, 6), torch.device("cpu"))
    assert inside[0] is not src_pos and inside[0].is_inference() and not src_pos.is_inference()
    assert torch.equal(inside[0], src_pos)

    size = model.config.image_size
    refs = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))]
    first = ts.generate(model, refs, "place the subject top left", steps=3, seed=0)
    drawn: list[str] = []
    real = merging_core.random_destinations
    monkeypatch.setattr(merging_core, "random_destinations", lambda *a: drawn.append("x") or real(*a))
    again = ts.generate(model, refs, "place the subject top left", steps=3, seed=0)
    assert drawn == [] and torch.equal(first, again)


def test_kept_destinations_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_DESTINATION_TOKENS positions nothing more is kept (the positions are still returned)."""
    from tokensparse.integrations import merging_core

    monkeypatch.setattr(merging_core, "MAX_DESTINATION_TOKENS", 100)
    state = merging_core.TokenMergingState(cfg=TokenMergingConfig(ratio=0.5), model=nn.Linear(1, 1))
    for layer in ("a", "b", "c"):
        state.destinations(layer, (6, 6), torch.device("cpu"))  # 36 positions each: the third does not fit
    kept = state._destinations._positions
    assert len(kept) == 2 and state._destinations._size == 72
    assert state.destinations("c", (6, 6), torch.device("cpu"))[0] is not state.destinations("c", (6, 6),
                                                                                         torch.device("cpu"))[0]


def test_names_moved_out_stay_importable_from_here() -> None:
    """The per-block hooks, call fingerprints, span merging / mask thinning and the refused hooks moved to their own
    modules; the names callers imported from ``merging_core`` are the same objects there."""
    from tokensparse.integrations import fingerprints, merging_blocks, merging_conflicts, merging_core, merging_spans

    for module, names in ((merging_blocks, ("BlockMerger", "GridFn", "RopeFn", "Sublayer", "merge_block")),
                          (fingerprints, ("MAX_RECORDED", "Recorded", "_in_backward", "call_key")),
                          (merging_spans, ("merge_key_mask", "merge_query_key_mask", "merge_span", "part",
                                           "unmerge_span")),
                          (merging_conflicts, ("GRID_HOOKS", "refuse_output_caches"))):
        for name in names:
            assert getattr(merging_core, name) is getattr(module, name), name
