"""Token merging on a tiny random-weight FLUX.3 transformer, run by diffusers' own modular denoise step.

``Flux3Transformer2DModel`` runs the target's tokens alone in its per-mode blocks ``mode_blocks["image"]`` and as the
span after the text in its single blocks over ``[text, target, references]``: those merge; the text's and the
references' per-mode blocks, and the text and reference tokens of the single blocks, are left alone.
"""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("diffusers.models.transformers.transformer_flux3")

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers_tiny_flux3 import flux3_call_kwargs, tiny_flux3_denoise  # noqa: E402
from tokensparse.integrations.merging_diffusers import find_blocks  # noqa: E402
from tokensparse.integrations.merging_flux3 import ids_grid  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402

GRIDS = [(4, 4), (6, 4)]  # two references: 16 + 24 tokens
REFS = 40
SIZE, TARGET = 128, 64  # a 128x128 image: an 8x8 target grid
TEXT = (5, 3)  # the guider's two calls a step: the prompt's tokens, the negative prompt's
SUBLAYERS = ("txt_mode_blocks.0", "mode_blocks.image.0", "mode_blocks.image_cond.0", "single_transformer_blocks.0")


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux3_denoise(seed=0)


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe.transformer)


def run(pipe, steps: int = 2, seed: int = 0) -> Tensor:
    return pipe(**flux3_call_kwargs(GRIDS, size=SIZE, steps=steps, seed=seed)).values["latents"]


def counts(pipe) -> dict[str, list[int]]:
    """The tokens each block's ``attn`` and ``ff`` saw in one generation (registered now: after merging's hooks)."""
    subs = [(f"{b}.{s}", pipe.transformer.get_submodule(f"{b}.{s}")) for b in SUBLAYERS for s in ("attn", "ff")]
    return contract.tokens_seen(subs, lambda: run(pipe))


def expected(target: int, single_target: int | None = None) -> dict[str, list[int]]:
    """:func:`counts` of a 2-step generation whose per-mode target blocks see ``target`` tokens and whose single
    blocks see ``single_target`` (default: ``target``) between the text and the references."""
    single = target if single_target is None else single_target
    out: dict[str, list[int]] = {}
    for s in ("attn", "ff"):
        out[f"txt_mode_blocks.0.{s}"] = list(TEXT) * 2
        out[f"mode_blocks.image.0.{s}"] = [target] * 4
        out[f"mode_blocks.image_cond.0.{s}"] = [REFS] * 4
        out[f"single_transformer_blocks.0.{s}"] = [t + single + REFS for t in TEXT] * 2
    return out


def test_finds_the_target_blocks_and_refused_nothing(pipe):
    assert merging_supports(pipe.transformer) is None
    blocks = find_blocks(pipe.transformer)
    assert [n for n, _ in blocks["flux3"]] == ["mode_blocks.image.0", "single_transformer_blocks.0"]
    assert not any(found for kind, found in blocks.items() if kind != "flux3")


def test_ids_grid_reads_the_scaled_target_ids():
    h, w = torch.meshgrid(torch.arange(3.0), torch.arange(5.0), indexing="ij")
    ids = torch.stack([torch.zeros(15), h.flatten() * 0.5, w.flatten() * 0.5, torch.zeros(15)], -1)
    assert ids_grid(ids) == (3, 5) and ids_grid(ids[None]) == (3, 5)
    assert ids_grid(ids.flip(0)) is None  # not row-major
    assert ids_grid(ids[:-1]) is None  # not every cell
    assert ids_grid(torch.zeros(0, 4)) is None


