#!/usr/bin/env bash
# Load benchmark for verigate's api and public listeners against a minimal hyper baseline.
#
#   benches/load.sh                      # defaults: 2 wrk threads, 64 connections, 15 s a run
#   DURATION=30s CONNECTIONS=128 benches/load.sh
#   SCENARIOS="create half check get link" benches/load.sh   # everything (benches/run.sh does this)
#
# What it does (benches/README.md has the reasoning and how to read the output):
#   1. installs wrk with apt-get when it is missing;
#   2. builds `target/release/verigate` and the `baseline_server` example (benches/baseline_server.rs),
#      unless VG_BINARY / BASELINE_BINARY name binaries to use instead;
#   3. starts both on fixed local ports with a throw-away data dir and config, and (FLOOR=1) the
#      baseline a second time as the *durable floor* (`--durable`: every POST also writes one
#      record to fjall and answers after its group's fdatasync, see baseline_server.rs);
#   4. drives them with the same wrk + Lua client (benches/load.lua), in the scenarios of SCENARIOS
#      (the floor in create, check and link):
#        create  POST /v1/verifications, a unique address per request (default method "link");
#        half    creates at half of create's req/s (paced connections, see README), p99 there;
#                verigate restarted on a fresh data dir first; needs create (added when missing);
#        check   POST /v1/verifications/check with a wrong code for a pending code verification
#                (verigate restarted on a fresh data dir first, then SEED_COUNT code
#                verifications created as the pool to check against);
#        get     GET /v1/verifications/{id} over the same pool (status reads);
#        link    POST /v/{token} on the public listener, the confirm button: verigate restarted
#                with the file transport, LINK_POOL link verifications created, their links read
#                from the .eml files, every token POSTed once (verigate's run ends when every
#                token has been used, or after DURATION);
#   5. prints req/s, p50, p99, p99.9 for each scenario and target, the verigate/baseline ratio
#      (and floor/baseline, verigate/floor),
#      the HTTP status mix, how many store operations shared each fsync (from /metrics), and
#      verigate's memory (VmRSS at idle after start, VmHWM after the create run).
#
# Bounded: up to five server start-ups (<= 30 s each, normally < 1 s), the seed runs, a wait for
# the seeds' mails to go out (<= 30 s for check, <= LINK_DRAIN_TIMEOUT for link) and two
# measured runs (DURATION each) per scenario (half: one calibration run of HALF_CALIBRATE too):
# about 85 s with the default SCENARIOS, after the build.
#
# Environment (defaults in brackets):
#   DURATION [15s]  CONNECTIONS [64]  THREADS [2]  CREATE_METHOD [link]
#   SCENARIOS ["create check"]  any of create half check get link
#   SEED_COUNT [1000]  SEED_DURATION [3s]  size of the check/get pool, and the time to create it
#   HALF_CALIBRATE [5s]  the calibration run of half
#   LINK_POOL [100000]  link verifications for the link run (the file transport writes ~1,000
#               .eml files/s on 2 cores: 100k take ~1.5 min). A fixed size: the store's size
#               changes the cost of a confirm, so runs are only comparable at the same pool.
#   LINK_DRAIN_TIMEOUT [600]  seconds to wait for the link pool's .eml files
#   API_PORT [18026]  PUBLIC_PORT [18025]  BASELINE_PORT [18027]  FLOOR_PORT [18028]
#   FLOOR [1]  also run the durable floor (0: baseline and verigate only)
#   VG_BINARY []  BASELINE_BINARY []  use these executables (copied) instead of building
#   RESULTS_FILE []  also append every figure as `http.<run>.<key>=<value>` lines to this file
#   KEEP_TMP [0]  keep the temp dir (config, daemon log, raw wrk output, data dir)
#   SKIP_BUILD [0]  use the binaries already in target/release
set -euo pipefail

