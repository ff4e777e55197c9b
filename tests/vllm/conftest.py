"""tests/vllm run where vLLM is installed: the environment `benchmarks/vllm_env.sh DIR` makes
(`.ci/run` makes one and runs these tests in it). Elsewhere they skip, saying so."""

import importlib.util

import pytest

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed in this environment: make one with `bash benchmarks/vllm_env.sh DIR` "
                "and run `DIR/bin/python -m pytest tests/vllm`", allow_module_level=True)
