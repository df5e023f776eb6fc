"""Sparse Context on a tiny random-weight Z-Image Omni pipeline (tiny Qwen3 text encoder and SigLIP2, built offline).

``ZImageOmniPipeline`` hands ``ZImageTransformer2DModel`` per sample the list ``[reference latents..., noisy target]``;
the transformer patchifies them into one image sequence (each image padded to 32 rows), places image ``j`` at
``(cap_end_j, h, w)`` and runs ``[caption, images, SigLIP]`` through its layers, returning the target's latents.
A 68x64 reference is 17x16 = 272 tokens (+16 padding rows); the 64x64 target 256.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_zimage import tiny_z_image_omni

from .contract import generate_app, pipe_fixtures, reapply_then_remove, refuses_proportional_and_cache

REF_TOKENS, REF_PAD, TARGET = 17 * 16, 16, 16 * 16
KEPT = REF_TOKENS // 4
REF = (np.random.RandomState(0).rand(68, 64, 3) * 255).astype("uint8")


pipe, clean = pipe_fixtures(tiny_z_image_omni)


def ref_image(i: int = 0) -> Image.Image:
    return Image.fromarray(np.roll(REF, 7 * i, 0))


def run(pipe, refs: int = 1, prompt="a cat", **kwargs):
    return pipe(image=[ref_image(i) for i in range(refs)], prompt=prompt, height=64, width=64, num_inference_steps=2,
                guidance_scale=2.0, generator=torch.Generator().manual_seed(0), output_type="np",
                max_sequence_length=32, **kwargs).images


class Seen:
    """The positional inputs of a block (a forward pre-hook): ``(x, mask, freqs, adaln, noise mask, ...)``."""

    def __init__(self, block) -> None:
        self.calls: list[tuple] = []
        self.handle = block.register_forward_pre_hook(lambda m, args: self.calls.append(args))

    def lengths(self) -> list[int]:
        self.handle.remove()
        return [args[0].shape[1] for args in self.calls]


def test_identity_fewer_tokens_reapply_and_remove(pipe):
    full = Seen(pipe.transformer.layers[0])
    dense = run(pipe)
    n_dense = full.lengths()[0]
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe.transformer.layers[0])
    sparse = run(pipe)
    assert seen.lengths() == [n_dense - (REF_TOKENS - KEPT)] * 2  # 2 steps, CFG batched; only reference tokens go
    assert [args[0].shape[0] for args in seen.calls] == [2, 2]
    state = sparse_context_state(pipe)
    assert state.selections == 1
    (index, layout), = state.index.values()
    assert layout.grids == [(17, 16)] and layout.n == REF_TOKENS + TARGET and index.numel() == KEPT + TARGET
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])
    assert "patchify_and_embed_omni" not in pipe.transformer.__dict__  # the stand-in went with the hook


def test_kept_tokens_keep_their_positions_noise_mask_and_content(pipe):
    tr = pipe.transformer
    refiner, main = Seen(tr.noise_refiner[0]), Seen(tr.layers[0])
    run(pipe)
    refiner.handle.remove(), main.handle.remove()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="random"))
    refiner_s, main_s = Seen(tr.noise_refiner[0]), Seen(tr.layers[0])
    run(pipe)
    refiner_s.handle.remove(), main_s.handle.remove()
    (index, _), = sparse_context_state(pipe).index.values()
    assert not torch.equal(index[:KEPT], torch.arange(KEPT))  # a scattered subset, not a prefix
    # the image rows of the dense call (reference, its 16 padding rows, target) that the sparse call should keep
    real = torch.cat([torch.arange(REF_TOKENS), torch.arange(REF_TOKENS + REF_PAD, REF_TOKENS + REF_PAD + TARGET)])
    rows = torch.cat([real[index[:KEPT]], torch.arange(REF_TOKENS, REF_TOKENS + REF_PAD), real[REF_TOKENS:]]).sort()[0]
    dense, sparse = refiner.calls[0], refiner_s.calls[0]  # (x, x_mask, x_freqs, adaln, x_noise, t_noisy, t_clean)
    assert sparse[0].shape[1] == rows.numel() == KEPT + REF_PAD + TARGET
    assert torch.equal(sparse[2], dense[2][:, rows])  # RoPE rows: every kept token at its own (cap_end, h, w)
    assert torch.equal(sparse[4], dense[4][:, rows])  # the per-token noise mask: clean references, noisy target
    assert torch.allclose(sparse[0], dense[0][:, rows], atol=1e-6)  # the same embedded patches
    # the unified sequence [caption, images, SigLIP]: the caption and SigLIP rows untouched, the image rows thinned
    d_freqs, s_freqs = main.calls[0][2], main_s.calls[0][2]
    n_img = REF_TOKENS + REF_PAD + TARGET
    n_cap = next(c for c in range(d_freqs.shape[1]) if torch.equal(d_freqs[:, c:c + n_img], dense[2]))
    unified_rows = torch.cat([torch.arange(n_cap), n_cap + rows, torch.arange(n_cap + n_img, d_freqs.shape[1])])
    assert torch.equal(s_freqs, d_freqs[:, unified_rows])
    assert torch.equal(main_s.calls[0][4], main.calls[0][4][:, unified_rows])


def test_batch_and_two_references(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe.transformer.noise_refiner[0])
    out = run(pipe, refs=2, prompt=["a cat", "a dog"])
    seen.lengths()
    assert out.shape == (2, 64, 64, 3) and np.isfinite(out).all()
    assert [args[0].shape[:2] for args in seen.calls] == [(4, 2 * (KEPT + REF_PAD) + TARGET)] * 2  # 2 prompts, CFG
    (index, layout), = sparse_context_state(pipe).index.values()
    assert layout.grids == [(17, 16), (17, 16)] and index.numel() == 2 * KEPT + TARGET


def test_pixel_scorers_get_the_references_pixels(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, refs=2)
    images = sparse_context_state(pipe).images
    assert images is not None and len(images) == 2
    for i, image in enumerate(images):
        want = torch.from_numpy(np.roll(REF, 7 * i, 0).astype(np.float32) / 255).permute(2, 0, 1)[None]
        assert image.shape == want.shape and torch.allclose(image, want, atol=1e-6)


def test_bare_transformer_one_selection_per_generation(pipe):
    tr = pipe.transformer
    torch.manual_seed(0)
    ref, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)  # 4x4 tokens each (16: padded to 32)
    call = {"cap_feats": [[torch.randn(5, 16), torch.randn(3, 16)]], "siglip_feats": [None],
            "image_noise_mask": [[0, 1]], "return_dict": False}
    dense = [tr([[ref, target]], torch.tensor([t]), **call)[0][0] for t in (0.0, 0.5)]
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25))
    seen = Seen(tr.noise_refiner[0])
    out = [tr([[ref, target]], torch.tensor([t]), **call)[0][0] for t in (0.0, 0.5, 0.0)]  # t rises in a generation
    assert seen.lengths() == [(4 + 16) + (16 + 16)] * 3  # 4 kept reference tokens and 16 padding rows, the target
    assert out[0].shape == dense[0].shape == (4, 1, 8, 8) and not torch.equal(out[0], dense[0])
    assert sparse_context_state(tr).selections == 2  # t back to 0: a new generation
    remove_sparse_context_diffusers(tr)


def test_text_to_image_runs_unchanged(pipe, caplog):
    def t2i(p):
        return p(prompt="a cat", height=64, width=64, num_inference_steps=2, guidance_scale=2.0, output_type="np",
                 generator=torch.Generator().manual_seed(0), max_sequence_length=32).images

    dense = t2i(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(t2i(pipe), dense) and "no reference tokens" in caplog.text


def test_proportional_cache_and_controlnet_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "ZImageTransformer2DModel .its forward reads only the LoRA scale")
    tr = pipe.transformer
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.5))
    x = [[torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)]]
    with pytest.raises(ValueError, match="cannot thin ZImageTransformer2DModel's controlnet_block_samples"):
        tr(x, torch.tensor([0.0]), [[torch.randn(5, 16)] * 2], siglip_feats=[None], image_noise_mask=[[0, 1]],
           controlnet_block_samples={0: torch.zeros(1)})


def test_a_transformer_it_cannot_thin_is_refused_without_leaving_hooks(pipe, monkeypatch):
    from diffusers import ZImageTransformer2DModel

    tr = pipe.transformer
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5))  # an earlier config, replaced by the next
    monkeypatch.delattr(ZImageTransformer2DModel, "patchify_and_embed_omni")  # a diffusers version it does not know
    with pytest.raises(TypeError, match="has no patchify_and_embed_omni"):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert not tr._forward_pre_hooks and not tr._forward_hooks and sparse_context_state(pipe) is None


def test_generate_cli_takes_several_references(pipe, tmp_path):
    from typer.testing import CliRunner

    app = generate_app()
    pipe.save_pretrained(tmp_path / "zimage")
    refs = []
    for i in range(2):
        ref_image(i).save(tmp_path / f"{i}.png")
        refs += ["--ref", str(tmp_path / f"{i}.png")]
    out = tmp_path / "z.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "zimage"), *refs, "--prompt", "a cat",
                                   "--height", "64", "--width", "64", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output  # float32 on CPU: its VAE is made bfloat16, as the pipeline casts the refs
    assert "ZImageOmniPipeline, 2 reference(s), keep=0.25" in res.output and Image.open(out).size == (64, 64)
