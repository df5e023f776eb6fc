"""Sparse Context on tiny random-weight VisualCloze pipelines (tiny CLIP + T5 text encoders, built offline).

``VisualClozeGenerationPipeline`` puts each row of its image grid side by side and runs all rows' tokens through a
FLUX.1 Fill transformer, ids ``(row, h, w)`` with rows from 1; the last row is the query (its targets ``None``).
At resolution 32 a 32x32 image is 8x8 tokens: the two example rows are 8x16 = 128 tokens each, and the query row too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image

from tokensparse.context import SparseContextConfig
from tokensparse.integrations.diffusers import (
    apply_sparse_context_diffusers,
    remove_sparse_context_diffusers,
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_visualcloze import tiny_visualcloze

from .contract import NO_KV_CACHE, generate_app, pipe_fixtures, pipeline_folder, reapply_then_remove
from .proportional import assert_bias_is_duplication

ROW, KEPT = 128, 32  # tokens of a row, and kept of an example row at keep 0.25
RS = np.random.RandomState(0)
PIXELS = [[(RS.rand(32, 32, 3) * 255).astype("uint8") for _ in range(2)] for _ in range(3)]


pipe, clean = pipe_fixtures(tiny_visualcloze)


def grid() -> list[list[Image.Image | None]]:
    rows = [[Image.fromarray(x) for x in row] for row in PIXELS]
    rows[-1][-1] = None  # the target
    return rows


def run(pipe, samples: int = 1, **kwargs):
    task = "make it red" if samples == 1 else ["make it red"] * samples
    content = "a cat" if samples == 1 else ["a cat"] * samples
    return pipe(task_prompt=task, content_prompt=content, image=grid() if samples == 1 else [grid()] * samples,
                num_inference_steps=2, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


class Calls:
    """The transformer's call keywords (a forward pre-hook: after Sparse Context's, it sees the thinned call)."""

    def __init__(self, tr) -> None:
        self.kwargs: list[dict] = []
        self.handle = tr.register_forward_pre_hook(lambda m, a, k: self.kwargs.append(dict(k)), with_kwargs=True)

    def tokens(self) -> list[int]:
        self.handle.remove()
        return [kw["hidden_states"].shape[1] for kw in self.kwargs]


def test_identity_fewer_tokens_reapply_and_remove(pipe):
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    calls = Calls(pipe.transformer)
    sparse = run(pipe)
    assert calls.tokens() == [2 * KEPT + ROW] * 2  # 2 steps: the example rows thinned, the query row whole
    state = sparse_context_state(pipe)
    (index, layout), = state.index.values()
    assert state.selections == 1 and layout.grids == [(8, 16), (8, 16)] and layout.n == 3 * ROW
    assert bool((index[-ROW:] == torch.arange(2 * ROW, 3 * ROW)).all())  # the last row (the query) whole
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])


def test_kept_tokens_keep_their_ids(pipe):
    calls = Calls(pipe.transformer)
    run(pipe)
    calls.tokens()
    kw = calls.kwargs[0]
    tr = pipe.transformer
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random"))
    seen = Calls(tr)
    with torch.no_grad():
        out = tr(**kw)[0]
    seen.tokens()
    (index, _), = sparse_context_state(tr).index.values()
    remove_sparse_context_diffusers(tr)
    assert not torch.equal(index[:KEPT], torch.arange(KEPT))  # a scattered subset, not a prefix
    thinned = seen.kwargs[0]
    assert torch.equal(thinned["img_ids"], kw["img_ids"][index])  # every kept token at its own (row, h, w)
    with torch.no_grad():
        by_hand = tr(**dict(kw, hidden_states=kw["hidden_states"][:, index], img_ids=kw["img_ids"][index]))[0]
    assert torch.equal(out[:, index], by_hand)
    dropped = torch.ones(out.shape[1], dtype=torch.bool)
    dropped[index] = False
    assert not out[:, dropped].any()  # dropped tokens predict zero: the scheduler leaves their latents


def test_pixel_scorers_get_each_example_rows_pixels(pipe, monkeypatch):
    import tokensparse.integrations.diffusers as hook_module

    seen, original = [], hook_module.keep_mask

    def spy(views, cfg, **kwargs):
        seen.append([(v.image, v.prompts) for v in views])
        return original(views, cfg, **kwargs)

    monkeypatch.setattr(hook_module, "keep_mask", spy)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe)
    (views,) = seen
    assert len(views) == 2  # the two example rows, each one image side by side
    for (image, prompts), row in zip(views, PIXELS):
        want = torch.from_numpy(np.concatenate(row, 1).astype(np.float32) / 255).permute(2, 0, 1)[None]
        assert image.shape == want.shape == (1, 3, 32, 64) and torch.allclose(image, want, atol=1e-6)
        assert prompts == ["make it red"]


def test_batch(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    calls = Calls(pipe.transformer)
    out = run(pipe, samples=2, num_images_per_prompt=2)
    assert calls.tokens() == [2 * KEPT + ROW] * 2
    assert [kw["hidden_states"].shape[0] for kw in calls.kwargs] == [4, 4]
    assert out.shape == (4, 32, 32, 3) and np.isfinite(out).all()
    assert sparse_context_state(pipe).selections == 1


def test_proportional_and_cache(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="random"))
    plain = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="random", proportional=True))
    biased = run(pipe)
    (sizes, bias), = sparse_context_state(pipe).sizes.values()
    (index, layout), = sparse_context_state(pipe).index.values()
    assert [float(sizes[p].sum()) for p in layout.positions] == [ROW, ROW] and torch.equal(bias, sizes[index].log())
    assert np.isfinite(biased).all() and not np.array_equal(biased, plain)
    with pytest.raises(ValueError, match=NO_KV_CACHE):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, cache=True))


def test_the_bias_acts_as_copies_on_this_transformer(pipe):
    """The log(size) bias is exact on the Fill transformer: checked through the FLUX ids layout (target 0), the
    query row renumbered 0."""
    calls = Calls(pipe.transformer)
    run(pipe)
    calls.tokens()
    kw = dict(calls.kwargs[0])
    ids = kw["img_ids"].clone()
    ids[ids[:, 0] == 3, 0] = 0
    kw["img_ids"] = ids
    with torch.no_grad():
        assert_bias_is_duplication(pipe.transformer, kw, ids, (1, 2))


def test_bare_transformer_keeps_the_query_row_whole(pipe):
    """On the bare transformer (no pipeline to tell VisualCloze from FLUX.1 Kontext) its ids still say which row is
    the query: the example rows are thinned, the query row stays whole, the selection is made once (from the clean
    latents), as through the pipeline."""
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="random"))
    through_pipe = run(pipe)
    remove_sparse_context_diffusers(pipe)
    tr = pipe.transformer
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random"))
    calls = Calls(tr)
    out = run(pipe)
    assert calls.tokens() == [2 * KEPT + ROW] * 2
    state = sparse_context_state(tr)
    (index, layout), = state.index.values()
    remove_sparse_context_diffusers(tr)
    assert state.selections == 1 and layout.grids == [(8, 16), (8, 16)]
    assert bool((index[-ROW:] == torch.arange(2 * ROW, 3 * ROW)).all())
    assert np.array_equal(out, through_pipe)


def test_reapplied_on_its_transformer_it_still_scores_each_example_rows_pixels(pipe, monkeypatch, caplog):
    """Applied through the pipeline, then again on its transformer (which keeps the pipeline's capture): the
    selection still gets each example row's pixels."""
    import tokensparse.integrations.diffusers as hook_module

    seen, original = [], hook_module.keep_mask

    def spy(views, cfg, **kwargs):
        seen.append([v.image for v in views])
        return original(views, cfg, **kwargs)

    monkeypatch.setattr(hook_module, "keep_mask", spy)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    apply_sparse_context_diffusers(pipe.transformer, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe)
    (images,) = seen
    assert [None if x is None else tuple(x.shape) for x in images] == [(1, 3, 32, 64)] * 2
    assert "scores latents" not in caplog.text


def test_visualcloze_pipeline_through_its_generation_pipe(caplog):
    pipe = tiny_visualcloze(seed=0, combined=True)
    for p in (pipe, pipe.generation_pipe, pipe.upsampling_pipe):
        p.set_progress_bar_config(disable=True)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    calls = Calls(pipe.transformer)
    out = run(pipe, upsampling_height=32, upsampling_width=32)
    assert calls.tokens() == [2 * KEPT + ROW] * 2 + [64] * 2  # generation thinned; upsampling (no examples) as is
    assert "no reference tokens" not in caplog.text  # the upsampling stage is expected to have none
    state = sparse_context_state(pipe)
    assert state.selections == 1 and len(state.images) == 6 and state.prompts == ["make it red"]
    assert np.asarray(out).shape == (1, 32, 32, 3)
    remove_sparse_context_diffusers(pipe)
    assert not {"prepare_latents", "check_inputs"} & set(pipe.generation_pipe.__dict__)


def test_generate_cli_refuses_it_before_loading(tmp_path):
    from typer.testing import CliRunner

    app = generate_app()
    folder = pipeline_folder(tmp_path / "vc", "VisualClozeGenerationPipeline")
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat", "--out",
                                   str(tmp_path / "o.png")])
    assert res.exit_code == 1 and "grid of in-context examples" in res.output and "cannot load" not in res.output