DURATION=${DURATION:-15s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
SEED_DURATION=${SEED_DURATION:-3s}
SEED_COUNT=${SEED_COUNT:-1000}
CREATE_METHOD=${CREATE_METHOD:-link}
SCENARIOS=${SCENARIOS:-"create check"}
HALF_CALIBRATE=${HALF_CALIBRATE:-5s}
LINK_POOL=${LINK_POOL:-100000}
LINK_DRAIN_TIMEOUT=${LINK_DRAIN_TIMEOUT:-600}
API_PORT=${API_PORT:-18026}
PUBLIC_PORT=${PUBLIC_PORT:-18025}
BASELINE_PORT=${BASELINE_PORT:-18027}
FLOOR_PORT=${FLOOR_PORT:-18028}
FLOOR=${FLOOR:-1}
VG_BINARY=${VG_BINARY:-}
BASELINE_BINARY=${BASELINE_BINARY:-}
RESULTS_FILE=${RESULTS_FILE:-}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LUA="$HERE/load.lua"
SEED_LUA="$HERE/delivery.lua"   # creates an exact number of verifications, then stops
KEY="bench-key-0123456789abcdef"   # plain API key (development form), ≥ 16 chars
NONCE="$(date +%s)$$"

BENCH_TAG=load
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

has() { [[ " $SCENARIOS " == *" $1 "* ]]; }
for s in $SCENARIOS; do
    case "$s" in create | half | check | get | link) ;; *) die "unknown scenario '$s' in SCENARIOS" ;; esac
done
if has half && ! has create; then SCENARIOS="create $SCENARIOS"; fi
SCEN_ORDER=()
for s in create half check get link; do has "$s" && SCEN_ORDER+=("$s"); done

# ---------------------------------------------------------------------------------------------
# 1. wrk
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    apt-get update -qq && apt-get install -y -qq wrk >/dev/null
fi
command -v curl >/dev/null 2>&1 || die "curl is needed"
if has link; then command -v python3 >/dev/null 2>&1 || die "python3 is needed (link tokens)"; fi

