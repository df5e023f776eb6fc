"""Token merging on AuraFlow (``AuraFlowTransformer2DModel``, ``AuraFlowPipeline``): the image tokens merge in every
joint block's attention (image side) and feed-forward and in every single block's attention and feed-forward (the
span after the registers and caption); the text never."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.auraflow_transformer_2d")

from tokensparse.integrations.diffusers_tiny_auraflow import tiny_auraflow  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
    remove_token_merging,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, TXT = 60, 8 + 24  # image tokens of _inputs (a 6x10 grid, patch 2); text: 8 registers + 24 caption tokens


def _transformer() -> nn.Module:
    return tiny_auraflow(seed=0).transformer  # 2 joint, 2 single blocks; dim 32, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60) and 24 caption tokens."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, 24, 16, generator=g),
            "timestep": torch.full((batch,), 0.7), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer saw in one call: the joint blocks' ``attn`` (its image input), ``ff`` and
    ``ff_context``, the single blocks' ``attn`` and ``ff``."""
    subs = [(key, getattr(blk, key)) for blk in model.joint_transformer_blocks for key in ("attn", "ff", "ff_context")]
    subs += [(f"single_{key}", getattr(blk, key)) for blk in model.single_transformer_blocks for key in ("attn", "ff")]
    seen: dict[str, list[int]] = {}
    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key: seen.setdefault(key, []).append(
        (k.get("hidden_states", k.get("x")) if k else a[0]).shape[1]), with_kwargs=True) for key, sub in subs]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def _counts(image: int, mlp: int) -> dict[str, list[int]]:
    return {"attn": [image] * 2, "ff": [mlp] * 2, "ff_context": [TXT] * 2, "single_attn": [TXT + image] * 2,
            "single_ff": [TXT + mlp] * 2}


def test_auraflow_merges_the_image_tokens_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(N, N)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(30, 30)  # the text (registers, caption) passes whole
    assert merging_state(model).merged_tokens == 4 * 30
    joint = contract.call_kwargs(model.joint_transformer_blocks[0].attn, lambda: _run(model, kw))
    assert joint["encoder_hidden_states"].shape == (2, TXT, 32)

    def ff_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(N, 30)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only, reapply=True)


def test_auraflow_single_blocks_keep_the_text_span_as_it_is() -> None:
    # in the single blocks the text comes first: its outputs are what the dense model computes from the same (merged)
    # inputs, token for token; only the image span is merged, then unmerged
    model, kw = _transformer(), _inputs()
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    blk = model.single_transformer_blocks[0]
    box: dict[str, Tensor] = {}
    handle = blk.attn.register_forward_hook(lambda m, a, k, out: box.update(x=k["hidden_states"], out=out),
                                            with_kwargs=True)
    _run(model, kw)
    handle.remove()
    merged_in, merged_out = box["x"], box["out"]  # the output after unmerging: TXT + 60 tokens
    assert merged_in.shape[1] == TXT + 30 and merged_out.shape[1] == TXT + N
    remove_token_merging(model)
    with torch.no_grad():
        text_out = blk.attn(hidden_states=merged_in)[:, :TXT]
    torch.testing.assert_close(merged_out[:, :TXT], text_out)


def test_auraflow_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_auraflow_batch_samples_merge_as_each_alone() -> None:
    # no positional table in the blocks: each sample gets its own matching
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(
        model, lambda: _run(model, kw),
        lambda i: _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}))


def test_auraflow_with_single_blocks_only_is_supported() -> None:
    pipe = tiny_auraflow(seed=0, num_mmdit_layers=0)
    assert merging_supports(pipe.transformer) is None
    kw = _inputs()
    dense = _run(pipe.transformer, kw)
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    merged = _run(pipe.transformer, kw)
    assert merging_state(pipe).merged_tokens == 2 * 30 and not torch.equal(merged, dense)
    remove_token_merging(pipe)
    assert torch.equal(_run(pipe.transformer, kw), dense)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 64, "num_inference_steps": 3,
            "max_sequence_length": 32, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_auraflow_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_auraflow(seed=0), _pipe_call, (2, 32, 64, 3), caplog)


def test_auraflow_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 4 blocks; merged: 3 steps x 4 blocks x half of the 8x16
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_auraflow(seed=0), _pipe_call, 4, 3 * 4 * 64, caplog)


def test_cli_generate_merges_on_an_auraflow_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, tiny_auraflow(seed=0), "auraflow", "AuraFlowPipeline", width=64)
