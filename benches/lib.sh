# shellcheck shell=bash
# Helpers shared by benches/load.sh, delivery.sh and backlog.sh; sourced, never run.
# The sourcing script sets BENCH_TAG (its name in log lines) first.

log() { printf '[%s %s] %s\n' "$BENCH_TAG" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Whether something listens on 127.0.0.1:PORT.
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# CPU accounting: a process's own CPU time (utime + stime, in clock ticks), and the whole
# machine's busy ticks, so that a run disturbed by other work shows up in the report.
proc_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat" 2>/dev/null || echo 0; }
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9; exit }' /proc/stat; }

# pid field → a /proc/PID/status value in KiB (VmRSS, VmHWM); 0 when the process is gone.
status_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }

# "k=v k=v" key → value ("?" when absent): reads the Lua scripts' RESULT lines.
kv() {
    local x
    for x in $1; do [[ "$x" == "$2="* ]] && { echo "${x#*=}"; return; }; done
    echo "?"
}

# The config tables every benchmark ends with, for the API key $1:
#  - no DNS check on create: there is no network here, and the resolver is not what is measured;
#  - log level warn;
#  - every rate limit off: all addresses share example.com and all traffic is one app, so the
#    limits would turn each benchmark into a measurement of the limiter;
#  - the one app.
bench_config_tail() {
    cat <<EOF

[dns]
check_on_create = false

[log]
level = "warn"

[limits]
per_address = []
per_domain = []
per_client_ip = []
per_app = []
code_checks_per_client_ip = []
code_checks_per_verification = []

[[apps]]
id = "bench"
api_keys = ["$1"]
EOF
}
