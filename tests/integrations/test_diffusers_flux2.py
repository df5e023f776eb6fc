"""Sparse Context on tiny random-weight FLUX.2 [klein] pipelines (saved and reloaded from a temp dir)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    is_diffusers_target,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny import flux2_call_kwargs, tiny_flux2_klein

from .proportional import MaskRecorder, assert_bias_is_duplication, keep_one_then_plain_sparse

TARGET_TOKENS = 8 * 8  # 32x32 output: VAE /2, 2x2 patches
REF_TOKENS = 16 * 16  # 64x64 references (FLUX.2's image processor needs >= 64 px)


def _ref(seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(64, 64, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    tiny_flux2_klein(seed=0).save_pretrained(root / "klein")
    tiny_flux2_klein(seed=0, kv=True).save_pretrained(root / "klein_kv")
    return root


@pytest.fixture
def pipe(saved_dirs):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(saved_dirs / "klein")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def kv_pipe(saved_dirs):
    from diffusers import DiffusionPipeline

    p = DiffusionPipeline.from_pretrained(saved_dirs / "klein_kv")
    p.set_progress_bar_config(disable=True)
    return p


class TokenCounter:
    """Records how many image tokens the transformer actually embeds per call (x_embedder's input)."""

    def __init__(self, transformer):
        self.lengths: list[int] = []
        self.handle = transformer.x_embedder.register_forward_pre_hook(
            lambda m, args: self.lengths.append(args[0].shape[1])
        )


def run(pipe, refs=(0, 1), guidance_scale=2.0, **kw):
    images = [_ref(s) for s in refs] if refs else None
    if guidance_scale is not None:
        kw["guidance_scale"] = guidance_scale
    return pipe(
        image=images,
        prompt=kw.pop("prompt", "a cat"),
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **{**flux2_call_kwargs(), **kw},
    ).images


def test_loaded_pipeline_is_a_target(pipe):
    assert type(pipe).__name__ == "Flux2KleinPipeline"
    assert is_diffusers_target(pipe) and is_diffusers_target(pipe.transformer)
    assert not is_diffusers_target(torch.nn.Linear(2, 2))


def test_keep_one_is_bit_identical(pipe):
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)


def test_keep_quarter_feeds_a_quarter_of_reference_tokens(pipe):
    counter = TokenCounter(pipe.transformer)
    dense = run(pipe)  # 2 steps x (cond + uncond)
    assert counter.lengths == [TARGET_TOKENS + 2 * REF_TOKENS] * 4
    counter.lengths.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="random"))
    sparse = run(pipe)
    assert counter.lengths == [TARGET_TOKENS + 2 * REF_TOKENS // 4] * 4
    assert sparse.shape == dense.shape and np.isfinite(sparse).all()
    assert not np.array_equal(sparse, dense)


def test_remove_restores_identical_images(pipe):
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    run(pipe)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe), dense)
    assert sparse_context_state(pipe) is None and not pipe.transformer._forward_pre_hooks
    assert "set_timesteps" not in pipe.scheduler.__dict__
    assert "prepare_image_latents" not in pipe.__dict__ and "encode_prompt" not in pipe.__dict__
    remove_sparse_context_diffusers(pipe)  # removing twice is harmless


def test_apply_twice_equals_apply_once(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, seed=3))
    once = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, seed=1))
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, seed=3))
    assert np.array_equal(run(pipe), once)
    assert len(pipe.transformer._forward_pre_hooks) == 1  # one hook, not stacked
    apply_sparse_context_diffusers(
        pipe.transformer, SparseContextConfig(keep=0.25, seed=3)
    )  # pipe -> transformer: the pipeline still calls it, and still captures its pixels and prompt
    assert len(pipe.transformer._forward_pre_hooks) == 1  # one hook, not stacked
    assert "prepare_image_latents" in pipe.__dict__
    assert np.array_equal(run(pipe), once)
    remove_sparse_context_diffusers(pipe.transformer)
    assert "prepare_image_latents" not in pipe.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__


def test_selection_runs_once_per_call_with_cfg(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))
    state = sparse_context_state(pipe)
    run(pipe)  # 2 steps x 2 guidance passes
    assert state.selections == 1
    run(pipe)
    assert state.selections == 2


def test_selection_once_per_call_on_bare_transformer(pipe):
    apply_sparse_context_diffusers(pipe.transformer, SparseContextConfig(keep=0.25))
    state = sparse_context_state(pipe.transformer)
    run(pipe)
    run(pipe)
    assert state.selections == 2  # a rising timestep starts a new generation


