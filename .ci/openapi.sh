#!/usr/bin/env bash
# Contract test of the HTTP API: openapi/openapi.json against a live daemon.
#
#   bash .ci/openapi.sh [path/to/verigate]        (default target/release/verigate; not built here)
#
# 1. installs schemathesis and openapi-spec-validator (pinned, from PyPI) into a venv;
# 2. validates openapi/openapi.json as OpenAPI 3.1;
# 3. starts the daemon on free loopback ports with a temporary data dir and a config written
#    here (file transport, DNS checks off and DNS pointed at a closed local port, generous rate
#    limits; a second app "tight" keeps one small limit so 429 is exercised);
# 4. compares GET /openapi.json with the file (skipped while the daemon answers 404);
# 5. runs schemathesis against the api listener (bearer key) and the public listener, with the
#    checks not_a_server_error, status_code_conformance, content_type_conformance,
#    response_headers_conformance and response_schema_conformance;
# 6. walks the flows random input cannot reach (.ci/openapi_flow.py: mail links and codes,
#    locked/superseded/expired/canceled, 429, outbox, watch stream) with the same checks.
# Exits non-zero when any step finds a failure. The daemon is always stopped.
#
# Environment: ST_MAX_EXAMPLES (default 300 per operation and phase), ST_SEED (reproduce a run),
# ST_WORKERS (default 1), OPENAPI_VENV (default ~/.cache/verigate/openapi-venv-<version>),
# KEEP_TMP=1 (keep the data dir, config, daemon log and reports; kept anyway when the run fails).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
VALIDATOR_VERSION=0.9.0
SPEC=openapi/openapi.json
BIN=${1:-target/release/verigate}
MAX_EXAMPLES=${ST_MAX_EXAMPLES:-300}
# One worker: with two, hypothesis' ast.parse calls in parallel threads hit a CPython 3.11 bug
# (gh-106905, "SystemError: AST constructor recursion depth mismatch") now and then.
WORKERS=${ST_WORKERS:-1}
API_KEY=openapi-ci-key-shop-0123456789
TIGHT_KEY=openapi-ci-key-tight-0123456789
started=$(date +%s)

if [[ ! -x "$BIN" ]]; then
    echo "openapi: no daemon binary at $BIN (build it with 'cargo build --release', or pass its path)" >&2
    exit 2
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

# --- tools ------------------------------------------------------------------------------------
VENV=${OPENAPI_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/verigate/openapi-venv-$SCHEMATHESIS_VERSION}
if [[ ! -x "$VENV/bin/st" ]] || ! "$VENV/bin/st" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "== pip install schemathesis==$SCHEMATHESIS_VERSION openapi-spec-validator==$VALIDATOR_VERSION (into $VENV)"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        "schemathesis==$SCHEMATHESIS_VERSION" "openapi-spec-validator==$VALIDATOR_VERSION"
fi
PY=$VENV/bin/python
echo "== $("$VENV/bin/st" --version 2>&1 | head -1), $("$BIN" --version 2>&1 | head -1), $("$PY" --version)"

echo "== openapi-spec-validator $SPEC"
"$VENV/bin/openapi-spec-validator" "$SPEC"

