#!/usr/bin/env bash
# Delivery throughput benchmark: verigate's SMTP outbox against Postfix's smtp-sink, with
# Postfix's smtp-source against the same sink as the ceiling ("Measure" item of the delivery
# issue: verigate's msgs/s as a fraction of smtp-source's; target >= 50%).
#
#   benches/delivery.sh                         # N=10000, workers 4 8 16: about a minute after the build
#   N=20000 WORKERS_LIST="4 16" benches/delivery.sh
#   SKIP_BUILD=1 KEEP_TMP=1 LIVE=0 benches/delivery.sh
#
# What it does (benches/README.md, "Delivery benchmark", has the reasoning):
#   1. installs postfix when smtp-sink is missing (only its test programs smtp-sink and
#      smtp-source are used; the postfix daemon is neither configured nor started), and wrk;
#   2. builds target/release/verigate and runs a copy of it;
#   3. starts `smtp-sink -c` on 127.0.0.1:SINK_PORT (the sink of every measured run);
#   4. fill: a verigate whose relay is a stopped (SIGSTOP) smtp-sink gets N verifications
#      created through its API (wrk + benches/delivery.lua): its first sessions wait for a
#      greeting that never comes, so nothing is delivered. Then it gets SIGTERM and the stopped
#      sink is killed (the waiting attempts end as retries, due again at once): the data dir
#      holds an outbox backlog of exactly the N created mails;
#   5. paced: a copy of the backlog, max_per_second = PACED_RATE, into a second smtp-sink that
#      dumps every message: the rate must be the pacing, and the dumps give the real size of
#      verigate's mails, which smtp-source then sends;
#   6. for each WORKERS_LIST value W, back to back:
#        ceiling  smtp-source -d -s W -m N -l SIZE against the sink, timed;
#        verigate a fresh copy of the fill data dir, verigate started unpaced (max_per_second
#                 = 0) with W workers and W pooled sessions; it drains the backlog into the
#                 sink. msgs/s = messages between the first and the last delivery seen at the
#                 sink / that time (delivery_watch.py polls the sink's counter every 20 ms);
#   7. live (LIVE=1): a fresh daemon, W = LIVE_WORKERS, unpaced, creates and deliveries at
#      once: N creates with wrk while the worker delivers; reports create rate, delivery
#      rate during and after the creates, and first create -> last delivery;
#   8. prints the table: msgs/s of both, the ratio, CPU of verigate, of its store writer thread
#      and of the sink, outcomes (retries, failures), sessions opened, store group commits, RSS.
#
# Why a backlog drain and not "create and deliver at once": the question is how fast the
# outbox hands mail to a relay. With creates running at the same time, the measurement would
# mix the api's CPU (HTTP, JSON, crypto, durable create) and wrk's (the client shares the two
# cores) into the delivery rate, and the backlog would never be larger than the create rate
# allows. A backlog drain is also the real case where delivery throughput matters: a burst of
# sign-ups, or a relay that comes back after an outage. The live run (7) shows the mixed case.
# The backlog is a copy of one data dir for every run, so all runs deliver the same mails, and
# the outbox entries are the real ones (an entry holds the envelope; the mail is rendered at
# delivery time, so it does not matter which transport the fill daemon had).
#
# Bounded: the fill (N creates, <= FILL_TIMEOUT), the paced run (PACED_SECONDS), per W one
# smtp-source run (<= 120 s) and one drain (<= DRAIN_TIMEOUT), the live run (<= FILL_TIMEOUT +
# DRAIN_TIMEOUT); every daemon stop is SIGTERM, then SIGKILL after 15 s.
#
# Environment (defaults in brackets):
#   N [10000]  messages per run            WORKERS_LIST ["4 8 16"]  delivery.workers values
#   METHOD [link_and_code]  TTL [3600] s   (no verification may expire during the runs)
#   THREADS [2]  CONNECTIONS [32]          wrk for the creates
#   SINK_PORT [12525]  FILL_SINK_PORT [12526]  DUMP_SINK_PORT [12527]
#   API_PORT [18126]  PUBLIC_PORT [18125]
#   SINK_BACKLOG [1024]                    smtp-sink's listen(2) backlog
#   DRAIN_TIMEOUT [300]  FILL_TIMEOUT [300] seconds
#   PACED_RATE [100]  PACED_SECONDS [8]    the pacing check (and the mail size; >= 3 s)
#   LIVE [1]  LIVE_WORKERS [4]             the create+deliver run
#   KEEP_TMP [0]  SKIP_BUILD [0]
#   RESULTS_FILE []  also append the figures as `delivery.<key>=<value>` lines to this file
#   VG_BINARY []  run this executable instead of building (e.g. another build, or a wrapper
#                 that execs one with a different environment); used in place, not copied
# (No knob starts with VERIGATE_: the daemon reads those as configuration and rejects unknown ones.)
# A drain takes seconds; DRAIN_TIMEOUT bounds a broken one (e.g. the old ~43 ms Nagle stall per
# mail, which would make it N / (23 * W) s).
set -euo pipefail

