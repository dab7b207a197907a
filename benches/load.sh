#!/usr/bin/env bash
# Load benchmark for verigate's api listener against a minimal hyper baseline.
#
#   benches/load.sh                      # defaults: 2 wrk threads, 64 connections, 15 s a run
#   DURATION=30s CONNECTIONS=128 benches/load.sh
#
# What it does (benches/README.md has the reasoning and how to read the output):
#   1. installs wrk with apt-get when it is missing;
#   2. builds `target/release/verigate` and the `baseline_server` example (benches/baseline_server.rs);
#   3. starts both on fixed local ports with a throw-away data dir and config;
#   4. drives both with the same wrk + Lua client (benches/load.lua) in two scenarios:
#        create  POST /v1/verifications, a unique address per request (default method "link");
#        check   POST /v1/verifications/check with a wrong code for a pending code verification
#                (verigate restarted on a fresh data dir first, then SEED_COUNT code
#                verifications created as the pool to check against);
#   5. prints req/s, p50 and p99 for each scenario and target, the verigate/baseline ratio, the
#      HTTP status mix, and how many store operations shared each fsync (from /metrics).
#
# Bounded: three server start-ups (≤ 30 s each, normally < 1 s), one seed run (SEED_DURATION),
# a wait for the seed's mails to go out (≤ 30 s; ~10 s at the default delivery.max_per_second
# of 100) and four measured runs (DURATION each): about 85 s with the defaults, after the build.
#
# Environment (defaults in brackets):
#   DURATION [15s]  CONNECTIONS [64]  THREADS [2]  CREATE_METHOD [link]
#   SEED_COUNT [1000]  SEED_DURATION [3s]  size of the check pool, and the time to create it
#   API_PORT [18026]  PUBLIC_PORT [18025]  BASELINE_PORT [18027]
#   KEEP_TMP [0]  keep the temp dir (config, daemon log, raw wrk output, data dir)
#   SKIP_BUILD [0]  use the binaries already in target/release
set -euo pipefail

