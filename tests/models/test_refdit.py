import json
from pathlib import Path

import pytest
import torch

import tokensparse as ts
from tokensparse.vocab import tokenize

from ..conftest import make_refs


@pytest.mark.parametrize("n_refs", [0, 1, 2, 4])
def test_forward_any_number_of_references(tiny, n_refs):
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    out = tiny(x, t, [r * 2 - 1 for r in make_refs(n_refs, batch=2)], tokenize(["place the subject", ""]))
    assert out.shape == x.shape and torch.isfinite(out).all()


@torch.no_grad()
def test_one_time_for_the_batch_and_prompt_ids_type(tiny):
    x, p, refs = torch.randn(2, 3, 16, 16), tokenize(["place", "place"]), make_refs(1, batch=2)
    full = tiny(x, torch.full((2,), 0.3), refs, p)
    assert torch.equal(tiny(x, 0.3, refs, p), full) and torch.equal(tiny(x, torch.tensor(0.3), refs, p), full)
    with pytest.raises(TypeError, match="prompt_ids must be"):
        tiny(x, 0.3, refs, [[1, 2]])


@pytest.mark.parametrize("change, err, match", [
    ({"t": torch.rand(2, 1)}, ValueError, r"t must be one time or a \(2,\)"),
    ({"t": torch.rand(3)}, ValueError, r"t must be one time"),
    ({"ids": tokenize(["place"])}, ValueError, "prompt_ids must be"),
    ({"ids": tokenize(["place", "place"]).float()}, TypeError, "integer word ids"),
    ({"ids": torch.ones(2, 200, dtype=torch.long)}, ValueError, "L <= 16"),
    ({"ids": torch.full((2, 4), 100000)}, ValueError, "word ids in"),
    ({"x": torch.randn(2, 3, 24, 24)}, ValueError, r"x must be a \(B, 3, 16, 16\)"),
    ({"x": torch.randn(3, 16, 16)}, ValueError, "x must be"),
    ({"t": 5.0}, ValueError, r"t must be in \[0, 1\]"), ({"t": float("nan")}, ValueError, r"t must be in"),
    ({"t": torch.tensor([0.5, -0.1])}, ValueError, r"t must be in"),
    ({"x": torch.randn(2, 3, 16, 16).double()}, TypeError, "x must be a float32 tensor"),
    ({"x": torch.zeros(2, 3, 16, 16, dtype=torch.long)}, TypeError, "x must be a float32 tensor"),
    ({"refs": [torch.rand(2, 3, 16, 16).double()]}, TypeError, "reference 0 must be a float32 tensor"),
])
@torch.no_grad()
def test_bad_calls_name_the_argument(tiny, change, err, match):
    call = {"x": torch.randn(2, 3, 16, 16), "t": torch.rand(2), "ids": tokenize(["place", "place"]),
            "refs": make_refs(1, batch=2)}
    call.update(change)
    with pytest.raises(err, match=match):
        tiny(call["x"], call["t"], call["refs"], call["ids"])


