"""Sparse Context on tiny random-weight JoyImage Edit pipelines (tiny Qwen3-VL text encoder, built offline).

``JoyImageEditPipeline`` feeds ``JoyImageEditTransformer3DModel`` 6D latents ``(B, 2, C, 1, H, W)`` (reference,
then target), which its forward patchifies target first; ``JoyImageEditPlusPipeline`` feeds patches
``(B, N, C, 1, 2, 2)`` and a ``shape_list`` of each item's grid. Both build RoPE from those shapes.
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
    sparse_context_state,
)
from tokensparse.integrations.diffusers_tiny_joyimage import (
    tiny_joyimage_edit,
    tiny_joyimage_edit_plus,
)

from .contract import (  # noqa: F401 (joyimage_small_buckets: an autouse fixture)
    assert_checkpointing_is_exact,
    edges_views,
    first_call,
    generate_app,
    joyimage_small_buckets,
    pipeline_folder,
    reapply_then_remove,
    refuses_proportional_and_cache,
    tiny_pipeline,
)

TOKENS = 8 * 8  # 32x32 pixels: VAE /2, 2x2 patches
WIDE = 8 * 12  # 32x48
REF = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
REF_WIDE = (np.random.RandomState(1).rand(32, 48, 3) * 255).astype("uint8")


edit = tiny_pipeline(tiny_joyimage_edit)
plus = tiny_pipeline(tiny_joyimage_edit_plus)




class Seen:
    """Image tokens reaching the first block of every transformer call (registered after Sparse Context)."""

    def __init__(self, pipe) -> None:
        self.tokens: list[tuple[int, int]] = []
        self.handle = pipe.transformer.double_blocks[0].register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs) -> None:
        self.tokens.append(tuple(kwargs["hidden_states"].shape[:2]))


def run_edit(pipe, prompt="a cat"):
    torch.manual_seed(0)  # the pipeline samples the reference's VAE posterior with the global generator
    return pipe(image=Image.fromarray(REF), prompt=prompt, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def run_plus(pipe, prompt="a cat", images=None):
    images = images or [Image.fromarray(REF), Image.fromarray(REF_WIDE)]
    return pipe(images=images, prompt=prompt, num_inference_steps=2, guidance_scale=2.0,
                generator=torch.Generator().manual_seed(0), output_type="np").images


def hooked(pipe) -> list[torch.nn.Module]:
    return [pipe.transformer, *pipe.transformer.double_blocks]


@pytest.mark.parametrize("name", ["edit", "plus"])
def test_identity_fewer_tokens_remove_and_reapply(name, request):
    pipe, run = request.getfixturevalue(name), run_edit if name == "edit" else run_plus
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=1.0))
    assert np.array_equal(run(pipe), dense)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(keep=0.25))
    seen = Seen(pipe)
    sparse = run(pipe)
    seen.handle.remove()
    if name == "edit":  # 2 steps x (cond, uncond): 32x32 target whole + a quarter of the reference
        assert seen.tokens == [(1, TOKENS + TOKENS // 4)] * 4
        target, grids = TOKENS, [(8, 8)]
    else:  # 2 steps, CFG batched; the target is sized like the last reference (32x48)
        assert seen.tokens == [(2, WIDE + TOKENS // 4 + WIDE // 4)] * 2
        target, grids = WIDE, [(8, 8), (8, 12)]
    state = sparse_context_state(pipe)
    assert state.selections == 1 and state.prompts == ["a cat"]
    (index, layout), = state.index.values()
    assert layout.grids == grids and (index[:target] == torch.arange(target)).all()
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, dense)
    reapply_then_remove(pipe, run, sparse, dense, hooked(pipe))


@pytest.mark.parametrize("name", ["edit", "plus"])
def test_every_token_through_the_thinned_path_is_the_dense_output(name, request):
    # count above the token count keeps all of them but is not the identity config: the kept tokens go in through
    # the rewritten shapes and the blocks' RoPE swap, which must place each exactly where the dense call does
    pipe, run = request.getfixturevalue(name), run_edit if name == "edit" else run_plus
    dense = run(pipe)
    apply_sparse_context_diffusers(pipe, SparseContextConfig(count=10_000))
    seen = Seen(pipe)
    assert np.array_equal(run(pipe), dense)
    seen.handle.remove()
    assert seen.tokens and sparse_context_state(pipe).selections == 1


def by_hand(tr, tokens, rope, txt, index):
    """The transformer's blocks and head run on ``tokens[:, index]`` (already embedded) with ``rope[index]``."""
    _, vec, txt = tr.condition_embedder(torch.zeros(tokens.shape[0]) + 500.0, txt)
    vec = vec.unflatten(1, (6, -1))
    img = tokens[:, index]
    for block in tr.double_blocks:
        img, txt = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=rope(index))
    return tr.proj_out(tr.norm_out(img))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_kept_tokens_keep_their_positions_on_the_edit_transformer(edit, checkpointing):
    tr = edit.transformer
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 4, 1, 8, 8, generator=g)  # two references and the target (last), 4x4 tokens each
    txt = torch.randn(1, 5, 16, generator=g)
    t = torch.full((1,), 500.0)
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25))
    if checkpointing:  # blocks are called positionally
        tr.enable_gradient_checkpointing()
    try:
        with torch.set_grad_enabled(checkpointing):
            out = tr(hidden_states=x, timestep=t, encoder_hidden_states=txt, return_dict=False)[0].detach()
    finally:
        tr.disable_gradient_checkpointing()
    (index, layout), = sparse_context_state(tr).index.values()
    assert layout.grids == [(4, 4)] * 2 and index.numel() == 16 + 2 * 4
    frames = torch.cat([x[:, -1:], x[:, :-1]], 1).permute(0, 2, 1, 3, 4, 5).reshape(1, 4, 3, 8, 8)
    tokens = tr.img_in(frames).flatten(2).transpose(1, 2)  # dense tokens: target, reference 1, reference 2
    vis, _ = tr.get_rotary_pos_embed([3, 4, 4])
    with torch.no_grad():
        want = by_hand(tr, tokens, lambda i: ((vis[0][i], vis[1][i]), None), txt, index)  # (1, K, 4 * 2 * 2)
    got = out.permute(0, 1, 3, 4, 5, 2)  # (1, 3, 1, 8, 8, 4): item, frame, rows, cols, channels
    got = torch.cat([got[:, -1:], got[:, :-1]], 1).reshape(1, 3, 4, 2, 4, 2, 4).permute(0, 1, 2, 4, 3, 5, 6)
    got = got.reshape(1, 48, 16)  # per token (ph, pw, c), the order of proj_out's features
    assert torch.allclose(got[:, index], want, atol=1e-5)
    dropped = torch.ones(48, dtype=torch.bool)
    dropped[index] = False
    assert (got[:, dropped] == 0).all()


