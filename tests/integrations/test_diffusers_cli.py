"""``tokensparse generate`` end to end on a tiny random-weight FLUX.2 [klein] pipeline directory (offline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
typer = pytest.importorskip("typer")

from PIL import Image
from typer.testing import CliRunner

from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein

from .contract import generate_app, pipeline_folder, ref_png


@pytest.fixture(scope="module")
def app():
    return generate_app()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "klein"
    tiny_flux2_klein(seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("extra", [[], ["--cache"], ["--cache", "--merge", "0.5"], ["--proportional"]])
def test_generate_writes_png(app, model_dir, tmp_path, extra):
    out = tmp_path / "sub" / "out.png"
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--ref",
        str(ref_png(tmp_path)),
        "--ref",
        str(ref_png(tmp_path, "b.png")),
        "--prompt",
        "a cat",
        "--keep",
        "0.25",
        "--selector",
        "random",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(out),
        *extra,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and ("Flux2KleinKVPipeline" in result.output) == ("--cache" in extra)
    assert ("proportional" in result.output) == ("--proportional" in extra)
    assert ("merge=0.5" in result.output) == ("--merge" in extra)
    with Image.open(out) as im:
        assert im.size == (32, 32)
    assert [p.name for p in out.parent.iterdir()] == ["out.png"]  # no temp file left behind


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--ref": "missing.png"}, "does not exist"),
        ({"--ref": "d.png"}, "is a folder"),
        ({"--keep": "1.5"}, "--keep must be in"),
        ({"--merge": "1"}, "--merge must be in"),
        ({"--guidance": "nan"}, "--guidance must be a finite number"),
        ({"--selector": "nope"}, "unknown --selector"),
        ({"--model": "./no/such/dir"}, "not a pipeline directory"),
        ({"--model": "refdit-sparse"}, "is a RefDiT"),
        ({"--model": ""}, "--model must name a local pipeline folder or a Hub id"),  # was HF's repo-id error
        ({"--steps": "0"}, "--steps must be >= 1"),
        ({"--width": "-32"}, "--width must be >= 1"),
        ({"--height": "100000"}, "--height must be <= 8192"),
        ({"--ref": "notimg.png"}, "cannot read image"),
        ({"--device": "tpu"}, "--device"),
        ({"--device": "cuda"} if not torch.cuda.is_available() else {"--device": "nope:0"}, "--device"),
        ({"--out": "d.png"}, "is a directory"),
        ({"--out": "o.png/x.png"}, "is a file, not a folder"),
    ],
)
def test_generate_clear_errors(app, model_dir, tmp_path, change, message):
    opts = {
        "--model": str(model_dir),
        "--prompt": "a cat",
        "--ref": str(ref_png(tmp_path)),
        "--out": str(tmp_path / "o.png"),
    }
    if change.get("--out") == "o.png/x.png":
        (tmp_path / "o.png").write_bytes(b"")  # a file where a folder would have to be
    (tmp_path / "d.png").mkdir()
    (tmp_path / "notimg.png").write_text("not an image")
    opts.update({k: (str(tmp_path / v) if k in ("--ref", "--out") else v) for k, v in change.items()})
    result = CliRunner().invoke(app, ["generate", *[x for kv in opts.items() for x in kv]])
    assert result.exit_code == 1
    assert message in result.output
    assert not (tmp_path / "o.png").exists() or change.get("--out") == "o.png/x.png"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_a_reference_read_from_a_pipe_is_loaded_not_called_missing(tmp_path):
    import os
    import threading

    from tokensparse.cli_diffusers import _load_refs

    data = ref_png(tmp_path).read_bytes()
    fifo = tmp_path / "ref.fifo"  # what `--ref <(cat a.png)` or `--ref /dev/stdin` hands over: no regular file
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:  # blocks until the reader opens it
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    (image,) = _load_refs([fifo])  # was: "reference image ... does not exist"
    assert image.size == (64, 64) and image.mode == "RGBA"  # RGBA: generate converts it to RGB where RGBA is not read


def test_generate_refuses_an_out_that_is_one_of_its_refs(app, model_dir, tmp_path):
    ref = ref_png(tmp_path)
    before = ref.read_bytes()
    result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--prompt", "a cat", "--ref", str(ref),
                                      "--out", str(tmp_path / "." / ref.name)])
    assert result.exit_code == 1 and "--ref" in result.output and "overwrite" in result.output
    assert ref.read_bytes() == before  # the reference image is left as it was


def test_generate_without_refs_does_not_report_a_keep_it_did_not_apply(app, model_dir, tmp_path):
    result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--prompt", "a cat", "--steps", "1",
                                      "--height", "32", "--width", "32", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "wrote" in x)
    assert "0 reference(s)" in line and "no Sparse Context" in line and "keep=" not in line


def test_loading_bars_stay_out_of_a_log_that_is_no_terminal(app, model_dir, tmp_path):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    try:
        result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--prompt", "a cat", "--steps", "1",
                                          "--height", "32", "--width", "32", "--out", str(tmp_path / "o.png")])
    finally:  # the CLI turns them off for its process; other tests keep them
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    assert result.exit_code == 0, result.output
    assert "Loading pipeline components" not in result.output and "\r" not in result.output  # tqdm's redraws
    assert result.output.strip().startswith("wrote")


def test_kontext_guidance_is_the_distilled_guidance_scale(app, tmp_path, monkeypatch):
    """FLUX.1 Kontext's --guidance sets guidance_scale (its __call__ also takes true_cfg_scale: not that)."""
    import functools
    from types import SimpleNamespace

    import diffusers

    from tokensparse.integrations.diffusers_tiny import tiny_flux_kontext

    tiny_flux_kontext(seed=0).save_pretrained(tmp_path / "kontext")
    seen: dict = {}

    @functools.wraps(diffusers.FluxKontextPipeline.__call__)  # keeps the signature the CLI inspects
    def fake_call(self, **kwargs):  # record the arguments instead of running the pipeline
        seen.update(kwargs)
        return SimpleNamespace(images=[Image.new("RGB", (16, 16))])

    monkeypatch.setattr(diffusers.FluxKontextPipeline, "__call__", fake_call)
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "kontext"), "--ref", str(ref_png(tmp_path)),
                                   "--prompt", "a cat", "--guidance", "2.5", "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert seen["guidance_scale"] == 2.5 and "true_cfg_scale" not in seen and "negative_prompt" not in seen
    assert "max_area" not in seen
    seen.clear()  # a requested size is kept: Kontext would rescale it to its max_area (1024^2) otherwise
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "kontext"), "--ref", str(ref_png(tmp_path)),
                                   "--prompt", "a cat", "--height", "32", "--width", "48",
                                   "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert (seen["height"], seen["width"], seen["max_area"]) == (32, 48, 32 * 48)