@pytest.mark.parametrize("on", ["transformer", "swapped_scheduler"])
def test_new_references_get_a_new_selection_without_a_visible_boundary(pipe, on):
    """One-step calls on a bare transformer (the timestep never rises), or a pipeline whose scheduler was
    replaced after apply (set_timesteps no longer wrapped): new references still get their own selection."""
    cfg = SparseContextConfig(keep=0.25, selector="edges")
    target = pipe.transformer if on == "transformer" else pipe
    apply_sparse_context_diffusers(target, cfg)
    fresh = run(pipe, refs=(2, 3), num_inference_steps=1)
    remove_sparse_context_diffusers(pipe)
    apply_sparse_context_diffusers(target, cfg)
    if on == "swapped_scheduler":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    state = sparse_context_state(pipe.transformer)
    run(pipe, refs=(0, 1), num_inference_steps=1)
    after = run(pipe, refs=(2, 3), num_inference_steps=1)
    assert state.selections == 2 and np.array_equal(after, fresh)


def test_deepcopy_of_a_patched_pipeline_is_independent(pipe):
    import copy

    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))
    sparse = run(pipe)
    twin = copy.deepcopy(pipe)
    assert sparse_context_state(twin) is not sparse_context_state(pipe)
    assert np.array_equal(run(twin), sparse)  # the copy's hooks and wrappers drive the copy
    assert twin.prepare_image_latents.__wrapped__.__self__ is twin
    with torch.no_grad():
        for w in twin.transformer.parameters():
            w.mul_(0.5)
    assert not np.array_equal(run(twin), sparse)  # the copy's own weights (not the original's)
    assert sparse_context_state(twin).selections == 1 + 2 and sparse_context_state(pipe).selections == 1
    remove_sparse_context_diffusers(twin)
    assert sparse_context_state(pipe) is not None and np.array_equal(run(pipe), sparse)


def test_removing_from_a_replaced_transformer_leaves_the_pipeline_alone(pipe):
    import copy

    old, new = pipe.transformer, copy.deepcopy(pipe.transformer)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))  # owner of old's hook
    pipe.transformer = new
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))
    apply_sparse_context_diffusers(old, SparseContextConfig(keep=0.5))  # re-apply = remove + apply on the old one
    remove_sparse_context_diffusers(old)
    assert "encode_prompt" in pipe.__dict__ and "set_timesteps" in pipe.scheduler.__dict__
    assert sparse_context_state(pipe) is not None


