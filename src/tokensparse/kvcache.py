"""Reference K/V cache: context keys and values computed once per generation, reused every step.

In a model whose context (prompt + reference tokens) never attends to the target and is modulated at a
fixed time (RefDiT with ``ref_attends_target=False``, FLUX.2 [klein] KV), each layer's context K/V are
the same at every denoising step. :class:`ContextKV` holds them; the model computes it once
(``RefDiT.context_kv``) and each step then runs only the target tokens as queries. Stacked on Sparse
Context, fewer reference tokens are cached, so both the one-time pass and every step get cheaper.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class ContextKV:
    """Per-layer context keys/values ``(B, H, Nc, Dh)`` (RoPE applied), their mask as ``RefDiT.context`` gives it
    (``None``, bool valid, or a float log-size bias), the pooled prompt."""

    layers: list[tuple[Tensor, Tensor]]
    valid: Tensor | None
    pooled: Tensor

    @property
    def num_tokens(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0
