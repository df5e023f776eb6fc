"""A training run's checkpoint folders: atomic save, the ``latest`` pointer with its fallback, and reads that
name a damaged file.

``<out>/step_<k>/`` holds ``model.safetensors``, ``ema.safetensors``, ``optim.pt`` (tensors only, loaded with
``weights_only=True``), ``state.json`` and, under fp16 mixed precision, ``scaler.pt`` (the loss scaler's state,
:data:`SCALER`); each folder is written to a temp folder and renamed, then
``<out>/latest`` is replaced atomically. :mod:`.train` writes and resumes them;
:mod:`.integrations.diffusers_lora_checkpoints` writes LoRA runs' folders with :func:`save_checkpoint_folder`.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .files import default_mode, published, temp_beside

#: the loss scaler's state (fp16 mixed precision: accelerate's ``GradScaler``), in a checkpoint folder
SCALER = "scaler.pt"


def state_tensors(model: torch.nn.Module) -> dict[str, Tensor]:
    """A module's state as detached contiguous copies, each shared tensor once."""
    seen, out = set(), {}
    for k, v in model.state_dict().items():  # shared tensors (patch_embed) saved once
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        out[k] = v.detach().contiguous().clone()
    return out


def save_run_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: dict[str, Tensor],
                        opt: torch.optim.Optimizer, state: dict, keep_last: int = 2, config: dict | None = None,
                        scaler: Any = None) -> Path:
    """Write ``out/step_N`` atomically (:func:`save_checkpoint_folder`) with the weights, EMA, optimizer state,
    ``state`` JSON, the run's resolved ``config`` (``config.json``, when given) and the loss ``scaler``'s state
    (:data:`SCALER`, when given: fp16 runs); keep the ``keep_last`` newest. Returns the folder."""

    def write(tmp: Path) -> None:
        save_tensors(state_tensors(model), tmp / "model.safetensors")
        save_tensors(ema, tmp / "ema.safetensors")
        torch.save(opt.state_dict(), tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
        if config is not None:
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_scaler(scaler, tmp)

    return save_checkpoint_folder(out, step, write, keep_last)


def save_scaler(scaler: Any, folder: Path) -> None:
    """Write a loss scaler's state (a ``torch.amp.GradScaler``; ``None``: none, nothing written) as
    ``folder/``:data:`SCALER`."""
    if scaler is not None:
        torch.save(scaler.state_dict(), folder / SCALER)


def read_scaler(ckpt: Path) -> dict | None:
    """Checkpoint ``ckpt``'s loss-scaler state (:data:`SCALER`); ``None`` when it holds none (no fp16, or saved
    before checkpoints held it); ``ValueError`` naming the file when it is damaged."""
    return read_part(ckpt, SCALER, load_optim) if (ckpt / SCALER).is_file() else None


def scaler_restarts(ckpt: Path) -> str:
    """What a resume says when the run has a loss scaler but checkpoint ``ckpt`` holds no state for it."""
    return (f"checkpoint {ckpt} holds no loss-scaler state (saved by an older version): the fp16 loss scale "
            "restarts, so this run does not continue bit-exactly")


def restore_scaler(scaler: Any, saved: dict | None, ckpt: Path) -> bool:
    """Load ``saved`` (:func:`read_scaler` of checkpoint ``ckpt``) into the run's loss ``scaler`` (``None``: the
    run has none, nothing to do). Returns ``False`` when the run has a scaler but the checkpoint held no state
    for it, so its scale restarts; ``ValueError`` naming the checkpoint when the state does not fit."""
    if scaler is None or saved is None:
        return scaler is None
    try:
        scaler.load_state_dict(saved)
    except (RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {ckpt}: {SCALER} does not fit this run's loss scaler ({exc})") from None
    return True


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """``tensors`` (moved to the CPU) as a safetensors file with normal permissions."""
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))
    default_mode(path)  # safetensors writes owner-only files


