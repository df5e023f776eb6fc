"""The token-merging contract on a diffusers transformer and pipeline, shared by the per-model merging tests: a
merged call that removes exactly, a small ratio that stays close, a batch whose samples merge as they would alone,
two whole generations, and ``generate --merge`` from the CLI."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import tokensparse as ts
from tokensparse.integrations import merging_blocks, merging_spans
from tokensparse.integrations.merging_hooks import apply_token_merging, merging_state, remove_token_merging
from tokensparse.merging import TokenMergingConfig

from .contract import generate_app


def ours(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The messages tokensparse logged."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("tokensparse")]


def tokens_seen(subs: Iterable[tuple[str, nn.Module]], run: Callable[[], Any]) -> dict[str, list[int]]:
    """The tokens each ``(key, module)`` of ``subs`` saw (its ``hidden_states``, by keyword or else first
    positional) in one ``run()``, listed by key in call order."""
    seen: dict[str, list[int]] = {}
    handles = [module.register_forward_pre_hook(
        lambda m, a, k, key=key: seen.setdefault(key, []).append((k or {}).get(
            "hidden_states", a[0] if a else None).shape[1]), with_kwargs=True) for key, module in subs]
    run()
    for h in handles:
        h.remove()
    return seen


def call_kwargs(module: nn.Module, run: Callable[[], Any]) -> dict:
    """The keyword arguments of ``module``'s first call in one ``run()``."""
    box: list[dict] = []
    handle = module.register_forward_pre_hook(lambda m, a, k: box.append(k), with_kwargs=True)
    run()
    handle.remove()
    return box[0]


def query_key_masks_as_exact(model: nn.Module, attns: Iterable[nn.Module], run: Callable[[], Tensor],
                             monkeypatch: pytest.MonkeyPatch) -> int:
    """A merged ``model``'s query x key masks (those its ``attns`` got in one ``run()``) and output are bit for bit
    what the exact per-pair thinning (``merge_query_key_mask``) gives, and the model call leaves no mask behind in its
    state; how many uniformity checks (``span_is_uniform``) one ``run()`` made, each finding the span uniform."""
    checks: list[bool] = []

    def check(sq: Tensor, span: tuple[int, int], real: Callable[..., bool] = merging_spans.span_is_uniform) -> bool:
        checks.append(real(sq, span))
        return checks[-1]

    monkeypatch.setattr(merging_spans, "span_is_uniform", check)

    def masks() -> tuple[Tensor, list[Tensor]]:
        got: list[Tensor] = []
        handles = [a.register_forward_pre_hook(lambda m, a, k: got.append(k["attention_mask"]), with_kwargs=True)
                   for a in attns]
        out = run()
        for h in handles:
            h.remove()
        return out, got

    fast, fast_masks = masks()
    memo = merging_state(model).square_masks
    assert memo._ref is None and not memo._thinned  # emptied as the call ended
    monkeypatch.setattr(merging_blocks, "thin_query_key_mask",
                        lambda mask, m, span, n, memo=None: merging_spans.merge_query_key_mask(mask, m, span, n))
    exact, exact_masks = masks()
    monkeypatch.undo()
    assert len(fast_masks) == len(exact_masks) > 0
    for a, b in zip(fast_masks, exact_masks):
        assert a.shape == b.shape and torch.equal(a, b)
    assert torch.equal(fast, exact) and all(checks)
    return len(checks)


def merged_then_removes_exactly(model: nn.Module, run: Callable[[], Tensor], dense: Tensor,
                                counts: Callable[[], Any], unmerged: Any, mlp_only: Callable[[Any], None],
                                reapply: bool = False) -> None:
    """``model`` merges (``run()``: its output, ``dense`` without merging): the output differs but stays finite;
    ratio 0 installs nothing (``counts()``, the tokens its sublayers see, back to ``unmerged``); with
    ``merge_attn=False`` ``mlp_only(counts())`` holds; removing merging (after merging afresh, with ``reapply``)
    gives the exact dense output and counts."""
    merged = run()
    assert merged.shape == dense.shape and torch.isfinite(merged).all() and not torch.equal(merged, dense)
    apply_token_merging(model, TokenMergingConfig(ratio=0.0))  # identity: installs nothing
    assert torch.equal(run(), dense) and counts() == unmerged
    apply_token_merging(model, TokenMergingConfig(ratio=0.5, merge_attn=False))  # the MLPs / feed-forward only
    mlp_only(counts())
    if reapply:
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    remove_token_merging(model)
    assert torch.equal(run(), dense) and counts() == unmerged


