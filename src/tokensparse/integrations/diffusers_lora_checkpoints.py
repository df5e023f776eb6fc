"""Checkpoints of :func:`~tokensparse.integrations.diffusers_lora.train_lora_sparse`, so that a run resumes
bit-exactly.

``<out>/checkpoints/step_<k>/`` holds ``lora.safetensors`` (the adapter's trainable tensors, by parameter name),
``optim.pt`` (the AdamW state: tensors only, loaded with ``weights_only=True``), ``state.json`` (step, the loss
of every step so far, wall time, the number of processes and their mixed precision, digests of the examples and
of the base model) and
``config.json`` (the resolved recipe), and under fp16 mixed precision ``scaler.pt`` (the loss scaler's state). A
step's random draws are a function of (seed, step, rank), so no
generator state is saved. Each folder is written to a temp folder and renamed, then ``checkpoints/latest`` is
replaced (:func:`tokensparse.run_checkpoints.save_checkpoint_folder`); the two newest are kept.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..files import read_safetensors
from ..run_checkpoints import (
    changed_fields,
    check_optim_fits,
    latest_checkpoint,
    load_optim,
    read_part,
    read_scaler,
    read_state,
    restore_scaler,
    save_checkpoint_folder,
    save_scaler,
    save_tensors,
    scaler_restarts,
)

if TYPE_CHECKING:
    from .diffusers_lora import LoraTrainConfig

CHECKPOINTS = "checkpoints"  # the sub-folder of the output folder that holds them
#: recipe fields a resumed run may change: when to stop, and how often to checkpoint
RESUMABLE_CHANGES = frozenset({"steps", "save_every"})

logger = logging.getLogger(__name__)


class LoraCheckpointError(ValueError):
    """An output folder's checkpoint cannot be resumed: a damaged file, another recipe or other examples."""


def examples_digest(examples: Sequence[Any]) -> str:
    """SHA-256 of the examples' prompts and pixels (PIL images, or arrays / tensors as the pipeline's image
    processor takes them): a resumed run must train on the same data."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps(ex.prompt).encode())
        for image in (*ex.refs, ex.target):
            if isinstance(image, Image.Image):
                h.update(f"{image.mode} {image.size}".encode())
                h.update(image.tobytes())
            elif isinstance(image, Tensor):  # raw bytes: any dtype (bfloat16 has no numpy twin)
                t = image.detach().cpu().contiguous()
                h.update(f"{t.dtype} {tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            else:
                array = np.ascontiguousarray(image)
                h.update(f"{array.dtype} {array.shape}".encode())
                h.update(array.tobytes())
    return h.hexdigest()


def _canonical(value: Any) -> Any:
    """``value`` as plain JSON that does not depend on order or on the process: mappings with string keys, sets
    as sorted lists, anything else by its ``str``."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((_canonical(v) for v in value), key=repr)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def is_target(name: str, target: str) -> bool:
    """Whether module ``name`` is one a LoRA ``target_modules`` entry ``target`` names (peft's rule: the whole
    name, or its last dotted parts)."""
    return name == target or name.endswith("." + target)


