"""Token merging on Z-Image (``ZImageTransformer2DModel``, ``ZImagePipeline``): the image grid merges in the main
layers and the noise refiner, the caption never; Omni calls (references in the sequence) run unmerged."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_z_image")

from tokensparse.integrations.diffusers_tiny_zimage import tiny_z_image, tiny_z_image_omni  # noqa: E402
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging  # noqa: E402
from tokensparse.merging import TokenMergingConfig  # noqa: E402

from . import merging_contract as contract  # noqa: E402


def _transformer() -> nn.Module:
    return tiny_z_image(seed=0).transformer  # 1 noise refiner, 1 context refiner, 2 main layers; dim 32


def _inputs(batch: int = 2, h: int = 12, w: int = 20, smooth: bool = False, seed: int = 0) -> dict:
    """Latents ``(4, 1, h, w)`` (``h/2 x w/2`` tokens: 6x10 = 60, padded to 64) and captions of 5 and 40 tokens
    (padded to 32 and 64: the batch's sequences differ in length, so the blocks get a key padding mask)."""
    g = torch.Generator().manual_seed(seed)
    if smooth:  # neighbouring tokens alike, as in real latents: merging them changes little
        x = [nn.functional.interpolate(torch.randn(1, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bilinear")
             [0, :, None] for _ in range(batch)]
    else:
        x = [torch.randn(4, 1, h, w, generator=g) for _ in range(batch)]
    caps = [torch.randn(n, 16, generator=g) for n in (5, 40, 17, 9)[:batch]]
    return {"x": x, "t": torch.full((batch,), 0.3), "cap_feats": caps, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return torch.stack(model(**kw)[0])


def _token_counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    """Tokens each sublayer of each block saw in one call, by block group."""
    return contract.tokens_seen([(group, sub) for group in ("noise_refiner", "context_refiner", "layers")
                        for blk in getattr(model, group) for sub in (blk.attention, blk.feed_forward)],
                       lambda: _run(model, kw))


def _attention_kwargs(model: nn.Module, kw: dict) -> dict:
    return contract.call_kwargs(model.layers[0].attention, lambda: _run(model, kw))


def test_zimage_merges_the_image_grid_only_and_removes_exactly() -> None:
    model, kw = _transformer(), _inputs()
    dense = _run(model, kw)
    unmerged, dense_attn = _token_counts(model, kw), _attention_kwargs(model, kw)
    assert unmerged == {"noise_refiner": [64, 64], "context_refiner": [64, 64], "layers": [128] * 4}
    assert dense_attn["attention_mask"].shape == (2, 128)  # captions of 32 and 64 padded tokens
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    seen = _token_counts(model, kw)
    # 60 image tokens, 30 merged away; their 4 padding tokens and the captions pass whole
    assert seen == {"noise_refiner": [34, 34], "context_refiner": [64, 64], "layers": [98] * 4}
    assert merging_state(model).merged_tokens == 3 * 30  # per sample: 3 blocks, 30 tokens each
    attn = _attention_kwargs(model, kw)
    mask, freqs, dense_freqs = attn["attention_mask"], attn["freqs_cis"], dense_attn["freqs_cis"]
    assert mask.shape == (2, 98) and torch.equal(mask[:, 30:], dense_attn["attention_mask"][:, 60:])
    assert freqs.shape == (2, 98, 8) and torch.equal(freqs[:, 30:], dense_freqs[:, 60:])  # padding, caption
    for b in range(2):  # each kept image token keeps its own RoPE row, in order
        rows = [next(j for j in range(60) if torch.equal(dense_freqs[b, j], r)) for r in freqs[b, :30]]
        assert rows == sorted(set(rows)), rows
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))

    def ff_only(only_ff: dict[str, list[int]]) -> None:
        assert only_ff["layers"] == [128, 98, 128, 98] and only_ff["noise_refiner"] == [64, 34]

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _token_counts(model, kw),
                                         unmerged, ff_only)


def test_zimage_merged_output_stays_close_at_a_small_ratio() -> None:
    model, kw = _transformer(), _inputs(smooth=True)
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_zimage_batch_of_two_matches_each_sample_alone() -> None:
    # The RoPE table has a batch dimension: each sample gets its own matching (from the same destination draw),
    # so a sample merges as it would alone, whatever the other's caption length (the batch's padding mask)
    model, kw = _transformer(), _inputs()
    contract.batch_matches_each_sample_alone(model, lambda: _run(model, kw), lambda i: _run(model, {
        **kw, "x": kw["x"][i:i + 1], "cap_feats": kw["cap_feats"][i:i + 1], "t": kw["t"][:1]}))


def test_zimage_omni_calls_run_unmerged_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_z_image_omni(seed=0).transformer
    g = torch.Generator().manual_seed(0)
    kw = {"x": [[torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, 1, 8, 8, generator=g)]],  # reference, target
          "cap_feats": [[torch.randn(6, 16, generator=g), torch.randn(7, 16, generator=g)]], "siglip_feats": [None],
          "image_noise_mask": [[0, 1]], "t": torch.tensor([0.3]), "return_dict": False}
    dense = _run(model, kw)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        assert torch.equal(_run(model, kw), dense)
        _run(model, kw)
    assert caplog.text.count("does not merge Z-Image Omni calls") == 1 and "merged nothing" not in caplog.text
    assert merging_state(model).merged_tokens == 0
    remove_token_merging(model)


def _pipe_call() -> dict:  # fresh each call: ZImagePipeline rewrites the prompt list it is given in place
    return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 32, "width": 48, "num_inference_steps": 3,
            "max_sequence_length": 128, "guidance_scale": 4.0, "output_type": "np",
            "generator": torch.Generator().manual_seed(0)}


def test_zimage_pipeline_generations() -> None:
    # t rises over a Z-Image generation (1 - sigma): still one generation of 3 steps, not 3 of one step
    contract.pipeline_generations(tiny_z_image(seed=0), _pipe_call, (2, 32, 48, 3))


def test_cli_generate_merges_on_a_zimage_pipeline(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    from typer.testing import CliRunner

    app, model = contract.cli_generate_merges(tmp_path, caplog, tiny_z_image(seed=0), "zimage", "ZImagePipeline")
    res = CliRunner().invoke(app, ["generate", "--model", str(model), "--prompt", "a cat",
                                   "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "give --merge" in res.output
