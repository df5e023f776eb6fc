"""Checks the CLI makes before it does any work: output paths (:func:`check_out`), and for ``tokensparse generate``
/ ``train-lora`` what a local pipeline folder's ``model_index.json`` and configs tell (checked again on the loaded
pipeline): a wrong option fails in seconds, with a message naming it, instead of after minutes of loading weights.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import typer

from .files import folder_problem
from .integrations.classes import known_name


def fail(message: str) -> None:
    """Print ``error: message`` to stderr and exit with status 1 (every command's way to refuse)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr (one line; the command goes on)."""
    typer.secho(f"warning: {message}", fg=typer.colors.YELLOW, err=True)


@contextlib.contextmanager
def large_images_named(what: str) -> Iterator[None]:
    """While the block reads images (:func:`tokensparse.images.load_rgb`), show each
    :class:`~tokensparse.images.LargeImageWarning` (PIL's decompression-bomb warning, naming the file) as one
    ``warning: {what} PATH: ...`` line instead of Python's ``file:line: LargeImageWarning: ...`` and its source line;
    other warnings show as before. Every command that reads the user's images reads them inside this."""
    from .images import LargeImageWarning

    show = warnings.showwarning

    def show_named(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
        if isinstance(message, LargeImageWarning):
            warn(f"{what} {message.path}: {message.detail} (loading it anyway)")
        else:
            show(message, category, *args, **kwargs)

    with warnings.catch_warnings():  # restores showwarning and the filters
        warnings.simplefilter("always", LargeImageWarning)  # each file's, not the first one's alone
        warnings.showwarning = show_named
        yield


def flag_names(message: str, names: Iterable[str]) -> str:
    """A Python API error's ``message`` as the CLI reports it: each of ``names`` (arguments the user set with a flag,
    ``--`` and the name with ``-`` for ``_``) written as that flag where the message names it as an argument --
    ``keep_min must be ...`` -> ``--keep-min must be ...`` (at the start of the message or of a clause),
    ``per_task=99`` -> ``--per-task=99``, ``unknown selector 'x'`` -> ``unknown --selector 'x'``. Other uses of the
    word, and flags the message already names, stay as they are."""
    for name in names:
        word = re.escape(name)
        pattern = rf"(?:^|(?<=[:;(,] )){word}(?= must\b)|(?:^|(?<=[\s(])){word}(?==)|(?<=\bunknown ){word}(?= )"
        message = re.sub(pattern, "--" + name.replace("_", "-"), message)
    return message


def check_out(out: Path, suffix: str | None = ".png", option: str = "--out") -> None:
    """Fail (one line, exit 1) before any work unless ``out`` is a writable path ending in ``suffix`` -- a file
    path; ``suffix=None``: a folder, existing or not (missing folders are created when saving)."""
    if suffix is not None and out.suffix.lower() != suffix:  # Path("") is ".": say so, not "got ."
        fail(f"{option} must be a {suffix} path, got {out}" + (" (an empty path or the current folder)"
                                                                 if out == Path(".") else ""))
    if suffix is not None and out.is_dir():
        fail(f"{option} {out} is a directory")
    if suffix is None and out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file, not a folder")
    if suffix is None and out.is_dir() and not os.access(out, os.W_OK):
        fail(f"{option} {out}: cannot write in that folder")
    problem = folder_problem(out.absolute().parent)
    if problem is not None:
        fail(f"{option} {out}: {problem}")


def check_png_out(out: Path) -> None:
    """:func:`check_out` for a ``--out`` PNG."""
    check_out(out, ".png")


def check_model(model: str, refdit_hint: str = "") -> None:
    """Fail on an empty ``--model`` (``Path("")`` is the current directory, and Hugging Face's repo-id error
    would follow), one that is a file (a single-file checkpoint is no pipeline folder), or a path that does not
    exist (starting with ``.``, ``/`` or ``~``, as no Hub id does: else a repo-id error, or "not a pipeline
    directory"). ``refdit_hint``: what the command's user does with a RefDiT checkpoint instead, said for a
    ``.safetensors`` file (``tokensparse train --export`` writes one); ``{model}`` in it is the path, quoted."""
    if not model.strip():
        fail("--model must name a local pipeline folder or a Hub id, got an empty string")
    if Path(model).is_file():  # else read as a Hub id: a long Hugging Face error about repo ids
        hint = ""
        if refdit_hint and model.lower().endswith(".safetensors"):
            hint = ("; if it is a RefDiT checkpoint (tokensparse train --export, a run's step_N/ema.safetensors), "
                    + refdit_hint.replace("{model}", json.dumps(model)))
        fail(f"--model {model} is a file; give a diffusers pipeline folder (holding model_index.json) or a Hub id"
             + hint)
    if model.startswith((".", "/", "~")) and not Path(model).exists():  # a path (no Hub id starts so) not there
        fail(f"--model {model} is not a pipeline directory: it does not exist; give a diffusers pipeline folder "
             "(holding model_index.json) or a Hub id")


def model_index(folder: Path) -> dict | None:
    """A saved pipeline folder's (``--model``'s) ``model_index.json``, read once for the checks before loading; None
    where the folder has none (loading says so). ValueError, naming the file, where it cannot be read, is not JSON
    or is not a JSON object (diffusers failed on a list with a TypeError from inside its loader)."""
    path = folder / "model_index.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--model: {path} cannot be read ({exc}); it must be a JSON object") from exc
    try:
        index = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"--model: {path} is not valid JSON ({exc}); it must be a JSON object") from exc
    if not isinstance(index, dict):
        raise ValueError(f"--model: {path} must be a JSON object (the pipeline's class and components), got "
                         f"{type(index).__name__}")
    return index