@pytest.mark.parametrize("cls, extra, message", [
    ("FluxKontextPipeline", ["--ref", "{ref}"], "takes one reference image"),
    ("FluxKontextPipeline", ["--cache"], "--cache needs FLUX.2"),
    ("Flux2KleinPipeline", ["--cache", "--proportional"], "cannot be combined with --cache"),
    ("QwenImageEditPlusPipeline", ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("LongCatImageEditPipeline", ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("LongCatImageEditPipeline", ["--ref", "{ref}"], "takes one reference image"),
    # was refused after loading
    ("LongCatImageEditPipeline", ["--width", "32"], "takes no --width: it sizes its output from the reference"),
    ("BriaFiboEditPipeline", ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),  # likewise
    ("BriaFibo2Pipeline", ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("BriaFibo2Pipeline", ["--cache"], "--cache needs FLUX.2"),
    ("QwenImage21Pipeline", ["--proportional"], "--proportional needs a FLUX.2 or FLUX.1 Kontext"),
    ("QwenImage21Pipeline", ["--cache"], "QwenImage21Pipeline caches its reference images' K/V itself"),
    ("FluxKontextInpaintPipeline", [], "not supported here"),
    ("StableDiffusionPipeline", [], "takes no reference images here, so --ref (Sparse Context)"),
])
def test_what_the_pipeline_class_cannot_take_fails_before_loading(app, tmp_path, cls, extra, message):
    # only model_index.json: a check after loading would fail to load instead
    folder = pipeline_folder(tmp_path / "kontext", cls)
    ref = str(ref_png(tmp_path))
    args = ["generate", "--model", str(folder), "--prompt", "a cat", "--ref", ref, "--out", str(tmp_path / "o.png")]
    result = CliRunner().invoke(app, args + [x.replace("{ref}", ref) for x in extra])
    assert result.exit_code == 1 and message in result.output and "cannot load" not in result.output


@pytest.mark.parametrize("cls", ["QwenImageEditPipeline", "QwenImageEditPlusPipeline", "LongCatImageEditPipeline"])
def test_a_pipeline_sized_by_its_reference_needs_one_before_loading(app, tmp_path, cls):
    folder = pipeline_folder(tmp_path / "edit", cls)
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat",
                                      "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and f"{cls} needs a --ref image" in result.output


def test_longcat_takes_no_height_or_width(app, tmp_path, monkeypatch):
    import diffusers

    from tokensparse.integrations.diffusers_tiny import tiny_longcat_image_edit

    folder = pipeline_folder(tmp_path / "longcat", "LongCatImageEditPipeline")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: tiny_longcat_image_edit())
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat", "--ref",
                                      str(ref_png(tmp_path)), "--height", "32", "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "LongCatImageEditPipeline takes no --height" in result.output
    assert not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_auto_dtype_is_bfloat16_on_every_cuda_device(monkeypatch, device):
    from tokensparse.cli_diffusers import _device_and_dtype

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # no GPU needed: nothing is allocated
    assert _device_and_dtype(device, "auto") == (device, torch.bfloat16)
    assert _device_and_dtype(device, "float32") == (device, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device_and_dtype("auto", "auto") == ("cpu", torch.float32) or torch.backends.mps.is_available()


def test_a_pipeline_outside_sparse_context_without_merge_fails_before_loading(app, tmp_path):
    folder = pipeline_folder(tmp_path / "sd", "StableDiffusionPipeline")
    result = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat",
                                      "--out", str(tmp_path / "o.png")])
    assert result.exit_code == 1 and "give --merge" in result.output and "cannot load" not in result.output


def test_merge_on_a_model_token_merging_does_not_know_fails_before_loading(app, tmp_path, monkeypatch):
    import diffusers

    # what the check reads: model_index.json and the transformer's config -- a reference pipeline given a transformer
    # token merging does not know (NucleusMoE-Image's; GLM-Image's, OmniGen's, CogView3-Plus's and then Lumina-Next's,
    # until token merging knew them)
    transformer = diffusers.NucleusMoEImageTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6), moe_enabled=False)
    folder = pipeline_folder(tmp_path / "omnigen", "OmniGenPipeline",
                             transformer=["diffusers", type(transformer).__name__])
    transformer.save_config(folder / "transformer")
    loads = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: loads.append(a) or 1 / 0)
    args = ["generate", "--model", str(folder), "--prompt", "<img><|image_1|></img> a cat", "--ref",
            str(ref_png(tmp_path)), "--height", "32", "--width", "32", "--out", str(tmp_path / "o.png")]
    res = CliRunner().invoke(app, args + ["--merge", "0.5"])
    assert res.exit_code == 1 and not loads, res.output
    assert "--merge: OmniGenPipeline's transformer" in res.stderr and type(transformer).__name__ in res.stderr
    res = CliRunner().invoke(app, args)  # without --merge nothing is checked before loading: it loads
    assert res.exit_code == 1 and loads and "cannot load" in res.stderr


