#!/usr/bin/env bash
# Download Tiny Shakespeare into data/ (verified: exact size and sha256) and write
# data/simple_sequences.txt. A thin wrapper: the logic lives in tiny_transformer/download.py.
set -euo pipefail

usage() {
  cat <<'USAGE'
usage: bash data/download_shakespeare.sh [--source PATH_OR_URL] [--force] [--help]

Puts two files in data/ (or in $TINY_TRANSFORMER_DATA):
  tiny_shakespeare.txt   1,115,394 bytes, sha256 86c4e6aa...565ed, checked before it is kept
  simple_sequences.txt   small synthetic tasks (copy, reverse, sort, count, add, parity)

options:
  --source PATH_OR_URL   get the file from a local copy, a file:// URL or an http(s):// URL
                         instead of the canonical URL (for offline machines); the environment
                         variable TINY_SHAKESPEARE_SOURCE does the same
  --force                fetch again even if a valid copy is already there
  -h, --help             show this help

examples:
  bash data/download_shakespeare.sh
  bash data/download_shakespeare.sh --source ~/Downloads/input.txt
  TINY_SHAKESPEARE_SOURCE=/mnt/datasets/tiny_shakespeare.txt bash data/download_shakespeare.sh
USAGE
}

args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --source)
      if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "error: --source needs a value: a file path or a URL (see --help)" >&2
        exit 2
      fi
      args+=(--source "$2"); shift 2 ;;
    --source=*) args+=(--source "${1#--source=}"); shift ;;
    --force) args+=(--force); shift ;;
    -h|--help) usage; exit 0 ;;
    *)
      echo "error: unknown option '$1'" >&2
      usage >&2
      exit 2 ;;
  esac
done

# Which Python: $PYTHON, else the active virtual environment's, else the repository's .venv,
# else python3 / python from PATH.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then py="$VIRTUAL_ENV/bin/python"
  elif [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"
  elif command -v python3 >/dev/null 2>&1; then py=python3
  elif command -v python >/dev/null 2>&1; then py=python
  else
    echo "error: no Python found; install Python 3.11+ or set PYTHON=/path/to/python" >&2
    exit 1
  fi
fi
# The library imports torch, so check for it first (cheaply, without importing it) and say what
# to do instead of printing a traceback.
if ! "$py" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)" 2>/dev/null; then
  echo "error: $py cannot import torch, which tiny_transformer needs; activate the course" \
       "environment (. .venv/bin/activate), run 'pip install -r requirements.txt && pip install -e .'," \
       "or set PYTHON=/path/to/python" >&2
  exit 1
fi

# Put the repository first on the module path: the library next to this script is used whether or
# not `pip install -e .` has been run (with an editable install it is the same code anyway).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m tiny_transformer download all ${args[@]+"${args[@]}"}
