"""Sparse Context on a tiny random-weight GLM-Image pipeline (no AR prior: random prior tokens, built offline).

``GlmImagePipeline`` runs ``GlmImageTransformer2DModel`` once per condition image before the denoising loop (K/V
cache mode "write": the image's latent alone, timestep 0), and every denoising call reads those K/V from the cache
("read"; the unconditional pass "skip"s them). Sparse Context thins the write calls: the cache holds the kept
tokens' K/V, with the RoPE rows of their own positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from tests.integrations.contract import pipe_fixtures, reapply_then_remove, refuses_proportional_and_cache
from tokensparse.context import SparseContextConfig
from tokensparse.integrations import diffusers as wiring
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_glm_image import glm_image_call_kwargs, tiny_glm_image

from .contract import generate_app, pipeline_folder

TOKENS = 8 * 8  # 32x32 images: 4 pixels per token side (VAE /2, 2x2 patches)
KEPT = TOKENS // 4


def ref(i: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8"))


pipe, clean = pipe_fixtures(tiny_glm_image)


class Seen:
    """Per transformer call: its K/V-cache mode, the tokens its latent holds, and (read calls) the cached tokens."""

    def __init__(self, tr) -> None:
        self.calls: list[tuple[str | None, int, int | None]] = []
        self.handle = tr.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        cache = kwargs["kv_caches"][0]
        hs = kwargs["hidden_states"]
        cached = cache.k_caches[0].shape[1] if cache.mode == "read" else None
        self.calls.append((cache.mode, hs.shape[-2] * hs.shape[-1] // 4, cached))


def run(pipe, image=None, prompt="a cat", prompts=1):
    image = [ref(0)] if image is None else image
    return pipe(prompt=prompt, **glm_image_call_kwargs(image, prompts=prompts)).images


def test_identity_sparse_fewer_cached_tokens_remove_and_reapply(pipe):
    image = [ref(0), ref(1)]  # two condition images: two write calls
    dense = run(pipe, image)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe, image), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe.transformer)  # registered after Sparse Context's hook: sees the thinned calls
    sparse = run(pipe, image)
    seen.handle.remove()
    # each write sees a quarter of its image; the denoising calls keep the whole target and read 2 x 16 cached K/V
    assert seen.calls == [("write", KEPT, None)] * 2 + [("read", TOKENS, 2 * KEPT), ("skip", TOKENS, None)] * 2
    assert sparse_context_state(pipe).selections == 2  # one per condition image
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, lambda p: run(p, image), sparse, dense, [pipe.transformer])


def _write_call(pipe, index=None):
    """One condition-image write by hand: ``(output, layer-0 K, layer-1 K)``; with ``index``, only those tokens,
    thinned without Sparse Context (the projector's tokens, the RoPE rows and the prior ids subset by hooks)."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    tr = pipe.transformer
    latent = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    prior = torch.randint(0, 32, (TOKENS,), generator=torch.Generator().manual_seed(4))
    cache = GlmImageKVCache(num_layers=2)
    cache.set_mode("write")
    kwargs = {"hidden_states": latent, "encoder_hidden_states": torch.zeros(1, 0, 16), "prior_token_id": prior,
              "prior_token_drop": torch.zeros(TOKENS, dtype=torch.bool), "timestep": torch.zeros(1),
              "target_size": torch.tensor([[32, 32]]), "crop_coords": torch.zeros(1, 2), "kv_caches": cache}
    handles = []
    if index is not None:
        kwargs["image_rotary_emb"] = tuple(r[index] for r in tr.rope(latent))
        kwargs["prior_token_id"], kwargs["prior_token_drop"] = prior[index], kwargs["prior_token_drop"][index]

        def pad(module, args, out):  # back to 64 tokens so that the transformer can unpatchify
            dense = out.new_zeros(1, TOKENS, out.shape[-1])
            dense[:, index] = out
            return dense

        handles = [tr.image_projector.register_forward_hook(lambda m, a, out: out[:, index]),
                   tr.proj_out.register_forward_hook(pad)]
    try:
        out = tr(**kwargs).sample
    finally:
        for h in handles:
            h.remove()
    return out, cache[0].k_caches[0], cache[1].k_caches[0]


def test_kept_tokens_keep_their_positions(pipe):
    _, dense_k0, _ = _write_call(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    out, k0, k1 = _write_call(pipe)
    (index, layout), = sparse_context_state(pipe).index.values()
    assert layout.grids == [(8, 8)] and index.numel() == KEPT and k0.shape[1] == KEPT
    # layer 0's keys are per token (projection, prior, RoPE): the kept rows of the dense ones
    assert torch.allclose(k0, dense_k0[:, index], atol=1e-6)
    remove_sparse_context_diffusers(pipe)
    want_out, want_k0, want_k1 = _write_call(pipe, index)  # the transformer by hand on the subset
    assert torch.allclose(k0, want_k0, atol=1e-6) and torch.allclose(k1, want_k1, atol=1e-5)
    assert torch.allclose(out, want_out, atol=1e-5)  # the output on the dense grid, dropped patches zero
    patches = out.reshape(1, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, TOKENS, -1)
    dropped = torch.ones(TOKENS, dtype=torch.bool)
    dropped[index] = False
    assert (patches[:, dropped] == 0).all() and (patches[:, index] != 0).any()


def test_pixel_scorers_and_prompts_reach_each_write_of_a_batch(pipe, monkeypatch):
    views = []
    original = wiring.keep_mask
    monkeypatch.setattr(wiring, "keep_mask", lambda v, cfg, **kw: views.append(v) or original(v, cfg, **kw))
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    seen = Seen(pipe.transformer)
    images = [[ref(0), ref(1)], [ref(2), ref(3)]]  # two prompts, two condition images each
    out = run(pipe, images, prompt=["a cat", "a dog"], prompts=2)
    seen.handle.remove()
    assert out.shape[0] == 2 and np.isfinite(out).all()
    assert [c[:2] for c in seen.calls[:4]] == [("write", KEPT)] * 4 and seen.calls[4][2] == 2 * KEPT
    assert [v[0].prompts for v in views] == [["a cat"]] * 2 + [["a dog"]] * 2
    for v, i in zip(views, range(4)):
        want = torch.from_numpy(np.asarray(ref(i), dtype=np.float32) / 255).permute(2, 0, 1)[None]
        assert len(v) == 1 and torch.allclose(v[0].image, want)


def test_random_draws_each_condition_image_its_own_cells(pipe):
    from tokensparse.context import keep_mask
    from tokensparse.selection import RefView

    cfg = SparseContextConfig(keep=0.25, selector="random", seed=5)
    apply_sparse_context_diffusers(pipe, cfg)
    kept = []

    def record(module, args, kwargs):  # after Sparse Context's pre-hook: the write's selection is the only one
        if kwargs["kv_caches"][0].mode == "write":
            (index, _), = sparse_context_state(pipe).index.values()
            kept.append(index.tolist())

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        images = [[ref(0), ref(1)], [ref(2), ref(3)]]  # two prompts, two same-sized condition images each
        run(pipe, images, prompt=["a cat", "a dog"], prompts=2)
        first = kept[:]
        run(pipe, images, prompt=["a cat", "a dog"], prompts=2)
    finally:
        handle.remove()
    assert first[0] != first[1]  # was: every write re-seeded, the same cells for every image of one size
    # what one call holding both images draws (FLUX.2, Kontext, Qwen): one generator, image after image
    both = keep_mask([RefView(torch.zeros(1, 8, 8, 4), index=r) for r in range(2)], cfg)[0]
    assert [torch.nonzero(m).squeeze(1).tolist() for m in both.split(TOKENS)] == first[:2]
    assert first[2:] == first[:2] and kept[4:] == first  # each sample alike; the same again for the same seed


def test_auto_reads_each_samples_own_prompt_without_a_warning(pipe, monkeypatch, caplog):
    prompts = []
    original = wiring.keep_mask
    monkeypatch.setattr(wiring, "keep_mask",
                        lambda v, cfg, **kw: prompts.append(v[0].prompts) or original(v, cfg, **kw))
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="auto"))
    run(pipe, [[ref(0)], [ref(1)]], prompt=["a cat", "change the background"], prompts=2)
    assert prompts == [["a cat"], ["change the background"]]  # each sample selected on its own
    assert "the prompts of this batch differ" not in caplog.text  # what the pipelines sharing one selection warn


