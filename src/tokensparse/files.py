"""File-writing helpers shared by the places that publish outputs (images, checkpoints, LoRA weights)."""

from __future__ import annotations

import os
from pathlib import Path


def default_mode(path: str | os.PathLike) -> Path:
    """Give ``path`` the permissions a new file normally gets (``0o666`` less the umask).

    Temp-file-then-rename writers (``tempfile.mkstemp``, safetensors' own atomic save) create files
    readable by their owner only; published outputs should not be. Returns ``path``.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return Path(path)
