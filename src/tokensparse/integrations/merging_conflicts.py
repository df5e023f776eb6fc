"""The diffusers hooks token merging cannot run under: caches that reuse a merged sublayer's output across steps and
hooks that read its tokens as the image grid (:func:`refuse_output_caches`, checked at every call of a merged
model)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

#: diffusers hooks that read a sublayer's tokens as the model's image grid: Smoothed Energy Guidance (a guider's pass,
#: modular pipelines) blurs an attention's queries as a square grid of the sequence, which merged tokens are not
GRID_HOOKS = ("SmoothedEnergyGuidanceHook",)


def _hooks_on(model: nn.Module, modules: list[nn.Module]) -> list[tuple[Any, str]]:
    """The diffusers hooks (``module._diffusers_hook``) on ``modules`` of ``model``, each with its module's name; a
    dict lookup per module when there is none (every model call checks)."""
    found: list[tuple[Any, str]] = []
    for module in modules:
        hooks = getattr(module.__dict__.get("_diffusers_hook"), "hooks", None)  # its HookRegistry's {name: hook}
        if hooks:
            name = next((n for n, m in model.named_modules() if m is module), type(module).__name__)
            found.extend((hook, name) for hook in hooks.values())
    return found


def _named(found: list[tuple[Any, str]], pick: Callable[[Any], bool]) -> list[str]:
    """The hooks of ``found`` for which ``pick(hook)``, as distinct ``"HookClass on module.name"``."""
    return list(dict.fromkeys(f"{type(hook).__name__} on {name}" for hook, name in found if pick(hook)))


def _stateful(hook: Any) -> bool:
    return bool(getattr(hook, "_is_stateful", False))


def _reads_grid(hook: Any) -> bool:
    return type(hook).__name__ in GRID_HOOKS


def _first(found: list[str]) -> str:
    return "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")


def refuse_output_caches(model: nn.Module, modules: list[nn.Module]) -> None:
    """``ValueError`` where ``modules`` of ``model`` (merged sublayers and the modules inside them) carry a stateful
    diffusers hook: Pyramid Attention Broadcast, FasterCache and TaylorSeer caches hand back (or extrapolate from) a
    module's output of an earlier step, whose merged tokens this step's matching would unmerge into the wrong tokens
    (or fail); block-level caches (FirstBlockCache, MagCache) hook the blocks around the merged sublayers, whose
    outputs are unmerged, and pass. Or one of :data:`GRID_HOOKS`, which read its merged tokens as the image grid
    (Smoothed Energy Guidance). One pass over ``modules`` (every model call checks)."""
    found = _hooks_on(model, modules)
    if not found:
        return
    caches = _named(found, _stateful)
    if caches:
        raise ValueError(
            f"token merging cannot run under diffusers caches that reuse a merged sublayer's output across steps "
            f"({_first(caches)}): that output holds an earlier step's merged tokens, which another step's matching "
            f"would unmerge into the wrong tokens; disable the cache (e.g. transformer.disable_cache()) or use a "
            f"block-level one (FirstBlockCache, MagCache), which stacks with token merging")
    grid = _named(found, _reads_grid)
    if grid:
        raise ValueError(
            f"token merging cannot run under Smoothed Energy Guidance ({_first(grid)}): it blurs an attention's "
            f"queries as a square grid of the sequence's tokens, and a merged sublayer's tokens are fewer and out of "
            f"grid order; use another guider or remove token merging (ts.remove_token_merging)")
