import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokensparse.cli import app


def test_help_and_show_models():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output
    res = runner.invoke(app, ["show", "models"])
    assert res.exit_code == 0 and "refdit-s" in res.output
    import subprocess
    import sys

    import tokensparse

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"tokensparse {tokensparse.__version__}"
    out = subprocess.run([sys.executable, "-m", "tokensparse", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == res.output.strip()


def test_show_models_keeps_whole_names_on_a_narrow_terminal():
    res = CliRunner().invoke(app, ["show", "models"], env={"COLUMNS": "60"})
    assert res.exit_code == 0
    from tokensparse import list_models

    for name in list_models():  # a name is what a user types next: it must not be cut with an ellipsis
        assert f" {name} " in res.output


@pytest.mark.parametrize("args, message", [
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--steps", "100001", "--out", "{tmp}/d.png"], "--steps must be at most 100,000, got 100001"),
    (["demo", "--out", "{tmp}/x.jpg"], ".png"),
    (["show", "tasks", "--per-task", "0", "--out", "{tmp}/t.png"], "--per-task must be >= 1"),
    (["show", "tasks", "--image-size", "20", "--out", "{tmp}/t.png"], "--image-size must be"),
    (["show", "tasks", "--per-task", "100000", "--out", "{tmp}/t.png"], "at most 81 per task"),  # not an OOM kill
    (["show", "selection", "--ref", "{tmp}/notimg.png", "--out", "{tmp}/s.png"], "cannot identify"),
    (["show", "selection", "--ref", "{tmp}/notimg.png", "--model", "{tmp}/nope.safetensors", "--out", "{tmp}/s.png"],
     "nope.safetensors not found"),
])
def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, args, message):
    (tmp_path / "notimg.png").write_text("not an image")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notimg.png"]


@pytest.mark.parametrize("recipe, message", [
    ('{"lr": -1}', "lr must be > 0"),
    ('{"drop": {"keep_min": 0.9, "keep_max": 0.5}}', "keep_min must be in"),
    ('{"stepz": 10}', "stepz"),
    ('{"steps": 0}', ": steps must be >= 1"),  # a recipe field keeps its name: no --steps was given
    ("[1, 2]", "JSON object"),
    ("{not json", "recipe"),
])
def test_train_rejects_a_bad_recipe_in_one_line(tmp_path, recipe, message):
    path = tmp_path / "recipe.json"
    path.write_text(recipe)
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")


@pytest.mark.parametrize("args, message", [
    (["show", "tasks", "--per-task", "100000", "--out", "{tmp}/t.png"], "--per-task=100000 draws"),
    (["show", "selection", "--ref", "{tmp}/r.png", "--keep", "2", "--out", "{tmp}/s.png"],
     "error: --keep must be in (0.0, 1.0], got 2.0"),
    (["show", "selection", "--ref", "{tmp}/r.png", "--selector", "nope", "--out", "{tmp}/s.png"],
     "error: unknown --selector 'nope'"),
    (["train", "--config", "{tmp}/r.json", "--steps", "0"], "error: --steps must be >= 1, got 0"),
    (["train", "--config", "{tmp}/r.json", "--max-minutes", "0"], "error: --max-minutes must be > 0"),
    (["train", "--config", "{tmp}/r.json", "--out", ""], "error: --out must name a run folder"),  # not '.'
    (["train", "--config", "{tmp}/r.json", "--out", "{tmp}/r.png"], "error: --out {tmp}/r.png is a file"),
    pytest.param(["generate", "-m", "x", "-p", "a", "--keep", "2"], "error: --keep must be in", marks=needs_diffusers),
    pytest.param(["generate", "-m", "x", "-p", "a", "--seed", "-1"], "error: --seed must be in", marks=needs_diffusers),
    pytest.param(["train-lora", "-m", "x", "--data", "{tmp}", "--out", "{tmp}/o", "--keep-min", "2"],
                 "error: --keep-min must be in", marks=needs_diffusers),
    pytest.param(["train-lora", "-m", "x", "--data", "{tmp}", "--out", "{tmp}/o", "--save-every", "0"],
                 "error: --save-every must be >= 1", marks=needs_diffusers),
])
def test_cli_errors_name_the_flag_not_the_python_argument(tmp_path, args, message):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "out": "%s"}' % (tmp_path / "run"))
    res = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 1 and message.replace("{tmp}", str(tmp_path)) in res.output, res.output
    assert "Traceback" not in res.output and sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.png"]


