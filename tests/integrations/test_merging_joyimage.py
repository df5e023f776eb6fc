"""Token merging on JoyImage Edit (``JoyImageEditTransformer3DModel``, ``JoyImageEditPipeline``) and JoyImage Edit Plus
(``JoyImageEditPlusTransformer3DModel``, ``JoyImageEditPlusPipeline``): the target, first in the image stream, merges
in every double-stream block's attention (its RoPE rows, Plus: its key mask, along) and image MLP; the references and
the text never. Their ``3D`` class names are no video models: the frame axis holds the target and its references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_joyimage_edit_plus")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.integrations.diffusers_tiny_joyimage import (  # noqa: E402
    tiny_joyimage_edit,
    tiny_joyimage_edit_plus,
)
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402
from .contract import joyimage_small_buckets, tiny_pipeline  # noqa: E402, F401 (an autouse fixture)

TARGET = 64  # the bare calls' 8x8 target grid (a 16x16 latent, 2x2 patches), a reference of as many tokens after it
TEXT = 5
REF = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
REF_WIDE = (np.random.RandomState(1).rand(32, 48, 3) * 255).astype("uint8")

edit = tiny_pipeline(tiny_joyimage_edit)
plus = tiny_pipeline(tiny_joyimage_edit_plus)




def _edit_call(batch: int = 2, seed: int = 0) -> dict:
    """Items ``(B, 2, C, 1, 16, 16)``: a reference, then the target."""
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 2, 4, 1, 16, 16, generator=g), "timestep": torch.full((batch,), 700.0),
            "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g), "return_dict": False}


def _plus_call(batch: int = 2, seed: int = 0) -> dict:
    """Patches ``(B, 128, C, 1, 2, 2)``: the 8x8 target, then an 8x8 reference; the second prompt padded."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, TEXT, dtype=torch.long)
    mask[1:, -2:] = 0
    return {"hidden_states": torch.randn(batch, 2 * TARGET, 4, 1, 2, 2, generator=g),
            "timestep": torch.full((batch,), 700.0), "encoder_hidden_states": torch.randn(batch, TEXT, 16, generator=g),
            "encoder_hidden_states_mask": mask, "shape_list": [[(1, 8, 8), (1, 8, 8)]] * batch, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(f"{i}.{key}", getattr(blk, key)) for i, blk in enumerate(model.double_blocks)
            for key in ("attn", "img_mlp", "txt_mlp")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def _expected(gone_attn: int, gone_mlp: int) -> dict[str, list[int]]:
    return {f"{i}.{key}": [n] for i in range(2) for key, n in (
        ("attn", 2 * TARGET - gone_attn), ("img_mlp", 2 * TARGET - gone_mlp), ("txt_mlp", TEXT))}


@pytest.mark.parametrize("build, call", [(tiny_joyimage_edit, _edit_call), (tiny_joyimage_edit_plus, _plus_call)],
                         ids=["edit", "plus"])
def test_merges_the_target_only_and_removes_exactly(build, call) -> None:
    model, kw = build(seed=0).transformer, call()
    assert merging_supports(model) is None  # not refused as a video model
    dense = _run(model, kw)
    unmerged = _counts(model, kw)
    assert unmerged == _expected(0, 0)
    attn = model.double_blocks[0].attn
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert _counts(model, kw) == _expected(TARGET // 2, TARGET // 2)
    assert merging_state(model).merged_tokens == 2 * TARGET // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    plus_model = "shape_list" in kw
    rope = merged_kw["image_rotary_emb"] if plus_model else merged_kw["image_rotary_emb"][0]
    dense_rope = dense_kw["image_rotary_emb"] if plus_model else dense_kw["image_rotary_emb"][0]
    cos, dense_cos = (rope[0][0], dense_rope[0][0]) if plus_model else (rope[0], dense_rope[0])
    assert cos.shape[0] == TARGET // 2 + TARGET and torch.equal(cos[TARGET // 2:], dense_cos[TARGET:])  # the reference
    if plus_model:  # the key mask over [image, text]: the kept target tokens' entries, the reference's, the text's
        mask = merged_kw["attention_mask"]
        assert mask.shape == (2, 1, 1, TARGET // 2 + TARGET + TEXT)
        assert torch.equal(mask[:, :, :, TARGET // 2:], dense_kw["attention_mask"][:, :, :, TARGET:])

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == _expected(0, TARGET // 2)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _counts(model, kw), unmerged,
                                         mlp_only, reapply=True)


def test_edit_batch_shares_one_matching() -> None:
    # JoyImage Edit's RoPE table has no batch axis: one matching (from the batch's mean tokens) for the batch
    model = tiny_joyimage_edit(seed=0).transformer
    contract.batch_shares_one_matching(model, model.double_blocks[0].attn, lambda kw: _run(model, kw), _edit_call())


def test_plus_batch_samples_merge_as_each_alone() -> None:
    # JoyImage Edit Plus's RoPE table has a batch axis: each sample gets its own matching
    model, kw = tiny_joyimage_edit_plus(seed=0).transformer, _plus_call()

    def alone(i: int) -> Tensor:
        one = {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}
        return _run(model, {**one, "shape_list": kw["shape_list"][:1]})

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


def _edit_pipe_call() -> dict:
    torch.manual_seed(0)  # the pipeline samples the reference's VAE posterior with the global generator
    return {"image": Image.fromarray(REF), "prompt": "a cat", "num_inference_steps": 3, "guidance_scale": 2.0,
            "generator": torch.Generator().manual_seed(0), "output_type": "np"}


def _plus_pipe_call() -> dict:
    return {"images": [Image.fromarray(REF), Image.fromarray(REF_WIDE)], "prompt": "a cat", "num_inference_steps": 3,
            "guidance_scale": 2.0, "generator": torch.Generator().manual_seed(0), "output_type": "np"}


@pytest.mark.parametrize("name, call, shape", [("edit", _edit_pipe_call, (1, 32, 32, 3)),
                                               ("plus", _plus_pipe_call, (1, 32, 48, 3))])
def test_pipeline_generations(name, call, shape, request, caplog) -> None:
    contract.pipeline_generations(request.getfixturevalue(name), call, shape, caplog)


@pytest.mark.parametrize("name, call, target", [("edit", _edit_pipe_call, 64), ("plus", _plus_pipe_call, 96)])
def test_stacks_with_sparse_context_on_the_references(name, call, target, request) -> None:
    # Sparse Context first: its thinned call packs the kept tokens into one row; merging reads the grid before it
    pipe = request.getfixturevalue(name)
    pipe.set_progress_bar_config(disable=True)
    dense = pipe(**call()).images
    cfg = ts.SparseContextConfig(keep=0.25)
    ts.apply_sparse_context(pipe, cfg)
    sparse = pipe(**call()).images
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    seen = contract.tokens_seen([("attn", pipe.transformer.double_blocks[0].attn)], lambda: pipe(**call()))
    refs = 64 // 4 if name == "edit" else 64 // 4 + 96 // 4
    assert set(seen["attn"]) == {target // 2 + refs}
    stacked = pipe(**call()).images
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    assert merging_state(pipe).merged_tokens == 3 * 2 * target // 2 * (2 if name == "edit" else 1)
    ts.remove_token_merging(pipe)
    assert np.array_equal(pipe(**call()).images, sparse)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(pipe(**call()).images, dense)