def test_merge_on_a_model_token_merging_knows_passes_the_check_before_loading(app, model_dir, tmp_path, monkeypatch):
    from tokensparse.integrations import merging_hooks

    built = []

    monkeypatch.setattr(merging_hooks, "merging_supports", lambda model: built.append(model) or None)
    ref = str(ref_png(tmp_path))
    res = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--prompt", "a cat", "--ref", ref,
                                   "--merge", "0.5", "--steps", "1", "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert [type(m).__name__ for m in built] == ["Flux2Transformer2DModel"]
    assert next(built[0].parameters()).device.type == "meta"  # built from its config, no weights read


@pytest.mark.parametrize("content, message", [
    ('["FluxKontextPipeline"]', "must be a JSON object (the pipeline's class and components), got list"),
    ('"FluxKontextPipeline"', "must be a JSON object (the pipeline's class and components), got str"),
    ('{"_class_name": ', "is not valid JSON"),
    (b"\xff\xfe{}", "cannot be read"),
    (None, "cannot be read"),  # a folder named model_index.json
])
def test_a_model_index_that_is_not_a_json_object_is_refused_before_loading(app, tmp_path, monkeypatch, content,
                                                                            message):
    import diffusers

    from tokensparse.cli_diffusers import train_lora

    folder = tmp_path / "bad"
    folder.mkdir()
    index = folder / "model_index.json"
    if content is None:
        index.mkdir()
    else:
        index.write_bytes(content if isinstance(content, bytes) else content.encode())
    loads = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: loads.append(a) or 1 / 0)
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat",
                                   "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 1 and not loads, res.output  # was a TypeError from inside diffusers' loader (a list)
    assert f"--model: {index}" in res.stderr and message in res.stderr
    example = tmp_path / "data" / "ex0"
    example.mkdir(parents=True)
    for name in ("ref1.png", "target.png"):
        ref_png(example, name)
    (example / "prompt.txt").write_text("mirror it")
    app.command("train-lora")(train_lora)
    res = CliRunner().invoke(app, ["train-lora", "--model", str(folder), "--data", str(tmp_path / "data"),
                                   "--out", str(tmp_path / "lora")])
    assert res.exit_code == 1 and not loads and message in res.stderr, res.output


