"""Named models and checkpoints (``tokensparse.models.zoo``)."""

import pytest

import tokensparse as ts


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_model_name_is_called_empty_not_the_current_folder(name):
    # "" is the working folder to Path: it read " is a folder, not a .safetensors checkpoint"
    with pytest.raises(ValueError, match=r"name is empty; give one of \['refdit-base'") as info:
        ts.load_model(name)
    assert "is a folder" not in str(info.value)


def _tiny_run(out):
    from tokensparse.train import TrainConfig, latest_checkpoint, train

    train(TrainConfig(out=str(out), model="refdit-tiny", steps=2, batch_size=2, ckpt_every=2, eval_every=10**9,
                      warmup=1, log_every=1, tasks=["relight"]), progress=False)
    return latest_checkpoint(out)


def test_a_training_runs_step_folder_weights_load_with_the_runs_config(tmp_path):
    import torch

    from tokensparse.train import run_ema

    step = _tiny_run(tmp_path / "run")  # holds config.json (the recipe) and state.json, no ema.json
    model = ts.load_model(step / "ema.safetensors")  # was: FileNotFoundError "has no ema.json beside it"
    assert not model.training and model.config == ts.build_model("refdit-tiny").config
    ema = run_ema(tmp_path / "run")[0].state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    raw = ts.load_model(str(step / "model.safetensors"))  # the raw weights of the same step, a str path too
    assert any(not torch.equal(v, ema[k]) for k, v in raw.state_dict().items())
    (step / "config.json").unlink()  # a checkpoint saved without the recipe: the run folder's
    assert torch.equal(ts.load_model(step / "ema.safetensors").final.weight, model.final.weight)


def test_a_lora_runs_step_folder_weights_are_refused_pointing_to_export(tmp_path):
    import json
    import shutil

    step = _tiny_run(tmp_path / "run")
    lora = tmp_path / "lora" / step.name
    shutil.copytree(step, lora)
    recipe = json.loads((lora / "config.json").read_text())
    (lora / "config.json").write_text(json.dumps({**recipe, "lora_rank": 2}))
    with pytest.raises(ValueError, match=r"a LoRA run's \(lora_rank 2\).*--export"):
        ts.load_model(lora / "ema.safetensors")
    (lora / "config.json").write_text(json.dumps({**recipe, "model": "refdit-xl"}))
    with pytest.raises(ValueError, match="config.json does not hold a training recipe"):
        ts.load_model(lora / "ema.safetensors")


def test_a_checkpoint_with_no_json_and_no_run_folder_is_still_refused(tmp_path):
    from tokensparse.models import save_checkpoint

    save_checkpoint(ts.build_model("refdit-tiny"), tmp_path / "w.safetensors")
    (tmp_path / "w.json").unlink()
    (tmp_path / "config.json").write_text("{}")  # a config.json alone (no state.json): not a run's step folder
    with pytest.raises(FileNotFoundError, match="has no w.json beside it"):
        ts.load_model(tmp_path / "w.safetensors")


def test_a_checkpoint_path_with_a_tilde_is_read_from_the_home_folder(tmp_path, monkeypatch):
    # "~/x.safetensors" was read as a folder named "~" under the working folder: "checkpoint ... not found"
    from pathlib import Path

    from tokensparse.models.zoo import load_checkpoint, save_checkpoint

    monkeypatch.setenv("HOME", str(tmp_path))
    save_checkpoint(ts.build_model("refdit-tiny"), tmp_path / "x.safetensors")
    for load in (ts.load_model, load_checkpoint):
        for path in ("~/x.safetensors", Path("~/x.safetensors")):
            assert isinstance(load(path), ts.RefDiT)
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"is a folder, not a \.safetensors checkpoint"):
        ts.load_model("~/run")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        load_checkpoint("~/run")
