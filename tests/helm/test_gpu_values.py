"""GPU and engine values: model.device / model.engine / model.maxLoras reach `nsam serve` as
flags, GPUs are requested with the cuda image variants, and the schema refuses the mismatches."""

from __future__ import annotations

import pytest

from helm_support import one
from test_cli_contract import container_argv, run_cli

GPU = {"model": {"device": "cuda", "engine": "vllm", "maxLoras": 16},
       "server": {"gpu": {"enabled": True, "count": 1}, "nodeSelector": {"nvidia.com/gpu.present": "true"},
                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
       "image": {"variant": "cuda-vllm"}}


def test_gpu_engine_values_become_serve_flags(render, monkeypatch, tmp_path):
    s = run_cli(monkeypatch, container_argv(render(GPU), "-server", tmp_path))
    assert (s.device, s.engine, s.max_loras) == ("cuda", "vllm", 16)


def test_defaults_serve_natively_on_the_cpu(render, monkeypatch, tmp_path):
    s = run_cli(monkeypatch, container_argv(render({}), "-server", tmp_path))
    assert (s.device, s.engine, s.max_loras) == ("cpu", "native", 8)


def test_gpu_pod_requests_the_gpu_and_lands_on_gpu_nodes(render):
    pod = one(render(GPU), "Deployment", "-server")["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["containers"][0]["image"].endswith("-cuda-vllm")


@pytest.mark.parametrize("values", [
    {"model": {"device": "cuda"}},                                   # no GPU requested
    {"model": {"device": "tpu"}},
    {"model": {"engine": "vllm"}},                                   # vLLM is only in cuda-vllm
    {"model": {"engine": "sglang"}},
    {"model": {"maxLoras": 0}},
])
def test_schema_refuses_gpu_mismatches(chart, values):
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)
