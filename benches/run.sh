#!/usr/bin/env bash
# The whole benchmark suite, each benchmark with its baseline in the same run; writes
# BENCHMARKS.md at the repository root (benches/README.md, "The suite: run.sh").
#
#   benches/run.sh /path/to/verigate                 # full run (~8 min on 2 cores)
#   QUICK=1 benches/run.sh /path/to/verigate         # smoke test (~8 min): shorter runs, 100k pending
#   SECTIONS="http memory startup" benches/run.sh /path/to/verigate
#   VG_BINARY=/path/to/verigate OUT=/tmp/B.md benches/run.sh
#
# Sections (SECTIONS, default all, in this order):
#   http      benches/load.sh  SCENARIOS="create half check get link": durable create, p99 at half
#             the maximum create rate, code check, GET status, link POST, each against
#             benches/baseline_server.rs (req/s ratio; wrk latency percentiles)
#   delivery  benches/delivery.sh: outbox backlog drain into smtp-sink vs smtp-source
#   syntax    cargo bench --bench syntax (criterion) vs benches/email_validator_bench.py
#   memory    benches/backlog.sh: VmRSS idle, VmHWM under create load, VmRSS with PENDING entries
#   startup   benches/backlog.sh: exec to first 200 on /readyz, empty and with PENDING entries
#   recovery  benches/backlog.sh: SIGKILL under load with PENDING entries, restart to ready
# (memory, startup and recovery share one backlog.sh run and one filled template.)
#
# Environment (defaults in brackets):
#   VG_BINARY [$1, else target/release/verigate]  the daemon under test (copied first)
#   BASELINE_BINARY [target/release/examples/baseline_server; built with
#                    `cargo build --release --example baseline_server` when missing or older than
#                    benches/baseline_server.rs, unless BUILD_BASELINE=0]
#   QUICK [0]  1 = a smoke run: 5 s HTTP runs, a 30,000-token link pool, a 3,000-mail delivery
#              at 4 workers, short criterion runs, 100,000 pending entries. Its figures are not
#              the benchmark's.
#   SECTIONS ["http delivery syntax memory startup recovery"]
#   PENDING [1000000; QUICK 100000]  DURATION [15s; QUICK 5s]  (HTTP runs, memory create load)
#   OUT [BENCHMARKS.md at the repository root]
#   RUN_DIR [a new mktemp -d]  per-section logs and the raw results (kept)
#   QUIET_WAIT [180]  before each section, wait up to this many seconds for the machine to be
#                     quiet (all cores less than QUIET_BUSY % busy over 2 s); then run anyway.
#                     The busy % at each section's start goes into the report.
#   QUIET_BUSY [25]
#   PORT_BASE [28000]  ports used: +25..+28 (http), +125, +126, +525..+527 (delivery),
#                      +325..+327, +399 (backlog; +399 must stay closed)
# Every section's exact command line, its log and its exit status go into BENCHMARKS.md; a
# section that fails is reported as such and the others still run.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
QUICK=${QUICK:-0}
SECTIONS_SET=${SECTIONS:+1}
SECTIONS=${SECTIONS:-"http delivery syntax memory startup recovery"}
VG_BINARY=${1:-${VG_BINARY:-"$ROOT/target/release/verigate"}}
BASELINE_BINARY=${BASELINE_BINARY:-}
BUILD_BASELINE=${BUILD_BASELINE:-1}
OUT=${OUT:-"$ROOT/BENCHMARKS.md"}
PORT_BASE=${PORT_BASE:-28000}
QUIET_WAIT=${QUIET_WAIT:-180}
QUIET_BUSY=${QUIET_BUSY:-25}
if [[ "$QUICK" == 1 ]]; then
    PENDING=${PENDING:-100000}
    DURATION=${DURATION:-5s}
else
    PENDING=${PENDING:-1000000}
    DURATION=${DURATION:-15s}
fi

