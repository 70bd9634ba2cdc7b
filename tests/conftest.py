"""Fixtures shared by the whole test suite.

Keep this file small: fixtures that only one test module needs belong in that module.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random Llama (safetensors + tokenizer with a chat template), built once per
    test session by ``selfreward.tiny.make_tiny_model``; returns its directory as a str.

    Tests must treat it as read-only: it is shared by every test of the session.
    """
    from selfreward.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny-model") / "model", seed=0))
