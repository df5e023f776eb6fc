"""The shared fixtures of :mod:`tests.integrations.contract`, run in a pytest of their own (``pytester``)."""

from __future__ import annotations

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("diffusers.models.transformers.transformer_qwenimage21")

pytest_plugins = ["pytester"]

# a test that leaves Sparse Context and token merging applied to the module's pipeline, then one that must find neither
LEAVES_THEM_APPLIED = '''
import tokensparse as ts
from tokensparse.integrations.diffusers import sparse_context_state
from tokensparse.integrations.diffusers_tiny_qwen21 import tiny_qwen_image21
from tokensparse.integrations.merging_hooks import merging_state
from tests.integrations.contract import pipe_fixtures

pipe, clean = pipe_fixtures(tiny_qwen_image21)


def test_leaves_both_applied(pipe):
    ts.apply_sparse_context(pipe, ts.SparseContextConfig(keep=0.25))
    ts.apply_token_merging(pipe, ts.TokenMergingConfig(ratio=0.5))


def test_the_next_test_finds_neither(pipe):
    assert sparse_context_state(pipe) is None
    assert merging_state(pipe) is None
'''


def test_pipe_fixtures_clear_sparse_context_and_token_merging_between_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_leaves=LEAVES_THEM_APPLIED)
    result = pytester.runpytest_inprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)  # was: the second failed, token merging still applied
