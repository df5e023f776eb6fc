"""Named RefDiT configs (the CLI's choices) and the checkpoints that ship inside the package."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import asdict
from importlib import resources
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model as _load_safetensors
from safetensors.torch import save_model as _save_safetensors

from ..files import output_folder, published
from .refdit import RefDiT, RefDiTConfig

# Architectures by name. Weights, where shipped, live in tokensparse/weights/<name>.safetensors.
CONFIGS: dict[str, RefDiTConfig] = {
    "refdit-tiny": RefDiTConfig(image_size=16, patch_size=4, dim=48, depth=2, heads=2, rope_axes=(4, 10, 10)),
    "refdit-s": RefDiTConfig(image_size=32, patch_size=4, dim=192, depth=6, heads=6),
    "refdit-s-kv": RefDiTConfig(image_size=32, patch_size=4, dim=192, depth=6, heads=6, ref_attends_target=False),
    # the same with a 2-block text encoder over the prompt (binds "first" to "top left" before the DiT)
    "refdit-s-text": RefDiTConfig(image_size=32, patch_size=4, dim=192, depth=6, heads=6, text_depth=2),
    "refdit-s-kv-text": RefDiTConfig(image_size=32, patch_size=4, dim=192, depth=6, heads=6,
                                     ref_attends_target=False, text_depth=2),
    # the same with TREAD routing: routed target tokens skip blocks 1-4 (Sparse Guidance's weak branch)
    "refdit-s-kv-routed": RefDiTConfig(image_size=32, patch_size=4, dim=192, depth=6, heads=6,
                                       ref_attends_target=False, route_span=(1, 5)),
    # timing configs: the same width at 16x16 and 32x32 token grids
    "refdit-s-64px": RefDiTConfig(image_size=64, patch_size=4, dim=192, depth=6, heads=6),
    "refdit-s-128px": RefDiTConfig(image_size=128, patch_size=4, dim=192, depth=6, heads=6),
    # refdit-sparse at 64 px (16x16 target tokens): where target-token merging has tokens to spare
    "refdit-s-kv-64px": RefDiTConfig(image_size=64, patch_size=4, dim=192, depth=6, heads=6,
                                     ref_attends_target=False),
}

# Shipped checkpoints: name -> architecture name.
CHECKPOINTS: dict[str, str] = {
    "refdit-base": "refdit-s-text",
    "refdit-sparse": "refdit-s-kv-text",
    "refdit-routed": "refdit-s-kv-routed",
    "refdit-sparse-64px": "refdit-s-kv-64px",
}


def weights_dir() -> Path:
    """The folder of the shipped checkpoints inside the installed package."""
    return Path(str(resources.files("tokensparse") / "weights"))


def list_models() -> dict[str, dict]:
    """Every named model: its config, and whether weights ship (``load_model`` works) or not."""
    out: dict[str, dict] = {}
    for name, cfg in CONFIGS.items():
        out[name] = {"config": asdict(cfg), "weights": False, "architecture": name}
    for name, arch in CHECKPOINTS.items():
        out[name] = {"config": asdict(CONFIGS[arch]), "weights": (weights_dir() / f"{name}.safetensors").is_file(),
                     "architecture": arch}
    return out


def build_model(name: str | RefDiTConfig, **overrides: object) -> RefDiT:
    """An untrained RefDiT from a named config (or a config), with optional field overrides."""
    if isinstance(name, RefDiTConfig):
        cfg = name
    elif not isinstance(name, str):
        raise TypeError(f"name must be a model name or a RefDiTConfig, got {type(name).__name__}")
    elif name in CONFIGS:
        cfg = CONFIGS[name]
    elif name in CHECKPOINTS:
        cfg = CONFIGS[CHECKPOINTS[name]]
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(CONFIGS) + sorted(CHECKPOINTS)}")
    if overrides:
        cfg = RefDiTConfig(**{**asdict(cfg), **overrides})
    return RefDiT(cfg)


@torch.no_grad()
def randomize_zero_init(model: RefDiT, std: float = 0.02) -> RefDiT:
    """Give the zero-initialised (adaLN-zero) weight matrices of an untrained model N(0, std) values.

    An untrained RefDiT is the identity in every block; timing and demos of untrained models need it not to be.
    Uses the global torch RNG (seed it first for reproducibility). Returns ``model``.
    """
    for p in model.parameters():
        if p.dim() > 1 and p.abs().sum() == 0:
            p.normal_(0, std)
    return model


def write_shipped(path: str | Path, write_weights: Callable[[str], None], info: dict) -> None:
    """Publish a shippable weights file and its provenance JSON beside it, each atomically.

    ``write_weights(tmp_path)`` writes the safetensors file to a temp file of its own beside ``path``
    (:func:`~tokensparse.files.published`: two exports to one path at once do not collide: each file is whole,
    the last renamed wins, though the pair may then mix the two exports); it gets normal permissions and is
    renamed into place, then ``info`` goes to
    ``path.with_suffix(".json")`` the same way. Both are written before either is renamed; a failure (disk full,
    an interrupt) leaves no temp file, nor a folder made for it, and raises
    ``OSError`` naming ``path``. A folder where either file goes is an ``IsADirectoryError`` before anything is
    written (renaming the JSON over it failed after the weights were in place: a pair with no config).
    """
    path = Path(path)
    for target in (path, path.with_suffix(".json")):
        if target.is_dir():
            raise IsADirectoryError(f"cannot write {path}: {target} is a folder")
    try:
        with output_folder(path.parent), published(path, path.with_suffix(".json")) as (tmp, tmp_json):
            write_weights(str(tmp))
            tmp_json.write_text(json.dumps(info, indent=2))
    except (OSError, SafetensorError) as exc:  # safetensors reports I/O errors as SafetensorError
        raise OSError(f"cannot write {path}: {exc}") from exc


def save_checkpoint(model: RefDiT, path: str | Path, meta: dict | None = None,
                    dtype: torch.dtype = torch.float32) -> None:
    """Write ``model`` as safetensors (weights stored in ``dtype``) plus a JSON with its config and ``meta``.

    Both files are written atomically (temp file + rename). Loading always gives a float32 model.
    """
    info = {"config": asdict(model.config), "stored_dtype": str(dtype).replace("torch.", ""), **(meta or {})}
    write_shipped(path, lambda tmp: _save_safetensors(copy.deepcopy(model).to(dtype), tmp), info)


def _run_recipe(path: Path) -> Path | None:
    """For a weights file ``path`` with no JSON of its own beside it in a training run's checkpoint folder
    (``step_N/``, which holds ``state.json``): the run's recipe, the folder's ``config.json`` or else (a checkpoint
    saved without one) the run folder's; ``None`` for any other file."""
    if path.with_suffix(".json").is_file() or not (path.parent / "state.json").is_file():
        return None
    return next((p for p in (path.parent / "config.json", path.parent.parent / "config.json") if p.is_file()), None)