@torch.no_grad()
def test_other_hooks_see_positional_arguments_and_the_dense_output(pipe):
    t = pipe.transformer
    calls = []
    handle = t.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    run(pipe)
    handle.remove()
    kw = calls[0]
    hs = kw.pop("hidden_states")
    dense = t(hs, **kw)[0]
    outputs, args_seen = [], []
    t.register_forward_hook(lambda m, a, out: outputs.append(out[0].shape[1]))  # before apply
    apply_sparse_context_diffusers(t, SparseContextConfig(keep=0.25, selector="uniform"))
    t.register_forward_pre_hook(lambda m, a: args_seen.append((len(a), a[0].shape[1])))  # after apply
    sparse = t(hs, **kw)[0]
    assert args_seen == [(1, hs.shape[1] - 2 * REF_TOKENS * 3 // 4)]  # still positional, thinned
    assert outputs == [hs.shape[1]] and sparse.shape == dense.shape  # other forward hooks: the dense length


def test_deepcopy_of_a_transformer_patched_through_a_pipeline_leaves_the_pipeline(pipe):
    import copy

    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    twin = copy.deepcopy(pipe.transformer)
    hook = twin.__dict__["_tokensparse_sparse_context"]
    assert hook.owners == [] and sparse_context_state(twin) is not sparse_context_state(pipe)


@torch.no_grad()
def test_a_transformer_patched_through_its_pipeline_pickles_without_the_pipeline(pipe):
    import io

    calls = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    run(pipe)  # the dense call's arguments
    handle.remove()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    run(pipe)  # a call leaves the text encoder with hooks that cannot be pickled: the pipeline must not come along
    buf = io.BytesIO()
    torch.save(pipe.transformer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)  # our own bytes, written just above
    assert loaded.__dict__["_tokensparse_sparse_context"].owners == []
    kw = dict(calls[0])
    hs = kw.pop("hidden_states")
    assert torch.equal(loaded(hs, **kw)[0], pipe.transformer(hs, **kw)[0])  # still patched, identically
    ts.remove_token_merging(loaded)
    remove_sparse_context_diffusers(loaded)
    assert not [k for k in loaded.__dict__ if k.startswith("_tokensparse")]


def test_config_is_snapshotted_at_apply(pipe):
    cfg = SparseContextConfig(keep=0.25, selector="random")
    apply_sparse_context_diffusers(pipe, cfg)
    before = run(pipe)
    cfg.keep = 1.0  # editing the caller's object after apply changes nothing
    assert np.array_equal(run(pipe), before)


def test_batch_of_two_shares_one_selection(pipe):
    counter = TokenCounter(pipe.transformer)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    images = run(pipe, prompt=["a cat", "a dog"], num_images_per_prompt=1)
    assert images.shape[0] == 2 and np.isfinite(images).all()
    assert counter.lengths == [TARGET_TOKENS + 2 * REF_TOKENS // 4] * 4
    assert sparse_context_state(pipe).selections == 1


def test_kept_tokens_keep_their_position_ids(pipe):
    """The hooked transformer equals the unhooked one fed the kept tokens and their ids by hand."""
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    n_txt, n = 4, TARGET_TOKENS + 2 * REF_TOKENS
    tgt_ids = torch.cartesian_prod(torch.tensor([0]), torch.arange(8), torch.arange(8), torch.tensor([0]))
    ref_ids = [
        torch.cartesian_prod(torch.tensor([t]), torch.arange(16), torch.arange(16), torch.tensor([0]))
        for t in (10, 20)
    ]
    ids = torch.cat([tgt_ids, *ref_ids]).unsqueeze(0)
    kw = {
        "hidden_states": torch.randn(1, n, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, n_txt, tr.config.joint_attention_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(1, n_txt, 4, dtype=torch.long),
        "return_dict": False,
    }
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="uniform"))
    with torch.no_grad():
        sparse = tr(**kw)[0]
    remove_sparse_context_diffusers(tr)
    kept = (sparse.abs().sum(-1) != 0)[0]  # dropped reference positions come back as zeros
    assert kept[:TARGET_TOKENS].all() and int(kept.sum()) == TARGET_TOKENS + 2 * REF_TOKENS // 4
    index = torch.nonzero(kept).squeeze(1)
    manual = dict(kw, hidden_states=kw["hidden_states"][:, index], img_ids=ids[:, index])
    with torch.no_grad():
        expected = tr(**manual)[0]
    torch.testing.assert_close(sparse[:, index], expected, rtol=0, atol=0)


def test_reference_pixels_reach_the_scorers(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5))
    run(pipe, guidance_scale=2.0)  # CFG: the negative prompt "" is encoded too, and must not win
    assert sparse_context_state(pipe).prompts == ["a cat"]
    images = sparse_context_state(pipe).images
    assert len(images) == 2 and images[0].shape == (1, 3, 64, 64)
    assert 0.0 <= float(images[0].min()) and float(images[0].max()) <= 1.0


def test_a_failed_call_leaves_no_prompt_or_pixels_for_the_next(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="auto"))
    with pytest.raises(ValueError):  # Flux2 takes PIL references only: fails after encoding the prompt
        pipe(image=[np.asarray(_ref(0))], prompt="recolor the cat", output_type="np", **flux2_call_kwargs())
    run(pipe, prompt="put the cat on a sofa")
    assert sparse_context_state(pipe).prompts == ["put the cat on a sofa"]  # not the failed call's prompt
    pipe.encode_prompt("recolor the cat")  # by hand, before a call: the call's own prompt still wins
    run(pipe, prompt="place the cat on a sofa")
    assert sparse_context_state(pipe).prompts == ["place the cat on a sofa"]


def test_latent_items_score_from_latents_and_pixel_items_from_pixels():
    from tokensparse.integrations.diffusers_models import images_for_scorers

    latents, pixels = torch.randn(1, 16, 8, 8), torch.rand(1, 3, 32, 32) * 2 - 1  # Klein inpaint's list
    got = images_for_scorers([latents, pixels])
    assert got[0] is None and torch.allclose(got[1], (pixels + 1) / 2)
    assert images_for_scorers([latents]) is None and images_for_scorers(None) is None
    stacked = torch.rand(3, 3, 32, 32) * 2 - 1  # Klein inpaint's image_reference list, stacked
    assert len(images_for_scorers([latents, stacked], batch_size=2)) == 4  # 3 references, not 3 samples
    assert len(images_for_scorers([latents, stacked[:2]], batch_size=2)) == 2  # one per sample: one reference
    assert len(images_for_scorers([latents, stacked])) == 2  # no batch size: an item is one reference