def test_merges_the_target_only_and_removes_exactly(pipe, caplog):
    dense = run(pipe)
    unmerged = expected(TARGET)
    assert counts(pipe) == unmerged
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))  # the modular pipeline: its transformer
        assert counts(pipe) == expected(TARGET // 2)  # the text's and the references' blocks see all their tokens
    assert not contract.ours(caplog)
    state = merging_state(pipe.transformer)
    assert state is merging_state(pipe) and state.merged_tokens == 2 * 32 * 4  # 2 blocks x half of 64 x 4 calls

    def mlp_only(seen: dict[str, list[int]]) -> None:
        want = expected(TARGET // 2)
        for b in ("mode_blocks.image.0", "single_transformer_blocks.0"):  # the attention whole
            want[f"{b}.attn"] = unmerged[f"{b}.attn"]
        assert seen == want

    contract.merged_then_removes_exactly(pipe, lambda: run(pipe), dense, lambda: counts(pipe), unmerged, mlp_only)


def _first_calls(model: nn.Module, call: dict) -> dict[str, dict]:
    """The keyword arguments (tokens as ``hidden_states``) of each target block's ``attn`` and of the references'
    first per-mode ``attn`` in one call of ``model``."""
    seen: dict[str, dict] = {}
    handles = [model.get_submodule(f"{b}.attn").register_forward_pre_hook(
        lambda m, a, k, b=b: None if b in seen else seen.update({b: k}), with_kwargs=True) for b in SUBLAYERS[1:]]
    with torch.no_grad():
        model(**call)
    for h in handles:
        h.remove()
    return seen


def _bare_call(refs: bool = True) -> dict:
    g = torch.Generator().manual_seed(3)
    h, w = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ids = torch.stack([torch.zeros(64), h.flatten() * 0.5, w.flatten() * 0.5, torch.zeros(64)], -1)
    call = {"hidden_states": torch.randn(2, TARGET, 16, generator=g), "encoder_hidden_states": torch.randn(2, 5, 16),
            "timestep": torch.tensor([0.7, 0.7]), "img_ids": ids, "txt_ids": torch.zeros(5, 4), "return_dict": False}
    if refs:
        ref_ids = ids[:24].clone()
        ref_ids[:, 3] = -1
        call.update(image_cond_hidden_states=torch.randn(2, 24, 16, generator=g), image_cond_ids=ref_ids)
    return call


def test_text_and_reference_tokens_and_their_rope_rows_stay_whole():
    model = tiny_flux3_denoise(seed=1).transformer
    call = _bare_call()
    dense = _first_calls(model, call)
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    merged = _first_calls(model, call)
    ref = "mode_blocks.image_cond.0"
    assert torch.equal(merged[ref]["hidden_states"], dense[ref]["hidden_states"])  # never merged
    single, d = merged["single_transformer_blocks.0"], dense["single_transformer_blocks.0"]
    x, dx = single["hidden_states"], d["hidden_states"]
    assert x.shape[1] == 5 + 32 + 24
    assert torch.equal(x[:, :5], dx[:, :5]) and torch.equal(x[:, -24:], dx[:, -24:])  # text, references
    for table, dtable in zip(single["image_rotary_emb"], d["image_rotary_emb"]):
        assert table.shape[0] == x.shape[1]
        assert torch.equal(table[:5], dtable[:5]) and torch.equal(table[-24:], dtable[-24:])
        rows = [next(j for j in range(TARGET) if torch.equal(dtable[5 + j], r)) for r in table[5:-24]]
        assert rows == sorted(set(rows))  # each kept target token keeps its own row, in order
    mode = merged["mode_blocks.image.0"]
    assert mode["hidden_states"].shape[1] == 32 and mode["image_rotary_emb"][0].shape[0] == 32
    with torch.no_grad():
        out = model(**call)[0]
        assert out.shape == (2, TARGET, 16) and torch.isfinite(out).all()
        ts.remove_token_merging(model)
        assert not torch.equal(model(**call)[0], out)
        without = _bare_call(refs=False)  # a text-to-image call: [text, target] merges too
        plain = model(**without)[0]
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
        assert not torch.equal(model(**without)[0], plain) and merging_state(model).merged_tokens == 2 * 32
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.0))
        assert torch.equal(model(**without)[0], plain)


def test_a_target_that_is_no_grid_runs_unmerged_with_a_warning(caplog):
    model = tiny_flux3_denoise(seed=1).transformer
    call = _bare_call()
    call["img_ids"] = call["img_ids"].flip(0)  # not row-major: no grid to merge on
    with torch.no_grad():
        dense = model(**call)[0]
        ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
        with caplog.at_level(logging.WARNING, logger="tokensparse"):
            assert torch.equal(model(**call)[0], dense)
    assert "merged nothing" in caplog.text


