#!/usr/bin/env bash
# Browser walkthrough: headless Chromium (Debian's package) against the real daemon binary.
#   .ci/browser.sh [VERIGATE_BIN]     (default target/release/verigate; build it first)
# Installs Chromium and a CJK font (for the zh-CN screenshots) when missing, then the npm
# dependencies of tests/browser (playwright-core only, which downloads no browser), and runs
# tests/browser/walkthrough.mjs. Screenshots: target/browser-screenshots/. Non-zero on failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath -m "${1:-target/release/verigate}")

if [ ! -x /usr/bin/chromium ] || ! fc-list :lang=zh 2>/dev/null | grep -q .; then
    echo "== apt-get install chromium fonts-wqy-zenhei"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-wqy-zenhei >/dev/null
fi
command -v node >/dev/null || { echo "node (>= 20) is needed: it comes with the machine" >&2; exit 1; }
echo "== $(/usr/bin/chromium --version 2>/dev/null), node $(node --version)"

echo "== npm ci (tests/browser)"
(cd tests/browser && npm ci --no-audit --no-fund --loglevel=error)

echo "== walkthrough against $bin"
status=0
node tests/browser/walkthrough.mjs "$bin" || status=$?
echo "screenshots: $(pwd)/target/browser-screenshots"
exit "$status"