def test_no_reference_images_is_a_logged_noop(pipe, caplog):
    dense = run(pipe, refs=())
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        sparse = run(pipe, refs=())
    assert np.array_equal(sparse, dense)
    assert sum("no reference tokens" in r.message for r in caplog.records) == 1


def test_unsupported_targets_and_bad_configs(pipe):
    with pytest.raises(TypeError, match="Flux2KleinPipeline"):
        apply_sparse_context_diffusers(pipe.vae, SparseContextConfig(keep=0.5))
    with pytest.raises(TypeError, match="QwenImageEditPlusPipeline"):
        apply_sparse_context_diffusers(torch.nn.Linear(2, 2), SparseContextConfig(keep=0.5))
    with pytest.raises(TypeError, match="SparseContextConfig"):
        apply_sparse_context_diffusers(pipe, {"keep": 0.5})
    with pytest.raises(ValueError, match="Flux2KleinKVPipeline"):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, cache=True))


def test_a_modular_pipeline_is_refused_naming_its_transformer_which_thins_its_calls(pipe):
    from diffusers.modular_pipelines import Flux2KleinAutoBlocks

    blocks = Flux2KleinAutoBlocks()
    modular = blocks.init_pipeline()
    cfg = SparseContextConfig(keep=0.25, selector="random")
    with pytest.raises(TypeError, match=r"load its transformer first.*pipe\.transformer"):
        ts.apply_sparse_context(modular, cfg)  # its components are not loaded yet
    with pytest.raises(TypeError, match=r"modular pipeline blocks \(Flux2KleinAutoBlocks\).*pipe\.transformer"):
        ts.apply_sparse_context(blocks, cfg)
    modular.update_components(**pipe.components)
    modular.set_progress_bar_config(disable=True)
    for call in (lambda: ts.apply_sparse_context(modular, cfg), lambda: ts.remove_sparse_context(modular)):
        with pytest.raises(TypeError, match=r"Flux2KleinModularPipeline.*ts\.apply_sparse_context\(pipe\.transformer"):
            call()

    def generate():
        out = modular(image=[_ref(0), _ref(1)], prompt="a cat", generator=torch.Generator().manual_seed(0),
                      output_type="np", **flux2_call_kwargs())
        return out.values["images"]

    dense = generate()
    ts.apply_sparse_context(modular.transformer, cfg)
    counter = TokenCounter(modular.transformer)
    sparse = generate()
    assert counter.lengths == [TARGET_TOKENS + 2 * REF_TOKENS // 4] * 2  # 2 steps, no guidance
    assert not np.array_equal(sparse, dense)
    ts.apply_sparse_context(modular.transformer, SparseContextConfig(keep=1.0))
    assert np.array_equal(generate(), dense)
    ts.remove_sparse_context(modular.transformer)
    assert np.array_equal(generate(), dense)


def test_a_modular_pipeline_whose_transformer_it_cannot_thin_is_refused_naming_that():
    from diffusers import SD3Transformer2DModel
    from diffusers.modular_pipelines import StableDiffusion3AutoBlocks

    modular = StableDiffusion3AutoBlocks().init_pipeline()
    modular.update_components(transformer=SD3Transformer2DModel(
        sample_size=8, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16))
    with pytest.raises(TypeError, match=r"nor their transformer \(SD3Transformer2DModel\)"):
        ts.apply_sparse_context(modular, SparseContextConfig(keep=0.5))


def test_the_layered_qwen_image_modular_pipeline_is_pointed_to_its_transformer():
    from diffusers import QwenImageTransformer2DModel
    from diffusers.modular_pipelines import QwenImageLayeredAutoBlocks

    modular = QwenImageLayeredAutoBlocks().init_pipeline()
    modular.update_components(transformer=QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), use_layer3d_rope=True, use_additional_t_cond=True))
    pointed = r"QwenImageLayeredModularPipeline.*ts\.apply_sparse_context\(pipe\.transformer"
    with pytest.raises(TypeError, match=pointed):
        ts.apply_sparse_context(modular, SparseContextConfig(keep=0.5))
    ts.apply_sparse_context(modular.transformer, SparseContextConfig(keep=0.5))  # as the bare layered transformer
    assert sparse_context_state(modular.transformer) is not None
    ts.remove_sparse_context(modular.transformer)


