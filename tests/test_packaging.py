"""pyproject.toml: the declared lower bounds are versions the package works with."""

import re
from pathlib import Path

import pytest

#: the oldest version of each dependency that the code works with, and what an older one lacks
MINIMUMS = {
    "accelerate": ("0.32", "peft >= 0.18 imports accelerate.utils.memory.clear_device_cache, and diffusers imports "
                           "peft where it is installed: training, train-lora and generate failed"),
    "torch": ("2.4", "nn.RMSNorm, torch.is_autocast_enabled(device_type)"),
    "safetensors": ("0.4.3", "safetensors.torch.load_model(..., device=) (models/zoo.py; load_model failed)"),
    "typer": ("0.12.4", "options annotated `X | None` (older: 'Type not yet supported', even for --help)"),
    "peft": ("0.18", "older peft fails to import beside transformers 5, which diffusers 0.42's huggingface-hub "
                     ">= 1.32 brings"),
}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _floors() -> dict[str, list[str]]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        requirements += extra
    floors = {}
    for requirement in requirements:
        match = re.match(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", requirement)
        if match:
            floors.setdefault(match[1].lower(), []).append(match[2])  # in every extra that names it
    return floors


@pytest.mark.parametrize("package", sorted(MINIMUMS))
def test_a_declared_lower_bound_is_no_older_than_the_code_needs(package):
    floors = _floors()
    assert package in floors, f"{package} has no declared lower bound"
    minimum, why = MINIMUMS[package]
    for floor in floors[package]:
        assert _version(floor) >= _version(minimum), f"{package}>={floor}: needs {minimum} ({why})"