N=${N:-10000}
WORKERS_LIST=${WORKERS_LIST:-"4 8 16"}
METHOD=${METHOD:-link_and_code}
TTL=${TTL:-3600}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-32}
SINK_PORT=${SINK_PORT:-12525}
FILL_SINK_PORT=${FILL_SINK_PORT:-12526}
DUMP_SINK_PORT=${DUMP_SINK_PORT:-12527}
API_PORT=${API_PORT:-18126}
PUBLIC_PORT=${PUBLIC_PORT:-18125}
SINK_BACKLOG=${SINK_BACKLOG:-1024}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-300}
FILL_TIMEOUT=${FILL_TIMEOUT:-300}
PACED_RATE=${PACED_RATE:-100}
PACED_SECONDS=${PACED_SECONDS:-8}
LIVE=${LIVE:-1}
LIVE_WORKERS=${LIVE_WORKERS:-4}
KEEP_TMP=${KEEP_TMP:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
VG_BINARY=${VG_BINARY:-}
RESULTS_FILE=${RESULTS_FILE:-}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
LUA="$HERE/delivery.lua"
WATCH="$HERE/delivery_watch.py"
KEY="bench-key-0123456789abcdef"   # plain API key (development form), >= 16 chars
NONCE="$(date +%s)$$"
HZ=$(getconf CLK_TCK)
NCPU=$(nproc)

BENCH_TAG=delivery
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

(( N >= 100 )) || die "N must be at least 100"
(( PACED_SECONDS >= 3 )) || die "PACED_SECONDS must be at least 3"
[[ -n "${WORKERS_LIST// /}" ]] || die "WORKERS_LIST is empty"
command -v curl >/dev/null 2>&1 || die "curl is needed"
command -v python3 >/dev/null 2>&1 || die "python3 is needed (delivery_watch.py)"

# ---------------------------------------------------------------------------------------------
# 1. tools: postfix's smtp-sink / smtp-source, wrk
POLICY_MADE=0
find_tool() { command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && echo "/usr/sbin/$1"; } || true; }
SMTP_SINK=$(find_tool smtp-sink)
SMTP_SOURCE=$(find_tool smtp-source)
if [[ -z "$SMTP_SINK" || -z "$SMTP_SOURCE" ]]; then
    [[ $EUID == 0 ]] || die "smtp-sink/smtp-source missing: install postfix (needs root)"
    log "installing postfix for smtp-sink and smtp-source (its daemon is not configured or started)"
    # "No configuration": the package installs without writing main.cf or asking questions.
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    # invoke-rc.d asks policy-rc.d whether it may start a service; exit 101 = "no". Container
    # images usually have one already; otherwise one is put in place for the install only.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\n# temporary, benches/delivery.sh: do not start services\nexit 101\n' \
            >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        POLICY_MADE=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix >/dev/null
    if [[ "$POLICY_MADE" == 1 ]]; then rm -f /usr/sbin/policy-rc.d; POLICY_MADE=0; fi
    SMTP_SINK=$(find_tool smtp-sink)
    SMTP_SOURCE=$(find_tool smtp-source)
    [[ -n "$SMTP_SINK" && -n "$SMTP_SOURCE" ]] || die "postfix installed but smtp-sink/smtp-source not found"
fi
if pgrep -x master >/dev/null 2>&1; then
    log "note: a postfix master process is running; this benchmark does not use it"
fi
if ! command -v wrk >/dev/null 2>&1; then
    log "installing wrk"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# 2. build
cd "$ROOT"
if [[ -z "$VG_BINARY" && "$SKIP_BUILD" != 1 ]]; then
    log "building (release): verigate"
    cargo build --release --bin verigate
fi
[[ -n "$VG_BINARY" || -x "$ROOT/target/release/verigate" ]] || die "target/release/verigate missing"