@pytest.mark.parametrize("args, message", [
    (["train", "--config", "{tmp}/r.json", "--export", "{tmp}/r.json"], ".safetensors"),
    (["train", "--config", "{tmp}/r.json", "--export", "{tmp}/r.json/w.safetensors"], "is a file"),
    (["train", "--config", "{tmp}/missing_init.json"], "not found"),
    (["train", "--config", "{tmp}/r.json", "--export", "{tmp}/r.safetensors"], "over the recipe"),
    (["train", "--config", "{tmp}/r.json", "--export", "{tmp}/run/config.safetensors"], "own config.json"),
    (["train", "--config", "{tmp}/r.json", "--export", "{tmp}/run/step_0000001/ema.safetensors"], "checkpoint folder"),
    (["bench", "speed", "--out", "{tmp}/r.json/x.json"], "is a file"),
    (["show", "tasks", "--image-size", "0", "--out", "{tmp}/t.png"], "--image-size"),
    (["show", "tasks", "--out", ""], "got . (an empty path or the current folder)"),  # was "got ." alone
    (["bench", "speed", "--out", ""], "got . (an empty path or the current folder)"),
])
def test_cli_checks_outputs_and_inputs_before_working(tmp_path, args, message):
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "out": "%s"}' % (tmp_path / "run"))
    (tmp_path / "missing_init.json").write_text('{"model": "refdit-tiny", "init": "%s"}' % (tmp_path / "no.st"))
    res = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing_init.json", "r.json"]


def test_a_decompression_bomb_reference_fails_in_one_line(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1024 pixels: over twice the limit, PIL's bomb error
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "bomb.png"),
                                   "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 1 and "cannot read image" in res.output and "bomb.png" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "s.png").exists()


def test_show_selection_names_a_reference_over_the_decompression_bomb_limit(tmp_path, monkeypatch):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")  # 4096 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # over the limit, not over twice it: PIL warns
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "big.png"), "--selector", "uniform",
                                   "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output  # Python's two-line "file.py:N: DecompressionBombWarning: ..." before
    lines = [line for line in res.output.splitlines() if "pixels" in line]
    assert len(lines) == 1 and lines[0].startswith(f"warning: reference image {tmp_path / 'big.png'}: Image size "
                                                   "(4096 pixels)"), res.output
    assert "DecompressionBombWarning" not in res.output and ".py:" not in res.output


def test_train_refuses_a_run_folder_it_cannot_write_in(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1}')
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: (mode != os.W_OK or Path(p) != locked)
                        and access(p, mode, **kw))  # read-only for this user (the tests may run as root)
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--out", str(locked)])
    assert res.exit_code == 1 and "cannot write in that folder" in res.output and not any(locked.iterdir())


