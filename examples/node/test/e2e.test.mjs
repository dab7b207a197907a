// End-to-end test of the Node example against a live verigate daemon.
//
// Starts the real verigate binary ($VERIGATE_BIN, default target/release/verigate of this repo)
// with a temporary data dir, the `file` mail transport and an app whose callback URL points at
// the example, then starts the example (server.js) and drives both over HTTP like a browser.
//
//     npm ci && node --test test/e2e.test.mjs

import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import crypto from "node:crypto";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { Webhook } from "standardwebhooks";

const HERE = path.dirname(fileURLToPath(import.meta.url));
const EXAMPLE = path.resolve(HERE, "..");
const REPO = path.resolve(EXAMPLE, "../..");
const API_KEY = `example-api-key-${crypto.randomBytes(8).toString("hex")}`;
const newSecret = () => `whsec_${crypto.randomBytes(32).toString("base64")}`;
const WEBHOOK_SECRET = newSecret();
const TIMEOUT_MS = 15_000; // to wait for a mail or a callback
const PASSWORD = "correct horse battery";

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function waitFor(what, fn, timeoutMs = TIMEOUT_MS) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await fn();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

const freePort = () =>
  new Promise((resolve, reject) => {
    const srv = net.createServer().listen(0, "127.0.0.1", () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
    srv.on("error", reject);
  });

// A child process whose output is collected (and printed when something fails).
class Proc {
  constructor(name, cmd, args, opts) {
    this.name = name;
    this.output = "";
    this.child = spawn(cmd, args, { ...opts, stdio: ["ignore", "pipe", "pipe"] });
    for (const s of [this.child.stdout, this.child.stderr]) s.on("data", (d) => (this.output += d));
    this.exited = new Promise((r) => this.child.on("exit", r));
  }
  alive() {
    return this.child.exitCode === null && this.child.signalCode === null;
  }
  async stop() {
    if (!this.alive()) return;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 10_000);
    await this.exited;
    clearTimeout(timer);
  }
}

const ctx = {};
const procs = [];

before(async () => {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "verigate-node-e2e-"));
  ctx.tmp = tmp;
  const binary = path.resolve(process.env.VERIGATE_BIN ?? path.join(REPO, "target/release/verigate"));
  assert.ok(fs.existsSync(binary), `verigate binary not found at ${binary} (set VERIGATE_BIN)`);
  const [publicPort, apiPort, appPort] = [await freePort(), await freePort(), await freePort()];
  ctx.app = `http://127.0.0.1:${appPort}`;
  ctx.api = `http://127.0.0.1:${apiPort}`;
  const dataDir = path.join(tmp, "verigate");
  ctx.mailDir = path.join(dataDir, "mail");
  const config = path.join(tmp, "verigate.toml");
  fs.writeFileSync(config, `
data_dir = ${JSON.stringify(dataDir)}
public_base_url = "http://127.0.0.1:${publicPort}"
[listen]
api = "127.0.0.1:${apiPort}"
public = "127.0.0.1:${publicPort}"
[delivery]
transport = "file"
[dns]
check_on_create = false   # no network in CI; example.com needs no MX lookup here
[log]
level = "warn"
[[apps]]
id = "example"
api_keys = ["${API_KEY}"]
callback_url = "${ctx.app}/hooks/verigate"
webhook_secret = "${WEBHOOK_SECRET}"
redirect_prefixes = ["${ctx.app}/"]
`);
  // VERIGATE_* variables would override the file (and VERIGATE_BIN is no config key).
  const cleanEnv = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("VERIGATE_")));
  const daemon = new Proc("verigate", binary, ["serve", "--config", config], { env: cleanEnv });
  procs.push(daemon);
  await waitFor("verigate to listen", () => daemon.output.includes("verigate: api on") || !daemon.alive());
  assert.ok(daemon.alive(), `verigate exited:\n${daemon.output}`);

  const app = new Proc("app", process.execPath, [path.join(EXAMPLE, "server.js")], {
    cwd: EXAMPLE,
    env: {
      ...cleanEnv,
      PORT: String(appPort),
      APP_BASE_URL: ctx.app,
      VERIGATE_API_URL: ctx.api,
      VERIGATE_API_KEY: API_KEY,
      VERIGATE_WEBHOOK_SECRET: WEBHOOK_SECRET,
    },
  });
  procs.push(app);
  await waitFor("the example app to listen", async () => {
    assert.ok(app.alive(), `example app exited:\n${app.output}`);
    return fetch(`${ctx.app}/`).then((r) => r.ok, () => false);
  });
});