@torch.no_grad()
def test_a_half_precision_model_says_so(tiny):
    half = ts.build_model("refdit-tiny").half()
    with pytest.raises(TypeError, match="model.float"):
        half(torch.randn(1, 3, 16, 16).half(), 0.5, [], tokenize(["place"]))


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # torch's, under autocast
@torch.no_grad()
def test_half_precision_inputs_run_under_autocast(tiny):
    x, p = torch.randn(1, 3, 16, 16).bfloat16(), tokenize(["place"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert tiny(x, 0.5, [r.bfloat16() for r in make_refs(1)], p).shape == (1, 3, 16, 16)


def test_references_change_the_output(tiny):
    x, t, p = torch.randn(1, 3, 16, 16), torch.rand(1), tokenize("place")
    a = tiny(x, t, make_refs(1, seed=1), p)
    b = tiny(x, t, make_refs(1, seed=2), p)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("fixture, independent", [("tiny_kv", True), ("tiny", False)])
def test_context_stream_depends_on_target_only_in_joint_mode(request, fixture, independent):
    """With ref_attends_target=False the reference stream never sees the target or the time."""
    model = request.getfixturevalue(fixture)
    refs, p = make_refs(2), tokenize("place")
    seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(
        lambda m, a, kw, out: seen.append(out) if kw.get("role") == "context" else None, with_kwargs=True)
    model(torch.randn(1, 3, 16, 16), torch.tensor([0.9]), refs, p)
    model(torch.randn(1, 3, 16, 16), torch.tensor([0.2]), refs, p)
    hook.remove()
    assert len(seen) == 2 and torch.equal(seen[0], seen[1]) == independent


def test_sparse_reference_is_fewer_tokens_with_original_ids(tiny):
    refs = [r * 2 - 1 for r in make_refs(1)]
    seq = tiny.embed_references(refs, 1)
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, [0, 5, 15]] = True
    from tokensparse.tokens import subset

    sub = subset(seq, keep)
    assert sub.ids[0].tolist() == [[1, 0, 0], [1, 1, 1], [1, 3, 3]]
    out = tiny(torch.randn(1, 3, 16, 16), torch.rand(1), sub, tokenize("place"))
    assert out.shape == (1, 3, 16, 16)


@torch.no_grad()
def test_pre_embedded_reference_tokens_of_another_batch_are_refused(tiny_kv):
    seq = tiny_kv.embed_references([r * 2 - 1 for r in make_refs(1)], 1)
    p = tokenize(["place", "place"])
    with pytest.raises(ValueError, match="reference tokens must be"):
        tiny_kv(torch.randn(2, 3, 16, 16), 0.5, seq, p)
    with pytest.raises(ValueError, match="reference tokens must be"):
        tiny_kv.context_kv(seq, p)


def test_padded_sparse_batch_matches_unpadded_rows(tiny):
    """Samples with different kept counts in one batch give the same result as each alone."""
    from tokensparse.tokens import subset

    refs = [r * 2 - 1 for r in make_refs(2, batch=2)]
    x, t, p = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 0.5]), tokenize(["place", "place"])
    seq = tiny.embed_references(refs, 2)
    keep = torch.rand(2, 32, generator=torch.Generator().manual_seed(0)) < 0.4
    both = tiny(x, t, subset(seq, keep), p)
    for i in range(2):
        one_refs = [r[i:i + 1] for r in refs]
        alone = tiny(x[i:i + 1], t[i:i + 1], subset(tiny.embed_references(one_refs, 1), keep[i:i + 1]), p[i:i + 1])
        assert torch.allclose(both[i], alone[0], atol=1e-5)


@pytest.mark.parametrize(
    "refs, match",
    [
        ([torch.rand(1, 3, 8, 8)], "16x16"),
        ([torch.rand(1, 1, 16, 16)], "expected"),
        ([torch.rand(1, 3, 16, 16)] * 5, "at most 4"),
    ],
)
def test_bad_references_raise_value_error(tiny, refs, match):
    with pytest.raises(ValueError, match=match):
        tiny(torch.randn(1, 3, 16, 16), torch.rand(1), refs, tokenize("place"))


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ts.RefDiTConfig(image_size=30, patch_size=4)


def test_list_and_build_models():
    models = ts.list_models()
    assert "refdit-s" in models and "refdit-base" in models
    with pytest.raises(ValueError, match="unknown model"):
        ts.build_model("nope")


def test_every_shipped_checkpoint_loads_into_its_architecture():
    from tokensparse.models.zoo import CHECKPOINTS, CONFIGS

    for name, info in ts.list_models().items():
        if name in CHECKPOINTS:
            assert info["weights"], f"{name} does not ship"
            model = ts.load_model(name)
            assert model.config == CONFIGS[CHECKPOINTS[name]] and not model.training


@pytest.mark.parametrize("json_text, match", [
    ("{not json", "JSONDecodeError"),
    ('{"step": 3}', "KeyError: 'config'"),
    ("[1, 2]", "TypeError"),
    ('{"config": {"image_size": 16, "dim": 48, "depth": 2, "heads": 2, "rope_axes": [4, 10, 10], "new": 1}}',
     "unexpected keyword argument 'new'"),
])
def test_checkpoint_with_an_unusable_json_is_a_value_error_naming_it(tmp_path, json_text, match):
    from tokensparse.models import save_checkpoint

    path = tmp_path / "w.safetensors"
    save_checkpoint(ts.build_model("refdit-tiny"), path)
    path.with_suffix(".json").write_text(json_text)
    with pytest.raises(ValueError, match=rf"w\.json does not hold a RefDiT config.*{match}"):
        ts.load_model(path)