def _run_checkpoint_config(path: Path, json_path: Path) -> RefDiTConfig:
    """The RefDiT config of a run checkpoint's weights ``path``: the ``model`` of the recipe ``json_path``
    (:func:`_run_recipe`)."""
    try:
        recipe = json.loads(json_path.read_text())
        name, lora_rank = recipe["model"], int(recipe.get("lora_rank") or 0)
        cfg = CONFIGS[CHECKPOINTS.get(name, name)]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"checkpoint {path}: {json_path} does not hold a training recipe whose model is one of "
                         f"{sorted(CONFIGS) + sorted(CHECKPOINTS)} ({type(exc).__name__}: {exc})") from None
    if lora_rank:
        raise ValueError(f"checkpoint {path} is a LoRA run's (lora_rank {lora_rank}): it holds the adapters apart "
                         "from the frozen weights; export the run to merge them (`tokensparse train --export`, "
                         "tokensparse.train.export_ema) and load that")
    return cfg


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> RefDiT:
    """Load a RefDiT saved by :func:`save_checkpoint` (``tokensparse train --export``): the safetensors file
    and the JSON beside it (safetensors only; no pickle). The weights of a training run's checkpoint folder
    (``RUN/step_N/ema.safetensors`` or ``model.safetensors``) load too, their config from the run's
    ``config.json`` in that folder or the run folder (a LoRA run's are refused: export it). A leading ``~`` in
    ``path`` is the home folder."""
    path = Path(path).expanduser()
    if path.is_dir():  # "not found" would send the user looking for a file that is there
        raise IsADirectoryError(f"checkpoint {path} is a folder, not a .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    recipe = _run_recipe(path)
    if recipe is not None:
        cfg = _run_checkpoint_config(path, recipe)
    else:
        cfg = _saved_config(path)
    model = RefDiT(cfg)
    try:
        _load_safetensors(model, str(path), device=map_location)
    except SafetensorError as exc:
        raise ValueError(f"cannot read checkpoint {path} as safetensors ({exc})") from None
    except RuntimeError as exc:  # load_state_dict: missing / unexpected / reshaped tensors
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else "")[:300]  # line 0 is only a heading
        raise ValueError(f"checkpoint {path} does not fit the model its JSON describes: {detail}") from None
    return model.eval()