after(async () => {
  for (const p of procs.reverse()) await p.stop();
  fs.rmSync(ctx.tmp, { recursive: true, force: true });
});

// Show the processes' output when a test fails.
async function withLogs(fn) {
  try {
    await fn();
  } catch (e) {
    for (const p of procs) console.error(`--- ${p.name} output ---\n${p.output.split("\n").slice(-60).join("\n")}`);
    throw e;
  }
}
const e2e = (name, fn) => test(name, () => withLogs(fn));

// --- helpers -------------------------------------------------------------------------------------

// A browser: keeps its cookies, follows redirects (as GET), returns {status, url, text}.
class Browser {
  cookies = new Map();
  async request(url, { method = "GET", form, headers = {} } = {}) {
    url = new URL(url, ctx.app).toString();
    for (let hops = 0; hops < 5; hops++) {
      const res = await fetch(url, {
        method,
        redirect: "manual",
        headers: {
          ...headers,
          cookie: [...this.cookies].map(([k, v]) => `${k}=${v}`).join("; "),
          ...(form && { "content-type": "application/x-www-form-urlencoded" }),
        },
        body: form && new URLSearchParams(form).toString(),
      });
      for (const c of res.headers.getSetCookie()) {
        const [pair] = c.split(";");
        const i = pair.indexOf("=");
        this.cookies.set(pair.slice(0, i), pair.slice(i + 1));
      }
      if (![301, 302, 303, 307, 308].includes(res.status)) {
        return { status: res.status, url, text: await res.text() };
      }
      url = new URL(res.headers.get("location"), url).toString();
      method = "GET";
      form = undefined;
    }
    throw new Error("too many redirects");
  }
  get(url) {
    return this.request(url);
  }
  post(url, form) {
    return this.request(url, { method: "POST", form });
  }
  async me() {
    const r = await this.get("/api/me");
    assert.equal(r.status, 200, r.text);
    return JSON.parse(r.text);
  }
}

// Decodes quoted-printable (RFC 2045) into UTF-8 text.
const decodeQP = (s) =>
  Buffer.from(
    s.replace(/=\r?\n/g, "").replace(/=([0-9A-Fa-f]{2})/g, (_, h) => String.fromCharCode(parseInt(h, 16))),
    "latin1",
  ).toString("utf8");

// Parses the .eml files verigate's file transport writes: headers, and the text/plain part.
function parseMail(raw) {
  const headEnd = raw.indexOf("\r\n\r\n");
  const head = raw.slice(0, headEnd).replace(/\r\n[ \t]+/g, " ");
  const header = (name) => new RegExp(`^${name}:\\s*(.*)$`, "im").exec(head)?.[1];
  const plain = raw.search(/^Content-Type: text\/plain/im);
  const bodyStart = raw.indexOf("\r\n\r\n", plain) + 4;
  const part = raw.slice(bodyStart, raw.indexOf("\r\n--", bodyStart));
  const text = /quoted-printable/i.test(raw.slice(plain, bodyStart)) ? decodeQP(part) : part;
  return { to: header("To"), subject: header("Subject"), messageId: header("Message-ID"), text };
}