# K/V cache (Flux2KleinKVPipeline) ------------------------------------------------------------------------
class KVRecorder:
    def __init__(self, transformer):
        self.cached_refs: list[int] = []
        self.handle = transformer.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if isinstance(output, tuple) and len(output) == 2 and output[1] is not None:
            self.cached_refs.append(output[1].get_double(0).get()[0].shape[1])


def test_kv_cache_keep_one_identical_and_sparse_caches_fewer(kv_pipe):
    dense = run(kv_pipe, guidance_scale=None)
    rec = KVRecorder(kv_pipe.transformer)
    apply_sparse_context_diffusers(kv_pipe, SparseContextConfig(keep=1.0, cache=True))
    assert np.array_equal(run(kv_pipe, guidance_scale=None), dense)
    assert rec.cached_refs == [2 * REF_TOKENS]
    counter = TokenCounter(kv_pipe.transformer)
    apply_sparse_context_diffusers(kv_pipe, SparseContextConfig(keep=0.25, cache=True))
    sparse = run(kv_pipe, guidance_scale=None)
    assert rec.cached_refs[-1] == 2 * REF_TOKENS // 4
    assert counter.lengths == [
        2 * REF_TOKENS // 4 + TARGET_TOKENS,
        TARGET_TOKENS,
    ]  # extract step, cached step
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    remove_sparse_context_diffusers(kv_pipe)
    assert np.array_equal(run(kv_pipe, guidance_scale=None), dense)


def test_from_pipe_sibling_shares_the_hook_and_each_pipeline_captures_its_own(pipe, kv_pipe, caplog):
    # README flow: Flux2KleinKVPipeline.from_pipe(pipe), Sparse Context applied through both
    from diffusers import Flux2KleinKVPipeline

    cfg = dict(keep=0.25, selector="auto")
    apply_sparse_context_diffusers(kv_pipe, SparseContextConfig(**cfg, cache=True))
    direct = run(kv_pipe, guidance_scale=None)  # a KV pipeline applied to directly (same weights)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(**cfg))
    before = run(pipe)
    sibling = Flux2KleinKVPipeline.from_pipe(pipe)
    sibling.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="tokensparse.integrations.diffusers"):
        run(sibling, guidance_scale=None)  # shares the transformer's hook, but nothing captured its pixels
    assert "from_pipe" in caplog.text
    apply_sparse_context_diffusers(sibling, SparseContextConfig(**cfg, cache=True))
    assert np.array_equal(run(sibling, guidance_scale=None), direct)
    assert np.array_equal(run(pipe), before)  # the first pipeline still captures its own pixels and prompt
    remove_sparse_context_diffusers(sibling)
    assert "prepare_image_latents" not in pipe.__dict__ and "prepare_image_latents" not in sibling.__dict__


@pytest.mark.parametrize("offload_first", [False, True])
def test_sparse_context_and_cpu_offload_in_either_order(pipe, offload_first, monkeypatch):
    # the pipeline re-installs accelerate's offload wrapper after every call: Sparse Context must survive
    # that (apply after offload), and re-applying / removing must keep the offload wrapper
    import accelerate.hooks

    offloads = []
    original = accelerate.hooks.CpuOffload.pre_forward

    def counting(self, module, *args, **kwargs):
        offloads.append(module is pipe.transformer)
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(accelerate.hooks.CpuOffload, "pre_forward", counting)
    dense = run(pipe)
    counter = TokenCounter(pipe.transformer)
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="uniform"))
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    for keep in (0.25, 0.5):  # the second: re-applied (remove + apply)
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=keep, selector="uniform"))
        for _ in range(2):
            counter.lengths.clear()
            offloads.clear()
            run(pipe)
            assert counter.lengths == [TARGET_TOKENS + int(2 * REF_TOKENS * keep)] * 4
            assert offloads.count(True) == 4  # 2 steps x 2 guidance passes through the offload wrapper
    remove_sparse_context_diffusers(pipe)
    offloads.clear()
    assert np.array_equal(run(pipe), dense) and offloads.count(True) == 4


