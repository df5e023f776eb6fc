"""Sparse Context on a tiny random-weight Qwen-Image-Layered pipeline (tiny Qwen2.5-VL text encoder, RGBA VAE).

``QwenImageLayeredPipeline`` feeds the layered Qwen-Image transformer ``[layer 0, ..., layer L, input image]``
(``img_shapes`` in that order): every layer is a target, the input image (last) the one reference. Its
``QwenEmbedLayer3DRope`` gives the last entry the condition image's frequencies and offsets the text rows by every
entry's grid and the layer count, so the kept tokens' rows come from the dense shapes.
"""

from __future__ import annotations

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
    sparse_context_state,
)
from tokensparse.integrations.diffusers_models import QwenImageLayeredAdapter

from .contract import (
    edges_views,
    generate_app,
    input_lengths,
    pipeline_folder,
    qwen_layered_pipe,
    qwen_thinned_call,
    reapply_then_remove,
    refuses_proportional_and_cache,
)

TOKENS = 8 * 8  # 32x32 pixels: VAE /2, 2x2 patches
LAYERS = 2  # the pipeline's target layers: the composite and LAYERS more
INPUT = (np.random.RandomState(0).rand(32, 32, 4) * 255).astype("uint8")


pipe = qwen_layered_pipe()  # 32x32 pixels, not 640^2


def lengths(pipe) -> list[int]:
    return input_lengths(pipe.transformer.img_in)


def run(pipe, **kwargs):
    out = pipe(image=Image.fromarray(INPUT, "RGBA"), prompt="a cat", negative_prompt="blur", true_cfg_scale=2.0,
               layers=LAYERS, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np",
               **kwargs).images
    return np.stack(out)


def test_identity_sparse_remove_and_reapply(pipe):
    seen = lengths(pipe)
    dense = run(pipe)
    assert seen == [(LAYERS + 2) * TOKENS] * 4  # 2 steps x true CFG: the composite, LAYERS layers, the input image
    assert dense.shape == (1, LAYERS, 32, 32, 4)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert seen == [(LAYERS + 1) * TOKENS + TOKENS // 4] * 4  # the input image thinned, every target layer whole
    state = sparse_context_state(pipe)
    assert isinstance(pipe.transformer.__dict__["_tokensparse_sparse_context"].adapter, QwenImageLayeredAdapter)
    assert state.selections == 1 and state.prompts == ["a cat"]
    (index, layout), = state.index.values()
    assert layout.grids == [(8, 8)] and layout.positions[0].tolist() == list(range(3 * TOKENS, 4 * TOKENS))
    assert (index[:3 * TOKENS] == torch.arange(3 * TOKENS)).all() and index.numel() == 3 * TOKENS + TOKENS // 4
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    assert np.array_equal(run(pipe), sparse) and state.selections == 2  # one selection per generation
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer, pipe.transformer.pos_embed])


def test_kept_tokens_get_their_dense_rope_rows_and_modulation():
    """Bare layered transformer (``zero_cond_t``), the input image on a larger grid than the layers: the blocks get
    the dense RoPE rows of the kept tokens (the condition image's for the input image's) and the dense text rows
    (offset by the input image's grid, which a (1, 1, K) entry would change), and the dense modulation index."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), use_layer3d_rope=True, use_additional_t_cond=True,
        zero_cond_t=True).eval()
    g = torch.Generator().manual_seed(0)
    shapes = [[(1, 4, 4), (1, 4, 4), (1, 6, 10)]]
    n = 16 + 16 + 60
    kw = {"hidden_states": torch.randn(1, n, 16, generator=g),
          "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
          "encoder_hidden_states_mask": torch.ones(1, 5), "timestep": torch.tensor([0.5]), "img_shapes": shapes,
          "additional_t_cond": torch.tensor([0]), "return_dict": False}
    with torch.no_grad():
        dense_freqs = tr.pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))
        thin_freqs = tr.pos_embed([[(1, 4, 4), (1, 4, 4), (1, 1, 15)]], max_txt_seq_len=5, device=torch.device("cpu"))
    assert not torch.equal(thin_freqs[1], dense_freqs[1])  # what the counting shapes alone would give the text
    out, index, seen = qwen_thinned_call(tr, kw)
    assert out.shape == (1, n, 16)
    assert len(index) == 32 + 15 and (index[:32] == torch.arange(32)).all() and (index[32:] >= 32).all()
    torch.testing.assert_close(seen["rope"][0], dense_freqs[0][index], rtol=0, atol=0)
    torch.testing.assert_close(seen["rope"][1], dense_freqs[1], rtol=0, atol=0)
    assert seen["mod"].tolist() == [[0] * 16 + [1] * (16 + 15)]  # layer 0 at t, the rest at 0: as dense


def test_a_pixel_selector_scores_the_input_images_rgb(pipe, monkeypatch):
    seen = edges_views(monkeypatch, pipe, run)
    (view,) = seen  # one reference, one selection
    assert view.grid == (8, 8) and view.image.shape == (1, 3, 32, 32)
    assert np.abs(view.image[0].permute(1, 2, 0).numpy() - INPUT[..., :3] / 255).max() < 0.01


def test_proportional_and_cache_are_refused(pipe):
    refuses_proportional_and_cache(pipe, "QwenDoubleStreamAttnProcessor2_0 refuses an external attention_mask")


def test_a_call_without_the_input_image_entry_is_left_dense(pipe, caplog):
    """A layered call of one entry (nothing before the last): no reference, the call runs as is with a warning."""
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    kw = {"hidden_states": torch.randn(1, 16, 32, generator=g),
          "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
          "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 4, 4)]], "additional_t_cond": torch.tensor([0]),
          "return_dict": False}
    with torch.no_grad():
        dense = tr(**kw)[0]
        ts.apply_sparse_context(tr, SparseContextConfig(keep=0.25))
        assert torch.equal(tr(**kw)[0], dense)
    ts.remove_sparse_context(tr)
    assert "no reference tokens" in caplog.text


def test_generate_cli_refuses_a_second_reference_before_loading(tmp_path):
    """``tokensparse generate`` runs it (tests/integrations/test_diffusers_cli_layered.py); it was refused, and now
    refuses what it cannot take before loading."""
    from typer.testing import CliRunner

    app = generate_app()
    folder = pipeline_folder(tmp_path / "layered", "QwenImageLayeredPipeline")
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--ref", str(_png(tmp_path)), "--ref",
                                   str(_png(tmp_path)), "--prompt", "a cat", "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 1 and "give that image as one --ref (got 2)" in res.output
    assert "cannot load" not in res.output


def _png(tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(INPUT[..., :3]).save(path)
    return path
