"""RefDiT: a small in-context reference-conditioned diffusion transformer, written for readers.

One attention sequence holds three kinds of tokens, as in FLUX.1 Kontext / FLUX.2 [klein]:

    target    the noisy image being denoised, patchified        ids (0, row, col)
    prompt    word embeddings (plus one always-valid BOS token)  ids (0, 0, 0), learned positions
    refs      each reference image, patchified                   ids (i, row, col), i = 1..R

Prompt and reference tokens together are the *context*. Every block modulates tokens with adaLN-zero
from a conditioning vector ``c = time_embed(t) + text_pool(prompt)``. Position is given by a 3-axis
RoPE over the ids, so a *sparse* reference (a subset of its tokens with their original ids) is still
placed correctly: Sparse Context needs nothing from the model but fewer reference tokens (and, with
``proportional=True``, their ``TokenSeq.sizes``, which :meth:`RefDiT.context` turns into logit biases).

``ref_attends_target=False`` makes the context causal-free of the target: context tokens attend only to
context tokens and are modulated at the fixed time ``t = 0``, so their keys and values are the same at
every denoising step and can be computed once (the K/V cache; FLUX.2 [klein] KV does the same).

Hook points for other methods (no class swaps): ``RefDiT.ref_embedder`` (output: the reference
:class:`~tokensparse.tokens.TokenSeq`; Sparse Context subsets it), ``RefDiTBlock.attn`` (first argument:
target tokens) and ``RefDiTBlock.mlp`` (called with ``role="target"`` / ``role="context"``); token
merging hooks these. A forward with several routing rates (``routes=``, Sparse Guidance) runs the blocks
after the shared ones once per rate, so hooks must not assume one call per block and forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import checks
from ..kvcache import ContextKV, KVJoin, PreparedContext
from ..tokens import TokenSeq, gather, grid_ids, subset
from .config import RefDiTConfig  # noqa: F401  (re-exported: importable from here as before)
from .embedders import PromptEmbedder, RefEmbedder, TextBlock  # noqa: F401  (re-exported, as before)
from .layers import (  # noqa: F401  (the building blocks, re-exported: importable from here as before)
    JointAttention,
    Mlp,
    apply_rope,
    gated_add,
    gelu_tanh,
    modulate,
    patchify,
    rope_angles,
    route_index,
    timestep_embedding,
    unpatchify,
)


def _check_float_input(name: str, tensor: Tensor) -> None:
    """Raise ``TypeError`` naming ``name`` unless it is float32, or half precision under ``torch.autocast``
    (float64 and integer inputs would fail deep inside the first linear layer)."""
    if tensor.dtype == torch.float32:
        return
    if tensor.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(tensor.device.type):
        return
    raise TypeError(f"{name} must be a float32 tensor (float16 / bfloat16 only under torch.autocast), got "
                    f"{tensor.dtype}: pass it as .float()")


def _check_ref_keep(ref_keep: object) -> None:
    """``TypeError`` unless ``ref_keep`` is ``None`` or a tensor (a ``(B, N)`` keep mask)."""
    if ref_keep is not None and not isinstance(ref_keep, Tensor):
        raise TypeError(f"ref_keep must be a (B, N) bool tensor or None, got {type(ref_keep).__name__}")


# --------------------------------------------------------------------------------------------------
# Block
# --------------------------------------------------------------------------------------------------


class RefDiTBlock(nn.Module):
    """adaLN-zero transformer block over target and context streams (shared weights).

    Joint mode (``ref_attends_target=True``): one attention over target + context. Separate mode: the
    context stream runs first on its own (:meth:`context_step`), and the target attends to its K/V —
    which is what makes those K/V cacheable.
    """

    def __init__(self, cfg: RefDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.joint = cfg.ref_attends_target
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))  # zero-initialised in RefDiT.__init__

    def context_step(self, ctx: Tensor, ctx_rope: Tensor, ctx_valid: Tensor | None, c_ctx: Tensor
                     ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Advance the context stream one block on its own; returns it and this block's context (k, v)."""
        sa, ca, ga, sm, cm, gm = self.ada(c_ctx)[:, None].chunk(6, dim=-1)
        ac, kv = self.attn.context_attention(modulate(self.norm1(ctx), sa, ca), ctx_rope, ctx_valid)
        ctx = gated_add(ctx, ga, ac)
        ctx = gated_add(ctx, gm, self.mlp(modulate(self.norm2(ctx), sm, cm), role="context"))
        return ctx, kv

    def forward(
        self, x: Tensor, x_rope: Tensor, c: Tensor, ctx: Tensor | None, ctx_rope: Tensor | None,
        ctx_valid: Tensor | None, c_ctx: Tensor | None, ctx_kv: tuple[Tensor, Tensor] | KVJoin | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        mod = self.ada(c)[:, None]
        sa, ca, ga, sm, cm, gm = mod.chunk(6, dim=-1)  # each (B, 1, D)
        h = modulate(self.norm1(x), sa, ca)
        if self.joint and ctx is not None:  # the model passes c itself as c_ctx in joint mode: computed once
            sa_c, ca_c, ga_c, sm_c, cm_c, gm_c = (mod if c_ctx is c else self.ada(c_ctx)[:, None]).chunk(6, dim=-1)
            ax, ac = self.attn(h, x_rope, modulate(self.norm1(ctx), sa_c, ca_c), ctx_rope, ctx_valid)
            ctx = gated_add(ctx, ga_c, ac)
            ctx = gated_add(ctx, gm_c, self.mlp(modulate(self.norm2(ctx), sm_c, cm_c), role="context"))
        else:
            if ctx is not None and ctx_kv is None:
                ctx, ctx_kv = self.context_step(ctx, ctx_rope, ctx_valid, c_ctx)
            ax, _ = self.attn(h, x_rope, None, None, ctx_valid, ctx_kv=ctx_kv)
        x = gated_add(x, ga, ax)
        x = gated_add(x, gm, self.mlp(modulate(self.norm2(x), sm, cm), role="target"))
        return x, ctx


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


class RefDiT(nn.Module):
    """Reference-conditioned DiT predicting the rectified-flow velocity of the target image."""

    def __init__(self, cfg: RefDiTConfig) -> None:
        if not isinstance(cfg, RefDiTConfig):
            raise TypeError(f"RefDiT takes a RefDiTConfig (for a named model: ts.build_model / ts.load_model), "
                            f"got {type(cfg).__name__}")
        super().__init__()
        self.config = cfg
        d = cfg.dim
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.ref_embedder = RefEmbedder(cfg, self.patch_embed)
        self.prompt_embedder = PromptEmbedder(cfg)
        self.time_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList([RefDiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, cfg.patch_dim)
        self.register_buffer("target_ids", grid_ids(0, cfg.grid, cfg.grid), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.prompt_embedder.words.weight, std=0.02)
        nn.init.normal_(self.ref_embedder.index_embed.weight, std=0.02)
        for blk in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for m in (self.final_ada[-1], self.final, *[x for blk in self.prompt_embedder.blocks
                                                    for x in (blk.attn.proj, blk.mlp.fc2)]):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def target_rope(self) -> Tensor:
        """The target's RoPE ``(Nt, Dh/2, 2)``, float32: it never changes, so it is computed once per device
        (not a buffer: ``model.half().float()`` would round it). Computed outside ``torch.inference_mode``: an
        inference tensor kept here would break every later training step (autograd cannot save it)."""
        rope = self.__dict__.get("_target_rope")
        if rope is None or rope.device != self.target_ids.device:
            with torch.inference_mode(False):
                rope = rope_angles(self.target_ids, self.config.rope_axes, self.config.rope_theta)
            self.__dict__["_target_rope"] = rope
        return rope

    # -- inputs -------------------------------------------------------------------------------------

    def check_references(self, refs: list[Tensor], batch: int) -> None:
        """Raise ``TypeError`` / ``ValueError`` naming the problem if ``refs`` cannot condition this model."""
        cfg = self.config
        if len(refs) > cfg.max_refs:
            raise ValueError(f"{len(refs)} references given; this model supports at most {cfg.max_refs}")
        for i, r in enumerate(refs):
            if not isinstance(r, Tensor):
                raise TypeError(f"reference {i} must be a Tensor, got {type(r).__name__}")
            if r.dim() != 4 or r.shape[1] != cfg.channels:
                raise ValueError(f"reference {i} has shape {tuple(r.shape)}; expected (B, {cfg.channels}, H, W)")
            if r.shape[-2:] != (cfg.image_size, cfg.image_size):
                raise ValueError(
                    f"reference {i} is {r.shape[-2]}x{r.shape[-1]}; this model takes "
                    f"{cfg.image_size}x{cfg.image_size} images"
                )
            if r.shape[0] != batch:
                raise ValueError(f"reference {i} has batch {r.shape[0]}; the target has batch {batch}")
            _check_float_input(f"reference {i}", r)

    def embed_references(self, refs: list[Tensor] | TokenSeq | None, batch: int,
                         prompt_ids: Tensor | None = None) -> TokenSeq | None:
        """Images ``[(B, C, H, W)] in [-1, 1]`` (C: ``config.channels``) -> reference tokens (through
        ``ref_embedder``'s hooks, which are given ``prompt_ids``: prompt-aware selection reads it; ``None`` = no
        prompt)."""
        if isinstance(refs, TokenSeq):
            if refs.tokens.dim() != 3 or refs.tokens.shape[0] != batch or refs.tokens.shape[2] != self.config.dim:
                raise ValueError(f"reference tokens must be (B, N, D) with B = {batch} and D = {self.config.dim}, "
                                 f"got {tuple(refs.tokens.shape)}")
            return refs
        if refs is None:
            return None
        if not isinstance(refs, (list, tuple)):
            raise TypeError(f"refs must be a list of (B, C, H, W) tensors or a TokenSeq, got {type(refs).__name__}")
        if len(refs) == 0:
            return None
        self.check_references(list(refs), batch)
        return self.ref_embedder(list(refs), prompt_ids=prompt_ids)

    def context(self, refs: TokenSeq | None, prompt_ids: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Context tokens ``(B, Nc, D)``, their ids, valid mask and pooled prompt.

        The mask is ``None`` (all valid), ``(B, Nc)`` bool, or -- when the references carry ``sizes``
        (proportional Sparse Context) -- a float ``(B, Nc)`` added to the attention logits: ``log(size)`` for
        reference tokens, 0 for prompt tokens, ``-inf`` for padding.
        """
        txt, txt_valid, pooled = self.prompt_embedder(prompt_ids)
        b = txt.shape[0]
        txt_ids = torch.zeros(b, txt.shape[1], 3, dtype=torch.long, device=txt.device)
        if refs is None:
            return txt, txt_ids, (None if bool(txt_valid.all()) else txt_valid), pooled
        ref_valid = refs.valid if refs.valid is not None else torch.ones(refs.tokens.shape[:2], dtype=torch.bool,
                                                                          device=txt.device)
        valid = torch.cat([txt_valid, ref_valid.to(txt.device)], 1)
        ctx = torch.cat([txt, refs.tokens], 1)
        ids = torch.cat([txt_ids, refs.ids.to(txt.device)], 1)
        if refs.sizes is not None:
            log_size = torch.cat([torch.zeros_like(txt_valid, dtype=torch.float32), refs.sizes.to(txt.device).log()], 1)
            return ctx, ids, log_size.masked_fill(~valid, float("-inf")), pooled
        return ctx, ids, (None if bool(valid.all()) else valid), pooled

    # -- forward ------------------------------------------------------------------------------------

    def check_call(self, x: Tensor, t: Tensor | float, prompt_ids: Tensor) -> Tensor:
        """Raise ``TypeError`` / ``ValueError`` naming a bad ``x``, ``t`` or ``prompt_ids``; returns ``t`` as
        ``(B,)``."""
        cfg = self.config
        want = (cfg.channels, cfg.image_size, cfg.image_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != want:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a (B, {want[0]}, {want[1]}, {want[2]}) tensor, got {got}")
        if self.patch_embed.weight.dtype != torch.float32:
            raise TypeError(f"RefDiT computes in float32 and its weights are {self.patch_embed.weight.dtype}: call "
                            "model.float() first (for reduced precision, run it under torch.autocast)")
        _check_float_input("x", x)
        b = x.shape[0]
        self.check_prompt_ids(prompt_ids, b)
        if not isinstance(t, Tensor):
            t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() != 1 or t.shape[0] != b:
            raise ValueError(f"t must be one time or a ({b},) tensor, got shape {tuple(t.shape)}")
        if t.is_complex() or not bool(((t >= 0) & (t <= 1)).all()):  # NaN fails both comparisons
            raise ValueError(f"t must be in [0, 1] (1 = noise), got {t.tolist() if t.numel() <= 8 else t}")
        return t

    def check_prompt_ids(self, prompt_ids: Tensor, batch: int | None = None) -> None:
        """Raise ``TypeError`` / ``ValueError`` unless ``prompt_ids`` are ``(B, L)`` word ids (``B = batch`` if
        given) that this model's vocabulary and prompt length hold."""
        cfg = self.config
        if not isinstance(prompt_ids, Tensor):
            raise TypeError("prompt_ids must be a (B, L) tensor (tokensparse.vocab.tokenize), got "
                            f"{type(prompt_ids).__name__}")
        if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
            raise TypeError(f"prompt_ids must hold integer word ids (tokensparse.vocab.tokenize), got "
                            f"{prompt_ids.dtype}")
        if (prompt_ids.dim() != 2 or (batch is not None and prompt_ids.shape[0] != batch)
                or prompt_ids.shape[1] > cfg.max_prompt_len):
            want = "B" if batch is None else f"B = {batch}"
            raise ValueError(f"prompt_ids must be (B, L) with {want} and L <= {cfg.max_prompt_len}, got "
                             f"{tuple(prompt_ids.shape)}")
        if prompt_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(prompt_ids))  # one pass (every model call)
            if not 0 <= lo <= hi < cfg.vocab_size:
                raise ValueError(f"prompt_ids must be word ids in [0, {cfg.vocab_size}), got [{lo}, {hi}]")

    def require_cacheable_context(self, what: str) -> None:
        """Raise ``ValueError`` naming ``what`` unless the context's K/V are the same at every step."""
        if self.config.ref_attends_target:
            raise ValueError(f"{what} needs a model built with ref_attends_target=False (e.g. 'refdit-sparse' or "
                             "'refdit-s-kv'): here the references attend to the target, so their K/V change every "
                             "step")

    def check_context_kv(self, context_kv: ContextKV, batch: int) -> None:
        """Raise ``TypeError`` / ``ValueError`` unless ``context_kv`` is this model's cache for ``batch`` samples."""
        if not isinstance(context_kv, ContextKV):
            raise TypeError(f"context_kv must be a ContextKV from model.context_kv(...), got "
                            f"{type(context_kv).__name__}")
        self.require_cacheable_context("context_kv")
        if len(context_kv.layers) != len(self.blocks):
            raise ValueError(f"context_kv holds {len(context_kv.layers)} layers, this model has {len(self.blocks)}")
        if context_kv.pooled.shape[0] != batch:
            raise ValueError(f"context_kv was computed for a batch of {context_kv.pooled.shape[0]}, x has {batch}")
        cfg = self.config
        want = (batch, cfg.heads, cfg.dim // cfg.heads)
        for i, (k, v) in enumerate(context_kv.layers):
            if k.dim() != 4 or k.shape != v.shape or (k.shape[0], k.shape[1], k.shape[3]) != want:
                raise ValueError(f"context_kv layer {i} holds keys {tuple(k.shape)} and values {tuple(v.shape)}; this "
                                 f"model needs (B, heads, N, head_dim) = ({want[0]}, {want[1]}, N, {want[2]}): a cache "
                                 "from another model?")

    def route_bounds(self, route: float) -> tuple[int, int]:
        """The block span routed tokens skip, or ``(-1, -1)`` when nothing is routed."""
        route = checks.real("route", route, 0.0, 1.0, hi_open=True)
        if route == 0.0:
            return -1, -1
        if self.config.route_span is None:
            raise ValueError("this model has no route_span; build it with route_span=(start, end) to route tokens")
        return self.config.route_span

    def context_time(self, t: Tensor, pooled: Tensor) -> Tensor:
        """Conditioning of context tokens: the current time (joint mode) or the fixed time 0."""
        tc = t if self.config.ref_attends_target else torch.zeros_like(t)
        return self.time_embed(timestep_embedding(tc, 256)) + pooled

    def prepare_context(self, refs: list[Tensor] | TokenSeq | None, prompt_ids: Tensor,
                        ref_keep: Tensor | None = None) -> PreparedContext:
        """The context the blocks start from, for :meth:`forward`'s ``context=``: what every call with these ``refs``,
        ``prompt_ids`` and ``ref_keep`` computes before its blocks (references embedded through ``ref_embedder``'s
        hooks, the prompt encoded, their RoPE table and mask; in separate mode their conditioning at ``t = 0``)."""
        self.check_prompt_ids(prompt_ids)
        _check_ref_keep(ref_keep)
        return self._prepare_context(refs, prompt_ids, ref_keep)

    def _prepare_context(self, refs: list[Tensor] | TokenSeq | None, prompt_ids: Tensor, ref_keep: Tensor | None
                         ) -> PreparedContext:
        """:meth:`prepare_context` of a checked ``prompt_ids`` and ``ref_keep``."""
        b = prompt_ids.shape[0]
        refs_seq = self.embed_references(refs, b, prompt_ids)
        if ref_keep is not None and refs_seq is not None:
            if (isinstance(refs, (list, tuple)) and self.ref_embedder._forward_hooks
                    and ref_keep.shape[-1] != refs_seq.tokens.shape[1]):
                raise ValueError(
                    f"ref_keep masks the {ref_keep.shape[-1]} dense reference tokens, but a hook on ref_embedder "
                    f"(Sparse Context) already kept {refs_seq.tokens.shape[1]}: remove it first "
                    "(ts.remove_sparse_context(model)) to drop tokens with ref_keep")
            refs_seq = subset(refs_seq, ref_keep)
        ctx, ctx_ids, ctx_valid, pooled = self.context(refs_seq, prompt_ids)
        rope = rope_angles(ctx_ids, self.config.rope_axes, self.config.rope_theta)
        c_ctx = None if self.config.ref_attends_target else self.context_time(
            torch.zeros(b, device=prompt_ids.device), pooled)
        return PreparedContext(ctx, rope, ctx_valid, pooled, c_ctx)

    def check_prepared_context(self, context: PreparedContext, batch: int) -> None:
        """Raise ``TypeError`` / ``ValueError`` unless ``context`` is a :class:`PreparedContext` of this model's kind
        for ``batch`` samples."""
        if not isinstance(context, PreparedContext):
            raise TypeError(f"context must be a PreparedContext from model.prepare_context(...), got "
                            f"{type(context).__name__}")
        tokens, cfg = context.tokens, self.config
        if tokens.dim() != 3 or tokens.shape[0] != batch or tokens.shape[2] != cfg.dim:
            raise ValueError(f"context holds tokens {tuple(tokens.shape)}; this call needs (B, N, D) with B = {batch} "
                             f"and D = {cfg.dim}")
        if (context.c_ctx is None) != cfg.ref_attends_target:
            raise ValueError("context was prepared by a model of the other attention mode (ref_attends_target "
                             f"{not cfg.ref_attends_target}); prepare it with this model")

    @torch.no_grad()
    def context_kv(self, refs: list[Tensor] | TokenSeq | None, prompt_ids: Tensor) -> ContextKV:
        """Run the context stream once and return every block's context K/V (``ref_attends_target=False``)."""
        self.require_cacheable_context("context_kv")
        prep = self.prepare_context(refs, prompt_ids)
        ctx, layers = prep.tokens, []
        for blk in self.blocks:
            ctx, kv = blk.context_step(ctx, prep.rope, prep.valid, prep.c_ctx)
            layers.append(kv)
        return ContextKV(layers, prep.valid, prep.pooled)

    def forward(
        self, x: Tensor, t: Tensor, refs: list[Tensor] | TokenSeq | None, prompt_ids: Tensor,
        ref_keep: Tensor | None = None, context_kv: ContextKV | None = None,
        route: float = 0.0, route_generator: torch.Generator | None = None,
        routes: tuple[float, ...] | None = None, context: PreparedContext | None = None,
    ) -> Tensor | tuple[Tensor, ...]:
        """Velocity ``(B, C, H, W)`` for noisy target ``x (B, C, H, W)`` (C: ``config.channels``) at time ``t (B,)``
        or one time for the batch (a float or 0-d tensor; 1 = noise).

        refs: reference images in [-1, 1] (a list, possibly empty) or pre-embedded reference tokens.
        prompt_ids: ``(B, L)`` word ids from :func:`tokensparse.vocab.tokenize` (all zeros = no prompt).
        ref_keep: optional ``(B, N)`` keep mask over the dense reference tokens (training-time dropping).
        context_kv: cached context K/V from :meth:`context_kv`; exact. It holds the whole context, so ``refs``,
            ``ref_keep`` and the content of ``prompt_ids`` are then not read (the cache's prompt is used).
        context: the context from :meth:`prepare_context`, computed once for many calls (a generation's steps);
            exact. As with ``context_kv``, ``refs``, ``ref_keep`` and the content of ``prompt_ids`` are then not read.
        route: fraction of target tokens that skip ``config.route_span`` (TREAD routing), drawn with
            ``route_generator``; they re-enter unchanged after the span.
        routes: several routing rates at once (Sparse Guidance's branches): the blocks before the first
            routed block are computed once and shared, and a tuple of one output per rate is returned,
            equal to separate calls in this order when no stateful hooks are applied (token merging
            draws per call, so with it the shared blocks merge once instead of once per rate, and later
            blocks whose token count is the same in every branch reuse the first branch's matching).
        """
        cfg = self.config
        t = self.check_call(x, t, prompt_ids)
        b = x.shape[0]
        _check_ref_keep(ref_keep)
        if context is not None and context_kv is not None:
            raise ValueError("give either context or context_kv, not both")
        if context_kv is None:
            if context is None:
                context = self._prepare_context(refs, prompt_ids, ref_keep)  # both checked above
            else:
                self.check_prepared_context(context, b)
            ctx, ctx_rope, ctx_valid, pooled = context.tokens, context.rope, context.valid, context.pooled
            kvs: list = [None] * len(self.blocks)
        else:
            self.check_context_kv(context_kv, b)
            ctx = ctx_rope = None
            ctx_valid, pooled, kvs = context_kv.valid, context_kv.pooled, context_kv.joins()
        c = self.time_embed(timestep_embedding(t, 256)) + pooled  # (B, D)
        # context conditioning: c itself in joint mode, at the fixed time 0 in separate mode (computed with the
        # context); unused when the context K/V come from the cache
        c_ctx = c if cfg.ref_attends_target else None if context_kv is not None else context.c_ctx

        h = self.patch_embed(patchify(x, cfg.patch_size)).reshape(b, cfg.grid * cfg.grid, -1)  # (B, Nt, D)
        h = h + self.ref_embedder.index_embed.weight[0]
        x_rope = self.target_rope.expand(b, -1, -1, -1)
        if routes is not None and route != 0.0:
            raise ValueError("give either route or routes, not both")
        if routes is not None and not isinstance(routes, (tuple, list)):
            raise TypeError(f"routes must be a tuple of routing rates, got {type(routes).__name__}")
        rates = (route,) if routes is None else tuple(routes)
        if not rates:
            raise ValueError("routes must name at least one routing rate")
        spans = [self.route_bounds(r) for r in rates]
        shared = min([s for s, _ in spans if s >= 0], default=len(self.blocks))

        def run(h: Tensor, ctx: Tensor | None, blocks: range, span: tuple[int, int] = (-1, -1), rate: float = 0.0
                ) -> tuple[Tensor, Tensor | None]:
            rope = x_rope
            for i in blocks:
                if i == span[0]:  # TREAD: a random subset of target tokens goes through the span
                    h_full, rope_full = h, rope
                    idx = route_index(b, h.shape[1], rate, route_generator, h.device)
                    h, rope = gather(h, idx), gather(rope, idx)
                h, ctx = self.blocks[i](h, rope, c, ctx, ctx_rope, ctx_valid, c_ctx, ctx_kv=kvs[i])
                if i == span[1] - 1:  # routed tokens re-enter unchanged
                    h = h_full.scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), h)
                    rope = rope_full
            return h, ctx

        h, ctx = run(h, ctx, range(shared))  # blocks no branch routes: identical for every rate, computed once
        outs = tuple(self._velocity(run(h, ctx, range(shared, len(self.blocks)), span, rate)[0], c)
                     for rate, span in zip(rates, spans))
        return outs[0] if routes is None else outs

    def _velocity(self, h: Tensor, c: Tensor) -> Tensor:
        """Final adaLN + projection of target tokens ``(B, Nt, D)`` -> velocity image."""
        cfg = self.config
        shift, scale = self.final_ada(c)[:, None].chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), shift, scale))  # (B, Nt, p*p*C)
        return unpatchify(out, cfg.patch_size, cfg.grid, cfg.grid, cfg.channels)