// Waits for verigate's mail to `to`; returns {vid, link, code, subject}.
function readMail(to, subject) {
  return waitFor(`a mail to ${to}`, () => {
    if (!fs.existsSync(ctx.mailDir)) return null;
    const files = fs
      .readdirSync(ctx.mailDir)
      .filter((f) => f.endsWith(".eml"))
      .map((f) => path.join(ctx.mailDir, f))
      .sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
    for (const f of files) {
      const m = parseMail(fs.readFileSync(f, "utf8"));
      if (m.to.replace(/[<>]/g, "").trim().toLowerCase() !== to.toLowerCase()) continue;
      if (subject && m.subject !== subject) continue;
      return {
        // Message-ID: <vrf_....msg_...@host>: the verification id, for the forged callbacks.
        vid: /<(vrf_[0-9A-Za-z]+)\./.exec(m.messageId)[1],
        link: /http:\/\/\S+\/v\/\S+/.exec(m.text)[0],
        code: /code: (\d{6})/.exec(m.text)[1],
        subject: m.subject,
      };
    }
    return null;
  });
}

async function register(address) {
  const b = new Browser();
  const r = await b.post("/register", { email: address, password: PASSWORD });
  assert.equal(r.status, 200, r.text);
  assert.match(r.text, /Enter your code/);
  return b;
}

async function confirmByLink(link) {
  // What a person does: open the link (a page with one button; it changes nothing) ...
  const page = await fetch(link);
  assert.equal(page.status, 200);
  assert.match(await page.text(), /method="post"/);
  // ... and press the button: POST to the same URL, which 303s back to the app.
  const res = await fetch(link, { method: "POST", redirect: "manual" });
  assert.equal(res.status, 303, await res.text());
  const location = res.headers.get("location");
  assert.ok(location.startsWith(`${ctx.app}/verified?`), location);
  assert.match(location, /status=verified/);
  const landing = await fetch(location);
  assert.equal(landing.status, 200);
  assert.match(await landing.text(), /confirmed/);
}

async function daemonView(vid) {
  const r = await fetch(`${ctx.api}/v1/verifications/${vid}`, { headers: { authorization: `Bearer ${API_KEY}` } });
  assert.equal(r.status, 200);
  return r.json();
}

const postCallback = (body, headers) =>
  fetch(`${ctx.app}/hooks/verigate`, { method: "POST", body, headers: { "content-type": "application/json", ...headers } });

function signedHeaders(secret, msgId, body, when = new Date()) {
  return {
    "webhook-id": msgId,
    "webhook-timestamp": String(Math.floor(when.getTime() / 1000)),
    "webhook-signature": new Webhook(secret).sign(msgId, when, body),
  };
}

const otherCode = (code) => (code === "000000" ? "111111" : "000000");

// --- tests ---------------------------------------------------------------------------------------

e2e("sign-up is verified by the link and the callback", async () => {
  const b = await register("alice@example.com");
  assert.equal((await b.me()).email_verified, false);

  const { vid, link, subject } = await readMail("alice@example.com");
  assert.equal(subject, "Confirm your email address");
  await fetch(link); // a mail scanner fetching the link verifies nothing
  await sleep(300);
  assert.equal((await b.me()).email_verified, false);
  assert.equal((await daemonView(vid)).status, "pending");

  await confirmByLink(link);
  // The app learns it from verigate's signed callback, a moment later.
  await waitFor("the verified callback", async () => (await b.me()).email_verified);
  await waitFor("verigate to record the callback as delivered", async () => (await daemonView(vid)).callback?.status === "delivered");
  assert.equal((await daemonView(vid)).status, "verified");
});

e2e("sign-up by code", async () => {
  const b = await register("bob@example.com");
  const { code } = await readMail("bob@example.com");
  let r = await b.post("/verify", { code: otherCode(code) });
  assert.equal(r.status, 400);
  assert.match(r.text, /attempts left/);
  assert.equal((await b.me()).email_verified, false);
  r = await b.post("/verify", { code });
  assert.equal(r.status, 200, r.text);
  assert.match(r.text, /is confirmed/);
  assert.equal((await b.me()).email_verified, true); // at once: the check answered "verified"
});

