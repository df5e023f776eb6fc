"""Token merging on Bria 3.x (``BriaTransformer2DModel``, ``BriaPipeline``): FLUX.1's blocks under other
names (its own attention class, same call and RoPE layout), so FLUX.1's wiring serves it as it is."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_bria")

from tokensparse.integrations.diffusers_tiny_bria3 import tiny_bria  # noqa: E402
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

H, W, TXT = 6, 10, 12  # a 6x10 grid of image tokens after 12 text tokens


def _transformer() -> nn.Module:
    return tiny_bria(seed=0).transformer  # 1 double-stream, 1 single-stream block


def _inputs(batch: int = 2, smooth: bool = False, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, H // 2, W // 2, generator=g), size=(H, W),
                                      mode="bilinear").flatten(2).transpose(1, 2)
    else:
        x = torch.randn(batch, H * W, 16, generator=g)
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None, :]
    return {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, TXT, 16, generator=g),
            "timestep": torch.full((batch,), 0.6), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TXT, 3),
            "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _calls(model: nn.Module, kw: dict) -> tuple[list[dict], list[int]]:
    """Keyword arguments of every block's attention (double-stream first) and the tokens of their MLPs."""
    attn: list[dict] = []
    mlp: list[int] = []
    handles = []
    for b in list(model.transformer_blocks) + list(model.single_transformer_blocks):
        handles.append(b.attn.register_forward_pre_hook(lambda m, a, k: attn.append(k), with_kwargs=True))
        sub = b.ff if hasattr(b, "ff") else b.proj_mlp
        handles.append(sub.register_forward_pre_hook(lambda m, a: mlp.append(a[0].shape[1])))
    _run(model, kw)
    for h in handles:
        h.remove()
    return attn, mlp


def test_bria_merges_the_image_grid_and_removes_exactly(caplog: pytest.LogCaptureFixture) -> None:
    model, kw = _transformer(), _inputs()
    dense, (dense_attn, dense_mlp) = _run(model, kw), _calls(model, kw)
    assert [c["hidden_states"].shape[1] for c in dense_attn] == [60, 72] and dense_mlp == [60, 72]
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        attn, mlp = _calls(model, kw)
    assert not [r for r in caplog.records if r.name.startswith("tokensparse")]
    assert [c["hidden_states"].shape[1] for c in attn] == [30, 42] and mlp == [30, 42]  # 30 of 60 merged, text whole
    assert merging_state(model).merged_tokens == 2 * 30  # 2 blocks, one matching for the batch each (as FLUX)
    for c, d in zip(attn, dense_attn):
        cos, dcos = c["image_rotary_emb"][0], d["image_rotary_emb"][0]
        assert cos.shape[0] == 42 and torch.equal(cos[:TXT], dcos[:TXT])  # the text rows whole
        rows = [next(j for j in range(60) if torch.equal(dcos[TXT + j], r)) for r in cos[TXT:]]
        assert rows == sorted(set(rows)), rows  # each kept image token keeps its own row, in order
    merged = _run(model, kw)
    assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
    apply_token_merging(model, TokenMergingConfig(ratio=0.0))  # identity: installs nothing
    assert torch.equal(_run(model, kw), dense) and _calls(model, kw)[1] == dense_mlp
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # the MLPs only
    attn, mlp = _calls(model, kw)
    assert [c["hidden_states"].shape[1] for c in attn] == [60, 72] and mlp == [30, 42]
    remove_token_merging(model)
    assert torch.equal(_run(model, kw), dense) and _calls(model, kw)[1] == dense_mlp


def test_bria_merged_output_stays_close_at_a_small_ratio() -> None:
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


def test_bria_batch_of_two_copies_matches_one_sample_alone() -> None:
    # one matching serves the batch (from its mean tokens, as FLUX): two copies of a sample merge as it alone does
    model, kw = _transformer(), _inputs(batch=1)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    alone = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # afresh: the same destination draw
    both = _run(model, {**kw, **{k: torch.cat([kw[k]] * 2) for k in ("hidden_states", "encoder_hidden_states",
                                                                      "timestep")}})
    remove_token_merging(model)
    torch.testing.assert_close(both, torch.cat([alone] * 2), rtol=1e-4, atol=1e-5)


def _pipe_call() -> dict:
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "max_sequence_length": 32, "guidance_scale": 4.0, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}


def test_bria_pipeline_generations_batch_of_two_prompts(caplog: pytest.LogCaptureFixture) -> None:
    pipe = tiny_bria(seed=0)
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
    assert not [r for r in caplog.records if r.name.startswith("tokensparse")]
    remove_token_merging(pipe)
    assert np.array_equal(pipe(**_pipe_call()).images, dense)


def test_cli_generate_merges_on_a_bria_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    typer = pytest.importorskip("typer")
    from PIL import Image
    from typer.testing import CliRunner

    from tokensparse.cli_diffusers import generate

    app = typer.Typer()
    app.command()(generate)
    app.command("noop")(lambda: None)  # two commands: `generate` is addressed by name, as in tokensparse's CLI
    tiny_bria(seed=0).save_pretrained(tmp_path / "bria")
    out = tmp_path / "b.png"
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "bria"), "--prompt", "a cat", "--merge",
                                       "0.5", "--steps", "2", "--height", "32", "--width", "48", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "BriaPipeline" in res.output and "no Sparse Context, merge=0.5" in res.output
    assert Image.open(out).size == (48, 32) and "merged nothing" not in caplog.text
