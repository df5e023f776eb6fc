"""``tokensparse generate`` end to end on each pipeline family's tiny random-weight pipeline (offline): token merging
alone on text-to-image pipelines, several references, guidance keywords."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
typer = pytest.importorskip("typer")

from PIL import Image
from typer.testing import CliRunner

from .contract import generate_app, pipeline_folder, ref_png


@pytest.fixture(scope="module")
def app():
    return generate_app()


@pytest.mark.parametrize("xl", [False, True])
def test_a_text_to_image_pipeline_runs_with_token_merging_alone(app, tmp_path, caplog, xl):
    from tokensparse.integrations.diffusers_tiny_sd import tiny_stable_diffusion

    tiny_stable_diffusion(xl=xl).save_pretrained(tmp_path / "sd")
    out = tmp_path / "sd.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "sd"), "--prompt", "a cat", "--merge", "0.5",
                                   "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output  # was: "StableDiffusionPipeline is not supported here"
    assert "no Sparse Context, merge=0.5" in res.output and Image.open(out).size == (16, 16)
    assert "merged nothing" not in caplog.text  # SDXL: merges one level down, where its attention starts
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "sd"), "--prompt", "a cat", "--cache",
                                   "--out", str(tmp_path / "x.png")])
    assert res.exit_code == 1 and "--cache (Sparse Context) cannot apply" in res.output
    assert not (tmp_path / "x.png").exists()


def test_bria_fibo_edit_takes_several_references(app, tmp_path):
    from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo_edit

    tiny_bria_fibo_edit().save_pretrained(tmp_path / "bria")
    refs = [str(ref_png(tmp_path, f"{i}.png")) for i in range(2)]
    out = tmp_path / "bria.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "bria"), "--ref", refs[0], "--ref", refs[1],
                                   "--prompt", '{"edit_instruction": "a cat"}', "--height", "128", "--width", "128",
                                   "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output  # was: "BriaFiboEditPipeline takes one reference image"
    assert "2 reference(s), keep=0.25" in res.output and Image.open(out).size == (128, 128)


def test_fibo2_takes_several_references(app, tmp_path, monkeypatch):
    import diffusers

    from tokensparse.integrations.diffusers_tiny_fibo2 import tiny_bria_fibo2

    folder = pipeline_folder(tmp_path / "fibo2", "BriaFibo2Pipeline")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: tiny_bria_fibo2())
    refs = [str(ref_png(tmp_path, f"{i}.png")) for i in range(2)]
    out = tmp_path / "fibo2.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--ref", refs[0], "--ref", refs[1],
                                   "--prompt", "make it blue", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(BriaFibo2Pipeline, 2 reference(s), keep=0.25" in res.output and Image.open(out).size == (32, 32)


@pytest.mark.parametrize("refs", [0, 1])
def test_fibo2_runs_with_token_merging(app, tmp_path, monkeypatch, caplog, refs):
    import diffusers

    from tokensparse.integrations.diffusers_tiny_fibo2 import tiny_bria_fibo2
    from tokensparse.integrations.merging_hooks import merging_state

    folder = pipeline_folder(tmp_path / "fibo2", "BriaFibo2Pipeline")
    loaded: list = []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: loaded.append(tiny_bria_fibo2()) or loaded[-1])
    out = tmp_path / "fibo2.png"
    ref = ["--ref", str(ref_png(tmp_path))] * refs  # text-to-image: token merging alone; editing: stacked
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), *ref, "--prompt", "make it blue", "--merge",
                                   "0.5", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)])
    assert res.exit_code == 0, res.output  # was: "--merge: BriaFibo2Pipeline's transformer ..." (refused)
    sparse = "keep=0.25, selector=uniform" if refs else "no Sparse Context"
    assert f"(BriaFibo2Pipeline, {refs} reference(s), {sparse}, merge=0.5)" in res.output
    assert Image.open(out).size == (32, 32) and "merged nothing" not in caplog.text
    assert merging_state(loaded[0]).merged_tokens > 0


def test_qwen_image21_takes_several_references_and_true_cfg(app, tmp_path, monkeypatch):
    import diffusers
    import diffusers.pipelines.qwenimage21.pipeline_qwenimage21 as module

    from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21

    folder = pipeline_folder(tmp_path / "qwen21", "QwenImage21Pipeline")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: tiny_qwen_image21())
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (64, 64, None))  # not 1024^2
    refs = [str(ref_png(tmp_path, f"{i}.png")) for i in range(2)]
    out = tmp_path / "qwen21.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--ref", refs[0], "--ref", refs[1],
                                   "--prompt", "a cat", "--guidance", "2", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(QwenImage21Pipeline, 2 reference(s), keep=0.25" in res.output and Image.open(out).size == (64, 64)


def test_qwen_without_guidance_runs_without_true_cfg_and_its_warning(app, tmp_path, monkeypatch):
    import functools

    import diffusers
    import diffusers.pipelines.qwenimage21.pipeline_qwenimage21 as module

    from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21

    folder = pipeline_folder(tmp_path / "qwen21", "QwenImage21Pipeline")
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: tiny_qwen_image21())
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (64, 64, None))
    seen: dict = {}
    call = diffusers.QwenImage21Pipeline.__call__

    @functools.wraps(call)  # keeps the signature the CLI inspects
    def spy(self, **kwargs):
        seen.update(kwargs)
        return call(self, **kwargs)

    monkeypatch.setattr(diffusers.QwenImage21Pipeline, "__call__", spy)
    warned = []
    monkeypatch.setattr(module.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--ref", str(ref_png(tmp_path)),
                                   "--prompt", "a cat", "--steps", "1", "--out", str(tmp_path / "o.png")])
    assert res.exit_code == 0, res.output
    assert seen["true_cfg_scale"] == 1.0 and "negative_prompt" not in seen  # no negative prompt: no CFG either way
    assert not any("true_cfg_scale" in w for w in warned), warned  # was "true_cfg_scale is passed as 4.0, but ..."


def test_bria_fibo_text_to_image_runs_with_token_merging(app, tmp_path, monkeypatch, caplog):
    import diffusers

    from tokensparse.integrations.diffusers_tiny_bria import tiny_bria_fibo
    from tokensparse.integrations.merging_hooks import merging_state

    tiny_bria_fibo().save_pretrained(tmp_path / "fibo")
    load, loaded = diffusers.DiffusionPipeline.from_pretrained, []
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained",
                        lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    out = tmp_path / "fibo.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(tmp_path / "fibo"), "--prompt", "a cat", "--merge", "0.5",
                                   "--height", "128", "--width", "192", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(BriaFiboPipeline, 0 reference(s), no Sparse Context, merge=0.5)" in res.output
    assert Image.open(out).size == (192, 128) and "merged nothing" not in caplog.text
    assert type(loaded[0]).__name__ == "BriaFiboPipeline" and merging_state(loaded[0]).merged_tokens > 0


def test_sana_runs_with_token_merging_alone(app, tmp_path, monkeypatch, caplog):
    """Sana bins resolutions (``use_resolution_binning``, on by default: latents at a trained bin's size, >= 512 px,
    the image resized back to the size asked), too big for the tiny model on the CPU: binning is turned off here,
    in the test, not in the CLI (which keeps the pipeline's default for users)."""
    import functools

    import diffusers

    from tokensparse.integrations.diffusers_tiny_sana import tiny_sana
    from tokensparse.integrations.merging_hooks import merging_state

    call = diffusers.SanaPipeline.__call__
    seen: list[dict] = []

    @functools.wraps(call)
    def unbinned(self, *args, **kwargs):
        seen.append(dict(kwargs))
        return call(self, *args, **{**kwargs, "use_resolution_binning": False})

    monkeypatch.setattr(diffusers.SanaPipeline, "__call__", unbinned)
    folder = pipeline_folder(tmp_path / "sana", "SanaPipeline",
                             transformer=["diffusers", "SanaTransformer2DModel"])
    pipe = tiny_sana()
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pipe)
    out = tmp_path / "sana.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--prompt", "a cat", "--merge", "0.5",
                                   "--height", "32", "--width", "64", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(SanaPipeline, 0 reference(s), no Sparse Context, merge=0.5)" in res.output
    assert Image.open(out).size == (64, 32) and "merged nothing" not in caplog.text
    assert len(seen) == 1 and "use_resolution_binning" not in seen[0]  # the CLI keeps the pipeline's default
    assert merging_state(pipe).merged_tokens > 0


