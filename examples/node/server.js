// A small Express app that proves its users own their email addresses with verigate.
//
// The three integration points with verigate are marked "VERIGATE" below:
//  1. start a verification (POST /v1/verifications) at sign-up and when the address changes;
//  2. receive verigate's signed callback (Standard Webhooks) and act on `verification.verified`;
//  3. optionally check a 6-digit code the user typed (POST /v1/verifications/check).
// Everything else (users, sessions, pages) is ordinary app code, kept minimal and in memory.
// Configuration comes from the environment, see README.md.

import crypto from "node:crypto";
import express from "express";
import { Webhook } from "standardwebhooks";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`set ${name}`);
  return value;
};
const VERIGATE_API_URL = env("VERIGATE_API_URL", "http://127.0.0.1:8026").replace(/\/$/, "");
const VERIGATE_API_KEY = env("VERIGATE_API_KEY");
// The app's `webhook_secret` from verigate's [[apps]] table ("whsec_..."). Nothing else can
// produce a valid signature, so a verified callback really comes from verigate.
const webhook = new Webhook(env("VERIGATE_WEBHOOK_SECRET"));
// This app's own external origin. When set, verigate's confirm button redirects the person back
// to APP_BASE_URL/verified; it must start with one of the app's `redirect_prefixes` in verigate.
const APP_BASE_URL = env("APP_BASE_URL", "").replace(/\/$/, "");
const PORT = Number(env("PORT", "8000"));

// --- The store: in memory, for brevity ----------------------------------------------------------
// user: {id, email, passwordHash, emailVerified, signupVerification, pendingEmail, pendingVerification}
const users = new Map();
let nextUserId = 1;
const seenWebhookIds = new Set(); // webhook-id of handled callbacks (a database table in real life)
const sessions = new Map(); // session id -> {userId, flash: []}

const byEmail = (email) =>
  [...users.values()].find((u) => u.email.toLowerCase() === email.toLowerCase());

const hashPassword = (password, salt = crypto.randomBytes(16).toString("hex")) =>
  `${salt}:${crypto.scryptSync(password, salt, 32).toString("hex")}`;
const passwordMatches = (password, stored) => {
  const [salt, hash] = stored.split(":");
  return crypto.timingSafeEqual(Buffer.from(hash, "hex"), crypto.scryptSync(password, salt, 32));
};

// --- VERIGATE: the API client ---------------------------------------------------------------------

class VerigateError extends Error {
  // An error answer of verigate: {"error": {"code", "message", ...}}.
  constructor(status, error) {
    super(error.message ?? "verification service error");
    this.status = status;
    this.code = error.code;
    this.error = error;
  }
}

async function verigate(path, body) {
  const res = await fetch(VERIGATE_API_URL + path, {
    method: "POST",
    headers: { Authorization: `Bearer ${VERIGATE_API_KEY}`, "Content-Type": "application/json" },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(10_000),
  });
  const json = await res.json();
  if (!res.ok) throw new VerigateError(res.status, json.error ?? {});
  return json;
}

const clientIp = (req) => req.socket.remoteAddress?.replace(/^::ffff:/, "");

// Asks verigate to mail a link and a code to `email`. Returns verigate's answer (id, the
// normalized email, ...). A new one for the same address and purpose makes the older link and
// code stop working, so "send it again" is simply another call.
function startVerification(req, user, email, purpose) {
  const body = {
    email,
    method: "link_and_code",
    purpose, // "signup" or "email_change": chooses the mail's wording
    subject: String(user.id), // our id for the person; echoed back in the callback
    client_ip: clientIp(req), // lets verigate rate-limit per end user
  };
  if (APP_BASE_URL) body.redirect_url = `${APP_BASE_URL}/verified`;
  return verigate("/v1/verifications", body);
}

// Acts on a verified verification (from a callback or a code check); safe to repeat. Only the
// verification we are waiting for counts: a stale or foreign one changes nothing.
function applyVerified(v) {
  const user = users.get(Number(v.subject));
  if (!user) return;
  if (v.purpose === "signup" && v.id === user.signupVerification) {
    user.emailVerified = true;
    user.signupVerification = null;
  } else if (v.purpose === "email_change" && v.id === user.pendingVerification) {
    // Only now does the address change; until here the old one stayed in force.
    user.email = v.email;
    user.emailVerified = true;
    user.pendingEmail = user.pendingVerification = null;
  }
}

const app = express();