def base_fingerprint(transformer: torch.nn.Module, target_modules: Sequence[str]) -> str:
    """SHA-256 of what a LoRA is trained on: the transformer's class, public config (not where it was loaded
    from), parameter dtype and the weights of the first and last module a LoRA target names (a resumed run must
    adapt the same base model). Read before the adapter is added; cheap for large models (two weight matrices)."""
    h = hashlib.sha256(type(transformer).__name__.encode())
    config = getattr(transformer, "config", None)
    public = {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}  # not _name_or_path etc.
    h.update(json.dumps(_canonical(public), sort_keys=True).encode())
    h.update(str(next(transformer.parameters()).dtype).encode())
    modules = dict(transformer.named_modules())
    names = [n for n in modules if any(is_target(n, t) for t in target_modules)]
    for name in dict.fromkeys(names[:1] + names[-1:]):
        for pname, param in sorted(modules[name].named_parameters(recurse=False)):
            h.update(name.encode() + pname.encode())
            h.update(param.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def find_checkpoint(out: Path, cfg: LoraTrainConfig, data: str, base: str | None = None) -> tuple[Path, dict] | None:
    """The checkpoint (folder, ``state.json``) a run of ``cfg`` on the examples of digest ``data`` into ``out``
    resumes from; ``None`` when there is none. Reads only the small files; :class:`LoraCheckpointError` for a
    damaged one, another recipe (but for :data:`RESUMABLE_CHANGES`), other examples, another base model
    (:func:`base_fingerprint`; checked when ``base`` is given: the pipeline is loaded), or a checkpoint past
    ``cfg.steps``."""
    ckpt = latest_checkpoint(Path(out) / CHECKPOINTS)
    if ckpt is None:
        return None
    try:
        state = read_state(ckpt)
        saved = read_part(ckpt, "config.json", lambda p: json.loads(p.read_text()))
    except ValueError as exc:  # names the damaged file
        raise LoraCheckpointError(str(exc)) from None
    try:
        before = asdict(type(cfg)(**saved))
    except (TypeError, ValueError) as exc:
        raise LoraCheckpointError(f"checkpoint {ckpt}: config.json is not a LoRA recipe ({exc}); use a new "
                                  "--out") from None
    changed = changed_fields(before, asdict(cfg), RESUMABLE_CHANGES)
    if state.get("data") != data:
        changed.append("data (other examples)")
    if base is not None and state.get("base") != base:
        changed.append("base model (another transformer, config, dtype or weights)")
    if changed:
        raise LoraCheckpointError(
            f"{out} holds a LoRA run of another recipe ({'; '.join(changed)}); resume it with the recipe and data it "
            f"started with (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or use a new --out")
    if state["step"] > cfg.steps:
        raise LoraCheckpointError(f"{out} holds a LoRA run at step {state['step']}, past steps={cfg.steps}; give "
                                  "steps >= that to train on, or use a new --out")
    return ckpt, state


@dataclass
class Resume:
    """A checkpoint read to resume from: its folder, ``state.json`` and the files :func:`restore` loads
    (``scaler``: the fp16 loss scaler's state, ``None`` when it holds none)."""

    path: Path
    state: dict
    lora: dict[str, Tensor]
    optim: dict
    scaler: dict | None = None


def read_checkpoint(ckpt: Path, state: dict) -> Resume:
    """Read checkpoint ``ckpt`` (its ``state.json`` read already); :class:`LoraCheckpointError` naming a damaged
    file."""
    try:
        return Resume(ckpt, state, read_part(ckpt, "lora.safetensors", read_safetensors),
                      read_part(ckpt, "optim.pt", load_optim), read_scaler(ckpt))
    except ValueError as exc:
        raise LoraCheckpointError(str(exc)) from None


def check_processes(ckpt: Path, state: dict, num_processes: int) -> None:
    """:class:`LoraCheckpointError` unless checkpoint ``ckpt`` (``state``: its ``state.json``) was trained by
    ``num_processes`` processes: each draws its own samples, so another count would not continue the same run."""
    ran = state.get("num_processes", 1)
    if ran != num_processes:
        raise LoraCheckpointError(f"checkpoint {ckpt} was trained by {ran} processes and this run has "
                                  f"{num_processes}: resume with {ran}, or use a new --out")


def check_precision(ckpt: Path, state: dict, mixed_precision: str) -> None:
    """:class:`LoraCheckpointError` unless checkpoint ``ckpt`` (``state``: its ``state.json``) was trained with
    accelerate's ``mixed_precision`` (set by ``accelerate launch --mixed_precision`` or ``accelerate config``, not
    by the recipe): another one would not continue the same run. A checkpoint that does not record it passes."""
    ran = state.get("mixed_precision")
    if ran is not None and ran != mixed_precision:
        raise LoraCheckpointError(f"checkpoint {ckpt} was trained with mixed precision {ran!r} and this run has "
                                  f"{mixed_precision!r} (accelerate launch --mixed_precision, accelerate config): "
                                  f"resume with {ran!r}, or use a new --out")


def restore(resume: Resume, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, scaler: Any = None
            ) -> None:
    """Load ``resume`` into the adapter's ``params`` (by name), ``optimizer`` and the fp16 loss ``scaler`` (when
    the run has one and the checkpoint holds its state); :class:`LoraCheckpointError` naming the file that does
    not fit."""
    ckpt, lora = resume.path, resume.lora
    missing, unexpected = sorted(params.keys() - lora.keys()), sorted(lora.keys() - params.keys())
    shapes = [k for k in params.keys() & lora.keys() if lora[k].shape != params[k].shape]
    if missing or unexpected or shapes:
        raise LoraCheckpointError(f"checkpoint {ckpt}: lora.safetensors does not fit this adapter (missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}); is it "
                                  "another base model? Use a new --out")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(lora[name])
    try:
        optimizer.load_state_dict(resume.optim)
        check_optim_fits(optimizer, ckpt)
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise LoraCheckpointError(f"checkpoint {ckpt}: optim.pt does not fit this run ({type(exc).__name__}: "
                                  f"{exc}); use a new --out") from None
    try:
        restored = restore_scaler(scaler, resume.scaler, ckpt)
    except ValueError as exc:
        raise LoraCheckpointError(str(exc)) from None
    if not restored:
        logger.warning("tokensparse: %s", scaler_restarts(ckpt))


def save(out: Path, step: int, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, num_processes: int,
         losses: list[float], started: float, cfg: LoraTrainConfig, ids: dict[str, str], scaler: Any = None,
         mixed_precision: str = "no") -> Path:
    """Write checkpoint ``out/checkpoints/step_<step>`` atomically (``started``: ``time.time()`` less the
    run's earlier wall time; ``ids``: the ``data`` and ``base`` digests a resume must match; ``scaler``: the
    fp16 loss scaler, if any; ``mixed_precision``: accelerate's, which a resume must match). Returns the folder."""

    def write(tmp: Path) -> None:
        save_tensors({k: v.detach() for k, v in params.items()}, tmp / "lora.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
        state = {"step": step, "elapsed_s": time.time() - started, "losses": losses, **ids,
                 "num_processes": num_processes, "mixed_precision": mixed_precision}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        save_scaler(scaler, tmp)

    return save_checkpoint_folder(Path(out) / CHECKPOINTS, step, write)
