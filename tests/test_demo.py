import io

import pytest
from PIL import Image
from rich.console import Console

from tokensparse.demo import run_demo


def test_demo_writes_png_and_sparse_keeps_fewer_tokens(tmp_path):
    out = tmp_path / "demo.png"
    res = run_demo(out, steps=2, console=Console(file=io.StringIO()))
    assert out.is_file()
    img = Image.open(out)
    assert img.mode == "RGB" and img.width > img.height
    rows = res["rows"]
    assert len(rows) == 4  # two examples, dense and sparse each
    for dense, sparse in zip(rows[0::2], rows[1::2]):
        assert dense["mode"] == "dense" and sparse["tokens"] < dense["tokens"]
        assert all(r["seconds"] > 0 for r in (dense, sparse))


def test_demo_refuses_no_repeats_before_generating(tmp_path):
    out = tmp_path / "demo.png"
    for repeats in (0, -1):
        with pytest.raises(ValueError, match="repeats must be >= 1"):
            run_demo(out, steps=1, console=Console(file=io.StringIO()), repeats=repeats)
    assert not out.exists()


def test_demo_refuses_a_non_png_out_before_generating(tmp_path, monkeypatch):
    import tokensparse.demo as demo

    def no_model(console):
        raise AssertionError("loaded a model for an output it cannot write")

    monkeypatch.setattr(demo, "demo_model", no_model)
    with pytest.raises(ValueError, match=r"output path must end in \.png"):
        run_demo(tmp_path / "demo.jpg", steps=1, console=Console(file=io.StringIO()))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("steps, error, message", [(0, ValueError, r"steps must be in \[1, 100000\]"),
                                                   (100_001, ValueError, r"steps must be in \[1, 100000\]"),
                                                   (2.5, TypeError, "steps must be an int")])
def test_demo_refuses_bad_steps_before_loading_a_model(tmp_path, monkeypatch, steps, error, message):
    import tokensparse.demo as demo

    def no_model(console):
        raise AssertionError("loaded a model (and ran the warm-up) for a step count generate refuses")

    monkeypatch.setattr(demo, "demo_model", no_model)
    with pytest.raises(error, match=message):
        run_demo(tmp_path / "demo.png", steps=steps, console=Console(file=io.StringIO()))
    assert list(tmp_path.iterdir()) == []
