"""Sparse Context on a tiny random-weight OmniGen pipeline (word-level tokenizer, built offline).

``OmniGenPipeline`` runs ``[conditional, unconditional, image-guidance]`` rows, each ``[text with the images at their
placeholders, time token, target]``, left-padded, with a ``(B, S, S)`` 0/1 mask and RoPE from row 0's position ids.
A 256x192 reference is 16x12 = 192 tokens, a 128x256 one 8x16 = 128; the 64x64 target 16.

Its processor needs torchvision; where that is missing (or unusable: a CUDA build beside a CPU torch), its four
transforms are stood in by equivalents (:mod:`.omnigen_support`), so the real pipeline code runs.
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

from .contract import (
    NO_KV_CACHE,
    assert_checkpointing_is_exact,
    first_call,
    generate_app,
    pipeline_folder,
    reapply_then_remove,
)
from .omnigen_support import omnigen_pipe

TARGET = 16
RS = np.random.RandomState(0)
REFS = [(RS.rand(256, 192, 3) * 255).astype("uint8"), (RS.rand(128, 256, 3) * 255).astype("uint8")]
GRIDS = [(16, 12), (8, 16)]
ONE = "<img><|image_1|></img> a red cat"
TWO = "<img><|image_1|></img> a red cat with <img><|image_2|></img>"


@pytest.fixture(scope="module")
def pipe():
    yield from omnigen_pipe()


@pytest.fixture(autouse=True)
def clean(pipe):
    yield
    remove_sparse_context_diffusers(pipe)


def images(refs: int = 1) -> list[Image.Image]:
    return [Image.fromarray(r) for r in REFS[:refs]]


def run(pipe, refs: int = 1, prompt=ONE, **kwargs):
    torch.manual_seed(0)  # the pipeline samples its references' VAE latents from the global generator
    prompts = [prompt] if isinstance(prompt, str) else prompt
    return pipe(prompt=prompts, input_images=[images(refs)] * len(prompts), height=64, width=64, output_type="np",
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), **kwargs).images


class Calls:
    """The transformer's call keywords and the token count its first block sees (forward pre-hooks)."""

    def __init__(self, tr) -> None:
        self.kwargs: list[dict] = []
        self.lengths: list[int] = []
        self.handles = [tr.register_forward_pre_hook(lambda m, a, k: self.kwargs.append(dict(k)), with_kwargs=True),
                        tr.layers[0].register_forward_pre_hook(lambda m, a: self.lengths.append(a[0].shape[1]))]

    def remove(self) -> "Calls":
        for handle in self.handles:
            handle.remove()
        return self


def dropped(kwargs: dict, index: torch.Tensor, layout) -> dict[int, torch.Tensor]:
    """Per image row of a dense call, the sequence positions of its dropped image tokens (each row's ``j``-th image:
    reference ``j``'s cells)."""
    keep = torch.zeros(layout.n, dtype=torch.bool)
    keep[index] = True
    return {row: torch.cat([torch.arange(s, e)[~keep[pos]] for (s, e), pos in zip(spans, layout.positions)])
            for row, spans in kwargs["input_image_sizes"].items()}


def expected_length(kwargs: dict, drops: dict[int, torch.Tensor]) -> int:
    """The thinned call's length: its longest row, a row's tokens (those its target attends to, the time token and
    the target among them) but its dropped ones."""
    real = (kwargs["attention_mask"][:, -1] != 0).sum(1)
    return max(int(real[r]) - (len(drops[r]) if r in drops else 0) for r in range(len(real)))


def test_identity_fewer_tokens_reapply_and_remove(pipe):
    processor = type(pipe.transformer.layers[0].self_attn.processor)
    dense_calls = Calls(pipe.transformer)
    dense = run(pipe)
    dense_calls.remove()
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    calls = Calls(pipe.transformer)
    sparse = run(pipe)
    calls.remove()
    state = sparse_context_state(pipe)
    (index, layout), = state.index.values()
    assert state.selections == 1 and layout.grids == GRIDS[:1] and index.numel() == 192 // 4
    kw = dense_calls.kwargs[0]
    length = expected_length(kw, dropped(kw, index, layout))
    assert length < dense_calls.lengths[0] and calls.lengths == [length] * 2  # 2 steps
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, [pipe.transformer])
    assert "_get_multimodal_embeddings" not in pipe.transformer.__dict__
    assert all(type(block.self_attn.processor) is processor for block in pipe.transformer.layers)


