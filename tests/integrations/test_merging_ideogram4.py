"""Token merging on Ideogram 4 (``Ideogram4Transformer2DModel``, ``Ideogram4Pipeline``): the image grid, last in every
block's packed ``[padding, text, image]`` sequence and read from ``indicator`` and ``position_ids``, merges in the
attention (its RoPE rows and segment mask rows and columns along) and the feed-forward; the text never merges, and
each sample gets its own matching (its RoPE table has a batch axis)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_ideogram4")

from tokensparse.integrations.diffusers_tiny_ideogram4 import tiny_ideogram4  # noqa: E402
from tokensparse.integrations.merging_hooks import (  # noqa: E402
    apply_token_merging,
    merging_state,
    merging_supports,
)
from tokensparse.integrations.merging_ideogram4 import image_grid  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402

H, W, T = 6, 10, 12  # the image grid of _inputs (60 tokens) and text tokens (the second sample's: 8, left-padded)
N = H * W


def _transformer() -> nn.Module:
    return tiny_ideogram4(seed=0).transformer  # 2 blocks; dim 32


def _ids(lengths: tuple[int, ...] = (T, 8), h: int = H, w: int = W) -> tuple[Tensor, Tensor, Tensor]:
    """``(position_ids, segment_ids, indicator)`` of the pipeline's packed layout."""
    return diffusers.Ideogram4Pipeline._prepare_ids(list(lengths), h, w, T, torch.device("cpu"))


