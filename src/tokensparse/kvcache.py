"""Reference K/V cache: context keys and values computed once per generation, reused every step.

In a model whose context (prompt + reference tokens) never attends to the target and is modulated at a
fixed time (RefDiT with ``ref_attends_target=False``, FLUX.2 [klein] KV), each layer's context K/V are
the same at every denoising step. :class:`ContextKV` holds them; the model computes it once
(``RefDiT.context_kv``) and each step then runs only the target tokens as queries. Stacked on Sparse
Context, fewer reference tokens are cached, so both the one-time pass and every step get cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


class KVJoin:
    """One layer's cached context ``(k, v)``, put behind a call's target K/V ``(kx, vx)``: ``join(kx, vx)`` gives
    the values of ``torch.cat([kx, k], 2), torch.cat([vx, v], 2)``, bit for bit.

    Without autograd the joined tensors are two buffers kept for the next call that holds as many target tokens:
    only the target's rows are written again (the context's rows, most of them with several references, were
    copied at every step and layer). The buffers are overwritten by that next call: use a join's result before
    joining again.
    """

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v
        self._joined: tuple[Tensor, Tensor] | None = None

    def join(self, kx: Tensor, vx: Tensor) -> tuple[Tensor, Tensor]:
        k, v, nt = self.k, self.v, kx.shape[2]
        # a buffer the next call can write into: no autograd graph, and the dtypes cat would not promote
        reusable = not torch.is_grad_enabled() and kx.dtype == k.dtype and vx.dtype == v.dtype
        joined = self._joined
        if (not reusable or joined is None or joined[0].shape[2] != nt + k.shape[2]
                or joined[0].shape[:2] != kx.shape[:2] or joined[0].device != kx.device
                or joined[0].is_inference() != torch.is_inference_mode_enabled()):
            joined = torch.cat([kx, k], 2), torch.cat([vx, v], 2)
            self._joined = joined if reusable else None
            return joined
        joined[0][:, :, :nt].copy_(kx)
        joined[1][:, :, :nt].copy_(vx)
        return joined


@dataclass
class ContextKV:
    """Per-layer context keys/values ``(B, H, Nc, Dh)`` (RoPE applied), their mask as ``RefDiT.context`` gives it
    (``None``, bool valid, or a float log-size bias), the pooled prompt."""

    layers: list[tuple[Tensor, Tensor]]
    valid: Tensor | None
    pooled: Tensor
    _joins: list[KVJoin] = field(default_factory=list, init=False, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0

    def joins(self) -> list[KVJoin]:
        """A :class:`KVJoin` per layer, kept with the cache (its buffers serve every step of a generation); made
        again for layers whose tensors were replaced."""
        joins = self._joins
        if len(joins) != len(self.layers) or any(j.k is not k or j.v is not v for j, (k, v) in zip(joins, self.layers)):
            self._joins = joins = [joins[i] if i < len(joins) and joins[i].k is k and joins[i].v is v else KVJoin(k, v)
                                   for i, (k, v) in enumerate(self.layers)]
        return joins


@dataclass
class PreparedContext:
    """What a RefDiT computes from its references and prompt before its blocks, computed once for many calls
    (``RefDiT.prepare_context``, passed as ``forward``'s ``context=``; ``tokensparse.generate`` does so once per
    generation): the context tokens ``(B, Nc, D)``, their RoPE table ``(B, Nc, Dh/2, 2)``, their mask as
    ``RefDiT.context`` gives it, the pooled prompt, and in separate mode (``ref_attends_target=False``) the context's
    conditioning at its fixed time 0 (``None`` in joint mode, where it is the step's own)."""

    tokens: Tensor
    rope: Tensor
    valid: Tensor | None
    pooled: Tensor
    c_ctx: Tensor | None
