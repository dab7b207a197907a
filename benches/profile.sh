#!/usr/bin/env bash
# benches/profile.sh: perf, attached to verigate during one load.sh scenario's measured run.
#
#   benches/profile.sh create                      # perf record -g, 5 s → ./perf-create.data
#   benches/profile.sh link /tmp/link.data         # output file of your choice
#   PERF="trace -s" benches/profile.sh check       # syscall counts and times instead
#   THREAD=verigate-store PERF="trace -s" benches/profile.sh check   # one thread only
#   PERF="record -F 999 --call-graph dwarf,32768" SECS=3 benches/profile.sh create
#
# What it does: starts `benches/load.sh` with SCENARIOS=<scenario> (its other settings come from
# the environment, as usual: VG_BINARY, DURATION, LINK_POOL, ...), waits for the log line that
# starts the scenario's verigate run (`wrk <scenario>-verigate`), lets it warm up for WARMUP
# seconds, and runs `perf $PERF -p <pid> -o OUT -- sleep SECS` on the daemon load.sh started (or
# `-t <tid>` of its first thread whose name starts with THREAD). load.sh's report is printed at
# the end. Nothing else on the machine is profiled.
#
# Settings: PERF ["record -F 2999 -g"]; SECS [5; 2 for link, whose run lasts ~4 s]; WARMUP [1];
# THREAD [none: the whole process]. Reading the output: `perf report -i OUT --sort comm` for the
# split between tokio workers, the store writer and fjall's workers; `--comm verigate-store-
# --sort sym` for one of them. Frame-pointer stacks (-g) lose Rust callers; DWARF stacks keep them.
#
# Scenarios whose setup is long (link: seeding and delivering LINK_POOL verifications) take a
# minute or more before the profile starts. Needs perf (linux-perf) and what load.sh needs.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
BENCH_TAG=profile
# shellcheck source=benches/lib.sh
source "$HERE/lib.sh"

SCEN=${1:?usage: benches/profile.sh create|half|check|get|link [output file]}
OUT=${2:-$PWD/perf-$SCEN.data}
PERF=${PERF:-record -F 2999 -g}
if [[ "$SCEN" == link ]]; then SECS=${SECS:-2}; else SECS=${SECS:-5}; fi
WARMUP=${WARMUP:-1}
THREAD=${THREAD:-}
command -v perf >/dev/null 2>&1 || die "perf is needed (apt-get install linux-perf)"

LOG=$(mktemp /tmp/verigate-profile.XXXXXX)
SCENARIOS=$SCEN "$HERE/load.sh" >"$LOG" 2>&1 &
LOAD=$!
trap 'kill "$LOAD" 2>/dev/null || true' EXIT

profiled=0
while kill -0 "$LOAD" 2>/dev/null; do
    if grep -q "wrk $SCEN-verigate:" "$LOG"; then
        sleep "$WARMUP"
        # load.sh runs its own copy of the binary from its temp dir.
        pid=$(pgrep -f 'verigate-load\.[^/]*/verigate serve' | head -1 || true)
        [[ -n "$pid" ]] || die "no verigate started by load.sh is running (see $LOG)"
        target=(-p "$pid")
        if [[ -n "$THREAD" ]]; then
            tid=""
            for t in /proc/"$pid"/task/*; do
                if [[ "$(cat "$t/comm" 2>/dev/null)" == "$THREAD"* ]]; then tid=${t##*/}; break; fi
            done
            [[ -n "$tid" ]] || die "verigate ($pid) has no thread named $THREAD*"
            target=(-t "$tid")
        fi
        log "perf $PERF ${target[*]} for $SECS s → $OUT"
        # shellcheck disable=SC2086 # PERF is a perf subcommand with its options, split on purpose
        perf $PERF "${target[@]}" -o "$OUT" -- sleep "$SECS" >/dev/null 2>&1 || log "perf exited non-zero"
        profiled=1
        break
    fi
    sleep 0.2
done
rc=0
wait "$LOAD" || rc=$?
trap - EXIT
cat "$LOG"
rm -f "$LOG"
(( rc == 0 )) || die "load.sh failed (exit $rc)"
(( profiled == 1 )) || die "the $SCEN-verigate run never started"
log "profile: $OUT"