def test_text_to_image_runs_unchanged(pipe, caplog):
    dense = pipe(prompt="a cat", **glm_image_call_kwargs(None)).images
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(pipe(prompt="a cat", **glm_image_call_kwargs(None)).images, dense)
    assert "no reference tokens" in caplog.text


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(
        pipe, proportional="GlmImageTransformer2DModel .its GlmImageAttnProcessor takes only",
        cache="GlmImagePipeline caches its condition images' K/V itself")


def test_samples_keeping_different_counts_are_a_value_error_naming_it():
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    from tokensparse.integrations.diffusers_models import GlmImageAdapter

    cache = GlmImageKVCache(num_layers=1)
    cache[0].k_caches = [torch.zeros(1, 16, 2, 8), torch.zeros(1, 12, 2, 8)]  # e.g. adaptive budgets
    cache.set_mode("read")
    with pytest.raises(ValueError, match=r"K/V caches of \[12, 16\] tokens"):
        GlmImageAdapter().is_kv_cached_call({"kv_caches": cache})


# tokensparse generate ----------------------------------------------------------------------------------------------
def _cli(tmp_path, *extra):
    from typer.testing import CliRunner

    app = generate_app()
    folder = pipeline_folder(tmp_path / "glm", "GlmImagePipeline")
    refs = []
    for i in range(2):
        refs += ["--ref", str(tmp_path / f"{i}.png")]
        ref(i).save(tmp_path / f"{i}.png")
    args = ["generate", "--model", str(folder), "--prompt", "a cat", *refs, "--out", str(tmp_path / "o.png"), *extra]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("extra, message", [
    ([], "GlmImagePipeline needs --height and --width"),
    (["--height", "32", "--width", "32", "--cache"], "caches its reference images' K/V itself"),
    (["--height", "32", "--width", "32", "--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
])
def test_cli_refuses_before_loading(tmp_path, extra, message):
    result = _cli(tmp_path, *extra)  # the folder holds only model_index.json: a later check would fail to load
    assert result.exit_code == 1 and message in result.output and "cannot load" not in result.output


@pytest.mark.parametrize("merge", [[], ["--merge", "0.5"]], ids=["sparse", "sparse_and_merging"])
def test_cli_generates_with_several_references(tmp_path, monkeypatch, merge):
    import diffusers

    def prior_tokens(self, prompt, height, width, image=None, device=None, generator=None):  # the AR prior's stand-in
        kwargs = glm_image_call_kwargs(image[0], size=height)  # one prompt, square target
        return kwargs["prior_token_ids"], kwargs["prior_token_image_ids"], kwargs["source_image_grid_thw"]

    monkeypatch.setattr(diffusers.GlmImagePipeline, "generate_prior_tokens", prior_tokens)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: tiny_glm_image())
    result = _cli(tmp_path, "--height", "32", "--width", "32", "--steps", "2", "--device", "cpu", *merge)
    assert result.exit_code == 0, result.output  # --merge: was "--merge: GlmImagePipeline's transformer ..."
    assert "GlmImagePipeline, 2 reference(s), keep=0.25" in result.output
    assert ("merge=0.5" in result.output) == bool(merge)
    assert Image.open(tmp_path / "o.png").size == (32, 32)
