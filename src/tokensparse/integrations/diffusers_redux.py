"""Sparse Context for FLUX.1 Redux (``FluxPriorReduxPipeline``): fewer of the reference's image tokens in the prompt.

Redux is a prior, not a denoiser. SigLIP encodes the reference image into a square grid of patch features
``(B, h * w, C)`` (27 x 27 = 729 at 384 px), its ``image_embedder`` (``ReduxImageEncoder``) projects each one to the
T5 width, and the pipeline appends them to the T5 prompt tokens; ``FluxPipeline(**prior_output)`` then runs them as
text tokens in every block's joint attention. FLUX gives text tokens no positions (``txt_ids`` are all 0), so a
kept token is placed as it was and only the number of tokens changes. The prior sums a list of images token by token
(its weighted sum over the batch): they share one grid and one selection, scored on the images' mean SigLIP features
(and, for one image, its pixels).

Thinned here: a forward hook on ``image_embedder`` keeps the selected rows of its output, as many as the config's
budget gives (``round(keep * h * w)``, ``count``, or an adaptive count), in their order, once per prior call.
``keep=1.0`` and :func:`remove_redux` leave the output bit-identical. The FLUX transformer itself is not hooked: its
calls just see a shorter prompt. ``copy.deepcopy`` of a patched pipeline is self-contained: the capture wrappers are
partials of bound methods, copied with their owners (the hook, the pipeline) through the copy's memo, and the hook
holds no pipeline, so copying ``image_embedder`` alone drags none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..context import SparseContextConfig, keep_mask
from ..images import to_tensor
from ..selection import RefView
from .classes import known_name

REDUX_PIPELINES = ("FluxPriorReduxPipeline",)
_HOOK = "_tokensparse_redux"  # the pipeline's ReduxHook, in its __dict__


def is_redux(target: Any) -> bool:
    """Whether ``target`` is a ``FluxPriorReduxPipeline`` (or a subclass of one)."""
    return known_name(type(target), REDUX_PIPELINES) is not None


@dataclasses.dataclass
class ReduxState:
    """What the hook knows: the config, the pixels and prompt of the running call, and a count of selections."""

    cfg: SparseContextConfig
    # the call's one reference image, (1, 3, H, W) in [0, 1], when it was given one
    images: list[Tensor] | None = dataclasses.field(default=None, repr=False)
    prompts: list[str] | None = None
    selections: int = 0
    last_index: Tensor | None = None  # the kept rows of the last call (tests, inspection)


class ReduxHook:
    """The forward hook on ``image_embedder`` and the capturing wrappers of the pipeline's methods."""

    def __init__(self, cfg: SparseContextConfig) -> None:
        self.state = ReduxState(cfg)
        self.handle: Any = None

    def attach(self, pipe: Any) -> None:
        embedder = getattr(pipe, "image_embedder", None)
        if not isinstance(embedder, torch.nn.Module):
            raise TypeError(f"{type(pipe).__name__} has no image_embedder module to thin "
                            f"(got {type(embedder).__name__})")
        self.handle = embedder.register_forward_hook(self.post_forward, with_kwargs=True)
        for name, capture in (("check_inputs", self._capture_call), ("encode_image", self._capture_image)):
            original = getattr(pipe, name)
            pipe.__dict__[name] = functools.update_wrapper(functools.partial(capture, original), original)
        pipe.__dict__[_HOOK] = self

    def detach(self, pipe: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
        for name in ("check_inputs", "encode_image"):
            pipe.__dict__.pop(name, None)
        pipe.__dict__.pop(_HOOK, None)

    def _capture_call(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        """``check_inputs(image, prompt, ...)``: every call runs it first; it resets the capture."""
        prompt = kwargs.get("prompt", args[1] if len(args) > 1 else None)
        self.state.prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
        self.state.images = None
        return original(*args, **kwargs)

    def _capture_image(self, original: Any, *args: Any, **kwargs: Any) -> Any:
        image = kwargs.get("image", args[0] if args else None)
        self.state.images = _one_image(image)
        return original(*args, **kwargs)

    def post_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self.state.cfg.is_identity:
            return output
        x = kwargs.get("x", args[0] if args else None)  # SigLIP features (B, N, C)
        embeds = output.image_embeds if hasattr(output, "image_embeds") else output[0]
        if not isinstance(x, Tensor) or x.dim() != 3 or embeds.dim() != 3 or embeds.shape[1] != x.shape[1]:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"Sparse Context on Redux expects image_embedder to map (B, N, C) image features to "
                             f"(B, N, D) embeddings, got {got} -> {tuple(embeds.shape)}")
        n = x.shape[1]
        h = math.isqrt(n)
        if h * h != n:
            raise ValueError(f"Sparse Context on Redux expects a square grid of image tokens (SigLIP patches), got "
                             f"{n} tokens")
        feats = x.float().mean(0, keepdim=True).reshape(1, h, h, -1)  # the summed images' grid
        images = self.state.images if x.shape[0] == 1 else None
        prompts = self.state.prompts[:1] if self.state.prompts else None
        view = RefView(feats, image=images[0] if images else None, index=0, prompts=prompts)
        keep = keep_mask([view], self.state.cfg)[0].to(embeds.device)  # (N,)
        index = torch.nonzero(keep).squeeze(1)
        self.state.selections += 1
        self.state.last_index = index
        thinned = embeds.index_select(1, index)  # (B, K, D)
        if hasattr(output, "image_embeds"):
            return dataclasses.replace(output, image_embeds=thinned)
        return (thinned, *output[1:])


def _one_image(image: Any) -> list[Tensor] | None:
    """The pixels of a call's one reference image, ``[(1, 3, H, W)]`` in [0, 1]; ``None`` for several, or for values
    :func:`~tokensparse.images.to_tensor` does not read (the selection then scores the SigLIP features alone)."""
    if isinstance(image, (list, tuple)):
        if len(image) != 1:
            return None
        image = image[0]
    try:
        pixels = to_tensor(image)
    except (TypeError, ValueError):
        return None
    if pixels.dim() == 4:
        if pixels.shape[0] != 1:
            return None
        pixels = pixels[0]
    return [pixels[None].contiguous()]


def apply_redux(pipe: Any, cfg: SparseContextConfig) -> Any:
    """Sparse Context on a ``FluxPriorReduxPipeline``: its output keeps ``cfg``'s selection of the image tokens.

    ``ValueError`` for ``cache=True`` (the prior has no K/V cache) and ``proportional=True`` (the tokens reach
    FLUX's attention through another pipeline's call, where no bias can follow them). Replaces an earlier config.
    """
    if cfg.cache:
        raise ValueError("cache=True needs a pipeline with a reference K/V cache; FluxPriorReduxPipeline has none "
                         "(its image tokens become prompt tokens of a FluxPipeline call): use cache=False")
    if cfg.proportional:
        raise ValueError("proportional=True is not supported on FluxPriorReduxPipeline: its image tokens reach "
                         "FLUX's attention as prompt tokens of another pipeline's call, where the log-size bias "
                         "cannot follow them; use proportional=False")
    remove_redux(pipe)
    ReduxHook(cfg).attach(pipe)
    return pipe


def remove_redux(pipe: Any) -> Any:
    """Undo :func:`apply_redux` (a pipeline without it is left as is). Returns ``pipe``."""
    hook = pipe.__dict__.get(_HOOK)
    if hook is not None:
        hook.detach(pipe)
    return pipe


def redux_state(pipe: Any) -> ReduxState | None:
    """The live state of a patched Redux pipeline (``selections`` counts the selections made), or ``None``."""
    hook = pipe.__dict__.get(_HOOK)
    return hook.state if hook is not None else None