def test_thinned_call_is_the_dense_call_with_the_dropped_tokens_masked(pipe):
    """Two prompts, two references: every kept token keeps its embedding, position and mask entries, so the thinned
    call equals the dense one whose mask hides each row's dropped image tokens."""
    calls = Calls(pipe.transformer)
    run(pipe, refs=2, prompt=[TWO, "<img><|image_1|></img> blue <img><|image_2|></img>"])
    kw = calls.remove().kwargs[0]
    assert len(kw["input_image_sizes"]) == 4  # 2 conditional and 2 image-guidance rows of 6
    tr = pipe.transformer
    with torch.no_grad():
        dense = tr(**kw)[0]
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random"))
        calls = Calls(tr)
        sparse = tr(**kw)[0]
        calls.remove()
        (index, layout), = sparse_context_state(tr).index.values()
        remove_sparse_context_diffusers(tr)
        drops = dropped(kw, index, layout)
        mask = kw["attention_mask"].clone()
        for row, cols in drops.items():
            mask[row][:, cols] = 0
        masked = tr(**{**kw, "attention_mask": mask})[0]
    assert layout.grids == GRIDS and index.numel() == 192 // 4 + 128 // 4
    assert not torch.equal(index[:48], torch.arange(48))  # a scattered subset, not a prefix
    assert calls.lengths == [expected_length(kw, drops)] and calls.lengths[0] < kw["position_ids"].shape[1]
    torch.testing.assert_close(sparse, masked, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sparse, dense, atol=1e-3)


def test_kept_rows_keep_their_embeddings_and_rope_rows(pipe):
    tr = pipe.transformer
    calls = Calls(tr)
    run(pipe)
    kw = calls.remove().kwargs[0]
    seen = {}

    def record(module, args, kwargs):
        seen.setdefault("x", []).append(args[0])
        state = sparse_context_state(tr)
        seen.setdefault("rows", []).append(None if state is None else state.call)

    with torch.no_grad():
        handle = tr.layers[0].register_forward_pre_hook(record, with_kwargs=True)
        tr(**kw)
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25, selector="random"))
        tr(**kw)
        handle.remove()
        rows = seen["rows"][1]
        cos, sin = tr.rope(kw["hidden_states"], kw["position_ids"])  # the dense call's rows (row 0's positions)
    x_dense, x_sparse = seen["x"]
    real = ~rows.pad
    for r in range(x_dense.shape[0]):
        assert torch.equal(x_sparse[r][real[r]], x_dense[r][rows.gather[r][real[r]]])
        assert torch.equal(rows.rope[0][r][real[r]], cos[rows.gather[r][real[r]]])
        assert torch.equal(rows.rope[1][r][real[r]], sin[rows.gather[r][real[r]]])
    (index, layout), = sparse_context_state(tr).index.values()
    drops = dropped(kw, index, layout)
    assert not any(bool(torch.isin(rows.gather[r][real[r]], cols).any()) for r, cols in drops.items())


def test_batch_and_two_references(pipe):
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    calls = Calls(pipe.transformer)
    out = run(pipe, refs=2, prompt=[TWO, TWO], num_images_per_prompt=2)
    calls.remove()
    assert out.shape == (4, 64, 64, 3) and np.isfinite(out).all()
    state = sparse_context_state(pipe)
    (index, layout), = state.index.values()
    assert state.selections == 1 and layout.grids == GRIDS
    assert [kw["hidden_states"].shape[0] for kw in calls.kwargs] == [12, 12]  # 4 samples x 3 rows
    assert calls.lengths[0] == calls.kwargs[0]["position_ids"].shape[1]  # it sees the thinned call
    assert calls.lengths[0] < calls.kwargs[0]["input_ids"].shape[1] + 1 + TARGET  # the dense text, time, target


def test_pixel_scorers_get_the_references_pixels(pipe, monkeypatch):
    import tokensparse.integrations.diffusers as hook_module

    seen, original = [], hook_module.keep_mask

    def spy(views, cfg, **kwargs):
        seen.append([v.image for v in views])
        return original(views, cfg, **kwargs)

    monkeypatch.setattr(hook_module, "keep_mask", spy)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector="edges"))
    run(pipe, refs=2, prompt=TWO)
    state = sparse_context_state(pipe)
    assert state.prompts == [TWO] and len(state.images) == 4  # the conditional and the image-guidance row's
    (pixels,) = seen  # the first row's: the references
    assert len(pixels) == 2
    for image, ref in zip(pixels, REFS):
        want = torch.from_numpy(ref.astype(np.float32) / 255).permute(2, 0, 1)[None]
        assert image.shape == want.shape and torch.allclose(image, want, atol=1e-6)


EDIT = "<img><|image_1|></img> change the background to a beach"  # another task than ONE's


@pytest.mark.parametrize("prompts, selector, warns", [
    ([ONE, EDIT], "auto", True), ([ONE, ONE], "auto", False), ([ONE, EDIT], "edges", False)])