def test_train_lora_refuses_an_empty_out(app, tmp_path, monkeypatch):
    from tokensparse.cli_diffusers import train_lora

    monkeypatch.chdir(tmp_path)  # an empty --out was read as '.', and trained into the current directory
    app.command("train-lora")(train_lora)
    res = CliRunner().invoke(app, ["train-lora", "--model", "some/model", "--data", str(tmp_path), "--out", ""])
    assert res.exit_code == 1 and "--out must name a folder" in res.stderr, res.output
    assert list(tmp_path.iterdir()) == []


def _lora_data(folder: Path) -> None:
    """A ``train-lora`` data folder of one example: ``ex1/ref1.png``, ``ex1/target.png``, ``ex1/prompt.txt``."""
    example = folder / "ex1"
    example.mkdir(parents=True)
    for name in ("ref1.png", "target.png"):
        Image.new("RGB", (32, 32)).save(example / name)
    (example / "prompt.txt").write_text("a cat")


@pytest.mark.parametrize("command", ["generate", "train-lora"])
def test_a_model_that_is_a_file_is_named(tmp_path, command):
    from tokensparse.cli import app

    checkpoint = tmp_path / "flux.safetensors"
    checkpoint.write_bytes(b"weights")
    extra = (["--prompt", "a cat", "--out", str(tmp_path / "o.png")] if command == "generate"
             else ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "lora")])
    _lora_data(tmp_path / "data")
    result = CliRunner().invoke(app, [command, "--model", str(checkpoint), *extra])
    assert result.exit_code == 1 and "is a file; give a diffusers pipeline folder" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) <= ["data", "flux.safetensors"]  # was a long Hub repo-id error


