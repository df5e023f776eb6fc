"""Sparse Context on Fibo 2.0 (``BriaFibo2Transformer2DModel``, ``BriaFibo2Pipeline``).

The transformer builds its image sequence itself. It takes the target as ``hidden_states (B, C, H, W)`` and the
images to edit as ``context_latents``, a list of ``(B, C, h_k, w_k)`` latents; it cuts every image into
``patch_size`` x ``patch_size`` patches, concatenates ``[target, image 1, image 2, ...]`` (each row-major) and
embeds them with ``x_embedder``. Each token's RoPE row comes from ``rope_embedder(ids)``, ``ids (N, 3)`` =
(plane, row, column), the target on plane ``max_num_gist_tokens + 1`` and image ``k`` on the ``k``-th plane after
it. Everything after that is sized from the embedded sequence (noise masks, gist padding mask, ``num_context_tokens``),
and the final layer reads the target tokens only (the output is the dense ``(B, C, H, W)`` target).

So the call is left as it is and two companion hooks thin the sequence where it is made: a pre-hook on
``x_embedder`` keeps the kept tokens' patches (:class:`EmbedderHook`: on whatever module ``x_embedder`` is at each
thinned call, so a LoRA added after Sparse Context, which wraps it, is thinned too), and a wrapper around
``rope_embedder`` (a plain object, not a module) keeps the same tokens' ``ids`` at its first call of the forward (the
image ids; the second is the gist's).
The target stays whole and first, so the transformer's own noise masks and final slice stay right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .diffusers_layout import InContextAdapter, RefLayout


@dataclass
class Fibo2Call:
    """A thinned Fibo 2.0 call: the kept positions of the dense sequence of ``n`` tokens; ``ids_pending`` until the
    RoPE ids of the image sequence were thinned."""

    index: Tensor
    n: int
    ids_pending: bool = True


class BriaFibo2Adapter(InContextAdapter):
    """Fibo 2.0: the target then ``context_latents`` (the images to edit) in order, each a row-major patch grid."""

    def __init__(self) -> None:
        self.patch = 2  # the transformer's patch_size, read at attach
        self.embedder: EmbedderHook | None = None

    def _grids(self, kwargs: dict[str, Any]) -> list[tuple[int, int]]:
        """Token grid of the target, then of each context image."""
        p = self.patch
        images = [kwargs["hidden_states"], *(kwargs.get("context_latents") or [])]
        return [(x.shape[-2] // p, x.shape[-1] // p) for x in images]

    def layout(self, kwargs: dict[str, Any]) -> RefLayout | None:
        grids = self._grids(kwargs)
        if len(grids) < 2:
            return None
        device = kwargs["hidden_states"].device
        positions, cells, start = [], [], grids[0][0] * grids[0][1]
        for h, w in grids[1:]:
            positions.append(torch.arange(start, start + h * w, device=device))
            cells.append(torch.arange(h * w, device=device))
            start += h * w
        return RefLayout(start, positions, cells, grids[1:])

    def tokens(self, kwargs: dict[str, Any]) -> Tensor:
        """The patches of the target and the context images, ``(B, N, C p^2)``, as the transformer orders them."""
        p = self.patch
        out = []
        for x in [kwargs["hidden_states"], *(kwargs.get("context_latents") or [])]:
            b, c, h, w = x.shape
            x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
            out.append(x.reshape(b, (h // p) * (w // p), c * p * p))
        return torch.cat(out, dim=1)

    def subset(self, kwargs: dict[str, Any], index: Tensor, layout: RefLayout, state: Any) -> dict[str, Any]:
        state.call = Fibo2Call(index, layout.n)  # read by the x_embedder hook and the rope_embedder wrapper
        self.embedder.ensure()  # an x_embedder set since apply (a LoRA wrapping it) gets the hook instead
        return dict(kwargs)

    def scatter(self, output: Any, index: Tensor, layout: RefLayout) -> Any:
        return output  # the target alone, dense

    def attach(self, transformer: torch.nn.Module, state: Any) -> list[Any]:
        self.patch = int(transformer.config.patch_size)
        rope = transformer.rope_embedder
        if isinstance(rope, KeptIds):  # attached before without removal (a copied model): wrap the original
            rope = rope.inner
        transformer.rope_embedder = KeptIds(rope, state)
        self.embedder = EmbedderHook(transformer, KeptPatches(state))
        return [self.embedder, RestoreAttribute(transformer, "rope_embedder", rope)]


class EmbedderHook:
    """``hook`` as a forward pre-hook on the transformer's ``x_embedder``; :meth:`ensure` moves it onto the module
    there now where that was replaced (peft's LoRA wraps the ``Linear``, then adds its own term of the unthinned
    input: a hook left on the wrapped one thinned only the base term, and the sum failed). Its own removal
    handle."""

    def __init__(self, transformer: torch.nn.Module, hook: KeptPatches) -> None:
        self.transformer, self.hook = transformer, hook
        self.module: torch.nn.Module | None = None
        self.handle: Any = None
        self.ensure()

    def ensure(self) -> None:
        """Hook the module ``x_embedder`` is now (only that one)."""
        module = self.transformer.x_embedder
        if module is not self.module:
            self.remove()
            self.handle, self.module = module.register_forward_pre_hook(self.hook), module

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle, self.module = None, None


class KeptPatches:
    """Pre-hook on ``x_embedder``: the patches of the kept tokens only."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        call = self.state.call
        if not isinstance(call, Fibo2Call):
            return None
        patches = args[0]
        if patches.shape[1] != call.n:
            raise ValueError(f"x_embedder got {patches.shape[1]} tokens but the Sparse Context layout of this call "
                             f"has {call.n} (is another patch changing BriaFibo2Transformer2DModel's sequence?)")
        return (patches.index_select(1, call.index.to(patches.device)), *args[1:])


class KeptIds:
    """Stands in for the transformer's ``rope_embedder``: in a thinned call, its first call (the image ``ids``)
    gets the kept tokens' ids only; everything else goes to the original."""

    def __init__(self, inner: Any, state: Any) -> None:
        self.inner = inner
        self.state = state

    def __call__(self, ids: Tensor) -> Tensor:
        call = self.state.call
        if isinstance(call, Fibo2Call) and call.ids_pending:
            call.ids_pending = False
            if ids.shape[0] != call.n:
                raise ValueError(f"rope_embedder got {ids.shape[0]} image ids but the Sparse Context layout of this "
                                 f"call has {call.n} tokens")
            ids = ids.index_select(0, call.index.to(ids.device))
        return self.inner(ids)

    def __getattr__(self, name: str) -> Any:  # freqs_cis, axes_dims, ...: the original's
        if name in ("inner", "state"):
            raise AttributeError(name)
        return getattr(self.inner, name)


class RestoreAttribute:
    """A handle whose ``remove()`` puts an attribute's original value back (if it was not replaced since)."""

    def __init__(self, owner: Any, name: str, original: Any) -> None:
        self.owner, self.name, self.original = owner, name, original

    def remove(self) -> None:
        if isinstance(getattr(self.owner, self.name, None), KeptIds):
            setattr(self.owner, self.name, self.original)