log() { printf '[run %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
for s in $SECTIONS; do
    case "$s" in http | delivery | syntax | memory | startup | recovery) ;; *) die "unknown section '$s'" ;; esac
done
[[ -x "$VG_BINARY" ]] || die "verigate binary not executable: $VG_BINARY (pass it as the first argument or VG_BINARY)"

RUN_DIR=${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/verigate-bench.XXXXXX")}
mkdir -p "$RUN_DIR/bin"
RESULTS="$RUN_DIR/results.kv"
META="$RUN_DIR/meta.kv"
: >"$RESULTS"
: >"$META"
meta() { printf '%s=%s\n' "$1" "$2" >>"$META"; }
T_START=$EPOCHREALTIME
log "run dir: $RUN_DIR"

# The binaries: copies, so that a new build or snapshot cannot change them mid-run.
cp "$VG_BINARY" "$RUN_DIR/bin/verigate"
VG="$RUN_DIR/bin/verigate"
NEED_BL=0
{ has http || has memory || has startup; } && NEED_BL=1
if [[ -z "$BASELINE_BINARY" ]] && (( NEED_BL )); then
    BASELINE_BINARY="$ROOT/target/release/examples/baseline_server"
    if [[ "$BUILD_BASELINE" == 1 && ( ! -x "$BASELINE_BINARY" || "$HERE/baseline_server.rs" -nt "$BASELINE_BINARY" ) ]]; then
        log "building the baseline: cargo build --release --example baseline_server"
        (cd "$ROOT" && cargo build --release --example baseline_server) >"$RUN_DIR/build-baseline.log" 2>&1 ||
            { tail -20 "$RUN_DIR/build-baseline.log" >&2; die "the baseline did not build"; }
    fi
fi
if (( NEED_BL )); then
    [[ -x "$BASELINE_BINARY" ]] || die "baseline binary missing: $BASELINE_BINARY"
    cp "$BASELINE_BINARY" "$RUN_DIR/bin/baseline_server"
fi
BL="$RUN_DIR/bin/baseline_server"
# The syntax reference, on a fresh machine (the other sections install wrk and postfix).
if has syntax && ! python3 -c 'import email_validator' 2>/dev/null; then
    log "installing email-validator 2.4.0 (pip) for the syntax section"
    python3 -m pip install --quiet --disable-pip-version-check email-validator==2.4.0 >&2 ||
        die "pip install email-validator failed"
fi

# ---------------------------------------------------------------------------------------------
# machine and software
cpu_model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
meta machine.nproc "$(nproc)"
meta machine.cpu "${cpu_model:-unknown}"
meta machine.cpu_mhz "$(awk -F': ' '/^cpu MHz/ { print $2; exit }' /proc/cpuinfo)"
meta machine.kernel "$(uname -srm)"
meta machine.mem "$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
meta machine.disk "$(df -h "$RUN_DIR" | awk 'NR == 2 { print $2 " total, " $4 " free (" $1 ")" }')"
meta machine.os "$(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")"
meta sw.rustc "$(rustc --version 2>/dev/null || echo unknown)"
meta sw.cargo "$(cargo --version 2>/dev/null || echo unknown)"
meta sw.wrk "$(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')"
meta sw.python "$(python3 --version 2>&1)"
meta sw.email_validator "$(python3 -c 'import email_validator as e; print(e.__version__)' 2>/dev/null || echo missing)"
meta sw.postfix "$(dpkg-query -W -f '${Version}' postfix 2>/dev/null || echo unknown)"
meta vg.path "$VG_BINARY"
meta vg.sha256 "$(sha256sum "$VG" | cut -c1-16)"
meta vg.mtime "$(date -u -r "$VG_BINARY" '+%Y-%m-%d %H:%M:%S UTC')"
meta vg.size "$(stat -c %s "$VG")"
meta vg.version "$("$VG" --version 2>/dev/null || echo unknown)"
[[ -x "$BL" ]] && meta bl.path "$BASELINE_BINARY" && meta bl.sha256 "$(sha256sum "$BL" | cut -c1-16)"
meta git.rev "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
meta git.dirty "$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c '^ M\|^M ' || true) modified tracked files"
meta run.quick "$QUICK"
meta run.sections "$SECTIONS"
meta run.date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta run.dir "$RUN_DIR"
meta run.command "$( [[ "$QUICK" == 1 ]] && printf 'QUICK=1 ')$( [[ -n "${SECTIONS_SET:-}" ]] && printf 'SECTIONS="%s" ' "$SECTIONS")benches/run.sh $VG_BINARY"
meta load.start "$(cut -d' ' -f1-3 /proc/loadavg)"
# Other work on the machine (it is shared): the busiest processes at the start.
meta load.top_start "$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{ printf "%s%s %s%%", sep, $2, $1; sep = ", " }')"
# Ports: refuse to start when one is taken (another benchmark on the machine would get our load).
for port in 25 26 27 28 125 126 325 326 327 399 525 526 527; do
    (exec 3<>"/dev/tcp/127.0.0.1/$((PORT_BASE + port))") 2>/dev/null &&
        die "port $((PORT_BASE + port)) is in use: set PORT_BASE to a free range"
