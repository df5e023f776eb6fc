"""The apply / re-apply / remove contract of Sparse Context on a diffusers pipeline, and the fixtures, shared by the
per-pipeline tests."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from tokensparse.context import SparseContextConfig
from tokensparse.generation import begin_generation
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.merging_hooks import merging_state, remove_token_merging


def input_lengths(module: nn.Module) -> list[int]:
    """The token count of ``module``'s first argument at each of its calls from now on (a forward pre-hook): what a
    pipeline's patch embedder sees, target and references together."""
    seen: list[int] = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    return seen


def edges_views(monkeypatch: pytest.MonkeyPatch, pipe: Any, run: Callable[[Any], Any]) -> list[Any]:
    """The reference views the ``edges`` scorer gets when ``run(pipe)`` runs under Sparse Context (keep 0.25,
    ``selector="edges"``): what a pixel selector sees of each reference."""
    from tokensparse.selection import SCORERS

    seen: list[Any] = []
    edges = SCORERS["edges"]
    monkeypatch.setitem(SCORERS, "edges", lambda view, g: seen.append(view) or edges(view, g))
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe)
    return seen


def qwen_thinned_call(transformer: nn.Module, kwargs: dict) -> tuple[Tensor, Tensor, dict]:
    """A Qwen-Image transformer called once with ``kwargs`` under Sparse Context (keep 0.25, ``uniform``), then
    restored: its output, the rows that output keeps (the thinned positions: dropped rows come back as zeros) and
    what its first block got (``rope``: the rotary tables; ``mod``: the ``modulate_index``)."""
    seen: dict = {}
    handle = transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kw: seen.update(rope=kw["image_rotary_emb"], mod=kw["modulate_index"]), with_kwargs=True)
    apply_sparse_context_diffusers(transformer, SparseContextConfig(keep=0.25, selector="uniform"))
    try:
        with torch.no_grad():
            out = transformer(**kwargs)[0]
    finally:
        remove_sparse_context_diffusers(transformer)
        handle.remove()
    return out, torch.nonzero(out[0].abs().sum(-1) != 0).squeeze(1), seen


def tiny_pipeline(build: Callable[..., Any]) -> Any:
    """A module-scoped fixture: ``build(seed=0)`` (a tiny pipeline builder) with its progress bar off."""

    @pytest.fixture(scope="module")
    def pipe() -> Any:
        p = build(seed=0)
        p.set_progress_bar_config(disable=True)
        return p

    return pipe


def shrink_qwen_layered(monkeypatch: pytest.MonkeyPatch, side: int = 32) -> None:
    """Make ``QwenImageLayeredPipeline`` size its layers ``side`` x ``side`` pixels: it sizes them from
    ``calculate_dimensions(640 * 640, ratio)`` (``resolution`` 640 or 1024), far too big for a tiny pipeline."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_layered as module

    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (side, side))


def qwen_layered_pipe() -> Any:
    """A fixture (function-scoped): the tiny Qwen-Image-Layered pipeline (seed 0, progress bar off) at 32x32 pixels
    (:func:`shrink_qwen_layered`)."""
    from tokensparse.integrations.diffusers_tiny_qwen_layered import tiny_qwen_image_layered

    @pytest.fixture
    def pipe(monkeypatch: pytest.MonkeyPatch) -> Any:
        shrink_qwen_layered(monkeypatch)
        p = tiny_qwen_image_layered(seed=0)
        p.set_progress_bar_config(disable=True)
        return p

    return pipe


def pipe_fixtures(build: Callable[..., Any]) -> tuple[Any, Any]:
    """``pipe, clean = pipe_fixtures(build)``: the fixture :func:`tiny_pipeline` makes, and an autouse one that
    removes Sparse Context and token merging from ``pipe`` after each test (the pipeline is shared by the module's
    tests: one that leaves either applied must not change the next one's outputs)."""

    @pytest.fixture(autouse=True)
    def clean(pipe: Any) -> Any:
        yield
        clear(pipe)

    return tiny_pipeline(build), clean


def clear(pipe: Any) -> None:
    """Remove Sparse Context and token merging from ``pipe``, where applied (:func:`pipe_fixtures`' autouse fixture
    runs it after each test)."""
    remove_sparse_context_diffusers(pipe)
    if merging_state(pipe) is not None:  # remove_token_merging refuses a model merging does not support
        remove_token_merging(pipe)


def reapply_then_remove(pipe: Any, run: Callable[[Any], np.ndarray], sparse: np.ndarray, dense: np.ndarray,
                        hooked: Sequence[nn.Module]) -> None:
    """``pipe`` runs Sparse Context at keep 0.25 (output ``sparse``; ``dense`` without it): applying it again gives
    the same output with one pre-hook on each of the ``hooked`` modules (not stacked); removing it leaves none and
    the exact dense output."""
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))  # twice = once
    assert np.array_equal(run(pipe), sparse)
    assert all(len(module._forward_pre_hooks) == 1 for module in hooked)
    remove_sparse_context_diffusers(pipe)
    assert not any(module._forward_pre_hooks for module in hooked)
    assert np.array_equal(run(pipe), dense)


