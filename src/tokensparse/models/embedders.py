"""RefDiT's embedders: reference images -> reference tokens, word ids -> prompt tokens (with an optional small
text encoder). :mod:`.refdit` builds them into the model and re-exports them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..tokens import TokenSeq, dense_seq
from .layers import JointAttention, Mlp, patchify, rope_angles

if TYPE_CHECKING:
    from .config import RefDiTConfig


class RefEmbedder(nn.Module):
    """Reference images -> one dense :class:`TokenSeq` (ids ``(i, row, col)``, ``i`` from 1).

    Sparse Context hooks this module's output (scorers read the images the hook is given).
    """

    def __init__(self, cfg: RefDiTConfig, patch_embed: nn.Linear) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = patch_embed  # shared with the target
        self.index_embed = nn.Embedding(cfg.max_refs + 1, cfg.dim)  # 0 = target

    def forward(self, images: list[Tensor], prompt_ids: Tensor | None = None) -> TokenSeq:
        """``prompt_ids``: the prompt of the call, unused here; hooks (prompt-aware selection) read it."""
        grids = []
        for i, img in enumerate(images):
            tok = self.patch_embed(patchify(img, self.cfg.patch_size))  # (B, h, w, D)
            grids.append(tok + self.index_embed.weight[i + 1])
        return dense_seq(grids)


class TextBlock(nn.Module):
    """Pre-norm bidirectional transformer block over prompt tokens, 1-D RoPE over word positions.

    Its output projections start at zero, so a freshly built text encoder is the identity.
    """

    def __init__(self, cfg: RefDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = JointAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))

    def forward(self, x: Tensor, rope: Tensor, valid: Tensor | None) -> Tensor:
        x = x + self.attn.context_attention(self.norm1(x), rope, valid)[0]
        return x + self.mlp(self.norm2(x), role="prompt")


class PromptEmbedder(nn.Module):
    """Word ids ``(B, L)`` -> tokens ``(B, 1+L, D)`` (a BOS token first), valid mask, pooled vector.

    With ``cfg.text_depth > 0`` the embedded words pass through that many :class:`TextBlock` first (a small
    text encoder, as FLUX has T5: each word sees the others, so "top" can carry the ordinal before it).
    """

    def __init__(self, cfg: RefDiTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.dim // cfg.heads
        self.blocks = nn.ModuleList([TextBlock(cfg) for _ in range(cfg.text_depth)])
        self.words = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos = nn.Parameter(torch.zeros(1, cfg.max_prompt_len + 1, cfg.dim))
        self.bos = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pool = nn.Sequential(nn.Linear(cfg.dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        used = (ids != 0).any(0).nonzero()
        ids = ids[:, : int(used.max()) + 1 if used.numel() else 0]  # drop all-padding columns: exact, cheaper
        b, n = ids.shape
        tok = torch.cat([self.bos.expand(b, -1, -1), self.words(ids)], 1) + self.pos[:, : n + 1]
        valid = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=ids.device), ids != 0], 1)
        if len(self.blocks):
            pos = torch.arange(n + 1, device=ids.device)[None, :, None]
            rope = rope_angles(pos, (self.head_dim,), 10_000.0)
            mask = None if bool(valid.all()) else valid
            for blk in self.blocks:
                tok = blk(tok, rope, mask)
        pooled = (tok * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return tok, valid, self.pool(pooled)
