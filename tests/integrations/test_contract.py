"""The shared fixtures of :mod:`tests.integrations.contract`."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import tokensparse as ts  # noqa: E402
from tokensparse.integrations.diffusers import sparse_context_state  # noqa: E402
from tokensparse.integrations.diffusers_tiny import tiny_flux2_klein  # noqa: E402
from tokensparse.integrations.merging_hooks import merging_state  # noqa: E402

from .contract import clear, pipe_fixtures  # noqa: E402


def test_clear_removes_sparse_context_and_token_merging() -> None:
    # what pipe_fixtures' autouse fixture runs after each test: a test that leaves either applied to the module's
    # shared pipeline must not change the next one's outputs (token merging was left applied)
    pipe = tiny_flux2_klein()
    ts.apply_sparse_context(pipe, ts.SparseContextConfig(keep=0.25))
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))
    clear(pipe)
    assert sparse_context_state(pipe) is None and merging_state(pipe) is None
    clear(pipe)  # nothing applied: a no-op


def test_pipe_fixtures_clean_fixture_runs_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import contract

    cleared = []
    monkeypatch.setattr(contract, "clear", cleared.append)
    _, clean = pipe_fixtures(tiny_flux2_klein)
    body = clean.__wrapped__ if hasattr(clean, "__wrapped__") else clean._get_wrapped_function()
    gen = body("the pipe")
    next(gen)
    with pytest.raises(StopIteration):
        next(gen)
    assert cleared == ["the pipe"]
