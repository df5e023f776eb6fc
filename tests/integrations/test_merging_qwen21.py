"""Token merging on Qwen-Image 2.1 (``QwenImage21Transformer2DModel``, ``QwenImage21Pipeline``): the target, last in
the block-causal joint sequence ``[text, condition images, target]``, merges in every block's attention (its RoPE rows
and key masks along) and SwiGLU MLP; the text and the condition images -- and the prefix K/V the pipeline caches --
never."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_qwenimage21")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state  # noqa: E402

from . import merging_contract as contract  # noqa: E402
from .contract import pipe_fixtures  # noqa: E402

TARGET = 16  # the bare calls' 4x4 target grid
# text, condition image 1 (4x4), text, condition image 2 (2x6), text, target (4x4): 4 tokens per image slot
SLOTS = [0] * 3 + [1] * 4 + [0] * 2 + [1] * 3 + [0] + [1] * 4
JOINT = 3 + 16 + 2 + 12 + 1 + TARGET
REF = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")

pipe, clean = pipe_fixtures(tiny_qwen_image21)


@pytest.fixture(autouse=True)
def unmerge(pipe):
    yield
    ts.remove_token_merging(pipe)


def _model() -> nn.Module:
    return tiny_qwen_image21(seed=0).transformer


def _call(batch: int = 2, smooth: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    refs = torch.randn(batch, 28, 4, generator=g)
    if smooth:  # neighbouring target tokens alike, as in real latents
        target = nn.functional.interpolate(torch.randn(batch, 4, 2, 2, generator=g), size=(4, 4), mode="bilinear")
        target = target.flatten(2).transpose(1, 2)
    else:
        target = torch.randn(batch, TARGET, 4, generator=g)
    return {"hidden_states": torch.cat([refs, target], 1), "timestep": torch.full((batch,), 0.6),
            "encoder_hidden_states": torch.randn(batch, 13, 16, generator=g),
            "img_shapes": [[(1, 4, 4), (1, 2, 6), (1, 4, 4)]] * batch,
            "img_mask": torch.tensor([SLOTS] * batch, dtype=torch.bool), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(f"{i}.{key}", getattr(blk, key)) for i, blk in enumerate(model.transformer_blocks)
            for key in ("attn", "img_mlp")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def _expected(gone_attn: int, gone_mlp: int) -> dict[str, list[int]]:
    return {f"{i}.{key}": [JOINT - gone] for i in range(2) for key, gone in (("attn", gone_attn),
                                                                             ("img_mlp", gone_mlp))}


def test_merges_the_target_only_and_removes_exactly() -> None:
    model, kw = _model(), _call()
    dense = _run(model, kw)
    unmerged = _counts(model, kw)
    assert unmerged == _expected(0, 0)
    attn = model.transformer_blocks[0].attn
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert _counts(model, kw) == _expected(TARGET // 2, TARGET // 2)
    assert merging_state(model).merged_tokens == 2 * TARGET // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    prefix = JOINT - TARGET
    rope, dense_rope = merged_kw["rotary_emb"], dense_kw["rotary_emb"]
    assert rope.shape[0] == prefix + TARGET // 2 and torch.equal(rope[:prefix], dense_rope[:prefix])
    rows = [next(j for j in range(TARGET) if torch.equal(dense_rope[prefix + j], r)) for r in rope[prefix:]]
    assert rows == sorted(set(rows)), rows  # each kept target token keeps its own row, in order
    assert merged_kw["segments"] == dense_kw["segments"]  # the prefix's block-causal segments: unchanged
    merged = _run(model, kw)
    # nothing before the target sees it (block-causal): the prefix computes as unmerged
    torch.testing.assert_close(merged[:, :prefix], dense[:, :prefix], rtol=0, atol=1e-6)

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == _expected(0, TARGET // 2)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _counts(model, kw), unmerged,
                                         mlp_only, reapply=True)


def test_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _model(), _call(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw)[:, -TARGET:])


def test_batch_shares_one_matching() -> None:
    # the RoPE table has no batch axis: one matching (from the batch's mean tokens) for the batch
    model = _model()
    contract.batch_shares_one_matching(model, model.transformer_blocks[0].attn, lambda kw: _run(model, kw), _call())


def test_a_padded_text_key_mask_thins_with_the_target() -> None:
    # key_valid (B, L): the text padding; the target's entries are all visible and keep the kept tokens'
    model, kw = _model(), _call()
    kw["encoder_hidden_states_mask"] = torch.ones(2, 13, dtype=torch.bool)
    kw["encoder_hidden_states_mask"][1, -5:] = False
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    seen = contract.call_kwargs(model.transformer_blocks[0].attn, lambda: _run(model, kw))
    assert seen["key_valid"].shape == (2, JOINT - TARGET // 2) and seen["key_valid"][:, -TARGET // 2:].all()
    assert torch.isfinite(_run(model, kw)).all()


def _refs() -> list[Image.Image]:
    return [Image.fromarray(REF), Image.fromarray(np.roll(REF, 9, 1)).resize((192, 96))]


def _pipe_call(**extra) -> dict:
    return {"prompt": ["a cat", "a dog on a hill"], "negative_prompt": ["bad", "worse, blurry"], "true_cfg_scale": 2.0,
            "image": _refs(), "output_resolution": 128, "num_inference_steps": 3, "output_type": "np",
            "generator": torch.Generator().manual_seed(0), **extra}


def test_pipeline_generations_with_references_cfg_and_padded_prompts(pipe, caplog) -> None:
    # the K/V cache on (its default): an extract step over the joint sequence, then cached steps on the target alone,
    # whose key mask spans [cached prefix, target]
    contract.pipeline_generations(pipe, _pipe_call, (2, 96, 192, 4), caplog)


def test_cached_steps_merge_as_uncached_ones(pipe) -> None:
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    masks: list[Tensor] = []
    handle = pipe.transformer.transformer_blocks[0].attn.register_forward_pre_hook(  # after merging's pre-hook
        lambda m, a, k: masks.append(k["attention_mask"]) if k["kv_cache_mode"] == "cached" else None,
        with_kwargs=True)
    cached = pipe(**_pipe_call()).images
    handle.remove()
    # the prompts' padding mask over [cached prefix, target]: its target part thinned to the kept half
    assert len(masks) == 4 and all(m.shape[:3] == (2, 1, 1) and m[:, 0, 0, -36:].all() for m in masks)
    assert masks[0].shape[-1] - 36 > 64 + 72 and not masks[0].all()  # the prefix's entries, its padding among them
    uncached = pipe(**_pipe_call(use_kv_cache=False)).images
    np.testing.assert_allclose(cached, uncached, atol=1e-5)


def test_pipeline_reuses_matchings_between_recompute_steps(pipe, caplog) -> None:
    # hits: step 1 reuses step 0's matchings in each of the 2 blocks, for the prompt and the negative prompt; merged:
    # 3 steps x 2 passes x 2 blocks x half of the 6x12 target
    contract.pipeline_reuses_matchings(pipe, _pipe_call, 4, 3 * 2 * 2 * 36, caplog)


@pytest.mark.parametrize("merging_first", [False, True], ids=["sparse-first", "merging-first"])
def test_stacks_with_sparse_context_on_the_condition_images(pipe, merging_first) -> None:
    def run() -> np.ndarray:
        return pipe(**_pipe_call(negative_prompt=None, true_cfg_scale=1.0)).images

    subs = [(str(i), blk.attn) for i, blk in enumerate(pipe.transformer.transformer_blocks)]
    joint = contract.tokens_seen(subs, run)["0"][0]  # the extract step's joint sequence: text, 64 + 72 refs, target
    dense = run()
    cfg, merge = ts.SparseContextConfig(keep=0.25), ts.TokenMergingConfig(ratio=0.5)
    ts.apply_sparse_context(pipe, cfg)
    sparse = run()
    ts.remove_sparse_context(pipe)
    contract.apply_both(pipe, cfg, merge, merging_first)
    seen = contract.tokens_seen(subs, run)
    # the extract step: the kept joint sequence, half the 6x12 target merged away; cached steps: the target alone
    dropped = 64 + 72 - round(0.25 * 64) - round(0.25 * 72)
    assert seen == {str(i): [joint - dropped - 36, 36, 36] for i in range(2)}
    stacked = run()
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(), sparse)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(run(), dense)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
def test_flex_prefill_runs_unmerged_with_a_warning(caplog) -> None:
    from diffusers.models.transformers.transformer_qwenimage21 import (
        QwenImage21AttnProcessor,
        QwenImage21FlexAttnProcessor,
    )

    model, kw = _model(), _call()
    dense = _run(model, kw)
    for block in model.transformer_blocks:
        block.attn.set_processor(QwenImage21FlexAttnProcessor())
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert _counts(model, kw) == _expected(0, 0)
        flex = _run(model, kw)
    assert sum("BlockMask cannot be thinned" in m for m in contract.ours(caplog)) == 1
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-5)
    for block in model.transformer_blocks:
        block.attn.set_processor(QwenImage21AttnProcessor())
    assert _counts(model, kw) == _expected(TARGET // 2, TARGET // 2)
    ts.remove_token_merging(model)