# diffusers' own caches --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fbc", "taylorseer"])
def test_stacks_with_diffusers_caches(pipe, kind):
    from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if kind == "fbc":
        # diffusers 0.42's FirstBlockCache fails on FLUX.2 models that have single-stream blocks (its head
        # block returns two streams, its tail block one: huggingface/diffusers#14280, fix in PR #14359);
        # a double-stream-only tiny FLUX.2 exercises the stacking itself.
        pipe = tiny_flux2_klein(seed=0, num_layers=2, num_single_layers=0)
        pipe.set_progress_bar_config(disable=True)

    cache_cfg = (
        FirstBlockCacheConfig(threshold=0.2)
        if kind == "fbc"
        else TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32
        )
    )
    pipe.transformer.enable_cache(cache_cfg)
    cached_dense = run(pipe, num_inference_steps=4)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe, num_inference_steps=4), cached_dense)
    counter = TokenCounter(pipe.transformer)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe, num_inference_steps=4)
    assert np.isfinite(sparse).all()
    assert set(counter.lengths) == {TARGET_TOKENS + 2 * REF_TOKENS // 4}
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe, num_inference_steps=4), cached_dense)
    pipe.transformer.disable_cache()


def test_flux2_dev_pipeline(pipe):
    """Flux2Pipeline (FLUX.2 [dev]) shares the transformer; its Mistral3 text encoder is skipped via prompt_embeds."""
    from diffusers import Flux2Pipeline

    dev = Flux2Pipeline(
        scheduler=pipe.scheduler,
        vae=pipe.vae,
        text_encoder=None,
        tokenizer=None,
        transformer=pipe.transformer,
    )
    dev.set_progress_bar_config(disable=True)
    emb = torch.randn(
        1, 6, pipe.transformer.config.joint_attention_dim, generator=torch.Generator().manual_seed(0)
    )

    def call():
        return dev(
            image=[_ref(0)],
            prompt_embeds=emb,
            height=32,
            width=32,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    dense = call()
    counter = TokenCounter(dev.transformer)
    apply_sparse_context_diffusers(dev, SparseContextConfig(keep=1.0))
    assert np.array_equal(call(), dense)
    apply_sparse_context_diffusers(dev, SparseContextConfig(keep=0.25))
    call()
    assert counter.lengths[-2:] == [TARGET_TOKENS + REF_TOKENS // 4] * 2
    assert sparse_context_state(dev).selections == 1
    remove_sparse_context_diffusers(dev)
    assert np.array_equal(call(), dense)


@pytest.mark.slow
def test_every_registered_selector_runs(pipe):
    """Whatever scorers the selection package registers work through the hook, fixed and adaptive budgets."""
    from tokensparse.selection import INFORMED, SCORERS

    counter = TokenCounter(pipe.transformer)
    for selector in sorted(SCORERS):
        for adaptive in (False, True) if selector in INFORMED else (False,):  # adaptive needs score mass
            counter.lengths.clear()
            apply_sparse_context_diffusers(
                pipe, SparseContextConfig(keep=0.25, selector=selector, adaptive=adaptive)
            )
            images = run(pipe, guidance_scale=1.0, num_inference_steps=1, prompt="recolor the cat")
            assert np.isfinite(images).all()
            assert TARGET_TOKENS + 2 <= counter.lengths[0] <= TARGET_TOKENS + 2 * REF_TOKENS // 4, (
                selector,
                adaptive,
            )


def test_inpaint_pipeline_drops_from_the_source_and_the_references(pipe):
    """Flux2KleinInpaintPipeline puts the (encoded) source image and each reference in context."""
    from diffusers import Flux2KleinInpaintPipeline

    inpaint = Flux2KleinInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = Image.fromarray((np.pad(np.ones((32, 32)), 16) * 255).astype("uint8"))
    counter = TokenCounter(inpaint.transformer)

    def call():
        return inpaint(image=_ref(5), mask_image=mask, image_reference=[_ref(0)], prompt="a cat", strength=1.0,
                       generator=torch.Generator().manual_seed(0), output_type="np", **flux2_call_kwargs()).images

    dense = call()
    n_target = counter.lengths[0] // 3  # target, source, one reference: equal sizes
    apply_sparse_context_diffusers(inpaint, SparseContextConfig(keep=0.25))
    counter.lengths.clear()
    sparse = call()
    assert set(counter.lengths) == {n_target + 2 * n_target // 4}
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    remove_sparse_context_diffusers(inpaint)
    assert np.array_equal(call(), dense)


def test_inpaint_pipeline_scores_every_reference_of_a_stacked_list_from_its_pixels(pipe):
    """Flux2KleinInpaintPipeline stacks an ``image_reference`` list into one tensor: each is its own reference."""
    from diffusers import Flux2KleinInpaintPipeline

    inpaint = Flux2KleinInpaintPipeline(**pipe.components)
    inpaint.set_progress_bar_config(disable=True)
    mask = Image.fromarray((np.pad(np.ones((32, 32)), 16) * 255).astype("uint8"))
    apply_sparse_context_diffusers(inpaint, SparseContextConfig(keep=0.25, selector="edges"))
    refs = [_ref(0), _ref(1)]
    inpaint(image=_ref(5), mask_image=mask, image_reference=refs, prompt="a cat", strength=1.0,
            generator=torch.Generator().manual_seed(0), output_type="np", **flux2_call_kwargs())
    state = sparse_context_state(inpaint)
    (_, layout), = state.index.values()
    assert len(layout.grids) == 3  # the source image, then the two references
    assert len(state.images) == 3 and state.images[0] is None  # the source is passed as latents
    for got, ref in zip(state.images[1:], refs):
        assert np.abs(got[0].permute(1, 2, 0).numpy() - np.asarray(ref) / 255).max() < 0.01


def test_captured_images_that_miss_references_warn_once_and_score_latents(pipe, caplog, monkeypatch):
    """Should a pipeline pass its references in a way the capture miscounts, the scorers fall back to latents,
    and say so once (a silent fallback would hide that pixel scorers no longer see pixels)."""
    import tokensparse.integrations.diffusers_capture as capture

    original = capture.images_for_scorers
    monkeypatch.setattr(capture, "images_for_scorers", lambda *a, **k: (original(*a, **k) or [])[:1] or None)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        run(pipe)
        run(pipe)
    assert sum("2 references" in r.message and "latents" in r.message for r in caplog.records) == 1
    assert sparse_context_state(pipe).selections == 2  # still selected, once per generation, from latents


def test_a_torch_compile_wrapper_in_place_of_the_transformer_names_the_in_place_compile(pipe):
    pipe.transformer = torch.compile(pipe.transformer)
    with pytest.raises(TypeError, match=r"OptimizedModule.*transformer\.compile\(\)"):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))