def test_checkpoint_of_another_architecture_names_the_misfit(tmp_path):
    from tokensparse.models import save_checkpoint

    path = tmp_path / "w.safetensors"
    save_checkpoint(ts.build_model("refdit-tiny", text_depth=1), path)  # weights with a text encoder
    save_checkpoint(ts.build_model("refdit-tiny"), tmp_path / "plain.safetensors")
    path.with_suffix(".json").write_text((tmp_path / "plain.json").read_text())  # a JSON without one
    with pytest.raises(ValueError, match=r"does not fit the model its JSON describes: Unexpected key\(s\).*"
                                         r"prompt_embedder\.blocks"):
        ts.load_model(path)


def test_an_exported_checkpoint_with_an_upper_case_suffix_loads_by_its_path_string(tmp_path):
    from tokensparse.models import save_checkpoint

    path = tmp_path / "W.SAFETENSORS"  # `tokensparse train --export` takes any case of .safetensors
    save_checkpoint(ts.build_model("refdit-tiny"), path)
    assert ts.load_model(str(path)).config == ts.build_model("refdit-tiny").config


@pytest.mark.parametrize("folder", ["w.json", "w.safetensors"])
def test_checkpoint_over_a_folder_writes_nothing(tmp_path, folder):
    from tokensparse.models import save_checkpoint

    path = tmp_path / "w.safetensors"
    (tmp_path / folder).mkdir()  # the weights were renamed into place, then the JSON's rename failed
    with pytest.raises(IsADirectoryError, match=rf"cannot write {path}: {tmp_path / folder} is a folder"):
        save_checkpoint(ts.build_model("refdit-tiny"), path)
    assert [p.name for p in tmp_path.iterdir()] == [folder]


def test_two_exports_to_one_path_at_once_do_not_collide(tmp_path):
    from safetensors.torch import load_file, save_file

    from tokensparse.models.zoo import write_shipped

    path, temps = tmp_path / "w.safetensors", []

    def second(tmp: str) -> None:
        temps.append(tmp)
        save_file({"w": torch.full((2,), 2.0)}, tmp)

    def first(tmp: str) -> None:  # another export to the same path runs while this one writes
        temps.append(tmp)
        save_file({"w": torch.full((3,), 1.0)}, tmp)
        write_shipped(path, second, {"export": 2})

    write_shipped(path, first, {"export": 1})  # shared temp names: the second export took the first's temp file
    assert len(set(temps)) == 2 and all(Path(t).parent == tmp_path for t in temps)
    assert load_file(path)["w"].tolist() == [1.0, 1.0, 1.0]
    assert json.loads(path.with_suffix(".json").read_text()) == {"export": 1}  # the last renamed: a matched pair
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.safetensors"]


def test_a_failed_export_leaves_no_temp_file(tmp_path):
    from tokensparse.models.zoo import write_shipped

    def fails(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="cannot write .*w.safetensors: .*No space left"):
        write_shipped(tmp_path / "w.safetensors", fails, {})
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_path_that_is_a_folder_is_called_a_folder_not_missing(tmp_path):
    (tmp_path / "w.safetensors").mkdir()
    with pytest.raises(IsADirectoryError, match=r"w\.safetensors is a folder, not a \.safetensors file"):
        ts.load_model(tmp_path / "w.safetensors")


def test_cached_context_kv_is_exact(tiny_kv):
    refs, p = [r * 2 - 1 for r in make_refs(3, batch=2)], tokenize(["place the subject", "place"])
    kv = tiny_kv.context_kv(refs, p)
    assert len(kv.layers) == tiny_kv.config.depth and kv.num_tokens == 1 + 3 + 3 * 16
    for t in (0.9, 0.3):
        x, tt = torch.randn(2, 3, 16, 16), torch.full((2,), t)
        assert torch.equal(tiny_kv(x, tt, refs, p, context_kv=kv), tiny_kv(x, tt, refs, p))


