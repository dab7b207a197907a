"""A small Flask app that proves its users own their email addresses with verigate.

The three integration points with verigate are marked "VERIGATE" below:

1. start a verification (POST /v1/verifications) at sign-up and when the address changes;
2. receive verigate's signed callback (Standard Webhooks) and act on `verification.verified`;
3. optionally check a 6-digit code the user typed (POST /v1/verifications/check).

Everything else (users, sessions, SQLite) is ordinary app code, kept minimal.
Configuration comes from the environment, see README.md.
"""

import os
import sqlite3

import requests
from flask import Flask, abort, flash, g, jsonify, redirect, render_template_string, request, session, url_for
from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from werkzeug.security import check_password_hash, generate_password_hash

VERIGATE_API_URL = os.environ.get("VERIGATE_API_URL", "http://127.0.0.1:8026").rstrip("/")
VERIGATE_API_KEY = os.environ["VERIGATE_API_KEY"]
# The app's `webhook_secret` from verigate's [[apps]] table ("whsec_..."). Nothing else may
# produce a valid signature, so a verified callback really comes from verigate.
webhook = Webhook(os.environ["VERIGATE_WEBHOOK_SECRET"])
# This app's own external origin. When set, verigate's confirm button redirects the person back
# to APP_BASE_URL/verified; it must start with one of the app's `redirect_prefixes` in verigate.
APP_BASE_URL = os.environ.get("APP_BASE_URL", "").rstrip("/")
DATABASE = os.environ.get("DATABASE", "example.db")