def stays_close_at_a_small_ratio(model: nn.Module, run: Callable[[], Tensor]) -> None:
    """On smooth inputs (``run()``: the output), merging a quarter of the grid changes the output by under 12%, and
    less than merging half of it."""
    dense = run()
    errors = []
    for ratio in (0.25, 0.5):
        apply_token_merging(model, TokenMergingConfig(ratio=ratio))
        merged = run()
        assert merging_state(model).merged_tokens > 0
        errors.append(float((merged - dense).norm() / dense.norm()))
    remove_token_merging(model)
    assert errors[0] < 0.12 and errors[0] < errors[1], errors


def batch_matches_each_sample_alone(model: nn.Module, run: Callable[[], Tensor],
                                    alone: Callable[[int], Tensor]) -> None:
    """Each sample gets its own matching (from the same destination draw): sample ``i`` of the batch (``run()``)
    merges as it does alone (``alone(i)``)."""
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    both = run()
    for i in range(2):
        apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # afresh: the same destination draw
        torch.testing.assert_close(both[i], alone(i)[0], rtol=1e-4, atol=1e-5)
    remove_token_merging(model)


def pipeline_generations(pipe: Any, call: Callable[[], dict], shape: tuple[int, ...],
                         caplog: pytest.LogCaptureFixture | None = None) -> None:
    """Two generations of 3 steps (``pipe(**call())``, a fresh call each time) merge, at a ratio and at a threshold
    recomputed every 2 steps, into finite images of ``shape`` unlike the dense ones (with ``caplog``: tokensparse
    warning of nothing); removing merging gives the dense images exactly."""
    pipe.set_progress_bar_config(disable=True)
    dense = pipe(**call()).images
    with caplog.at_level(logging.WARNING, logger="tokensparse") if caplog else contextlib.nullcontext():
        for cfg in (TokenMergingConfig(ratio=0.5), TokenMergingConfig(threshold=0.3, recompute_every=2)):
            apply_token_merging(pipe, cfg)
            merged = pipe(**call()).images
            state = merging_state(pipe)
            assert state.step == 2 and state.merged_tokens > 0, cfg  # one generation of 3 steps (and CFG calls)
            assert merged.shape == dense.shape == shape and np.isfinite(merged).all()
            assert not np.array_equal(merged, dense)
    if caplog:
        assert not ours(caplog)  # no mask refused, nothing left unmerged
    remove_token_merging(pipe)
    assert np.array_equal(pipe(**call()).images, dense)


def cli_generate_merges(tmp_path: Path, caplog: pytest.LogCaptureFixture, pipe: Any, name: str, pipeline: str,
                        height: int = 32, width: int = 48) -> tuple[Any, Path]:
    """``generate --merge 0.5`` on ``pipe`` saved as ``tmp_path / name`` runs ``pipeline`` without Sparse Context,
    writes a ``width x height`` image and merges something; returns the typer app and the saved model's folder."""
    from PIL import Image

    app = generate_app()
    from typer.testing import CliRunner
    pipe.save_pretrained(tmp_path / name)
    out = tmp_path / f"{name[0]}.png"
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / name), "--prompt", "a cat", "--merge",
                                       "0.5", "--steps", "2", "--height", str(height), "--width", str(width),
                                       "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pipeline in res.output and "no Sparse Context, merge=0.5" in res.output
    assert Image.open(out).size == (width, height) and "merged nothing" not in caplog.text
    return app, tmp_path / name