def test_target_rope_is_computed_once_in_float32(tiny):
    from tokensparse.models.layers import rope_angles

    cfg = tiny.config
    want = rope_angles(tiny.target_ids, cfg.rope_axes, cfg.rope_theta)
    assert torch.equal(tiny.target_rope, want) and tiny.target_rope is tiny.target_rope  # cached
    assert "target_rope" not in tiny.state_dict() and "_target_rope" not in tiny.state_dict()
    copy = __import__("copy").deepcopy(tiny)
    copy.half().float()  # a dtype round trip rounds the weights, never the derived RoPE table
    assert torch.equal(copy.target_rope, want)


@pytest.mark.parametrize("fixture", ["tiny", "tiny_kv"])
def test_a_model_first_run_under_inference_mode_still_trains(request, fixture):
    model = request.getfixturevalue(fixture)
    x, refs, p = torch.randn(1, 3, 16, 16), make_refs(1), tokenize(["place"])
    with torch.inference_mode():  # the first call caches the target's RoPE table
        model(x, 0.5, refs, p)
    model.train()
    model(x, 0.5, refs, p).square().mean().backward()  # was: "Inference tensors cannot be saved for backward"
    assert model.final.weight.grad is not None


def test_context_kv_needs_separate_mode(tiny):
    with pytest.raises(ValueError, match="ref_attends_target=False"):
        tiny.context_kv(make_refs(1), tokenize("place"))


@torch.no_grad()
def test_a_cache_that_does_not_fit_the_call_is_refused(tiny, tiny_kv):
    refs, p = [r * 2 - 1 for r in make_refs(1, batch=2)], tokenize(["place", "place"])
    kv = tiny_kv.context_kv(refs, p)
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="batch of 2, x has 1"):  # was a silently broadcast (2, ...) output
        tiny_kv(x, 0.5, None, tokenize("place"), context_kv=kv)
    with pytest.raises(ValueError, match="ref_attends_target=False"):  # a joint model has no step-free K/V
        tiny(torch.randn(2, 3, 16, 16), 0.5, None, p, context_kv=kv)
    with pytest.raises(TypeError, match="ContextKV"):
        tiny_kv(x, 0.5, None, tokenize("place"), context_kv=(1, 2))
    wide = ts.build_model("refdit-tiny", ref_attends_target=False, dim=64, rope_axes=(8, 12, 12))
    with pytest.raises(ValueError, match="context_kv layer 0 holds keys"):  # was a size mismatch inside attention
        tiny_kv(torch.randn(2, 3, 16, 16), 0.5, None, p, context_kv=wide.context_kv(refs, p))
    for ids, err in ((p.float(), TypeError), (p[0], ValueError), (torch.full((2, 3), 10**6), ValueError)):
        with pytest.raises(err, match="prompt_ids"):
            tiny_kv.context_kv(refs, ids)


def test_fresh_text_encoder_is_the_identity(tiny):
    """Text blocks start with zero output projections: a new text_depth=2 model equals the text-free one."""
    text = ts.build_model("refdit-tiny", text_depth=2)
    result = text.load_state_dict(tiny.state_dict(), strict=False)
    assert not result.missing_keys or all(k.startswith("prompt_embedder.blocks.") for k in result.missing_keys)
    x, t, refs = torch.randn(2, 3, 16, 16), torch.rand(2), make_refs(1, batch=2)
    p = tokenize(["compose first top left second center center on red plain", "relight warm"])
    assert torch.equal(text(x, t, refs, p), tiny(x, t, refs, p))


def test_text_encoder_mixes_words_and_ignores_padding(tiny):
    torch.manual_seed(1)
    text = ts.build_model("refdit-tiny", text_depth=2)
    text.load_state_dict(tiny.state_dict(), strict=False)
    for blk in text.prompt_embedder.blocks:  # give the zero-initialised projections values
        torch.nn.init.normal_(blk.attn.proj.weight, std=0.2)
        torch.nn.init.normal_(blk.mlp.fc2.weight, std=0.2)
    emb = text.prompt_embedder
    a, _, _ = emb(tokenize("compose first top left on red plain"))
    b, _, _ = emb(tokenize("compose second top left on red plain"))
    assert not torch.allclose(a[:, 4], b[:, 4])  # "left" knows which ordinal came before it
    x, t, refs = torch.randn(2, 3, 16, 16), torch.rand(2), make_refs(1, batch=2)
    both = text(x, t, refs, tokenize(["relight warm", "compose first top left on red plain"]))
    alone = text(x[:1], t[:1], [r[:1] for r in refs], tokenize("relight warm"))
    assert torch.allclose(both[:1], alone, atol=1e-5)  # a shorter prompt padded in a batch: same output