// --- VERIGATE: the callback -----------------------------------------------------------------------
// Registered before any body parser: the signature covers the raw bytes, so keep them raw.
app.post("/hooks/verigate", express.raw({ type: () => true }), (req, res) => {
  let event;
  try {
    const payload = Buffer.isBuffer(req.body) ? req.body : Buffer.alloc(0);
    event = webhook.verify(payload, req.headers);
  } catch {
    return res.status(400).send("bad signature");
  }
  // Delivery is at-least-once: the same webhook-id may arrive again; handle it once.
  const id = req.headers["webhook-id"];
  if (seenWebhookIds.has(id)) return res.sendStatus(204);
  seenWebhookIds.add(id);
  const data = event.data;
  if (event.type === "verification.verified") {
    applyVerified(data);
  } else if (
    ["verification.expired", "verification.locked", "verification.delivery_failed"].includes(event.type)
  ) {
    // The email change will never complete: forget it (the old address simply stays).
    for (const u of users.values()) {
      if (u.pendingVerification === data.id) u.pendingEmail = u.pendingVerification = null;
    }
  }
  res.sendStatus(204); // any 2xx acknowledges; anything else makes verigate retry
});

app.use(express.urlencoded({ extended: false }));

// --- Sessions and pages ---------------------------------------------------------------------------

app.use((req, res, next) => {
  const sid = /(?:^|;\s*)sid=([^;]+)/.exec(req.headers.cookie ?? "")?.[1];
  req.session = sessions.get(sid);
  if (!req.session) {
    const newSid = crypto.randomBytes(24).toString("base64url");
    req.session = { flash: [] };
    sessions.set(newSid, req.session);
    res.setHeader("Set-Cookie", `sid=${newSid}; Path=/; HttpOnly; SameSite=Lax`);
  }
  req.user = users.get(req.session.userId);
  next();
});

const esc = (s) =>
  String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const flash = (req, message) => req.session.flash.push(message);

function page(req, res, body, status = 200) {
  const nav = req.user
    ? `${esc(req.user.email)} | <a href="/account">Account</a> |
       <form method="post" action="/logout" style="display:inline"><button>Log out</button></form>`
    : `<a href="/register">Register</a> | <a href="/login">Log in</a>`;
  const messages = req.session.flash.splice(0).map((m) => `<p class="flash">${esc(m)}</p>`).join("");
  res.status(status).type("html").send(`<!doctype html><meta charset="utf-8"><title>verigate example</title>
<nav><a href="/">Home</a> | ${nav}</nav>${messages}${body}`);
}

const credentialsForm = (title) => `<h1>${title}</h1><form method="post">
<label>Email <input name="email" type="email" required></label>
<label>Password <input name="password" type="password" required></label>
<button>${title}</button></form>`;

app.get("/", (req, res) => page(req, res, `<h1>verigate example</h1>${req.user ? "" : "<p>Register to try it.</p>"}`));

app.get("/register", (req, res) => page(req, res, credentialsForm("Register")));
app.post("/register", async (req, res) => {
  const email = String(req.body.email ?? "").trim();
  if (byEmail(email)) {
    flash(req, "That address already has an account.");
    return page(req, res, credentialsForm("Register"), 409);
  }
  const user = {
    id: nextUserId++, email, passwordHash: hashPassword(String(req.body.password ?? "")),
    emailVerified: false, signupVerification: null, pendingEmail: null, pendingVerification: null,
  };
  let v;
  try {
    v = await startVerification(req, user, email, "signup");
  } catch (e) {
    if (!(e instanceof VerigateError)) throw e;
    flash(req, e.message); // invalid_email, undeliverable_domain, rate_limited, ...
    return page(req, res, credentialsForm("Register"), e.status < 500 ? 400 : 502);
  }
  // Keep verigate's normalized form of the address (e.g. lower-cased domain).
  Object.assign(user, { email: v.email, signupVerification: v.id });
  users.set(user.id, user);
  req.session.userId = user.id;
  flash(req, `We sent a link and a code to ${v.email}.`);
  res.redirect(303, "/verify");
});

app.get("/login", (req, res) => page(req, res, credentialsForm("Log in")));
app.post("/login", (req, res) => {
  const user = byEmail(String(req.body.email ?? "").trim());
  if (!user || !passwordMatches(String(req.body.password ?? ""), user.passwordHash)) {
    flash(req, "Wrong email or password.");
    return page(req, res, credentialsForm("Log in"), 401);
  }
  req.session.userId = user.id;
  res.redirect(303, "/account");
});

