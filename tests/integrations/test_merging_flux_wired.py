"""Token merging on the models with FLUX.1's wiring: Chroma (``ChromaTransformer2DModel``, ``ChromaPipeline``; the
text padding mask, squared by each block into a query x key mask ``(B, 1, L, L)``, loses the merged tokens' rows
and columns), Ovis-Image (``OvisImageTransformer2DModel``, ``OvisImagePipeline``) and Bria 3.x
(``BriaTransformer2DModel``, ``BriaPipeline``): FLUX.1's blocks under other names (their own attention class, same
call and RoPE layout; Ovis-Image with SwiGLU MLPs), so FLUX.1's wiring serves them as it is."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.integrations.merging_spans import merge_query_key_mask  # noqa: E402
from tokensparse.merging import TokenMergingConfig, match  # noqa: E402

from . import merging_contract as contract  # noqa: E402

H, W, TXT = 6, 10, 12  # a 6x10 grid of image tokens after 12 text tokens


@dataclass(frozen=True)
class Wired:
    """A FLUX.1-wired model: its diffusers transformer module, tiny builder (``module:function`` in
    ``tokensparse.integrations``), single-stream blocks (after one double-stream block), whether its pipeline
    masks the text (Chroma), the text length of a pipeline call, and the folder / pipeline class of the CLI test."""

    transformer: str
    builder: str
    single: int
    masked: bool
    max_sequence_length: int
    folder: str
    pipeline: str

    def build(self, seed: int = 0) -> Any:
        pytest.importorskip(f"diffusers.models.transformers.{self.transformer}")
        module, name = self.builder.split(":")
        return getattr(importlib.import_module(f"tokensparse.integrations.{module}"), name)(seed=seed)


MODELS = {
    "chroma": Wired("transformer_chroma", "diffusers_tiny_chroma:tiny_chroma", 2, True, 32, "chroma",
                    "ChromaPipeline"),
    "ovis": Wired("transformer_ovis_image", "diffusers_tiny_ovis:tiny_ovis_image", 1, False, 16, "ovis",
                  "OvisImagePipeline"),
    "bria": Wired("transformer_bria", "diffusers_tiny_bria3:tiny_bria", 1, False, 32, "bria", "BriaPipeline"),
}


@pytest.fixture(params=list(MODELS))
def wired(request: pytest.FixtureRequest) -> Wired:
    return MODELS[request.param]


def _inputs(spec: Wired, batch: int = 2, smooth: bool = False, seed: int = 0) -> dict:
    """Image tokens ``(B, 60, 16)``, text ``(B, 12, 16)``; where the pipeline masks the text (Chroma), 5 and 9
    visible tokens (+1 pad, as ChromaPipeline masks them) in its float mask over text + image tokens."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = nn.functional.interpolate(torch.randn(batch, 16, H // 2, W // 2, generator=g), size=(H, W),
                                      mode="bilinear").flatten(2).transpose(1, 2)
    else:
        x = torch.randn(batch, H * W, 16, generator=g)
    ids = torch.zeros(H, W, 3)
    ids[..., 1], ids[..., 2] = torch.arange(H)[:, None], torch.arange(W)[None, :]
    kw = {"hidden_states": x, "encoder_hidden_states": torch.randn(batch, TXT, 16, generator=g),
          "timestep": torch.full((batch,), 0.6), "img_ids": ids.reshape(-1, 3), "txt_ids": torch.zeros(TXT, 3),
          "return_dict": False}
    if spec.masked:
        visible = torch.tensor([5, 9, 3, 7][:batch])
        text_mask = (torch.arange(TXT)[None] <= visible[:, None]).float()
        kw["attention_mask"] = torch.cat([text_mask, torch.ones(batch, H * W)], 1)
    return kw


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


def _counts(model: nn.Module, kw: dict) -> tuple[list[int], list[int]]:
    """The tokens each block's attention and MLP saw in one call."""
    attn, mlp = _calls(model, kw)
    return [c["hidden_states"].shape[1] for c in attn], mlp


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


