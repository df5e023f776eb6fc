"""Sparse Context on a tiny random-weight Qwen-Image-Edit-Plus pipeline (saved and reloaded from a temp dir).

The tiny pipeline has no Qwen2.5-VL text encoder: it is called with random prompt embeddings, which
exercises everything Sparse Context touches (VAE references, transformer, RoPE, true CFG).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image

import tokensparse as ts
from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny import qwen_call_kwargs, tiny_qwen_image_edit_plus

from .contract import qwen_thinned_call

TOKENS = 8 * 8  # 32x32 images: VAE /2, 2x2 patches


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen") / "pipe"
    tiny_qwen_image_edit_plus(seed=0, zero_cond_t=True).save_pretrained(path)
    return path


@pytest.fixture
def pipe(saved_dir, monkeypatch):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module
    from diffusers import DiffusionPipeline

    monkeypatch.setattr(module, "VAE_IMAGE_SIZE", 32 * 32)  # references are resized to this many pixels
    p = DiffusionPipeline.from_pretrained(saved_dir, text_encoder=None, tokenizer=None, processor=None)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe):
    refs = [Image.fromarray((np.random.RandomState(s).rand(32, 32, 3) * 255).astype("uint8")) for s in (0, 1)]
    return pipe(
        image=refs, generator=torch.Generator().manual_seed(0), output_type="np", **qwen_call_kwargs()
    ).images


def test_identity_sparse_remove_and_reapply(pipe):
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline" and pipe.transformer.config.zero_cond_t
    seen: list[int] = []
    pipe.transformer.img_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    dense = run(pipe)
    assert seen == [3 * TOKENS] * 4  # 2 steps x true CFG
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    sparse = run(pipe)
    assert seen == [TOKENS + 2 * TOKENS // 4] * 4
    assert sparse_context_state(pipe).selections == 1
    assert len(sparse_context_state(pipe).images) == 2
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(run(pipe), sparse)
    assert len(pipe.transformer._forward_pre_hooks) == len(pipe.transformer.pos_embed._forward_pre_hooks) == 1
    remove_sparse_context_diffusers(pipe)
    assert not pipe.transformer._forward_pre_hooks and not pipe.transformer.pos_embed._forward_pre_hooks
    assert np.array_equal(run(pipe), dense)


def test_kept_tokens_get_their_dense_rope_rows(pipe):
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    shapes = [[(1, 8, 8), (1, 8, 8), (1, 4, 8)]]
    n = 64 + 64 + 32
    kw = {
        "hidden_states": torch.randn(1, n, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, 5),
        "timestep": torch.tensor([0.5]),
        "img_shapes": shapes,
        "return_dict": False,
    }
    with torch.no_grad():
        dense_freqs = tr.pos_embed(shapes, max_txt_seq_len=5, device=torch.device("cpu"))
    out, index, seen = qwen_thinned_call(tr, kw)
    assert out.shape == (1, n, 16)
    assert len(index) == 64 + 16 + 8 and (index[:64] == torch.arange(64)).all()
    torch.testing.assert_close(seen["rope"][0], dense_freqs[0][index], rtol=0, atol=0)
    torch.testing.assert_close(seen["rope"][1], dense_freqs[1], rtol=0, atol=0)
    assert seen["mod"].tolist() == [[0] * 64 + [1] * 24]  # zero_cond_t: kept references use t = 0


def test_single_reference_qwen_image_edit_pipeline(monkeypatch):
    """QwenImageEditPipeline (one reference, the pre-Plus model) shares the transformer and its layout."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module
    from diffusers import QwenImageEditPipeline

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (32, 32, None))  # not 1024^2
    pipe = QwenImageEditPipeline(**tiny_qwen_image_edit_plus(seed=0).components)
    pipe.set_progress_bar_config(disable=True)
    seen: list[int] = []
    pipe.transformer.img_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    ref = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))

    def run():
        return pipe(image=ref, generator=torch.Generator().manual_seed(0), output_type="np",
                    **qwen_call_kwargs()).images

    dense = run()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen.clear()
    sparse = run()
    assert seen == [TOKENS + TOKENS // 4] * 4 and len(sparse_context_state(pipe).images) == 1
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(), dense)


def test_token_merging_on_the_target_stacks_with_sparse_context(pipe):
    dense = run(pipe)
    seen: list[int] = []
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    for blk in pipe.transformer.transformer_blocks:  # after merging's hooks: sees the merged image stream
        blk.attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape[1]), with_kwargs=True)
    merged = run(pipe)
    assert seen == [TOKENS // 2 + 2 * TOKENS] * 8  # 2 blocks x 2 steps x true CFG: target halved, references whole
    assert np.isfinite(merged).all() and not np.array_equal(merged, dense)
    seen.clear()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    stacked = run(pipe)
    assert seen == [TOKENS // 2 + 2 * TOKENS // 4] * 8
    assert np.isfinite(stacked).all()
    ts.remove_token_merging(pipe)
    remove_sparse_context_diffusers(pipe)
    assert np.array_equal(run(pipe), dense)


def test_the_layered_transformer_takes_its_last_image_as_the_reference():
    # QwenImageLayeredPipeline's sequence: its target layers, then the input image (test_diffusers_qwen_layered)
    from diffusers import QwenImageTransformer2DModel

    from tokensparse.integrations.diffusers_models import QwenImageAdapter, QwenImageLayeredAdapter, adapter_class

    config = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=16,
                  num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), use_additional_t_cond=True)
    layered = QwenImageTransformer2DModel(**config, use_layer3d_rope=True)
    assert adapter_class(None, layered) is QwenImageLayeredAdapter
    assert adapter_class(None, QwenImageTransformer2DModel(**config)) is QwenImageAdapter
    kw = {"hidden_states": torch.zeros(1, 3 * 16 + 24, 16), "img_shapes": [[(1, 4, 4)] * 3 + [(1, 4, 6)]]}
    layout = QwenImageLayeredAdapter().layout(kw)
    assert layout.grids == [(4, 6)] and layout.positions[0].tolist() == list(range(48, 72))


def test_proportional_is_refused_naming_the_processor(pipe):
    with pytest.raises(ValueError, match="QwenDoubleStreamAttnProcessor2_0 refuses an external attention_mask"):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, proportional=True))
    assert sparse_context_state(pipe) is None
