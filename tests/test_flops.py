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