def test_kept_tokens_keep_their_positions_on_the_plus_transformer(plus):
    tr = plus.transformer
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 4, 4), (1, 4, 4), (1, 2, 6)]  # target, then references of different sizes
    x = torch.randn(1, 16 + 16 + 12, 4, 1, 2, 2, generator=g)
    txt = torch.randn(1, 5, 16, generator=g)
    apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25))
    out = tr(hidden_states=x, timestep=torch.full((1,), 500.0), encoder_hidden_states=txt,
             encoder_hidden_states_mask=torch.ones(1, 5), shape_list=[shapes], return_dict=False)[0]
    (index, layout), = sparse_context_state(tr).index.values()
    assert layout.grids == [(4, 4), (2, 6)] and index.numel() == 16 + 4 + 3
    tokens = tr.img_in(x.flatten(0, 1)).reshape(1, 44, -1)
    rows = [tr._get_rotary_pos_embed_for_range((i, 0, 0), (i + 1, h, w)) for i, (_, h, w) in enumerate(shapes)]
    cos, sin = (torch.cat(f) for f in zip(*rows))  # item i's frame is i
    with torch.no_grad():
        want = by_hand(tr, tokens, lambda i: (cos[i][None], sin[i][None]), txt, index)
    got = out.permute(0, 1, 3, 4, 5, 2).reshape(1, 44, -1)  # (pt, ph, pw, c): proj_out's order
    assert torch.allclose(got[:, index], want, atol=1e-5)


