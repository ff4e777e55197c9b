"""Shared fixtures: the real default model is loaded once per test session."""

import pytest


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct as an `NsamModel` (fp32, CPU)."""
    from nsam.model.runtime import NsamModel

    return NsamModel.load("default")


@pytest.fixture(scope="session")
def tiny_model():
    from nsam.model.runtime import NsamModel

    return NsamModel.load("tiny")
