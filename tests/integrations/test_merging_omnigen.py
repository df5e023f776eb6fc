"""Token merging on OmniGen (``OmniGenTransformer2DModel``, ``OmniGenPipeline``): the target, last in the decoder's
sequence ``[text and input images, time token, target]``, merges in every block's attention (its keys, RoPE rows and
query x key mask along) and MLP; the text, the input images and the time token -- which never attend to the target --
never."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state  # noqa: E402

from . import merging_contract as contract  # noqa: E402
from .contract import first_call, generate_app  # noqa: E402
from .omnigen_support import omnigen_pipe  # noqa: E402
from .test_diffusers_omnigen import REFS, TWO  # noqa: E402

H, W = 64, 128  # pixels: a 4x8 target grid
TARGET = 32


@pytest.fixture(scope="module")
def pipe():
    yield from omnigen_pipe()


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe)


def _pipe_call(refs: int = 2, **extra) -> dict:
    """Two references, text and image guidance: rows ``[conditional, unconditional, image-guidance]``, left-padded."""
    torch.manual_seed(0)  # the pipeline samples its references' VAE latents from the global generator
    images = [Image.fromarray(r) for r in REFS[:refs]]
    prompt = TWO if refs == 2 else "a red cat"
    return {"prompt": [prompt], "input_images": [images] if refs else None, "height": H, "width": W,
            "output_type": "np", "num_inference_steps": 3, "generator": torch.Generator().manual_seed(0), **extra}


def _bare_call(pipe, refs: int = 2) -> dict:
    """The transformer's first call in the pipeline, as keywords."""
    _, kw = first_call(pipe, lambda p: p(**_pipe_call(refs, num_inference_steps=1)))
    return {**kw, "return_dict": False}


def _run(model: nn.Module, kw: dict) -> Tensor:
    with torch.no_grad():
        return model(**kw)[0]


def _counts(model: nn.Module, kw: dict) -> dict[str, list[int]]:
    subs = [(f"{i}.{key}", getattr(blk, key)) for i, blk in enumerate(model.layers) for key in ("self_attn", "mlp")]
    return contract.tokens_seen(subs, lambda: _run(model, kw))


def _expected(joint: int, gone_attn: int, gone_mlp: int) -> dict[str, list[int]]:
    return {f"{i}.{key}": [joint - gone] for i in range(2) for key, gone in (("self_attn", gone_attn),
                                                                             ("mlp", gone_mlp))}


