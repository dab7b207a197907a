"""End-to-end test of the Flask example against a live verigate daemon.

Starts the real verigate binary ($VERIGATE_BIN, default target/release/verigate of this repo)
with a temporary data dir, the `file` mail transport and an app whose callback URL points at
the example, then starts the example (app.py) and drives both over HTTP like a browser would.

    pip install -r requirements.txt pytest && python -m pytest -v test_e2e.py
"""

import base64
import email
import email.policy
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import requests
from standardwebhooks.webhooks import Webhook

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
API_KEY = "example-api-key-" + secrets.token_hex(8)
WEBHOOK_SECRET = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
TIMEOUT = 15  # seconds to wait for a mail or a callback


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what, fn, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


class Proc:
    """A child process whose output is collected (and shown when a test fails)."""

    def __init__(self, name, args, **kw):
        self.name, self.lines = name, []
        self.p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        for line in self.p.stdout:
            self.lines.append(line.rstrip("\n"))

    def log(self):
        return f"--- {self.name} output ---\n" + "\n".join(self.lines[-60:])

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    binary = Path(os.environ.get("VERIGATE_BIN", REPO / "target/release/verigate")).resolve()
    assert binary.exists(), f"verigate binary not found at {binary} (set VERIGATE_BIN)"
    public_port, api_port, app_port = free_port(), free_port(), free_port()
    app_url = f"http://127.0.0.1:{app_port}"
    data_dir = tmp / "verigate"
    config = tmp / "verigate.toml"
    config.write_text(f"""
data_dir = "{data_dir}"
public_base_url = "http://127.0.0.1:{public_port}"
[listen]
api = "127.0.0.1:{api_port}"
public = "127.0.0.1:{public_port}"
[delivery]
transport = "file"
[dns]
check_on_create = false   # no network in CI; example.com needs no MX lookup here
[log]
level = "warn"
[[apps]]
id = "example"
api_keys = ["{API_KEY}"]
callback_url = "{app_url}/hooks/verigate"
webhook_secret = "{WEBHOOK_SECRET}"
redirect_prefixes = ["{app_url}/"]
""")
    # VERIGATE_* variables would override the file (and VERIGATE_BIN is no config key).
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("VERIGATE_")}
    procs = []
    try:
        daemon = Proc("verigate", [str(binary), "serve", "--config", str(config)],
                      env=clean_env)
        procs.append(daemon)
        wait_for("verigate to listen", lambda: any("verigate: api on" in l for l in daemon.lines)
                 or daemon.p.poll() is not None)
        assert daemon.p.poll() is None, daemon.log()
        app = Proc("app", [sys.executable, str(HERE / "app.py")], cwd=tmp, env={
            **clean_env,
            "PORT": str(app_port),
            "APP_BASE_URL": app_url,
            "DATABASE": str(tmp / "app.db"),
            "VERIGATE_API_URL": f"http://127.0.0.1:{api_port}",
            "VERIGATE_API_KEY": API_KEY,
            "VERIGATE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        })
        procs.append(app)

        def app_up():
            assert app.p.poll() is None, app.log()
            try:
                return requests.get(app_url + "/", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for("the example app to listen", app_up)
        yield {
            "app": app_url,
            "api": f"http://127.0.0.1:{api_port}",
            "mail_dir": data_dir / "mail",
            "procs": procs,
        }
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(autouse=True)
def show_logs(env):
    yield
    # pytest shows this only for a failing test ("Captured stdout teardown").
    for p in env["procs"]:
        print(p.log())


# --- helpers ----------------------------------------------------------------------------------


def read_mail(env, to, purpose_subject=None):
    """Waits for verigate's .eml to `to`; returns (verification id, link, code, subject)."""

    def find():
        if not env["mail_dir"].is_dir():
            return None
        for path in sorted(env["mail_dir"].glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True):
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            if msg["To"].addresses[0].addr_spec.lower() != to.lower():
                continue
            if purpose_subject and msg["Subject"] != purpose_subject:
                continue
            text = msg.get_body(preferencelist=("plain",)).get_content()
            link = re.search(r"http://\S+/v/\S+", text).group(0)
            code = re.search(r"code: (\d{6})", text).group(1)
            # Message-ID: <vrf_....msg_...@host>: the verification id, for the forged callbacks.
            vid = re.match(r"<(vrf_[0-9A-Za-z]+)\.", msg["Message-ID"]).group(1)
            return vid, link, code, msg["Subject"]
        return None

    return wait_for(f"a mail to {to}", find)


def register(env, address, password="correct horse battery"):
    s = requests.Session()
    r = s.post(env["app"] + "/register", data={"email": address, "password": password})
    assert r.status_code == 200 and "Enter your code" in r.text, r.text
    return s


def me(env, s):
    r = s.get(env["app"] + "/api/me")
    assert r.status_code == 200, r.text
    return r.json()


def confirm_by_link(env, link):
    # What a person does: open the link (a page with one button; it changes nothing) ...
    r = requests.get(link)
    assert r.status_code == 200 and 'method="post"' in r.text, r.text
    # ... and press the button: POST to the same URL, which 303s back to the app.
    r = requests.post(link, allow_redirects=False)
    assert r.status_code == 303, (r.status_code, r.text)
    location = r.headers["Location"]
    assert location.startswith(env["app"] + "/verified?"), location
    assert "status=verified" in location, location
    landing = requests.get(location)
    assert landing.status_code == 200 and "confirmed" in landing.text
    return location


def daemon_view(env, vid):
    r = requests.get(f"{env['api']}/v1/verifications/{vid}", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def post_callback(env, body, headers):
    return requests.post(env["app"] + "/hooks/verigate", data=body,
                         headers={"content-type": "application/json", **headers})


def signed_headers(secret, msg_id, body, when=None):
    when = when or datetime.now(timezone.utc)
    sig = Webhook(secret).sign(msg_id, when, body)
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())), "webhook-signature": sig}


# --- tests ------------------------------------------------------------------------------------


def test_signup_is_verified_by_the_link_and_the_callback(env):
    s = register(env, "alice@example.com")
    assert me(env, s)["email_verified"] is False

    vid, link, _code, subject = read_mail(env, "alice@example.com")
    assert subject == "Confirm your email address"
    requests.get(link)  # a mail scanner fetching the link verifies nothing
    time.sleep(0.3)
    assert me(env, s)["email_verified"] is False
    assert daemon_view(env, vid)["status"] == "pending"

    confirm_by_link(env, link)
    # The app learns it from verigate's signed callback, a moment later.
    wait_for("the verified callback", lambda: me(env, s)["email_verified"])
    wait_for("verigate to record the callback as delivered",
             lambda: (daemon_view(env, vid).get("callback") or {}).get("status") == "delivered")
    assert daemon_view(env, vid)["status"] == "verified"


def test_signup_by_code(env):
    s = register(env, "bob@example.com")
    _vid, _link, code, _ = read_mail(env, "bob@example.com")
    wrong = "000000" if code != "000000" else "111111"
    r = s.post(env["app"] + "/verify", data={"code": wrong})
    assert r.status_code == 400 and "attempts left" in r.text, r.text
    assert me(env, s)["email_verified"] is False
    r = s.post(env["app"] + "/verify", data={"code": code})
    assert r.status_code == 200 and "is confirmed" in r.text, r.text
    assert me(env, s)["email_verified"] is True  # at once: the check answered "verified"


def test_email_change_waits_for_the_link(env):
    s = requests.Session()
    r = s.post(env["app"] + "/login", data={"email": "alice@example.com", "password": "correct horse battery"})
    assert r.status_code == 200, r.text
    assert me(env, s)["email_verified"] is True

    r = s.post(env["app"] + "/account/email", data={"email": "alice.new@example.com"})
    assert r.status_code == 200, r.text
    state = me(env, s)
    assert state["email"] == "alice@example.com"  # not yet
    assert state["pending_email"] == "alice.new@example.com"

    vid, link, _code, subject = read_mail(env, "alice.new@example.com")
    assert subject == "Confirm your new email address"
    assert daemon_view(env, vid)["purpose"] == "email_change"
    requests.get(link)  # opening the page alone changes nothing
    time.sleep(0.3)
    assert me(env, s)["email"] == "alice@example.com"

    confirm_by_link(env, link)
    wait_for("the email change", lambda: me(env, s)["email"] == "alice.new@example.com")
    assert me(env, s)["pending_email"] is None
    # The new address logs in; the old one no longer does.
    ok = requests.post(env["app"] + "/login", data={"email": "alice.new@example.com", "password": "correct horse battery"})
    assert ok.status_code == 200
    old = requests.post(env["app"] + "/login", data={"email": "alice@example.com", "password": "correct horse battery"})
    assert old.status_code == 401


def test_email_change_by_code(env):
    s = register(env, "carol@example.com")
    _vid, _link, code, _ = read_mail(env, "carol@example.com")
    assert s.post(env["app"] + "/verify", data={"code": code}).status_code == 200

    s.post(env["app"] + "/account/email", data={"email": "carol.new@example.com"})
    _vid, _link, code, _ = read_mail(env, "carol.new@example.com", "Confirm your new email address")
    wrong = "000000" if code != "000000" else "111111"
    assert s.post(env["app"] + "/verify", data={"code": wrong}).status_code == 400
    assert me(env, s)["email"] == "carol@example.com"
    r = s.post(env["app"] + "/verify", data={"code": code})
    assert r.status_code == 200, r.text
    assert me(env, s)["email"] == "carol.new@example.com"


def test_callbacks_with_bad_signatures_are_refused(env):
    s = register(env, "dave@example.com")
    vid, _link, _code, _ = read_mail(env, "dave@example.com")
    body = (
        '{"type":"verification.verified","timestamp":"2026-01-01T00:00:00Z","data":'
        f'{{"id":"{vid}","email":"dave@example.com","purpose":"signup","subject":"{me(env, s)["id"]}",'
        '"metadata":null,"status":"verified","method":"link_and_code","verified_at":"2026-01-01T00:00:00Z"}}'
    )
    other_secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    good = signed_headers(WEBHOOK_SECRET, "msg_forged1", body)
    bad_cases = {
        "no signature headers": {},
        "signed with another secret": signed_headers(other_secret, "msg_forged1", body),
        "garbage signature": {**good, "webhook-signature": "v1,not-base64!!"},
        "malformed signature": {**good, "webhook-signature": "nonsense"},
        "signature of another body": signed_headers(WEBHOOK_SECRET, "msg_forged1", body.replace("dave", "eve")),
        "another webhook-id": {**good, "webhook-id": "msg_forged2"},
        "stale timestamp": signed_headers(WEBHOOK_SECRET, "msg_forged1", body,
                                          datetime.now(timezone.utc) - timedelta(minutes=10)),
    }
    for name, headers in bad_cases.items():
        r = post_callback(env, body, headers)
        assert r.status_code in (400, 401), (name, r.status_code, r.text)
    assert me(env, s)["email_verified"] is False
    # Control: the same request with a genuine signature is accepted, so the refusals above
    # were the signature check at work.
    assert post_callback(env, body, good).status_code == 204
    assert me(env, s)["email_verified"] is True
