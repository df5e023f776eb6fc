"""``tokensparse generate`` on pipelines that return several RGBA layers per image (Qwen-Image-Layered,
``QwenImageLayeredPipeline``): how the layers are named from ``--out``, checked before any work, and written.

``--out out.png`` names the layers ``out-layer1.png``, ``out-layer2.png``, ... (``out.png`` itself is not written),
all written as a set (:func:`tokensparse.images.save_pngs`: every layer to a temp file first, then all renamed, Ctrl-C
held meanwhile): a failure or Ctrl-C replaces none of them. Existing files of those names are replaced; layers of an
earlier run with more layers (``out-layer5.png`` after a run of 4) are left as they are, with a warning naming them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

from .cli_checks import check_out, check_out_not_ref, fail, warn


def layer_paths(out: Path, count: int) -> list[Path]:
    """The files ``count`` layers are written to: ``out`` with ``-layer1`` ... ``-layer{count}`` before its suffix
    (``out.png`` -> ``out-layer1.png``, ...; the suffix's case is kept)."""
    return [out.with_name(f"{out.stem}-layer{k}{out.suffix}") for k in range(1, count + 1)]


def stale_layers(out: Path, count: int) -> list[Path]:
    """Files in ``out``'s folder named as :func:`layer_paths` names layers beyond ``count`` (an earlier run's with
    more layers), in layer order."""
    pattern = re.compile(rf"{re.escape(out.stem)}-layer([1-9][0-9]*){re.escape(out.suffix)}")
    try:
        found = [(int(m.group(1)), path) for path in out.parent.iterdir()
                 if (m := pattern.fullmatch(path.name)) and int(m.group(1)) > count]
    except OSError:  # the folder cannot be listed: nothing to say about it
        return []
    return [path for _, path in sorted(found)]


def default_layers(cls: type | None) -> int | None:
    """The layer count a pipeline class's ``__call__`` makes without ``--layers`` (its ``layers`` default), or
    ``None`` where it has none to read."""
    try:
        default = inspect.signature(cls.__call__).parameters["layers"].default
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def check_layer_outs(out: Path, count: int, refs: list[Path]) -> None:
    """Fail before any work when a layer file ``--out`` names (:func:`layer_paths`) is a folder or one of the ``--ref``
    images."""
    for path in layer_paths(out, count):
        check_out(path, ".png", option=f"--out {out}: its layer file")  # "... its layer file PATH is a directory"
        check_out_not_ref(path, refs)


def save_layers(layers: Any, out: Path, name: str) -> list[Path]:
    """Write ``layers`` (a pipeline's list of RGBA images for one input) as :func:`layer_paths` names them, as a set;
    warn of :func:`stale_layers`. Fails in one line when the pipeline returned no layers or a file cannot be
    written."""
    from .images import save_pngs

    if not isinstance(layers, (list, tuple)):
        fail(f"{name} returned a {type(layers).__name__}, not a list of layers")
    if not layers:
        fail(f"{name} returned no layers")
    try:
        paths = save_pngs(list(layers), layer_paths(out, len(layers)))
    except (OSError, TypeError, ValueError) as exc:  # save_pngs' messages name the file
        fail(str(exc))
    stale = stale_layers(out, len(paths))
    if stale:
        warn(f"{', '.join(str(p) for p in stale)}: from an earlier run with more layers, left as they are (this run "
             f"wrote {len(paths)})")
    return paths
