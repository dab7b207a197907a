#!/usr/bin/env bash
# Runs the host-app examples (examples/python, examples/node) end to end against a live daemon.
#
#     .ci/examples.sh [VERIGATE_BINARY]     # default target/release/verigate
#
# Installs what the examples need (a venv with requirements-test.txt, `npm ci`), then runs each
# example's end-to-end test: it starts the daemon on free loopback ports with a temp data dir and
# the file mail transport, starts the example app, and drives sign-up, email change and forged
# callbacks over HTTP. Exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
start=$SECONDS

bin=${1:-target/release/verigate}
[[ $bin = /* ]] || bin="$repo/$bin"
if [[ ! -x $bin ]]; then
    echo "examples: no verigate binary at $bin (build it with cargo build --release, or pass a path)" >&2
    exit 2
fi
export VERIGATE_BIN=$bin
echo "== examples against $bin ($("$bin" --version))"

as_root() { if [[ $(id -u) = 0 ]]; then "$@"; else sudo "$@"; fi; }
need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
command -v npm >/dev/null || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
    echo "== apt-get install ${need_apt[*]}"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if ((node_major < 20)); then
    echo "examples: the Node example needs Node 20 or newer (found $(node --version))" >&2
    exit 2
fi

status=0

echo "== python: venv + pip install -r examples/python/requirements-test.txt"
py=examples/python
[[ -x $py/.venv/bin/python ]] || python3 -m venv "$py/.venv"
"$py/.venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$py/requirements-test.txt"
echo "== python: pytest examples/python/test_e2e.py"
(cd "$py" && .venv/bin/python -m pytest -v -p no:cacheprovider test_e2e.py) || status=1

echo "== node $(node --version): npm ci"
(cd examples/node && npm ci --no-audit --no-fund --loglevel=error)
echo "== node: node --test examples/node/test/e2e.test.mjs"
(cd examples/node && node --test test/e2e.test.mjs) || status=1

echo "== examples: $([[ $status = 0 ]] && echo passed || echo FAILED) in $((SECONDS - start)) s"
exit "$status"
