"""Token merging on Qwen-Image-Layered (``QwenImageLayeredPipeline``, the layered Qwen-Image transformer): the target
is every ``img_shapes`` entry but the last (the layers: the composite and the ones the pipeline returns), each layer
merged on its own grid; the input image, last, is the one reference, never merged (Sparse Context thins it)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers_tiny_qwen_layered import tiny_qwen_image_layered  # noqa: E402
from tokensparse.integrations.merging_diffusers import layers_grid  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402
from .contract import qwen_layered_pipe  # noqa: E402

TOKENS = 8 * 8  # 32x32 pixels: VAE /2, 2x2 patches
LAYERS = 2  # the pipeline's target: the composite and LAYERS more
TARGET = (LAYERS + 1) * TOKENS
INPUT = (np.random.RandomState(0).rand(32, 32, 4) * 255).astype("uint8")


pipe = qwen_layered_pipe()  # 32x32 pixels, not 640^2


def run(pipe, steps: int = 2) -> Tensor:
    out = pipe(image=Image.fromarray(INPUT, "RGBA"), prompt="a cat", negative_prompt="blur", true_cfg_scale=2.0,
               layers=LAYERS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    return torch.from_numpy(np.stack(out))


def counts(pipe) -> dict[str, list[int]]:
    """The tokens each block's ``attn`` and ``img_mlp`` saw in one generation (2 steps x true CFG)."""
    subs = [(f"{i}.{s}", getattr(blk, s)) for i, blk in enumerate(pipe.transformer.transformer_blocks)
            for s in ("attn", "img_mlp")]
    return contract.tokens_seen(subs, lambda: run(pipe))


def expected(target: int, attn: int | None = None) -> dict[str, list[int]]:
    """:func:`counts` where ``img_mlp`` sees ``target`` tokens of the layers and ``attn`` ``attn`` (default: as many),
    both the input image's whole."""
    return {f"{i}.{s}": [(target if s == "img_mlp" or attn is None else attn) + TOKENS] * 4
            for i in range(2) for s in ("attn", "img_mlp")}


def test_layers_grid_reads_every_entry_but_the_last():
    assert layers_grid([[(1, 4, 4), (1, 4, 4), (1, 6, 10)]] * 2) == (4, 4, 2)
    assert layers_grid([[(1, 4, 4), (1, 1, 15)]]) == (4, 4, 1)  # the input image thinned by Sparse Context
    assert layers_grid([[(1, 4, 4)]]) is None  # no input image entry: no target known
    assert layers_grid([[(1, 4, 4), (1, 4, 6), (1, 4, 4)]]) is None  # layers on different grids
    assert layers_grid([[(2, 4, 4), (1, 4, 4)]]) is None
    assert layers_grid(None) is None and layers_grid([]) is None


def test_merges_each_target_layer_only_and_removes_exactly(pipe, caplog):
    assert merging_supports(pipe.transformer) is None
    dense = run(pipe)
    unmerged = expected(TARGET)
    assert counts(pipe) == unmerged
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
        assert counts(pipe) == expected(TARGET // 2)  # every layer halved, the input image whole
    assert not contract.ours(caplog)
    assert merging_state(pipe).merged_tokens == 2 * TARGET // 2 * 4  # 2 blocks x half of the layers x 4 calls
    contract.merged_then_removes_exactly(pipe, lambda: run(pipe), dense, lambda: counts(pipe), unmerged,
                                         lambda seen: seen == expected(TARGET // 2, attn=TARGET), reapply=True)


def test_no_token_merges_into_another_layer_and_the_rope_rows_follow(pipe):
    """Each layer is matched on its own grid: every token's merged slot is a token of its own layer, and the
    attention gets the dense RoPE rows of the kept layer tokens, then all of the input image's."""
    seen: list[tuple] = []
    model = pipe.transformer
    dense_rope: list[Tensor] = []
    handle = model.transformer_blocks[0].attn.register_forward_pre_hook(
        lambda m, a, k: dense_rope.append(k["image_rotary_emb"][0]), with_kwargs=True)
    run(pipe, steps=1)
    handle.remove()
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(threshold=0.2))
    attn = model.transformer_blocks[0].attn  # after merging's pre-hook: its matching is active
    attn.register_forward_pre_hook(lambda m, a, k: seen.append((m.__dict__["_tokensparse_active"],
                                                                 k["image_rotary_emb"][0])), with_kwargs=True)
    run(pipe, steps=1)
    (m, span), rope = seen[0]
    assert span == (0, TARGET) and m.num_merged > 0
    layer = torch.arange(TARGET) // TOKENS
    assert torch.equal(layer[m.keep[0][m.index[0]]], layer)  # each token's slot holds a token of its layer
    assert all(0 < int((layer[m.src[0]] == i).sum()) for i in range(LAYERS + 1))  # every layer merges some
    torch.testing.assert_close(rope, torch.cat([dense_rope[0][m.keep[0]], dense_rope[0][TARGET:]]), rtol=0, atol=0)


def test_stacks_with_sparse_context_on_the_input_image(pipe):
    dense = run(pipe)
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    ts.apply_sparse_context(pipe, SparseContextConfig(keep=0.25))
    subs = [(str(i), blk.attn) for i, blk in enumerate(pipe.transformer.transformer_blocks)]
    stacked_counts = contract.tokens_seen(subs, lambda: run(pipe))
    assert stacked_counts == {str(i): [TARGET // 2 + TOKENS // 4] * 4 for i in range(2)}
    stacked = run(pipe)
    assert torch.isfinite(stacked).all() and not torch.equal(stacked, dense)
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe)
    assert torch.equal(run(pipe), dense)


def test_two_generations_at_a_threshold_and_a_ratio(pipe):
    dense = run(pipe, steps=3)
    for cfg in (ts.TokenMergingConfig(ratio=0.5), ts.TokenMergingConfig(threshold=0.3, recompute_every=2)):
        ts.apply_token_merging(pipe, cfg)
        first = run(pipe, steps=3)
        state = merging_state(pipe)
        assert state.step == 2 and state.merged_tokens > 0, cfg
        assert torch.isfinite(first).all() and not torch.equal(first, dense)
        assert torch.equal(run(pipe, steps=3), first)  # the second generation: the same
    ts.remove_token_merging(pipe)
    assert torch.equal(run(pipe, steps=3), dense)


def test_stays_close_at_a_small_ratio():
    """The bare layered transformer on smooth layers (neighbouring tokens alike, as in real latents)."""
    model = tiny_qwen_image_layered(seed=0).transformer
    g = torch.Generator().manual_seed(0)
    frames = [nn.functional.interpolate(torch.randn(1, 32, 4, 4, generator=g), size=(16, 16), mode="bilinear")
              for _ in range(LAYERS + 2)]  # the layers and the input image, 16x16 tokens each
    kw = {"hidden_states": torch.cat([f.flatten(2).transpose(1, 2) for f in frames], 1),
          "encoder_hidden_states": torch.randn(1, 5, 16, generator=g), "encoder_hidden_states_mask": torch.ones(1, 5),
          "timestep": torch.tensor([0.5]), "img_shapes": [[(1, 16, 16)] * (LAYERS + 2)],
          "additional_t_cond": torch.tensor([0]), "return_dict": False}

    def call() -> Tensor:
        with torch.no_grad():
            return model(**kw)[0]

    contract.stays_close_at_a_small_ratio(model, call)