def test_ca_tome_reuses_its_matchings_across_steps_and_generations_repeat(pipe):
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(threshold=0.3, recompute_every=2))
    state = merging_state(pipe)
    first = run(pipe, steps=4)
    assert state.step == 3 and state.merged_tokens > 0
    # 2 blocks x 2 guidance passes: computed at steps 0 and 2, reused at steps 1 and 3
    assert (state.cache.misses, state.cache.hits) == (8, 8)
    assert torch.equal(run(pipe, steps=4), first)  # the next generation starts afresh: the same again
    ts.remove_token_merging(pipe)
    assert not torch.equal(run(pipe, steps=4), first)


@pytest.mark.parametrize("merging_first", [False, True], ids=["sparse-first", "merging-first"])
def test_stacks_with_sparse_context_on_the_same_transformer(pipe, merging_first):
    dense = run(pipe)
    cfg, merge = SparseContextConfig(keep=0.25), ts.TokenMergingConfig(ratio=0.5)
    ts.apply_sparse_context(pipe.transformer, cfg)
    sparse = run(pipe)
    ts.remove_sparse_context(pipe.transformer)
    contract.apply_both(pipe.transformer, cfg, merge, merging_first)
    seen = counts(pipe)
    kept = 16 // 4 + 24 // 4
    assert seen["mode_blocks.image.0.attn"] == [TARGET // 2] * 4 and seen["mode_blocks.image_cond.0.ff"] == [kept] * 4
    assert seen["single_transformer_blocks.0.attn"] == [t + TARGET // 2 + kept for t in TEXT] * 2
    stacked = run(pipe)
    assert torch.isfinite(stacked).all() and not torch.equal(stacked, sparse)
    ts.remove_token_merging(pipe.transformer)
    assert torch.equal(run(pipe), sparse)
    ts.remove_sparse_context(pipe.transformer)
    assert torch.equal(run(pipe), dense)


def test_gradient_checkpointing_recomputes_with_the_forwards_matchings():
    model = tiny_flux3_denoise(seed=2).transformer.train()
    call = _bare_call()
    ts.apply_token_merging(model, ts.TokenMergingConfig(threshold=0.5))

    def grads(checkpointing: bool) -> list[Tensor]:
        model.zero_grad(set_to_none=True)
        (model.enable_gradient_checkpointing if checkpointing else model.disable_gradient_checkpointing)()
        ts.begin_generation(model)
        model(**call)[0].pow(2).mean().backward()
        assert not merging_state(model)._recorded
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    plain = grads(False)
    assert merging_state(model).merged_tokens > 0
    assert all(torch.equal(a, b) for a, b in zip(plain, grads(True)))


@torch.no_grad()
def test_compiled_merging_equals_uncompiled() -> None:
    """Traced by dynamo, the merged blocks' outputs drifted from the uncompiled ones from the second step on (up to
    ~0.02 here); their hooks now run as Python under torch.compile, so every step is exact."""
    model = tiny_flux3_denoise(seed=0).transformer
    h, w = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    ids = torch.stack([torch.zeros(64), h.flatten() * 0.5, w.flatten() * 0.5, torch.zeros(64)], -1)
    x = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0))

    def call(t: float, n: int) -> dict:  # CFG's two passes a step: prompt and negative prompt of other lengths
        txt = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(n))
        return {"hidden_states": x, "img_ids": ids, "encoder_hidden_states": txt, "timestep": torch.tensor([t]),
                "txt_ids": torch.zeros(n, 4)}

    steps = [(0.9, 5), (0.9, 3), (0.5, 5), (0.5, 3), (0.2, 5)]
    ts.apply_token_merging(model, ts.TokenMergingConfig(ratio=0.5))
    want = [model(**call(*s)).sample for s in steps]
    model.compile(backend="eager")
    got = [model(**call(*s)).sample for s in steps]  # timesteps rise again: a new generation, as the first
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    ts.remove_token_merging(model)
