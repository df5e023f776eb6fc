"""Optional dependencies: the extra (``pip install 'tokensparse[EXTRA]'``) that brings each one.

``import tokensparse`` needs none of them; a function that does imports its packages through :func:`require`, so a
missing one is an ``ImportError`` that names the extra to install instead of a ``ModuleNotFoundError`` from deep
inside a call."""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

_F = TypeVar("_F", bound=Callable[..., Any])

#: the extra of pyproject.toml's [project.optional-dependencies] that installs each optional package
EXTRAS: dict[str, str] = {
    "accelerate": "train",
    "peft": "train",
    "diffusers": "diffusers",
    "transformers": "diffusers",
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (an optional package or one of its submodules) for ``feature`` (what needs it, as the
    message says it).

    Raises :class:`MissingExtraError` (an ``ImportError``) naming the package and its extra when the package is
    not installed; one that is installed but fails to import itself (a dependency of its own missing) raises its
    own error unchanged. ``ValueError`` for a package that is no optional dependency of tokensparse."""
    package = module.partition(".")[0]
    if package not in EXTRAS:
        raise ValueError(f"{package!r} is no optional dependency of tokensparse; known: {sorted(EXTRAS)}")
    try:
        importlib.import_module(package)  # first: a submodule imported before would not look at its package
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.partition(".")[0] != package:
            raise
        raise MissingExtraError(f"{feature} needs {package}, which is not installed: "
                                f"pip install 'tokensparse[{EXTRAS[package]}]'") from exc


def needs(*modules: str) -> Callable[[_F], _F]:
    """Decorator: the function imports each of ``modules`` through :func:`require` before it runs (the message names
    the function), so calling it without its extra raises :class:`MissingExtraError` instead of a
    ``ModuleNotFoundError`` from the import inside it. The modules are checked at the call, not at the decoration:
    importing the decorated function needs none of them."""
    for module in modules:
        if module.partition(".")[0] not in EXTRAS:
            raise ValueError(f"{module!r} is no optional dependency of tokensparse; known: {sorted(EXTRAS)}")

    def decorate(function: _F) -> _F:
        @functools.wraps(function)
        def checked(*args: Any, **kwargs: Any) -> Any:
            for module in modules:
                require(module, function.__qualname__)
            return function(*args, **kwargs)

        return checked  # type: ignore[return-value]

    return decorate
