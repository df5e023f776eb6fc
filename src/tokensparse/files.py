"""File helpers shared by the places that publish outputs (images, checkpoints, LoRA weights) or read weights."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor


def default_mode(path: str | os.PathLike) -> Path:
    """Give ``path`` the permissions a new file normally gets (``0o666`` less the umask; a folder ``0o777`` less it).

    Temp-file-then-rename writers (``tempfile.mkstemp`` / ``mkdtemp``, safetensors' own atomic save) create files
    and folders readable by their owner only; published outputs should not be. Returns ``path``.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)
    return Path(path)


@contextmanager
def output_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Make ``folder`` and its missing parents for a block that writes into it, and yield it. If the block raises
    (an error, Ctrl-C, ``SystemExit``), the folders made here are removed again, innermost first and each only
    while empty: a failed write leaves the tree as it found it. A folder that existed before, or that another
    process made meanwhile, is never removed. ``FileExistsError`` / ``NotADirectoryError`` where a file is in the
    way, as ``Path.mkdir`` raises them."""
    folder = Path(folder)
    missing = []
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not missing and not folder.is_dir():
        raise FileExistsError(errno.EEXIST, "a file is in the way", str(folder))
    made: list[Path] = []
    try:
        for path in reversed(missing):  # outermost first
            try:
                path.mkdir()
            except FileExistsError:
                if not path.is_dir():  # a file in the way
                    raise
                continue  # made by another writer meanwhile: not ours to remove
            made.append(path)
        yield folder
    except BaseException:
        for path in reversed(made):
            with contextlib.suppress(OSError):  # not empty (another writer's file): it stays
                path.rmdir()
        raise


def temp_beside(path: str | os.PathLike, folder: bool = False) -> Path:
    """Create an empty temp file (or, with ``folder``, a temp folder) in ``path``'s folder, named
    ``.NAME.XXXXXXXX.tmp`` with a random part no other writer gets, and return it: two writers publishing to one
    ``path`` at once never share a temp file. Its permissions are owner-only (:func:`default_mode` undoes that)."""
    path = Path(path)
    prefix, where = f".{path.name}.", path.parent
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=where))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=where)
    os.close(fd)
    return Path(tmp)


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (``SIGINT``) and ``SIGTERM`` for the block: one that arrives meanwhile is delivered, to the handler
    that was in place (Python's ``KeyboardInterrupt``, the CLI's exit on ``SIGTERM``, the default that ends the
    process), when the block has ended. Only in the main thread (the only one signal handlers can be set in); a
    signal that is ignored, or handled outside Python, is left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for sig in _HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler == signal.SIG_IGN:
            continue
        previous[sig] = handler
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):  # each once, in the order they came
            signal.raise_signal(sig)


@contextmanager
def published(*paths: str | os.PathLike, as_set: bool = False) -> Iterator[list[Path]]:
    """Publish ``paths``, each atomically: yields a temp file beside each (:func:`temp_beside`) for the block to
    write. When the block ends, each gets normal permissions, and then they are renamed onto their paths in order
    (all are written before any is renamed). If the block or a rename raises (an error, Ctrl-C, ``SystemExit``), the
    temp files not yet renamed are removed: a failed write leaves no temp file behind. The paths' folders must exist.

    ``as_set``: the renames run with Ctrl-C and ``SIGTERM`` held (:func:`interrupts_held`), so that either leaves
    none of the paths or all of them replaced, never a mix of new and earlier files (one that comes while the block
    writes replaces none). A rename that fails (an ``OSError``) still leaves the paths renamed before it replaced."""
    tmps: list[Path] = []
    try:
        for path in paths:
            tmps.append(temp_beside(path))
        yield list(tmps)
        for tmp in tmps:
            default_mode(tmp)
        with interrupts_held() if as_set else contextlib.nullcontext():
            while tmps:
                os.replace(tmps[0], paths[len(paths) - len(tmps)])
                tmps.pop(0)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)


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
