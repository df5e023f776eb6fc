"""File helpers shared by the places that publish outputs (images, checkpoints, LoRA weights) or read weights."""

from __future__ import annotations

import os
from pathlib import Path

from torch import Tensor


def default_mode(path: str | os.PathLike) -> Path:
    """Give ``path`` the permissions a new file normally gets (``0o666`` less the umask).

    Temp-file-then-rename writers (``tempfile.mkstemp``, safetensors' own atomic save) create files
    readable by their owner only; published outputs should not be. Returns ``path``.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor (where a missing output folder would be made)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(folder: Path) -> str | None:
    """Why files could not be written in ``folder`` (created if missing), or ``None``: the nearest existing
    ancestor is a file, or not writable."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK):
        return f"cannot write in {existing}"
    return None


def read_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """The tensors of a safetensors file; ``ValueError`` naming the file when it is not one (corrupt,
    truncated, another format). Safetensors only: nothing is unpickled."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=device)
    except SafetensorError as exc:
        raise ValueError(f"cannot read {path} as safetensors ({exc})") from None