def test_text_depth_must_not_be_negative():
    with pytest.raises(ValueError, match="text_depth"):
        ts.RefDiTConfig(text_depth=-1)


@pytest.mark.parametrize("override, err", [
    (dict(heads=0), ValueError), (dict(image_size="32"), TypeError), (dict(route_span=(1,)), TypeError),
    (dict(depth=1.5), TypeError), (dict(mlp_ratio=-1), ValueError), (dict(vocab_size=10), ValueError),
    (dict(ref_attends_target="no"), TypeError), (dict(depth=0), ValueError),
    (dict(rope_theta=float("nan")), ValueError),
])
def test_config_rejects_bad_fields(override, err):
    with pytest.raises(err, match=next(iter(override))):
        ts.build_model("refdit-tiny", **override)


def test_config_normalises_lists_and_numpy_scalars():
    import numpy as np

    cfg = ts.build_model("refdit-s", route_span=[1, 5], depth=np.int64(6)).config
    assert cfg.route_span == (1, 5) and type(cfg.depth) is int and hash(cfg)
    with pytest.raises(TypeError, match="RefDiTConfig"):
        ts.RefDiT("refdit-s")


@pytest.mark.parametrize("separate", [False, True])
@torch.no_grad()
def test_a_token_of_size_s_attends_like_s_copies_of_it(tiny, tiny_kv, separate):
    """RefDiT.context turns reference ``sizes`` into log-size logit biases: one token standing for s equal
    tokens (same features, same position) gives the output of the s copies, in joint, separate and cached mode."""
    from tokensparse.tokens import TokenSeq

    model = tiny_kv if separate else tiny
    refs = [r * 2 - 1 for r in make_refs(2, batch=2)]
    p, x, t = tokenize(["place the subject", "place"]), torch.randn(2, 3, 16, 16), torch.full((2,), 0.6)
    dense = model.embed_references(refs, 2, p)
    keep = torch.tensor([0, 3, 5, 16, 20])  # tokens of both references
    copies = torch.tensor([1, 3, 1, 2, 4])
    rep = keep.repeat_interleave(copies)
    many = TokenSeq(dense.tokens[:, rep], dense.ids[:, rep], None, dense.grids)
    one = TokenSeq(dense.tokens[:, keep], dense.ids[:, keep], None, dense.grids,
                   copies.float().expand(2, -1).clone())
    want = model(x, t, many, p)
    torch.testing.assert_close(model(x, t, one, p), want, atol=2e-5, rtol=0)
    assert not torch.allclose(model(x, t, TokenSeq(one.tokens, one.ids, None, one.grids), p), want, atol=1e-3)
    if separate:
        torch.testing.assert_close(model(x, t, None, p, context_kv=model.context_kv(one, p)), model(x, t, one, p),
                                   atol=0, rtol=0)
    padded = TokenSeq(torch.cat([one.tokens, one.tokens[:, :1]], 1), torch.cat([one.ids, one.ids[:, :1]], 1),
                      torch.tensor([[True] * 5 + [False]] * 2), one.grids, torch.cat([one.sizes, one.sizes[:, :1]], 1))
    torch.testing.assert_close(model(x, t, padded, p), want, atol=2e-5, rtol=0)  # padding stays masked