def _saved_config(path: Path) -> RefDiTConfig:
    """The config in the JSON :func:`save_checkpoint` writes beside checkpoint ``path``."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {json_path.name} beside it (its config); "
                                "save_checkpoint and `tokensparse train --export` write both (a training run's "
                                "step_N/ folder holds config.json and state.json instead)")
    try:  # unreadable JSON, no "config", or fields RefDiTConfig refuses: one error naming the file
        info = json.loads(json_path.read_text())
        cfg_dict = {k: tuple(v) if isinstance(v, list) else v for k, v in info["config"].items()}
        return RefDiTConfig(**cfg_dict)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"checkpoint {path}: {json_path.name} does not hold a RefDiT config as save_checkpoint "
                         f"writes it ({type(exc).__name__}: {exc})") from None


def load_model(name: str | Path) -> RefDiT:
    """A shipped, trained RefDiT by name (see :func:`list_models`), or your own checkpoint by the path of its
    ``.safetensors`` file (:func:`load_checkpoint`: an exported one, or a training run's
    ``RUN/step_N/ema.safetensors``), in eval mode. A leading ``~`` in a path is the home folder."""
    if isinstance(name, Path) or (isinstance(name, str) and name.lower().endswith(".safetensors")):
        return load_checkpoint(name)
    if not isinstance(name, str):
        raise TypeError(f"name must be a string, one of {sorted(CHECKPOINTS)}, or a .safetensors path; "
                        f"got {type(name).__name__}")
    if not name.strip():  # Path("") is the working folder: it was called "a folder, not a .safetensors checkpoint"
        raise ValueError(f"name is empty; give one of {sorted(CHECKPOINTS)} or the path of a .safetensors checkpoint")
    if name not in CHECKPOINTS and Path(name).expanduser().exists():  # a run folder, a JSON: say what it is
        kind = "folder" if Path(name).expanduser().is_dir() else "file"
        raise ValueError(f"{name} is a {kind}, not a .safetensors checkpoint; give the path of a checkpoint's "
                         ".safetensors file (a run folder's: tokensparse train --export) or one of "
                         f"{sorted(CHECKPOINTS)}")
    if name not in CHECKPOINTS:
        raise ValueError(f"no shipped checkpoint named {name!r}; shipped: {sorted(CHECKPOINTS)} "
                         "(your own: the path of its .safetensors file)")
    path = weights_dir() / f"{name}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {name!r} is not in this build of tokensparse ({path} missing)")
    return load_checkpoint(path)