def test_train_names_the_damaged_file_of_a_run_folder(tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text('{"model": "refdit-tiny", "steps": 1, "out": "%s"}' % (tmp_path / "run"))
    assert CliRunner().invoke(app, ["train", "--config", str(recipe)]).exit_code == 0
    (tmp_path / "run" / "step_0000001" / "optim.pt").write_bytes(b"garbage")
    recipe.write_text('{"model": "refdit-tiny", "steps": 2, "out": "%s"}' % (tmp_path / "run"))
    res = CliRunner().invoke(app, ["train", "--config", str(recipe)])
    assert res.exit_code == 1 and "cannot read optim.pt" in res.output and "Traceback" not in res.output
    (tmp_path / "empty").mkdir()
    recipe.write_text('{"model": "refdit-tiny", "steps": 1, "init": "%s", "out": "%s"}' % (tmp_path / "empty",
                                                                                         tmp_path / "run2"))
    res = CliRunner().invoke(app, ["train", "--config", str(recipe)])
    assert res.exit_code == 1 and "not a run folder" in res.output and not (tmp_path / "run2").exists()


def test_train_resumes_a_run_from_its_own_config_and_keeps_its_recipe(tmp_path, monkeypatch):
    import json

    from tokensparse.train import latest_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "batch_size": 2, "out": "runs/base"}')
    assert CliRunner().invoke(app, ["train", "--config", "r.json"]).exit_code == 0
    run = tmp_path / "runs" / "base"
    before = json.loads((run / "config.json").read_text())
    monkeypatch.chdir(run)  # its out, runs/base, is relative to tmp_path: the run folder's own config means this one
    for args in (["--steps", "2"], ["--out", ".", "--steps", "3"]):
        res = CliRunner().invoke(app, ["train", "--config", "config.json", *args])
        assert res.exit_code == 0 and "resumed from" in res.output, res.output
    assert sorted(p.name for p in run.iterdir()) == ["config.json", "latest", "step_0000002", "step_0000003"]
    assert json.loads((run / "config.json").read_text()) == {**before, "steps": 3}  # out kept, not '.'
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["train", "--config", "runs/base/config.json", "--steps", "4"]).exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "runs"] and (run / "step_0000004").is_dir()
    res = CliRunner().invoke(app, ["train", "--config", "runs/base/config.json", "--steps", "3"])
    assert res.exit_code == 1 and "error: run folder" in res.output  # the flag's value, not the recipe's
    assert "past --steps=3: give --steps=4 or more" in res.output
    edited = json.dumps({**before, "steps": 5, "lr": 0.01})  # a change the run cannot take: refused, not written
    (run / "config.json").write_text(edited)
    res = CliRunner().invoke(app, ["train", "--config", "runs/base/config.json"])
    assert res.exit_code == 1 and "started with another recipe (lr 0.0003 -> 0.01)" in res.output
    assert (run / "config.json").read_text() == edited and latest_checkpoint(run).name == "step_0000004"


def test_train_with_nothing_to_export_fails_in_one_line(tmp_path):
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 2, "batch_size": 2, "stop_at": 0}')
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "run"),
                                   "--export", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 1 and "nothing to export" in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]  # no weights, and no run folder without a step


def test_train_export_with_stop_at_0_is_refused_before_training(tmp_path, monkeypatch):
    """A new run with stop_at 0 trains no step, so --export has nothing to write: known from the recipe, it was
    found only after the whole setup (the model built, accelerate started)."""
    import tokensparse.train

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(tokensparse.train, "train", never)
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 2, "batch_size": 2, "stop_at": 0}')
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "run"),
                                   "--export", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "nothing to export" in res.output and "stop_at 0" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    monkeypatch.undo()  # a run that has a checkpoint exports it, stop_at 0 or not
    (tmp_path / "r1.json").write_text('{"model": "refdit-tiny", "steps": 1, "batch_size": 2}')
    out = ["--out", str(tmp_path / "run")]
    assert CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r1.json"), *out]).exit_code == 0
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), *out,
                                   "--export", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 0 and (tmp_path / "w.safetensors").is_file(), res.output


@pytest.mark.parametrize("args", [["show", "tasks", "--per-task", "1"],
                                  ["show", "selection", "--ref", "{tmp}/r.png"],
                                  ["demo", "--steps", "1"]])
def test_a_png_that_cannot_be_written_fails_in_one_line_naming_it(tmp_path, monkeypatch, args):
    import errno
    import os

    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the disk fills while the PNG is written
    out = tmp_path / "o.png"
    res = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args] + ["--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.exception.__class__ is SystemExit
    assert f"cannot write {out}: No space left on device" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]  # no PNG, no temp file


