"""The one-call public API: apply / remove methods on a RefDiT or a diffusers pipeline or transformer."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .context import SparseContextConfig, sparsify
from .generation import compile_hint, reset_if_compiled
from .models.layers import gated_add, joint_mask, modulate, patchify, rope_angles, timestep_embedding
from .models.refdit import RefDiT
from .selection import RefView, needs_probe
from .tokens import TokenSeq, ref_slices
from .vocab import detokenize

_SPARSE_HANDLE = "_tokensparse_sparse_context"
PROBE_T = 1.0  # the attention probe sees the first denoising step: pure noise at t = 1
PROBE_BLOCKS = 2  # ... through the first blocks only (a fraction of one step's cost)
PROBE_SEED = 0


def _refdit_of(target: Any) -> RefDiT | None:
    return target if isinstance(target, RefDiT) else None


def _is_diffusers(target: Any) -> bool:
    try:
        from .integrations.diffusers import is_diffusers_target
    except ImportError:
        return False
    return is_diffusers_target(target)


def _unsupported(target: Any, method: str) -> TypeError:
    from .integrations.diffusers_models import PIPELINES

    return TypeError(
        f"{method} expected a tokensparse RefDiT, a diffusers pipeline ({', '.join(PIPELINES)}) or its "
        f"transformer; got {type(target).__name__}"
        f"{compile_hint(target, lambda m: _refdit_of(m) is not None or _is_diffusers(m))}"
    )


def reference_views(images: list[torch.Tensor], patch_size: int, prompts: list[str] | None = None
                    ) -> list[RefView]:
    """Scorer views of RefDiT reference images in ``[-1, 1]``: patch pixels as features, image in [0, 1]."""
    views = []
    for i, img in enumerate(images):
        img01 = (img.detach().float() + 1) / 2
        views.append(RefView(features=patchify(img01, patch_size), image=img01, index=i, prompts=prompts))
    return views


@torch.no_grad()
def attention_probe(model: RefDiT, refs: TokenSeq, prompt_ids: Tensor, blocks: int = PROBE_BLOCKS) -> Tensor:
    """Attention mass ``(B, N)`` the target's queries pay each (dense) reference token, in one probe pass.

    The probe runs the model's first ``blocks`` blocks on seeded pure noise at ``t = PROBE_T`` and averages
    the softmax weights from target queries to reference keys over heads, queries and blocks. It calls
    the blocks' sub-layers directly (not through their hooks), so other methods' per-step state is untouched.
    """
    cfg = model.config
    b, dev = refs.tokens.shape[0], refs.tokens.device
    g = torch.Generator().manual_seed(PROBE_SEED)
    # float32 whatever torch.get_default_dtype() says: the model computes in float32
    x = torch.randn(1, cfg.channels, cfg.image_size, cfg.image_size, generator=g, dtype=torch.float32)
    x = x.to(dev).expand(b, -1, -1, -1)
    t = torch.full((b,), PROBE_T, dtype=torch.float32, device=dev)
    ctx, ctx_ids, ctx_valid, pooled = model.context(refs, prompt_ids.to(dev))
    n_ref = refs.tokens.shape[1]
    ctx_rope = rope_angles(ctx_ids, cfg.rope_axes, cfg.rope_theta)
    c = model.time_embed(timestep_embedding(t, 256)) + pooled
    c_ctx = model.context_time(t, pooled)
    h = model.patch_embed(patchify(x, cfg.patch_size)).reshape(b, cfg.grid * cfg.grid, -1)
    h = h + model.ref_embedder.index_embed.weight[0]
    x_rope = model.target_rope.expand(b, -1, -1, -1)
    nt = h.shape[1]
    mass = torch.zeros(b, n_ref, dtype=torch.float32, device=dev)
    used = model.blocks[: max(1, min(blocks, len(model.blocks)))]
    for i, blk in enumerate(used):
        att = blk.attn
        sa, ca, ga, sm, cm, gm = blk.ada(c)[:, None].chunk(6, dim=-1)
        sa_c, ca_c, ga_c, sm_c, cm_c, gm_c = blk.ada(c_ctx)[:, None].chunk(6, dim=-1)
        qx, kx, vx = att.qkv_heads(modulate(blk.norm1(h), sa, ca), x_rope)
        qc, kc, vc = att.qkv_heads(modulate(blk.norm1(ctx), sa_c, ca_c), ctx_rope)
        k, v = torch.cat([kx, kc], 2), torch.cat([vx, vc], 2)
        logits = qx @ k.transpose(-1, -2) / math.sqrt(att.head_dim)  # (B, H, Nt, Nt + Nc)
        mask = None if ctx_valid is None else joint_mask(ctx_valid, nt)  # bool, or a float logit bias (sizes)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        mass += logits.softmax(-1)[..., -n_ref:].mean((1, 2)) / len(used)
        if i + 1 == len(used):
            break
        cmask = None if ctx_valid is None else ctx_valid[:, None, None, :]
        if blk.joint:  # one attention over target + context
            o = F.scaled_dot_product_attention(torch.cat([qx, qc], 2), k, v, attn_mask=mask)
            ax, ac = att.merge_heads(o[:, :, :nt]), att.merge_heads(o[:, :, nt:])
        else:  # context attends to context only; the target to both
            ax = att.merge_heads(F.scaled_dot_product_attention(qx, k, v, attn_mask=mask))
            ac = att.merge_heads(F.scaled_dot_product_attention(qc, kc, vc, attn_mask=cmask))
        h = gated_add(h, ga, ax)
        h = gated_add(h, gm, blk.mlp.forward(modulate(blk.norm2(h), sm, cm), role="target"))
        ctx = gated_add(ctx, ga_c, ac)
        ctx = gated_add(ctx, gm_c, blk.mlp.forward(modulate(blk.norm2(ctx), sm_c, cm_c), role="context"))
    return mass


def _probe_views(model: RefDiT, refs: TokenSeq, views: list[RefView], prompt_ids: Tensor) -> None:
    """Fill each view's ``attention`` ``(B, h, w)`` from one probe pass."""
    mass = attention_probe(model, refs, prompt_ids)
    for view, sl in zip(views, ref_slices(refs.grids)):
        view.attention = mass[:, sl].reshape(view.batch, *view.grid)