def test_merges_the_image_grid_and_removes_exactly(wired: Wired, caplog: pytest.LogCaptureFixture) -> None:
    model, kw = wired.build(seed=0).transformer, _inputs(wired)
    blocks, whole, half = 1 + wired.single, [60] + [72] * wired.single, [30] + [42] * wired.single
    dense, (dense_attn, dense_mlp) = _run(model, kw), _calls(model, kw)
    assert [c["hidden_states"].shape[1] for c in dense_attn] == whole and dense_mlp == whole
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        attn, mlp = _calls(model, kw)
    assert not contract.ours(caplog)  # Chroma's square mask is thinned, not refused
    assert [c["hidden_states"].shape[1] for c in attn] == half and mlp == half  # 30 of 60 merged, text whole
    assert merging_state(model).merged_tokens == blocks * 30  # one matching for the batch a block (as FLUX)
    for c, d in zip(attn, dense_attn):
        cos, dcos = c["image_rotary_emb"][0], d["image_rotary_emb"][0]
        assert cos.shape[0] == 42 and torch.equal(cos[:TXT], dcos[:TXT])  # the text rows whole
        rows = [next(j for j in range(60) if torch.equal(dcos[TXT + j], r)) for r in cos[TXT:]]
        assert rows == sorted(set(rows)), rows  # each kept image token keeps its own row, in order

    def mlp_only(counts: tuple[list[int], list[int]]) -> None:
        assert counts == (whole, half)
        assert merging_state(model).merged_tokens == blocks * 30

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _counts(model, kw),
                                         (whole, whole), mlp_only)


def test_chroma_square_text_mask_loses_the_merged_rows_and_columns(caplog: pytest.LogCaptureFixture) -> None:
    spec = MODELS["chroma"]
    model, kw = spec.build(seed=0).transformer, _inputs(spec)
    dense_attn = _calls(model, kw)[0]
    assert dense_attn[0]["attention_mask"].shape == (2, 1, 72, 72)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
        attn = _calls(model, kw)[0]
    assert not contract.ours(caplog)  # the square mask is thinned, not refused
    for c, d in zip(attn, dense_attn):
        mask, dmask = c["attention_mask"], d["attention_mask"]
        assert mask.shape == (2, 1, 42, 42) and torch.equal(mask[:, :, :TXT, :TXT], dmask[:, :, :TXT, :TXT])
    remove_token_merging(model)


def test_chroma_square_mask_sliced_as_the_exact_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # the image tokens' rows and columns are alike: sliced, bit for bit the per-pair thinning; each block squares a
    # mask of its own, checked once
    spec = MODELS["chroma"]
    model, kw = spec.build(seed=0).transformer, _inputs(spec)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    attns = [b.attn for b in list(model.transformer_blocks) + list(model.single_transformer_blocks)]
    assert contract.query_key_masks_as_exact(model, attns, lambda: _run(model, kw), monkeypatch) == len(attns)
    remove_token_merging(model)


def test_merged_output_stays_close_at_a_small_ratio(wired: Wired) -> None:
    model, kw = wired.build(seed=0).transformer, _inputs(wired, smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_batch_of_two_copies_matches_one_sample_alone(wired: Wired) -> None:
    # one matching serves the batch (from its mean tokens, as FLUX): two copies of a sample merge as it alone does
    model, kw = wired.build(seed=0).transformer, _inputs(wired, batch=1)
    both = {**kw, **{k: torch.cat([kw[k]] * 2) for k in ("hidden_states", "encoder_hidden_states", "timestep",
                                                        "attention_mask") if k in kw}}
    contract.batch_matches_each_sample_alone(model, lambda: _run(model, both), lambda i: _run(model, kw))


def test_pipeline_generations_batch_of_two_prompts(wired: Wired, caplog: pytest.LogCaptureFixture) -> None:
    def call() -> dict:
        return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48,
                "num_inference_steps": 3, "max_sequence_length": wired.max_sequence_length, "guidance_scale": 4.0,
                "output_type": "np", "generator": torch.Generator().manual_seed(0)}

    contract.pipeline_generations(wired.build(seed=0), call, (2, 32, 48, 3), caplog)


def test_cli_generate_merges(wired: Wired, tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    contract.cli_generate_merges(tmp_path, caplog, wired.build(seed=0), wired.folder, wired.pipeline)