def pipeline_class(index: dict | None) -> str | None:
    """The pipeline class a :func:`model_index` names (None where there is none)."""
    return None if index is None else index.get("_class_name")


def check_out_not_ref(out: Path, refs: list[Path]) -> None:
    """Fail when ``out`` is the same file as one of the ``--ref`` images (writing it would destroy that input)."""
    if any(out.resolve() == ref.resolve() for ref in refs):
        fail(f"--out {out} is also a --ref image: writing it would overwrite that reference; write elsewhere")


# pipelines whose call takes one reference image (the others take a list)
ONE_REFERENCE = ("FluxKontextPipeline", "QwenImageEditPipeline", "LongCatImageEditPipeline", "JoyImageEditPipeline",
                 "QwenImageLayeredPipeline")
# pipelines whose call reads the size of its reference image unconditionally (no image: AttributeError)
SIZED_BY_REFERENCE = ("QwenImageEditPipeline", "QwenImageEditPlusPipeline", "LongCatImageEditPipeline")
# pipelines that need --height and --width (GLM-Image's prior plans the target's token grid before it reads a reference)
NEEDS_SIZE = ("GlmImagePipeline",)
# pipelines that cache their references' K/V themselves (--cache: nothing to add)
OWN_KV_CACHE = ("GlmImagePipeline", "QwenImage21Pipeline")
# pipelines whose call takes a grid of in-context examples and task / content prompts (from Python only)
GRID_INPUT = ("VisualClozeGenerationPipeline", "VisualClozePipeline")
# pipelines whose call decomposes one RGBA image (the one --ref) into several RGBA layers (--layers of them; no height
# or width: sized from the image), written as OUT-layer1.png, ... (cli_layered)
LAYERED_OUTPUT = ("QwenImageLayeredPipeline",)


def check_placeholders(name: str | None, prompt: str, n_refs: int, cls: type | None = None) -> None:
    """Fail when ``name`` is OmniGen (it places reference ``k`` at ``<img><|image_k|></img>`` in the prompt) and
    ``prompt`` lacks the placeholder of a ``--ref``, or has one naming no ``--ref`` (its processor asserts on it).
    ``cls``: the loaded pipeline's class (a subclass of ``OmniGenPipeline`` is checked too)."""
    if (known_name(cls, ("OmniGenPipeline",)) if cls is not None else name) != "OmniGenPipeline":
        return
    missing = [f"<img><|image_{k}|></img>" for k in range(1, n_refs + 1) if f"<img><|image_{k}|></img>" not in prompt]
    if missing:
        fail(f"{name} places each reference where the prompt says: put {', '.join(missing)} in --prompt")
    extra = sorted({int(k) for k in re.findall(r"<\|image_(\d+)\|>", prompt)} - set(range(1, n_refs + 1)))
    if extra:
        fail(f"{name}: --prompt places {', '.join(f'<img><|image_{k}|></img>' for k in extra)} but {n_refs} --ref "
              "given (one --ref per image placeholder)")


