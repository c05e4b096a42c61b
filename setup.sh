#!/usr/bin/env bash
# Create .venv with transferlab and the pinned versions it is tested with here (idempotent; needs only PyPI).
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -c constraints.txt -e '.[deploy,test]'
