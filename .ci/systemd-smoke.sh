#!/usr/bin/env bash
# Runs systemd/verigate.service, hardening and all, under a real systemd and drives the daemon.
#
#     .ci/systemd-smoke.sh [VERIGATE_BINARY]     # default target/release/verigate
#
# Optional (not part of .ci/static.sh): needs root, overlayfs and systemd-nspawn (installed from
# Debian's systemd-container if missing), and works where systemd is not PID 1. It boots this
# machine's own OS in a container: the root is an overlay of / with a tmpfs on top (nothing on
# the host changes), the network is private (only the container's loopback is used), and the
# services the host enables are masked. Inside, verigate.service runs exactly as shipped plus one
# drop-in, SystemCallErrorNumber= (empty: a system call outside the filter kills the daemon
# instead of returning EPERM, so a missing one cannot go unnoticed). A driver unit then starts
# a local SMTP relay (with AUTH), a DNS server and a webhook receiver and checks: /readyz; the
# SMTP password from LoadCredential= reaches the relay; a verification is created (DNS over UDP,
# truncated, then TCP), mailed, verified with its code and called back; the process runs as a
# dynamic non-root user without capabilities, with no_new_privs and a seccomp filter; SIGTERM
# stops it cleanly; after a restart the store still has the verification.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
bin=${1:-target/release/verigate}
[[ $bin = /* ]] || bin="$repo/$bin"
[[ -x $bin ]] || { echo "smoke: no verigate binary at $bin" >&2; exit 2; }
[[ $(id -u) = 0 ]] || { echo "smoke: needs root (mounts, systemd-nspawn)" >&2; exit 2; }
if ! command -v systemd-nspawn >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd-container >/dev/null
fi

work=$(mktemp -d /tmp/verigate-smoke.XXXXXX)
lower=$work/lower rw=$work/rw root=$work/root out=$work/out
mkdir -p "$lower" "$rw" "$root" "$out"
nspawn_pid=
cleanup() {
    [[ -n $nspawn_pid ]] && kill "$nspawn_pid" 2>/dev/null && sleep 3
    umount "$root" 2>/dev/null || true
    umount "$rw" 2>/dev/null || true
    umount "$lower" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Overlay of / (without its submounts) under a tmpfs; /dev hidden (nspawn wants it empty).
mount --bind / "$lower"
mount -t tmpfs -o size=1g tmpfs "$rw"
mkdir -p "$rw/upper/dev" "$rw/work"
python3 -c "import os, sys; os.setxattr(sys.argv[1], 'trusted.overlay.opaque', b'y')" "$rw/upper/dev"
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$rw/upper,workdir=$rw/work" "$root"

python3 -c 'import uuid; print(uuid.uuid4().hex)' >"$root/etc/machine-id"
for wants in "$root"/etc/systemd/system/*.wants; do
    for u in "$wants"/*; do
        [[ -e $u || -L $u ]] || continue
        rm -f "$u"
        ln -sf /dev/null "$root/etc/systemd/system/$(basename "$u")"
    done
done
for u in getty@tty1.service console-getty.service; do ln -sf /dev/null "$root/etc/systemd/system/$u"; done

exec_start=$(sed -nE 's/^ExecStart=[-@:+!]*([^ ]+).*/\1/p' systemd/verigate.service | head -1)
mkdir -p "$root$(dirname "$exec_start")"
cp "$bin" "$root$exec_start"
cp systemd/verigate.service "$root/etc/systemd/system/"
mkdir -p "$root/etc/systemd/system/verigate.service.d"
printf '[Service]\nSystemCallErrorNumber=\n' >"$root/etc/systemd/system/verigate.service.d/smoke.conf"
ln -sf /etc/systemd/system/verigate.service "$root/etc/systemd/system/multi-user.target.wants/verigate.service"

keys=$("$bin" keys generate)
val() { sed -nE "s/^$1 = \"(.*)\"/\\1/p" <<<"$keys"; }
mkdir -p "$root/etc/verigate/credentials" "$root/opt/smoke"
chmod 700 "$root/etc/verigate/credentials"
(umask 077; val signing_key >"$root/etc/verigate/credentials/signing-keys"
 echo "smoke-password" >"$root/etc/verigate/credentials/smtp-password")
val api_key >"$root/opt/smoke/api-key"
cat >"$root/etc/verigate/config.toml" <<EOF
[signing]
keys_file = "/run/credentials/verigate.service/signing-keys"
[delivery]
transport = "smtp"
from = "Smoke <no-reply@example.com>"
[smtp]
host = "localhost"
port = 2525
tls = "none"
username = "smoke"
password_file = "/run/credentials/verigate.service/smtp-password"
[address]
test_environment = true
[dns]
nameservers = ["127.0.0.1:5353"]
[[apps]]
id = "smoke"
api_keys = ["$(val api_key_config)"]
callback_url = "http://127.0.0.1:8000/hook"
webhook_secret = "$(val webhook_secret)"
EOF
chmod 644 "$root/etc/verigate/config.toml"

cat >"$root/etc/systemd/system/verigate-smoke.service" <<'EOF'
[Unit]
Description=verigate smoke driver
Before=verigate.service
[Service]
Type=simple
ExecStart=/usr/bin/python3 /opt/smoke/driver.py
ExecStopPost=/usr/bin/systemctl --no-block poweroff
EOF
ln -sf /etc/systemd/system/verigate-smoke.service "$root/etc/systemd/system/multi-user.target.wants/verigate-smoke.service"

cat >"$root/opt/smoke/driver.py" <<'EOF'
import asyncio, base64, email, json, re, socket, struct, subprocess, threading, time, urllib.request

seen = {"auth": None, "mails": [], "dns": [], "hooks": []}
results = {}

def sh(*a):
    return subprocess.run(a, capture_output=True, text=True).stdout.strip()

async def smtp(r, w):
    def send(s): w.write((s + "\r\n").encode())
    send("220 smoke ESMTP"); await w.drain()
    while line := await r.readline():
        cmd = line.decode().strip(); up = cmd.upper()
        if up.startswith(("EHLO", "HELO")): send("250-smoke"); send("250 AUTH PLAIN LOGIN")
        elif up.startswith("AUTH PLAIN"):
            cred = cmd.split()[2] if len(cmd.split()) > 2 else None
            if cred is None: send("334 "); await w.drain(); cred = (await r.readline()).decode().strip()
            seen["auth"] = base64.b64decode(cred).split(b"\0")[-1].decode(); send("235 ok")
        elif up.startswith("AUTH LOGIN"):
            send("334 VXNlcm5hbWU6"); await w.drain(); await r.readline(); send("334 UGFzc3dvcmQ6"); await w.drain()
            seen["auth"] = base64.b64decode((await r.readline()).strip()).decode(); send("235 ok")
        elif up == "DATA":
            send("354 go"); await w.drain(); data = b""
            while (l := await r.readline()) not in (b".\r\n", b""): data += l
            seen["mails"].append(data); send("250 queued")
        elif up == "QUIT": send("221 bye"); await w.drain(); break
        else: send("250 ok")
        await w.drain()
    w.close()

def dns():
    def reply(q, flags):
        i = 12
        while q[i]: i += q[i] + 1
        return q[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + q[12:i + 5]
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("127.0.0.1", 5353))
    t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("127.0.0.1", 5353)); t.listen()
    def udp():
        while True:
            q, a = u.recvfrom(4096); seen["dns"].append("udp"); u.sendto(reply(q, 0x8380), a)  # TC: use TCP
    def tcp():
        while True:
            c, _ = t.accept(); n = struct.unpack(">H", c.recv(2))[0]; q = c.recv(n); seen["dns"].append("tcp")
            r = reply(q, 0x8182)  # SERVFAIL: dns.on_failure = "accept"
            c.sendall(struct.pack(">H", len(r)) + r); c.close()
    threading.Thread(target=udp, daemon=True).start(); threading.Thread(target=tcp, daemon=True).start()

def hooks():
    import http.server
    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            seen["hooks"].append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
            self.send_response(204); self.end_headers()
        def log_message(self, *a): pass
    threading.Thread(target=http.server.HTTPServer(("127.0.0.1", 8000), H).serve_forever, daemon=True).start()

def api(method, path, body=None):
    key = open("/opt/smoke/api-key").read().strip()
    req = urllib.request.Request("http://127.0.0.1:8026" + path, method=method,
                                 data=json.dumps(body).encode() if body else None,
                                 headers={"Authorization": "Bearer " + key, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r: return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e: return e.code, e.read().decode()
    except OSError as e: return 0, str(e)

def wait(cond, secs=20):
    end = time.time() + secs
    while time.time() < end:
        if cond(): return True
        time.sleep(0.3)
    return False

def check(name, ok, detail=""):
    results[name] = {"ok": bool(ok), "detail": str(detail)[:300]}

def drive():
    check("readyz", wait(lambda: api("GET", "/readyz")[0] == 200, 30), api("GET", "/readyz"))
    check("credential reaches relay", seen["auth"] == "smoke-password", seen["auth"])
    pid = sh("systemctl", "show", "-p", "MainPID", "--value", "verigate.service")
    status = dict(l.split(":", 1) for l in open(f"/proc/{pid}/status").read().splitlines() if ":" in l)
    st = {k: status[k].strip() for k in ("Uid", "CapEff", "CapBnd", "NoNewPrivs", "Seccomp")}
    check("sandbox", st["Uid"].split()[0] != "0" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
          and st["NoNewPrivs"] == "1" and st["Seccomp"] == "2", st)
    code, v = api("POST", "/v1/verifications", {"email": "smoke@smoke.test", "method": "code"})
    check("create (DNS udp+tcp)", code == 202 and "udp" in seen["dns"] and "tcp" in seen["dns"], (code, v, seen["dns"]))
    check("mail sent", wait(lambda: seen["mails"]), len(seen["mails"]))
    if code == 202 and seen["mails"]:
        m = email.message_from_bytes(seen["mails"][-1])
        text = next(p.get_payload(decode=True).decode() for p in m.walk() if p.get_content_type() == "text/plain")
        c = re.search(r"\b\d{6}\b", text).group(0)
        code2, r = api("POST", "/v1/verifications/check", {"id": v["id"], "code": c})
        check("code verified", code2 == 200 and r["status"] == "verified", r)
        check("callback", wait(lambda: any(h.get("type") == "verification.verified" for h in seen["hooks"])), seen["hooks"])
        sh("systemctl", "stop", "verigate.service")
        res = sh("systemctl", "show", "-p", "Result,ExecMainStatus", "verigate.service")
        check("clean stop", "Result=success" in res and "ExecMainStatus=0" in res, res)
        sh("systemctl", "start", "verigate.service")
        wait(lambda: api("GET", "/healthz")[0] == 200)
        code3, r3 = api("GET", "/v1/verifications/" + v["id"])
        check("persisted across restart", code3 == 200 and r3.get("status") == "verified", (code3, r3))
    restarts = sh("systemctl", "show", "-p", "NRestarts", "--value", "verigate.service")
    check("no crash or restart", restarts == "0", "NRestarts=" + restarts)

async def main():
    dns(); hooks()
    server = await asyncio.start_server(smtp, "127.0.0.1", 2525)
    sh("systemctl", "start", "--no-block", "verigate.service")
    try:
        await asyncio.to_thread(drive)
    finally:
        results["journal"] = sh("journalctl", "-b", "-u", "verigate.service", "--no-pager", "-o", "cat")[-4000:]
        json.dump(results, open("/out/result.json", "w"), indent=1)
        server.close()

asyncio.run(main())
EOF

echo "== booting $(sed -nE 's/^PRETTY_NAME="?([^"]*)"?/\1/p' /etc/os-release) in a container (private network)"
systemd-nspawn -q -D "$root" --register=no --keep-unit --private-network --bind="$out:/out" -b \
    >"$work/boot.log" 2>&1 </dev/null &
nspawn_pid=$!
for _ in $(seq 180); do
    kill -0 "$nspawn_pid" 2>/dev/null || break
    sleep 1
done
if kill -0 "$nspawn_pid" 2>/dev/null; then
    echo "smoke: the container did not finish in 180 s"
fi
wait "$nspawn_pid" 2>/dev/null || true
nspawn_pid=
if [[ ! -f $out/result.json ]]; then
    echo "smoke: no result; container log:"; tail -40 "$work/boot.log"; exit 1
fi
python3 - "$out/result.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
journal = r.pop("journal", "")
bad = [k for k, v in r.items() if not v["ok"]]
for k, v in r.items():
    print(f"{'ok  ' if v['ok'] else 'FAIL'} {k}" + ("" if v["ok"] else f": {v['detail']}"))
if bad or len(r) < 10:
    print("-- verigate.service journal --\n" + journal)
    print(f"smoke: FAILED ({len(bad)} of {len(r)} checks)")
    sys.exit(1)
print(f"smoke: the hardened unit runs verigate ({len(r)} checks)")
EOF