@pytest.mark.parametrize("args", [["show", "tasks", "--per-task", "1"], ["demo", "--steps", "1"]])
def test_a_png_that_cannot_be_written_leaves_no_folder_the_command_made(tmp_path, monkeypatch, args):
    import errno
    import os

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)  # the disk fills while the PNG is written
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "sub" / "o.png"
    res = CliRunner().invoke(app, args + ["--out", str(out)])
    assert res.exit_code == 1 and f"cannot write {out}: No space left on device" in res.output
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_an_export_that_cannot_be_written_fails_in_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import tokensparse.models.zoo as zoo

    def full(model, tmp):  # the disk fills half-way through the weights
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(zoo, "_save_safetensors", full)
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "batch_size": 2}')
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "run"),
                                   "--export", str(tmp_path / "w.safetensors")])
    assert res.exit_code == 1 and "Traceback" not in res.output and res.exception.__class__ is SystemExit
    assert f"cannot write {tmp_path / 'w.safetensors'}" in res.output and "No space left" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "run"]  # no weights, JSON or temp file


def test_show_selection_help_says_what_keep_and_model_do(tmp_path):
    from PIL import Image

    res = CliRunner().invoke(app, ["show", "selection", "--help"], env={"COLUMNS": "200"})
    assert "with --adaptive: the most each reference keeps" in res.output and "token grid" in res.output
    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")  # --model sets the grid for any selector, not only attention
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--selector", "uniform",
                                   "--model", "refdit-sparse-64px", "--keep", "0.25", "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 0, res.output
    from tokensparse.show_selection import save_selection_map

    masks = save_selection_map([tmp_path / "r.png"], "uniform", 0.25, tmp_path / "s2.png", model="refdit-sparse-64px")
    assert masks[0].shape == (16, 16)


@pytest.mark.parametrize("size", ["0", "8", "264"])
def test_show_tasks_names_the_image_sizes_it_takes(tmp_path, size):
    res = CliRunner().invoke(app, ["show", "tasks", "--image-size", size, "--per-task", "81", "--out",
                                   str(tmp_path / "t.png")])
    assert res.exit_code == 1 and "a multiple of 8 in [16, 256]" in res.output  # not ">= 1", then another rule
    assert not (tmp_path / "t.png").exists()


def test_show_selection_attention_without_a_model_names_the_option(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    for selector in ("attention", "nope"):
        res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--selector", selector,
                                       "--out", str(tmp_path / "s.png")])
        assert res.exit_code == 1 and "Traceback" not in res.output
    assert "unknown --selector 'nope'" in res.output
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--selector", "attention",
                                   "--out", str(tmp_path / "s.png")])
    assert "give --model refdit-sparse" in res.output and "model='" not in res.output  # a flag, not a Python argument
    assert not (tmp_path / "s.png").exists()


def test_show_selection_refuses_an_out_that_is_one_of_its_refs(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp_path / "r.png")
    before = (tmp_path / "r.png").read_bytes()
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--out",
                                   str(tmp_path / "r.png")])
    assert res.exit_code == 1 and "--ref" in res.output and "overwrite" in res.output
    assert (tmp_path / "r.png").read_bytes() == before


def test_show_selection_model_that_is_an_existing_folder_or_file_is_not_called_unshipped(tmp_path):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    (tmp_path / "run").mkdir()
    (tmp_path / "w.json").write_text("{}")
    for model, kind in (("run", "folder"), ("w.json", "file")):
        res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--selector",
                                       "attention", "--model", str(tmp_path / model), "--out", str(tmp_path / "s.png")])
        assert res.exit_code == 1 and "no shipped checkpoint" not in res.output  # it exists: say what it is
        assert f"is a {kind}, not a .safetensors checkpoint" in res.output


@pytest.mark.parametrize("model", ["", " "])
def test_show_selection_refuses_an_empty_model_naming_the_flag(tmp_path, model):
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "r.png")
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--model", model,
                                   "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 1 and "--model must name" in res.output and "is a folder" not in res.output
    assert not (tmp_path / "s.png").exists()


def test_train_half_without_export_is_refused_not_ignored(tmp_path):
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "out": "%s"}' % (tmp_path / "run"))
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--half"])
    assert res.exit_code == 1 and "--half" in res.output and "--export" in res.output
    assert not (tmp_path / "run").exists()  # refused before training


