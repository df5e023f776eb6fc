"""Optional dependencies: a missing one is an ImportError that names the extra to install."""

import importlib
import sys
from pathlib import Path

import pytest

from tokensparse.extras import EXTRAS, MissingExtraError, require


@pytest.mark.parametrize("module, extra", [("accelerate", "train"), ("peft.tuners.lora", "train"),
                                           ("diffusers", "diffusers"), ("transformers", "diffusers")])
def test_a_missing_package_names_its_extra(monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module.partition(".")[0], None)  # as if not installed
    with pytest.raises(MissingExtraError, match=rf"feature X needs {module.partition('.')[0]}, which is not "
                                                rf"installed: pip install 'tokensparse\[{extra}\]'") as info:
        require(module, "feature X")
    assert isinstance(info.value, ImportError)


def test_an_installed_package_is_returned(monkeypatch):
    fake = type(sys)("peft")
    monkeypatch.setitem(sys.modules, "peft", fake)
    assert require("peft", "feature X") is fake


def test_a_dependency_missing_inside_an_installed_package_is_its_own_error(monkeypatch):
    def broken(name, package=None):
        raise ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="huggingface_hub") as info:
        require("diffusers", "feature X")
    assert not isinstance(info.value, MissingExtraError)


def test_an_unknown_package_is_refused():
    with pytest.raises(ValueError, match="'numpy' is no optional dependency"):
        require("numpy", "feature X")


def test_every_extra_is_declared_in_pyproject():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    for package, extra in EXTRAS.items():
        assert any(req.startswith(package) for req in extras[extra]), (package, extra)