def check_pipeline(name: str | None, n_refs: int, cache: bool, proportional: bool = False, merge: float = 0.0,
                    sizes: tuple[str, ...] = (), layers: bool = False, cls: type | None = None) -> None:
    """Fail on a pipeline class ``generate`` does not run, or a reference count, ``--cache``, ``--proportional``,
    missing ``--merge``, size option (``sizes``: ``"height"`` / ``"width"`` given) or ``--layers`` (``layers``: given)
    it cannot take (``None``: not known before loading, nothing to check). ``cls``: the loaded pipeline's class (else
    diffusers' class ``name``), whose call says which sizes it takes and whether it makes layers; a subclass of a
    supported pipeline is checked as its base (messages name ``name``)."""
    from .integrations.diffusers_models import MASK_PIPELINES, PIPELINES
    from .integrations.diffusers_redux import REDUX_PIPELINES

    if name is None:
        return
    import diffusers

    cls = cls or getattr(diffusers, name, None)
    kind = (known_name(cls, PIPELINES) if isinstance(cls, type) else None) or name  # as the tables below know it
    takes = inspect.signature(cls.__call__).parameters if cls is not None else None
    for key in sizes:
        if takes is not None and key not in takes:
            why = ": it sizes its output from the reference" if kind in PIPELINES else ""
            fail(f"{name} takes no --{key}{why}")
    if layers and takes is not None and "layers" not in takes:
        fail(f"{name} takes no --layers: it makes one image (--layers is Qwen-Image-Layered's layer count)")
    supported = sorted(set(PIPELINES) - set(MASK_PIPELINES) - set(GRID_INPUT))
    if kind in MASK_PIPELINES or kind in GRID_INPUT:
        what = "inpainting pipelines" if kind in MASK_PIPELINES else "it takes a grid of in-context examples"
        fail(f"{name} is not supported here ({what}: from Python); supported: {', '.join(supported)}")
    if (isinstance(cls, type) and known_name(cls, REDUX_PIPELINES)) or name in REDUX_PIPELINES:
        fail(f"{name} is FLUX.1 Redux's prior: it makes a FluxPipeline's prompt embeddings, not an image, so generate "
             "does not run it; apply Sparse Context to it from Python (ts.apply_sparse_context(prior, cfg), then "
             "flux_pipe(**prior(image)))")
    if kind not in PIPELINES:  # text-to-image (SD, SDXL, PixArt, SD3, FLUX.1, Chroma, Z-Image, ...): merging alone
        given = [opt for opt, on in (("--ref", n_refs > 0), ("--cache", cache), ("--proportional", proportional)) if on]
        if given:
            fail(f"{name} takes no reference images here, so {' / '.join(given)} (Sparse Context) cannot apply: "
                  f"Sparse Context runs on {', '.join(supported)}; token merging (--merge) on any pipeline whose "
                  "model it supports")
        if merge == 0:
            fail(f"{name} is not a pipeline Sparse Context runs on ({', '.join(supported)}): give --merge to run it "
                  "with token merging alone")
        return
    if kind in LAYERED_OUTPUT and n_refs != 1:
        fail(f"{name} decomposes one image into layers: give that image as one --ref (got {n_refs})")
    if n_refs > 1 and kind in ONE_REFERENCE:
        fail(f"{name} takes one reference image")
    if n_refs == 0 and kind in SIZED_BY_REFERENCE:
        fail(f"{name} needs a --ref image (it sizes its output from the reference)")
    if kind in NEEDS_SIZE and len(sizes) < 2:
        fail(f"{name} needs --height and --width (its prior plans the target's token grid from them)")
    if cache and kind in OWN_KV_CACHE:
        fail(f"{name} caches its reference images' K/V itself (and Sparse Context thins them): drop --cache")
    if cache and kind not in ("Flux2KleinPipeline", "Flux2KleinKVPipeline"):
        fail(f"--cache needs FLUX.2 [klein] (Flux2KleinPipeline / Flux2KleinKVPipeline); {name} has no reference "
              "K/V cache")
    if proportional and not kind.startswith(("Flux2", "FluxKontext", "OmniGen")):
        fail(f"--proportional needs a FLUX.2 or FLUX.1 Kontext pipeline, or OmniGen: {name}'s attention takes no "
              "logit bias")


def check_mergeable(folder: Path, index: dict | None) -> None:
    """Fail when token merging knows no block of the transformer (or UNet) that a local pipeline folder's
    :func:`model_index` ``index`` names, built from its config on the meta device (no weights read). Silent where
    that cannot be told before loading (no readable ``model_index.json`` or config, a class diffusers lacks): the
    loaded model is checked again."""
    try:
        part, (library, cls_name) = next((p, index[p]) for p in ("transformer", "unet")
                                         if isinstance(index.get(p), list) and len(index[p]) == 2)
    except (AttributeError, StopIteration):  # no index, or no transformer / UNet in it
        return
    import diffusers
    from accelerate import init_empty_weights

    from .integrations.merging_hooks import merging_supports

    cls = getattr(diffusers, cls_name, None) if library == "diffusers" and isinstance(cls_name, str) else None
    if cls is None:
        return
    try:
        with init_empty_weights():
            model = cls.from_config(cls.load_config(folder / part))
    except Exception:  # noqa: BLE001 - a config this diffusers cannot build: loading will say why
        return
    problem = merging_supports(model)
    if problem is not None:
        fail(f"--merge: {index.get('_class_name')}'s {part}: {problem}")
