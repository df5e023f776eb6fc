"""The one-call public API: apply / remove methods on a RefDiT or a diffusers pipeline or transformer."""

from __future__ import annotations

from typing import Any

import torch

from .context import SparseContextConfig, sparsify
from .models.refdit import RefDiT, patchify
from .selection import RefView
from .tokens import TokenSeq

_SPARSE_HANDLE = "_tokensparse_sparse_context"


def _refdit_of(target: Any) -> RefDiT | None:
    return target if isinstance(target, RefDiT) else None


def _is_diffusers(target: Any) -> bool:
    try:
        from .integrations.diffusers import is_diffusers_target
    except ImportError:
        return False
    return is_diffusers_target(target)


def _unsupported(target: Any, method: str) -> TypeError:
    return TypeError(
        f"{method} expected a tokensparse RefDiT, a diffusers pipeline (Flux2KleinPipeline, Flux2Pipeline, "
        f"FluxKontextPipeline, QwenImageEditPlusPipeline) or its transformer; got {type(target).__name__}"
    )


def reference_views(images: list[torch.Tensor], patch_size: int) -> list[RefView]:
    """Scorer views of RefDiT reference images in ``[-1, 1]``: patch pixels as features, image in [0, 1]."""
    views = []
    for i, img in enumerate(images):
        img01 = (img.detach().float() + 1) / 2
        views.append(RefView(features=patchify(img01, patch_size), image=img01, index=i))
    return views


def apply_sparse_context(target: Any, cfg: SparseContextConfig) -> Any:
    """Make ``target`` see only the reference tokens ``cfg`` keeps (with their original position ids).

    ``target``: a RefDiT, or a supported diffusers pipeline / transformer (needs ``tokensparse[diffusers]``).
    Calling it again replaces the earlier config; :func:`remove_sparse_context` restores exact behaviour.
    Returns ``target``.
    """
    if not isinstance(cfg, SparseContextConfig):
        raise TypeError(f"cfg must be a SparseContextConfig, got {type(cfg).__name__}")
    model = _refdit_of(target)
    if model is None:
        if _is_diffusers(target):
            from .integrations.diffusers import apply_sparse_context_diffusers

            return apply_sparse_context_diffusers(target, cfg)
        raise _unsupported(target, "apply_sparse_context")
    if cfg.cache and model.config.ref_attends_target:
        raise ValueError("cache=True needs a model built with ref_attends_target=False (e.g. 'refdit-s-kv')")
    remove_sparse_context(model)
    patch = model.config.patch_size

    def hook(module: torch.nn.Module, args: tuple, output: TokenSeq) -> TokenSeq:
        return sparsify(output, reference_views(args[0], patch), cfg)

    handle = model.ref_embedder.register_forward_hook(hook)
    model.__dict__[_SPARSE_HANDLE] = (handle, cfg)
    return target


def remove_sparse_context(target: Any) -> Any:
    """Undo :func:`apply_sparse_context`; a no-op if it was never applied. Returns ``target``."""
    model = _refdit_of(target)
    if model is None:
        if _is_diffusers(target):
            from .integrations.diffusers import remove_sparse_context_diffusers

            return remove_sparse_context_diffusers(target)
        raise _unsupported(target, "remove_sparse_context")
    entry = model.__dict__.pop(_SPARSE_HANDLE, None)
    if entry is not None:
        entry[0].remove()
    return target


def sparse_context_config(target: Any) -> SparseContextConfig | None:
    """The config applied to a RefDiT, or ``None``."""
    entry = target.__dict__.get(_SPARSE_HANDLE) if isinstance(target, RefDiT) else None
    return None if entry is None else entry[1]
