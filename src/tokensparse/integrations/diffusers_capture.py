"""Pipeline methods that capture the reference pixels and the prompt a Sparse Context selection reads."""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np

from .diffusers_models import (
    CAPTURE_THROUGH,
    PER_REFERENCE_IMAGE_CALLS,
    PER_SAMPLE_IMAGES,
    PIPELINES,
    PREFERRED_IMAGE_ARG,
    PROMPT_ARGS,
    RGBA_PIPELINES,
    STACKED_REFS_ARG,
    images_for_scorers,
    pipeline_name,
)

logger = logging.getLogger("tokensparse.integrations.diffusers")  # the hook's logger: one place to silence

_CAPTURE = "_tokensparse_capture_original"


def wrap_capture(pipe: Any, state: Any) -> None:
    """Record the reference images the pipeline encodes (pixel scorers) and the prompt (``auto``); its
    ``check_inputs``, which every pipeline call runs first, clears what an earlier call captured. A pipeline in
    :data:`CAPTURE_THROUGH`: its inner pipeline's. A subclass captures as its supported base (:func:`pipeline_name`)."""
    pipe = _capturing(pipe)
    cls = pipeline_name(pipe)
    image_method, arg_name, arg_pos = PIPELINES[cls]
    preferred = PREFERRED_IMAGE_ARG.get(cls)
    image_args = ((preferred,) if preferred else ()) + ((arg_name, arg_pos),)
    stacked = STACKED_REFS_ARG.get(cls)
    prompt_method, *prompt_arg = PROMPT_ARGS.get(cls, ("encode_prompt", "prompt", 0))
    methods = [("check_inputs", "call", ()), (image_method, "images", image_args)]
    if prompt_method == "check_inputs":  # one wrapper: it clears the earlier captures, then takes the prompt
        methods[0] = ("check_inputs", "call", (tuple(prompt_arg),))
    else:
        methods.append((prompt_method, "prompt", (tuple(prompt_arg),)))
    wrapped = []
    for name, kind, where in methods:
        original = getattr(pipe, name, None)
        if original is None:
            continue
        pipe.__dict__[name] = _Capture(original, state, kind, where, stacked if kind == "images" else None,
                                       cls in PER_REFERENCE_IMAGE_CALLS, cls in PER_SAMPLE_IMAGES,
                                       cls in RGBA_PIPELINES)
        wrapped.append(name)
    pipe.__dict__[_CAPTURE] = wrapped


class _Capture:
    """A pipeline method that first records its reference images or prompt into ``state``."""

    def __init__(self, original: Any, state: Any, kind: str, where: tuple[tuple[str, int], ...],
                 batch: tuple[str, int] | None = None, per_reference: bool = False, per_sample: bool = False,
                 rgba: bool = False) -> None:
        self.original, self.state, self.kind, self.where = original, state, kind, where
        self.rgba = rgba  # the image method gets RGBA pixels
        self.batch = batch  # the batch-size argument, where an item of several images is several references
        self.per_reference = per_reference  # the method runs once per reference: a call's captures accumulate
        self.per_sample = per_sample  # the images argument lists the samples: the first sample's are the references
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
        if self.kind == "images":
            batch = self._value(args, kwargs, (self.batch,)) if self.batch else None
            value = self._value(args, kwargs)
            state.images_shared = False  # known only where the method gets every sample's images
            if self.per_sample and isinstance(value, (list, tuple)):
                state.images_shared = all(_same_images(x, value[0]) for x in value[1:])
                value = value[0] if value else None
            images = images_for_scorers(value, batch, self.rgba)
            if self.per_reference and state.images is not None and state.images_tick == state.forwards:
                images = state.images + (images or [None])  # the next reference of the same call
            state.images = images
            state.images_tick = state.forwards
        elif self.where and state.prompts_tick != state.forwards:  # else: the negative prompt, encoded after it
            prompt = self._value(args, kwargs)
            state.prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
            state.prompts_tick = state.forwards
        return self.original(*args, **kwargs)


def _same_images(a: Any, b: Any) -> bool:
    """Whether two samples' images (PIL images, arrays or tensors, or lists of them) hold the same pixels."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_images(x, y) for x, y in zip(a, b))
    try:
        return bool(np.array_equal(np.asarray(a), np.asarray(b)))
    except (TypeError, ValueError):
        return False


def _capturing(pipe: Any) -> Any:
    """The pipeline whose methods capture for ``pipe``: itself, or its inner one (:data:`CAPTURE_THROUGH`)."""
    inner = CAPTURE_THROUGH.get(pipeline_name(pipe))
    return getattr(pipe, inner) if inner else pipe


def unwrap_capture(pipe: Any) -> None:
    """Undo :func:`wrap_capture` (a pipeline without it is left as is)."""
    pipe = _capturing(pipe)
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
