"""``tokensparse generate`` on Qwen-Image-Layered (``QwenImageLayeredPipeline``) end to end: a tiny random-weight
pipeline saved with ``save_pretrained`` and loaded by the CLI from that folder (offline), its one ``--ref`` decomposed
into ``--layers`` RGBA layers written as ``OUT-layer1.png``, ...

Two things keep diffusers' own pipeline from running from the saved folder as it is, worked around here in the test
alone: the tiny pipeline has no ``processor`` (a real ``Qwen2VLProcessor`` needs torchvision under transformers 5;
the pipeline uses it only to caption an empty prompt), saved as ``[null, null]``, and diffusers loads a null component
only when it is optional or passed (``processor=None``); and the pipeline sizes its work from
``calculate_dimensions(640 * 640, ratio)`` (``resolution`` must be 640 or 1024), 25,600 tokens per layer for this
VAE: about 80 s for one step of one layer on a CPU, so the tests shrink it to 32x32 as the library's tests do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("typer")

from PIL import Image  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from tokensparse.integrations.diffusers_tiny_qwen_layered import tiny_qwen_image_layered  # noqa: E402

from .contract import generate_app, pipeline_folder, shrink_qwen_layered  # noqa: E402

SIDE = 32  # what calculate_dimensions is shrunk to


@pytest.fixture(scope="module")
def app():
    return generate_app()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "layered"
    tiny_qwen_image_layered(seed=0).save_pretrained(path)
    return path


@pytest.fixture
def loads(monkeypatch):
    """The pipelines loaded (``from_pretrained``'s arguments), loading with ``processor=None`` (see the module's
    docstring), at SIDE x SIDE pixels."""
    import diffusers

    load = diffusers.DiffusionPipeline.from_pretrained
    seen: list[tuple] = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: seen.append(a) or load(*a, processor=None, **k))
    shrink_qwen_layered(monkeypatch, SIDE)
    return seen


def _ref(tmp_path, name="ref.png"):
    path = tmp_path / name
    Image.fromarray((np.random.RandomState(0).rand(40, 48, 4) * 255).astype("uint8"), "RGBA").save(path)
    return path


def _generate(app, model_dir, tmp_path, *extra, refs=1):
    args = ["generate", "--model", str(model_dir), "--prompt", "a cat", "--steps", "2",
            "--out", str(tmp_path / "out" / "out.png")]
    for i in range(refs):
        args += ["--ref", str(_ref(tmp_path, f"ref{i}.png"))]
    return CliRunner().invoke(app, [*args, *extra])


@pytest.mark.parametrize("extra", [[], ["--layers", "2"], ["--layers", "3", "--merge", "0.5"],
                                   ["--layers", "1", "--keep", "0.5", "--guidance", "2", "--selector", "edges"]])
def test_each_layer_is_written_as_an_rgba_png(app, model_dir, tmp_path, loads, extra):
    res = _generate(app, model_dir, tmp_path, *extra)
    assert res.exit_code == 0, res.output  # was: "QwenImageLayeredPipeline is not supported here"
    count = int(extra[extra.index("--layers") + 1]) if "--layers" in extra else 4  # the pipeline's default
    paths = [tmp_path / "out" / f"out-layer{k}.png" for k in range(1, count + 1)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in paths)  # no out.png, temp
    for path in paths:
        with Image.open(path) as im:
            assert im.mode == "RGBA" and im.size == (SIDE, SIDE)
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"wrote {', '.join(map(str, paths))} (QwenImageLayeredPipeline, 1 reference(s), keep=")
    assert line.endswith(f"{count} layer{'s' if count > 1 else ''})") and ("merge=0.5" in line) == ("--merge" in extra)
    assert len(loads) == 1


def test_keep_1_writes_the_dense_pipelines_layers(app, model_dir, tmp_path, loads):
    import diffusers

    res = _generate(app, model_dir, tmp_path, "--keep", "1", "--layers", "2", "--guidance", "2")
    assert res.exit_code == 0, res.output
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True)  # no tokensparse
    pipe.set_progress_bar_config(disable=True)
    with Image.open(tmp_path / "ref0.png") as ref, torch.inference_mode():
        dense = pipe(image=ref.convert("RGBA"), prompt="a cat", negative_prompt=" ", true_cfg_scale=2.0, layers=2,
                     num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    written = [np.asarray(Image.open(tmp_path / "out" / f"out-layer{k}.png")) for k in (1, 2)]
    assert len(dense) == 2 and all(np.array_equal(w, np.asarray(d)) for w, d in zip(written, dense))
    res = _generate(app, model_dir, tmp_path, "--keep", "0.25", "--layers", "2", "--guidance", "2")
    assert res.exit_code == 0, res.output  # Sparse Context changed something
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "out" / "out-layer1.png")), written[0])


def test_the_input_images_alpha_reaches_the_pipeline(app, model_dir, tmp_path, loads, monkeypatch):
    import functools

    import diffusers

    seen = []
    call = diffusers.QwenImageLayeredPipeline.__call__

    @functools.wraps(call)  # keeps the signature the CLI reads
    def spy(self, **kwargs):
        seen.append(kwargs["image"])
        return call(self, **kwargs)

    monkeypatch.setattr(diffusers.QwenImageLayeredPipeline, "__call__", spy)
    res = _generate(app, model_dir, tmp_path, "--layers", "1")
    assert res.exit_code == 0, res.output
    with Image.open(tmp_path / "ref0.png") as ref:  # the RGBA file as it is (an RGB one would get an opaque alpha)
        assert seen[0].mode == "RGBA" and np.array_equal(np.asarray(seen[0]), np.asarray(ref))


def test_an_earlier_runs_extra_layers_are_left_with_a_warning(app, model_dir, tmp_path, loads):
    assert _generate(app, model_dir, tmp_path, "--layers", "3").exit_code == 0
    old = {k: (tmp_path / "out" / f"out-layer{k}.png").read_bytes() for k in (1, 2, 3)}
    (tmp_path / "out" / "out-layer1.png").write_bytes(b"replaced")
    res = _generate(app, model_dir, tmp_path, "--layers", "2", "--seed", "1")
    assert res.exit_code == 0, res.output
    stale = tmp_path / "out" / "out-layer3.png"
    assert res.stderr.strip() == f"warning: {stale}: from an earlier run with more layers, left as they are (this " \
                                 "run wrote 2)"
    assert stale.read_bytes() == old[3]  # left as it was
    assert all((tmp_path / "out" / f"out-layer{k}.png").read_bytes() not in (old[k], b"replaced") for k in (1, 2))


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_replaces_no_layer(app, model_dir, tmp_path, loads, monkeypatch, error):
    out = tmp_path / "out"
    out.mkdir()
    for k in (1, 2, 3):
        (out / f"out-layer{k}.png").write_bytes(b"old")
    save = Image.Image.save

    def failing(self, fp, *args, **kwargs):  # the third layer's temp file cannot be written
        if str(fp).startswith(str(out / ".out-layer3.png.")):
            raise error
        return save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing)
    res = _generate(app, model_dir, tmp_path, "--layers", "3")
    assert res.exit_code != 0
    if isinstance(error, OSError):
        assert res.stderr.strip() == f"error: cannot write {out / 'out-layer3.png'}: No space left on device"
    assert [(out / f"out-layer{k}.png").read_bytes() for k in (1, 2, 3)] == [b"old"] * 3
    assert sorted(p.name for p in out.iterdir()) == [f"out-layer{k}.png" for k in (1, 2, 3)]  # no temp file left


@pytest.mark.parametrize("extra, refs, message", [
    ([], 0, "QwenImageLayeredPipeline decomposes one image into layers: give that image as one --ref (got 0)"),
    ([], 2, "QwenImageLayeredPipeline decomposes one image into layers: give that image as one --ref (got 2)"),
    (["--layers", "0"], 1, "--layers must be >= 1, got 0"),
    (["--layers", "x"], 1, "Invalid value for '--layers'"),  # typer's own check (it boxes the message)
    (["--height", "32"], 1, "QwenImageLayeredPipeline takes no --height: it sizes its output from the reference"),
    (["--proportional"], 1, "--proportional needs a FLUX.2 or FLUX.1 Kontext pipeline"),
    (["--cache"], 1, "--cache needs FLUX.2 [klein]"),
    (["--out", "{tmp}/a.png"], 1, "--out {tmp}/a.png: its layer file {tmp}/a-layer2.png is a directory"),
    (["--out", "{tmp}/ref0.png"], 1, "--out {tmp}/ref0.png is also a --ref image"),
    (["--out", "{tmp}/ref.png", "--layers", "3"], 0, "--out {tmp}/ref-layer3.png is also a --ref image"),
])
def test_what_it_cannot_take_fails_in_one_line_before_loading(app, model_dir, tmp_path, loads, extra, refs,
                                                              message):
    (tmp_path / "a-layer2.png").mkdir()  # where the second layer of --out a.png would go
    extra = [x.replace("{tmp}", str(tmp_path)) for x in extra]
    if "ref-layer3" in message:  # the third layer of --out ref.png is this --ref
        extra += ["--ref", str(_ref(tmp_path, "ref-layer3.png"))]
    res = _generate(app, model_dir, tmp_path, *extra, refs=refs)
    assert res.exit_code in (1, 2) and not loads, res.output
    if "Invalid value" in message:
        assert message in res.output
        return
    (line,) = res.stderr.strip().splitlines()  # one line
    assert line.startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in line, line
    assert not (tmp_path / "out").exists()


def test_layers_on_a_pipeline_that_makes_one_image_fails_before_loading(app, tmp_path, loads):
    folder = pipeline_folder(tmp_path / "klein", "Flux2KleinPipeline")
    res = _generate(app, folder, tmp_path, "--layers", "2")
    assert res.exit_code == 1 and not loads
    assert res.stderr.strip() == "error: Flux2KleinPipeline takes no --layers: it makes one image (--layers is " \
                                 "Qwen-Image-Layered's layer count)"


def test_a_loaded_pipeline_is_checked_again(app, model_dir, tmp_path, loads, monkeypatch):
    """A Hub id (no model_index.json read before loading): the reference count and the layer files are checked on the
    loaded pipeline, before it runs."""
    import functools

    import diffusers

    load = diffusers.DiffusionPipeline.from_pretrained
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: load(str(model_dir), **k))
    call = diffusers.QwenImageLayeredPipeline.__call__
    monkeypatch.setattr(diffusers.QwenImageLayeredPipeline, "__call__",
                        functools.wraps(call)(lambda self, **kw: 1 / 0))  # its signature: 4 layers by default
    res = _generate(app, "some-org/qwen-layered", tmp_path, refs=2)
    assert res.exit_code == 1 and "give that image as one --ref (got 2)" in res.stderr, res.output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "out-layer4.png").mkdir()  # the pipeline's default count: 4
    res = _generate(app, "some-org/qwen-layered", tmp_path)
    assert res.exit_code == 1 and "its layer file" in res.stderr and "out-layer4.png is a directory" in res.stderr
