"""Pipeline methods that capture the reference pixels and the prompt a Sparse Context selection reads."""

from __future__ import annotations

import functools
import logging
from typing import Any

from .diffusers_models import (
    PER_REFERENCE_IMAGE_CALLS,
    PIPELINES,
    PREFERRED_IMAGE_ARG,
    STACKED_REFS_ARG,
    images_for_scorers,
)

logger = logging.getLogger("tokensparse.integrations.diffusers")  # the hook's logger: one place to silence

_CAPTURE = "_tokensparse_capture_original"


def wrap_capture(pipe: Any, state: Any) -> None:
    """Record the reference images the pipeline encodes (pixel scorers) and the prompt (``auto``); its
    ``check_inputs``, which every pipeline call runs first, clears what an earlier call captured."""
    image_method, arg_name, arg_pos = PIPELINES[type(pipe).__name__]
    preferred = PREFERRED_IMAGE_ARG.get(type(pipe).__name__)
    image_args = ((preferred,) if preferred else ()) + ((arg_name, arg_pos),)
    stacked = STACKED_REFS_ARG.get(type(pipe).__name__)
    wrapped = []
    for name, kind, where in (("check_inputs", "call", ()), (image_method, "images", image_args),
                              ("encode_prompt", "prompt", (("prompt", 0),))):
        original = getattr(pipe, name, None)
        if original is None:
            continue
        pipe.__dict__[name] = _Capture(original, state, kind, where, stacked if kind == "images" else None,
                                       type(pipe).__name__ in PER_REFERENCE_IMAGE_CALLS)
        wrapped.append(name)
    pipe.__dict__[_CAPTURE] = wrapped


class _Capture:
    """A pipeline method that first records its reference images or prompt into ``state``."""

    def __init__(self, original: Any, state: Any, kind: str, where: tuple[tuple[str, int], ...],
                 batch: tuple[str, int] | None = None, per_reference: bool = False) -> None:
        self.original, self.state, self.kind, self.where = original, state, kind, where
        self.batch = batch  # the batch-size argument, where an item of several images is several references
        self.per_reference = per_reference  # the method runs once per reference: a call's captures accumulate
        functools.update_wrapper(self, original)

    def _value(self, args: tuple, kwargs: dict, where: tuple[tuple[str, int], ...] | None = None) -> Any:
        """The first of the ``(name, position)`` arguments given (not ``None``)."""
        for name, pos in self.where if where is None else where:
            value = kwargs.get(name, args[pos] if len(args) > pos else None)
            if value is not None:
                return value
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if self.kind == "call":  # every pipeline call checks its inputs first: an earlier (failed) call's
            state.images, state.images_tick, state.prompts_tick = None, -1, -1  # captures no longer count
        elif self.kind == "images":
            batch = self._value(args, kwargs, (self.batch,)) if self.batch else None
            images = images_for_scorers(self._value(args, kwargs), batch)
            if self.per_reference and state.images is not None and state.images_tick == state.forwards:
                images = state.images + (images or [None])  # the next reference of the same call
            state.images = images
            state.images_tick = state.forwards
        elif state.prompts_tick != state.forwards:  # else: the negative prompt, encoded after the positive one
            prompt = self._value(args, kwargs)
            state.prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
            state.prompts_tick = state.forwards
        return self.original(*args, **kwargs)


def unwrap_capture(pipe: Any) -> None:
    """Undo :func:`wrap_capture` (a pipeline without it is left as is)."""
    for name in pipe.__dict__.pop(_CAPTURE, []):
        pipe.__dict__.pop(name, None)


def captured_inputs(state: Any, n_refs: int) -> tuple[list | None, list[str] | None, bool]:
    """``(pixels per reference, prompts, captured)`` for the transformer call about to select: what the pipeline
    captured just before it (no transformer call since), pixels only if one per reference (a one-time warning
    otherwise), the first prompt; ``captured``: whether the call came through the pipeline at all."""
    captured = state.forwards in (state.images_tick, state.prompts_tick)
    images = state.images if state.images_tick == state.forwards else None
    if images and len(images) != n_refs:
        if not state.warned_count:
            logger.warning(
                "tokensparse: the pipeline passed %d reference image(s) but the transformer sees %d references; "
                "the selection scores latents instead of the reference pixels", len(images), n_refs)
            state.warned_count = True
        images = None
    prompts = state.prompts[:1] if state.prompts and state.prompts_tick == state.forwards else None
    return images, prompts, captured