def batch_shares_one_matching(model: nn.Module, module: nn.Module, run: Callable[[dict], Tensor], kw: dict) -> None:
    """A model whose positional table has no batch axis merges a batch by one matching: ``module`` (a merged sublayer)
    gets the same kept tokens for two different samples of ``kw``, and two copies of its first sample merge as that
    sample alone would (``run(kwargs)``: the model's output)."""
    seen: list[Any] = []
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    handle = module.register_forward_pre_hook(  # after merging's pre-hook: its matching is active
        lambda m, a, k: seen.append(m.__dict__.get("_tokensparse_active")), with_kwargs=True)
    run(kw)
    handle.remove()
    m = seen[0][0]
    assert m.batch_size == 2 and m.num_merged > 0
    assert torch.equal(m.keep[0], m.keep[1]) and torch.equal(m.index[0], m.index[1])
    same = {k: v[:1].repeat(2, *[1] * (v.dim() - 1)) if isinstance(v, Tensor) else v for k, v in kw.items()}
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))
    pair = run(same)
    apply_token_merging(model, TokenMergingConfig(ratio=0.5))  # afresh: the same destination draw
    alone = run({k: v[:1] if isinstance(v, Tensor) else v for k, v in kw.items()})
    torch.testing.assert_close(pair, alone.repeat(2, *[1] * (alone.dim() - 1)), rtol=1e-4, atol=1e-5)
    remove_token_merging(model)


def pipeline_reuses_matchings(pipe: Any, call: Callable[[], dict], hits: int, merged_tokens: int,
                              caplog: pytest.LogCaptureFixture | None = None) -> None:
    """At ``recompute_every=2`` a generation of 3 steps (``pipe(**call())``) reuses step 0's matchings at step 1
    (``hits`` cache hits) and merges ``merged_tokens`` tokens in all (with ``caplog``: tokensparse warning of
    nothing); a second generation computes the same matchings again (the same images)."""
    pipe.set_progress_bar_config(disable=True)
    apply_token_merging(pipe, TokenMergingConfig(ratio=0.5, recompute_every=2))
    state = merging_state(pipe)
    with caplog.at_level(logging.WARNING, logger="tokensparse") if caplog else contextlib.nullcontext():
        first = pipe(**call()).images
    assert state.step == 2 and state.cache.hits == hits
    assert state.merged_tokens == merged_tokens
    if caplog:
        assert not ours(caplog)
    assert (first == pipe(**call()).images).all()
    remove_token_merging(pipe)


def lora_follows_replaced_modules(build: Callable[[], nn.Module], targets: list[str], run: Callable[[nn.Module], Any],
                                  cfg: TokenMergingConfig, blocks: Callable[[nn.Module], nn.Module]) -> None:
    """Merged sublayers that peft's LoRA replaces by a wrapper (``targets``, and unloading replaces back) keep merging:
    a LoRA added after ``apply_token_merging`` gives what adding it first gives, and after ``unload_lora()`` the model
    gives what it gave without one; removing the merging leaves no hook in ``blocks(model)``. ``build()``: a fresh
    model, ``run(model)``: its output."""
    lora_config = pytest.importorskip("peft").LoraConfig

    def add_lora(model: nn.Module) -> nn.Module:
        torch.manual_seed(1)
        model.add_adapter(lora_config(r=2, lora_alpha=2, target_modules=targets, init_lora_weights=False))
        return model

    with torch.no_grad():
        plain = run(apply_token_merging(build(), cfg))
        first = apply_token_merging(add_lora(build()), cfg)
        lora_then_merging = run(first)
        after = apply_token_merging(build(), cfg)
        run(after)
        assert torch.equal(run(add_lora(after)), lora_then_merging)  # was: the LoRA term of the unmerged tokens added
        first.unload_lora()  # the base modules again
        assert torch.equal(run(first), plain)  # was: those sublayers unmerged (the rest by an earlier call's matching)
    for model in (first, after):
        remove_token_merging(model)
        assert not any(m._forward_pre_hooks for m in blocks(model).modules())


def apply_both(target: Any, cfg: Any, merge: TokenMergingConfig, merging_first: bool) -> None:
    """Sparse Context ``cfg`` and token merging ``merge`` on ``target``, merging's hooks registered first (before
    Sparse Context's) with ``merging_first``, else last: the stacking tests run both orders."""
    if merging_first:
        ts.apply_token_merging(target, merge)
        ts.apply_sparse_context(target, cfg)
    else:
        ts.apply_sparse_context(target, cfg)
        ts.apply_token_merging(target, merge)
