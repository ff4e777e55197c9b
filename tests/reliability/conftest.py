"""The reliability suite: the scenarios of `benchmarks/reliability.py` at CI size, against real
`nsam serve` / `nsam consolidate` processes (tiny model) on loopback and Redis servers of their
own (AOF everysec) or the embedded one. Each test is bounded in time and in requests."""

import importlib.util
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("nsam_reliability", _ROOT / "benchmarks" / "reliability.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def scenarios():
    """benchmarks/reliability.py as a module."""
    return _load()
