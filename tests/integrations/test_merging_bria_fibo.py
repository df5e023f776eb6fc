"""Token merging on Bria FIBO (``BriaFiboTransformer2DModel``, ``BriaFiboPipeline``, ``BriaFiboEditPipeline``): FLUX.1's
blocks under other names, so FLUX.1's wiring serves them. The target grid (``img_ids`` T = 0, first among the image
tokens) merges in every double-stream block's ``attn`` (RoPE rows and the pipeline's key mask over ``[text, image]``
along) and ``ff``, and every single-stream block's ``proj_mlp`` and ``attn``; the text and the Edit pipeline's
reference tokens (T = 1, 2, ...) never merge (Sparse Context thins the references, and the two stack)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_bria_fibo")

from PIL import Image  # noqa: E402

import tokensparse as ts  # noqa: E402
from tokensparse.context import SparseContextConfig  # noqa: E402
from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo, tiny_bria_fibo_edit  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state, merging_supports  # noqa: E402

from . import merging_contract as contract  # noqa: E402

TOKENS = 8 * 8  # 128x128 images: 16 pixels per token, no patching
REF = (np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8")
PROMPT = '{"edit_instruction": "a cat"}'


@pytest.fixture
def pipe():
    p = tiny_bria_fibo_edit(seed=0)  # one double-, one single-stream block
    p.set_progress_bar_config(disable=True)
    return p


def _edit_call(steps: int = 2) -> dict:
    return {"prompt": PROMPT, "image": Image.fromarray(REF), "height": 128, "width": 128,
            "num_inference_steps": steps, "guidance_scale": 2.0, "generator": torch.Generator().manual_seed(0),
            "output_type": "np", "max_sequence_length": 64}


def run(pipe, steps: int = 2) -> np.ndarray:
    return pipe(**_edit_call(steps)).images


def counts(pipe) -> dict[str, list[int]]:
    """The tokens each merged sublayer saw in one generation (2 steps, CFG batched: one call a step)."""
    double, single = pipe.transformer.transformer_blocks[0], pipe.transformer.single_transformer_blocks[0]
    subs = [("attn", double.attn), ("ff", double.ff), ("single_attn", single.attn), ("proj_mlp", single.proj_mlp)]
    return contract.tokens_seen(subs, lambda: run(pipe))


def expected(n_txt: int, attn: int, mlp: int, refs: int = TOKENS) -> dict[str, list[int]]:
    """:func:`counts` where the attention sees ``attn`` target tokens and the MLPs ``mlp``, the references whole."""
    return {"attn": [attn + refs] * 2, "ff": [mlp + refs] * 2, "single_attn": [n_txt + attn + refs] * 2,
            "proj_mlp": [n_txt + mlp + refs] * 2}


def _text_tokens(pipe) -> int:
    kw = contract.call_kwargs(pipe.transformer, lambda: run(pipe, steps=1))
    return kw["encoder_hidden_states"].shape[1]


def test_merges_the_target_only_and_removes_exactly(pipe, caplog):
    assert merging_supports(pipe.transformer) is None
    n_txt = _text_tokens(pipe)
    dense = run(pipe)
    unmerged = expected(n_txt, TOKENS, TOKENS)
    assert counts(pipe) == unmerged
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
        assert counts(pipe) == expected(n_txt, TOKENS // 2, TOKENS // 2)  # the text and the reference whole
    assert not contract.ours(caplog)  # the pipeline's key mask thinned, not refused
    assert merging_state(pipe).merged_tokens == 2 * 2 * TOKENS // 2  # 2 blocks x 2 steps, one matching a batch
    contract.merged_then_removes_exactly(pipe, lambda: torch.from_numpy(run(pipe)), torch.from_numpy(dense),
                                         lambda: counts(pipe), unmerged,
                                         lambda seen: seen == expected(n_txt, TOKENS, TOKENS // 2), reapply=True)


def test_rope_rows_and_key_mask_keep_the_text_and_reference_entries(pipe):
    """Double- and single-stream attention get the matching over the target's span only (first among the image
    tokens, after the text in a single-stream block), the RoPE rows and key-mask entries of the kept target tokens,
    and every text and reference row and entry as they were."""
    model = pipe.transformer
    attns = [model.transformer_blocks[0].attn, model.single_transformer_blocks[0].attn]
    dense: list[dict] = []
    handles = [a.register_forward_pre_hook(lambda m, a, k: dense.append(k), with_kwargs=True) for a in attns]
    run(pipe, steps=1)
    for h in handles:
        h.remove()
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    seen: list[tuple] = []  # registered after merging's pre-hooks: the merged call and its active matching
    handles = [a.register_forward_pre_hook(lambda m, a, k: seen.append((m.__dict__["_tokensparse_active"], k)),
                                           with_kwargs=True) for a in attns]
    run(pipe, steps=1)
    for h in handles:
        h.remove()
    ts.remove_token_merging(pipe)
    n_txt = dense[0]["encoder_hidden_states"].shape[1]
    for ((m, span), kw), dkw, lo in zip(seen, dense, (0, n_txt)):
        assert span == (lo, TOKENS) and m.num_merged == TOKENS // 2
        keys = torch.cat([torch.arange(n_txt), n_txt + m.keep[0], n_txt + torch.arange(TOKENS, 2 * TOKENS)])
        mask, dmask = kw["attention_mask"], dkw["attention_mask"]
        assert not dmask[..., :n_txt].all()  # the prompt and the empty negative prompt differ: text padding
        assert torch.equal(mask, dmask.index_select(-1, keys))
        for table, dtable in zip(kw["image_rotary_emb"], dkw["image_rotary_emb"]):
            assert torch.equal(table, dtable[keys])  # text rows, the kept target rows, all reference rows


def test_pipeline_generations_at_a_ratio_and_a_threshold(pipe, caplog):
    contract.pipeline_generations(pipe, lambda: _edit_call(steps=3), (1, 128, 128, 3), caplog)


def test_text_to_image_pipeline_generations_batch_of_two_prompts(caplog):
    t2i = tiny_bria_fibo(seed=0)

    def call() -> dict:  # 8x12 tokens, the two prompts padded to one length (a key mask)
        return {"prompt": ["a cat", "a big red dog on a sunny day"], "height": 128, "width": 192,
                "num_inference_steps": 3, "guidance_scale": 2.0, "max_sequence_length": 64, "output_type": "np",
                "generator": torch.Generator().manual_seed(0)}

    contract.pipeline_generations(t2i, call, (2, 128, 192, 3), caplog)


def test_stacks_with_sparse_context_on_the_reference(pipe, caplog):
    n_txt = _text_tokens(pipe)
    dense = run(pipe)
    with caplog.at_level(logging.WARNING, logger="tokensparse"):
        ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
        ts.apply_sparse_context(pipe, SparseContextConfig(keep=0.25))
        assert counts(pipe) == expected(n_txt, TOKENS // 2, TOKENS // 2, refs=TOKENS // 4)
        stacked = run(pipe)
    assert not contract.ours(caplog)
    assert np.isfinite(stacked).all() and not np.array_equal(stacked, dense)
    ts.remove_token_merging(pipe)
    ts.remove_sparse_context(pipe)
    assert np.array_equal(run(pipe), dense)
