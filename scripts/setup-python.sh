#!/usr/bin/env bash
# Create (or reuse) the project's Python environment and install kubetune into it.
#
#   bash scripts/setup-python.sh            # venv at $KUBETUNE_VENV (default ~/.cache/kubetune/venv)
#
# The venv lives outside the repo so a clean clone (CI) reuses it; `uv` resolves
# and installs in seconds when everything is already there. torch comes from
# PyPI (a range, not a pin), so a machine with a CPU-only wheel cached keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${KUBETUNE_VENV:-$HOME/.cache/kubetune/venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${KUBETUNE_EXTRAS:-operator,trainer,dev}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "==> creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
if [ ! -x "$VENV/bin/uv" ]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "uv>=0.4"
fi
stamp="$VENV/.kubetune-$(cat pyproject.toml | sha256sum | cut -c1-16)-$EXTRAS-$(pwd | sha256sum | cut -c1-8)"
if [ ! -f "$stamp" ]; then
  echo "==> installing kubetune[$EXTRAS] into $VENV"
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" -e ".[$EXTRAS]"
  rm -f "$VENV"/.kubetune-*
  touch "$stamp"
fi
"$VENV/bin/python" -c "import kubetune, kubetune_trainer, kubetune_operator" >/dev/null