done

# ---------------------------------------------------------------------------------------------
# sections
busy_pct() { # all cores' busy % over the next 2 s
    local a b
    a=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat)
    sleep 2
    b=$(awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9; exit }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " "); t = y[2] - x[2]; printf "%.0f", (t > 0) ? 100 * (y[1] - x[1]) / t : 0 }'
}
top_procs() { ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{ printf "%s%s %s%%", sep, $2, $1; sep = ", " }'; }
wait_quiet() { # name: waits (at most QUIET_WAIT s) for a quiet machine; records how busy it was
    local t0=$SECONDS b
    while :; do
        b=$(busy_pct)
        (( b < QUIET_BUSY )) && break
        if (( SECONDS - t0 >= QUIET_WAIT )); then
            log "the machine is still $b% busy after ${QUIET_WAIT} s; running $1 anyway ($(top_procs))"
            break
        fi
        log "the machine is $b% busy ($(top_procs)); waiting before $1"
        sleep 8
    done
    meta "section.$1.busy_before" "$b"
    meta "section.$1.waited" "$((SECONDS - t0))"
    meta "section.$1.top_before" "$(top_procs)"
}
section() { # name command... : runs it with its output in RUN_DIR/<name>.log; records status and time
    local name=$1
    shift
    wait_quiet "$name"
    local t0=$EPOCHREALTIME rc=0
    log "section $name: $*"
    "$@" >"$RUN_DIR/$name.log" 2>&1 || rc=$?
    meta "section.$name.rc" "$rc"
    meta "section.$name.secs" "$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')"
    if (( rc != 0 )); then
        log "section $name FAILED (exit $rc); last lines of $RUN_DIR/$name.log:"
        tail -15 "$RUN_DIR/$name.log" | sed 's/^/    /' >&2
        meta "section.$name.tail" "$(tail -5 "$RUN_DIR/$name.log" | tr '\n' ' ' | cut -c1-400)"
    else
        log "section $name done in $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s"
    fi
    return 0
}
cmdline() { # name "env assignments" command: the exact command, for the report
    meta "cmd.$1" "$2 $3"
}

P=$PORT_BASE
if has http; then
    if [[ "$QUICK" == 1 ]]; then http_env=(DURATION="$DURATION" HALF_CALIBRATE=3s LINK_POOL=30000)
    else http_env=(DURATION="$DURATION" HALF_CALIBRATE=5s LINK_POOL=100000); fi
    http_env+=(SCENARIOS="create half check get link" SKIP_BUILD=1 VG_BINARY="$VG" BASELINE_BINARY="$BL"
        API_PORT=$((P + 26)) PUBLIC_PORT=$((P + 25)) BASELINE_PORT=$((P + 27)) FLOOR_PORT=$((P + 28)) RESULTS_FILE="$RESULTS")
    cmdline http "$(printf '%q ' "${http_env[@]}")" "benches/load.sh"
    section http env "${http_env[@]}" "$HERE/load.sh"
fi
if has delivery; then
    if [[ "$QUICK" == 1 ]]; then d_env=(N=3000 WORKERS_LIST=4 LIVE=0 PACED_SECONDS=3)
    else d_env=(N=10000); fi
    d_env+=(SKIP_BUILD=1 VG_BINARY="$VG" SINK_PORT=$((P + 525)) FILL_SINK_PORT=$((P + 526)) DUMP_SINK_PORT=$((P + 527))
        API_PORT=$((P + 126)) PUBLIC_PORT=$((P + 125)) RESULTS_FILE="$RESULTS")
    cmdline delivery "$(printf '%q ' "${d_env[@]}")" "benches/delivery.sh"
    section delivery env "${d_env[@]}" "$HERE/delivery.sh"
fi
if has syntax; then
    if [[ "$QUICK" == 1 ]]; then crit=(--warm-up-time 1 --measurement-time 2); rounds=5; pairs=2
    else crit=(); rounds=20; pairs=3; fi
    # Rust and Python alternate, $pairs times, and the speed-up is the median of the pairs'
    # ratios: a slow spell of the machine then hits both sides of a pair, not one side of the
    # whole comparison.
    syntax_run() {
        local i
        for i in $(seq "$pairs"); do
            (cd "$ROOT" && cargo bench --bench syntax -- "${crit[@]}" parse/corpus) \
                >"$RUN_DIR/syntax-rust-$i.txt" 2>&1 ||
                { tail -30 "$RUN_DIR/syntax-rust-$i.txt"; return 1; }
            python3 "$HERE/email_validator_bench.py" --rounds "$rounds" >"$RUN_DIR/syntax-python-$i.txt" 2>&1 ||
                { cat "$RUN_DIR/syntax-python-$i.txt"; return 1; }
        done
        (cd "$ROOT" && cargo bench --bench syntax -- "${crit[@]}" adversarial) >"$RUN_DIR/syntax-adversarial.txt" 2>&1 ||
            { tail -30 "$RUN_DIR/syntax-adversarial.txt"; return 1; }
        python3 - "$RUN_DIR" "$pairs" >>"$RESULTS" <<'EOF'
import re, statistics, sys
run_dir, pairs = sys.argv[1], int(sys.argv[2])
UNIT = {"ps": 1e-3, "ns": 1.0, "µs": 1e3, "us": 1e3, "ms": 1e6, "s": 1e9}
EL = {"elem/s": 1.0, "Kelem/s": 1e3, "Melem/s": 1e6, "Gelem/s": 1e9}
def read(name):
    return open(f"{run_dir}/{name}", encoding="utf-8", errors="replace").read()
def bench(text, name):
    # criterion: "<name>   time:   [lo unit mid unit hi unit]" then "thrpt:  [...]" (optional)
    m = re.search(re.escape(name) + r"\s+time:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+) ([\d.]+) (\S+)\]", text)
    if not m:
        return None, None
    mid = float(m.group(3)) * UNIT[m.group(4)]
    t = re.search(r"thrpt:\s+\[([\d.]+) (\S+) ([\d.]+) (\S+)", text[m.end():m.end() + 300])
    thr = float(t.group(3)) * EL[t.group(4)] if t else None
    return mid, thr
iters, rust_ns, py_ns, py_best, speedups = [], [], [], [], []
cases = py_cases = py_rounds = None
for i in range(1, pairs + 1):
    mid, thr = bench(read(f"syntax-rust-{i}.txt"), "parse/corpus")
    if mid is None or not thr:
        sys.exit(f"no parse/corpus result in syntax-rust-{i}.txt")
    # Elements per iteration = the corpus cases (criterion's throughput); ns per address from it.
    cases = round(mid * thr / 1e9)
    py = read(f"syntax-python-{i}.txt")
    m = re.search(r"(\d+) cases x (\d+) rounds", py)
    pm = re.search(r"mean (\d+) ns/address, best round (\d+) ns/address", py)
    if not (m and pm):
        sys.exit(f"no result in syntax-python-{i}.txt")
    py_cases, py_rounds = m.group(1), m.group(2)
    iters.append(mid)
    rust_ns.append(mid / cases)
    py_ns.append(int(pm.group(1)))
    py_best.append(int(pm.group(2)))
    speedups.append(py_ns[-1] / rust_ns[-1])
print(f"syntax.pairs={pairs}")
print(f"syntax.rust_iter_ns={statistics.median(iters):.0f}")
print(f"syntax.rust_cases={cases}")
print(f"syntax.rust_ns={statistics.median(rust_ns):.1f}")
print(f"syntax.py_cases={py_cases}")
print(f"syntax.py_rounds={py_rounds}")
print(f"syntax.py_ns={statistics.median(py_ns):.0f}")
print(f"syntax.py_best_ns={min(py_best)}")
print(f"syntax.speedup={statistics.median(speedups):.1f}")
print("syntax.speedups=" + ", ".join(f"{s:.1f}" for s in speedups))
adv = read("syntax-adversarial.txt")
for name in ("huge_ascii", "escaped_marks", "lt_with_solidus", "long_display_name"):
    t, _ = bench(adv, "adversarial/" + name)
    if t is not None:
        print(f"syntax.adv.{name}_ms={t / 1e6:.2f}")
EOF
    }
    cmdline syntax "" "$pairs x (cargo bench --bench syntax -- ${crit[*]:+${crit[*]} }parse/corpus; python3 benches/email_validator_bench.py --rounds $rounds); cargo bench --bench syntax -- ${crit[*]:+${crit[*]} }adversarial"
    section syntax syntax_run
fi
parts=""
for s in memory startup recovery; do has "$s" && parts+="$s "; done
if [[ -n "$parts" ]]; then
    if [[ "$QUICK" == 1 ]]; then b_env=(MEM_SETTLE=3 STARTUP_REPEAT=3 STARTUP_REPEAT_FULL=2 RECOVERY_LOAD=3)
    else b_env=(MEM_SETTLE=10 STARTUP_REPEAT=5 STARTUP_REPEAT_FULL=3 RECOVERY_LOAD=5); fi
    b_env+=(PARTS="${parts% }" PENDING="$PENDING" DURATION="$DURATION" VG_BINARY="$VG")
    (( NEED_BL )) && b_env+=(BASELINE_BINARY="$BL")
    b_env+=(API_PORT=$((P + 326)) PUBLIC_PORT=$((P + 325)) BASELINE_PORT=$((P + 327)) DEAD_PORT=$((P + 399))
        RESULTS_FILE="$RESULTS")
    cmdline backlog "$(printf '%q ' "${b_env[@]}")" "benches/backlog.sh"
    section backlog env "${b_env[@]}" "$HERE/backlog.sh"
fi

# ---------------------------------------------------------------------------------------------
# report
meta load.end "$(cut -d' ' -f1-3 /proc/loadavg)"
meta load.top_end "$(ps -eo pcpu=,comm= --sort=-pcpu | head -5 | awk '{ printf "%s%s %s%%", sep, $2, $1; sep = ", " }')"
meta run.secs "$(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }')"
python3 "$HERE/report.py" "$RESULTS" "$META" "$OUT" || die "report.py failed (raw results: $RESULTS)"
log "wrote $OUT (total $(awk -v a="$T_START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }') s); logs and raw results: $RUN_DIR"
# The data dirs are gone (each script removes its own); the bin copies too.
rm -rf "${RUN_DIR:?}/bin"
