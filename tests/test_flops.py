import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tokensparse.flops import count_flops


def test_cpu_attention_forward_and_backward_are_counted():
    b, h, lq, lk, d = 2, 3, 5, 7, 4
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k, v = torch.randn(b, h, lk, d, requires_grad=True), torch.randn(b, h, lk, d, requires_grad=True)
    fwd = 2 * (2 * b * h * lq * lk * d)  # Q K^T and P V
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == fwd
    assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v).sum().backward()) == 3 * fwd
    with torch.no_grad():
        assert count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == fwd


def test_linear_layers_count_a_multiply_add_as_two():
    lin = torch.nn.Linear(6, 10)
    assert count_flops(lambda: lin(torch.randn(4, 6))) == 2 * 4 * 6 * 10


def test_the_formulas_stay_with_our_counter():
    q = torch.randn(1, 1, 4, 8)
    count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    with FlopCounterMode(display=False) as plain:  # torch's own counter: untouched by ours
        F.scaled_dot_product_attention(q, q, q)
    assert plain.get_total_flops() == 0


def test_a_refdit_step_counts_what_it_computes_with_cache_mask_and_routed_branches():
    """The efficiency numbers divide by these counts: a cached, masked step with Sparse Guidance's two routed
    branches counts exactly its linear layers (2 M K N) and attentions (4 B H Nq Nk Dh), nothing else."""
    from tokensparse.models.refdit import RefDiT, RefDiTConfig
    from tokensparse.vocab import tokenize

    cfg = RefDiTConfig(image_size=8, patch_size=2, dim=24, depth=3, heads=2, mlp_ratio=2.0, rope_axes=(4, 4, 4),
                       ref_attends_target=False, route_span=(1, 3))
    model = RefDiT(cfg).eval()
    b, d, hd, nt, n_ref = 2, 24, 48, 16, 32
    ids = tokenize(["recolor red object blue", "place"], cfg.max_prompt_len)  # unequal lengths: a padding mask
    nc = 1 + 4 + n_ref  # BOS + the longest prompt + two 4x4 references
    x, t = torch.randn(b, 3, 8, 8), torch.full((b,), 0.5)
    refs = [torch.rand(b, 3, 8, 8) * 2 - 1 for _ in range(2)]

    def lin(m: int, k: int, n: int) -> int:
        return 2 * m * k * n

    def layer(nq: int, nk: int) -> int:  # qkv, attention, out projection, MLP
        return lin(b * nq, d, 3 * d) + 4 * b * 2 * nq * nk * 12 + lin(b * nq, d, d) + 2 * lin(b * nq, d, hd)

    def target_pass(nts: list[int]) -> int:  # adaLN per block, target tokens vs cached context, final layer
        return sum(lin(b, d, 6 * d) + layer(n, n + nc) for n in nts) + lin(b, d, 2 * d) + lin(b * nt, d, 12)

    common = lin(b, 256, d) + lin(b, d, d) + lin(b * nt, 12, d)  # time embedding, target patches
    context = (lin(b * n_ref, 12, d) + 2 * lin(b, d, d) + lin(b, 256, d) + lin(b, d, d)
               + cfg.depth * (lin(b, d, 6 * d) + layer(nc, nc)))  # patches, prompt pool, t = 0, context stream
    with torch.no_grad():
        assert count_flops(lambda: model.context_kv(refs, ids)) == context
        kv = model.context_kv(refs, ids)
        assert count_flops(lambda: model(x, t, None, ids, context_kv=kv)) == common + target_pass([nt] * 3)
        strong, weak = nt - round(0.25 * nt), nt - round(0.75 * nt)  # block 0 shared, blocks 1-2 per branch
        routed = count_flops(lambda: model(x, t, None, ids, context_kv=kv, routes=(0.25, 0.75),
                                           route_generator=torch.Generator().manual_seed(0)))
    assert routed == common + target_pass([nt, strong, strong]) + target_pass([weak, weak])