app = Flask(__name__)
app.secret_key = os.environ.get("SECRET_KEY") or os.urandom(32)

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE COLLATE NOCASE,
    password_hash TEXT NOT NULL,
    email_verified INTEGER NOT NULL DEFAULT 0,
    signup_verification TEXT,      -- verigate id of the sign-up verification in flight
    pending_email TEXT,            -- the new address while an email change is unconfirmed
    pending_verification TEXT      -- verigate id of that email_change verification
);
CREATE TABLE IF NOT EXISTS webhook_events (id TEXT PRIMARY KEY);  -- webhook-id, for dedup
"""


def db():
    if "db" not in g:
        g.db = sqlite3.connect(DATABASE)
        g.db.row_factory = sqlite3.Row
    return g.db


@app.teardown_appcontext
def close_db(_exc):
    if (conn := g.pop("db", None)) is not None:
        conn.close()


with sqlite3.connect(DATABASE) as conn:
    conn.executescript(SCHEMA)


def current_user():
    if "user_id" not in session:
        return None
    return db().execute("SELECT * FROM users WHERE id = ?", (session["user_id"],)).fetchone()


# --- VERIGATE: the API client ----------------------------------------------------------------


class VerigateError(Exception):
    """An error answer of verigate: {"error": {"code", "message", ...}}."""

    def __init__(self, status, error):
        super().__init__(error.get("message", "verification service error"))
        self.status, self.code, self.error = status, error.get("code"), error


def verigate(path, body):
    r = requests.post(
        VERIGATE_API_URL + path,
        json=body,
        headers={"Authorization": f"Bearer {VERIGATE_API_KEY}"},
        timeout=10,
    )
    if r.status_code >= 400:
        raise VerigateError(r.status_code, r.json().get("error", {}))
    return r.json()


def start_verification(user_id, email, purpose):
    """Asks verigate to mail a link and a code to `email`. Returns verigate's answer (id, the
    normalized email, ...). Starting a new one for the same address and purpose makes the older
    link and code stop working, so "send it again" is simply another call."""
    body = {
        "email": email,
        "method": "link_and_code",
        "purpose": purpose,  # "signup" or "email_change": chooses the mail's wording
        "subject": str(user_id),  # our id for the person; echoed back in the callback
        "client_ip": request.remote_addr,  # lets verigate rate-limit per end user
    }
    if APP_BASE_URL:
        body["redirect_url"] = APP_BASE_URL + url_for("verified")
    return verigate("/v1/verifications", body)


def apply_verified(v):
    """Acts on a verified verification (from a callback or a code check); safe to repeat.
    Only the verification we are waiting for counts: a stale or foreign one changes nothing.
    The caller commits."""
    user = db().execute("SELECT * FROM users WHERE id = ?", (int(v.get("subject") or 0),)).fetchone()
    if user is None:
        return
    if v["purpose"] == "signup" and v["id"] == user["signup_verification"]:
        db().execute(
            "UPDATE users SET email_verified = 1, signup_verification = NULL WHERE id = ?", (user["id"],)
        )
    elif v["purpose"] == "email_change" and v["id"] == user["pending_verification"]:
        # Only now does the address change; until here the old one stayed in force.
        db().execute(
            "UPDATE users SET email = ?, email_verified = 1, pending_email = NULL, "
            "pending_verification = NULL WHERE id = ?",
            (v["email"], user["id"]),
        )


# --- VERIGATE: the callback -------------------------------------------------------------------


@app.post("/hooks/verigate")
def verigate_callback():
    # Verify the signature over the raw body bytes before trusting anything in it.
    try:
        event = webhook.verify(request.get_data(), dict(request.headers))
    except (WebhookVerificationError, ValueError):
        abort(400)
    # Delivery is at-least-once: the same webhook-id may arrive again; handle it once.
    try:
        db().execute("INSERT INTO webhook_events (id) VALUES (?)", (request.headers["webhook-id"],))
    except sqlite3.IntegrityError:
        return "", 204
    data = event["data"]
    if event["type"] == "verification.verified":
        apply_verified(data)
    elif event["type"] in ("verification.expired", "verification.locked", "verification.delivery_failed"):
        # The email change will never complete: forget it (the old address simply stays).
        db().execute(
            "UPDATE users SET pending_email = NULL, pending_verification = NULL WHERE pending_verification = ?",
            (data["id"],),
        )
    db().commit()
    return "", 204  # any 2xx acknowledges; anything else makes verigate retry


# --- Pages ------------------------------------------------------------------------------------

PAGE = """<!doctype html><meta charset="utf-8"><title>verigate example</title>
<nav><a href="/">Home</a> {% if user %}| {{ user.email }} | <a href="/account">Account</a>
| <form method="post" action="/logout" style="display:inline"><button>Log out</button></form>
{% else %}| <a href="/register">Register</a> | <a href="/login">Log in</a>{% endif %}</nav>
{% for m in get_flashed_messages() %}<p class="flash">{{ m }}</p>{% endfor %}
{{ body|safe }}"""


def page(body, **ctx):
    inner = render_template_string(body, **ctx)
    return render_template_string(PAGE, body=inner, user=current_user())


@app.get("/")
def home():
    return page("<h1>verigate example</h1>{% if not user %}<p>Register to try it.</p>{% endif %}",
                user=current_user())


CREDENTIALS_FORM = """<h1>{{ title }}</h1><form method="post">
<label>Email <input name="email" type="email" required></label>
<label>Password <input name="password" type="password" required></label>
<button>{{ title }}</button></form>"""


@app.route("/register", methods=["GET", "POST"])
def register():
    if request.method == "GET":
        return page(CREDENTIALS_FORM, title="Register")
    email, password = request.form["email"].strip(), request.form["password"]
    conn = db()
    try:
        cur = conn.execute(
            "INSERT INTO users (email, password_hash) VALUES (?, ?)", (email, generate_password_hash(password))
        )
        v = start_verification(cur.lastrowid, email, "signup")
    except sqlite3.IntegrityError:
        flash("That address already has an account.")
        return page(CREDENTIALS_FORM, title="Register"), 409
    except VerigateError as e:  # invalid_email, undeliverable_domain, rate_limited, ...
        conn.rollback()
        flash(str(e))
        return page(CREDENTIALS_FORM, title="Register"), 400 if e.status < 500 else 502
    # Keep verigate's normalized form of the address (e.g. lower-cased domain).
    conn.execute(
        "UPDATE users SET email = ?, signup_verification = ? WHERE id = ?", (v["email"], v["id"], cur.lastrowid)
    )
    conn.commit()
    session["user_id"] = cur.lastrowid
    flash(f"We sent a link and a code to {v['email']}.")
    return redirect(url_for("verify_code"))


@app.route("/login", methods=["GET", "POST"])
def login():
    if request.method == "GET":
        return page(CREDENTIALS_FORM, title="Log in")
    user = db().execute("SELECT * FROM users WHERE email = ?", (request.form["email"].strip(),)).fetchone()
    if user is None or not check_password_hash(user["password_hash"], request.form["password"]):
        flash("Wrong email or password.")
        return page(CREDENTIALS_FORM, title="Log in"), 401
    session["user_id"] = user["id"]
    return redirect(url_for("account"))


@app.post("/logout")
def logout():
    session.clear()
    return redirect(url_for("home"))


@app.get("/account")
def account():
    if (user := current_user()) is None:
        return redirect(url_for("login"))
    return page("""<h1>Your account</h1>