class AttnLengths:
    """Image-stream tokens the first double-stream block's attention sees per call (after any merging)."""

    def __init__(self, transformer):
        self.lengths: list[int] = []
        self.handle = transformer.transformer_blocks[0].attn.register_forward_pre_hook(
            lambda m, a, k: self.lengths.append(k["hidden_states"].shape[1]), with_kwargs=True
        )


@pytest.mark.parametrize("kv", [False, True], ids=["klein", "klein-kv"])
def test_token_merging_stacks_with_sparse_context(pipe, kv_pipe, kv):
    p = kv_pipe if kv else pipe
    gs = None if kv else 2.0
    dense = run(p, guidance_scale=gs)
    apply_sparse_context_diffusers(p, SparseContextConfig(keep=0.25, cache=kv))
    sparse = run(p, guidance_scale=gs)
    ts.apply_token_merging(p, ts.TokenMergingConfig(ratio=0.5))
    lengths = AttnLengths(p.transformer)  # registered after merging's hooks: sees the merged input
    stacked = run(p, guidance_scale=gs)
    lengths.handle.remove()
    kept_refs = 2 * REF_TOKENS // 4
    if kv:  # extract step: kept references + merged target; cached step: the merged target only
        assert lengths.lengths == [kept_refs + TARGET_TOKENS // 2, TARGET_TOKENS // 2]
    else:  # two steps x (conditional, unconditional)
        assert lengths.lengths == [TARGET_TOKENS // 2 + kept_refs] * 4
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(p)
    assert np.array_equal(run(p, guidance_scale=gs), sparse)
    remove_sparse_context_diffusers(p)
    assert np.array_equal(run(p, guidance_scale=gs), dense)


# proportional=True (log(size) attention bias) ---------------------------------------------------------------
def _flux2_kwargs(tr, n_txt: int = 4) -> dict:
    """A bare FLUX.2 call: an 8x8 target (T 0) and two 16x16 references (T 10, 20), random tokens."""
    g = torch.Generator().manual_seed(0)
    grids = [(0, 8), (10, 16), (20, 16)]
    ids = torch.cat([torch.cartesian_prod(torch.tensor([t]), torch.arange(s), torch.arange(s), torch.tensor([0]))
                     for t, s in grids]).unsqueeze(0)
    return {
        "hidden_states": torch.randn(1, ids.shape[1], 16, generator=g),
        "encoder_hidden_states": torch.randn(1, n_txt, tr.config.joint_attention_dim, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": ids,
        "txt_ids": torch.zeros(1, n_txt, 4, dtype=torch.long),
        "return_dict": False,
    }


@torch.no_grad()
def test_proportional_bias_equals_duplicated_tokens(pipe):
    kw = _flux2_kwargs(pipe.transformer)
    assert_bias_is_duplication(pipe.transformer, kw, kw["img_ids"][0], refs=(10, 20))


def test_proportional_keep_one_identical_bias_in_every_block_and_remove_restores(pipe):
    rec, dense, plain = keep_one_then_plain_sparse(pipe, run)
    biased = run(pipe, attention_kwargs={"scale": 1.0})  # the caller's own attention kwargs are kept, not mutated
    sizes, bias = sparse_context_state(pipe).sizes[((TARGET_TOKENS + 2 * REF_TOKENS, 16), None)]
    assert torch.equal(sizes[:TARGET_TOKENS], torch.ones(TARGET_TOKENS))  # the target stands for itself
    for r in range(2):  # each reference's sizes sum to its token count
        assert float(sizes[TARGET_TOKENS + r * REF_TOKENS:][:REF_TOKENS].sum()) == REF_TOKENS
    assert len(rec.masks) == 4 * rec.blocks  # 2 steps x 2 guidance passes x every block
    for mask, keys in zip(rec.masks, rec.keys):
        assert mask.shape == (1, 1, 1, keys) and torch.equal(mask[0, 0, 0, -len(bias):], bias)
        assert not mask[0, 0, 0, :-len(bias)].any()  # text tokens: no bias
    assert sparse_context_state(pipe).selections == 1
    assert np.isfinite(biased).all() and not np.array_equal(biased, plain)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe), dense)


def test_proportional_refusals(pipe, kv_pipe):
    from diffusers.models.attention_dispatch import AttentionBackendName

    for target, cache in ((kv_pipe, True), (kv_pipe, False), (pipe, True)):
        with pytest.raises(ValueError, match="Flux2KVAttnProcessor"):
            apply_sparse_context_diffusers(target, SparseContextConfig(keep=0.5, proportional=True, cache=cache))
    apply_sparse_context_diffusers(kv_pipe.transformer, SparseContextConfig(keep=0.5, proportional=True))
    with pytest.raises(ValueError, match="K/V cache"):  # the bare transformer: refused at its K/V call
        run(kv_pipe, guidance_scale=None)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, proportional=True))
    with pytest.raises(ValueError, match="already has one"):
        run(pipe, attention_kwargs={"attention_mask": torch.ones(1, 1, 1, 1)})
    processor = pipe.transformer.single_transformer_blocks[0].attn.processor
    processor._attention_backend = AttentionBackendName._NATIVE_FLASH  # takes no mask
    with pytest.raises(ValueError, match="_native_flash"):
        run(pipe)
    processor._attention_backend = None
    run(pipe)