def test_a_batch_of_prompts_is_selected_by_the_first_with_a_warning_for_auto(pipe, monkeypatch, caplog, prompts,
                                                                              selector, warns):
    import tokensparse.integrations.diffusers as hook_module

    seen, original = [], hook_module.keep_mask

    def spy(views, cfg, **kwargs):
        seen.append([v.prompts for v in views])
        return original(views, cfg, **kwargs)

    monkeypatch.setattr(hook_module, "keep_mask", spy)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25, selector=selector))
    out = run(pipe, prompt=prompts)
    assert out.shape[0] == 2 and np.isfinite(out).all()
    assert seen == [[[ONE]]]  # one selection for the batch, scored with the first prompt (documented)
    assert ("the prompts of this batch differ; selector 'auto'" in caplog.text) == warns  # was silent


FLIPPED = Image.fromarray(np.ascontiguousarray(REFS[0][::-1]))  # the first reference's size, other pixels


def kept_cells(pipe, prompts, refs, cfg) -> tuple[dict, dict, list]:
    """Run the pipeline; per image row of the first thinned call, the kept cells of each of its images, and of each
    reference (``index`` and ``layout``) its kept cells."""
    tr, seen = pipe.transformer, []
    dense = Calls(tr)  # before Sparse Context's pre-hook: it sees the dense call
    apply_sparse_context_diffusers(pipe, SparseContextConfig(**cfg))
    handle = tr.layers[0].register_forward_pre_hook(lambda m, a: seen.append(sparse_context_state(tr).call))
    try:
        torch.manual_seed(0)
        pipe(prompt=prompts, input_images=refs, height=64, width=64, num_inference_steps=1, output_type="np")
    finally:
        handle.remove()
        dense.remove()
    kw, rows = dense.kwargs[0], seen[0]
    (index, layout), = sparse_context_state(pipe).index.values()
    per_row = {}
    for row, spans in kw["input_image_sizes"].items():
        kept = rows.gather[row][~rows.pad[row]]
        per_row[row] = [(kept[(kept >= s) & (kept < e)] - s).tolist() for s, e in spans]
    per_ref = [(index[torch.isin(index, pos)] - pos[0]).tolist() for pos in layout.positions]
    return per_row, per_ref, layout.grids


@pytest.mark.parametrize("prompt, refs, which", [
    ("<img><|image_2|></img> a red cat with <img><|image_1|></img>", [REFS[0], FLIPPED], [1, 0]),  # same sizes
    ("<img><|image_2|></img> a red cat with <img><|image_1|></img>", REFS, [1, 0]),  # other sizes
    ("<img><|image_1|></img> a red cat with <img><|image_1|></img>", REFS[:1], [0]),  # one image, twice
])
def test_every_image_gets_its_own_selection_wherever_a_prompt_places_it(pipe, prompt, refs, which):
    """The references are the first row's images in its prompt's order; the image-guidance row lists the prompt's
    images ``1, 2, ...``: each image there gets the selection of the reference with its pixels."""
    refs = [r if isinstance(r, Image.Image) else Image.fromarray(r) for r in refs]
    per_row, per_ref, _ = kept_cells(pipe, [prompt], [refs], {"keep": 0.25, "selector": "edges"})
    assert sorted(per_row) == [0, 2]  # the conditional row and the image-guidance row
    assert per_row[0] == per_ref
    assert per_row[2] == [per_ref[k] for k in which]
    if len(refs) == 2:
        assert per_ref[0] != per_ref[1]  # the two selections differ: the mapping is what the test sees


def test_a_batch_shares_the_first_prompts_selection_image_by_image(pipe, caplog):
    """A prompt placing the first prompt's images in another order: each gets its own; one placing another image
    of the same size: the selection of the first prompt's image at its place, with a warning."""
    a, b = images(2)
    per_row, per_ref, _ = kept_cells(pipe, [TWO, TWO], [[a, b], [b, a]], {"keep": 0.25, "selector": "edges"})
    assert per_row[0] == per_ref and per_row[1] == per_ref[::-1]  # the second prompt's images 1, 2 are b, a
    assert "place different images" not in caplog.text
    per_row, per_ref, _ = kept_cells(pipe, [ONE, ONE], [[a], [FLIPPED]], {"keep": 0.25, "selector": "edges"})
    assert per_row[1] == per_ref and "place different images" in caplog.text


