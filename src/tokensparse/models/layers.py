"""RefDiT's building blocks: patchify, sinusoidal time embedding, multi-axis RoPE, CPU-fast tanh-GELU,
adaLN helpers, the MLP and the joint target/context attention.

Pure tensor functions and small modules with no knowledge of the model's config; :mod:`.refdit` assembles
them into blocks and the model (and re-exports them).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kvcache import KVJoin

# --------------------------------------------------------------------------------------------------
# Small pieces
# --------------------------------------------------------------------------------------------------


def patchify(images: Tensor, p: int) -> Tensor:
    """``(B, C, H, W) -> (B, H/p, W/p, p*p*C)``."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h // p, w // p, p * p * c)


def unpatchify(tokens: Tensor, p: int, h: int, w: int, c: int = 3) -> Tensor:
    """``(B, h*w, p*p*C) -> (B, C, h*p, w*p)``; inverse of :func:`patchify`."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, w * p)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal embedding ``(B, dim)`` of ``t`` in [0, 1] (scaled by 1000 like DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(ids: Tensor, axes: tuple[int, ...], theta: float) -> Tensor:
    """Multi-axis RoPE: ids ``(B, N, A)`` -> cos/sin ``(B, N, head_dim // 2, 2)``."""
    parts = []
    for a, d in enumerate(axes):
        freqs = theta ** (-torch.arange(0, d, 2, device=ids.device, dtype=torch.float32) / d)  # (d/2,)
        parts.append(ids[..., a].float()[..., None] * freqs)
    ang = torch.cat(parts, dim=-1)
    return torch.stack([ang.cos(), ang.sin()], dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate ``x (B, H, N, Dh)`` pairwise by ``rope (B, N, Dh/2, 2)``.

    Each pair ``(x0, x1)`` is a complex number multiplied by ``cos + i sin``: one complex multiply
    instead of four real ones, a stack and two copies (the same values, bit for bit, on CPU for the layout
    ``JointAttention`` passes; other strides may take another kernel and differ by float rounding).
    """
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    rc = torch.view_as_complex(rope if rope.stride(-1) == 1 else rope.contiguous())[:, None]
    return torch.view_as_real(xc * rc).flatten(-2).type_as(x)


def joint_mask(ctx_valid: Tensor, nt: int) -> Tensor:
    """The attention mask ``(B, 1, 1, nt + Nc)`` over ``nt`` target keys followed by the context's keys, from
    the context's ``(B, Nc)`` mask: bool (target keys valid) or a float logit bias (target keys unbiased)."""
    own = torch.full((ctx_valid.shape[0], nt), ctx_valid.dtype == torch.bool, dtype=ctx_valid.dtype,
                     device=ctx_valid.device)
    return torch.cat([own, ctx_valid], 1)[:, None, None, :]


def route_index(batch: int, n: int, route: float, generator: torch.Generator | None, device) -> Tensor:
    """Sorted indices ``(B, n - round(route * n))`` of the target tokens that are *not* routed away."""
    keep = n - int(round(route * n))
    if keep < 1:
        raise ValueError(f"route {route} routes all {n} target tokens around the route span; use a rate below "
                         f"{1 - 0.5 / n:.4g} for {n} tokens")
    scores = torch.rand(batch, n, generator=generator, dtype=torch.float32).to(device)
    return scores.topk(keep, dim=1).indices.sort(dim=1).values


_GELU_A = 1.5957691216057308  # 2 sqrt(2/pi)
_GELU_B = 0.07135481627260025  # 2 sqrt(2/pi) * 0.044715


def _gelu_gate(x: Tensor) -> Tensor:
    """``sigmoid(2z)`` with ``z = sqrt(2/pi) (x + 0.044715 x^3)``, so that ``gelu_tanh(x) = x * gate``."""
    u = x * x
    return u.mul_(_GELU_B).add_(_GELU_A).mul_(x).sigmoid_()


class _GeluTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        gate = _gelu_gate(x)
        ctx.save_for_backward(x, gate)  # one extra activation per call buys a ~1.5x faster backward
        return x * gate

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        x, gate = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gate rebuilt differentiably (double backward)
            gate = torch.sigmoid(x * (_GELU_A + _GELU_B * x * x))
            return grad * (gate + x * gate * (1 - gate) * (_GELU_A + 3 * _GELU_B * x * x))
        dz = (x * x).mul_(3 * _GELU_B).add_(_GELU_A)  # d(2z)/dx
        return dz.mul_(x).mul_(gate).mul_(1 - gate).add_(gate).mul_(grad)  # (gate + x gate (1-gate) dz) grad


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation, ``x (1 + tanh z) / 2``, computed on CPU as ``x sigmoid(2z)``.

    The same function (fp32: equal to float rounding, <= 5e-7 absolute), 2-3x faster on CPU builds that
    vectorise sigmoid but not tanh; identical values with and without autograd, so cached and recomputed
    paths agree bit for bit. Half-precision inputs are computed in fp32 and rounded once; on other devices
    this is ``F.gelu(x, approximate="tanh")``.
    """
    if x.device.type != "cpu":
        return F.gelu(x, approximate="tanh")
    if x.dtype in (torch.float16, torch.bfloat16):
        return gelu_tanh(x.float()).to(x.dtype)
    if torch.is_grad_enabled() and x.requires_grad:
        return _GeluTanh.apply(x)
    return _gelu_gate(x).mul_(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x (1 + scale) + shift``, one fused pass over ``x``."""
    return torch.addcmul(shift, x, 1 + scale)


def gated_add(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """Gated residual ``x + gate * y``, one fused pass."""
    return torch.addcmul(x, gate, y)


class Mlp(nn.Module):
    """Two-layer GELU MLP. ``role`` only tells hooks whether these are target or context tokens."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, role: str = "target") -> Tensor:
        return self.fc2(gelu_tanh(self.fc1(x)))


# --------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------


class JointAttention(nn.Module):
    """Target and context tokens in one attention, with QK-RMSNorm and RoPE.

    Joint mode (``forward`` given ``ctx``): every query sees every key. Separate mode (the block's choice
    when ``ref_attends_target=False``): :meth:`context_attention` runs the context on its own, and
    ``forward`` given ``ctx_kv`` lets the target attend to it: the context's K/V never depend on the target.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor, rope: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, N, D)`` -> q, k, v each ``(B, H, N, Dh)``, RoPE applied to q and k."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope), v

    def merge_heads(self, o: Tensor) -> Tensor:
        b, h, n, d = o.shape
        return self.proj(o.transpose(1, 2).reshape(b, n, h * d))

    def context_attention(self, ctx: Tensor, ctx_rope: Tensor, ctx_valid: Tensor | None
                          ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Context-only self-attention (``ctx_attends_target=False``): output and the context's (k, v)."""
        qc, kc, vc = self.qkv_heads(ctx, ctx_rope)
        cmask = None if ctx_valid is None else ctx_valid[:, None, None, :]
        return self.merge_heads(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=cmask)), (kc, vc)

    def forward(
        self,
        x: Tensor,  # (B, Nt, D) target tokens, normalized and modulated
        x_rope: Tensor,  # (B, Nt, Dh/2, 2)
        ctx: Tensor | None = None,  # (B, Nc, D) context tokens (joint mode)
        ctx_rope: Tensor | None = None,
        ctx_valid: Tensor | None = None,  # (B, Nc) bool or float logit bias (RefDiT.context), None = all valid
        # context (k, v) computed elsewhere (cached mode), or a KVJoin of them (joined without copying them again)
        ctx_kv: tuple[Tensor, Tensor] | KVJoin | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Target output, and the context output when ``ctx`` is given (joint mode)."""
        mask = None
        if ctx_valid is not None and (ctx is not None or ctx_kv is not None):
            mask = joint_mask(ctx_valid, x.shape[1])
        if ctx is not None:  # joint: one projection and one attention over target + context
            nt = x.shape[1]
            q, k, v = self.qkv_heads(torch.cat([x, ctx], 1), torch.cat([x_rope, ctx_rope], 1))
            o = self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
            return o[:, :nt], o[:, nt:]
        qx, kx, vx = self.qkv_heads(x, x_rope)
        if ctx_kv is None:
            return self.merge_heads(F.scaled_dot_product_attention(qx, kx, vx)), None
        if isinstance(ctx_kv, KVJoin):
            k, v = ctx_kv.join(kx, vx)
        else:
            k, v = torch.cat([kx, ctx_kv[0]], 2), torch.cat([vx, ctx_kv[1]], 2)
        return self.merge_heads(F.scaled_dot_product_attention(qx, k, v, attn_mask=mask)), None