def save_checkpoint_folder(out: Path, step: int, write: Callable[[Path], None], keep_last: int = 2) -> Path:
    """Make ``out/step_N`` atomically: ``write(tmp)`` fills a temp folder, which is renamed into place, then the
    ``latest`` pointer is replaced; the ``keep_last`` newest ``step_*`` folders are kept. Returns the folder."""
    final = out / f"step_{step:07d}"
    out.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(final, folder=True)  # .step_N.XXXXXXXX.tmp: a save that overlaps another has its own
    try:
        write(tmp)
        default_mode(tmp)  # mkdtemp makes it owner-only
        if final.exists():  # moved aside, not deleted first: ``latest`` may point to it until the new one is in place
            old = out / f".step_{step:07d}.old"
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:  # an error or Ctrl-C mid-save (a rename too): no temp folder stays in the run folder
        shutil.rmtree(tmp, ignore_errors=True)  # a stranded .step_N.old is recovered by the next run (_stranded)
        raise
    with published(out / "latest") as (latest,):
        latest.write_text(final.name)
    for old in sorted(out.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _stranded(out: Path) -> dict[str, Path]:
    """Complete checkpoints a save killed between its two renames left moved aside (``.step_N.old`` with no
    ``step_N``), by the name they had."""
    found = {}
    for old in out.glob(".step_*.old"):
        name = old.name[1:-len(".old")]
        if not (out / name).exists() and (old / "state.json").is_file():
            found[name] = old
    return found


def remove_partial_saves(out: Path) -> None:
    """Clean up after a save killed hard (SIGKILL) in ``out``: a moved-aside checkpoint whose replacement never
    took its place gets its name back; the other temp and moved-aside folders are removed."""
    for name, old in _stranded(out).items():
        old.rename(out / name)
    for partial in [*out.glob(".step_*.tmp"), *out.glob(".step_*.old")]:
        shutil.rmtree(partial, ignore_errors=True)


@contextmanager
def discarded_unless_saved(out: Path, enabled: bool = True) -> Iterator[None]:
    """Run a block that makes the run folder ``out``; if it raises, or ends, before ``out`` holds a checkpoint
    (it failed, or stopped before its first step: ``stop_at`` 0, a spent wall budget), remove what it wrote:
    ``config.json`` where there was none, and the folders it created (only while empty). A first run that saved
    nothing thus leaves nothing that looks like a run folder. ``enabled``: the process that writes ``out``."""
    path = Path(os.path.realpath(out))  # '..' resolved as the run resolves it (train: os.path.realpath)
    made = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    config = path / "config.json"
    had_config = config.exists()

    def discard() -> None:
        if enabled and latest_checkpoint(path) is None:
            if not had_config:
                config.unlink(missing_ok=True)
            for folder in made:
                try:
                    folder.rmdir()
                except OSError:  # not empty (something else was put there), or never made
                    break

    try:
        yield
    except BaseException:
        discard()
        raise
    discard()


def read_part(ckpt: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """``read(ckpt / name)``, a damaged or missing file raised as ``ValueError`` naming it."""
    try:
        return read(ckpt / name)
    except Exception as exc:  # safetensors, torch.load and OS errors alike
        raise ValueError(f"checkpoint {ckpt}: cannot read {name} ({exc}); delete that folder to resume from the "
                         "newest one before it, or use a new --out") from None


def changed_fields(before: dict[str, Any], now: dict[str, Any], resumable: frozenset[str]) -> list[str]:
    """``"field old -> new"`` for every recipe field of ``now`` that differs from ``before`` and is not in
    ``resumable`` (what a resumed run may change): the refusal of a resume with another recipe names these."""
    return [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k not in resumable and now[k] != before[k]]


def read_state(ckpt: Path) -> dict:
    """A checkpoint's ``state.json``; ``ValueError`` naming it when damaged."""
    state = read_part(ckpt, "state.json", lambda p: json.loads(p.read_text()))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(
            state.get("elapsed_s"), (int, float)):
        raise ValueError(f"checkpoint {ckpt}: state.json lacks an integer step or a number elapsed_s; delete that "
                         "folder to resume from the newest one before it, or use a new --out")
    state.setdefault("evals", [])
    state.setdefault("losses", [])
    return state


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint folder ``out/latest`` points to; where that is missing (deleted, or a save interrupted
    before the pointer was written) or damaged (not the name of a complete folder in ``out``), the newest complete
    ``step_*`` folder (or the moved-aside copy of one whose re-save was killed mid-way, which
    :func:`remove_partial_saves` then puts back); ``None`` when there is none."""
    ptr = out / "latest"
    if ptr.is_file():
        name = ptr.read_bytes().decode("utf-8", errors="replace").strip()
        path = out / name
        if name.startswith("step_") and Path(name).name == name and (path / "state.json").is_file():
            return path
    done = {p.name: p for p in out.glob("step_*") if (p / "state.json").is_file()}
    done = {**_stranded(out), **done}  # a save killed between its renames: the moved-aside copy
    return done[max(done)] if done else None


def load_optim(path: Path) -> dict:
    """An ``optim.pt`` (tensors only: ``weights_only=True``, nothing else is unpickled)."""
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:  # damaged, or holds more than tensors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"not a tensors-only torch file ({first[:160]})") from None


def load_into(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load ``tensors`` into ``model``; ``ValueError`` unless they fit (only shared tensors may be missing)."""
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False)
    except RuntimeError as exc:  # shapes differ: another architecture
        own = model.state_dict()
        mismatched = [k for k, v in tensors.items() if k in own and own[k].shape != v.shape]
        raise ValueError(f"checkpoint does not fit the model: {len(mismatched)} tensors of another shape "
                         f"(e.g. {mismatched[:3]})") from exc
    shared_ok = all(k.startswith("ref_embedder.patch_embed.") for k in missing)
    if unexpected or not shared_ok:
        raise ValueError(f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}")


def check_ema_fits(ema: dict[str, Tensor], want: dict[str, Tensor], ckpt: Path) -> None:
    """``ValueError`` naming checkpoint ``ckpt``'s ``ema.safetensors`` unless it holds exactly ``want``'s tensors,
    each of its shape (else the run would fail at its first EMA update)."""
    missing, unexpected = sorted(set(want) - set(ema)), sorted(set(ema) - set(want))
    reshaped = [k for k in want if k in ema and ema[k].shape != want[k].shape]
    if missing or unexpected or reshaped:
        raise ValueError(f"checkpoint {ckpt}: ema.safetensors does not fit this run's model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, reshaped {reshaped[:3]}); delete that folder to resume from "
                         "the one before it, or use a new --out")


def check_optim_fits(opt: torch.optim.Optimizer, ckpt: Path) -> None:
    """``ValueError`` naming checkpoint ``ckpt``'s ``optim.pt`` unless every loaded per-parameter state tensor
    (AdamW's moments) has its parameter's shape (``load_state_dict`` does not check; the first step would fail)."""
    for group in opt.param_groups:
        for param in group["params"]:
            for name, value in opt.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise ValueError(f"checkpoint {ckpt}: optim.pt does not fit this run's optimizer ({name} of shape "
                                     f"{tuple(value.shape)} for a parameter of shape {tuple(param.shape)}); delete "
                                     "that folder to resume from the one before it, or use a new --out")


def export_conflict(run: str | Path, path: str | Path) -> str | None:
    """Why exporting run folder ``run`` to ``path`` would damage the run, else ``None``: the export's JSON
    (``path`` with ``.json``) would replace the run's ``config.json``, or either file would go into a checkpoint
    folder (``step_*``: its files are the checkpoint's, and older folders are deleted as the run goes on), or the
    JSON is a file that no export wrote (another run's ``config.json``, a recipe): an earlier export's metadata
    (a JSON object with a model ``config``) may be replaced."""
    root = Path(os.path.realpath(run))
    for file in (Path(path), Path(path).with_suffix(".json")):
        real = Path(os.path.realpath(file))
        if real == root / "config.json":
            return f"its metadata {file} would replace the run folder's own config.json (its recipe)"
        if root in real.parents and real.relative_to(root).parts[0].lstrip(".").startswith("step_"):
            return f"{file} would go into the run folder's checkpoint folder {real.relative_to(root).parts[0]}"
    meta = Path(path).with_suffix(".json")
    if meta.is_file() and not _is_export_metadata(meta):
        return (f"its metadata {meta} would replace a file that is not an exported checkpoint's metadata (a recipe, "
                "another run's config.json?)")
    return None


def _is_export_metadata(path: Path) -> bool:
    """Whether the JSON file ``path`` is what an export (:func:`tokensparse.models.save_checkpoint`) writes beside
    its weights: an object whose ``config`` is an object (the model's config)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(found, dict) and isinstance(found.get("config"), dict)