# ---------------------------------------------------------------------------------------------
# 3. temp dir, cleanup
TMP=$(mktemp -d "${TMPDIR:-/tmp}/verigate-delivery.XXXXXX")
# smtp-sink drops to user nobody after binding; the fill sink writes its dumps under $TMP.
chmod 755 "$TMP"
VG_PID=""
SINK_PID=""
FILL_SINK_PID=""
DUMP_SINK_PID=""
BG_PIDS=()
cleanup() {
    local rc=$?
    local pid
    for pid in "${BG_PIDS[@]}" $VG_PID; do
        kill -0 "$pid" 2>/dev/null && kill "$pid" 2>/dev/null || true
    done
    for pid in "${BG_PIDS[@]}" $VG_PID; do
        # verigate drains gracefully on SIGTERM; give it a few seconds, then insist.
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    for pid in $SINK_PID $FILL_SINK_PID $DUMP_SINK_PID; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    [[ "$POLICY_MADE" == 1 ]] && rm -f /usr/sbin/policy-rc.d
    if [[ "$KEEP_TMP" == 1 ]]; then
        log "temp dir kept: $TMP"
    elif [[ $rc -ne 0 ]]; then
        rm -rf "$TMP"/data-* "$TMP/verigate"
        log "temp dir kept (without data dirs): $TMP"
    else
        rm -rf "$TMP"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A copy: a concurrent `cargo build` must not swap the binary between runs.
if [[ -n "$VG_BINARY" ]]; then
    [[ -x "$VG_BINARY" ]] || die "VG_BINARY $VG_BINARY is not executable"
    VERIGATE="$VG_BINARY"
else
    cp "$ROOT/target/release/verigate" "$TMP/verigate"
    VERIGATE="$TMP/verigate"
fi

for p in "$SINK_PORT" "$FILL_SINK_PORT" "$DUMP_SINK_PORT" "$API_PORT" "$PUBLIC_PORT"; do
    port_busy "$p" && die "port $p is already in use (set SINK_PORT / FILL_SINK_PORT / DUMP_SINK_PORT / API_PORT / PUBLIC_PORT)"
done

# ---------------------------------------------------------------------------------------------
# helpers
SINK_USER=()
[[ $EUID == 0 ]] && SINK_USER=(-u nobody)   # smtp-sink refuses to run as root without -u
start_sink() { # port backlog outfile [extra options...] → prints the pid
    local port=$1 backlog=$2 out=$3
    shift 3
    "$SMTP_SINK" -c "${SINK_USER[@]}" "$@" "127.0.0.1:$port" "$backlog" >"$out" 2>"$out.err" &
    local pid=$!
    for _ in $(seq 50); do
        port_busy "$port" && { echo "$pid"; return 0; }
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$out.err" >&2
    die "smtp-sink did not listen on 127.0.0.1:$port"
}
sink_count() { # sink stdout file → messages received so far ("mesg=" of its last counter line)
    local v
    v=$(tail -c 200 "$1" 2>/dev/null | tr '\r' '\n' | grep -o 'mesg=[0-9]*' | tail -1 | cut -d= -f2 || true)
    echo "${v:-0}"
}
calc() { awk "BEGIN { $1 }"; }

SIGNING_SECRET=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
write_config() { # file data_dir workers max_per_second lease_seconds smtp_port [extra [delivery] lines] [extra [smtp] lines]
    cat >"$1" <<EOF
data_dir = "$2"
public_base_url = "http://127.0.0.1:$PUBLIC_PORT"

[listen]
api = "127.0.0.1:$API_PORT"
public = "127.0.0.1:$PUBLIC_PORT"

[signing]
# The same key in every run: codes are sealed at create time and opened at delivery time.
keys = ["k1:$SIGNING_SECRET"]

[delivery]
transport = "smtp"
max_per_second = $4
workers = $3
lease_seconds = $5
${7:-}

[smtp]
host = "127.0.0.1"
port = $6
tls = "none"
pool_size = $3
helo_name = "verigate.bench"
${8:-}
EOF
    bench_config_tail "$KEY" >>"$1"
}

metrics() { curl -fsS --max-time 10 "http://127.0.0.1:$API_PORT/metrics"; }
metric() { # metrics text, series name (with labels) → value (0 when absent)
    awk -v n="$2" '$1 == n { v = $2 } END { print (v == "" ? 0 : v) }' <<<"$1"
}
metric_sum() { # metrics text, regex on the series → sum
    awk -v r="$2" '$1 ~ r { s += $2 } END { printf "%.0f", s }' <<<"$1"
}
start_verigate() { # config label
    log "starting verigate ($2)"
    "$VERIGATE" serve --config "$1" >>"$TMP/verigate-$2.log" 2>&1 &
    VG_PID=$!
}
wait_healthz() {
    for _ in $(seq 300); do
        kill -0 "$VG_PID" 2>/dev/null || { tail -30 "$TMP"/verigate-*.log >&2; die "verigate exited during start-up"; }
        curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$API_PORT/healthz" 2>/dev/null && return 0
        sleep 0.1
    done
    die "verigate did not answer /healthz within 30 s"
}
stop_verigate() { # SIGTERM (graceful: in-flight deliveries finish, the store is synced), SIGKILL after 15 s
    kill "$VG_PID" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$VG_PID" 2>/dev/null; then
        log "WARNING: verigate did not stop within 15 s of SIGTERM; SIGKILL"
        kill -9 "$VG_PID" 2>/dev/null || true
    fi
    wait "$VG_PID" 2>/dev/null || true
    VG_PID=""
}

CREATE_RES=""
CREATE_SECS=""
run_creates() { # label per-thread-limit → CREATE_RES (delivery.lua's RESULT), CREATE_SECS
    local out="$TMP/wrk-$1.txt" marker="$TMP/done-$1" t0 pid n rc=0
    CREATE_SECS=""
    rm -f "$marker".*
    t0=$EPOCHREALTIME
    timeout "$((FILL_TIMEOUT + 10))" wrk -t"$THREADS" -c"$CONNECTIONS" -d"${FILL_TIMEOUT}s" --timeout 10s \
        -s "$LUA" "http://127.0.0.1:$API_PORT" -- "$KEY" "$NONCE-$1" "$METHOD" "$TTL" "$2" "$marker" \
        >"$out" 2>&1 &
    pid=$!
    BG_PIDS+=("$pid")
    # A thread that has its creates stops itself, but wrk only ends at -d or on SIGINT.
    while kill -0 "$pid" 2>/dev/null; do
        n=$( (compgen -G "$marker.*" || true) | wc -l)
        if (( n >= THREADS )); then
            CREATE_SECS=$(calc "printf \"%.3f\", $EPOCHREALTIME - $t0")
            kill -INT "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.05
    done
    wait "$pid" || rc=$?
    BG_PIDS=("${BG_PIDS[@]/$pid}")
    [[ -n "$CREATE_SECS" ]] || { cat "$out" >&2; die "wrk ($1) ended (exit $rc) before all its creates were answered"; }
    CREATE_RES=$(grep '^RESULT ' "$out" | tail -1 | sed 's/^RESULT //') || { cat "$out" >&2; die "no RESULT from wrk ($1)"; }
}

# ---------------------------------------------------------------------------------------------
# 4. the sink, the disk
SINK_OUT="$TMP/sink.out"
# -c: running counters on stdout (how the runs are timed); backlog 1024: every connection
# attempt queues instead of being refused; -m (256 simultaneous sessions) is more than enough.
SINK_PID=$(start_sink "$SINK_PORT" "$SINK_BACKLOG" "$SINK_OUT")
log "smtp-sink on 127.0.0.1:$SINK_PORT (pid $SINK_PID): $SMTP_SINK -c ${SINK_USER[*]} 127.0.0.1:$SINK_PORT $SINK_BACKLOG"

# fdatasync latency of the disk under the data dirs: every verigate store commit pays one.
# Measured at the start and at the end: a busy disk (another build, say) shows up here.
fsync_probe() {
    python3 - "$TMP" <<'EOF'
import os, sys, time
p = os.path.join(sys.argv[1], "fsync.probe")
fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
lat = []
for _ in range(200):
    os.write(fd, b"x" * 4096)
    t = time.perf_counter(); os.fdatasync(fd); lat.append(time.perf_counter() - t)
os.close(fd); os.unlink(p)
lat.sort()
print(f"p50 {lat[100]*1e3:.2f} ms, p90 {lat[180]*1e3:.2f} ms, max {lat[-1]*1e3:.2f} ms")
EOF
}
FSYNC=$(fsync_probe)
log "disk fdatasync (200 x 4 KiB append + fdatasync): $FSYNC"

# ---------------------------------------------------------------------------------------------
# 5. fill: the backlog
# The fill daemon's relay is an smtp-sink that is stopped (SIGSTOP) before anything connects:
# the kernel still completes the TCP handshakes, so the first attempts wait for a greeting
# (connect_timeout_ms is set beyond the fill's duration) and nothing is delivered, without a
# single failed attempt while the creates run. At the end: SIGTERM to verigate, then SIGKILL to
# the stopped sink; the waiting attempts fail at once as retries (retry_base_ms = 1: due again
# within milliseconds; the rest of the claimed batch is released as the worker stops), and the
# worker sees the shutdown and stops. No probe (ready_requires_transport =
# false), or the readiness probe would hang on the stopped sink too.
FILL_SINK_OUT="$TMP/fill-sink.out"
FILL_SINK_PID=$(start_sink "$FILL_SINK_PORT" 64 "$FILL_SINK_OUT")
kill -STOP "$FILL_SINK_PID"
write_config "$TMP/fill.toml" "$TMP/data-fill" 4 0 1 "$FILL_SINK_PORT" \
    $'retry_base_ms = 1\nready_requires_transport = false' \
    "connect_timeout_ms = $(( (FILL_TIMEOUT + 120) * 1000 ))"
"$VERIGATE" config check --config "$TMP/fill.toml" >"$TMP/effective.toml" 2>"$TMP/config-check.err" ||
    { cat "$TMP/config-check.err" >&2; die "the bench config is not valid for this build"; }
start_verigate "$TMP/fill.toml" fill
wait_healthz
smoke=$(curl -sS -w ' HTTP %{http_code}' --max-time 10 -H "Authorization: Bearer $KEY" \
    -H 'Content-Type: application/json' \
    -d "{\"email\":\"smoke-$NONCE@example.com\",\"method\":\"$METHOD\",\"ttl_seconds\":$TTL}" \
    "http://127.0.0.1:$API_PORT/v1/verifications")
[[ "$smoke" == *"HTTP 202" ]] || die "smoke create failed: $smoke"
PER_THREAD=$(( (N - 1 + THREADS - 1) / THREADS ))
log "fill: creating $((PER_THREAD * THREADS + 1)) $METHOD verifications (wrk -t$THREADS -c$CONNECTIONS), relay stopped"
run_creates fill "$PER_THREAD"
FILL_RES=$CREATE_RES
FILL_SECS=$CREATE_SECS
M=$(metrics)
CREATED=$(metric_sum "$M" '^verigate_verifications_total\{event="created"')
FILL_DEPTH=$(metric "$M" 'verigate_outbox_depth{lane="email"}')
kill "$VG_PID" 2>/dev/null || true
sleep 0.5
kill -KILL "$FILL_SINK_PID" 2>/dev/null || true
wait "$FILL_SINK_PID" 2>/dev/null || true
FILL_SINK_PID=""
stop_verigate
FILL_SENT=$(sink_count "$FILL_SINK_OUT")
BACKLOG=$((CREATED - FILL_SENT))
FILL_RATE=$(calc "printf \"%.0f\", $(kv "$FILL_RES" created) / $FILL_SECS")
log "fill: $CREATED created, $(kv "$FILL_RES" created) by wrk in $FILL_SECS s ($FILL_RATE/s, statuses $(kv "$FILL_RES" statuses)); outbox depth $FILL_DEPTH; $FILL_SENT sent; backlog $BACKLOG"
(( FILL_SENT == 0 )) || log "WARNING: the fill daemon delivered $FILL_SENT mails to the stopped sink"
(( BACKLOG >= N * 9 / 10 )) || die "backlog $BACKLOG is far below N=$N (fill outbox depth was $FILL_DEPTH)"

# ---------------------------------------------------------------------------------------------
# helpers of the measured runs
declare -A R
ceiling() { # key sessions reuse(1|0)
    local key=$1 s=$2 reuse=$3 c0 c1 k0 k1 t0 t1 times_u times_s rc=0
    local opts=(-s "$s" -m "$N" -l "$SIZE" -M verigate.bench -f no-reply@verigate.bench -t rcpt@example.com)
    [[ "$reuse" == 1 ]] && opts=(-d "${opts[@]}")
    c0=$(sink_count "$SINK_OUT"); k0=$(proc_ticks "$SINK_PID")
    log "ceiling: smtp-source ${opts[*]} 127.0.0.1:$SINK_PORT"
    local TIMEFORMAT='%R %U %S'
    t0=$EPOCHREALTIME
    { time timeout 120 "$SMTP_SOURCE" "${opts[@]}" "127.0.0.1:$SINK_PORT" >"$TMP/source-$key.out" 2>&1 || rc=$?; } 2>"$TMP/source-$key.time"
    t1=$EPOCHREALTIME
    (( rc == 0 )) || { cat "$TMP/source-$key.out" >&2; die "smtp-source failed (exit $rc)"; }
    sleep 0.1   # the sink's counter line for the last message
    c1=$(sink_count "$SINK_OUT"); k1=$(proc_ticks "$SINK_PID")
    read -r _ times_u times_s <"$TMP/source-$key.time"
    R[$key.rate]=$(calc "printf \"%.0f\", $N / ($t1 - $t0)")
    R[$key.secs]=$(calc "printf \"%.2f\", $t1 - $t0")
    R[$key.got]=$((c1 - c0))
    R[$key.src_cpu]=$(calc "printf \"%.0f\", 100 * ($times_u + $times_s) / ($t1 - $t0)")
    R[$key.sink_cpu]=$(calc "printf \"%.0f\", 100 * ($k1 - $k0) / $HZ / ($t1 - $t0)")
    [[ "${R[$key.got]}" == "$N" ]] || log "WARNING: the sink counted ${R[$key.got]} of $N smtp-source messages"
    log "ceiling: ${R[$key.rate]} msgs/s (${R[$key.secs]} s)"
}

watch_sink() { # sink_out sink_pid baseline target timeout window skip trace [vg_pid] → delivery_watch.py summary line
    python3 "$WATCH" "$1" "$3" "$4" "$5" "$6" "$7" "${9:-$VG_PID}" "$2" "$8"
}

record_run() { # key watch-line metrics-text
    local key=$1 w=$2 m=$3
    local first last cf cl n secs
    first=$(kv "$w" first); last=$(kv "$w" last); cf=$(kv "$w" c_first); cl=$(kv "$w" c_last)
    n=$((cl - cf)); secs=$(calc "printf \"%.3f\", $last - $first")
    R[$key.status]=$(kv "$w" status)
    R[$key.msgs]=$n
    R[$key.secs]=$secs
    R[$key.rate]=$(calc "printf \"%.0f\", ($secs > 0) ? $n / $secs : 0")
    R[$key.vg_cpu]=$(calc "printf \"%.0f\", ($secs > 0) ? 100 * ($(kv "$w" vg_last) - $(kv "$w" vg_first)) / $HZ / $secs : 0")
    R[$key.vg_us]=$(calc "printf \"%.0f\", ($n > 0) ? 1e6 * ($(kv "$w" vg_last) - $(kv "$w" vg_first)) / $HZ / $n : 0")
    R[$key.sink_cpu]=$(calc "printf \"%.0f\", ($secs > 0) ? 100 * ($(kv "$w" sink_last) - $(kv "$w" sink_first)) / $HZ / $secs : 0")
    R[$key.machine]=$(calc "printf \"%.0f\", ($secs > 0) ? 100 * ($(kv "$w" busy_last) - $(kv "$w" busy_first)) / $HZ / $secs / $NCPU : 0")
    # everything but verigate and the sink, from the raw ticks (rounded percentages would not add up)
    R[$key.other]=$(calc "o = ($secs > 0) ? 100 * (($(kv "$w" busy_last) - $(kv "$w" busy_first)) - ($(kv "$w" vg_last) - $(kv "$w" vg_first)) - ($(kv "$w" sink_last) - $(kv "$w" sink_first))) / $HZ / $secs : 0; printf \"%.0f\", (o < 0) ? 0 : o")
    R[$key.writer_cpu]=$(calc "a = $(kv "$w" wr_first); b = $(kv "$w" wr_last); printf \"%s\", (a >= 0 && b >= 0 && $secs > 0) ? sprintf(\"%.0f\", 100 * (b - a) / $HZ / $secs) : \"?\"")
    R[$key.delivered]=$(metric "$m" 'verigate_outbox_attempts_total{lane="email",outcome="delivered"}')
    R[$key.retry]=$(metric "$m" 'verigate_outbox_attempts_total{lane="email",outcome="retry"}')
    R[$key.failed]=$(metric "$m" 'verigate_outbox_attempts_total{lane="email",outcome="failed"}')
    R[$key.dropped]=$(metric "$m" 'verigate_outbox_attempts_total{lane="email",outcome="dropped"}')
    R[$key.conns]=$(metric "$m" 'verigate_smtp_connections_opened_total')
    R[$key.replies]=$(awk '/^verigate_smtp_replies_total\{/ && $2 != "0" { sub(/^.*class="/, "", $1); sub(/".*/, "", $1); printf "%s%s:%s", sep, $1, $2; sep = "," }' <<<"$m")
    R[$key.commits]=$(metric "$m" 'verigate_store_commits_total')
    R[$key.ops]=$(metric "$m" 'verigate_store_ops_total')
    R[$key.depth]=$(metric "$m" 'verigate_outbox_depth{lane="email"}')
    R[$key.send_ms]=$(calc "c = $(metric "$m" verigate_smtp_send_duration_seconds_count); printf \"%.2f\", (c > 0) ? 1000 * $(metric "$m" verigate_smtp_send_duration_seconds_sum) / c : 0")
    R[$key.shed]=$(metric_sum "$m" '^verigate_http_overloaded_total')
    # commits per second of the window (the run's total; a few claims precede the first delivery)
    R[$key.commits_s]=$(calc "printf \"%.0f\", ($secs > 0) ? ${R[$key.commits]} / $secs : 0")
}

drain() { # key workers max_per_second window skip [sink_out sink_pid sink_port]
    local key=$1 w=$2 rate=$3 window=$4 skip=$5 base target line m
    local s_out=${6:-$SINK_OUT} s_pid=${7:-$SINK_PID} s_port=${8:-$SINK_PORT}
    rm -rf "$TMP/data-$key"
    cp -a "$TMP/data-fill" "$TMP/data-$key"
    write_config "$TMP/$key.toml" "$TMP/data-$key" "$w" "$rate" 60 "$s_port"
    base=$(sink_count "$s_out")
    target=$((base + BACKLOG))
    # The watcher runs before verigate starts: the first delivery marks the start of the window.
    rm -f "$TMP/trace-$key.txt.ready" "$TMP/pid-$key"
    watch_sink "$s_out" "$s_pid" "$base" "$target" "$DRAIN_TIMEOUT" "$window" "$skip" \
        "$TMP/trace-$key.txt" "@$TMP/pid-$key" >"$TMP/watch-$key.txt" &
    local wpid=$!
    BG_PIDS+=("$wpid")
    for _ in $(seq 100); do [[ -e "$TMP/trace-$key.txt.ready" ]] && break; sleep 0.05; done
    [[ -e "$TMP/trace-$key.txt.ready" ]] || die "delivery_watch.py did not start"
    start_verigate "$TMP/$key.toml" "$key"
    echo "$VG_PID" >"$TMP/pid-$key"
    wait "$wpid" || die "delivery_watch.py failed ($key)"
    BG_PIDS=("${BG_PIDS[@]/$wpid}")
    line=$(cat "$TMP/watch-$key.txt")
    wait_healthz
    R[$key.rss]=$(status_kib "$VG_PID" VmRSS)
    R[$key.hwm]=$(status_kib "$VG_PID" VmHWM)
    m=$(metrics)
    echo "$m" >"$TMP/metrics-$key.txt"
    record_run "$key" "$line" "$m"
    R[$key.skip_rate]=$(calc "t = $(kv "$line" last) - $(kv "$line" t_at_skip); printf \"%.0f\", (t > 0) ? ($(kv "$line" c_last) - $(kv "$line" c_at_skip)) / t : 0")
    stop_verigate
    rm -rf "$TMP/data-$key"
    log "$key: ${R[$key.rate]} msgs/s (${R[$key.msgs]} in ${R[$key.secs]} s, ${R[$key.status]})"
    [[ "${R[$key.status]}" == "done" || "${R[$key.status]}" == "window" ]] ||
        log "WARNING: $key ended with status ${R[$key.status]}: ${R[$key.msgs]} of $BACKLOG delivered"
}

# ---------------------------------------------------------------------------------------------
# 6. pacing, and the size of verigate's mails
first_w=${WORKERS_LIST%% *}
mkdir -p "$TMP/dump"
chmod 777 "$TMP/dump"
DUMP_SINK_OUT="$TMP/dump-sink.out"
DUMP_SINK_PID=$(start_sink "$DUMP_SINK_PORT" 64 "$DUMP_SINK_OUT" -d "$TMP/dump/m.")
# The pacer (governor) allows a burst of PACED_RATE first; the steady rate is taken after 2 s.
drain paced "$first_w" "$PACED_RATE" "$PACED_SECONDS" 2 "$DUMP_SINK_OUT" "$DUMP_SINK_PID" "$DUMP_SINK_PORT"
kill "$DUMP_SINK_PID" 2>/dev/null || true
wait "$DUMP_SINK_PID" 2>/dev/null || true
DUMP_SINK_PID=""
# Size of verigate's mails as the sink received them. A dump file holds smtp-sink's own X-*
# lines and a three-line Received: header, then the message as sent, then an empty line.
# Counted with CRLF line ends, as on the wire.
SIZE=$(find "$TMP/dump" -name 'm.*' | head -200 | xargs -r cat | awk '
    /^X-Client-Addr: / { n++; state = 0; next }
    state == 0 && /^Received: / { state = 1; skip = 2; next }
    state == 1 { skip--; if (skip == 0) state = 2; next }
    state == 2 { b += length($0) + 2 }
    END { if (n > 0) printf "%d", b / n - 2 }' || true)
DUMPED=$(find "$TMP/dump" -name 'm.*' | wc -l)
if [[ -z "$SIZE" || "$SIZE" -lt 500 ]]; then
    log "WARNING: could not read the mail size from the dumps ($DUMPED files); using 3000 bytes"
    SIZE=3000
    SIZE_NOTE="(assumed)"
else
    SIZE_NOTE="(mean of $(( DUMPED < 200 ? DUMPED : 200 )) verigate mails as received)"
fi
rm -rf "$TMP/dump"
log "verigate mail size: $SIZE bytes $SIZE_NOTE"

# ---------------------------------------------------------------------------------------------
# 7. ceiling and drain, per workers value
for w in $WORKERS_LIST; do
    ceiling "src$w" "$w" 1
    drain "vg$w" "$w" 0 0 0
done
# For information: smtp-source opening a session per message (verigate reuses sessions).
ceiling src-noreuse "$first_w" 0

# ---------------------------------------------------------------------------------------------
# 8. live: creates and deliveries at once, on an empty daemon
if [[ "$LIVE" == 1 ]]; then
    rm -rf "$TMP/data-live"
    write_config "$TMP/live.toml" "$TMP/data-live" "$LIVE_WORKERS" 0 60 "$SINK_PORT"
    start_verigate "$TMP/live.toml" live
    wait_healthz
    base=$(sink_count "$SINK_OUT")
    live_per_thread=$(( (N + THREADS - 1) / THREADS ))
    live_n=$((live_per_thread * THREADS))
    watch_sink "$SINK_OUT" "$SINK_PID" "$base" "$((base + live_n))" "$((FILL_TIMEOUT + DRAIN_TIMEOUT))" 0 0 \
        "$TMP/trace-live.txt" >"$TMP/watch-live.txt" &
    WATCH_PID=$!
    BG_PIDS+=("$WATCH_PID")
    log "live: $live_n creates (wrk -t$THREADS -c$CONNECTIONS) while $LIVE_WORKERS workers deliver, unpaced"
    t_w0=$EPOCHREALTIME
    run_creates live "$live_per_thread"
    LIVE_RES=$CREATE_RES
    t_w1=$(calc "printf \"%.6f\", $t_w0 + $CREATE_SECS")
    wait "$WATCH_PID" || true
    BG_PIDS=()
    line=$(cat "$TMP/watch-live.txt")
    m=$(metrics)
    echo "$m" >"$TMP/metrics-live.txt"
    R[live.rss]=$(status_kib "$VG_PID" VmRSS)
    R[live.hwm]=$(status_kib "$VG_PID" VmHWM)
    record_run live "$line" "$m"
    live_created=$(metric_sum "$m" '^verigate_verifications_total\{event="created"')
    c_at_end=$(awk -v t="$t_w1" '$1 <= t { c = $2 } END { print c + 0 }' "$TMP/trace-live.txt")
    last=$(kv "$line" last); c_last=$(kv "$line" c_last)
    R[live.created]=$live_created
    R[live.create_rate]=$(calc "printf \"%.0f\", $(kv "$LIVE_RES" created) / $CREATE_SECS")
    R[live.during_rate]=$(calc "printf \"%.0f\", ($c_at_end - $base) / ($t_w1 - $t_w0)")
    R[live.during_n]=$((c_at_end - base))
    R[live.after_rate]=$(calc "t = $last - $t_w1; n = $c_last - $c_at_end; printf \"%.0f\", (t > 0 && n > 0) ? n / t : 0")
    R[live.after_n]=$((c_last - c_at_end))
    R[live.e2e_secs]=$(calc "printf \"%.2f\", $last - $t_w0")
    R[live.e2e_rate]=$(calc "printf \"%.0f\", ($c_last - $base) / ($last - $t_w0)")
    R[live.statuses]=$(kv "$LIVE_RES" statuses)
    stop_verigate
    rm -rf "$TMP/data-live"
    [[ "$live_created" == "$live_n" ]] || log "WARNING: live run created $live_created, expected $live_n"
fi

# ---------------------------------------------------------------------------------------------
# 9. report
FSYNC_END=$(fsync_probe)
echo
echo "verigate delivery benchmark: $BACKLOG-mail backlog ($METHOD, $SIZE bytes each $SIZE_NOTE) -> smtp-sink on 127.0.0.1:$SINK_PORT"
echo "machine: $NCPU CPUs, shared by sink, sender and client; disk fdatasync at start $FSYNC; at end $FSYNC_END"
echo "ceiling: smtp-source -d (one session per sender, reused) -s W -m $N -l $SIZE; verigate: backlog drain, max_per_second = 0, workers = pool_size = W"
echo
printf '%-8s %9s %10s %6s %7s %7s %7s %8s %6s %8s %9s %6s %9s %6s %12s %8s %11s\n' \
    workers "source/s" "verigate/s" ratio ">=50%" "vg-cpu" "us/msg" "sink-cpu" other machine \
    "delivered" "retry" "fail+drop" conns "ops/commit" "send-ms" "RSS MiB"
DISTURBED=0
for w in $WORKERS_LIST; do
    s="src$w"; v="vg$w"
    ratio=$(calc "printf \"%.3f\", ${R[$v.rate]} / ${R[$s.rate]}")
    met=$(calc "print ($ratio >= 0.5) ? \"MET\" : \"NOT MET\"")
    opc=$(calc "printf \"%.1f\", (${R[$v.commits]} > 0) ? ${R[$v.ops]} / ${R[$v.commits]} : 0")
    other=${R[$v.other]}
    (( other > 30 )) && DISTURBED=1
    printf '%-8s %9s %10s %6s %7s %6s%% %7s %7s%% %5s%% %7s%% %9s %6s %9s %6s %12s %8s %11s\n' \
        "$w" "${R[$s.rate]}" "${R[$v.rate]}" "$ratio" "$met" "${R[$v.vg_cpu]}" "${R[$v.vg_us]}" \
        "${R[$v.sink_cpu]}" "$other" "${R[$v.machine]}" "${R[$v.delivered]}" "${R[$v.retry]}" \
        "$(( ${R[$v.failed]} + ${R[$v.dropped]} ))" "${R[$v.conns]}" "$opc (${R[$v.commits]})" "${R[$v.send_ms]}" \
        "$(mib "${R[$v.rss]}")/$(mib "${R[$v.hwm]}")"
done
echo
echo "  source/s: smtp-source's msgs/s (wall time of the whole run, $N messages); verigate/s: messages between the"
echo "  first and the last delivery seen at the sink / that time. vg-cpu, sink-cpu: CPU over verigate's delivery"
echo "  window in % of one core; other: everything else on the machine then (the 20 ms watcher is ~1-2%), % of one"
echo "  core; machine: all $NCPU cores busy %. us/msg: verigate CPU per message. conns: verigate_smtp_connections_opened_total (W pooled"
echo "  sessions + 1 readiness probe expected). ops/commit (commits): verigate_store_ops_total /"
echo "  verigate_store_commits_total: each delivery is one claim (64 entries per claim batch) and one outcome write;"
echo "  every commit is one fdatasync. send-ms: mean verigate_smtp_send_duration_seconds (MAIL..final reply)."
echo "  RSS: VmRSS / VmHWM (peak) of verigate at the end of the drain."
echo
FSYNC_P50=$(awk '{ print $2 }' <<<"$FSYNC")
for w in $WORKERS_LIST; do
    v="vg$w"
    echo "  workers $w: ${R[$v.msgs]} msgs in ${R[$v.secs]} s, status ${R[$v.status]}; smtp replies ${R[$v.replies]:-none};" \
        "outbox depth after ${R[$v.depth]}; store writer thread ${R[$v.writer_cpu]}% CPU + ~$(calc "printf \"%.0f\", ${R[$v.commits_s]} * $FSYNC_P50 / 10")% in fdatasync" \
        "(${R[$v.commits_s]} commits/s x $FSYNC_P50 ms); smtp-source: ${R[src$w.secs]} s, its CPU ${R[src$w.src_cpu]}%, the sink's ${R[src$w.sink_cpu]}%"
done
if (( DISTURBED )); then
    echo "  WARNING: other work used more than 30% of a core during a drain (column other): the machine was"
    echo "  not quiet (a build?); rerun when it is."
fi
nagle=$(for w in $WORKERS_LIST; do echo "${R[vg$w.send_ms]}"; done | awk '$1 >= 30 { n++ } END { print n + 0 }')
if (( nagle > 0 )); then
    echo "  NOTE: send-ms around 40 ms to a sink on 127.0.0.1 is TCP's Nagle algorithm meeting the sink's"
    echo "  delayed ACK: the client writes the message and its final CRLF.CRLF in two send() calls on a socket"
    echo "  without TCP_NODELAY, so the last 5 bytes wait for the ACK of the body (~40 ms). Each session then"
    echo "  carries ~23 msgs/s, whatever the CPU and the store could do (benches/README.md, Delivery benchmark)."
fi
echo "  smtp-source without -d (new session per message), -s $first_w: ${R[src-noreuse.rate]} msgs/s (for information)"
echo
echo "pacing: max_per_second = $PACED_RATE, workers $first_w, watched $PACED_SECONDS s after the first delivery:"
echo "  ${R[paced.msgs]} msgs in ${R[paced.secs]} s = ${R[paced.rate]} msgs/s overall (includes the pacer's initial burst of"
echo "  up to $PACED_RATE), ${R[paced.skip_rate]} msgs/s after the first 2 s; retry ${R[paced.retry]}, failed ${R[paced.failed]}," \
    "smtp replies ${R[paced.replies]:-none}"
if [[ "$LIVE" == 1 ]]; then
    echo
    echo "live: $LIVE_WORKERS workers unpaced, ${R[live.created]} creates with wrk -t$THREADS -c$CONNECTIONS at the same time (statuses ${R[live.statuses]}):"
    echo "  creates ${R[live.create_rate]}/s; deliveries while creating ${R[live.during_rate]}/s (${R[live.during_n]} msgs),"
    echo "  after the creates ${R[live.after_rate]}/s (${R[live.after_n]} msgs); first create -> last delivery ${R[live.e2e_secs]} s"
    echo "  = ${R[live.e2e_rate]} msgs/s end to end (ratio to source/s W=$LIVE_WORKERS: $(calc "printf \"%.3f\", ${R[live.e2e_rate]} / ${R[src$LIVE_WORKERS.rate]:-${R[src$first_w.rate]}}"));" \
        "status ${R[live.status]}"
    echo "  delivered ${R[live.delivered]}, retry ${R[live.retry]}, failed ${R[live.failed]}, dropped ${R[live.dropped]}," \
        "conns ${R[live.conns]}, ops/commit $(calc "printf \"%.1f\", (${R[live.commits]} > 0) ? ${R[live.ops]} / ${R[live.commits]} : 0") (${R[live.commits]} commits)," \
        "overloaded ${R[live.shed]}, RSS $(mib "${R[live.rss]}")/$(mib "${R[live.hwm]}") MiB"
