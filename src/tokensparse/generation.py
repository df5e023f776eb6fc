"""Generation boundaries: tell per-generation state (selections, merge caches) when a new image starts.

Methods that cache something for one generation register a callback on the *owner* (a RefDiT model, a
diffusers pipeline or transformer). The owner's sampler calls :func:`begin_generation` once per image:
``tokensparse.generate`` does so for RefDiT; for a diffusers pipeline, :func:`on_generation_start`
wraps ``pipe.scheduler.set_timesteps``, which every pipeline call runs once before its first step.

For callers that drive a model step by step themselves, :class:`StepTracker` infers boundaries from
the timesteps it sees (timesteps fall within a generation; a rise means a new one).
"""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

_CALLBACKS = "_tokensparse_generation_callbacks"
_WRAPPED = "_tokensparse_set_timesteps"


def on_generation_start(owner: Any, name: str, callback: Callable[[], None]) -> None:
    """Call ``callback()`` at the start of every generation of ``owner``; ``name`` replaces an earlier one."""
    callbacks: dict[str, Callable[[], None]] = owner.__dict__.setdefault(_CALLBACKS, {})
    callbacks[name] = callback
    _wrap_scheduler(owner)


def _wrap_scheduler(owner: Any) -> bool:
    """Make ``owner.scheduler.set_timesteps`` start generations; False if there is nothing (new) to wrap."""
    scheduler = getattr(owner, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "set_timesteps") or _WRAPPED in scheduler.__dict__:
        return False
    original = scheduler.set_timesteps
    scheduler.__dict__[_WRAPPED] = original
    scheduler.set_timesteps = _SetTimesteps(owner, original)
    return True


class _SetTimesteps:
    """``scheduler.set_timesteps`` that first starts a generation of ``owner``.

    An object rather than a closure so that ``copy.deepcopy(pipe)`` gives the copy a wrapper bound to the
    copied pipeline and scheduler; ``functools.update_wrapper`` keeps the signature pipelines inspect
    (``sigmas``, ``mu``).
    """

    def __init__(self, owner: Any, original: Callable[..., Any]) -> None:
        self.owner, self.original = owner, original
        functools.update_wrapper(self, original)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        begin_generation(self.owner)
        return self.original(*args, **kwargs)


def check_scheduler(owner: Any) -> None:
    """Call from a model hook: if ``owner``'s scheduler was replaced since it was wrapped (``pipe.scheduler =
    X.from_config(...)``), wrap the new one and start a new generation — a scheduler cannot change within a
    pipeline call, so this call is the first of a generation whose ``set_timesteps`` went unseen."""
    if owner is not None and owner.__dict__.get(_CALLBACKS) and _wrap_scheduler(owner):
        begin_generation(owner)


def remove_generation_callback(owner: Any, name: str) -> None:
    """Undo :func:`on_generation_start` for ``name``; unwraps the scheduler when no callback is left."""
    callbacks = owner.__dict__.get(_CALLBACKS, {})
    callbacks.pop(name, None)
    if callbacks:
        return
    owner.__dict__.pop(_CALLBACKS, None)
    scheduler = getattr(owner, "scheduler", None)
    if scheduler is not None and _WRAPPED in scheduler.__dict__:
        del scheduler.__dict__["set_timesteps"]
        del scheduler.__dict__[_WRAPPED]


def copy_keeping_copied_owners(obj: Any, memo: dict) -> Any:
    """``copy.deepcopy`` of a hook state ``obj`` whose ``owners`` (the pipelines / models it was applied through)
    are kept only where they are being copied too: ``deepcopy(pipe)`` keeps the copied pipeline, while
    ``deepcopy(pipe.transformer)`` does not drag a copy of every pipeline (text encoders, VAE) along.
    Use as ``__deepcopy__``."""
    new = obj.__class__.__new__(obj.__class__)
    memo[id(obj)] = new
    for name, value in obj.__dict__.items():
        if name != "owners":
            new.__dict__[name] = copy.deepcopy(value, memo)
    new.owners = [memo[id(o)] for o in obj.owners if id(o) in memo]
    return new


