import torch

from tokensparse.models.layers import JointAttention, apply_rope, gelu_tanh, patchify, rope_angles, unpatchify
from tokensparse.tokens import grid_ids


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(unpatchify(patchify(x, 4).reshape(2, 16, 48), 4, 4, 4), x)


def test_apply_rope_is_the_pairwise_rotation():
    ids = torch.cat([grid_ids(0, 4, 4), grid_ids(2, 4, 4)])[None].expand(2, -1, -1)
    rope = rope_angles(ids, (8, 12, 12), 1e4)
    cos, sin = rope[:, None, ..., 0], rope[:, None, ..., 1]
    permuted = torch.randn(2, 32, 3, 6, 32).permute(2, 0, 3, 1, 4)[1]  # strided (B, H, N, Dh) views
    transposed = torch.randn(2, 32, 6, 32).transpose(1, 2)  # as JointAttention.qkv_heads passes them
    for xi in (permuted, transposed, transposed.contiguous(), transposed.half()):
        x0, x1 = xi.float()[..., 0::2], xi.float()[..., 1::2]
        want = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).type_as(xi)
        torch.testing.assert_close(apply_rope(xi, rope), want, rtol=1e-6, atol=1e-6)  # bit-equal on x86 CPUs


def test_gelu_tanh_matches_torch_with_and_without_autograd():
    x = (torch.randn(64, 96) * 4).requires_grad_()
    y, ref = gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    g, gref = (torch.autograd.grad(v.square().sum(), x)[0] for v in (y, ref))
    torch.testing.assert_close(g, gref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(gelu_tanh(x), y)  # one function in both modes: cached paths stay exact
    xd = (torch.randn(20, 10, dtype=torch.double) * 3).requires_grad_()
    assert torch.autograd.gradcheck(gelu_tanh, (xd,)) and torch.autograd.gradgradcheck(gelu_tanh, (xd,))
    xh = x.detach().half()
    torch.testing.assert_close(gelu_tanh(xh), torch.nn.functional.gelu(xh.float(), approximate="tanh").half())


def test_qkv_heads_normalise_rotate_and_split_heads():
    torch.manual_seed(0)
    att = JointAttention(48, 3)
    torch.nn.init.normal_(att.q_norm.weight)
    torch.nn.init.normal_(att.k_norm.weight)
    x = torch.randn(2, 10, 48)
    rope = rope_angles(grid_ids(0, 2, 5)[None].expand(2, -1, -1), (4, 6, 6), 1e4)
    q, k, v = att.qkv_heads(x, rope)
    want = att.qkv(x).reshape(2, 10, 3, 3, 16).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
    assert q.shape == k.shape == v.shape == (2, 3, 10, 16)
    assert torch.equal(v, want[2])
    torch.testing.assert_close(q, apply_rope(att.q_norm(want[0]), rope), rtol=0, atol=0)
    torch.testing.assert_close(k, apply_rope(att.k_norm(want[1]), rope), rtol=0, atol=0)
