"""LoRA training's data and output folders (checked before the pipeline loads)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")

from tokensparse.integrations.diffusers_lora import check_data_out, load_examples


def _data(root):
    import numpy as np
    from PIL import Image

    ex = root / "ex0"
    ex.mkdir(parents=True)
    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    img.save(ex / "ref1.png")
    img.save(ex / "target.png")
    (ex / "prompt.txt").write_text("keep it")
    return root


def test_an_output_folder_inside_the_data_folder_is_refused(tmp_path):
    data = _data(tmp_path / "data")
    for out in (data / "lora", data, data / "ex0" / "lora"):
        with pytest.raises(ValueError, match="inside --data|is the --data folder"):
            check_data_out(data, out)
    check_data_out(data, tmp_path / "data2")  # a sibling sharing the name's prefix is fine
    check_data_out(data, tmp_path)  # data inside out is fine too: the run writes only its own names there
    assert len(load_examples(data)) == 1


def test_train_lora_command_refuses_out_inside_data_before_loading(tmp_path):
    import typer
    from typer.testing import CliRunner

    from tokensparse.cli_diffusers import train_lora

    data = _data(tmp_path / "data")
    app = typer.Typer()
    app.command("train-lora")(train_lora)
    app.command("noop")(lambda: None)
    args = ["train-lora", "--model", str(tmp_path / "no-model"), "--data", str(data), "--out", str(data / "lora")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "inside --data" in result.output, result.output
    assert "cannot load" not in result.output and not (data / "lora").exists()


def test_example_script_samples_on_the_main_process_only(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "train_lora_sparse.py"
    spec = importlib.util.spec_from_file_location("train_lora_sparse_main_only", example)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class OtherRank:  # what a process of rank 1 sees under torchrun / accelerate launch
        is_main_process = False

        def __init__(self, **kwargs):
            pass

    monkeypatch.setattr(module, "PartialState", OtherRank)
    out = tmp_path / "lora"
    args = ["--model", "tiny", "--steps", "2", "--resolution", "32", "--rank", "2", "--max-sequence-length", "16",
            "--out", str(out)]
    assert len(module.main(args)) == 2
    assert not (out / "sample.png").exists()  # every process wrote it (a race on one file)


def test_a_bfloat16_pipeline_trains_float32_lora_weights(tmp_path):
    import torch
    from safetensors.torch import load_file

    from tokensparse.integrations.diffusers_lora import Example, LoraTrainConfig, train_lora_sparse
    from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein

    (ex,) = load_examples(_data(tmp_path / "data"))
    weights = {}
    for steps in (1, 4):
        pipe = tiny_flux2_klein(seed=0).to(torch.bfloat16)
        cfg = LoraTrainConfig(steps=steps, resolution=32, rank=4, max_sequence_length=16)
        train_lora_sparse(pipe, [Example(ex.refs, ex.target, ex.prompt)], cfg, tmp_path / f"out{steps}")
        weights[steps] = load_file(tmp_path / f"out{steps}" / "pytorch_lora_weights.safetensors")
    a = [k for k in weights[1] if "lora_A" in k]
    assert a and all(weights[4][k].dtype == torch.float32 for k in weights[4])
    moved = sum(int((weights[1][k] != weights[4][k]).sum()) for k in a) / sum(weights[1][k].numel() for k in a)
    assert moved > 0.9, moved  # bf16 LoRA weights: about 8% of lora_A entries took AdamW's 1e-4 steps
    assert pipe.transformer.dtype == torch.bfloat16  # the base model stays in bf16
