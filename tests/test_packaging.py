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
    "typer": ("0.21", "options annotated `X | None` (< 0.12.4: 'Type not yet supported', even for --help); --help "
                      "with click >= 8.2 (< 0.16: \"make_metavar() missing 1 required positional argument\"); rich "
                      "escapes in help text (< 0.21 printed 'FLUX.2 \\[klein]')"),
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


ROOT = Path(__file__).resolve().parents[1]
#: what a checkout may hold that no sdist should: environments, caches, build output, local runs
_NOT_SOURCE = (".git", ".venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis", "runs",
               "build", "dist")


def test_the_license_is_an_spdx_expression_the_pinned_backend_reads():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "Apache-2.0"  # a {text = ...} table is deprecated by setuptools
    assert pyproject["project"]["license-files"] == ["LICENSE"] and (ROOT / "LICENSE").is_file()
    floor = next(re.fullmatch(r"setuptools>=([0-9.]+)", req) for req in pyproject["build-system"]["requires"]
                 if req.startswith("setuptools"))
    assert floor and _version(floor[1]) >= (77,), "setuptools reads an SPDX `license` from 77 on"


def test_the_sdist_holds_what_running_the_tests_needs_and_no_caches(tmp_path):
    import shutil
    import subprocess
    import sys
    import tarfile

    tree = tmp_path / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    results = tree / "benchmarks" / "results"
    junk = [tree / "tests" / "__pycache__" / "conftest.cpython-311.pyc", results / "x_quick.json",
            results / "x_quick.png", tree / "tests" / ".out.png.123.tmp"]
    for path in junk:  # what running the tests and benchmarks leaves in a checkout
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    done = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                           "print(build_meta.build_sdist(sys.argv[1]))", str(tmp_path / "dist")],
                          cwd=tree, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deprecated" not in done.stderr.lower(), done.stderr[-3000:]
    with tarfile.open(tmp_path / "dist" / done.stdout.split()[-1]) as sdist:
        held = {name.partition("/")[2] for name in sdist.getnames()}

    def files(pattern: str) -> set[str]:
        return {p.relative_to(tree).as_posix() for p in tree.glob(pattern) if p.is_file()}

    shown = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", (tree / "README.md").read_text()))  # images it embeds
    needed = (files("tests/**/*.py") | files("benchmarks/*.py") | files("benchmarks/*.json")
              | files("benchmarks/results/*.json") | files("recipes/**/*.json") | files("examples/*.py") | shown
              | {"README.md", "LICENSE", "CHANGELOG.md", "pyproject.toml", "tests/conftest.py"})
    needed -= {p.relative_to(tree).as_posix() for p in junk}
    assert "tests/integrations/test_diffusers_flux2.py" in needed and "docs/demo.png" in shown
    assert sorted(needed - held) == []
    unwanted = {name for name in held if name.endswith((".pyc", ".tmp", "_quick.json"))
                or (name.startswith("benchmarks/results/") and name.endswith(".png"))}
    assert sorted(unwanted) == []