def test_train_refuses_an_export_whose_json_is_a_folder_before_training(tmp_path):
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "out": "%s"}' % (tmp_path / "run"))
    (tmp_path / "w.json").mkdir()
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--export",
                                   str(tmp_path / "w.safetensors")])
    assert res.exit_code == 1 and f"its metadata {tmp_path / 'w.json'} is a folder" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "w.json"]  # no training, no weights


def test_train_reads_a_recipe_saved_with_a_utf8_bom(tmp_path):
    recipe = '{"model": "refdit-tiny", "steps": 1, "batch_size": 2, "out": "%s"}' % (tmp_path / "rün")
    (tmp_path / "r.json").write_bytes(b"\xef\xbb\xbf" + recipe.encode())  # as Windows editors may save it
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and "stopped at step 1" in res.output, res.output  # was "Unexpected UTF-8 BOM"


def test_train_names_a_recipe_that_is_no_text_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "a.png"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "is not a text file" in res.stderr and "codec" not in res.stderr  # was "'utf-8' codec can't decode ..."
    assert not (tmp_path / "run").exists()


def test_train_without_accelerate_fails_in_one_line_naming_the_extra(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed (no [train] extra)
    (tmp_path / "r.json").write_text('{"model": "refdit-tiny", "steps": 1, "batch_size": 2}')
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "r.json"), "--out", str(tmp_path / "run")])
    assert res.exit_code == 1 and "Traceback" not in res.output, res.output
    assert "pip install 'tokensparse[train]'" in res.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("missing", ["diffusers", "peft", "accelerate"])
def test_train_lora_names_each_missing_package(tmp_path, monkeypatch, missing):
    import sys

    monkeypatch.setitem(sys.modules, missing, None)  # [diffusers] alone has no peft
    res = CliRunner().invoke(app, ["train-lora", "--model", str(tmp_path / "m"), "--data", str(tmp_path),
                                   "--out", str(tmp_path / "lora")])
    assert res.exit_code == 1 and f"({missing} not installed)" in res.stderr, res.output
    assert "pip install 'tokensparse[diffusers,train]'" in res.stderr


def _commands(group, path=()):
    """Every command of the click group ``group`` as its argv path."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.parametrize("width", [80, 120])
def test_help_reflows_docstring_paragraphs(width):
    import inspect

    import typer.main

    group = typer.main.get_command(app)
    for path in _commands(group):
        command = group
        for name in path:
            command = command.commands[name]
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(width)})
        assert res.exit_code == 0, res.output
        lines = res.output.splitlines()
        text = lines[next(i for i, line in enumerate(lines) if "Usage:" in line) + 1:]
        text = [line.rstrip() for line in text[:next(i for i, line in enumerate(text) if "╭" in line)]]
        for line, after in zip(text, text[1:]):  # within a paragraph a line ends only where the next word won't fit
            if line and after:
                assert len(line) + 1 + len(after.split()[0]) > width - 3, (path, width, line)
        doc = inspect.getdoc(command.callback).replace("\\[", "[")
        assert " ".join(" ".join(text).split()) == " ".join(doc.split()), path  # all of it, nothing more


def test_every_output_option_says_what_happens_to_an_existing_output():
    import typer.main

    group = typer.main.get_command(app)
    seen = []
    for path in _commands(group):
        command = group
        for name in path:
            command = command.commands[name]
        for param in command.params:
            if param.name in ("out", "export"):
                seen.append((path, param.name))
                text = " ".join(param.help.split())
                # a file is replaced; a run folder resumes (train, train-lora)
                assert "replaced if" in text or "resumes" in text, (path, param.name, text)
    assert len(seen) == 8, seen  # demo, show tasks / selection, generate, bench; train (--out, --export), train-lora


def test_h_is_help_everywhere_but_after_a_bench_name():
    import typer.main

    paths = [(), ("show",), *_commands(typer.main.get_command(app))]
    for path in paths:
        long, short = (CliRunner().invoke(app, [*path, flag], env={"COLUMNS": "100"}) for flag in ("--help", "-h"))
        assert short.exit_code == 0 and short.output == long.output, (path, short.output)
    res = CliRunner().invoke(app, ["bench", "-h"])  # no NAME yet: bench's own help, not "unknown benchmark '-h'"
    assert res.exit_code == 0 and "Run a benchmark script" in res.output


def test_sigterm_while_a_png_is_written_exits_and_leaves_no_temp_file(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import sys, time
        from PIL import Image

        def slow_save(self, fp, *args, **kwargs):  # the temp file is there, half written, when SIGTERM comes
            with open(fp, "wb") as f:
                f.write(b"half a PNG")
            print("writing", flush=True)
            time.sleep(60)

        Image.Image.save = slow_save
        from tokensparse.cli import app
        app(["show", "tasks", "--per-task", "1", "--image-size", "16", "--out", sys.argv[1]])
    """)
    out = tmp_path / "tasks.png"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the write is in progress
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM  # was -15: killed on the spot, no cleanup
    finally:
        proc.kill()
    assert "stopped (SIGTERM)" in proc.stderr.read()
    assert list(tmp_path.iterdir()) == []  # no .tasks.png.*.tmp


