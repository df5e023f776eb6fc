"""Matchings cached across denoising steps: :class:`MatchCache` keeps one per (layer, pass) for one generation and
decides, by its recompute policy, when to compute a new one (CA-ToMe's cache)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping

import torch
from torch import Tensor

from .. import checks
from .matching import Matching


def _check_steps(steps: object) -> tuple[int, ...] | None:
    """``recompute_steps`` as sorted distinct step indices ``>= 0`` (``None`` stays ``None``)."""
    if steps is None:
        return None
    if isinstance(steps, (str, bytes, Mapping)) or not isinstance(steps, Iterable):
        raise TypeError(f"recompute_steps must be a tuple of step indices, got {type(steps).__name__}")
    return tuple(sorted({checks.integer("recompute_steps", s, lo=0) for s in steps}))


MAX_PASSES = 8  # distinct model calls per step kept apart; more (a fixed-timestep loop) reuse the slots


class MatchCache:
    """Matchings of one generation, one per (layer, pass), recomputed only at chosen steps.

    ``lookup(layer, step, x, compute, call)`` returns the stored matching for ``layer`` when the policy says to
    reuse it and it fits ``x``; otherwise it calls ``compute()`` and stores the result -- including at step 0,
    so step 1 already hits. Several model calls within a step (guidance passes run one after another) are
    kept apart as passes 0, 1, ...: with a ``call`` fingerprint (the hooks pass
    :func:`tokensparse.integrations.fingerprints.call_key`), the pass is the order in which the step first
    saw that call, so an identical call repeated within a step gets its own earlier matching back; without
    one, each lookup of a layer is the next pass. At most :data:`MAX_PASSES` passes per step are kept (then
    the slots are reused, and calls seen before are forgotten), so a loop at one timestep cannot grow the
    cache; identical calls repeat their matching while a step sees at most :data:`MAX_PASSES` distinct
    calls. :meth:`reset` starts a new generation: nothing computed before it is ever returned after it.
    A matching made under ``torch.inference_mode()`` is never returned where autograd records (grad mode on,
    outside inference mode): its index tensors cannot be saved for backward; it is recomputed there instead.
    """

    def __init__(self, recompute_every: int = 1, recompute_steps: tuple[int, ...] | None = None) -> None:
        self.recompute_every = checks.integer("recompute_every", recompute_every, lo=1)  # 2.5 recomputed at 0, 5, ...
        steps = _check_steps(recompute_steps)
        self.recompute_steps = None if steps is None else frozenset(steps)
        self.generation = 0
        self.hits = 0
        self.misses = 0
        self._entries: dict[Hashable, tuple[int, Hashable, Matching]] = {}
        self._step: int | None = None
        self._passes: dict[Hashable, int] = {}
        self._calls: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._entries)

    def reset(self) -> None:
        """Forget every matching (a new generation starts)."""
        self.generation += 1
        self.hits = self.misses = 0
        self._entries.clear()
        self._passes.clear()
        self._calls.clear()
        self._step = None

    def recompute_at(self, step: int) -> bool:
        """Whether the policy recomputes at ``step`` (when a stored matching exists)."""
        if self.recompute_steps is not None:
            return step == 0 or step in self.recompute_steps
        return step % self.recompute_every == 0

    def _pass(self, layer: Hashable, call: Hashable | None) -> int:
        if call is None:
            p = self._passes.get(layer, 0)
            self._passes[layer] = (p + 1) % MAX_PASSES
            return p
        if call not in self._calls:
            if len(self._calls) == MAX_PASSES:
                self._calls.clear()
            self._calls.append(call)
        return self._calls.index(call)

    def lookup(self, layer: Hashable, step: int, x: Tensor, compute: Callable[[], Matching],
               call: Hashable | None = None) -> Matching:
        if step != self._step:
            self._step = step
            self._passes.clear()
            self._calls.clear()
        key = (layer, self._pass(layer, call))
        entry = self._entries.get(key)
        if entry is not None and (  # the policy first: with recompute_every=1 it decides alone, at no cost
            entry[1] == call if entry[0] == step else not self.recompute_at(step)
        ) and entry[2].fits(x) and not _unusable_here(entry[2]):
            self.hits += 1
            return entry[2]
        matching = compute()
        self.misses += 1
        self._entries[key] = (step, call, matching)
        return matching


def _unusable_here(m: Matching) -> bool:
    """Whether autograd records here (grad mode on, outside inference mode) and ``m`` was made under inference mode:
    merging or unmerging with it would fail ("Inference tensors cannot be saved for backward")."""
    return torch.is_grad_enabled() and not torch.is_inference_mode_enabled() and m.is_inference