def test_qwen_image21_runs_references_with_token_merging(app, tmp_path, monkeypatch, caplog):
    import diffusers
    import diffusers.pipelines.qwenimage21.pipeline_qwenimage21 as module

    from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21
    from tokensparse.integrations.merging_hooks import merging_state

    folder = pipeline_folder(tmp_path / "qwen21", "QwenImage21Pipeline")
    pipe = tiny_qwen_image21()
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pipe)
    monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: (64, 64, None))  # not 1024^2
    refs = [str(ref_png(tmp_path, f"{i}.png")) for i in range(2)]
    out = tmp_path / "qwen21.png"
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), "--ref", refs[0], "--ref", refs[1],
                                   "--prompt", "a cat", "--merge", "0.5", "--guidance", "2", "--steps", "2",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "(QwenImage21Pipeline, 2 reference(s), keep=0.25" in res.output and "merge=0.5" in res.output
    assert Image.open(out).size == (64, 64) and "merged nothing" not in caplog.text
    assert merging_state(pipe).merged_tokens > 0


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "plus"])
def test_joyimage_edit_runs_a_reference_with_token_merging(app, tmp_path, monkeypatch, caplog, plus):
    import diffusers
    import diffusers.pipelines.joyimage.image_processor as module

    from tokensparse.integrations.diffusers_tiny_joyimage import (
        SMALL_BUCKETS,
        tiny_joyimage_edit,
        tiny_joyimage_edit_plus,
    )
    from tokensparse.integrations.merging_hooks import merging_state

    monkeypatch.setitem(module.BUCKETS, 1024, SMALL_BUCKETS)  # every image snaps to one of these, not >= 512 px
    cls = "JoyImageEditPlusPipeline" if plus else "JoyImageEditPipeline"
    folder = pipeline_folder(tmp_path / "joy", cls)
    pipe = (tiny_joyimage_edit_plus if plus else tiny_joyimage_edit)()
    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", lambda *a, **k: pipe)
    out = tmp_path / "joy.png"
    refs = [str(ref_png(tmp_path, f"{i}.png")) for i in range(2 if plus else 1)]  # Plus: several references
    res = CliRunner().invoke(app, ["generate", "--model", str(folder), *[a for r in refs for a in ("--ref", r)],
                                   "--prompt", "a cat", "--merge", "0.5", "--steps", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    # sized by the reference's bucket (the 64x64 reference snaps to 32x32)
    assert f"({cls}, {len(refs)} reference(s), keep=0.25" in res.output and "merge=0.5" in res.output
    assert Image.open(out).size == (32, 32) and "merged nothing" not in caplog.text
    assert merging_state(pipe).merged_tokens > 0