@pytest.mark.parametrize("command, hint", [
    ("generate", 'tokensparse.generate(tokensparse.load_model("{path}"), references, prompt)'),
    ("train-lora", "fine-tune a RefDiT with tokensparse train, its recipe's \"init\": \"{path}\""),
])
def test_a_model_that_is_a_refdit_export_gets_the_refdit_hint(tmp_path, command, hint):
    """A shipped RefDiT's name got a RefDiT hint; the user's own export (``train --export``) only "is a file"."""
    import tokensparse as ts
    from tokensparse.cli import app
    from tokensparse.models import build_model, save_checkpoint

    checkpoint = tmp_path / "mine.safetensors"
    save_checkpoint(build_model("refdit-tiny"), checkpoint)
    extra = (["--prompt", "a cat", "--out", str(tmp_path / "o.png")] if command == "generate"
             else ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "lora")])
    _lora_data(tmp_path / "data")
    result = CliRunner(env={"COLUMNS": "1000"}).invoke(app, [command, "--model", str(checkpoint), *extra])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "is a file; give a diffusers pipeline folder" in output, output
    assert "if it is a RefDiT checkpoint (tokensparse train --export" in output
    assert hint.format(path=checkpoint) in output, output
    assert isinstance(ts.load_model(str(checkpoint)), ts.RefDiT)  # what the hint says works


@pytest.mark.parametrize("command", ["generate", "train-lora"])
@pytest.mark.parametrize("model", ["./no-such-pipeline", "{tmp}/no-such-pipeline", "~no-such-user/pipeline"])
def test_a_model_path_that_does_not_exist_is_named_missing(tmp_path, command, model):
    from tokensparse.cli import app

    model = model.replace("{tmp}", str(tmp_path))
    extra = (["--prompt", "a cat", "--merge", "0.5", "--out", str(tmp_path / "o.png")] if command == "generate"
             else ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "lora")])
    _lora_data(tmp_path / "data")
    result = CliRunner().invoke(app, [command, "--model", model, *extra])
    assert result.exit_code == 1, result.output
    assert f"--model {model} is not a pipeline directory: it does not exist" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # was a repo-id error (train-lora)


def test_generate_warns_of_a_size_the_pipeline_rounds(app, model_dir, tmp_path):
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(model_dir), "--ref", str(ref_png(tmp_path)), "--prompt", "a cat", "--steps", "1",
            "--height", "17", "--width", "32", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output  # diffusers rounds it down, as it does without tokensparse
    assert "warning: Flux2KleinPipeline makes images in multiples of 4 px" in result.output
    assert "--height 17 (nearest: 16 or 20)" in result.output and "--width" not in result.output
    with Image.open(out) as im:
        assert im.size == (32, 16)