@pytest.mark.parametrize("name", ["edit", "plus"])
def test_pixel_scorers_get_the_reference_pixels(name, request, monkeypatch):
    pipe = request.getfixturevalue(name)
    seen = edges_views(monkeypatch, pipe, run_edit if name == "edit" else run_plus)
    refs = [REF] if name == "edit" else [REF, REF_WIDE]  # already bucket-sized: passed through unchanged
    assert len(seen) == len(refs)
    for view, ref in zip(seen, refs):
        want = torch.from_numpy(ref.astype(np.float32) / 255).permute(2, 0, 1)[None]
        assert view.image is not None and torch.allclose(view.image, want)


def test_edit_batch_of_prompts_shares_one_selection(edit):
    apply_sparse_context_diffusers(edit, SparseContextConfig(keep=0.25))
    seen = Seen(edit)
    out = run_edit(edit, prompt=["a cat", "a dog"])
    seen.handle.remove()
    assert out.shape == (2, 32, 32, 3) and np.isfinite(out).all()
    assert seen.tokens == [(2, TOKENS + TOKENS // 4)] * 4 and sparse_context_state(edit).selections == 1


def test_edit_batch_warns_of_different_references_only_when_they_are(edit, caplog):
    # the pipeline samples every sample's reference latents from the VAE posterior (.sample()): they differ even
    # when the samples share one reference image, so the latents cannot tell; the images the pipeline got can
    apply_sparse_context_diffusers(edit, SparseContextConfig(keep=0.25))
    run_edit(edit, prompt=["a cat", "a dog"])
    torch.manual_seed(0)
    edit(image=Image.fromarray(REF), prompt="a cat", num_images_per_prompt=2, num_inference_steps=2,
         guidance_scale=2.0, output_type="np")
    assert "different references" not in caplog.text
    torch.manual_seed(0)
    edit(image=[Image.fromarray(REF), Image.fromarray(np.roll(REF, 5, 0))], prompt=["a cat", "a dog"],
         num_inference_steps=2, guidance_scale=2.0, output_type="np")
    assert caplog.text.count("different references") == 1


def test_plus_batch_shares_one_selection_and_refuses_different_reference_sizes(plus):
    apply_sparse_context_diffusers(plus, SparseContextConfig(keep=0.25))
    pair = [Image.fromarray(REF), Image.fromarray(REF_WIDE)]
    seen = Seen(plus)
    out = run_plus(plus, prompt=["a cat", "a dog"], images=[pair, pair])
    seen.handle.remove()
    assert len(out) == 2 and np.isfinite(out).all()
    assert seen.tokens == [(4, WIDE + TOKENS // 4 + WIDE // 4)] * 2 and sparse_context_state(plus).selections == 1
    with pytest.raises(ValueError, match="different sizes or counts .shape_list differs"):
        run_plus(plus, prompt=["a cat", "a dog"], images=[pair, pair[::-1]])


@pytest.mark.parametrize("name", ["edit", "plus"])
def test_gradient_checkpointing_recomputes_blocks_with_the_kept_tokens_rope(name, request):
    # a checkpointed block runs again in backward, after its call ended: it must get the RoPE rows its forward got
    # (it got the rows the transformer builds from the thinned shapes: silently other gradients)
    pipe, run = request.getfixturevalue(name), run_edit if name == "edit" else run_plus
    args, kwargs = first_call(pipe, run)
    noise = torch.randn(kwargs["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    calls = [(args, kwargs), (args, {**kwargs, "hidden_states": kwargs["hidden_states"] + noise})]  # other refs
    assert_checkpointing_is_exact(pipe.transformer, calls)


@pytest.mark.parametrize("name, why", [("edit", "JoyImageAttnProcessor calls the attention with attn_mask=None"),
                                       ("plus", "boolean padding mask it builds from encoder_hidden_states_mask")])
def test_proportional_and_cache_are_refused(name, why, request):
    refuses_proportional_and_cache(request.getfixturevalue(name), f"proportional=True is implemented .*{why}")


def test_mrope_text_rows_stay_dense_on_the_bare_edit_transformer():
    # rope_type="mrope" places the text after the largest image position: the thinned call's shapes must not move it
    from diffusers import JoyImageEditTransformer3DModel

    torch.manual_seed(0)
    tr = JoyImageEditTransformer3DModel(in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16,
                                        mlp_width_ratio=2.0, num_layers=1, rope_dim_list=[4, 6, 6], rope_type="mrope")
    g = torch.Generator().manual_seed(1)
    call = {"hidden_states": torch.randn(1, 2, 4, 1, 8, 8, generator=g), "timestep": torch.full((1,), 500.0),
            "encoder_hidden_states": torch.randn(1, 5, 16, generator=g), "return_dict": False}
    with torch.no_grad():
        dense = tr(**call)[0]
        apply_sparse_context_diffusers(tr, SparseContextConfig(count=10_000))  # every token, the thinned path
        assert torch.equal(tr(**call)[0], dense)
        apply_sparse_context_diffusers(tr, SparseContextConfig(keep=0.25))
        sparse = tr(**call)[0]
    assert sparse.shape == dense.shape and not torch.equal(sparse[:, -1], dense[:, -1])


# tokensparse generate ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    return generate_app()


def cli(app, folder, cls, refs, *extra):
    from typer.testing import CliRunner

    pipeline_folder(folder, cls)
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--out", str(folder / "o.png"), *extra]
    for i, ref in enumerate(refs):
        Image.fromarray(ref).save(folder / f"ref{i}.png")
        args += ["--ref", str(folder / f"ref{i}.png")]
    return CliRunner().invoke(app, args)


@pytest.mark.parametrize("name, cls, refs", [("edit", "JoyImageEditPipeline", [REF]),
                                             ("plus", "JoyImageEditPlusPipeline", [REF, REF_WIDE])])
def test_generate_runs_joyimage(name, cls, refs, request, app, tmp_path, monkeypatch):
    import diffusers

    pipe = request.getfixturevalue(name)
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pipe)
    res = cli(app, tmp_path / name, cls, refs, "--steps", "2")
    assert res.exit_code == 0, res.output  # Plus: its call takes images=, not image=
    assert f"({cls}, {len(refs)} reference(s), keep=0.25" in res.output
    assert Image.open(tmp_path / name / "o.png").size == refs[-1].shape[1::-1]  # sized by the (last) reference


@pytest.mark.parametrize("cls, refs, extra, message", [
    ("JoyImageEditPipeline", [REF, REF], [], "JoyImageEditPipeline takes one reference image"),
    ("JoyImageEditPipeline", [REF], ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("JoyImageEditPlusPipeline", [REF], ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("JoyImageEditPlusPipeline", [REF], ["--cache"], "--cache needs FLUX.2"),
])
def test_generate_refuses_what_joyimage_cannot_take_before_loading(app, tmp_path, cls, refs, extra, message):
    res = cli(app, tmp_path / "joy", cls, refs, *extra)  # only model_index.json: loading would fail
    assert res.exit_code == 1 and message in res.output and "cannot load" not in res.output
