"""How Sparse Context attaches to diffusers objects: pipeline methods that capture the reference pixels and
the prompt, and a transformer hook that survives accelerate's model offloading."""

from __future__ import annotations

import functools
from typing import Any

from .diffusers_models import PIPELINES, PREFERRED_IMAGE_ARG, images_for_scorers

_CAPTURE = "_tokensparse_capture_original"


def wrap_capture(pipe: Any, state: Any) -> None:
    """Record the reference images the pipeline encodes (pixel scorers) and the prompt (``auto``)."""
    image_method, arg_name, arg_pos = PIPELINES[type(pipe).__name__]
    preferred = PREFERRED_IMAGE_ARG.get(type(pipe).__name__)
    image_args = ((preferred,) if preferred else ()) + ((arg_name, arg_pos),)
    wrapped = []
    for name, kind, where in ((image_method, "images", image_args), ("encode_prompt", "prompt", (("prompt", 0),))):
        original = getattr(pipe, name, None)
        if original is None:
            continue
        pipe.__dict__[name] = _Capture(original, state, kind, where)
        wrapped.append(name)
    pipe.__dict__[_CAPTURE] = wrapped


class _Capture:
    """A pipeline method that first records its reference images or prompt into ``state``."""

    def __init__(self, original: Any, state: Any, kind: str, where: tuple[tuple[str, int], ...]) -> None:
        self.original, self.state, self.kind, self.where = original, state, kind, where
        functools.update_wrapper(self, original)

    def _value(self, args: tuple, kwargs: dict) -> Any:
        """The first of the ``(name, position)`` arguments given (not ``None``)."""
        for name, pos in self.where:
            value = kwargs.get(name, args[pos] if len(args) > pos else None)
            if value is not None:
                return value
        return None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if self.kind == "images":
            state.images = images_for_scorers(self._value(args, kwargs))
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


def register_beneath_offload(registry: Any, transformer: Any, hook: Any, name: str) -> Any:
    """Register ``hook`` as ``name`` in ``transformer``'s diffusers ``registry``; returns the forward it installed.

    Under accelerate's offload wrapper (``enable_model_cpu_offload``), which a pipeline re-installs over the
    forward it saved in ``_old_forward`` after every call, the hook goes into ``_old_forward``: on top, the
    first call's clean-up would drop it.
    """
    outer = transformer.__dict__.get("forward")
    offload = "_old_forward" in transformer.__dict__ and _is_accelerate_forward(outer)
    if offload:
        transformer.forward = transformer._old_forward
    registry.register_hook(hook, name)
    installed = transformer.__dict__.get("forward")
    if offload:
        transformer._old_forward, transformer.forward = installed, outer
    return installed


def remove_keeping_offload(registry: Any, transformer: Any, name: str, installed: Any) -> None:
    """Remove hook ``name`` (whose forward was ``installed``), keeping accelerate's offload wrapper over it,
    which diffusers' ``remove_hook`` would drop with it."""
    current = transformer.__dict__.get("forward")
    registry.remove_hook(name, recurse=False)
    if (installed is not None and current is not installed and _is_accelerate_forward(current)
            and getattr(transformer, "_old_forward", None) is installed):
        transformer._old_forward = transformer.__dict__["forward"]  # what remove_hook restored
        transformer.forward = current


def _is_accelerate_forward(forward: Any) -> bool:
    """Whether ``forward`` is the wrapper accelerate's ``add_hook_to_module`` installs (not a later hook's)."""
    func = getattr(forward, "func", None)
    return getattr(func, "__module__", None) == "accelerate.hooks" and "add_hook_to_module" in getattr(
        func, "__qualname__", "")