NO_KV_CACHE = "cache=True needs a pipeline with a reference K/V cache"


def refuses_proportional_and_cache(pipe: Any, proportional: str, cache: str = NO_KV_CACHE) -> None:
    """Sparse Context with ``proportional=True`` and with ``cache=True`` are each a ValueError matching the given
    pattern (``cache``: by default, that ``pipe`` has no reference K/V cache), and neither leaves it applied."""
    with pytest.raises(ValueError, match=proportional):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, proportional=True))
    with pytest.raises(ValueError, match=cache):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, cache=True))
    assert sparse_context_state(pipe) is None


def generate_app() -> Any:
    """A typer app with ``tokensparse generate`` and a second command, so that ``generate`` is addressed by name as
    in tokensparse's CLI (skips the test without typer)."""
    typer = pytest.importorskip("typer")
    from tokensparse.cli_diffusers import generate

    app = typer.Typer()
    app.command()(generate)
    app.command("noop")(lambda: None)
    return app


def ref_png(folder: Path, name: str = "ref.png") -> Path:
    """A 64x64 RGB noise image (seed 0) saved as ``folder / name``: a ``--ref`` for the CLI tests."""
    from PIL import Image

    path = folder / name
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(path)
    return path


def pipeline_folder(folder: Path, cls: str, **components: Any) -> Path:
    """``folder`` made (if missing) with a ``model_index.json`` naming pipeline ``cls`` (and ``components``, e.g.
    ``transformer=["diffusers", "FluxTransformer2DModel"]``) and nothing else: what the CLI reads before loading."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": cls, **components}))
    return folder


def first_call(pipe: Any, run: Callable[[Any], Any]) -> tuple[tuple, dict]:
    """The arguments (tensors cloned) of the first transformer call of ``run(pipe)``."""
    seen: list[tuple[tuple, dict]] = []

    def clone(value: Any) -> Any:
        return value.clone() if isinstance(value, torch.Tensor) else value

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append((tuple(clone(a) for a in args), {k: clone(v) for k, v in kwargs.items()}))

    handle = pipe.transformer.register_forward_pre_hook(record, with_kwargs=True, prepend=True)
    try:
        run(pipe)
    finally:
        handle.remove()
    return seen[0]


def checkpointed_grads(transformer: nn.Module, calls: Sequence[tuple[tuple, dict]], checkpointing: bool) -> Any:
    """Every parameter's gradient (flattened, concatenated) after one backward through ``transformer``'s outputs
    for ``calls`` (each a generation of its own), with or without diffusers' gradient checkpointing; the
    transformer is left in eval mode, without checkpointing or gradients."""
    transformer.train()
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    try:
        loss = 0.0
        for args, kwargs in calls:
            begin_generation(transformer)
            out = transformer(*args, **{**kwargs, "return_dict": False})[0]
            loss = loss + out.float().square().mean()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in transformer.parameters() if p.grad is not None])
    finally:
        transformer.eval()
        transformer.disable_gradient_checkpointing()
        transformer.zero_grad(set_to_none=True)


def assert_checkpointing_is_exact(transformer: nn.Module, calls: Sequence[tuple[tuple, dict]]) -> None:
    """With Sparse Context (keep 0.5, ``edges``) applied to ``transformer``, gradients through ``calls`` under
    diffusers' gradient checkpointing equal those without it (a recomputed block gets what its forward got), each
    call selects once per run, and nothing recorded for a backward is left behind."""
    apply_sparse_context_diffusers(transformer, SparseContextConfig(keep=0.5, selector="edges"))
    plain = checkpointed_grads(transformer, calls, checkpointing=False)
    checkpointed = checkpointed_grads(transformer, calls, checkpointing=True)
    torch.testing.assert_close(checkpointed, plain, rtol=0, atol=1e-6)
    state = sparse_context_state(transformer)
    assert state.selections == 2 * len(calls) and not state.replay._recorded


@pytest.fixture(autouse=True)
def joyimage_small_buckets(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """Autouse fixture for the JoyImage test modules (import it there): every image snaps to one of the tiny
    pipelines' small buckets, not >= 512 px; after each test the module's ``edit`` / ``plus`` pipelines it used are
    :func:`clear`-ed."""
    import diffusers.pipelines.joyimage.image_processor as module

    from tokensparse.integrations.diffusers_tiny_joyimage import SMALL_BUCKETS

    monkeypatch.setitem(module.BUCKETS, 1024, SMALL_BUCKETS)
    yield
    for name in ("edit", "plus"):
        if name in request.fixturenames:
            clear(request.getfixturevalue(name))
