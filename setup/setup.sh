#!/usr/bin/env bash
# One-command set-up for a fresh machine:
#   bash setup/setup.sh            # creates .venv, installs everything, prepares the data, checks
#   bash setup/setup.sh --cpu      # same, forcing the small CPU-only build of PyTorch (Linux)
# Offline data: TINY_SHAKESPEARE_SOURCE=/path/to/tiny_shakespeare.txt bash setup/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CPU_ONLY=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU_ONLY=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "unknown option: $arg (use --cpu or --help)" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
  echo "error: tiny-transformer needs Python 3.11 or newer; found $("$PY" --version 2>&1)." >&2
  echo "fix: install Python 3.11+ and run: PYTHON=python3.11 bash setup/setup.sh" >&2
  exit 1
fi

[ -d .venv ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
if [ "$CPU_ONLY" = 1 ] && ! python -c 'import torch' 2>/dev/null; then
  python -m pip install torch --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -r requirements.txt -e .
bash data/download_shakespeare.sh
python setup/verify_environment.py
echo
echo "Ready. Activate the environment with:  source .venv/bin/activate"
echo "Then train a tiny model:               python -m tiny_transformer train --config tiny --max-steps 200"
echo "Or open the course:                    jupyter lab notebooks/"
