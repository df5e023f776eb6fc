"""Optional dependencies: the extra (``pip install 'tokensparse[EXTRA]'``) that brings each one.

``import tokensparse`` needs none of them; a function that does imports its packages through :func:`require`, so a
missing one is an ``ImportError`` that names the extra to install instead of a ``ModuleNotFoundError`` from deep
inside a call."""

from __future__ import annotations

import importlib
from types import ModuleType

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