def test_the_sigterm_handler_is_a_normal_exit_and_is_restored_after_the_command(monkeypatch):
    import os
    import signal

    from tokensparse import cli

    before = signal.getsignal(signal.SIGTERM)
    seen = []

    class Console:  # records the handler in force while the command runs
        def print(self, *args, **kwargs):
            seen.append(signal.getsignal(signal.SIGTERM))

    monkeypatch.setattr(cli, "console", Console())
    res = CliRunner().invoke(app, ["show", "models"])
    assert res.exit_code == 0, res.output
    assert seen == [cli._stop_on_sigterm]
    assert signal.getsignal(signal.SIGTERM) is before  # the test process's own handling is back
    signal.signal(signal.SIGTERM, cli._stop_on_sigterm)
    try:
        with pytest.raises(SystemExit) as exc:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
            pytest.fail("no SystemExit")
        assert exc.value.code == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # a second SIGTERM ends the process at once
    finally:
        signal.signal(signal.SIGTERM, before)


def test_show_selection_takes_a_training_runs_step_folder_ema_weights(tmp_path):
    from PIL import Image

    from tokensparse.train import TrainConfig, latest_checkpoint, train

    train(TrainConfig(out=str(tmp_path / "run"), model="refdit-tiny", steps=2, batch_size=2, ckpt_every=2,
                      eval_every=10**9, warmup=1, log_every=1, tasks=["relight"]), progress=False)
    Image.new("RGB", (32, 32), "red").save(tmp_path / "r.png")
    ema = latest_checkpoint(tmp_path / "run") / "ema.safetensors"
    res = CliRunner().invoke(app, ["show", "selection", "--ref", str(tmp_path / "r.png"), "--selector", "attention",
                                   "--model", str(ema), "--out", str(tmp_path / "s.png")])
    assert res.exit_code == 0 and (tmp_path / "s.png").is_file(), res.output  # was: "has no ema.json beside it"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["show", "models"], ["--version"], ["show", "-h"]])
def test_a_full_standard_output_is_a_one_line_error_not_a_traceback(argv):
    import os
    import subprocess
    import sys

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "tokensparse", *argv], stdout=full, stderr=subprocess.PIPE,
                             text=True, env=env, timeout=120)
    assert res.returncode == 1, res.stderr[-500:]
    assert res.stderr == "error: cannot write to standard output: No space left on device\n", res.stderr[-500:]


def test_an_os_error_that_is_not_standard_outputs_still_raises(monkeypatch):
    import errno

    import tokensparse.models as models

    def full_disk() -> dict:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(models, "list_models", full_disk)
    res = CliRunner().invoke(app, ["show", "models"])
    assert isinstance(res.exception, OSError) and "cannot write to standard output" not in res.output
