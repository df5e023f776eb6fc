"""LoRA fine-tuning with random reference dropping, end to end on a tiny random-weight FLUX.2 [klein]."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from tokensparse.integrations.diffusers_lora import LoraTrainConfig, train_lora_sparse
from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein, tiny_qwen_image_edit_plus

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "train_lora_sparse.py"


def test_config_validation_and_unsupported_pipeline():
    with pytest.raises(ValueError):
        LoraTrainConfig(keep_min=0.0)
    with pytest.raises(ValueError):
        LoraTrainConfig(resolution=30)
    for bad in (0.0, -1e-4, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            LoraTrainConfig(lr=bad)
    with pytest.raises(ValueError, match="target_modules must name at least one"):
        LoraTrainConfig(target_modules=[])
    for bad in (None, "to_q", ["to_q", 1]):
        with pytest.raises(TypeError, match="target_modules must be a list of module names"):
            LoraTrainConfig(target_modules=bad)
    with pytest.raises(TypeError, match="Flux2KleinPipeline"):
        train_lora_sparse(tiny_qwen_image_edit_plus(), [object()], LoraTrainConfig(steps=1), "/nonexistent")
    import tokensparse as ts

    pipe = ts.apply_sparse_context(tiny_flux2_klein(seed=0), ts.SparseContextConfig(keep=0.5))
    with pytest.raises(ValueError, match="remove_sparse_context"):
        train_lora_sparse(pipe, [object()], LoraTrainConfig(steps=1), "/nonexistent")


def test_failed_repeated_and_blocked_runs_leave_the_pipeline_and_folder_clean(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from tokensparse.integrations.diffusers_lora import _ADAPTER, Example, load_examples

    pipe = tiny_flux2_klein(seed=0)
    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    examples = [Example([img], img, "mirror it")]
    cfg = LoraTrainConfig(steps=2, resolution=32, rank=2, max_sequence_length=16)
    flags = {n: p.requires_grad for n, p in pipe.transformer.named_parameters()}
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}

    def adapters() -> dict:
        return getattr(pipe.transformer, "peft_config", None) or {}

    def boom(step: int, keep: float, loss: float) -> None:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        train_lora_sparse(pipe, examples, cfg, tmp_path / "a", log=boom)
    assert _ADAPTER not in adapters() and not (tmp_path / "a").exists()
    assert {n: p.requires_grad for n, p in pipe.transformer.named_parameters()} == flags
    after = pipe.transformer.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], v) for k, v in weights.items())
    (tmp_path / "b" / "train_config.json").mkdir(parents=True)  # in the way: found before training
    with pytest.raises(IsADirectoryError, match="is a folder"):
        train_lora_sparse(pipe, examples, cfg, tmp_path / "b", log=boom)
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["train_config.json"] and _ADAPTER not in adapters()
    assert len(train_lora_sparse(pipe, examples, cfg, tmp_path / "c")) == 2  # the same pipeline trains again
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["checkpoints", "pytorch_lora_weights.safetensors",
                                                                   "train_config.json"]
    with pytest.raises(ValueError, match="already has a LoRA adapter"):  # its adapter is still on
        train_lora_sparse(pipe, examples, cfg, tmp_path / "d")
    pipe.transformer.unload_lora()

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(type(pipe), "save_lora_weights", full_disk)
    with pytest.raises(OSError, match="cannot write the LoRA to .*No space left"):
        train_lora_sparse(pipe, examples, cfg, tmp_path / "e")
    assert _ADAPTER in adapters() and [p.name for p in (tmp_path / "e").iterdir()] == ["checkpoints"]  # no weights
    data = tmp_path / "data"
    (data / ".ipynb_checkpoints").mkdir(parents=True)  # hidden folders are not examples
    (data / "ex0").mkdir()
    for name in ("ref1.png", "target.png"):
        img.save(data / "ex0" / name)
    (data / "ex0" / "prompt.txt").write_text("mirror it")
    assert len(load_examples(data)) == 1


def test_a_seed_repeats_a_run_exactly_and_bad_inputs_are_refused_before_training(tmp_path):
    import numpy as np
    from PIL import Image
    from safetensors.torch import load_file

    from tokensparse.integrations.diffusers_lora import Example, load_examples

    img = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
    examples = [Example([img], img, "mirror it")]
    cfg = LoraTrainConfig(steps=2, resolution=32, rank=2, max_sequence_length=16, seed=3)
    runs = []
    for i, global_seed in enumerate((1, 2)):  # the caller's global RNG neither matters nor is consumed
        pipe = tiny_flux2_klein(seed=0)
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        train_lora_sparse(pipe, examples, cfg, tmp_path / f"run{i}")
        assert torch.equal(torch.random.get_rng_state(), before)
        runs.append(load_file(str(tmp_path / f"run{i}" / "pytorch_lora_weights.safetensors")))
    assert runs[0].keys() == runs[1].keys() and all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])

    pipe = tiny_flux2_klein(seed=0)
    (tmp_path / "afile").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        train_lora_sparse(pipe, examples, cfg, tmp_path / "afile" / "sub")
    with pytest.raises(ValueError, match=r"\['nope'\] match no module"):
        train_lora_sparse(pipe, examples, LoraTrainConfig(steps=1, resolution=32, target_modules=["nope"]),
                          tmp_path / "x")
    assert len(train_lora_sparse(pipe, examples, cfg, tmp_path / "y")) == 2  # still trainable
    with pytest.raises(ValueError, match="resolution"):
        LoraTrainConfig(resolution=40_000)

    data = tmp_path / "data"
    (data / "ex").mkdir(parents=True)
    for i, name in enumerate(("ref10.png", "ref2.png", "target.png")):
        Image.new("RGB", (16, 16), (i * 100, 0, 0)).save(data / "ex" / name)
    (data / "ex" / "prompt.txt").write_bytes("\ufeffthe cat".encode())  # a BOM is dropped
    ex = load_examples(data)[0]
    assert [r.getpixel((0, 0))[0] for r in ex.refs] == [100, 0] and ex.prompt == "the cat"  # ref2, then ref10
    (data / "ex" / "prompt.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="prompt.txt is not UTF-8"):
        load_examples(data)


@pytest.mark.slow
def test_example_script_trains_saves_and_reloads(tmp_path):
    spec = importlib.util.spec_from_file_location("train_lora_sparse", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "lora"
    losses = module.main(
        [
            "--model",
            "tiny",
            "--steps",
            "6",
            "--resolution",
            "32",
            "--rank",
            "4",
            "--max-sequence-length",
            "16",
            "--out",
            str(out),
            "--lr",
            "1e-2",
        ]
    )
    assert len(losses) == 6 and all(math.isfinite(v) for v in losses)
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "train_config.json").is_file()
    assert (out / "sample.png").is_file()

    fresh = tiny_flux2_klein(seed=0)
    fresh.set_progress_bar_config(disable=True)
    kw = {
        "prompt": "mirror the image",
        "height": 32,
        "width": 32,
        "num_inference_steps": 2,
        "max_sequence_length": 16,
        "output_type": "np",
    }
    base = fresh(generator=torch.Generator().manual_seed(0), **kw).images
    fresh.load_lora_weights(out)
    tuned = fresh(generator=torch.Generator().manual_seed(0), **kw).images
    assert not (base == tuned).all()


@pytest.mark.slow
def test_train_lora_command(tmp_path):
    import numpy as np
    import typer
    from PIL import Image
    from typer.testing import CliRunner

    from tokensparse.cli_diffusers import train_lora

    model = tmp_path / "klein"
    tiny_flux2_klein(seed=0).save_pretrained(model)
    ex = tmp_path / "data" / "ex0"
    ex.mkdir(parents=True)
    img = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    img.save(ex / "ref1.png")
    img.transpose(Image.FLIP_LEFT_RIGHT).save(ex / "target.png")
    (ex / "prompt.txt").write_text("mirror it")
    app = typer.Typer()
    app.command("train-lora")(train_lora)
    app.command("noop")(lambda: None)
    result = CliRunner().invoke(
        app,
        [
            "train-lora",
            "--model",
            str(model),
            "--data",
            str(tmp_path / "data"),
            "--out",
            str(tmp_path / "lora"),
            "--steps",
            "2",
            "--resolution",
            "32",
            "--rank",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()
    from .contract import pipeline_folder  # here: subprocesses import this module on its own, as no package

    # only model_index.json: an unsupported class fails before loading
    kontext = pipeline_folder(tmp_path / "kontext", "FluxKontextPipeline")
    args = ["train-lora", "--model", str(kontext), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "l2")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1 and "supports" in result.output and "cannot load" not in result.output


def _examples(n: int = 2, seed: int = 0) -> list:
    import numpy as np
    from PIL import Image

    from tokensparse.integrations.diffusers_lora import Example

    rng = np.random.RandomState(seed)
    images = [Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")) for _ in range(2 * n)]
    return [Example([images[2 * i]], images[2 * i + 1], f"edit {i}") for i in range(n)]


def test_an_interrupted_run_resumes_bit_exactly(tmp_path):
    from safetensors.torch import load_file

    from tokensparse.integrations.diffusers_lora import _ADAPTER, WEIGHTS

    examples = _examples()
    cfg = {"resolution": 32, "rank": 2, "max_sequence_length": 16, "seed": 5, "lr": 1e-2}
    full = train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=8, **cfg), tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["latest", "step_0000008"]

    out = tmp_path / "resumed"
    assert len(train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=4, save_every=3, **cfg),
                                 out)) == 4  # a finished run (checkpoints at steps 3 and 4) ...
    seen = []

    def crash(step: int, keep: float, loss: float) -> None:
        seen.append(step)
        if step == 6:  # after the checkpoint of step 6 (0-based step 5)
            raise KeyboardInterrupt

    pipe = tiny_flux2_klein(seed=0)  # ... given more steps trains on, and is interrupted
    with pytest.raises(KeyboardInterrupt):
        train_lora_sparse(pipe, examples, LoraTrainConfig(steps=8, save_every=3, **cfg), out, log=crash)
    assert seen == [4, 5, 6] and _ADAPTER not in (getattr(pipe.transformer, "peft_config", None) or {})
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_0000004", "step_0000006"]
    resumed = train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=8, save_every=3, **cfg), out)
    assert resumed == full  # the losses of all 8 steps, the earlier ones from the checkpoint

    a, b = (load_file(str(d / WEIGHTS)) for d in (tmp_path / "full", out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=8, **cfg), out) == full  # done
    fresh = tiny_flux2_klein(seed=0)
    fresh.load_lora_weights(out)  # the exported weights load as before, beside the checkpoints folder
    assert fresh.transformer.peft_config


def test_resume_refuses_another_recipe_other_data_and_damaged_files(tmp_path):
    from tokensparse.integrations.diffusers_lora import LoraCheckpointError

    examples = _examples()
    cfg = {"resolution": 32, "rank": 2, "max_sequence_length": 16}
    out = tmp_path / "run"
    train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=2, **cfg), out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    pipe = tiny_flux2_klein(seed=0)
    refused = [
        (LoraTrainConfig(steps=3, **{**cfg, "rank": 4}, lr=1e-3), examples, r"\(lr 0.0001 -> 0.001; rank 2 -> 4\)"),
        (LoraTrainConfig(steps=3, **cfg), _examples(seed=1), r"\(data \(other examples\)\)"),
        (LoraTrainConfig(steps=1, **cfg), examples, "at step 2, past steps=1"),
    ]
    for recipe, data, message in refused:
        with pytest.raises(LoraCheckpointError, match=message):
            train_lora_sparse(pipe, data, recipe, out)
    assert not getattr(pipe.transformer, "peft_config", None)  # refused before training
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    ckpt = out / "checkpoints" / "step_0000002"
    for name in ("lora.safetensors", "optim.pt", "state.json", "config.json"):
        (ckpt / name).write_bytes(b"\x00garbage")
        with pytest.raises(ValueError, match=rf"^checkpoint .*step_0000002: cannot read {name} \(") as info:
            train_lora_sparse(pipe, examples, LoraTrainConfig(steps=3, **cfg), out)
        assert "\n" not in str(info.value)
        (ckpt / name).write_bytes(before[ckpt / name])
    assert not getattr(pipe.transformer, "peft_config", None)  # damaged files are found before any work
    with pytest.raises(ValueError, match="save_every"):
        LoraTrainConfig(save_every=0)


def test_train_lora_command_resumes_and_names_a_damaged_checkpoint(tmp_path):
    import typer
    from typer.testing import CliRunner

    from tokensparse.cli_diffusers import train_lora

    model = tmp_path / "klein"
    tiny_flux2_klein(seed=0).save_pretrained(model)
    ex = tmp_path / "data" / "ex0"
    ex.mkdir(parents=True)
    example = _examples(1)[0]
    example.refs[0].save(ex / "ref1.png")
    example.target.save(ex / "target.png")
    (ex / "prompt.txt").write_text(example.prompt)
    app = typer.Typer()
    app.command("train-lora")(train_lora)
    app.command("noop")(lambda: None)
    out = tmp_path / "lora"
    args = ["train-lora", "--model", str(model), "--data", str(tmp_path / "data"), "--out", str(out),
            "--resolution", "32", "--rank", "2", "--save-every", "1"]
    assert CliRunner().invoke(app, [*args, "--steps", "1"]).exit_code == 0
    result = CliRunner().invoke(app, [*args, "--steps", "2"])
    assert result.exit_code == 0 and f"resuming from {out / 'checkpoints' / 'step_0000001'} at step 1 of 2" in \
        result.output
    (out / "checkpoints" / "step_0000002" / "optim.pt").write_bytes(b"not a torch file")
    result = CliRunner().invoke(app, [*args, "--steps", "3"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "cannot read optim.pt" in errors[0], result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, [*args, "--steps", "3", "--lr", "1e-3"])  # refused before loading the model
    assert result.exit_code == 1 and "another recipe (lr 0.0001 -> 0.001)" in result.output


def test_resume_matches_tuples_and_arrays_and_refuses_another_base_model(tmp_path):
    import numpy as np

    from tokensparse.integrations.diffusers_lora import Example, LoraCheckpointError, examples_digest

    cfg = {"resolution": 32, "rank": 2, "max_sequence_length": 16, "target_modules": ("to_q", "to_k")}
    assert LoraTrainConfig(**cfg).target_modules == ["to_q", "to_k"]
    with pytest.raises(TypeError, match="target_modules"):
        LoraTrainConfig(target_modules="to_q")
    arrays = [Example([np.asarray(ex.refs[0], dtype=np.float32) / 255], np.asarray(ex.target), ex.prompt)
              for ex in _examples()]  # arrays, as the pipeline's image processor takes them
    out = tmp_path / "run"
    train_lora_sparse(tiny_flux2_klein(seed=0), arrays, LoraTrainConfig(steps=1, **cfg), out)
    assert len(train_lora_sparse(tiny_flux2_klein(seed=0), arrays, LoraTrainConfig(steps=2, **cfg), out)) == 2
    import shutil

    from diffusers import Flux2KleinPipeline

    tiny_flux2_klein(seed=0).save_pretrained(tmp_path / "m")
    shutil.copytree(tmp_path / "m", tmp_path / "m2")  # the same model loaded from another folder resumes
    moved = Flux2KleinPipeline.from_pretrained(tmp_path / "m2", local_files_only=True)
    assert len(train_lora_sparse(moved, arrays, LoraTrainConfig(steps=3, **cfg), out)) == 3
    tensors = [Example([torch.rand(3, 32, 32).bfloat16()], torch.rand(3, 32, 32).bfloat16(), "x")]
    assert examples_digest(tensors) == examples_digest(tensors) != examples_digest(arrays)  # bf16 tensors too
    other = tiny_flux2_klein(seed=7)  # the same architecture, other weights
    with pytest.raises(LoraCheckpointError, match=r"base model \(another transformer"):
        train_lora_sparse(other, arrays, LoraTrainConfig(steps=4, **cfg), out)
    assert not getattr(other.transformer, "peft_config", None)  # refused before training


def test_resume_refuses_another_number_of_processes_or_mixed_precision(tmp_path):
    import json

    from tokensparse.integrations.diffusers_lora import LoraCheckpointError

    cfg = {"resolution": 32, "rank": 2, "max_sequence_length": 16}
    out = tmp_path / "run"
    train_lora_sparse(tiny_flux2_klein(seed=0), _examples(), LoraTrainConfig(steps=1, **cfg), out)
    state_file = out / "checkpoints" / "step_0000001" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps({**state, "num_processes": 2}))
    pipe = tiny_flux2_klein(seed=0)
    with pytest.raises(LoraCheckpointError, match="trained by 2 processes and this run has 1"):
        train_lora_sparse(pipe, _examples(), LoraTrainConfig(steps=2, **cfg), out)
    assert not getattr(pipe.transformer, "peft_config", None)  # refused before training
    assert state["mixed_precision"] == "no"
    state_file.write_text(json.dumps({**state, "mixed_precision": "bf16"}))  # as under launch --mixed_precision
    with pytest.raises(LoraCheckpointError, match="mixed precision 'bf16' and this run has 'no'"):
        train_lora_sparse(pipe, _examples(), LoraTrainConfig(steps=2, **cfg), out)
    assert not getattr(pipe.transformer, "peft_config", None)


TWO_PROCESS_SCRIPT = """
import json, sys
import torch
from accelerate import PartialState
from tokensparse.integrations.diffusers_lora import LoraTrainConfig, train_lora_sparse
from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein
sys.path.insert(0, sys.argv[2])
from test_diffusers_lora import _examples

