"""Token merging on PRX (``PRXTransformer2DModel``, ``PRXPipeline``): every block's image tokens merge in its attention
(their RoPE rows along; the text's keys and key mask pass) and in the three linear layers of its inline MLP; each
sample of a batch gets its own matching."""

from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_prx")

from tokensparse.integrations.diffusers_tiny_prx import tiny_prx  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
)
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

N, T = 60, 12  # image tokens of _inputs (a 6x10 grid: latents 12x20, patch 2) and caption tokens
_SUBS = ("attention", "gate_proj", "up_proj", "down_proj")


def _transformer() -> nn.Module:
    return tiny_prx(seed=0).transformer  # 2 blocks; dim 32, patch 2


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(B, 4, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60) and ``T`` caption tokens, the last 4 of the second
    sample masked."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
    else:
        x = torch.randn(batch, 4, h, w, generator=g)
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[-1, -4:] = False
    return {"hidden_states": x, "timestep": torch.full((batch,), 0.7),
            "encoder_hidden_states": torch.randn(batch, T, 16, generator=g), "attention_mask": mask,
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(key, getattr(blk, key)) for blk in model.blocks for key in _SUBS]
    seen: dict[str, list[int]] = {}
    handles = [sub.register_forward_pre_hook(lambda m, a, k, key=key: seen.setdefault(key, []).append(
        (a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True) for key, sub in subs]
    _run(model, kw)
    for h in handles:
        h.remove()
    return seen


def _counts(attn: int, mlp: int) -> dict[str, list[int]]:
    return {"attention": [attn] * 2, "gate_proj": [mlp] * 2, "up_proj": [mlp] * 2, "down_proj": [mlp] * 2}


def test_prx_merges_the_image_tokens_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == _counts(N, N)
    attn = model.blocks[0].attention
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    assert _token_counts(model, kw) == _counts(N // 2, N // 2)
    assert merging_state(model).merged_tokens == 2 * N // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    assert torch.equal(merged_kw["encoder_hidden_states"], dense_kw["encoder_hidden_states"])  # the text: whole
    assert torch.equal(merged_kw["attention_mask"], kw["attention_mask"])  # over the text only: as it was
    rope, dense_rope = merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]
    assert rope.shape[:3] == (2, 1, N // 2) and dense_rope.shape[2] == N
    for b in range(2):  # each sample's kept tokens keep their own rows, in order
        rows = [next(j for j in range(N) if torch.equal(dense_rope[0, 0, j], r)) for r in rope[b, 0]]
        assert rows == sorted(set(rows)), rows

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == _counts(N, N // 2)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, mlp_only, reapply=True)


def test_prx_merged_mlp_is_the_mlp_of_the_merged_tokens() -> None:
    # down_proj merges what gate_proj and up_proj gave each merged group (one value, repeated): its merged output is,
    # up to rounding, the whole MLP run once on the merged tokens
    model, kw = _transformer(), _inputs()
    blk = model.blocks[0]
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))
    seen: dict[str, Tensor] = {}
    handles = [blk.gate_proj.register_forward_pre_hook(lambda m, a: seen.update(inp=a[0])),
               blk.down_proj.register_forward_hook(lambda m, a, out: seen.update(out=out),
                                                   prepend=True)]  # before merging's hooks unmerge it
    _run(model, kw)
    for h in handles:
        h.remove()
    merged_in = seen["inp"]  # after merging's pre-hook: the merged tokens
    assert merged_in.shape == (2, N // 2, 32) and seen["out"].shape == (2, N // 2, 32)
    with torch.no_grad():  # outside a model call the hooks merge nothing
        want = blk.down_proj(blk.mlp_act(blk.gate_proj(merged_in)) * blk.up_proj(merged_in))
    torch.testing.assert_close(seen["out"], want, rtol=1e-5, atol=1e-6)


def test_prx_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_prx_batch_samples_merge_as_each_alone() -> None:
    # the RoPE table has a batch axis: each sample gets its own matching
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(
        model, lambda: _run(model, kw),
        lambda i: _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()}))


def test_prx_is_supported() -> None:
    assert merging_supports(_transformer()) is None


@pytest.fixture
def no_ftfy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline cleans prompts with ``ftfy``, which this environment lacks: a stand-in that changes nothing."""
    from diffusers.pipelines.prx import pipeline_prx

    if not hasattr(pipeline_prx, "ftfy"):
        monkeypatch.setattr(pipeline_prx, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)


def _pipe_call() -> dict:
    # one prompt: the pipeline's classifier-free guidance repeats the timestep twice, whatever the batch
    return {"prompt": "a big red dog on a sunny day", "height": 32, "width": 48, "num_inference_steps": 3,
            "use_resolution_binning": False, "output_type": "np", "generator": torch.Generator().manual_seed(0)}


def test_prx_pipeline_generations(no_ftfy: None, caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_prx(seed=0), _pipe_call, (1, 32, 48, 3), caplog)


def test_prx_pipeline_reuses_matchings_between_recompute_steps(no_ftfy: None,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # hits: step 1 reuses step 0's matchings, in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the 8x12
    # grid (CFG: one call)
    contract.pipeline_reuses_matchings(tiny_prx(seed=0), _pipe_call, 2, 3 * 2 * 48, caplog)
