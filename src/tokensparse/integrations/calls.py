"""Reading a module call's arguments by name, however the caller passed them (pipelines use keywords, bare
transformer callers often pass ``hidden_states`` and ``timestep`` positionally)."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from torch import nn


@functools.lru_cache(maxsize=64)
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _forward_class(module: nn.Module) -> type:
    """The class whose ``forward`` names ``module``'s arguments: for a ``torch.compile(model)`` wrapper
    (``OptimizedModule``, whose own ``forward`` takes ``*args, **kwargs``), the wrapped model's."""
    return type(module.__dict__.get("_modules", {}).get("_orig_mod", module))


def as_keywords(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The arguments of ``module(*args, **kwargs)`` as one keyword dict, positional ones named by the
    signature of ``type(module).forward`` (a ``**kwargs`` catch-all is flattened in; a ``torch.compile``
    wrapper's arguments are named by the wrapped model's ``forward``)."""
    if not args:
        return dict(kwargs)
    signature = _signature(_forward_class(module))
    bound = signature.bind_partial(module, *args, **kwargs).arguments
    out = {k: v for k, v in bound.items() if k != "self"}
    for name, p in signature.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(out.pop(name, None) or {})
    return out


def positional_names(module: nn.Module, n: int) -> list[str]:
    """The names of the first ``n`` positional parameters of ``type(module).forward`` (after ``self``)."""
    return [name for name in _signature(_forward_class(module)).parameters if name != "self"][:n]


def first_arg(call: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` given (not ``None``) in ``call`` (from :func:`as_keywords`), else ``None``."""
    return next((call[n] for n in names if call.get(n) is not None), None)
