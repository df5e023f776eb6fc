"""The tiny diffusers builders: without the [diffusers] extra they name it (MissingExtraError), as every other
entry point that needs an extra does. Runs without diffusers installed: the missing package is simulated."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys

import pytest

import tokensparse.integrations as integrations
from tokensparse.extras import MissingExtraError, needs


def _builders() -> list[tuple[str, object]]:
    """Every public ``tiny_*`` function of every ``diffusers_tiny*`` module."""
    found = []
    for info in pkgutil.iter_modules(integrations.__path__):
        if not info.name.startswith("diffusers_tiny"):
            continue
        module = importlib.import_module(f"{integrations.__name__}.{info.name}")
        for name, function in vars(module).items():
            if name.startswith("tiny_") and inspect.isfunction(function) and function.__module__ == module.__name__:
                found.append((f"{info.name}.{name}", function))
    return sorted(found, key=lambda item: item[0])


BUILDERS = _builders()


def test_the_builders_are_found():
    names = [name for name, _ in BUILDERS]
    assert "diffusers_tiny.tiny_flux2_klein" in names and "diffusers_tiny_variants.tiny_variant" in names
    assert len(names) >= 30


@pytest.mark.parametrize("missing", [("transformers",), ("diffusers", "transformers")])
@pytest.mark.parametrize("name, builder", BUILDERS, ids=[name for name, _ in BUILDERS])
def test_a_builder_without_its_extra_names_it(monkeypatch, missing, name, builder):
    for package in missing:
        monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    required = [p for p in inspect.signature(builder).parameters.values() if p.default is inspect.Parameter.empty]
    args = ["FluxFillPipeline" if p.name == "name" else None for p in required]  # never used: checked first
    with pytest.raises(MissingExtraError, match=rf"{builder.__name__} needs ({'|'.join(missing)}), which is not "
                                                r"installed: pip install 'tokensparse\[diffusers\]'"):
        builder(*args)


def test_needs_checks_at_the_call_and_refuses_unknown_packages(monkeypatch):
    calls = []

    @needs("peft")
    def fine_tune(x: int) -> int:
        """Doc."""
        calls.append(x)
        return x + 1

    assert fine_tune.__name__ == "fine_tune" and fine_tune.__doc__ == "Doc."
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtraError, match=r"fine_tune needs peft, .*tokensparse\[train\]"):
        fine_tune(1)
    assert calls == []
    monkeypatch.setitem(sys.modules, "peft", type(sys)("peft"))
    assert fine_tune(1) == 2
    with pytest.raises(ValueError, match="'numpy' is no optional dependency"):
        needs("numpy")