# 2. build
cd "$ROOT"
if [[ "$SKIP_BUILD" != 1 ]]; then
    targets=()
    [[ -z "$VG_BINARY" ]] && targets+=(--bin verigate)
    [[ -z "$BASELINE_BINARY" ]] && targets+=(--example baseline_server)
    if (( ${#targets[@]} > 0 )); then
        log "building (release): ${targets[*]}"
        cargo build --release "${targets[@]}"
    fi
fi
VERIGATE=${VG_BINARY:-"$ROOT/target/release/verigate"}
BASELINE=${BASELINE_BINARY:-"$ROOT/target/release/examples/baseline_server"}

# 3. temp dir, cleanup, config
TMP=$(mktemp -d "${TMPDIR:-/tmp}/verigate-load.XXXXXX")
VG_PID=""
BL_PID=""
FL_PID=""
WRK_PID=""
cleanup() {
    local rc=$?
    [[ -n "$WRK_PID" ]] && kill "$WRK_PID" 2>/dev/null || true
    for pid in $VG_PID $BL_PID $FL_PID; do
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
        fi
    done
    for pid in $VG_PID $BL_PID $FL_PID; do
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
[[ -x "$VERIGATE" ]] || die "verigate binary missing: $VERIGATE"
[[ -x "$BASELINE" ]] || die "baseline binary missing: $BASELINE"
cp "$VERIGATE" "$TMP/verigate"
cp "$BASELINE" "$TMP/baseline_server"
VERIGATE="$TMP/verigate"
BASELINE="$TMP/baseline_server"

ports=("$API_PORT" "$PUBLIC_PORT" "$BASELINE_PORT")
[[ "$FLOOR" == 1 ]] && ports+=("$FLOOR_PORT")
for p in "${ports[@]}"; do
    port_busy "$p" && die "port $p is already in use (set API_PORT / PUBLIC_PORT / BASELINE_PORT / FLOOR_PORT)"
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
# (The link phase switches to transport = "file": the links are read from the .eml files.)
transport = "log"

[verification]
# The check scenario sends wrong codes round robin over a pool of code verifications; a large
# budget keeps every one of them pending with attempts left, so each check is the full durable
# path (read, MAC compare, attempt counter written and fsync'd) and never the cheap 423 locked.
# The budget is a number in the record; it does not change the work of one check.
max_attempts = 1000000
EOF
bench_config_tail "$KEY" >>"$CONFIG"

# The effective configuration, as `config check` prints it: no rate limit and no DNS check on.
"$VERIGATE" config check --config "$CONFIG" >"$TMP/effective.toml" 2>"$TMP/config-check.err" ||
    { cat "$TMP/config-check.err" >&2; die "the bench config is not valid for this build"; }
still_on=$(awk '
    /^\[/ { sec = $0; next }
    sec == "[limits]" && /^(per_|code_checks_)[a-z_]* = \[.+\]/ { print sec " " $0 }
    sec == "[dns]" && /^check_on_create = true/ { print sec " " $0 }
' "$TMP/effective.toml")
[[ -z "$still_on" ]] || die "this build keeps settings on that distort the benchmark (see bench_config_tail in benches/lib.sh):
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
start_verigate() { # phase [sed expression for the phase's config]: a fresh data dir per phase,
                   # so one phase's outbox backlog stays out of the next
    local phase=$1
    sed -e "s#^data_dir = .*#data_dir = \"$TMP/data-$phase\"#" ${2:+-e "$2"} "$CONFIG" >"$TMP/verigate-$phase.toml"
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
# Memory at idle: one second after the listener answered, before any API request.
sleep 1
IDLE_RSS=$(status_kib "$VG_PID" VmRSS)
log "verigate VmRSS at idle after start: $IDLE_RSS KiB"
log "starting baseline on 127.0.0.1:$BASELINE_PORT"
"$BASELINE" "$BASELINE_PORT" >"$TMP/baseline.log" 2>&1 &
BL_PID=$!
wait_up baseline "$BL_PID" "http://127.0.0.1:$BASELINE_PORT/healthz"
if [[ "$FLOOR" == 1 ]]; then
    log "starting the durable floor on 127.0.0.1:$FLOOR_PORT (data dir $TMP/data-floor)"
    "$BASELINE" "$FLOOR_PORT" --durable "$TMP/data-floor" >"$TMP/floor.log" 2>&1 &
    FL_PID=$!
    wait_up floor "$FL_PID" "http://127.0.0.1:$FLOOR_PORT/healthz"
fi

# A smoke request each, so a wrong key or shape fails here and not as 100% errors under load.
smoke=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' -d "{\"email\":\"smoke-$NONCE@example.com\"}" \
    "http://127.0.0.1:$API_PORT/v1/verifications")
[[ "$smoke" == *"HTTP 202" ]] || die "verigate smoke create failed: $smoke"
others=("baseline $BASELINE_PORT")
[[ -n "$FL_PID" ]] && others+=("floor $FLOOR_PORT")
for np in "${others[@]}"; do
    smoke=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H 'Content-Type: application/json' \
        -d '{"email":"smoke@example.com"}' "http://127.0.0.1:${np#* }/v1/verifications")
    [[ "$smoke" == *"HTTP 202" ]] || die "${np% *} smoke create failed: $smoke"
done

# ---------------------------------------------------------------------------------------------
# 5. runs
metric() { # name → value from verigate's /metrics (0 when absent)
    curl -fsS --max-time 60 "http://127.0.0.1:$API_PORT/metrics" |
        awk -v n="$1" '$1 == n { v = $2 } END { print (v == "" ? 0 : v) }'
}
metrics_excerpt() { # store, shedding, code checks, outbox, answers per route; zeros left out
    curl -fsS --max-time 60 "http://127.0.0.1:$API_PORT/metrics" |
        grep -E '^verigate_(store_|http_shed|code_checks_total|outbox_depth|outbox_attempts_total|http_requests_total\{[^}]*route="(create|check|get|confirm)")' |
        grep -v ' 0$' | sed 's/^/  /' || true
}
wait_outbox_empty() { # timeout seconds → 0 when the email lane is empty
    local deadline=$((SECONDS + $1))
    while (( SECONDS < deadline )); do
        [[ "$(metric 'verigate_outbox_depth{lane="email"}')" == 0 ]] && return 0
        sleep 0.2
    done
    return 1
}

# CPU accounting: the server's own CPU time (utime + stime) over a run, and the whole machine's
# busy time, so that a run disturbed by other work on the machine shows up in the report.
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

declare -A RES CPU
# label port mode method ids_out ids_in duration pid [creates per thread, 0 = no limit]
#   [pace ms, 0 = closed loop] [link: marker prefix; the run ends when every thread has written one]
run_wrk() {
    local label=$1 port=$2 mode=$3 method=$4 ids_out=$5 ids_in=$6 dur=$7 pid=$8 marker=${11:--}
    local out="$TMP/wrk-$label.txt"
    local p0 m0 t0 p1 m1 t1 n
    p0=$(proc_ticks "$pid"); m0=$(busy_ticks); t0=$(date +%s.%N)
    local how=""
    [[ "${10:-0}" != 0 ]] && how=" pace ${10} ms"
    [[ "$marker" != - ]] && how=" (until every token is used)"
    log "wrk $label: -t$THREADS -c$CONNECTIONS -d$dur $mode$how → 127.0.0.1:$port"
    local cmd=(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$dur" --timeout 10s --latency -s "$LUA"
        "http://127.0.0.1:$port" -- "$mode" "$KEY" "$NONCE-$label" "$method"
        "$ids_out" "$ids_in" "$THREADS" "${9:-0}" "${10:-0}" "$marker")
    if [[ "$marker" == - ]]; then
        "${cmd[@]}" >"$out" 2>&1 || { cat "$out" >&2; die "wrk $label failed"; }
    else
        # wrk ends only after -d or on SIGINT, even when every thread has stopped itself.
        rm -f "$marker".*
        "${cmd[@]}" >"$out" 2>&1 &
        WRK_PID=$!
        while kill -0 "$WRK_PID" 2>/dev/null; do
            n=$( (compgen -G "$marker.*" || true) | wc -l)
            if (( n >= THREADS )); then kill -INT "$WRK_PID" 2>/dev/null || true; break; fi
            sleep 0.02
        done
        wait "$WRK_PID" || true
        WRK_PID=""
    fi
    p1=$(proc_ticks "$pid"); m1=$(busy_ticks); t1=$(date +%s.%N)
    # server CPU % of one core, machine busy % of all cores
    CPU[$label]=$(awk -v p="$((p1 - p0))" -v m="$((m1 - m0))" -v t0="$t0" -v t1="$t1" \
        -v hz="$CLK_TCK" -v n="$NCPU" 'BEGIN { w = t1 - t0; printf "%.0f %.0f %.6f", 100 * p / hz / w, 100 * m / hz / w / n, p / hz }')
    local line
    line=$(grep '^RESULT ' "$out" | tail -1) || { cat "$out" >&2; die "no RESULT from wrk $label"; }
    RES[$label]=${line#RESULT }
    kill -0 "$VG_PID" 2>/dev/null || { tail -50 "$TMP/verigate.log" >&2; die "verigate died during $label"; }
    kill -0 "$BL_PID" 2>/dev/null || { tail -50 "$TMP/baseline.log" >&2; die "baseline died during $label"; }
    [[ -z "$FL_PID" ]] || kill -0 "$FL_PID" 2>/dev/null || { tail -50 "$TMP/floor.log" >&2; die "the floor died during $label"; }
}
run_floor() { # scenario mode ids_in [method]: the durable floor's run, right after the baseline's
    [[ -n "$FL_PID" ]] || return 0
    run_wrk "$1-floor" "$FLOOR_PORT" "$2" "${4:--}" - "$3" "$DURATION" "$FL_PID"
}
field() { # label key → value from that run's RESULT line
    local kv
    for kv in ${RES[$1]}; do
        [[ "$kv" == "$2="* ]] && { echo "${kv#*=}"; return; }
    done
    echo "?"
}
# Creates exactly N verifications of METHOD with benches/delivery.lua (each wrk thread stops at
# its share; wrk itself is stopped with SIGINT once every thread is done). → SEED_RES, SEED_SECS
seed_exact() { # label n method ttl timeout_s
    local label=$1 per=$(( ($2 + THREADS - 1) / THREADS )) out="$TMP/wrk-$1.txt" marker="$TMP/done-$1" t0 n rc=0
    rm -f "$marker".*
    log "seed $label: $((per * THREADS)) $3 creates (wrk -t$THREADS -c$CONNECTIONS, delivery.lua)"
    t0=$EPOCHREALTIME
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$5s" --timeout 10s -s "$SEED_LUA" "http://127.0.0.1:$API_PORT" \
        -- "$KEY" "$NONCE-$label" "$3" "$4" "$per" "$marker" >"$out" 2>&1 &
    WRK_PID=$!
    SEED_SECS=""
    while kill -0 "$WRK_PID" 2>/dev/null; do
        n=$( (compgen -G "$marker.*" || true) | wc -l)
        if (( n >= THREADS )); then
            SEED_SECS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
            kill -INT "$WRK_PID" 2>/dev/null || true
            break
        fi
        sleep 0.05
    done
    wait "$WRK_PID" || rc=$?
    WRK_PID=""
    [[ -n "$SEED_SECS" ]] || { cat "$out" >&2; die "seed $label ended (exit $rc) before all its creates were answered"; }
    SEED_RES=$(grep '^RESULT ' "$out" | tail -1 | sed 's/^RESULT //')
}

declare -A COMMITS OPS
store_snapshot() { COMMITS[$1]=$(metric verigate_store_commits_total); OPS[$1]=$(metric verigate_store_ops_total); }
declare -A EXTRA   # other figures for the report and RESULTS_FILE

# create: same Lua, same request shape, baseline first, then verigate.
if has create; then
    run_wrk create-baseline "$BASELINE_PORT" create "$CREATE_METHOD" - - "$DURATION" "$BL_PID"
    run_floor create create - "$CREATE_METHOD"
    store_snapshot before-create
    run_wrk create-verigate "$API_PORT" create "$CREATE_METHOD" - - "$DURATION" "$VG_PID"
    store_snapshot after-create
    # Peak memory of a daemon that has done nothing but start and take this create run.
    EXTRA[create_hwm_kib]=$(status_kib "$VG_PID" VmHWM)
    EXTRA[create_rss_kib]=$(status_kib "$VG_PID" VmRSS)
    METRICS_CREATE=$(metrics_excerpt)
fi

# half: creates at half of the maximum rate just measured, on a fresh daemon. wrk is closed
# loop; with every connection waiting `pace` ms (random 0.5..1.5 x) before each request, the
# rate is about CONNECTIONS x 1000 / (pace + time per request). A calibration run at
# pace0 = CONNECTIONS x 1000 / target measures the time per request at that load; the measured
# run uses pace1 = pace0 - that time. Its achieved rate is reported next to the target. (The
# same pace against the baseline shows the client and machine's own p99 at that rate.)
if has half; then
    stop_verigate
    start_verigate half
    EXTRA[half_target]=$(awk -v r="$(field create-verigate rps)" 'BEGIN { printf "%.0f", r / 2 }')
    pace0=$(awk -v c="$CONNECTIONS" -v t="${EXTRA[half_target]}" 'BEGIN { printf "%.2f", c * 1000 / t }')
    run_wrk half-calibrate "$API_PORT" create "$CREATE_METHOD" - - "$HALF_CALIBRATE" "$VG_PID" 0 "$pace0"
    EXTRA[half_pace]=$(awk -v c="$CONNECTIONS" -v t="${EXTRA[half_target]}" -v p0="$pace0" -v r0="$(field half-calibrate rps)" \
        'BEGIN { over = c * 1000 / r0 - p0; if (over < 0) over = 0; p = c * 1000 / t - over; if (p < 1) p = 1; printf "%.2f", p }')
    log "half: target ${EXTRA[half_target]} req/s; calibration at pace $pace0 ms gave $(field half-calibrate rps) req/s; pace ${EXTRA[half_pace]} ms"
    run_wrk half-baseline "$BASELINE_PORT" create "$CREATE_METHOD" - - "$DURATION" "$BL_PID" 0 "${EXTRA[half_pace]}"
    run_wrk half-verigate "$API_PORT" create "$CREATE_METHOD" - - "$DURATION" "$VG_PID" 0 "${EXTRA[half_pace]}"
fi

# check and get run on a fresh daemon: otherwise the outbox worker would spend the check run
# delivering the create run's backlog (150k+ mails), and the numbers would depend on the order.
POOL=0
if has check || has get; then
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
    # Let the worker deliver the seed's mails first (at most 30 s), so the runs measure checks.
    wait_outbox_empty 30 || true
    log "outbox depth before check: $(metric 'verigate_outbox_depth{lane="email"}')"

    # Before measuring, show the answer the check scenario expects, reproduced with curl.
    first_id=$(head -1 "$TMP/ids")
    sample=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H "Authorization: Bearer $KEY" \
        -H 'Content-Type: application/json' -d "{\"id\":\"$first_id\",\"code\":\"000000\"}" \
        "http://127.0.0.1:$API_PORT/v1/verifications/check")
    log "sample check: $sample"

    if has check; then
        run_wrk check-baseline "$BASELINE_PORT" check - - "$TMP/ids" "$DURATION" "$BL_PID"
        run_floor check check "$TMP/ids"
        store_snapshot before-check
        run_wrk check-verigate "$API_PORT" check - - "$TMP/ids" "$DURATION" "$VG_PID"
        store_snapshot after-check
    fi
    if has get; then
        run_wrk get-baseline "$BASELINE_PORT" get - - "$TMP/ids" "$DURATION" "$BL_PID"
        store_snapshot before-get
        run_wrk get-verigate "$API_PORT" get - - "$TMP/ids" "$DURATION" "$VG_PID"
        store_snapshot after-get
    fi
    METRICS_CHECK=$(metrics_excerpt)
fi

# link: the confirm button, POST /v/{token} on the public listener. Every token is POSTed once
# (a second POST on a verified link only reads): verigate's run ends when each wrk thread has
# had an answer for every token of its slice, or after DURATION. The baseline's run (it does
# nothing per token) takes DURATION, going round the tokens. The links are real: a daemon with
# the file transport (unpaced) writes one .eml per verification, and the tokens are read from
# their text parts.
if has link; then
    stop_verigate
    start_verigate link 's#^transport = "log"#transport = "file"\nmax_per_second = 0\nworkers = 4#'
    seed_exact seed-link "$LINK_POOL" link 86400 "$((LINK_DRAIN_TIMEOUT + 60))"
    log "seed-link: $(awk -v s="$SEED_RES" 'BEGIN { print s }' | grep -o 'created=[0-9]*') in $SEED_SECS s; waiting for the .eml files"
    t_drain=$SECONDS
    wait_outbox_empty "$LINK_DRAIN_TIMEOUT" || die "link pool: outbox not empty after $LINK_DRAIN_TIMEOUT s"
    EXTRA[link_eml_secs]=$((SECONDS - t_drain))
    python3 - "$TMP/data-link/mail" "$TMP/tokens" <<'EOF'
import os, quopri, re, sys
mail, out = sys.argv[1], sys.argv[2]
pat = re.compile(rb"https?://[^/\s]+/v/([A-Za-z0-9_-]+)")
tokens = []
for name in os.listdir(mail):
    if not name.endswith(".eml"):
        continue
    with open(os.path.join(mail, name), "rb") as f:
        m = pat.search(quopri.decodestring(f.read()))
    if m:
        tokens.append(m.group(1).decode())
with open(out, "w") as f:
    f.write("\n".join(tokens) + "\n")
EOF
    EXTRA[link_pool]=$(wc -l <"$TMP/tokens")
    log "link pool: ${EXTRA[link_pool]} tokens (.eml files written within ${EXTRA[link_eml_secs]} s after the creates)"
    (( EXTRA[link_pool] >= THREADS * 10 )) || die "only ${EXTRA[link_pool]} link tokens found"
    tok=$(head -1 "$TMP/tokens")
    sample=$(curl -sS -o /dev/null -w 'HTTP %{http_code}' --max-time 10 "http://127.0.0.1:$PUBLIC_PORT/v/$tok")
    log "sample GET /v/{token} (the page, does not confirm): $sample"
    run_wrk link-baseline "$BASELINE_PORT" link - - "$TMP/tokens" "$DURATION" "$BL_PID"
    run_floor link link "$TMP/tokens"
    store_snapshot before-link
    run_wrk link-verigate "$PUBLIC_PORT" link - - "$TMP/tokens" "$DURATION" "$VG_PID" 0 0 "$TMP/link-done"
    store_snapshot after-link
    METRICS_LINK=$(metrics_excerpt)
    (( $(field link-verigate reused) == 0 )) ||
        log "WARNING: link-verigate POSTed $(field link-verigate reused) tokens a second time (pool ${EXTRA[link_pool]})"
fi

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
echo "scenarios: ${SCEN_ORDER[*]}; create method: $CREATE_METHOD; check/get pool: $POOL code verifications${EXTRA[link_pool]:+; link pool: ${EXTRA[link_pool]} tokens}"
echo
cpu() { # label → "server CPU % of one core", "server CPU µs per request", "machine busy %"
    local srv mach secs
    read -r srv mach secs <<<"${CPU[$1]}"
    awk -v s="$srv" -v m="$mach" -v c="$secs" -v r="$(field "$1" requests)" \
        'BEGIN { printf "%s%% %.0f %s%%", s, (r > 0) ? 1e6 * c / r : 0, m }'
}
printf '%-8s %-9s %10s %9s %9s %9s %9s %11s %8s %8s %8s  %-22s %s\n' \
    scenario target req/s p50 p99 p99.9 max non-2xx/3xx srv-cpu "us/req" machine statuses "socket errors"
for scen in "${SCEN_ORDER[@]}"; do
    for tgt in baseline floor verigate; do
        l="$scen-$tgt"
        [[ -n "${RES[$l]:-}" ]] || continue
        read -r c_srv c_req c_mach <<<"$(cpu "$l")"
        printf '%-8s %-9s %10s %9s %9s %9s %9s %11s %8s %8s %8s  %-22s %s\n' "$scen" "$tgt" "$(field "$l" rps)" \
            "$(ms "$(field "$l" p50_us)")" "$(ms "$(field "$l" p99_us)")" "$(ms "$(field "$l" p999_us)")" "$(ms "$(field "$l" max_us)")" \
            "$(field "$l" non2xx3xx)" "$c_srv" "$c_req" "$c_mach" "$(field "$l" statuses)" "$(errs "$l")"
    done
done
echo
for scen in create check get link; do
    has "$scen" || continue
    awk -v s="$scen" -v v="$(field "$scen-verigate" rps)" -v b="$(field "$scen-baseline" rps)" 'BEGIN {
        r = (b > 0) ? v / b : 0
        line = sprintf("ratio %-6s verigate/baseline = %.3f (%.1f%%)", s, r, 100 * r)
        if (s != "get") line = line sprintf("   target >= 40%%: %s", (r >= 0.40) ? "MET" : "NOT MET")
        print line
    }'
    [[ -n "${RES[$scen-floor]:-}" ]] || continue
    awk -v s="$scen" -v v="$(field "$scen-verigate" rps)" -v b="$(field "$scen-baseline" rps)" \
        -v f="$(field "$scen-floor" rps)" 'BEGIN {
        printf "      %-6s floor/baseline = %.3f (%.1f%%), verigate/floor = %.3f (%.1f%%)\n", s,
            (b > 0) ? f / b : 0, (b > 0) ? 100 * f / b : 0, (f > 0) ? v / f : 0, (f > 0) ? 100 * v / f : 0
    }'
done
if has half; then
    awk -v t="${EXTRA[half_target]}" -v r="$(field half-verigate rps)" -v p="$(field half-verigate p99_us)" \
        -v b="$(field half-baseline p99_us)" -v br="$(field half-baseline rps)" -v pace="${EXTRA[half_pace]}" 'BEGIN {
        printf "half   creates at %.0f req/s (target %d = half of create; pace %s ms x %s connections): p99 %.2fms   target <= 5ms: %s\n",
            r, t, pace, '"$CONNECTIONS"', p / 1000, (p <= 5000) ? "MET" : "NOT MET"
        printf "       the baseline at the same pace: %.0f req/s, p99 %.2fms\n", br, b / 1000
    }'
fi
echo
echo "verigate memory: VmRSS at idle after start $IDLE_RSS KiB${EXTRA[create_hwm_kib]:+; after the create run VmRSS ${EXTRA[create_rss_kib]} KiB, VmHWM (peak) ${EXTRA[create_hwm_kib]} KiB}"
has check || has get && echo "seed run (code creates, verigate, $SEED_DURATION): $(field seed rps) req/s, statuses $(field seed statuses)"
has link && echo "link seed: $(awk -v s="$SEED_RES" 'BEGIN { print s }' | grep -o 'created=[0-9]*') in $SEED_SECS s; .eml files written within ${EXTRA[link_eml_secs]} s more; link-verigate ran $(field link-verigate secs) s ($(field link-verigate requests) confirms; -d$DURATION at most)"
echo
echo "verigate store group commits (from /metrics, deltas over each measured run):"
for scen in create check get link; do
    [[ -n "${COMMITS[before-$scen]:-}" ]] || continue
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
echo "  - get: 200 from both. link: verigate answers 200 with the 'verified' page; the baseline 200"
echo "    with a static page."
echo "  - floor: the baseline with --durable: each POST also writes one record (the body, or the"
echo "    token) and answers after its group's fdatasync, one writer thread, fjall as verigate"
echo "    configures it. What the storage contract alone costs; verigate's other work is on top."
if [[ "$KEEP_TMP" == 1 ]]; then
    echo "  - raw wrk output, configs, daemon log and data dirs: $TMP"
else
    echo "  - raw wrk output, configs, daemon log and data dirs: rerun with KEEP_TMP=1 to keep them."
fi
if has create; then
    echo
    echo "verigate /metrics excerpt at the end of the create phase (its own daemon and data dir):"
    echo "$METRICS_CREATE"
fi
if has check || has get; then
    echo "verigate /metrics excerpt at the end of the check phase (seed + check/get):"
    echo "$METRICS_CHECK"
fi
if has link; then
    echo "verigate /metrics excerpt at the end of the link phase (seed + link):"
    echo "$METRICS_LINK"
fi
if grep -qiE 'error|panic' "$TMP/verigate.log"; then
    echo
    echo "verigate log has errors (first 20 lines):"
    grep -iE 'error|panic' "$TMP/verigate.log" | head -20 | sed 's/^/  /'
fi

# Machine-readable: every run's figures, then the rest.
if [[ -n "$RESULTS_FILE" ]]; then
    {
        for l in "${!RES[@]}"; do
            for kv in ${RES[$l]}; do echo "http.$l.$kv"; done
            read -r c_srv c_req c_mach <<<"$(cpu "$l")"
            echo "http.$l.srv_cpu=${c_srv%\%}"; echo "http.$l.us_req=$c_req"; echo "http.$l.machine=${c_mach%\%}"
        done
        for k in "${!EXTRA[@]}"; do echo "http.$k=${EXTRA[$k]}"; done
        echo "http.idle_rss_kib=$IDLE_RSS"
        echo "http.pool=$POOL"
        for scen in create check get link; do
            [[ -n "${COMMITS[before-$scen]:-}" ]] || continue
            echo "http.$scen.commits=$(( ${COMMITS[after-$scen]%.*} - ${COMMITS[before-$scen]%.*} ))"
            echo "http.$scen.ops=$(( ${OPS[after-$scen]%.*} - ${OPS[before-$scen]%.*} ))"
        done
        echo "http.settings=wrk -t$THREADS -c$CONNECTIONS -d$DURATION --timeout 10s --latency; create method $CREATE_METHOD"
    } >>"$RESULTS_FILE"
fi