def test_size_multiple_counts_the_transformers_patches_and_glm_images_prior():
    from tokensparse.cli_diffusers import _warn_size, size_multiple
    from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo_edit
    from tokensparse.integrations.diffusers_tiny_glm_image import tiny_glm_image
    from tokensparse.integrations.diffusers_tiny_variants import tiny_variant

    glm = tiny_glm_image()  # VAE /2, 2x2 patches: its image processor says 2, its check_inputs wants 8
    assert size_multiple(glm, "GlmImagePipeline") == glm.vae_scale_factor * glm.transformer.config.patch_size * 2 == 8
    for height in (32, 40, 36, 44):  # what it refuses is what the warning names
        refused = bool(height % 8)
        try:
            glm.check_inputs("a cat", height, 32, None)
        except ValueError:
            assert refused
        else:
            assert not refused
    with pytest.MonkeyPatch.context() as mp:
        lines = []
        mp.setattr("tokensparse.cli_diffusers.warn", lines.append)
        assert _warn_size(glm, "GlmImagePipeline", "GlmImagePipeline", 36, 32)  # no warning before (36 % 2 == 0)
        assert _warn_size(glm, "MyGlm", "GlmImagePipeline", 20, 32)  # a subclass: its base's rule
        assert not _warn_size(glm, "GlmImagePipeline", "GlmImagePipeline", 40, 32)
    assert lines == ["GlmImagePipeline makes images in multiples of 8 px (or more): it resizes or refuses --height 36 "
                     "(nearest: 32 or 40)", "MyGlm makes images in multiples of 8 px (or more): it resizes or refuses "
                     "--height 20 (nearest: 16 or 24)"]
    sd3 = tiny_variant("StableDiffusion3Pipeline")  # refuses sizes off vae_scale_factor * patch_size; its processor: 2
    assert size_multiple(sd3, "StableDiffusion3Pipeline") == sd3.vae_scale_factor * sd3.patch_size == 4
    pixart = tiny_variant("PixArtSigmaPipeline")  # bins resolutions and resizes back: its check's multiple alone
    assert size_multiple(pixart, "PixArtSigmaPipeline") == pixart.image_processor.config.vae_scale_factor == 2
    # Bria FIBO Edit: 16 (its VAE's /16, unpatched as generate calls it: 48 px makes 48 px, though it logs "32")
    assert size_multiple(tiny_bria_fibo_edit(), "BriaFiboEditPipeline") == 16
    assert size_multiple(object(), "X") is None


def test_generate_names_a_reference_over_the_decompression_bomb_limit(app, tmp_path, monkeypatch):
    ref = ref_png(tmp_path)  # 64x64 = 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, not over twice it: PIL warns
    args = ["generate", "--model", "/no/such/model", "--ref", str(ref), "--prompt", "a cat"]
    result = CliRunner().invoke(app, args)
    lines = [line for line in result.output.splitlines() if "pixels" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: reference image {ref}: Image size (4096 pixels)")
    assert "DecompressionBombWarning" not in result.output and ".py:" not in result.output
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: still refused
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and f"error: reference: cannot read image {ref}" in result.output


def test_train_lora_names_an_image_over_the_decompression_bomb_limit(app, tmp_path, monkeypatch):
    from tokensparse.cli_diffusers import train_lora

    example = tmp_path / "data" / "ex0"
    example.mkdir(parents=True)
    for name in ("ref1.png", "target.png"):
        ref_png(example, name)  # 64x64 = 4096 pixels
    (example / "prompt.txt").write_text("mirror it")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, not over twice it: PIL warns
    app.command("train-lora")(train_lora)
    args = ["train-lora", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data"), "--out",
            str(tmp_path / "o")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "LoRA training supports" in res.output, res.output  # refused after reading
    lines = [line for line in res.output.splitlines() if "pixels" in line]  # Python's two-line warning before
    assert [line.split(": Image size")[0] for line in lines] == [f"warning: training image {example / name}"
                                                                 for name in ("ref1.png", "target.png")], res.output
    assert "DecompressionBombWarning" not in res.output and ".py:" not in res.output
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over twice the limit: refused in one line
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and f"error: cannot read image {example / 'ref1.png'}" in res.output, res.output
    assert "Traceback" not in res.output


def test_float16_on_the_cpu_is_one_warning_of_ours_not_one_of_diffusers_per_module(app, model_dir, tmp_path):
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # diffusers' logger does not propagate: caplog would not see it
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        result = CliRunner().invoke(app, ["generate", "--model", str(model_dir), "--ref", str(ref_png(tmp_path)),
                                          "--prompt", "a cat", "--steps", "1", "--height", "32", "--width", "32",
                                          "--device", "cpu", "--dtype", "float16", "--out", str(tmp_path / "o.png")])
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning: --dtype float16 on the CPU") == 1 and "float32" in result.stderr
    assert not [r for r in records if "float16" in r.getMessage()]  # were: 3 (transformer, text encoder, VAE)
    res = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200"})
    assert "float16 (on the CPU: a warning" in " ".join(res.output.split())
