from typer.testing import CliRunner

from tokensparse.cli import app


def test_help_and_show_models():
    runner = CliRunner()
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "demo" in res.output
    res = runner.invoke(app, ["show", "models"])
    assert res.exit_code == 0 and "refdit-s" in res.output