torch.set_num_threads(1)
seen = []
pipe = tiny_flux2_klein(seed=0)
cfg = LoraTrainConfig(steps=3, resolution=32, rank=2, max_sequence_length=16, lr=1e-2)
losses = train_lora_sparse(pipe, _examples(4), cfg, sys.argv[1], log=lambda s, k, l: seen.append(k))
rank = PartialState(cpu=True).process_index  # after training: the trainer sets accelerate up (a CPU world)
lora = {n: p.detach() for n, p in pipe.transformer.named_parameters() if "lora" in n}
torch.save(lora, f"{sys.argv[1]}/rank{rank}.pt")
with open(f"{sys.argv[1]}/run{rank}.json", "w") as f:
    json.dump({"keeps": seen, "losses": losses}, f)
"""


def test_two_processes_draw_their_own_samples_and_stay_identical(tmp_path):
    import json
    import os
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out), str(Path(__file__).parent)]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [json.loads((out / f"run{r}.json").read_text()) for r in (0, 1)]
    assert runs[0]["keeps"] != runs[1]["keeps"]  # each process draws its own keep ratios (and samples, noise)
    assert runs[0]["losses"] == runs[1]["losses"]  # the recorded loss: the mean over both processes
    a, b = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a)  # one model on both
    from tokensparse.run_checkpoints import latest_checkpoint

    state = json.loads((latest_checkpoint(out / "checkpoints") / "state.json").read_text())
    assert state["num_processes"] == 2 and state["step"] == 3 and state["losses"] == runs[0]["losses"]
    assert (out / "pytorch_lora_weights.safetensors").is_file()  # written once, by the main process


def test_base_fingerprint_reads_public_config_of_any_shape():
    from torch import nn

    from tokensparse.integrations.diffusers_lora import base_fingerprint

    def model(config: dict) -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(2, 2))
        m.config = config
        return m

    odd = {"s": {"beta", "alpha"}, 1: (2, 3), ("a", 1): None}  # a set, int and tuple keys: still one digest
    a = base_fingerprint(model({**odd, "_name_or_path": "/x"}), ["0"])
    assert a == base_fingerprint(model({**odd, "_name_or_path": "/y"}), ["0"])  # where it was loaded from: no
    assert a != base_fingerprint(model({"s": {"beta"}}), ["0"])


def test_a_missing_or_file_data_folder_is_named(tmp_path):
    from tokensparse.integrations.diffusers_lora import load_examples

    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"data folder .*nodata does not exist; expected a folder of"):
        load_examples(tmp_path / "nodata")
    with pytest.raises(ValueError, match=r"data folder .*afile is a file"):
        load_examples(tmp_path / "afile")


def test_an_fp16_runs_loss_scaler_state_is_checkpointed_and_restored(tmp_path, monkeypatch):
    import accelerate

    scalers = []

    class WithScaler(accelerate.Accelerator):  # fp16 needs a GPU: a CPU GradScaler stands in for accelerate's
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1)  # doubles every step
            scalers.append(self.scaler)

    monkeypatch.setattr(accelerate, "Accelerator", WithScaler)
    examples = _examples()
    cfg = {"resolution": 32, "rank": 2, "max_sequence_length": 16, "seed": 5, "lr": 1e-2, "save_every": 2}
    full = train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=4, **cfg), tmp_path / "full")
    out = tmp_path / "resumed"
    train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=2, **cfg), out)
    assert torch.load(out / "checkpoints" / "step_0000002" / "scaler.pt")["scale"] == 16.0 * 2**2
    assert train_lora_sparse(tiny_flux2_klein(seed=0), examples, LoraTrainConfig(steps=4, **cfg), out) == full
    assert scalers[0].get_scale() == scalers[2].get_scale() == 16.0 * 2**4  # went on from the checkpoint's scale


def test_resuming_fp16_from_a_checkpoint_without_scaler_state_says_the_scale_restarts(tmp_path, caplog):
    from tokensparse.integrations.diffusers_lora_checkpoints import Resume, restore

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    resume = Resume(tmp_path / "step_0000002", {"step": 2}, {"w": torch.ones(2)}, optimizer.state_dict(), None)
    with caplog.at_level("WARNING"):
        restore(resume, {"w": weight}, optimizer, scaler)
    assert torch.equal(weight.detach(), torch.ones(2))
    assert "holds no loss-scaler state" in caplog.text  # was silent (train() says so)


def test_an_optimizer_state_of_another_shape_is_refused_at_resume(tmp_path):
    from tokensparse.integrations.diffusers_lora_checkpoints import LoraCheckpointError, Resume, restore

    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.ones(2)
    optimizer.step()
    saved = optimizer.state_dict()
    saved["state"][0]["exp_avg"] = torch.zeros(3)  # load_state_dict takes it; the next step would fail
    resume = Resume(tmp_path / "step_0000001", {"step": 1}, {"w": torch.ones(2)}, saved, None)
    with pytest.raises(LoraCheckpointError, match="optim.pt does not fit"):
        restore(resume, {"w": weight}, torch.optim.AdamW([weight]))


@pytest.mark.parametrize("missing", ["peft", "accelerate"])
def test_training_without_the_train_extra_names_it_before_any_work(tmp_path, monkeypatch, missing):
    import sys

    from tokensparse.extras import MissingExtraError

    monkeypatch.setitem(sys.modules, missing, None)  # [diffusers] alone has accelerate but no peft
    with pytest.raises(MissingExtraError, match=rf"train_lora_sparse needs {missing}, .*tokensparse\[train\]"):
        train_lora_sparse(object(), [], LoraTrainConfig(), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()
