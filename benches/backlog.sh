#!/usr/bin/env bash
# Memory, start-up and crash recovery of verigate, empty and with a large outbox backlog
# (benches/README.md, "Backlog benchmark": memory, start to ready, recovery).
#
#   VG_BINARY=/path/to/verigate benches/backlog.sh                  # 1,000,000 pending: ~10 min
#   PENDING=100000 DURATION=5s VG_BINARY=… benches/backlog.sh      # shorter
#   PARTS="startup" KEEP_TEMPLATE=1 VG_BINARY=… benches/backlog.sh # keep the filled data dir
#   TEMPLATE_DIR=/path/kept/before PARTS=recovery VG_BINARY=… benches/backlog.sh
#
# What it does:
#   memory   an empty data dir: VmRSS IDLE_WAIT s after ready (idle); then wrk creates for
#            DURATION (the same client as load.sh): VmHWM (peak) and VmRSS after; then, on a
#            copy of the template (PENDING outbox entries), VmRSS each second for MEM_SETTLE s
#            after ready (and the CPU the daemon used then), and around one GET /metrics (timed:
#            it counts the outbox); then the same after a restart of that copy (SIGTERM, start);
#   startup  time from exec to the first 200 on /readyz (benches/ready_timer.py, a poll every
#            5 ms): STARTUP_REPEAT times on an empty data dir, STARTUP_REPEAT_FULL times on a
#            fresh copy of the template, each followed by a restart of the same copy; also the
#            time from SIGTERM to exit with the backlog. The first start on a copy replays what
#            the fill daemon wrote since its last flush (as after a restart under traffic); the
#            restart finds a settled store: the two are reported apart;
#            with BASELINE_BINARY, the baseline server's exec to first 200 on /healthz
#            STARTUP_REPEAT times, and its VmRSS at idle (memory): what exec, a Tokio runtime and
#            a listener cost on this machine right now, for reference;
#   recovery a copy of the template, ready, wrk creates for RECOVERY_LOAD s, SIGKILL in the middle
#            of them; then the time to ready again, and whether every create answered 202
#            before the kill is in the outbox (/metrics verigate_outbox_depth).
#
# The template (memory, startup and recovery need one) is filled once through the HTTP API:
# wrk with benches/delivery.lua creates exactly PENDING `link` verifications (ttl 7 days, unique
# addresses) on a daemon whose SMTP relay is a closed port on 127.0.0.1 and whose
# delivery.max_per_second is 1, so the worker barely drains (a refused connection is a retry,
# with backoff); delivery.ready_requires_transport = false, DNS checks and every rate limit off.
# The fill daemon is stopped with SIGTERM; its data dir is the template, copied with `cp -a`
# for every run that needs it, so no run changes it. Copies come from the page cache (warm).
#
# Every figure goes to stdout as a report and, with RESULTS_FILE, as `backlog.<key>=<value>`
# lines appended to that file.
#
# Environment (defaults in brackets):
#   VG_BINARY [target/release/verigate]  copied to the temp dir, then run from there
#   BASELINE_BINARY []  benches/baseline_server.rs built, for the reference figures (optional)
#   PARTS ["memory startup recovery"]
#   PENDING [1000000]  outbox entries in the template
#   DURATION [15s]  create load of the memory part     THREADS [2]  CONNECTIONS [64]  (wrk)
#   IDLE_WAIT [2]  MEM_SETTLE [10]  seconds
#   STARTUP_REPEAT [5]  STARTUP_REPEAT_FULL [3]  RECOVERY_LOAD [5] seconds
#   FILL_TIMEOUT [1800] seconds
#   API_PORT [18326]  PUBLIC_PORT [18325]  DEAD_PORT [18399] (must be closed: the "relay")
#   BASELINE_PORT [18327]
#   TEMPLATE_DIR []  a template kept by an earlier run (KEEP_TEMPLATE=1): no fill
#   KEEP_TEMPLATE [0]  keep the template (its path is printed)
#   RESULTS_FILE []  KEEP_TMP [0]
set -euo pipefail