DURATION=${DURATION:-15s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
SEED_DURATION=${SEED_DURATION:-3s}
SEED_COUNT=${SEED_COUNT:-1000}
CREATE_METHOD=${CREATE_METHOD:-link}
API_PORT=${API_PORT:-18026}
PUBLIC_PORT=${PUBLIC_PORT:-18025}
BASELINE_PORT=${BASELINE_PORT:-18027}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LUA="$HERE/load.lua"
KEY="bench-key-0123456789abcdef"   # plain API key (development form), ≥ 16 chars
NONCE="$(date +%s)$$"

log() { printf '[load %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# 1. wrk
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
command -v curl >/dev/null 2>&1 || die "curl is needed"

# 2. build
cd "$ROOT"
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building (release): verigate + baseline_server"
    cargo build --release --bin verigate --example baseline_server
fi
VERIGATE="$ROOT/target/release/verigate"
BASELINE="$ROOT/target/release/examples/baseline_server"

# 3. temp dir, cleanup, config
TMP=$(mktemp -d "${TMPDIR:-/tmp}/verigate-load.XXXXXX")
VG_PID=""
BL_PID=""
cleanup() {
    local rc=$?
    for pid in $VG_PID $BL_PID; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in $VG_PID $BL_PID; do
        # verigate drains gracefully on SIGTERM; give it a few seconds, then insist.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ "$KEEP_TMP" == 1 ]]; then
        log "temp dir kept: $TMP"
    elif [[ $rc -ne 0 ]]; then
        # Keep the logs and wrk output for the post-mortem; the data dirs are large.
        rm -rf "$TMP"/data-* "$TMP/verigate" "$TMP/baseline_server"
        log "temp dir kept (without data dirs): $TMP"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Run copies: a concurrent `cargo build` must not swap the binary between the two phases.
[[ -x "$VERIGATE" && -x "$BASELINE" ]] || die "binaries missing under target/release"
cp "$VERIGATE" "$TMP/verigate"
cp "$BASELINE" "$TMP/baseline_server"
VERIGATE="$TMP/verigate"
BASELINE="$TMP/baseline_server"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$API_PORT" "$PUBLIC_PORT" "$BASELINE_PORT"; do
    port_busy "$p" && die "port $p is already in use (set API_PORT / PUBLIC_PORT / BASELINE_PORT)"
done

SIGNING_SECRET=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
CONFIG="$TMP/verigate.toml"
cat >"$CONFIG" <<EOF
data_dir = "$TMP/data"
public_base_url = "http://127.0.0.1:$PUBLIC_PORT"

[listen]
api = "127.0.0.1:$API_PORT"
public = "127.0.0.1:$PUBLIC_PORT"

[signing]
keys = ["k1:$SIGNING_SECRET"]

[delivery]
# Mail is "sent" by logging it (at info, hidden by level = warn): no .eml files pile up, and
# the outbox worker still claims and completes every entry through the store as in production.
transport = "log"

[log]
level = "warn"

[verification]
# The check scenario sends wrong codes round robin over a pool of code verifications; a large
# budget keeps every one of them pending with attempts left, so each check is the full durable
# path (read, MAC compare, attempt counter written and fsync'd) and never the cheap 423 locked.
# The budget is a number in the record; it does not change the work of one check.
max_attempts = 1000000

[[apps]]
id = "bench"
api_keys = ["$KEY"]
EOF

# Settings that later versions add (DESIGN §5, §8). Each is kept only if this build's
# `config check` accepts it, so the script works before and after they land:
#  - DNS checks on create would query example.com for every request (no network here; and it
#    would measure the resolver, not the daemon);
#  - rate limits (per_domain 600/1m, per_app 2000/1s, code checks per verification 10/1m by
#    default) would turn the benchmark into a measurement of the limiter: every address here
#    shares the domain example.com and all traffic is one app.
# Afterwards the effective configuration is checked: a limit or DNS check still on is an error.
optional=(
    "dns|check_on_create = false"
    "limits|per_address = []"
    "limits|per_domain = []"
    "limits|per_client_ip = []"
    "limits|per_app = []"
    "limits|code_checks_per_client_ip = []"
    "limits|code_checks_per_verification = []"
)
cp "$CONFIG" "$TMP/base.toml"
render_config() { # accepted entries... → config text
    cat "$TMP/base.toml"
    local table entry e seen=" "
    for entry in "$@"; do
        table=${entry%%|*}
        [[ "$seen" == *" $table "* ]] && continue
        seen+="$table "
        printf '\n[%s]\n' "$table"
        for e in "$@"; do
            [[ "${e%%|*}" == "$table" ]] && printf '%s\n' "${e#*|}"
        done
    done
}
"$VERIGATE" config check --config "$CONFIG" >/dev/null 2>"$TMP/config-check.err" ||
    { cat "$TMP/config-check.err" >&2; die "the base config is not valid"; }
accepted=()
for entry in "${optional[@]}"; do
    render_config "${accepted[@]}" "$entry" >"$TMP/probe.toml"
    if "$VERIGATE" config check --config "$TMP/probe.toml" >/dev/null 2>&1; then
        accepted+=("$entry")
        log "config: [${entry%%|*}] ${entry#*|}"
    fi
done
render_config "${accepted[@]}" >"$CONFIG"
rm -f "$TMP/probe.toml" "$TMP/base.toml"
# The effective configuration, as `config check` prints it: no rate limit and no DNS check on.
"$VERIGATE" config check --config "$CONFIG" >"$TMP/effective.toml" 2>/dev/null
still_on=$(awk '
    /^\[/ { sec = $0; next }
    sec == "[limits]" && /^(per_|code_checks_)[a-z_]* = \[.+\]/ { print sec " " $0 }
    sec == "[dns]" && /^check_on_create = true/ { print sec " " $0 }
' "$TMP/effective.toml")
[[ -z "$still_on" ]] || die "this build keeps settings on that distort the benchmark (update the optional list in $0):
$still_on"

# 4. start both servers
wait_up() { # name pid url
    local name=$1 pid=$2 url=$3
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || { cat "$TMP/$name.log" >&2; die "$name exited during start-up"; }
        if curl -fsS -o /dev/null --max-time 1 "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    cat "$TMP/$name.log" >&2
    die "$name did not answer $url within 30 s"
}
start_verigate() { # phase: a fresh data dir per phase, so one phase's outbox backlog stays out of the next
    local phase=$1
    sed "s#^data_dir = .*#data_dir = \"$TMP/data-$phase\"#" "$CONFIG" >"$TMP/verigate-$phase.toml"
    log "starting verigate on 127.0.0.1:$API_PORT (data dir $TMP/data-$phase)"
    "$VERIGATE" serve --config "$TMP/verigate-$phase.toml" >>"$TMP/verigate.log" 2>&1 &
    VG_PID=$!
    wait_up verigate "$VG_PID" "http://127.0.0.1:$API_PORT/healthz"
}
stop_verigate() { # SIGTERM (graceful), then SIGKILL after 15 s
    kill "$VG_PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$VG_PID" 2>/dev/null || true
    wait "$VG_PID" 2>/dev/null || true
    VG_PID=""
}

start_verigate create
log "starting baseline on 127.0.0.1:$BASELINE_PORT"
"$BASELINE" "$BASELINE_PORT" >"$TMP/baseline.log" 2>&1 &
BL_PID=$!
wait_up baseline "$BL_PID" "http://127.0.0.1:$BASELINE_PORT/healthz"

# A smoke request each, so a wrong key or shape fails here and not as 100% errors under load.
smoke=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d "{\"email\":\"smoke-$NONCE@example.com\"}" \
    "http://127.0.0.1:$API_PORT/v1/verifications")
[[ "$smoke" == *"HTTP 202" ]] || die "verigate smoke create failed: $smoke"
smoke=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H 'Content-Type: application/json' \
    -d '{"email":"smoke@example.com"}' "http://127.0.0.1:$BASELINE_PORT/v1/verifications")
[[ "$smoke" == *"HTTP 202" ]] || die "baseline smoke create failed: $smoke"

# ---------------------------------------------------------------------------------------------
# 5. runs
metric() { # name → value from verigate's /metrics (0 when absent)
    curl -fsS --max-time 10 "http://127.0.0.1:$API_PORT/metrics" |
        awk -v n="$1" '$1 == n { v = $2 } END { print (v == "" ? 0 : v) }'
}
metrics_excerpt() { # store, shedding, code checks, outbox, create/check answers; zeros left out
    curl -fsS --max-time 10 "http://127.0.0.1:$API_PORT/metrics" |
        grep -E '^verigate_(store_|http_shed|code_checks_total|outbox_depth|outbox_attempts_total|http_requests_total\{[^}]*route="(create|check)")' |
        grep -v ' 0$' | sed 's/^/  /' || true
}

# CPU accounting: the server's own CPU time (utime + stime) over a run, and the whole machine's
# busy time, so that a run disturbed by other work on the machine shows up in the report.
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
machine_busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

declare -A RES CPU
run_wrk() { # label port mode method ids_out ids_in duration pid [creates per thread, 0 = no limit]
    local label=$1 port=$2 mode=$3 method=$4 ids_out=$5 ids_in=$6 dur=$7 pid=$8
    local out="$TMP/wrk-$label.txt"
    local p0 m0 t0 p1 m1 t1
    p0=$(proc_ticks "$pid"); m0=$(machine_busy_ticks); t0=$(date +%s.%N)
    log "wrk $label: -t$THREADS -c$CONNECTIONS -d$dur $mode → 127.0.0.1:$port"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$dur" --timeout 10s --latency -s "$LUA" \
        "http://127.0.0.1:$port" -- "$mode" "$KEY" "$NONCE-$label" "$method" \
        "$ids_out" "$ids_in" "$THREADS" "${9:-0}" >"$out" 2>&1 || { cat "$out" >&2; die "wrk $label failed"; }
    p1=$(proc_ticks "$pid"); m1=$(machine_busy_ticks); t1=$(date +%s.%N)
    # server CPU % of one core, machine busy % of all cores
    CPU[$label]=$(awk -v p="$((p1 - p0))" -v m="$((m1 - m0))" -v t0="$t0" -v t1="$t1" \
        -v hz="$CLK_TCK" -v n="$NCPU" 'BEGIN { w = t1 - t0; printf "%.0f %.0f %.6f", 100 * p / hz / w, 100 * m / hz / w / n, p / hz }')
    local line
    line=$(grep '^RESULT ' "$out" | tail -1) || { cat "$out" >&2; die "no RESULT from wrk $label"; }
    RES[$label]=${line#RESULT }
    kill -0 "$VG_PID" 2>/dev/null || { tail -50 "$TMP/verigate.log" >&2; die "verigate died during $label"; }
    kill -0 "$BL_PID" 2>/dev/null || { tail -50 "$TMP/baseline.log" >&2; die "baseline died during $label"; }
}
field() { # label key → value from that run's RESULT line
    local kv
    for kv in ${RES[$1]}; do
        [[ "$kv" == "$2="* ]] && { echo "${kv#*=}"; return; }
    done
    echo "?"
}

declare -A COMMITS OPS
store_snapshot() { COMMITS[$1]=$(metric verigate_store_commits_total); OPS[$1]=$(metric verigate_store_ops_total); }

# create: same Lua, same request shape, baseline first, then verigate.
run_wrk create-baseline "$BASELINE_PORT" create "$CREATE_METHOD" - - "$DURATION" "$BL_PID"
store_snapshot before-create
run_wrk create-verigate "$API_PORT" create "$CREATE_METHOD" - - "$DURATION" "$VG_PID"
store_snapshot after-create
METRICS_CREATE=$(metrics_excerpt)

# check runs on a fresh daemon: otherwise the outbox worker would spend the check run delivering
# the create run's backlog (150k+ mails), and the check numbers would depend on the order.
stop_verigate
start_verigate check

# The pool: a seed run creates SEED_COUNT `code` verifications (each wrk thread stops creating
# after its share and sends GET /healthz for the rest of SEED_DURATION) and records their ids.
# (The 1-by-1 alternative, curl in a loop, is ~100x slower.)
run_wrk seed "$API_PORT" create code "$TMP/ids" - "$SEED_DURATION" "$VG_PID" \
    "$(( (SEED_COUNT + THREADS - 1) / THREADS ))"
cat "$TMP"/ids.* >"$TMP/ids"
POOL=$(wc -l <"$TMP/ids")
(( POOL >= THREADS * 10 )) || die "seed run created only $POOL code verifications"
# (wrk calls request() once more on the first thread to validate the script: one create fewer.)
(( POOL >= SEED_COUNT - 1 )) || log "WARNING: seed run created $POOL of $SEED_COUNT code verifications"
log "check pool: $POOL pending code verifications (attempt budget 1000000 each)"
# Let the worker deliver the seed's mails first (at most 30 s), so the check run measures checks.
for _ in $(seq 300); do
    [[ "$(metric 'verigate_outbox_depth{lane="email"}')" == 0 ]] && break
    sleep 0.1
done
log "outbox depth before check: $(metric 'verigate_outbox_depth{lane="email"}')"

# Before measuring, show the answer the check scenario expects, reproduced with curl.
first_id=$(head -1 "$TMP/ids")
sample=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d "{\"id\":\"$first_id\",\"code\":\"000000\"}" \
    "http://127.0.0.1:$API_PORT/v1/verifications/check")
log "sample check: $sample"

run_wrk check-baseline "$BASELINE_PORT" check - - "$TMP/ids" "$DURATION" "$BL_PID"
store_snapshot before-check
run_wrk check-verigate "$API_PORT" check - - "$TMP/ids" "$DURATION" "$VG_PID"
store_snapshot after-check

# ---------------------------------------------------------------------------------------------
# 6. report
ms() { awk -v us="$1" 'BEGIN { if (us == "?") print "?"; else printf "%.2fms", us / 1000 }'; }
errs() { # socket errors and timeouts of a run, "0" when none
    local l=$1
    awk -v c="$(field "$l" connect_err)" -v r="$(field "$l" read_err)" -v w="$(field "$l" write_err)" \
        -v t="$(field "$l" timeouts)" 'BEGIN { s = c + r + w + t; if (s == 0) print 0;
        else printf "%d (conn %d, read %d, write %d, timeout %d)", s, c, r, w, t }'
}

echo
echo "verigate load benchmark: wrk -t$THREADS -c$CONNECTIONS -d$DURATION, $(nproc) CPUs shared by client and server"
echo "create method: $CREATE_METHOD; check pool: $POOL code verifications"
echo
cpu() { # label → "server CPU % of one core", "server CPU µs per request", "machine busy %"
    local srv mach secs
    read -r srv mach secs <<<"${CPU[$1]}"
    awk -v s="$srv" -v m="$mach" -v c="$secs" -v r="$(field "$1" requests)" \
        'BEGIN { printf "%s%% %.0f %s%%", s, (r > 0) ? 1e6 * c / r : 0, m }'
}
printf '%-8s %-9s %10s %9s %9s %9s %11s %8s %8s %8s  %-22s %s\n' \
    scenario target req/s p50 p99 max non-2xx/3xx srv-cpu "us/req" machine statuses "socket errors"
for scen in create check; do
    for tgt in baseline verigate; do
        l="$scen-$tgt"
        read -r c_srv c_req c_mach <<<"$(cpu "$l")"
        printf '%-8s %-9s %10s %9s %9s %9s %11s %8s %8s %8s  %-22s %s\n' "$scen" "$tgt" "$(field "$l" rps)" \
            "$(ms "$(field "$l" p50_us)")" "$(ms "$(field "$l" p99_us)")" "$(ms "$(field "$l" max_us)")" \
            "$(field "$l" non2xx3xx)" "$c_srv" "$c_req" "$c_mach" "$(field "$l" statuses)" "$(errs "$l")"
    done
done
echo
for scen in create check; do
    awk -v s="$scen" -v v="$(field "$scen-verigate" rps)" -v b="$(field "$scen-baseline" rps)" 'BEGIN {
        r = (b > 0) ? v / b : 0
        line = sprintf("ratio %-6s verigate/baseline = %.3f (%.1f%%)", s, r, 100 * r)
        if (s == "create") line = line sprintf("   target >= 40%%: %s", (r >= 0.40) ? "MET" : "NOT MET")
        print line
    }'
done
echo
echo "seed run (code creates, verigate, $SEED_DURATION): $(field seed rps) req/s, statuses $(field seed statuses)"
echo
echo "verigate store group commits (from /metrics, deltas over each measured run):"
for scen in create check; do
    awk -v s="$scen" -v c0="${COMMITS[before-$scen]}" -v c1="${COMMITS[after-$scen]}" \
        -v o0="${OPS[before-$scen]}" -v o1="${OPS[after-$scen]}" 'BEGIN {
        c = c1 - c0; o = o1 - o0
        printf "  %-6s commits %d, operations %d, operations per commit %.1f\n", s, c, o, (c > 0) ? o / c : 0
    }'