@torch.no_grad()
def test_ref_keep_under_an_applied_sparse_context_names_the_hook(tiny):
    x, p, refs = torch.randn(1, 3, 16, 16), tokenize(["place"]), [r * 2 - 1 for r in make_refs(1)]
    n = tiny.config.grid ** 2
    keep = torch.ones(1, n, dtype=torch.bool)
    keep[:, ::2] = False
    dropped = tiny(x, 0.5, refs, p, ref_keep=keep)
    ts.apply_sparse_context(tiny, ts.SparseContextConfig(keep=0.5, selector="uniform"))
    try:
        with pytest.raises(ValueError, match="Sparse Context"):  # was: "keep mask ... does not match sequence"
            tiny(x, 0.5, refs, p, ref_keep=keep)
    finally:
        ts.remove_sparse_context(tiny)
    assert torch.equal(tiny(x, 0.5, refs, p, ref_keep=keep), dropped)


@torch.no_grad()
def test_a_ref_keep_that_is_not_a_tensor_is_named(tiny):
    # a list of lists failed in tokens.subset with "'list' object has no attribute 'shape'"
    x, p, refs = torch.randn(1, 3, 16, 16), tokenize(["place"]), [r * 2 - 1 for r in make_refs(1)]
    with pytest.raises(TypeError, match=r"ref_keep must be a \(B, N\) bool tensor or None, got list"):
        tiny(x, 0.5, refs, p, ref_keep=[[True] * tiny.config.grid ** 2])


@torch.no_grad()
@pytest.mark.parametrize("joint", [True, False])
def test_a_prepared_context_is_exact(tiny, tiny_kv, joint):
    model = tiny if joint else tiny_kv
    refs, p = [r * 2 - 1 for r in make_refs(3, batch=2)], tokenize(["place the subject", "place"])  # padded prompts
    keep = torch.rand(2, 48, generator=torch.Generator().manual_seed(0)) > 0.5  # different counts: a valid mask
    for ref_keep in (None, keep):
        ctx = model.prepare_context(refs, p, ref_keep)
        assert (ctx.c_ctx is None) == joint and ctx.valid is not None
        for t in (0.9, 0.3):  # one context for every step
            x, tt = torch.randn(2, 3, 16, 16), torch.full((2,), t)
            assert torch.equal(model(x, tt, refs, p, context=ctx), model(x, tt, refs, p, ref_keep=ref_keep))
            assert torch.equal(model(x, tt, None, p, context=ctx), model(x, tt, refs, p, ref_keep=ref_keep))


@torch.no_grad()
def test_a_prepared_context_that_does_not_fit_the_call_is_refused(tiny, tiny_kv):
    refs, p = [r * 2 - 1 for r in make_refs(1, batch=2)], tokenize(["place", "place"])
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="either context or context_kv"):
        tiny_kv(x, 0.5, None, p, context=tiny_kv.prepare_context(refs, p), context_kv=tiny_kv.context_kv(refs, p))
    with pytest.raises(TypeError, match="PreparedContext"):
        tiny(x, 0.5, None, p, context=tiny_kv.context_kv(refs, p))
    with pytest.raises(ValueError, match="B = 1"):
        tiny(x[:1], 0.5, None, p[:1], context=tiny.prepare_context(refs, p))
    with pytest.raises(ValueError, match="other attention mode"):  # no conditioning at t = 0 for the context
        tiny_kv(x, 0.5, None, p, context=tiny.prepare_context(refs, p))
    with pytest.raises(TypeError, match="ref_keep"):
        tiny.prepare_context(refs, p, ref_keep=[[True]])
    with pytest.raises(ValueError, match="prompt_ids"):
        tiny.prepare_context(refs, p[0])


def test_a_failed_export_removes_the_folders_it_made(tmp_path):
    from tokensparse.models.zoo import write_shipped

    def fails(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_shipped(tmp_path / "new" / "w.safetensors", fails, {})
    assert list(tmp_path.iterdir()) == []


def test_config_names_an_odd_head_dim_instead_of_asking_for_impossible_rope_axes():
    with pytest.raises(ValueError, match=r"head_dim 25 \(dim 50 / heads 2\) is odd"):
        ts.build_model("refdit-tiny", dim=50)  # said: rope_axes (4, 10, 10) must be even and sum to head_dim 25
    with pytest.raises(ValueError, match=r"rope_axes \(4, 10, 10\) must be even and sum to head_dim 32 \(dim 64"):
        ts.build_model("refdit-tiny", dim=64)  # an even head_dim: the rope_axes are what to change