def state_without_pipelines(obj: Any) -> dict:
    """``obj.__dict__`` for pickling a hook state: ``owners`` keeps only the modules (the patched model itself).

    A pipeline is not part of a pickled model: ``torch.save(pipe.transformer)`` must not drag (or fail on) the
    pipeline's text encoders and VAE; the loaded model behaves as if patched directly. Use as ``__getstate__``.
    """
    state = dict(obj.__dict__)
    state["owners"] = [o for o in obj.owners if isinstance(o, torch.nn.Module)]
    return state


def compile_hint(target: Any, accepts: Callable[[torch.nn.Module], bool]) -> str:
    """The end of a refusal of ``target`` where it is a ``torch.compile(model)`` wrapper of a model the refusing
    method ``accepts`` (hooks belong on the model itself): what to pass instead; ``""`` for anything else."""
    inner = getattr(target, "_orig_mod", None)
    if not isinstance(inner, torch.nn.Module) or not accepts(inner):
        return ""
    return f": pass the {type(inner).__name__} itself (compile in place with .compile() instead of torch.compile(...))"


def reset_if_compiled(model: torch.nn.Module, method: str) -> None:
    """Reset ``torch.compile`` after ``method`` changed hooks inside ``model``, if it (or a sub-module) is compiled.

    Compiled code does not re-check hooks added to or removed from sub-modules after it was traced, so the
    change would silently not take effect until a recompile. ``torch.compiler.reset()`` is process-wide: all
    compiled code recompiles on its next call. (A ``model.forward = torch.compile(model.forward)`` is not
    detectable: apply methods before compiling it that way.)
    """
    if hasattr(model, "_orig_mod") or any(getattr(m, "_compiled_call_impl", None) is not None
                                          for m in model.modules()):
        logger.warning("tokensparse: %s changed hooks inside the compiled %s; resetting torch.compile "
                       "(torch.compiler.reset(): all compiled code in this process recompiles on its next call)",
                       method, type(model).__name__)
        torch.compiler.reset()


def begin_generation(owner: Any) -> None:
    """Signal that ``owner`` (a model or pipeline tokensparse was applied to) starts a new generation.

    ``tokensparse.generate`` and diffusers pipelines do this themselves. Call it in your own sampling loop
    over a bare model where timesteps do not show it: one-step sampling calls the model at the same
    timestep every time, which otherwise reads as guidance passes of one step (token merging then continues
    that step's destination draws, and Sparse Context keeps its selection while the references stay the same);
    an img2img / SDEdit-style loop that starts below the previous image's last timestep reads as its next steps.
    """
    if not hasattr(owner, "__dict__"):
        raise TypeError(f"begin_generation takes the model or pipeline tokensparse was applied to, got "
                        f"{type(owner).__name__}")
    for callback in list(owner.__dict__.get(_CALLBACKS, {}).values()):
        callback()


class StepTracker:
    """Counts denoising steps from the timesteps a model is called with.

    Calls at the same timestep (guidance passes) share a step; a lower timestep is the next step; a
    higher one starts a new generation. :meth:`reset` forces a new generation.
    """

    def __init__(self) -> None:
        self.generation = 0
        self.step = -1
        self._last_t: float | None = None

    def reset(self) -> None:
        self.generation += 1
        self.step = -1
        self._last_t = None

    def advances(self, t: float) -> bool:
        """Whether a call at timestep ``t`` would be the next step of the current generation (it is lower than the
        last call's); ``False`` for the first call of a generation, a repeat of the step's timestep or a rise."""
        return self._last_t is not None and t < self._last_t

    def observe(self, t: float) -> int:
        """Record a call at timestep ``t``; returns the step index within the current generation."""
        if self._last_t is not None and t > self._last_t:
            self.reset()
        if self._last_t is None or t < self._last_t:
            self.step += 1
        self._last_t = t
        return self.step