e2e("email change waits for the link", async () => {
  const b = new Browser();
  let r = await b.post("/login", { email: "alice@example.com", password: PASSWORD });
  assert.equal(r.status, 200, r.text);
  assert.equal((await b.me()).email_verified, true);

  r = await b.post("/account/email", { email: "alice.new@example.com" });
  assert.equal(r.status, 200, r.text);
  let state = await b.me();
  assert.equal(state.email, "alice@example.com"); // not yet
  assert.equal(state.pending_email, "alice.new@example.com");

  const { vid, link, subject } = await readMail("alice.new@example.com");
  assert.equal(subject, "Confirm your new email address");
  assert.equal((await daemonView(vid)).purpose, "email_change");
  await fetch(link); // opening the page alone changes nothing
  await sleep(300);
  assert.equal((await b.me()).email, "alice@example.com");

  await confirmByLink(link);
  await waitFor("the email change", async () => (await b.me()).email === "alice.new@example.com");
  state = await b.me();
  assert.equal(state.pending_email, null);
  // The new address logs in; the old one no longer does.
  assert.equal((await new Browser().post("/login", { email: "alice.new@example.com", password: PASSWORD })).status, 200);
  assert.equal((await new Browser().post("/login", { email: "alice@example.com", password: PASSWORD })).status, 401);
});

e2e("email change by code", async () => {
  const b = await register("carol@example.com");
  let { code } = await readMail("carol@example.com");
  assert.equal((await b.post("/verify", { code })).status, 200);

  await b.post("/account/email", { email: "carol.new@example.com" });
  ({ code } = await readMail("carol.new@example.com", "Confirm your new email address"));
  assert.equal((await b.post("/verify", { code: otherCode(code) })).status, 400);
  assert.equal((await b.me()).email, "carol@example.com");
  const r = await b.post("/verify", { code });
  assert.equal(r.status, 200, r.text);
  assert.equal((await b.me()).email, "carol.new@example.com");
});

e2e("callbacks with bad signatures are refused", async () => {
  const b = await register("dave@example.com");
  const { vid } = await readMail("dave@example.com");
  const body = JSON.stringify({
    type: "verification.verified",
    timestamp: "2026-01-01T00:00:00Z",
    data: {
      id: vid, email: "dave@example.com", purpose: "signup", subject: String((await b.me()).id),
      metadata: null, status: "verified", method: "link_and_code", verified_at: "2026-01-01T00:00:00Z",
    },
  });
  const good = signedHeaders(WEBHOOK_SECRET, "msg_forged1", body);
  const badCases = {
    "no signature headers": {},
    "signed with another secret": signedHeaders(newSecret(), "msg_forged1", body),
    "garbage signature": { ...good, "webhook-signature": "v1,not-base64!!" },
    "malformed signature": { ...good, "webhook-signature": "nonsense" },
    "signature of another body": signedHeaders(WEBHOOK_SECRET, "msg_forged1", body.replaceAll("dave", "eve")),
    "another webhook-id": { ...good, "webhook-id": "msg_forged2" },
    "stale timestamp": signedHeaders(WEBHOOK_SECRET, "msg_forged1", body, new Date(Date.now() - 10 * 60_000)),
  };
  for (const [name, headers] of Object.entries(badCases)) {
    const r = await postCallback(body, headers);
    assert.ok([400, 401].includes(r.status), `${name}: ${r.status} ${await r.text()}`);
  }
  assert.equal((await b.me()).email_verified, false);
  // Control: the same request with a genuine signature is accepted, so the refusals above were
  // the signature check at work.
  assert.equal((await postCallback(body, good)).status, 204);
  assert.equal((await b.me()).email_verified, true);
});