PARTS=${PARTS:-"memory startup recovery"}
PENDING=${PENDING:-1000000}
DURATION=${DURATION:-15s}
THREADS=${THREADS:-2}
CONNECTIONS=${CONNECTIONS:-64}
IDLE_WAIT=${IDLE_WAIT:-2}
MEM_SETTLE=${MEM_SETTLE:-10}
STARTUP_REPEAT=${STARTUP_REPEAT:-5}
STARTUP_REPEAT_FULL=${STARTUP_REPEAT_FULL:-3}
RECOVERY_LOAD=${RECOVERY_LOAD:-5}
FILL_TIMEOUT=${FILL_TIMEOUT:-1800}
API_PORT=${API_PORT:-18326}
PUBLIC_PORT=${PUBLIC_PORT:-18325}
DEAD_PORT=${DEAD_PORT:-18399}
BASELINE_PORT=${BASELINE_PORT:-18327}
BASELINE_BINARY=${BASELINE_BINARY:-}
TEMPLATE_DIR=${TEMPLATE_DIR:-}
KEEP_TEMPLATE=${KEEP_TEMPLATE:-0}
RESULTS_FILE=${RESULTS_FILE:-}
KEEP_TMP=${KEEP_TMP:-0}

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
VG_BINARY=${VG_BINARY:-"$ROOT/target/release/verigate"}
LOAD_LUA="$HERE/load.lua"
FILL_LUA="$HERE/delivery.lua"
TIMER="$HERE/ready_timer.py"
KEY="bench-key-0123456789abcdef"
NONCE="$(date +%s)$$"

BENCH_TAG=backlog
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"
has() { [[ " $PARTS " == *" $1 "* ]]; }
for p in $PARTS; do
    case "$p" in memory | startup | recovery) ;; *) die "unknown part '$p' in PARTS" ;; esac