fi
echo
echo "fill (relay stopped): $CREATED created ($FILL_RATE/s, statuses $(kv "$FILL_RES" statuses)), $FILL_SENT sent -> backlog $BACKLOG"
if grep -qiE 'error|panic' "$TMP"/verigate-*.log 2>/dev/null; then
    echo
    echo "verigate logs have errors (first 20 lines):"
    grep -iE 'error|panic' "$TMP"/verigate-*.log | head -20 | sed 's/^/  /'
fi
if [[ "$KEEP_TMP" == 1 ]]; then
    echo "raw data (configs, logs, /metrics per run, sink traces): $TMP"
fi

# Machine-readable (benches/run.sh): one line per figure.
if [[ -n "$RESULTS_FILE" ]]; then
    {
        echo "delivery.n=$N"
        echo "delivery.backlog=$BACKLOG"
        echo "delivery.size=$SIZE"
        echo "delivery.workers_list=$WORKERS_LIST"
        echo "delivery.fsync_start=$FSYNC"
        echo "delivery.fsync_end=$FSYNC_END"
        for w in $WORKERS_LIST; do
            for k in rate secs src_cpu sink_cpu; do echo "delivery.src$w.$k=${R[src$w.$k]}"; done
            for k in rate msgs secs status vg_cpu vg_us sink_cpu other machine delivered retry failed dropped \
                conns commits ops send_ms rss hwm writer_cpu; do
                echo "delivery.vg$w.$k=${R[vg$w.$k]:-}"
            done
            echo "delivery.vg$w.ratio=$(calc "printf \"%.3f\", ${R[vg$w.rate]} / ${R[src$w.rate]}")"
        done
        echo "delivery.src_noreuse.rate=${R[src-noreuse.rate]}"
        echo "delivery.paced.skip_rate=${R[paced.skip_rate]}"
        if [[ "$LIVE" == 1 ]]; then
            for k in create_rate during_rate after_rate e2e_secs e2e_rate delivered; do echo "delivery.live.$k=${R[live.$k]}"; done
        fi
        echo "delivery.settings=N=$N WORKERS_LIST=\"$WORKERS_LIST\" METHOD=$METHOD LIVE=$LIVE PACED_RATE=$PACED_RATE PACED_SECONDS=$PACED_SECONDS"
    } >>"$RESULTS_FILE"
fi