def test_merges_the_target_only_and_removes_exactly(pipe) -> None:
    model, kw = pipe.transformer, _bare_call(pipe)
    joint = kw["attention_mask"].shape[-1]
    dense = _run(model, kw)
    unmerged = _counts(model, kw)
    assert unmerged == _expected(joint, 0, 0)
    attn = model.layers[0].self_attn
    dense_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    assert _counts(model, kw) == _expected(joint, TARGET // 2, TARGET // 2)
    assert merging_state(model).merged_tokens == 2 * TARGET // 2
    merged_kw = contract.call_kwargs(attn, lambda: _run(model, kw))
    prefix, kept = joint - TARGET, joint - TARGET // 2
    assert merged_kw["encoder_hidden_states"] is merged_kw["hidden_states"]  # its keys: the merged tokens
    for rope, dense_rope in zip(merged_kw["image_rotary_emb"], dense_kw["image_rotary_emb"]):
        assert rope.shape[0] == kept and torch.equal(rope[:prefix], dense_rope[:prefix])
        rows = [next(j for j in range(TARGET) if torch.equal(dense_rope[prefix + j], r)) for r in rope[prefix:]]
        assert rows == sorted(set(rows)), rows  # each kept target token keeps its own row, in order
    mask, dense_mask = merged_kw["attention_mask"], dense_kw["attention_mask"]
    assert mask.shape == (3, 1, kept, kept)  # the query x key mask: the kept tokens' rows and columns
    assert torch.equal(mask[..., :prefix, :prefix], dense_mask[..., :prefix, :prefix])
    assert torch.equal(mask[..., prefix:, :prefix], dense_mask[..., -TARGET // 2:, :prefix])

    # nothing before the target attends to it: every unpadded prefix token of the last block computes as unmerged
    def last_block() -> Tensor:
        out: list[Tensor] = []
        handle = model.layers[-1].register_forward_hook(lambda m, a, o: out.append(o))
        _run(model, kw)
        handle.remove()
        return out[0][:, :prefix]

    real = kw["attention_mask"][:, -1, :prefix] != 0  # (B, prefix): the left padding is 0 in the target's row
    merged_prefix = last_block()
    ts.remove_token_merging(model)
    torch.testing.assert_close(merged_prefix[real], last_block()[real], rtol=0, atol=1e-6)
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))

    def mlp_only(counts: dict[str, list[int]]) -> None:
        assert counts == _expected(joint, 0, TARGET // 2)

    contract.merged_then_removes_exactly(model, lambda: _run(model, kw), dense, lambda: _counts(model, kw), unmerged,
                                         mlp_only, reapply=True)


def test_query_key_mask_checked_once_per_call_and_thinned_as_the_exact_path(pipe, monkeypatch) -> None:
    # every block gets the call's one mask, whose target rows and columns are alike: checked once per model call (was:
    # per block, with copies of the mask), then sliced -- bit for bit the per-pair thinning, masks and output
    model, kw = pipe.transformer, _bare_call(pipe)
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    attns = [blk.self_attn for blk in model.layers]
    assert contract.query_key_masks_as_exact(model, attns, lambda: _run(model, kw), monkeypatch) == 1
    assert contract.query_key_masks_as_exact(model, attns, lambda: _run(model, kw), monkeypatch) == 1  # afresh


def test_merged_output_stays_close_at_a_small_ratio(pipe) -> None:
    model, kw = pipe.transformer, _bare_call(pipe)
    g = torch.Generator().manual_seed(1)  # neighbouring target tokens alike, as in real latents
    kw["hidden_states"] = nn.functional.interpolate(torch.randn(3, 4, 2, 4, generator=g), size=(8, 16),
                                                    mode="bilinear")
    contract.stays_close_at_a_small_ratio(model, lambda: _run(model, kw))


def test_batch_shares_one_matching(pipe) -> None:
    # the RoPE table has no batch axis (row 0's positions): one matching, from the batch's mean tokens, for the batch;
    # text to image (no input images to place), rows [conditional, unconditional]
    model, kw = pipe.transformer, _bare_call(pipe, refs=0)
    assert kw["attention_mask"].shape[0] == 2 and not kw["input_image_sizes"]
    contract.batch_shares_one_matching(model, model.layers[0].self_attn, lambda k: _run(model, k), kw)


def test_pipeline_generations_with_references_and_both_guidances(pipe, caplog) -> None:
    contract.pipeline_generations(pipe, _pipe_call, (1, H, W, 3), caplog)


def test_pipeline_reuses_matchings_between_recompute_steps(pipe, caplog) -> None:
    # hits: step 1 reuses step 0's matchings in each of the 2 blocks (one batched call per step); merged: 3 steps x
    # 2 blocks x half of the 4x8 target
    contract.pipeline_reuses_matchings(pipe, _pipe_call, 2, 3 * 2 * TARGET // 2, caplog)


@pytest.mark.parametrize("merging_first", [False, True], ids=["sparse-first", "merging-first"])
@pytest.mark.parametrize("proportional", [False, True], ids=["plain", "proportional"])
def test_stacks_with_sparse_context_on_the_input_images(pipe, merging_first, proportional) -> None:
    def run() -> np.ndarray:
        return pipe(**_pipe_call(num_inference_steps=2)).images

    subs = [(str(i), blk.self_attn) for i, blk in enumerate(pipe.transformer.layers)]
    dense = run()
    cfg, merge = ts.SparseContextConfig(keep=0.25, proportional=proportional), ts.TokenMergingConfig(ratio=0.5)
    ts.apply_sparse_context(pipe, cfg)
    thinned = contract.tokens_seen(subs, run)
    sparse = run()
    ts.remove_sparse_context(pipe)
    contract.apply_both(pipe, cfg, merge, merging_first)
    # the thinned sequence (its attention row by row, each with its own RoPE rows), half the target merged away
    assert contract.tokens_seen(subs, run) == {k: [n - TARGET // 2 for n in v] for k, v in thinned.items()}
    stacked = run()
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, sparse)
    ts.remove_token_merging(pipe)
    assert np.array_equal(run(), sparse)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(run(), dense)


def test_under_sparse_context_keeping_every_token_merges_as_alone(pipe) -> None:
    # the thinned call runs attention row by row with each row's own RoPE rows: merging thins those as it thins the
    # transformer's table (was: the merged tokens met the unmerged rows, a shape mismatch)
    merge = ts.TokenMergingConfig(ratio=0.5)
    ts.apply_token_merging(pipe, merge)
    alone = pipe(**_pipe_call()).images
    ts.apply_sparse_context(pipe, ts.SparseContextConfig(count=10_000))  # every token: the thinned path, as dense
    ts.apply_token_merging(pipe, merge)  # afresh: the same destination draws
    np.testing.assert_allclose(pipe(**_pipe_call()).images, alone, atol=1e-5)


def test_generate_cli_merges_with_references(pipe, tmp_path, caplog) -> None:
    from typer.testing import CliRunner

    pipe.save_pretrained(tmp_path / "omnigen")
    refs = []
    for i, image in enumerate(REFS):
        Image.fromarray(image).save(tmp_path / f"{i}.png")
        refs += ["--ref", str(tmp_path / f"{i}.png")]
    out = tmp_path / "o.png"
    res = CliRunner().invoke(generate_app(), ["generate", "--model", str(tmp_path / "omnigen"), *refs, "--prompt", TWO,
                                              "--merge", "0.5", "--height", "64", "--width", "64", "--steps", "2",
                                              "--out", str(out)])
    assert res.exit_code == 0, res.output  # was: "token merging ... OmniGenBlock (blocks token merging does not know)"
    assert "OmniGenPipeline, 2 reference(s), keep=0.25" in res.output and "merge=0.5" in res.output
    assert Image.open(out).size == (64, 64) and "merged nothing" not in caplog.text
