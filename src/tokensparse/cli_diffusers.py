"""``tokensparse generate``: reference-conditioned generation with a diffusers pipeline and Sparse Context.

    tokensparse generate --model black-forest-labs/FLUX.2-klein-4B --ref a.png --ref b.png \\
        --prompt "the cat from image 1 on the sofa from image 2" --keep 0.25 --selector uniform --out out.png

``--model`` is a Hub id or a local pipeline directory (``save_pretrained`` layout); a local directory is
loaded with ``local_files_only`` so it works offline. Sparse Context runs on FLUX.2 [klein] / FLUX.2
(``Flux2KleinPipeline``, ``Flux2Pipeline``, ``Flux2KleinKVPipeline``), FLUX.1 Kontext, Qwen-Image-Edit(-Plus),
LongCat-Image-Edit, Bria FIBO Edit, Fibo 2.0 (``BriaFibo2Pipeline``), Qwen-Image 2.1 (``QwenImage21Pipeline``),
Z-Image Omni (whose VAE runs in bfloat16: its pipeline casts the references to it), GLM-Image (``GlmImagePipeline``,
which needs ``--height`` and ``--width``), JoyImage Edit (``JoyImageEditPipeline``: one reference;
``JoyImageEditPlusPipeline``: several), OmniGen (``OmniGenPipeline``: several, each placed by
``<img><|image_k|></img>`` in ``--prompt``) and Qwen-Image-Layered (``QwenImageLayeredPipeline``: the one ``--ref``
decomposed into ``--layers`` RGBA layers, written as ``OUT-layer1.png``, ...: :mod:`.cli_layered`); any other
pipeline whose model token merging supports (Stable Diffusion, SDXL, PixArt, SD3, FLUX.1, Chroma, Ovis-Image, Bria
3.x (``BriaPipeline``), Bria FIBO, Fibo 2.0, Z-Image, Lumina 2, CogView4, Sana, HunyuanDiT, AuraFlow, HiDream-I1,
HunyuanImage 2.1, CogView3-Plus, ERNIE-Image, Lumina-Next, Krea 2, Ideogram 4: ``--guidance`` replaces its 48-step
guidance schedule) runs with ``--merge`` alone. The functions here are plain typer-annotated functions;
``tokensparse.cli`` registers them as commands.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_checks import (
    LAYERED_OUTPUT,
    ONE_REFERENCE,
    check_mergeable,
    check_model,
    check_out,
    check_out_not_ref,
    check_pipeline,
    check_placeholders,
    check_png_out,
    fail,
    flag_names,
    large_images_named,
    model_index,
    pipeline_class,
    warn,
)
from .cli_layered import check_layer_outs, default_layers, save_layers
from .images import MAX_SIDE, load_rgba, save_png

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# what --model's user does with a RefDiT .safetensors instead (check_model; {model}: the path, quoted)
REFDIT_GENERATE = ("generate runs only diffusers pipelines: generate with it from Python, "
                   "tokensparse.generate(tokensparse.load_model({model}), references, prompt)")
REFDIT_TRAIN = ("train-lora trains only diffusers pipelines: fine-tune a RefDiT with tokensparse train, its recipe's "
                '"init": {model}')


# pipelines whose call casts the reference pixels to bfloat16 before its VAE (which then has to be bfloat16)
_BF16_VAE = ("ZImageOmniPipeline",)


def _load_refs(paths: list[Path]) -> list[Any]:
    """The ``--ref`` images as RGBA (:func:`~tokensparse.images.load_rgba`: ``.convert("RGB")`` gives ``load_rgb``'s
    pixels), each file read once (a pipe can be read once only); one line and exit 1 for one that cannot be read."""
    from PIL import UnidentifiedImageError

    images = []
    for path in paths:
        if path.is_dir():
            fail(f"reference image {path} is a folder; pass image files (--ref a.png --ref b.png)")
        if not path.exists():  # not is_file(): a pipe is readable (`--ref <(curl ...)`, /dev/stdin)
            fail(f"reference image {path} does not exist")
        try:
            with large_images_named("reference image"):
                images.append(load_rgba(path))
        except (UnidentifiedImageError, OSError, ValueError) as exc:  # load_rgb's ValueError names the file
            fail(f"reference: {exc}")
    return images


def _loading_bars_off() -> None:
    """Hide diffusers' and transformers' loading bars (tqdm, on stderr) where stderr is no terminal: in a log file
    or a pipe they are runs of carriage returns and cursor-up escapes, not bars (the denoising bar is shown on a
    terminal only as well)."""
    if sys.stderr.isatty():
        return
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:  # a pipeline without a transformers text encoder
        return
    transformers_logging.disable_progress_bar()


def _merge_depth(pipe: Any) -> int:
    """``max_downsample`` for token merging: the finest level of the pipeline's UNet that has attention (SDXL's top
    level has none: 2), else 1 (DiTs have one token grid)."""
    types = getattr(getattr(getattr(pipe, "unet", None), "config", None), "down_block_types", None) or ()
    return next((2 ** level for level, kind in enumerate(types) if "Attn" in kind), 1)


# pipelines whose sizes are coarser than their VAE and transformer patches make them: GLM-Image's prior plans the
# target at half its DiT's token grid (its check_inputs: multiples of vae_scale_factor * patch_size * 2, 32 px)
_SIZE_FACTOR = {"GlmImagePipeline": 2}


def size_multiple(pipe: Any, kind: str) -> int | None:
    """The pixel multiple ``pipe`` (a pipeline of class ``kind``, or of a subclass of it) makes its images' height and
    width in: the largest of its image processor's ``vae_scale_factor`` (FLUX-style pipelines count their 2x2 latent
    packing in it) and its ``vae_scale_factor`` times its transformer's (spatial) ``patch_size`` (the image processor
    of SD3, CogView4, GLM-Image, JoyImage counts the VAE alone), times :data:`_SIZE_FACTOR`'s factor for ``kind``;
    ``None`` where neither is known (a UNet pipeline without an image processor). A pipeline that bins resolutions
    (``use_resolution_binning``: PixArt, Sana, HunyuanDiT) makes its latents at a bin's size and resizes the image back
    to the size asked: its image processor's multiple (what its check takes) alone."""
    processor = getattr(getattr(getattr(pipe, "image_processor", None), "config", None), "vae_scale_factor", None)
    vae = getattr(pipe, "vae_scale_factor", None) or getattr(pipe, "vae_scale_factor_spatial", None)
    patch = getattr(getattr(getattr(pipe, "transformer", None), "config", None), "patch_size", None)
    try:
        binned = "use_resolution_binning" in inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):  # no signature to read
        binned = False
    if binned:
        patch = None
    if isinstance(patch, (list, tuple)) and patch:  # (t, h, w) patches of video-style transformers (JoyImage)
        patch = patch[-1]
    known = [m for m in (processor, vae * patch if isinstance(vae, int) and isinstance(patch, int) else None)
             if isinstance(m, int) and not isinstance(m, bool)]
    return max(known) * _SIZE_FACTOR.get(kind, 1) if known else None