done
command -v wrk >/dev/null 2>&1 || die "wrk is needed (apt-get install wrk)"
command -v curl >/dev/null 2>&1 || die "curl is needed"
command -v python3 >/dev/null 2>&1 || die "python3 is needed (ready_timer.py)"
[[ -x "$VG_BINARY" ]] || die "VG_BINARY $VG_BINARY is not executable"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/verigate-backlog.XXXXXX")
VG_PID=""
WRK_PID=""
cleanup() {
    local rc=$?
    [[ -n "$WRK_PID" ]] && kill "$WRK_PID" 2>/dev/null || true
    [[ -n "${BL_PID:-}" ]] && kill -9 "$BL_PID" 2>/dev/null || true
    if [[ -n "$VG_PID" ]] && kill -0 "$VG_PID" 2>/dev/null; then
        kill "$VG_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$VG_PID" 2>/dev/null || true
    fi
    if [[ "$KEEP_TMP" == 1 ]]; then
        log "temp dir kept: $TMP"
    else
        # The template is kept on request (and always when it came from TEMPLATE_DIR, which is
        # not under $TMP); every copy goes.
        rm -rf "$TMP"/run-*
        if [[ "$KEEP_TEMPLATE" != 1 ]]; then rm -rf "$TMP/template"; fi
        if [[ $rc -ne 0 || "$KEEP_TEMPLATE" == 1 ]]; then
            rm -f "$TMP/verigate"
            log "temp dir kept: $TMP"
        else
            rm -rf "$TMP"
        fi
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cp "$VG_BINARY" "$TMP/verigate"
VERIGATE="$TMP/verigate"
BASELINE=""
if [[ -n "$BASELINE_BINARY" ]]; then
    [[ -x "$BASELINE_BINARY" ]] || die "BASELINE_BINARY $BASELINE_BINARY is not executable"
    cp "$BASELINE_BINARY" "$TMP/baseline_server"
    BASELINE="$TMP/baseline_server"
fi

for p in "$API_PORT" "$PUBLIC_PORT" ${BASELINE:+"$BASELINE_PORT"}; do
    port_busy "$p" && die "port $p is already in use (set API_PORT / PUBLIC_PORT / BASELINE_PORT)"
done
port_busy "$DEAD_PORT" && die "DEAD_PORT $DEAD_PORT must be closed (it is the relay that refuses)"

declare -A R
out() { R[$1]=$2; log "$1 = $2"; }

# ---------------------------------------------------------------------------------------------
# config, daemon control
if [[ -n "$TEMPLATE_DIR" ]]; then
    [[ -f "$TEMPLATE_DIR/meta" && -d "$TEMPLATE_DIR/data" ]] || die "TEMPLATE_DIR $TEMPLATE_DIR has no meta / data"
    # shellcheck disable=SC1091
    source "$TEMPLATE_DIR/meta"   # SIGNING_SECRET, TEMPLATE_PENDING
    TEMPLATE="$TEMPLATE_DIR"
    KEEP_TEMPLATE=1
else
    SIGNING_SECRET=$(head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')
    TEMPLATE="$TMP/template"
fi
write_config() { # file data_dir
    cat >"$1" <<EOF
data_dir = "$2"
public_base_url = "http://127.0.0.1:$PUBLIC_PORT"

[listen]
api = "127.0.0.1:$API_PORT"
public = "127.0.0.1:$PUBLIC_PORT"

[signing]
# The template's key: its verifications were signed with it.
keys = ["k1:$SIGNING_SECRET"]

[delivery]
# The relay is a closed port: every attempt is a quick retry with backoff, and at one attempt a
# second the worker barely touches the backlog. Ready without a transport probe.
transport = "smtp"
max_per_second = 1
ready_requires_transport = false

[smtp]
host = "127.0.0.1"
port = $DEAD_PORT
tls = "none"
EOF
    bench_config_tail "$KEY" >>"$1"
}
write_config "$TMP/check.toml" "$TMP/run-check"
"$VERIGATE" config check --config "$TMP/check.toml" >/dev/null 2>"$TMP/config-check.err" ||
    { cat "$TMP/config-check.err" >&2; die "the bench config is not valid for this build"; }

READY_LINE=""
start_timed() { # label data_dir → READY_LINE (ready_timer's line); VG_PID
    write_config "$TMP/$1.toml" "$2"
    READY_LINE=$(python3 "$TIMER" "http://127.0.0.1:$API_PORT/readyz" "$TMP/verigate-$1.log" "$TMP/pid-$1" 120 \
        -- "$VERIGATE" serve --config "$TMP/$1.toml") || true
    VG_PID=$(cat "$TMP/pid-$1" 2>/dev/null || true)
    [[ "$READY_LINE" == *"status=ready"* ]] || { tail -20 "$TMP/verigate-$1.log" >&2; die "$1: verigate not ready: $READY_LINE"; }
    log "$1: $READY_LINE"
}
# The baseline server, timed the same way (exec → first 200 on /healthz) → READY_LINE, BL_PID
BL_PID=""
start_baseline_timed() { # label
    READY_LINE=$(python3 "$TIMER" "http://127.0.0.1:$BASELINE_PORT/healthz" "$TMP/baseline-$1.log" "$TMP/pid-bl-$1" 30 \
        -- "$BASELINE" "$BASELINE_PORT") || true
    BL_PID=$(cat "$TMP/pid-bl-$1" 2>/dev/null || true)
    [[ "$READY_LINE" == *"status=ready"* ]] || { cat "$TMP/baseline-$1.log" >&2; die "$1: baseline not up: $READY_LINE"; }
}
stop_baseline() {
    kill "$BL_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$BL_PID" 2>/dev/null || break; sleep 0.02; done
    kill -9 "$BL_PID" 2>/dev/null || true
    BL_PID=""
}
STOP_SECS=""
stop_vg() { # SIGTERM, SIGKILL after 60 s → STOP_SECS
    local t0=$EPOCHREALTIME
    kill "$VG_PID" 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$VG_PID" 2>/dev/null; then
        log "WARNING: verigate did not stop within 60 s of SIGTERM; SIGKILL"
        kill -9 "$VG_PID" 2>/dev/null || true
    fi
    # not our child (ready_timer started it): wait until the pid is gone
    for _ in $(seq 100); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.05; done
    STOP_SECS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }')
    VG_PID=""
}
HZ=$(getconf CLK_TCK)
METRICS_SECS=""
METRICS=""
scrape() { # → METRICS, METRICS_SECS
    local t0=$EPOCHREALTIME
    METRICS=$(curl -fsS --max-time 300 "http://127.0.0.1:$API_PORT/metrics") || die "GET /metrics failed"
    METRICS_SECS=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.3f", b - a }')
}
depth() { awk '$1 == "verigate_outbox_depth{lane=\"email\"}" { print $2 }' <<<"$METRICS"; }
copy_template() { # name → path of a fresh copy of the template's data dir
    local dst="$TMP/run-$1" t0=$EPOCHREALTIME
    rm -rf "$dst"
    cp -a "$TEMPLATE/data" "$dst"
    log "copied the template to $dst in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
    echo "$dst"
}
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { if (NR == 0) print "?"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.1f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
minmax() { tr ' ' '\n' | grep -v '^$' | sort -n | awk 'NR == 1 { lo = $1 } { hi = $1 } END { print lo "-" hi }'; }
# wrk with load.lua in create mode (unique addresses), for SECS; → WRK_RES (its RESULT line)
WRK_RES=""
wrk_create() { # label duration
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2" --timeout 10s -s "$LOAD_LUA" "http://127.0.0.1:$API_PORT" \
        -- create "$KEY" "$NONCE-$1" link - - "$THREADS" 0 0 >"$TMP/wrk-$1.txt" 2>&1 || true
    WRK_RES=$(grep '^RESULT ' "$TMP/wrk-$1.txt" | tail -1 | sed 's/^RESULT //')
}
count_202() { kv "$1" statuses | tr ',' '\n' | awk -F: '$1 == "202" { n = $2 } END { print n + 0 }'; }

NEED_TEMPLATE=0
{ has memory || has startup || has recovery; } && NEED_TEMPLATE=1

# ---------------------------------------------------------------------------------------------
# memory (empty) and startup (empty)
if has memory; then
    start_timed mem-empty "$TMP/run-mem-empty"
    out startup.empty.first_ms "$(kv "$READY_LINE" ready_ms)"
    sleep "$IDLE_WAIT"
    out mem.idle_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    out mem.idle_hwm_kib "$(status_kib "$VG_PID" VmHWM)"
    log "memory: create load, wrk -t$THREADS -c$CONNECTIONS -d$DURATION"
    wrk_create mem-load "$DURATION"
    out mem.load_rps "$(kv "$WRK_RES" rps)"
    out mem.load_statuses "$(kv "$WRK_RES" statuses)"
    out mem.load_hwm_kib "$(status_kib "$VG_PID" VmHWM)"
    out mem.load_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    sleep 5
    out mem.after_load_5s_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    scrape
    out mem.load_outbox_depth "$(depth)"
    stop_vg
    rm -rf "$TMP/run-mem-empty"
    if [[ -n "$BASELINE" ]]; then
        start_baseline_timed mem
        sleep "$IDLE_WAIT"
        out mem.baseline_idle_rss_kib "$(status_kib "$BL_PID" VmRSS)"
        stop_baseline
    fi
fi
if has startup; then
    times=""
    for i in $(seq "$STARTUP_REPEAT"); do
        start_timed "start-empty-$i" "$TMP/run-start-empty-$i"
        times+=" $(kv "$READY_LINE" ready_ms)"
        stop_vg
        rm -rf "$TMP/run-start-empty-$i"
    done
    out startup.empty.all_ms "${times# }"
    out startup.empty.median_ms "$(median <<<"$times")"
    out startup.empty.range_ms "$(minmax <<<"$times")"
    if [[ -n "$BASELINE" ]]; then
        times=""
        for i in $(seq "$STARTUP_REPEAT"); do
            start_baseline_timed "start-$i"
            times+=" $(kv "$READY_LINE" ready_ms)"
            stop_baseline
        done
        out startup.baseline.all_ms "${times# }"
        out startup.baseline.median_ms "$(median <<<"$times")"
    fi
fi

# ---------------------------------------------------------------------------------------------
# the template
if (( NEED_TEMPLATE )) && [[ -z "$TEMPLATE_DIR" ]]; then
    avail_kib=$(df -Pk "$TMP" | awk 'NR == 2 { print $4 }')
    need_kib=$(( PENDING * 6 + 1048576 ))   # ~2.2 KiB an entry in the template, one copy, margin
    log "disk: $(mib "$avail_kib") MiB free under $TMP; the template and one copy need ~$(mib "$need_kib") MiB"
    (( avail_kib > need_kib )) || die "not enough disk space under $TMP for $PENDING entries"
    mkdir -p "$TEMPLATE"
    start_timed fill "$TEMPLATE/data"
    per=$(( (PENDING + THREADS - 1) / THREADS ))
    log "fill: $((per * THREADS)) link creates (wrk -t$THREADS -c$CONNECTIONS, delivery.lua), relay closed, max_per_second = 1"
    marker="$TMP/done-fill"
    t0=$EPOCHREALTIME
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${FILL_TIMEOUT}s" --timeout 10s -s "$FILL_LUA" "http://127.0.0.1:$API_PORT" \
        -- "$KEY" "$NONCE-fill" link 604800 "$per" "$marker" >"$TMP/wrk-fill.txt" 2>&1 &
    WRK_PID=$!
    fill_secs=""
    rss_samples=""
    next=$((SECONDS + 10))
    while kill -0 "$WRK_PID" 2>/dev/null; do
        n=$( (compgen -G "$marker.*" || true) | wc -l)
        if (( n >= THREADS )); then
            fill_secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
            kill -INT "$WRK_PID" 2>/dev/null || true
            break
        fi
        if (( SECONDS >= next )); then
            rss_samples+=" $(status_kib "$VG_PID" VmRSS)"
            next=$((SECONDS + 10))
        fi
        kill -0 "$VG_PID" 2>/dev/null || die "the fill daemon died (log: $TMP/verigate-fill.log)"
        sleep 0.1
    done
    wait "$WRK_PID" || true
    WRK_PID=""
    [[ -n "$fill_secs" ]] || { cat "$TMP/wrk-fill.txt" >&2; die "the fill did not finish within FILL_TIMEOUT"; }
    fill_res=$(grep '^RESULT ' "$TMP/wrk-fill.txt" | tail -1 | sed 's/^RESULT //')
    out fill.secs "$fill_secs"
    out fill.rate "$(awk -v n="$(kv "$fill_res" created)" -v s="$fill_secs" 'BEGIN { printf "%.0f", n / s }')"
    out fill.statuses "$(kv "$fill_res" statuses)"
    out fill.p99_us "$(kv "$fill_res" p99_us)"
    out fill.rss_kib "$(status_kib "$VG_PID" VmRSS)"
    out fill.hwm_kib "$(status_kib "$VG_PID" VmHWM)"
    out fill.rss_samples_kib "${rss_samples# }"
    scrape
    out fill.metrics_secs "$METRICS_SECS"
    out fill.outbox_depth "$(depth)"
    stop_vg
    out fill.stop_secs "$STOP_SECS"
    out fill.disk "$(du -sh "$TEMPLATE/data" | cut -f1)"
    TEMPLATE_PENDING=$(depth)
    printf 'SIGNING_SECRET=%s\nTEMPLATE_PENDING=%s\n' "$SIGNING_SECRET" "$TEMPLATE_PENDING" >"$TEMPLATE/meta"
    (( TEMPLATE_PENDING >= PENDING * 99 / 100 )) || log "WARNING: the template holds $TEMPLATE_PENDING entries, not $PENDING"
fi
(( NEED_TEMPLATE )) && out template.pending "$TEMPLATE_PENDING"

# VmRSS each second for MEM_SETTLE s after ready, the CPU used meanwhile, then VmRSS and VmHWM,
# as mem.PREFIX_* results.
settle() { # prefix
    local samples="" c0
    c0=$(proc_ticks "$VG_PID")
    for _ in $(seq "$MEM_SETTLE"); do sleep 1; samples+=" $(status_kib "$VG_PID" VmRSS)"; done
    out "mem.$1_cpu_after_ready_ms" "$(( ($(proc_ticks "$VG_PID") - c0) * 1000 / HZ ))"
    out "mem.$1_rss_samples_kib" "${samples# }"
    out "mem.$1_rss_kib" "$(status_kib "$VG_PID" VmRSS)"
    out "mem.$1_hwm_kib" "$(status_kib "$VG_PID" VmHWM)"
}

# ---------------------------------------------------------------------------------------------
# memory with the backlog
if has memory; then
    d=$(copy_template mem-full)
    start_timed mem-full "$d"
    out startup.full.first_ms "$(kv "$READY_LINE" ready_ms)"
    out mem.full_ready_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    settle full
    scrape
    out mem.full_metrics_secs "$METRICS_SECS"
    out mem.full_outbox_depth "$(depth)"
    out mem.full_after_metrics_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    out mem.full_after_metrics_hwm_kib "$(status_kib "$VG_PID" VmHWM)"
    scrape
    out mem.full_metrics2_secs "$METRICS_SECS"
    stop_vg
    out mem.full_stop_secs "$STOP_SECS"
    # The same store again, after that graceful stop: settled.
    start_timed mem-full-restart "$d"
    out startup.full_restart.first_ms "$(kv "$READY_LINE" ready_ms)"
    out mem.restart_ready_rss_kib "$(status_kib "$VG_PID" VmRSS)"
    settle restart
    stop_vg
    out mem.restart_stop_secs "$STOP_SECS"
    rm -rf "$d"
fi

# ---------------------------------------------------------------------------------------------
# startup with the backlog
if has startup; then
    times=""
    listen=""
    stops=""
    rtimes=""
    for i in $(seq "$STARTUP_REPEAT_FULL"); do
        d=$(copy_template "start-full-$i")
        start_timed "start-full-$i" "$d"
        times+=" $(kv "$READY_LINE" ready_ms)"
        listen+=" $(kv "$READY_LINE" listen_ms)"
        stop_vg
        stops+=" $STOP_SECS"
        start_timed "restart-full-$i" "$d"
        rtimes+=" $(kv "$READY_LINE" ready_ms)"
        stop_vg
        rm -rf "$d"
    done
    out startup.full_restart.all_ms "${rtimes# }"
    out startup.full_restart.median_ms "$(median <<<"$rtimes")"
    out startup.full.all_ms "${times# }"
    out startup.full.median_ms "$(median <<<"$times")"
    out startup.full.range_ms "$(minmax <<<"$times")"
    out startup.full.listen_all_ms "${listen# }"
    out startup.full.stop_all_secs "${stops# }"
fi

# ---------------------------------------------------------------------------------------------
# recovery: SIGKILL under load, restart
if has recovery; then
    d=$(copy_template recovery)
    start_timed recovery-before "$d"
    log "recovery: wrk creates for ${RECOVERY_LOAD} s, then SIGKILL"
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$((RECOVERY_LOAD + 30))s" --timeout 10s -s "$LOAD_LUA" \
        "http://127.0.0.1:$API_PORT" -- create "$KEY" "$NONCE-recovery" link - - "$THREADS" 0 0 \
        >"$TMP/wrk-recovery.txt" 2>&1 &
    WRK_PID=$!
    sleep "$RECOVERY_LOAD"
    kill -KILL "$VG_PID"
    for _ in $(seq 100); do kill -0 "$VG_PID" 2>/dev/null || break; sleep 0.02; done
    kill -INT "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" || true
    WRK_PID=""
    VG_PID=""
    rec_res=$(grep '^RESULT ' "$TMP/wrk-recovery.txt" | tail -1 | sed 's/^RESULT //')
    acked=$(count_202 "$rec_res")
    out recovery.acked_before_kill "$acked"
    out recovery.statuses "$(kv "$rec_res" statuses)"
    start_timed recovery-after "$d"
    out recovery.ready_ms "$(kv "$READY_LINE" ready_ms)"
    out recovery.listen_ms "$(kv "$READY_LINE" listen_ms)"
    out recovery.rss_kib "$(status_kib "$VG_PID" VmRSS)"
    scrape
    out recovery.metrics_secs "$METRICS_SECS"
    out recovery.outbox_depth "$(depth)"
    # Every 202 is durable: the outbox holds the template's entries plus every acknowledged
    # create (minus the few the worker may have failed for good: none at 1 attempt/s to a closed
    # port; each attempt is a retry). A create whose 202 was lost in the kill may be there too.
    missing=$(awk -v t="$TEMPLATE_PENDING" -v a="$acked" -v d="$(depth)" 'BEGIN { m = t + a - d; print (m > 0) ? m : 0 }')
    out recovery.missing "$missing"
    stop_vg
    rm -rf "$d"
fi

# ---------------------------------------------------------------------------------------------
# report
echo
echo "verigate backlog benchmark: parts $PARTS; template $TEMPLATE_PENDING pending outbox entries${R[fill.disk]:+ (${R[fill.disk]} on disk)}"
echo "machine: $(nproc) CPUs; daemon: relay = closed port, max_per_second = 1, ready_requires_transport = false"
echo
if [[ -n "${R[fill.secs]:-}" ]]; then
    echo "fill: ${TEMPLATE_PENDING} creates in ${R[fill.secs]} s (${R[fill.rate]}/s, p99 $(awk -v u="${R[fill.p99_us]}" 'BEGIN { printf "%.1f", u / 1000 }') ms, statuses ${R[fill.statuses]});" \
        "daemon VmRSS $(mib "${R[fill.rss_kib]}") MiB, VmHWM $(mib "${R[fill.hwm_kib]}") MiB at the end;" \
        "GET /metrics ${R[fill.metrics_secs]} s; SIGTERM to exit ${R[fill.stop_secs]} s"
    echo "  VmRSS every 10 s during the fill (KiB): ${R[fill.rss_samples_kib]}"
fi
if has memory; then
    echo "memory, empty: idle VmRSS $(mib "${R[mem.idle_rss_kib]}") MiB ($IDLE_WAIT s after ready);" \
        "create load ($DURATION, ${R[mem.load_rps]} req/s): VmHWM $(mib "${R[mem.load_hwm_kib]}") MiB, VmRSS $(mib "${R[mem.load_rss_kib]}") MiB at the end," \
        "$(mib "${R[mem.after_load_5s_rss_kib]}") MiB 5 s later${R[mem.baseline_idle_rss_kib]:+; baseline server idle VmRSS $(mib "${R[mem.baseline_idle_rss_kib]}") MiB}"
    echo "memory, $TEMPLATE_PENDING pending: VmRSS at ready $(mib "${R[mem.full_ready_rss_kib]}") MiB, after $MEM_SETTLE s $(mib "${R[mem.full_rss_kib]}") MiB" \
        "(VmHWM $(mib "${R[mem.full_hwm_kib]}") MiB); after one GET /metrics (${R[mem.full_metrics_secs]} s; a second one ${R[mem.full_metrics2_secs]} s)" \
        "VmRSS $(mib "${R[mem.full_after_metrics_rss_kib]}") MiB, VmHWM $(mib "${R[mem.full_after_metrics_hwm_kib]}") MiB; SIGTERM to exit ${R[mem.full_stop_secs]} s"
    echo "  VmRSS each second after ready (KiB): ${R[mem.full_rss_samples_kib]}; CPU used in those $MEM_SETTLE s: ${R[mem.full_cpu_after_ready_ms]} ms"
    echo "  restarted on the same store (after SIGTERM): ready in ${R[startup.full_restart.first_ms]} ms, VmRSS at ready $(mib "${R[mem.restart_ready_rss_kib]}") MiB," \
        "after $MEM_SETTLE s $(mib "${R[mem.restart_rss_kib]}") MiB (VmHWM $(mib "${R[mem.restart_hwm_kib]}") MiB); CPU in those $MEM_SETTLE s: ${R[mem.restart_cpu_after_ready_ms]} ms"
fi
if has startup; then
    echo "start to ready, empty data dir: median ${R[startup.empty.median_ms]} ms (${R[startup.empty.all_ms]})${R[startup.baseline.median_ms]:+; baseline server exec to first 200: median ${R[startup.baseline.median_ms]} ms (${R[startup.baseline.all_ms]})}"
    echo "start to ready, $TEMPLATE_PENDING pending, first start on a copy: median ${R[startup.full.median_ms]} ms (${R[startup.full.all_ms]}; listening at ${R[startup.full.listen_all_ms]} ms);" \
        "SIGTERM to exit ${R[startup.full.stop_all_secs]} s"
    echo "start to ready, $TEMPLATE_PENDING pending, restart of that copy: median ${R[startup.full_restart.median_ms]} ms (${R[startup.full_restart.all_ms]})"
fi
if has recovery; then
    echo "recovery: SIGKILL after ${RECOVERY_LOAD} s of creates (${R[recovery.acked_before_kill]} answered 202); restart to ready ${R[recovery.ready_ms]} ms" \
        "(listening at ${R[recovery.listen_ms]} ms); outbox depth after ${R[recovery.outbox_depth]} (template $TEMPLATE_PENDING + acknowledged $acked; missing ${R[recovery.missing]});" \
        "GET /metrics ${R[recovery.metrics_secs]} s"
fi
if grep -qiE 'panic|error' "$TMP"/verigate-*.log 2>/dev/null; then
    echo
    echo "verigate logs have errors or panics (first 10 lines):"
    grep -iE 'panic|error' "$TMP"/verigate-*.log | head -10 | sed 's/^/  /'
fi
if [[ "$KEEP_TEMPLATE" == 1 ]]; then echo "template kept: $TEMPLATE (TEMPLATE_DIR=$TEMPLATE to reuse it)"; fi

if [[ -n "$RESULTS_FILE" ]]; then
    {
        for k in "${!R[@]}"; do echo "backlog.$k=${R[$k]}"; done
        echo "backlog.pending=$TEMPLATE_PENDING"
        echo "backlog.settings=PENDING=$PENDING DURATION=$DURATION IDLE_WAIT=$IDLE_WAIT MEM_SETTLE=$MEM_SETTLE STARTUP_REPEAT=$STARTUP_REPEAT STARTUP_REPEAT_FULL=$STARTUP_REPEAT_FULL RECOVERY_LOAD=$RECOVERY_LOAD"
    } >>"$RESULTS_FILE"
fi