def _sparsify_hook(model: RefDiT, cfg: SparseContextConfig, patch: int, probe: bool, module: torch.nn.Module,
                   args: tuple, kwargs: dict, output: TokenSeq) -> TokenSeq:
    """``model.ref_embedder``'s forward hook: keep the reference tokens ``cfg`` selects."""
    if cfg.is_identity:
        return output
    prompt_ids = kwargs.get("prompt_ids", args[1] if len(args) > 1 else None)  # RefDiT passes its prompt
    if prompt_ids is None:  # no prompt known: the null prompt
        prompt_ids = torch.zeros(output.tokens.shape[0], 1, dtype=torch.long, device=output.tokens.device)
    views = reference_views(args[0], patch, detokenize(prompt_ids.cpu()))
    if probe:
        _probe_views(model, output, views, prompt_ids)
    return sparsify(output, views, cfg)


def apply_sparse_context(target: Any, cfg: SparseContextConfig) -> Any:
    """Make ``target`` see only the reference tokens ``cfg`` keeps (with their original position ids).

    ``target``: a RefDiT, or a supported diffusers pipeline / transformer (needs ``tokensparse[diffusers]``).
    Calling it again replaces the earlier config; :func:`remove_sparse_context` restores exact behaviour.
    Returns ``target``. On a RefDiT, whose references all have ``config.grid ** 2`` tokens, a ``cfg.count`` of at
    least that many is a ``ValueError`` (it would drop nothing), as ``keep`` above 1 is.
    """
    if not isinstance(cfg, SparseContextConfig):
        raise TypeError(f"cfg must be a SparseContextConfig, got {type(cfg).__name__}")
    model = _refdit_of(target)
    if model is None:
        if _is_diffusers(target):
            from .integrations.diffusers import apply_sparse_context_diffusers

            return apply_sparse_context_diffusers(target, cfg)  # takes its own snapshot of cfg
        raise _unsupported(target, "apply_sparse_context")
    cfg = dataclasses.replace(cfg)  # a validated snapshot: later edits of the caller's object do not leak in
    if cfg.cache:
        model.require_cacheable_context("cache=True")
    n_ref = model.config.grid ** 2  # every RefDiT reference is one image_size x image_size grid
    if cfg.count is not None and cfg.count >= n_ref:
        way_out = (f"give a count below {n_ref}" if n_ref > 1 else
                   "with one token per reference no count drops any (every reference keeps at least one)")
        raise ValueError(f"count={cfg.count} keeps every one of this model's {n_ref} tokens per reference, so nothing "
                         f"would be dropped; {way_out}, or keep=1.0 for the exact dense model")
    removed = _unhook(model)

    # a partial, not a closure: copy.deepcopy of the model copies it with the model (the copy probes with
    # its own weights), and a patched model pickles
    hook = functools.partial(_sparsify_hook, model, cfg, model.config.patch_size, needs_probe(cfg.selector))
    handles = (model.ref_embedder.register_forward_hook(hook, with_kwargs=True),)
    model.__dict__[_SPARSE_HANDLE] = (handles, cfg)
    if not cfg.is_identity or removed:
        reset_if_compiled(model, "Sparse Context")
    return target


def remove_sparse_context(target: Any) -> Any:
    """Undo :func:`apply_sparse_context`; a no-op on a supported target it was never applied to (``TypeError`` for
    an unsupported one, as ``apply_sparse_context``). Returns ``target``."""
    model = _refdit_of(target)
    if model is None:
        if _is_diffusers(target):
            from .integrations.diffusers import remove_sparse_context_diffusers

            return remove_sparse_context_diffusers(target)
        raise _unsupported(target, "remove_sparse_context")
    if _unhook(model):
        reset_if_compiled(model, "Sparse Context")
    return target


def _unhook(model: RefDiT) -> bool:
    """Remove Sparse Context's hook from ``model``; whether one was there (and not the identity)."""
    entry = model.__dict__.pop(_SPARSE_HANDLE, None)
    if entry is None:
        return False
    for handle in entry[0]:
        handle.remove()
    return not entry[1].is_identity


def sparse_context_config(target: Any) -> SparseContextConfig | None:
    """A copy of the config applied to a RefDiT, or ``None`` (editing it changes nothing: apply the edited config
    with :func:`apply_sparse_context`)."""
    entry = target.__dict__.get(_SPARSE_HANDLE) if isinstance(target, RefDiT) else None
    return None if entry is None else dataclasses.replace(entry[1])  # the applied one is the hook's own
