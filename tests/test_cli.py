import pytest
from typer.testing import CliRunner

from tokensparse.cli import app


def test_help_and_show_models():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output
    res = runner.invoke(app, ["show", "models"])
    assert res.exit_code == 0 and "refdit-s" in res.output


@pytest.mark.parametrize("args, message", [
    (["demo", "--steps", "0"], "--steps must be >= 1"),
    (["demo", "--out", "{tmp}/x.jpg"], ".png"),
    (["show", "tasks", "--per-task", "0", "--out", "{tmp}/t.png"], "per_task"),
    (["show", "tasks", "--image-size", "20", "--out", "{tmp}/t.png"], "image"),
    (["show", "selection", "--ref", "{tmp}/notimg.png", "--out", "{tmp}/s.png"], "cannot identify"),
])
def test_cli_bad_inputs_fail_in_one_line_and_write_nothing(tmp_path, args, message):
    (tmp_path / "notimg.png").write_text("not an image")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notimg.png"]
