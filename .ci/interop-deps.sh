#!/usr/bin/env bash
# Installs the third-party dotenv readers that tests/values.rs checks the agent's dotenv output against:
# python-dotenv (PyPI, pip --target) and Node's dotenv (npm, npm --prefix), into target/interop/.
# Idempotent: an install already present at the pinned version is kept. Needs python3 + pip and node + npm.
# The tests find the readers there; with OSC_REQUIRE_INTEROP=1 a missing reader fails the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_DOTENV=1.2.4
NODE_DOTENV=18.0.10
dir="$PWD/target/interop"
mkdir -p "$dir"

if [ "$(PYTHONPATH="$dir/python" python3 -c 'import importlib.metadata as m; print(m.version("python-dotenv"))' 2>/dev/null)" != "$PY_DOTENV" ]; then
    rm -rf "$dir/python"
    python3 -m pip install --quiet --root-user-action=ignore --disable-pip-version-check --no-input --no-deps \
        --target "$dir/python" "python-dotenv==$PY_DOTENV"
fi
echo "python-dotenv $PY_DOTENV in $dir/python"

if [ "$(node -p "require('$dir/node/node_modules/dotenv/package.json').version" 2>/dev/null)" != "$NODE_DOTENV" ]; then
    rm -rf "$dir/node"
    mkdir -p "$dir/node"
    npm install --silent --no-audit --no-fund --no-save --prefix "$dir/node" "dotenv@$NODE_DOTENV"
fi
echo "node dotenv $NODE_DOTENV in $dir/node"
