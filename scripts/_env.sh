# Sourced by scripts/test and scripts/demo: a virtual environment with nox, made once.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/nox" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet nox
fi
cd "$ROOT"