def _warn_size(pipe: Any, name: str, kind: str, height: int | None, width: int | None) -> bool:
    """Warn (and return True) where ``--height`` / ``--width`` is not a multiple of the pixel multiple ``pipe`` makes
    images in (:func:`size_multiple`): diffusers rounds such a size (FLUX, Qwen-Image: down, with a log line that does
    not say to what) or refuses it (Stable Diffusion, SD3, CogView4, GLM-Image); the warning names the nearest
    multiples."""
    multiple = size_multiple(pipe, kind)
    if multiple is None or multiple < 2:
        return False

    def nearest(value: int) -> str:
        low, high = value // multiple * multiple, (value // multiple + 1) * multiple
        return f"{low} or {high}" if low else str(high)

    odd = [f"--{key} {value} (nearest: {nearest(value)})"
           for key, value in (("height", height), ("width", width)) if value is not None and value % multiple]
    if odd:
        warn(f"{name} makes images in multiples of {multiple} px (or more): it resizes or refuses "
             f"{', '.join(odd)}")
    return bool(odd)


def _device_and_dtype(device: str, dtype: str) -> tuple[str, Any]:
    import torch

    if device == "auto":
        device = (
            "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        )
    if dtype not in _DTYPES:
        fail(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        fail(f"--device {device!r} is not a torch device (auto, cpu, cuda, cuda:1, mps)")
    if kind == "cuda" and not torch.cuda.is_available():
        fail(f"--device {device}: this torch build sees no CUDA GPU")
    if kind == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {device}: MPS is not available here")
    if kind not in ("cpu", "cuda", "mps"):
        fail(f"--device {device!r} is not supported (auto, cpu, cuda, cuda:1, mps)")
    if dtype == "auto":
        dtype = "bfloat16" if kind == "cuda" else "float32"  # any CUDA device: cuda, cuda:1, ...
    if dtype == "float16" and kind == "cpu":  # runs with today's torch, so a warning (diffusers': one per module)
        warn("--dtype float16 on the CPU: not every op has a float16 CPU kernel, so a pipeline may fail or run "
             "slowly; float32 (auto's choice on the CPU) or bfloat16 suit the CPU")
    return device, getattr(torch, dtype)


def generate(
    model: Annotated[
        str, typer.Option("--model", "-m", help="diffusers pipeline: Hub id or local directory")
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="text prompt / edit instruction")],
    ref: Annotated[
        list[Path] | None, typer.Option("--ref", "-r", help="reference image (repeat for several)")
    ] = None,
    keep: Annotated[float, typer.Option(help="fraction of each reference's tokens kept, in (0, 1]")] = 0.25,
    selector: Annotated[str, typer.Option(help="token scorer (tokensparse.selection.SCORERS)")] = "uniform",
    merge: Annotated[
        float, typer.Option(help="token merging: fraction of the target's tokens merged per block, in [0, 1) (0: off)")
    ] = 0.0,
    steps: Annotated[int | None, typer.Option(help="denoising steps (default: the pipeline's)")] = None,
    guidance: Annotated[float | None, typer.Option(help="guidance scale (default: the pipeline's)")] = None,
    height: Annotated[int | None, typer.Option(help="output height in pixels: a multiple of the pipeline's (16 for "
                                                    "FLUX / Qwen-Image, 32 for GLM-Image; others it resizes, with a "
                                                    "warning, or refuses)")] = None,
    width: Annotated[int | None, typer.Option(help="output width in pixels (a multiple, as --height)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the diffusion noise and of the selection")] = 0,
    out: Annotated[Path, typer.Option("--out", "-o", help="output PNG (replaced if it exists); Qwen-Image-Layered "
                                      "writes its layers as OUT-layer1.png, OUT-layer2.png, ... instead (out.png -> "
                                      "out-layer1.png, ...: replaced as a set; an earlier run's extra layers are "
                                      "left, with a warning)")] = Path("out.png"),
    layers: Annotated[int | None, typer.Option(help="Qwen-Image-Layered: how many RGBA layers to decompose the --ref "
                                               "into, >= 1 (default: the pipeline's, 4)")] = None,
    cache: Annotated[
        bool, typer.Option(help="reference K/V cache (FLUX.2 klein: runs Flux2KleinKVPipeline)")
    ] = False,
    proportional: Annotated[
        bool, typer.Option(help="proportional attention: a kept token gets log(tokens it stands for) added to its "
                                "attention logits (FLUX.2 / Kontext / OmniGen, not with --cache)")
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, mps")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="auto (bfloat16 on CUDA, else float32), float32, bfloat16, float16 (on the CPU: "
                               "a warning, not every op has it there)")
    ] = "auto",
) -> None:
    """Generate one image from reference images with Sparse Context (and, with --merge, token merging).

    Text-to-image pipelines whose model token merging supports (Stable Diffusion, SDXL, PixArt, SD3, FLUX.1, Chroma,
    Ovis-Image, Bria 3.x, Bria FIBO, Fibo 2.0, Z-Image, Lumina 2, CogView4, Sana, HunyuanDiT, AuraFlow, HiDream-I1,
    HunyuanImage 2.1, CogView3-Plus, ERNIE-Image, Lumina-Next, Krea 2, Ideogram 4) run with token merging alone
    (--merge).
    Qwen-Image-Layered decomposes its one --ref into --layers RGBA layers, written as OUT-layer1.png,
    OUT-layer2.png, ...
    """
    try:
        import diffusers
        import torch
    except ImportError:
        fail("tokensparse generate needs diffusers: pip install 'tokensparse[diffusers]'")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .context import SparseContextConfig
    from .integrations.classes import known_name
    from .integrations.diffusers import apply_sparse_context_diffusers
    from .integrations.diffusers_models import PIPELINES
    from .integrations.merging_hooks import apply_token_merging
    from .merging import TokenMergingConfig

    try:
        cfg = SparseContextConfig(keep=keep, selector=selector, seed=seed, cache=cache, proportional=proportional)
    except (TypeError, ValueError) as exc:
        fail(flag_names(str(exc), ("keep", "selector", "seed")))
    if proportional and cache:
        fail("--proportional cannot be combined with --cache (FLUX.2's K/V processors drop the attention mask that "
              "carries the bias)")
    if not 0.0 <= merge < 1.0:
        fail(f"--merge must be in [0, 1), got {merge:g}")
    if guidance is not None and not math.isfinite(guidance):
        fail(f"--guidance must be a finite number, got {guidance}")
    check_png_out(out)
    check_out_not_ref(out, list(ref or []))
    for name, value, low, high in (("--steps", steps, 1, None), ("--height", height, 16, MAX_SIDE),
                                   ("--width", width, 16, MAX_SIDE), ("--layers", layers, 1, None)):
        if value is not None and value < low:
            fail(f"{name} must be >= {low}, got {value}")
        if value is not None and high is not None and value > high:
            fail(f"{name} must be <= {high} pixels (FLUX.2 / Kontext / Qwen-Image work up to about 2048), got {value}")
    refs = _load_refs(list(ref or []))
    device, torch_dtype = _device_and_dtype(device, dtype)
    check_model(model, REFDIT_GENERATE)
    local = Path(model).is_dir()
    if not local and Path(model).exists():  # neither a folder nor a file (check_model): a device, a FIFO
        fail(f"--model {model} is not a pipeline directory")
    from .models.zoo import CHECKPOINTS, CONFIGS

    if not local and model in {**CONFIGS, **CHECKPOINTS}:
        fail(f"--model {model} is a RefDiT: generate runs diffusers pipelines; generate with RefDiTs from Python "
              "(tokensparse.generate) or see tokensparse demo")
    sizes = tuple(key for key, value in (("height", height), ("width", width)) if value is not None)
    checks = (len(refs), cache, proportional, merge, sizes, layers is not None)
    try:
        index = model_index(Path(model)) if local else None
    except ValueError as exc:
        fail(str(exc))
    saved = pipeline_class(index)  # the class a local folder names: checked before loading
    check_pipeline(saved, *checks)
    check_placeholders(saved, prompt, len(refs))
    if saved in LAYERED_OUTPUT:  # the layer files, before loading (else after)
        check_layer_outs(out, layers or default_layers(getattr(diffusers, saved, None)) or 1, list(ref or []))
    if local and merge > 0:
        check_mergeable(Path(model), index)
    _loading_bars_off()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, dtype=torch_dtype, local_files_only=local)
    except Exception as exc:  # noqa: BLE001 - loading errors come in many types; show them plainly
        fail(f"cannot load pipeline {model!r}: {type(exc).__name__}: {exc}")
    name = type(pipe).__name__
    kind = known_name(type(pipe), PIPELINES) or name  # a subclass of a supported pipeline: its base
    check_pipeline(name, *checks, cls=type(pipe))
    check_placeholders(name, prompt, len(refs), cls=type(pipe))
    layered = kind in LAYERED_OUTPUT  # its call reads RGBA pixels and returns a list of RGBA layers
    if layered:
        check_layer_outs(out, layers or default_layers(type(pipe)) or 1, list(ref or []))
    refs = [image if layered else image.convert("RGB") for image in refs]
    if cache and kind == "Flux2KleinPipeline":  # same weights, reference K/V computed once
        pipe = diffusers.Flux2KleinKVPipeline.from_pipe(pipe)
        name = kind = "Flux2KleinKVPipeline"
    in_context = kind in PIPELINES  # else a text-to-image pipeline: token merging alone
    merge_cfg = TokenMergingConfig(ratio=merge, seed=seed, max_downsample=_merge_depth(pipe))
    try:
        if in_context:
            apply_sparse_context_diffusers(pipe, cfg)
        if not merge_cfg.is_identity:
            apply_token_merging(pipe, merge_cfg)
    except (TypeError, ValueError) as exc:
        fail(str(exc))
    pipe.to(device, silence_dtype_warnings=True)  # float16 on the CPU: warned once above, not once per module
    if kind in _BF16_VAE and refs and pipe.vae.dtype != torch.bfloat16:
        torch.nn.Module.to(pipe.vae, torch.bfloat16)  # else: "Input type (BFloat16) and bias type (float) ..."
    pipe.set_progress_bar_config(disable=True)

    params = inspect.signature(type(pipe).__call__).parameters
    kwargs: dict[str, Any] = {"prompt": prompt, "generator": torch.Generator(device="cpu").manual_seed(seed)}
    if refs:
        # JoyImageEditPlusPipeline: images; OmniGenPipeline: input_images
        key = next((k for k in ("image", "input_images") if k in params), "images")
        kwargs[key] = refs[0] if kind in ONE_REFERENCE else refs
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    if layers is not None:
        kwargs["layers"] = layers
    if guidance is not None:
        key = "true_cfg_scale" if kind.startswith("QwenImage") else "guidance_scale"  # Qwen: true CFG only
        if key not in params:
            fail(f"{name} takes no guidance scale")
        kwargs[key] = guidance
        if key == "true_cfg_scale":
            kwargs["negative_prompt"] = " "
    elif kind.startswith("QwenImage") and "true_cfg_scale" in params:
        # no negative prompt, so no true CFG either way: its default (4.0) only logged "true_cfg_scale is passed as
        # 4.0, but classifier-free guidance is not enabled"; 1.0 runs the same
        kwargs["true_cfg_scale"] = 1.0
    schedule = params.get("guidance_schedule")  # Ideogram 4: a per-step schedule by default, for its default steps
    if schedule is not None and schedule.default is not None:
        if guidance is not None:
            kwargs["guidance_schedule"] = None  # it takes a constant scale or a schedule, not both
        elif steps is not None and steps != len(schedule.default):
            fail(f"{name}'s default guidance schedule has {len(schedule.default)} steps, not --steps {steps}: give "
                 f"--guidance (a constant scale for every step) or --steps {len(schedule.default)}")
    for key, value in (("height", height), ("width", width)):
        if value is not None:
            kwargs[key] = value
    if "max_area" in params and (height or width):  # Kontext rescales any size to max_area (1024^2) otherwise
        side = getattr(pipe, "default_sample_size", 128) * getattr(pipe, "vae_scale_factor", 8)
        kwargs["max_area"] = (height or side) * (width or side)
    warned = _warn_size(pipe, name, kind, height, width)
    total = steps or params["num_inference_steps"].default

    with Progress(
        TextColumn("[bold]denoising"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        transient=True,
        disable=not sys.stdout.isatty(),  # a bar only on a terminal (piped output got a stray empty line)
    ) as progress:
        task = progress.add_task("denoise", total=total)

        def on_step_end(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            progress.update(task, completed=step + 1)
            return callback_kwargs

        if "callback_on_step_end" in params:
            kwargs["callback_on_step_end"] = on_step_end
        try:
            with torch.inference_mode():
                image = pipe(**kwargs).images[0]
        except ValueError as exc:  # the pipeline's own input checks (image too small, bad size, ...)
            fail(f"{name} rejected the inputs: {exc}")
    kept = ((f"keep={cfg.keep:g}, selector={cfg.selector}" + (", proportional" if proportional else "")
             + (", K/V cache" if cache else "")) if in_context and refs else "no Sparse Context")
    kept += f", merge={merge:g}" if merge else ""
    if layered:
        written = save_layers(image, out, name)
        typer.echo(f"wrote {', '.join(map(str, written))} ({name}, {len(refs)} reference(s), {kept}, "
                   f"{len(written)} layer{'s' if len(written) > 1 else ''})")
        return
    asked = (width or image.width, height or image.height)
    if image.size != asked and not warned:  # rounded by a rule the warning before did not know
        warn(f"{name} made a {image.width}x{image.height} image, not the {asked[0]}x{asked[1]} asked (its multiple)")
    try:
        save_png(image, out)
    except OSError as exc:  # save_png's message names the file
        fail(str(exc))
    typer.echo(f"wrote {out} ({name}, {len(refs)} reference(s), {kept})")


def train_lora(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Flux2KleinPipeline: Hub id or local directory")
    ],
    data: Annotated[Path, typer.Option(help="folder of examples: <name>/ref*.png, target.png, prompt.txt")],
    out: Annotated[str, typer.Option("--out", "-o", help="output folder for the LoRA weights and checkpoints (a "
                                     "run of the same recipe there resumes)")],
    steps: Annotated[int, typer.Option(help="optimizer steps")] = 500,
    lr: Annotated[float, typer.Option(help="learning rate")] = 1e-4,
    rank: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    keep_min: Annotated[float, typer.Option(help="smallest keep ratio drawn per step (largest: 1)")] = 0.1,
    resolution: Annotated[int, typer.Option(help="training resolution in pixels (multiple of 16): references and "
                                            "target are scaled and center-cropped to this square")] = 512,
    seed: Annotated[int, typer.Option(help="seed of sampling, noise and dropping")] = 0,
    save_every: Annotated[int, typer.Option(help="checkpoint every this many steps (and at the end)")] = 100,
) -> None:
    """Fine-tune a FLUX.2 \\[klein] LoRA with random reference-token dropping.

    Checkpoints go to OUT/checkpoints; running again into OUT with the same recipe (more --steps allowed)
    resumes from the newest one."""
    missing = [name for name in ("diffusers", "peft", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"tokensparse train-lora needs diffusers, peft and accelerate ({', '.join(missing)} not installed): "
             "pip install 'tokensparse[diffusers,train]'")
    import diffusers

    from .integrations.diffusers_lora import (
        LoraCheckpointError,
        LoraTrainConfig,
        LoraWriteError,
        check_data_out,
        check_lora_run,
        examples_digest,
        find_checkpoint,
        load_examples,
        train_lora_sparse,
    )

    if not out.strip():  # a str: Path('') would be '.', and train into the current directory
        fail("--out must name a folder for the LoRA run, got ''")
    out = Path(out)
    check_out(out, None)
    try:
        cfg = LoraTrainConfig(
            steps=steps, lr=lr, rank=rank, keep_min=keep_min, resolution=resolution, seed=seed, save_every=save_every
        )
        check_data_out(data, out)
        with large_images_named("training image"):
            examples = load_examples(data)
        resume = find_checkpoint(out, cfg, examples_digest(examples))  # refused before loading the pipeline
    except (ValueError, OSError) as exc:
        fail(flag_names(str(exc), ("steps", "lr", "rank", "keep_min", "resolution", "seed", "save_every")))
    check_model(model, REFDIT_TRAIN)
    local = Path(model).is_dir()
    from .integrations.diffusers_lora import SUPPORTED

    try:
        name = pipeline_class(model_index(Path(model)) if local else None)
    except ValueError as exc:
        fail(str(exc))
    if name is not None and name not in SUPPORTED:  # before loading it
        fail(f"LoRA training supports {SUPPORTED}, got {name}")
    _loading_bars_off()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(model, local_files_only=local)
    except Exception as exc:  # noqa: BLE001
        fail(f"cannot load pipeline {model!r}: {type(exc).__name__}: {exc}")
    every = max(1, steps // 20)

    def log(step: int, keep: float, loss: float) -> None:
        if step % every == 0 or step == steps - 1:
            typer.echo(f"step {step:5d}  keep {keep:.2f}  loss {loss:.4f}")

    try:
        check_lora_run(pipe, out)  # what can be refused before training
    except (TypeError, ValueError, OSError) as exc:
        fail(str(exc))
    if resume is not None:
        typer.echo(f"resuming from {resume[0]} at step {resume[1]['step']} of {steps}")
    try:
        train_lora_sparse(pipe, examples, cfg, out, log=log)
    except (LoraWriteError, LoraCheckpointError) as exc:  # writing the result failed, or a damaged checkpoint
        fail(str(exc))  # (other errors keep their traceback)
    typer.echo(f"wrote LoRA to {out} (load with pipe.load_lora_weights({str(out)!r}))")
