"""Token merging on Chroma (``ChromaTransformer2DModel``, ``ChromaPipeline``): FLUX.1's wiring; the text padding
mask, squared by each block into a query x key mask ``(B, 1, L, L)``, loses the merged tokens' rows and columns."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_chroma")

from tokensparse.integrations.diffusers_tiny_chroma import tiny_chroma  # noqa: E402
from tokensparse.integrations.merging_core import merge_query_key_mask  # noqa: E402
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig, match  # noqa: E402

H, W, TXT = 6, 10, 12  # a 6x10 grid of image tokens after 12 text tokens


def _transformer() -> nn.Module:
    return tiny_chroma(seed=0).transformer  # 1 double-stream, 2 single-stream blocks


def _inputs(batch: int = 2, smooth: bool = False, seed: int = 0) -> dict:
    """Image tokens ``(B, 60, 16)``, text ``(B, 12, 16)`` with 5 and 9 visible tokens (+1 pad, as ChromaPipeline
    masks them), the pipeline's float mask over text + image tokens."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, H // 2, W // 2, generator=g), size=(H, W),
                                      mode="bilinear").flatten(2).transpose(1, 2)
    else:
        x = torch.randn(batch, H * W, 16, generator=g)
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None, :]
    visible = torch.tensor([5, 9, 3, 7][:batch])
    text_mask = (torch.arange(TXT)[None] <= visible[:, None]).float()
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, TXT, 16, generator=g),
            "timestep": torch.full((batch,), 0.6), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TXT, 3),
            "attention_mask": torch.cat([text_mask, torch.ones(batch, H * W)], 1), "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _attn_calls(model: nn.Module, kw: dict) -> list[dict]:
    """The keyword arguments of every block's attention in one call (double-stream blocks first)."""
    calls: list[dict] = []
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    handles = [b.attn.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True) for b in blocks]
    _run(model, kw)
    for h in handles:
        h.remove()
    return calls


def _ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("tokensparse")]


def test_merge_query_key_mask_keeps_surviving_rows_and_columns() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, generator=g)
    m = match(x, torch.arange(16) % 2 == 0, num=4)
    key = torch.ones(2, 20)
    key[0, 1] = 0
    square = key[:, None, None, :] * key[:, None, :, None]  # (2, 1, 20, 20): 4 text tokens, then the grid
    merged = merge_query_key_mask(square, m, (4, 16), 20)
    keep = torch.cat([torch.arange(4).expand(2, 4), 4 + m.keep], 1)
    for b in range(2):
        assert torch.equal(merged[b, 0], square[b, 0][keep[b]][:, keep[b]])
    gone = next(j for j in range(16) if j not in m.keep[0].tolist())  # a token merged into another
    uneven = square.clone()
    uneven[:, :, :, 4 + gone] = 0  # its column unlike its destination's: merging would change attention
    assert merge_query_key_mask(uneven, m, (4, 16), 20) is None
    uneven = square.clone()
    uneven[:, :, 4 + gone] = 0  # its row likewise
    assert merge_query_key_mask(uneven, m, (4, 16), 20) is None
    assert merge_query_key_mask(torch.ones(2, 20), m, (4, 16), 20) is None  # a key mask: merge_key_mask's job


def test_chroma_merges_the_image_grid_and_removes_exactly(caplog: pytest.LogCaptureFixture) -> None:
    model, kw = _transformer(), _inputs()
    dense, dense_calls = _run(model, kw), _attn_calls(model, kw)
    assert [c["hidden_states"].shape[1] for c in dense_calls] == [60, 72, 72]
    assert dense_calls[0]["attention_mask"].shape == (2, 1, 72, 72)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        calls = _attn_calls(model, kw)
    assert not _ours(caplog)  # the square mask is thinned, not refused
    assert [c["hidden_states"].shape[1] for c in calls] == [30, 42, 42]  # 30 of 60 merged away, text whole
    assert merging_state(model).merged_tokens == 3 * 30  # 3 blocks, one matching for the batch each (as FLUX)
    for c, d in zip(calls, dense_calls):
        mask, dmask = c["attention_mask"], d["attention_mask"]
        assert mask.shape == (2, 1, 42, 42) and torch.equal(mask[:, :, :TXT, :TXT], dmask[:, :, :TXT, :TXT])
        cos, dcos = c["image_rotary_emb"][0], d["image_rotary_emb"][0]
        assert cos.shape[0] == 42 and torch.equal(cos[:TXT], dcos[:TXT])  # the text rows whole
        rows = [next(j for j in range(60) if torch.equal(dcos[TXT + j], r)) for r in cos[TXT:]]
        assert rows == sorted(set(rows)), rows  # each kept image token keeps its own row, in order
    merged = _run(model, kw)
    assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
    apply_token_merging(model, TokenMergingConfig(ratio=0.0))  # identity: installs nothing
    assert torch.equal(_run(model, kw), dense)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # the MLPs only
    assert [c["hidden_states"].shape[1] for c in _attn_calls(model, kw)] == [60, 72, 72]
    assert merging_state(model).merged_tokens == 3 * 30
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense)
    assert [c["hidden_states"].shape[1] for c in _attn_calls(model, kw)] == [60, 72, 72]


def test_chroma_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    dense = _run(model, kw)
    errors = []
    for ratio in (0.25, 0.5):
        apply_token_merging(model, TokenMergingConfig(ratio=ratio))
        merged = _run(model, kw)
        assert merging_state(model).merged_tokens > 0
        errors.append(float((merged - dense).norm() / dense.norm()))
    remove_token_merging(model)
    assert errors[0] < 0.12 and errors[0] < errors[1], errors


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "max_sequence_length": 32, "guidance_scale": 4.0, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}


def test_chroma_pipeline_generations_batch_of_two_prompts(caplog: pytest.LogCaptureFixture) -> None:
    pipe = tiny_chroma(seed=0)
    pipe.set_progress_bar_config(disable=True)
    dense = pipe(**_pipe_call()).images
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        for cfg in (TokenMergingConfig(ratio=0.5), TokenMergingConfig(threshold=0.3, recompute_every=2)):
            apply_token_merging(pipe, cfg)
            merged = pipe(**_pipe_call()).images
            state = merging_state(pipe)
            assert state.step == 2 and state.merged_tokens > 0, cfg  # one generation of 3 steps (and CFG calls)
            assert merged.shape == dense.shape == (2, 32, 48, 3) and np.isfinite(merged).all()
            assert not np.array_equal(merged, dense)
    assert not _ours(caplog)  # no mask refused, nothing left unmerged
    remove_token_merging(pipe)
    assert np.array_equal(pipe(**_pipe_call()).images, dense)


def test_cli_generate_merges_on_a_chroma_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    typer = pytest.importorskip("typer")
    from PIL import Image
    from typer.testing import CliRunner

    from tokensparse.cli_diffusers import generate

    app = typer.Typer()
    app.command()(generate)
    app.command("noop")(lambda: None)  # two commands: `generate` is addressed by name, as in tokensparse's CLI
    tiny_chroma(seed=0).save_pretrained(tmp_path / "chroma")
    out = tmp_path / "c.png"
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "chroma"), "--prompt", "a cat", "--merge",
                                       "0.5", "--steps", "2", "--height", "32", "--width", "48", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "ChromaPipeline" in res.output and "no Sparse Context, merge=0.5" in res.output
    assert Image.open(out).size == (48, 32) and "merged nothing" not in caplog.text