<p>Email: {{ u.email }} ({{ "verified" if u.email_verified else "not verified yet" }})</p>
{% if u.pending_email %}<p>Change to {{ u.pending_email }} waits for confirmation:
follow the link we mailed there, or <a href="/verify">enter the code</a>.</p>{% endif %}
<h2>Change your email address</h2><form method="post" action="/account/email">
<label>New address <input name="email" type="email" required></label><button>Send confirmation</button></form>""",
                u=user)


@app.post("/account/email")
def change_email():
    # A production app would also ask for the current password here.
    if (user := current_user()) is None:
        abort(401)
    new_email = request.form["email"].strip()
    if db().execute("SELECT 1 FROM users WHERE email = ?", (new_email,)).fetchone():
        flash("That address already has an account.")
        return redirect(url_for("account"))
    try:
        v = start_verification(user["id"], new_email, "email_change")
    except VerigateError as e:
        flash(str(e))
        return redirect(url_for("account"))
    # Remember what we are waiting for; the address itself does not change yet. A sign-up
    # verification of the old address still in flight must not verify the new one.
    db().execute(
        "UPDATE users SET pending_email = ?, pending_verification = ?, signup_verification = NULL WHERE id = ?",
        (v["email"], v["id"], user["id"]),
    )
    db().commit()
    flash(f"We sent a link and a code to {v['email']}. Your address changes once you confirm.")
    return redirect(url_for("verify_code"))


CODE_FORM = """<h1>Enter your code</h1><p>We mailed a 6-digit code to {{ email }}.</p>
<form method="post"><input name="code" inputmode="numeric" autocomplete="one-time-code" required>
<button>Verify</button></form>"""


@app.route("/verify", methods=["GET", "POST"])
def verify_code():
    if (user := current_user()) is None:
        return redirect(url_for("login"))
    # The verification the user is working on: an email change, else the sign-up.
    vid = user["pending_verification"] or user["signup_verification"]
    email = user["pending_email"] or user["email"]
    if vid is None:
        flash("Nothing to verify.")
        return redirect(url_for("account"))
    if request.method == "GET":
        return page(CODE_FORM, email=email)
    # VERIGATE: check the typed code. verigate counts every attempt and locks after too many.
    try:
        result = verigate(
            "/v1/verifications/check", {"id": vid, "code": request.form["code"], "client_ip": request.remote_addr}
        )
    except VerigateError as e:
        if e.code == "invalid_code":
            flash(f"That code is not right; {e.error.get('attempts_remaining')} attempts left.")
        else:  # expired, locked, superseded, ...: a new verification is needed
            flash(f"{e} Please request a new one.")
        return page(CODE_FORM, email=email), 400 if e.status < 500 else 502
    # 200 means verified: act now. The callback for the same verification follows and is a no-op.
    apply_verified(result)
    db().commit()
    flash("Your email address is confirmed.")
    return redirect(url_for("account"))


@app.get("/verified")
def verified():
    # verigate's confirm button redirects here with ?verification=...&status=... . The query is
    # not authenticated: it only picks the message. The state changed via the signed callback.
    ok = request.args.get("status") == "verified"
    return page("<h1>{{ msg }}</h1><p><a href='/account'>Continue</a></p>",
                msg="Thanks, your address is confirmed." if ok else "That link no longer works.")


@app.get("/api/me")
def me():
    """The logged-in user as JSON (used by the end-to-end test; handy for a front end)."""
    if (user := current_user()) is None:
        return jsonify(error="not logged in"), 401
    return jsonify(
        id=user["id"],
        email=user["email"],
        email_verified=bool(user["email_verified"]),
        pending_email=user["pending_email"],
    )


if __name__ == "__main__":
    app.run(host="127.0.0.1", port=int(os.environ.get("PORT", "8000")), threaded=True)