def _inputs(batch: int = 2, smooth: bool = False, seed: int = 0) -> dict:
    """Packed ``(B, T + N, 16)`` tokens (the image a 6x10 grid after ``T`` zero text rows) and text features, the
    last sample's text 8 tokens."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, 3, 5, generator=g), size=(H, W), mode="bilinear")
    else:
        x = torch.randn(batch, 16, H, W, generator=g)
    position_ids, segment_ids, indicator = _ids((T, 8)[-batch:] if batch <= 2 else (T,) * batch)
    text = torch.randn(batch, T + N, 13 * 16, generator=g)
    return {"hidden_states": torch.cat([torch.zeros(batch, T, 16), x.flatten(2).transpose(1, 2)], dim=1),
            "encoder_hidden_states": text, "timestep": torch.full((batch,), 0.3), "position_ids": position_ids,
            "segment_ids": segment_ids, "indicator": indicator, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(key, getattr(blk, key)) for blk in model.layers for key in ("attention", "feed_forward")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def test_ideogram4_reads_the_grid_from_the_indicator_and_position_ids() -> None:
    ids, _, indicator = _ids()
    assert image_grid(ids, indicator) == (H, W)
    one, _, one_ind = _ids((3,), 1, 7)
    assert image_grid(one, one_ind) == (1, 7)
    image_only = ids[:, T:], indicator[:, T:]  # the unconditional transformer's call
    assert image_grid(*image_only) == (H, W)
    shuffled = ids.clone()
    shuffled[:, T:] = shuffled[:, T:].flip(1)
    assert image_grid(shuffled, indicator) is None  # not a row-major grid
    mixed = indicator.clone()
    mixed[1, -1] = 3  # a text token last in one sample: the image is not the last N tokens everywhere
    assert image_grid(ids, mixed) is None and image_grid(None, indicator) is None
    assert image_grid(ids, indicator[:, 1:]) is None


def test_ideogram4_merges_the_image_tokens_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged = _token_counts(model, kw)
    assert unmerged == {"attention": [T + N] * 2, "feed_forward": [T + N] * 2}
    attn = model.layers[0].attention
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    merged_counts = {"attention": [T + N // 2] * 2, "feed_forward": [T + N // 2] * 2}
    assert _token_counts(model, kw) == merged_counts  # the text (and padding) passes whole
    assert merging_state(model).merged_tokens == 2 * N // 2  # per block, not per sample
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    for table, dense_table in zip(merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]):
        assert table.shape == (2, T + N // 2, 16) and torch.equal(table[:, :T], dense_table[:, :T])
        for b in range(2):  # each sample's kept tokens' own rows, in order
            rows = [next(j for j in range(N) if torch.equal(dense_table[b, T + j], r)) for r in table[b, T:]]
            assert rows == sorted(set(rows)), rows
    mask, dense_mask = merged_kw["attention_mask"], dense_kw["attention_mask"]  # (B, 1, L', L'): segments kept
    assert mask.shape == (2, 1, T + N // 2, T + N // 2) and torch.equal(mask[..., :T, :T], dense_mask[..., :T, :T])
    assert mask[..., T:, :].equal(dense_mask[..., T:T + 1, :T + N // 2].expand(2, 1, N // 2, T + N // 2))
    assert not mask[1, 0, T:, :4].any()  # the second sample's left padding stays hidden from its image

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == {"attention": [T + N] * 2, "feed_forward": [T + N // 2] * 2}

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, mlp_only, reapply=True)


def test_ideogram4_segment_masks_are_thinned_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    model, kw = _transformer(), _inputs()
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    attns = [blk.attention for blk in model.layers]
    assert contract.query_key_masks_as_exact(model, attns, lambda: _run(model, kw), monkeypatch) >= 1


def test_ideogram4_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_ideogram4_batch_matches_each_sample_alone() -> None:
    # the RoPE table has a batch axis: each sample merges by its own matching, as it would alone
    model, kw = _transformer(), _inputs()

    def alone(i: int) -> Tensor:
        return _run(model, {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in kw.items()})

    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), alone)


def test_ideogram4_is_supported() -> None:
    model = _transformer()
    assert merging_supports(model) is None
    assert merging_supports(tiny_ideogram4(seed=0).unconditional_transformer) is None


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "guidance_scale": 3.0, "guidance_schedule": None, "max_sequence_length": 160, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}


def test_ideogram4_pipeline_generations(caplog: pytest.LogCaptureFixture) -> None:
    contract.pipeline_generations(tiny_ideogram4(seed=0), _pipe_call, (2, 32, 48, 3), caplog)


def test_ideogram4_pipeline_reuses_matchings_between_recompute_steps(caplog: pytest.LogCaptureFixture) -> None:
    # the pipeline's .transformer merges (its unconditional_transformer is a model of its own): hits: step 1 reuses
    # step 0's matchings in each of the 2 blocks; merged: 3 steps x 2 blocks x half of the 8x12 grid
    contract.pipeline_reuses_matchings(tiny_ideogram4(seed=0), _pipe_call, 2, 3 * 2 * 48, caplog)


def test_ideogram4_unconditional_transformer_merges_too() -> None:
    # applied to it as well, the image-only unconditional call merges its grid (every token of it)
    pipe = tiny_ideogram4(seed=0)
    pipe.set_progress_bar_config(disable=True)
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5))
    apply_token_merging(pipe.unconditional_transformer, TokenMergingConfig(ratio=0.5))
    pipe(**_pipe_call())
    assert merging_state(pipe.unconditional_transformer).merged_tokens == 3 * 2 * 48


def test_cli_generate_merges_with_a_constant_guidance_and_names_the_schedule_otherwise(tmp_path, caplog) -> None:
    from PIL import Image
    from typer.testing import CliRunner

    from .contract import generate_app

    app = generate_app()
    tiny_ideogram4(seed=0).save_pretrained(tmp_path / "ideogram4")
    args = ["generate", "--model", str(tmp_path / "ideogram4"), "--prompt", "a cat", "--merge", "0.5", "--steps", "2",
            "--height", "32", "--width", "48", "--out", str(tmp_path / "i.png")]
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        res = CliRunner().invoke(app, [*args, "--guidance", "3"])  # was diffusers' "Only one of ... may be set"
    assert res.exit_code == 0, res.output
    assert "Ideogram4Pipeline" in res.output and "no Sparse Context, merge=0.5" in res.output
    assert Image.open(tmp_path / "i.png").size == (48, 32) and "merged nothing" not in caplog.text
    res = CliRunner().invoke(app, args)  # the 48-step default schedule at 2 steps: named before the run
    assert res.exit_code == 1 and "default guidance schedule has 48 steps, not --steps 2" in res.stderr