app.post("/logout", (req, res) => {
  req.session.userId = undefined;
  res.redirect(303, "/");
});

app.get("/account", (req, res) => {
  const u = req.user;
  if (!u) return res.redirect("/login");
  page(req, res, `<h1>Your account</h1>
<p>Email: ${esc(u.email)} (${u.emailVerified ? "verified" : "not verified yet"})</p>
${u.pendingEmail ? `<p>Change to ${esc(u.pendingEmail)} waits for confirmation: follow the link we mailed there,
or <a href="/verify">enter the code</a>.</p>` : ""}
<h2>Change your email address</h2><form method="post" action="/account/email">
<label>New address <input name="email" type="email" required></label><button>Send confirmation</button></form>`);
});

app.post("/account/email", async (req, res) => {
  // A production app would also ask for the current password here.
  const user = req.user;
  if (!user) return res.sendStatus(401);
  const newEmail = String(req.body.email ?? "").trim();
  if (byEmail(newEmail)) {
    flash(req, "That address already has an account.");
    return res.redirect(303, "/account");
  }
  let v;
  try {
    v = await startVerification(req, user, newEmail, "email_change");
  } catch (e) {
    if (!(e instanceof VerigateError)) throw e;
    flash(req, e.message);
    return res.redirect(303, "/account");
  }
  // Remember what we are waiting for; the address itself does not change yet. A sign-up
  // verification of the old address still in flight must not verify the new one.
  Object.assign(user, { pendingEmail: v.email, pendingVerification: v.id, signupVerification: null });
  flash(req, `We sent a link and a code to ${v.email}. Your address changes once you confirm.`);
  res.redirect(303, "/verify");
});

const codeForm = (email) => `<h1>Enter your code</h1><p>We mailed a 6-digit code to ${esc(email)}.</p>
<form method="post"><input name="code" inputmode="numeric" autocomplete="one-time-code" required>
<button>Verify</button></form>`;

// The verification the user is working on: an email change, else the sign-up.
const inFlight = (u) =>
  u.pendingVerification
    ? { id: u.pendingVerification, email: u.pendingEmail }
    : u.signupVerification && { id: u.signupVerification, email: u.email };

app.get("/verify", (req, res) => {
  if (!req.user) return res.redirect("/login");
  const v = inFlight(req.user);
  if (!v) {
    flash(req, "Nothing to verify.");
    return res.redirect("/account");
  }
  page(req, res, codeForm(v.email));
});

app.post("/verify", async (req, res) => {
  if (!req.user) return res.redirect(303, "/login");
  const v = inFlight(req.user);
  if (!v) return res.redirect(303, "/account");
  let result;
  try {
    // VERIGATE: check the typed code. verigate counts every attempt and locks after too many.
    result = await verigate("/v1/verifications/check", {
      id: v.id, code: String(req.body.code ?? ""), client_ip: clientIp(req),
    });
  } catch (e) {
    if (!(e instanceof VerigateError)) throw e;
    if (e.code === "invalid_code") {
      flash(req, `That code is not right; ${e.error.attempts_remaining} attempts left.`);
    } else {
      flash(req, `${e.message}. Please request a new one.`); // expired, locked, superseded, ...
    }
    return page(req, res, codeForm(v.email), e.status < 500 ? 400 : 502);
  }
  // 200 means verified: act now. The callback for the same verification follows and is a no-op.
  applyVerified(result);
  flash(req, "Your email address is confirmed.");
  res.redirect(303, "/account");
});

// verigate's confirm button redirects here with ?verification=...&status=... . The query is not
// authenticated: it only picks the message. The state changed through the signed callback.
app.get("/verified", (req, res) => {
  const ok = req.query.status === "verified";
  page(req, res, `<h1>${ok ? "Thanks, your address is confirmed." : "That link no longer works."}</h1>
<p><a href="/account">Continue</a></p>`);
});

// The logged-in user as JSON (used by the end-to-end test; handy for a front end).
app.get("/api/me", (req, res) => {
  const u = req.user;
  if (!u) return res.status(401).json({ error: "not logged in" });
  res.json({ id: u.id, email: u.email, email_verified: u.emailVerified, pending_email: u.pendingEmail });
});

app.listen(PORT, "127.0.0.1", () => console.log(`example app on http://127.0.0.1:${PORT}`));