done
echo
echo "notes:"
echo "  - srv-cpu: the server process's CPU time over the run, in % of one core; us/req: that CPU"
echo "    time per completed request; machine: all cores busy, %. The client (wrk) runs on the same"
echo "    $NCPU cores. If machine is near 100% while srv-cpu + wrk cannot explain it, other work on"
echo "    the machine disturbed the run: rerun when it is quiet."
echo "  - create: every 2xx is 202; non-2xx/3xx counts anything else (503 overloaded, 429, 5xx)."
echo "  - check: verigate answers 400 invalid_code (wrong code, attempts left) by design, so its"
echo "    non-2xx/3xx count equals its request count; any status other than 400 is an anomaly."
echo "    The baseline answers 200. A rare 200 from verigate means '000000' was the real code."
if [[ "$KEEP_TMP" == 1 ]]; then
    echo "  - raw wrk output, configs, daemon log and data dirs: $TMP"
else
    echo "  - raw wrk output, configs, daemon log and data dirs: rerun with KEEP_TMP=1 to keep them."
fi
echo
echo "verigate /metrics excerpt at the end of the create phase (its own daemon and data dir):"
echo "$METRICS_CREATE"
echo "verigate /metrics excerpt at the end of the check phase (seed + check):"
metrics_excerpt
if grep -qiE 'error|panic' "$TMP/verigate.log"; then
    echo
    echo "verigate log has errors (first 20 lines):"
    grep -iE 'error|panic' "$TMP/verigate.log" | head -20 | sed 's/^/  /'
fi