def test_text_to_image_runs_unchanged(pipe, caplog):
    def t2i(p):
        torch.manual_seed(0)
        return p(prompt="a red cat", height=64, width=64, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    dense = t2i(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    assert np.array_equal(t2i(pipe), dense) and "no reference tokens" in caplog.text


def test_proportional_is_the_dense_call_with_the_bias_on_the_kept_tokens(pipe):
    """``proportional=True``: each row's kept image tokens get ``log(size)`` on their attention logits, the dropped
    ones none: the dense call whose additive mask says so."""
    calls = Calls(pipe.transformer)
    run(pipe, refs=2, prompt=[TWO, "<img><|image_1|></img> blue <img><|image_2|></img>"])
    kw = calls.remove().kwargs[0]
    tr = pipe.transformer
    cfg = {"keep": 0.25, "selector": "random"}
    with torch.no_grad():
        apply_sparse_context_diffusers(tr, SparseContextConfig(**cfg, proportional=True))
        biased = tr(**kw)[0]
        state = sparse_context_state(tr)
        (index, layout), = state.index.values()
        (sizes, bias), = state.sizes.values()
        apply_sparse_context_diffusers(tr, SparseContextConfig(**cfg))
        plain = tr(**kw)[0]
        remove_sparse_context_diffusers(tr)
        low = torch.finfo(tr.dtype).min
        additive = (1 - kw["attention_mask"].float()) * low
        for row, spans in kw["input_image_sizes"].items():
            for (start, end), pos in zip(spans, layout.positions):
                cols, size = torch.arange(start, end), sizes[pos]
                additive[row][:, cols[size == 0]] = low
                additive[row][:, cols[size > 0]] += size[size > 0].log()
        dense = tr(**{**kw, "attention_mask": additive[:, None]})[0]
    assert [float(sizes[p].sum()) for p in layout.positions] == [192, 128] and int(sizes.max()) > 1
    assert torch.equal(bias, sizes[index].log())
    torch.testing.assert_close(biased, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, dense, atol=1e-4)  # the bias is what matches


def test_gradient_checkpointing_recomputes_attention_row_by_row(pipe):
    # a checkpointed block runs again in backward, after its call ended: its attention must run row by row with
    # each row's RoPE rows, as in its forward (it ran batched: a CheckpointError in backward)
    args, kwargs = first_call(pipe, lambda p: run(p, refs=2, prompt=TWO))
    g = torch.Generator().manual_seed(1)
    other = [x + torch.randn(x.shape, generator=g) for x in kwargs["input_img_latents"]]
    calls = [(args, kwargs), (args, {**kwargs, "input_img_latents": other})]  # other references
    assert_checkpointing_is_exact(pipe.transformer, calls)


def test_refusals(pipe):
    with pytest.raises(ValueError, match=NO_KV_CACHE):
        apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5, cache=True))
    assert sparse_context_state(pipe) is None
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.5))
    with pytest.raises(ValueError, match="every prompt must place the first prompt's images"):
        torch.manual_seed(0)  # the second prompt's image is none of the first's, nor of its size
        pipe(prompt=[ONE, ONE], input_images=[images(1), images(2)[1:]], height=64, width=64, num_inference_steps=1,
             output_type="np")


def test_generate_cli(pipe, tmp_path):
    from typer.testing import CliRunner

    app = generate_app()
    pipe.save_pretrained(tmp_path / "omnigen")
    refs = []
    for i, image in enumerate(images(2)):
        image.save(tmp_path / f"{i}.png")
        refs += ["--ref", str(tmp_path / f"{i}.png")]
    out = tmp_path / "o.png"
    args = ["generate", "--model", str(tmp_path / "omnigen"), *refs, "--height", "64", "--width", "64", "--steps", "2",
            "--out", str(out)]
    res = CliRunner().invoke(app, [*args, "--prompt", "a red cat with <img><|image_1|></img>"])
    assert res.exit_code == 1 and "<img><|image_2|></img>" in res.output and "cannot load" not in res.output
    res = CliRunner().invoke(app, [*args, "--prompt", TWO])
    assert res.exit_code == 0, res.output
    assert "OmniGenPipeline, 2 reference(s), keep=0.25" in res.output and Image.open(out).size == (64, 64)
    res = CliRunner().invoke(app, [*args, "--prompt", TWO, "--proportional"])
    assert res.exit_code == 0 and "keep=0.25, selector=uniform, proportional" in res.output, res.output


@pytest.mark.parametrize("refs, prompt", [(0, ONE), (2, TWO + " and <img><|image_3|></img>")])
def test_generate_cli_refuses_a_placeholder_without_its_ref_before_loading(tmp_path, refs, prompt):
    """A placeholder naming no ``--ref`` fails before loading (the pipeline's processor asserts on it)."""
    from typer.testing import CliRunner

    app = generate_app()
    folder = pipeline_folder(tmp_path / "omnigen", "OmniGenPipeline")
    args = []
    for i, image in enumerate(images(refs)):
        image.save(tmp_path / f"{i}.png")
        args += ["--ref", str(tmp_path / f"{i}.png")]
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), *args, "--prompt", prompt, "--out",
                                   str(tmp_path / "o.png")])
    k = refs + 1
    assert res.exit_code == 1 and not isinstance(res.exception, AssertionError), res.output
    assert f"<img><|image_{k}|></img>" in res.output and "cannot load" not in res.output