def test_token_merging_stacks_with_proportional_sparse_context(pipe, caplog):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, proportional=True))
    sparse = run(pipe)
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    lengths, rec = AttnLengths(pipe.transformer), MaskRecorder(pipe.transformer)  # after merging: merged inputs
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        stacked = run(pipe)
    assert "attention_mask" not in caplog.text  # the double-stream attention merges with the [text, image] mask
    kept_refs = 2 * REF_TOKENS // 4
    assert lengths.lengths == [TARGET_TOKENS // 2 + kept_refs] * 4
    (_, bias), = sparse_context_state(pipe).sizes.values()
    for mask, keys in zip(rec.masks, rec.keys):  # text and the merged target unbiased, the kept references
        assert mask.shape[-1] == keys and torch.equal(mask[0, 0, 0, -kept_refs:], bias[TARGET_TOKENS:])
        assert not mask[0, 0, 0, :-kept_refs].any()
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(pipe), sparse)


def test_attention_selector_warns_once(pipe, caplog, monkeypatch):
    """diffusers has no attention probe: apply says so (logged), and the selection does not warn again."""
    import warnings

    from tokensparse.selection import scorers

    monkeypatch.setattr(scorers, "_warned_probe", False)
    with caplog.at_level(logging.WARNING, logger="tokensparse"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="attention"))
        run(pipe, guidance_scale=1.0, num_inference_steps=1)
    logged = [r.getMessage() for r in caplog.records if "probe" in r.getMessage()]
    assert len(logged) == 1 and "scores like 'foreground'" in logged[0]
    assert [str(w.message) for w in caught if "probe" in str(w.message)] == []  # was a second, UserWarning