# --- daemon -----------------------------------------------------------------------------------
tmp=$(mktemp -d "${TMPDIR:-/tmp}/verigate-openapi.XXXXXX")
daemon_pid=
cleanup() {
    local rc=$?
    if [[ -n "$daemon_pid" ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    if [[ "${KEEP_TMP:-}" == 1 || $rc != 0 ]]; then
        echo "openapi: kept $tmp (config, daemon.log, data/mail, JUnit reports, schemathesis crash files;"
        echo "  replay a failure, with the daemon running: $VENV/bin/st --config-file $tmp/schemathesis.toml replay <Test Case ID>)"
    else
        rm -rf "$tmp"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Three free loopback ports: api, public, and one nothing listens on, for DNS (every lookup
# fails fast and stays on this machine; the verdict is "unknown").
read -r API_PORT PUBLIC_PORT DNS_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
EOF
)
API=http://127.0.0.1:$API_PORT
PUBLIC=http://127.0.0.1:$PUBLIC_PORT
mkdir -p "$tmp/data"
cat >"$tmp/config.toml" <<EOF
data_dir = "$tmp/data"
public_base_url = "$PUBLIC"

[listen]
api = "127.0.0.1:$API_PORT"
public = "127.0.0.1:$PUBLIC_PORT"

[signing]
keys = ["k1:b3BlbmFwaS1jaS1zaWduaW5nLWtleS0zMi1ieXRlcyE"]

[delivery]
transport = "file"

[file]
dir = "$tmp/data/mail"

[dns]
check_on_create = false
nameservers = ["127.0.0.1:$DNS_PORT"]
timeout_ms = 100
deadline_ms = 300

[log]
level = "warn"

# Generous, so that fuzzing reaches the handlers instead of 429; the app "tight" keeps 429 alive.
[limits]
per_address = ["100000/1s"]
per_domain = ["100000/1s"]
per_client_ip = ["100000/1s"]
per_app = ["100000/1s"]
code_checks_per_client_ip = ["100000/1s"]
code_checks_per_verification = ["100000/1s"]

[[apps]]
id = "shop"
api_keys = ["$API_KEY"]
redirect_prefixes = ["https://app.example.com/welcome"]
from = "Shop <no-reply@shop.example.com>"

[[apps]]
id = "tight"
api_keys = ["$TIGHT_KEY"]
limits = { per_address = ["1/60s"] }
EOF
"$BIN" config check --config "$tmp/config.toml" >/dev/null
echo "== verigate serve: api $API, public $PUBLIC, data $tmp/data"
"$BIN" serve --config "$tmp/config.toml" >"$tmp/daemon.log" 2>&1 &
daemon_pid=$!

http_status() { # URL -> HTTP status code ("000" when nothing answers)
    "$PY" - "$@" <<'EOF'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
EOF
}

for i in $(seq 300); do
    if ! kill -0 "$daemon_pid" 2>/dev/null; then
        echo "openapi: the daemon exited during start-up:" >&2
        cat "$tmp/daemon.log" >&2
        exit 1
    fi
    [[ $(http_status "$API/readyz") == 200 ]] && break
    if [[ $i == 300 ]]; then
        echo "openapi: /readyz did not answer 200 within 30 s" >&2
        cat "$tmp/daemon.log" >&2
        exit 1
    fi
    sleep 0.1
done

failed=()

# --- GET /openapi.json ------------------------------------------------------------------------
exclude_doc=()
case $(http_status "$API/openapi.json") in
    200)
        echo "== GET /openapi.json equals $SPEC"
        if ! "$PY" - "$API/openapi.json" "$SPEC" <<'EOF'; then
import difflib, json, sys, urllib.request
served = json.load(urllib.request.urlopen(sys.argv[1], timeout=5))
with open(sys.argv[2]) as f:
    file = json.load(f)
if served != file:
    a = json.dumps(file, indent=2, sort_keys=True).splitlines()
    b = json.dumps(served, indent=2, sort_keys=True).splitlines()
    print("\n".join(list(difflib.unified_diff(a, b, sys.argv[2], "GET /openapi.json", lineterm=""))[:200]))
    sys.exit(1)
EOF
            echo "openapi: GET /openapi.json differs from $SPEC" >&2
            failed+=("GET /openapi.json differs from $SPEC")
        fi
        ;;
    404)
        echo "== GET /openapi.json: skipped, the daemon answers 404 (route not there yet); not fuzzed either"
        exclude_doc=(--exclude-operation-id openapi)
        ;;
    *)
        echo "openapi: GET /openapi.json answered $(http_status "$API/openapi.json")" >&2
        failed+=("GET /openapi.json")
        ;;
esac

# The watch stream and its script are being added; walk them only once the daemon serves them.
watch=()
exclude_watch=()
if [[ $(http_status "$PUBLIC/static/verigate-watch.js") == 200 ]]; then
    watch=(--watch)
else
    echo "== watch stream: skipped, the public listener answers /static/verigate-watch.js with $(http_status "$PUBLIC/static/verigate-watch.js")"
    exclude_watch=(--exclude-operation-id watchVerification --exclude-operation-id watchScript --exclude-operation-id watchScriptHead)
fi

# --- schemathesis -----------------------------------------------------------------------------
# schemathesis keeps replayable crash files under ./.schemathesis, and hypothesis its data under
# ./.hypothesis, by default: keep both in $tmp.
export HYPOTHESIS_STORAGE_DIRECTORY=$tmp/hypothesis
cat >"$tmp/schemathesis.toml" <<EOF
[cache]
directory = "$tmp/schemathesis-cache"
EOF
st() { "$VENV/bin/st" --config-file "$tmp/schemathesis.toml" "$@"; }
CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance
st_common=(
    --checks "$CHECKS"
    --max-examples "$MAX_EXAMPLES"
    --workers "$WORKERS"
    --generation-database none
    --request-timeout 20
    --no-color
    --report junit
)
[[ -n "${ST_SEED:-}" ]] && st_common+=(--seed "$ST_SEED")

echo "== schemathesis: api listener $API (every operation but the public ones)"
if ! st run "$SPEC" --url "$API" "${st_common[@]}" \
    --report-junit-path "$tmp/junit-api.xml" \
    -H "Authorization: Bearer $API_KEY" \
    --exclude-tag public "${exclude_doc[@]}"; then
    failed+=("schemathesis: api listener")
fi

echo "== schemathesis: public listener $PUBLIC (/v/{token}, /healthz and, once served, the watch stream)"
if ! st run "$SPEC" --url "$PUBLIC" "${st_common[@]}" \
    --report-junit-path "$tmp/junit-public.xml" \
    --include-tag public --include-operation-id healthz --include-operation-id healthzHead \
    "${exclude_watch[@]}"; then
    failed+=("schemathesis: public listener")
fi

echo "== flows: $PY .ci/openapi_flow.py"
if ! "$PY" .ci/openapi_flow.py --spec "$SPEC" --api "$API" --public "$PUBLIC" \
    --key "$API_KEY" --tight-key "$TIGHT_KEY" --mail-dir "$tmp/data/mail" "${watch[@]}"; then
    failed+=("flows")
fi

if ! kill -0 "$daemon_pid" 2>/dev/null; then
    failed+=("the daemon died during the run")
fi
if grep -qE 'panicked|ERROR' "$tmp/daemon.log"; then
    echo "openapi: the daemon logged errors:" >&2
    grep -E 'panicked|ERROR' "$tmp/daemon.log" | head -20 >&2
    failed+=("daemon log has errors")
fi

echo "openapi: $(($(date +%s) - started)) s"
if ((${#failed[@]})); then
    printf 'openapi: FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "openapi: OK"
