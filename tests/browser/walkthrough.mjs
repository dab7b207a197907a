// Browser walkthrough: the real verigate daemon, headless Chromium, the check-inbox example.
//
//   node walkthrough.mjs [VERIGATE_BIN]      (default $VERIGATE_BIN, else target/release/verigate)
//
// Starts the daemon on free loopback ports with a temp data dir (file mail transport, DNS checks
// off, one app with a known API key), serves examples/check-inbox/ from a second origin, and
// walks through it as a person would: the "check your inbox" page on a laptop, the link from the
// .eml opened on a phone (a second browser context), and the first page flipping to "Verified ✓"
// without a reload — over WebSocket, and over Server-Sent Events when there is no WebSocket.
// Also: a zh-CN landing page, a canceled verification, a forged watch token, and the watch
// protocol itself. Screenshots go to target/browser-screenshots/. Chromium: $CHROMIUM_PATH, else
// /usr/bin/chromium (Debian's package). Ends with "browser: N passed, N failed"; exit 1 on failure.
// BROWSER_WATCH_JS_FROM_TREE=1: see JS_FROM_TREE below.

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium, devices } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.resolve(process.argv[2] || process.env.VERIGATE_BIN || path.join(ROOT, 'target/release/verigate'));
const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const SHOTS = path.join(ROOT, 'target/browser-screenshots');
const EXAMPLE = path.join(ROOT, 'examples/check-inbox');
const KEY = 'browser-test-key-0123456789';
const STEP_TIMEOUT_MS = 45_000;
// Pages get static/verigate-watch.js from this tree instead of the daemon's embedded copy: for
// trying script changes without rebuilding (the step that compares the two still fails).
const JS_FROM_TREE = process.env.BROWSER_WATCH_JS_FROM_TREE === '1';

// ---------------------------------------------------------------- helpers

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function check(cond, what, detail) {
  if (!cond) throw new Error(detail === undefined ? what : `${what}: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`);
}

async function freePort() {
  const srv = net.createServer();
  await new Promise((r) => srv.listen(0, '127.0.0.1', r));
  const { port } = srv.address();
  await new Promise((r) => srv.close(r));
  return port;
}

async function waitFor(fn, what, timeoutMs = 10_000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what}${last ? ` (last error: ${last.message})` : ''}`);
}

// ---------------------------------------------------------------- the daemon

class Daemon {
  async start() {
    this.dir = fs.mkdtempSync(path.join(os.tmpdir(), 'verigate-browser-'));
    this.apiPort = await freePort();
    this.publicPort = await freePort();
    this.api = `http://127.0.0.1:${this.apiPort}`;
    this.public = `http://127.0.0.1:${this.publicPort}`;
    this.mailDir = path.join(this.dir, 'data', 'mail');
    const config = path.join(this.dir, 'config.toml');
    fs.writeFileSync(config, `
data_dir = ${JSON.stringify(path.join(this.dir, 'data'))}
public_base_url = "${this.public}"
[listen]
api = "127.0.0.1:${this.apiPort}"
public = "127.0.0.1:${this.publicPort}"
[signing]
keys = ["k1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"]
[log]
level = "warn"
[delivery]
transport = "file"
[dns]
check_on_create = false
[[apps]]
id = "shop"
api_keys = ["${KEY}"]
from = "Shop <no-reply@shop.example.com>"
`);
    await this.spawn(config);
  }

  async spawn(config = path.join(this.dir, 'config.toml')) {
    // Only this file configures it: no VERIGATE_* from the caller's environment.
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('VERIGATE_')));
    const proc = spawn(BIN, ['serve', '--config', config], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    this.output = this.output || '';
    proc.stdout.on('data', (d) => { this.output += d; });
    proc.stderr.on('data', (d) => { this.output += d; });
    proc.on('error', (e) => { this.output += `spawn error: ${e.message}\n`; });
    this.exited = new Promise((r) => proc.on('exit', (code, sig) => r(code ?? sig)));
    await waitFor(async () => {
      if (proc.exitCode !== null) throw new Error(`daemon exited: ${this.output}`);
      return (await fetch(`${this.api}/readyz`)).status === 200;
    }, `the daemon (${BIN}) to be ready`, 20_000);
  }

  async call(method, p, body) {
    const r = await fetch(this.api + p, {
      method,
      headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    let json;
    try { json = JSON.parse(text); } catch { json = text; }
    return { status: r.status, body: json };
  }

  async create(email, extra = {}) {
    const r = await this.call('POST', '/v1/verifications', { email, method: 'link', purpose: 'signup', ...extra });
    check(r.status === 202, `POST /v1/verifications ${email} → 202`, r);
    check(/^vrf_/.test(r.body.id) && typeof r.body.watch_token === 'string' && r.body.watch_token,
      'the 202 has id and watch_token', r.body);
    return r.body;
  }

  // The confirm link from the .eml of verification `id` (its Message-ID names the id).
  async linkFor(id) {
    return waitFor(() => {
      for (const f of fs.existsSync(this.mailDir) ? fs.readdirSync(this.mailDir) : []) {
        if (!f.endsWith('.eml')) continue;
        const raw = fs.readFileSync(path.join(this.mailDir, f), 'utf8');
        if (!raw.includes(id)) continue;
        const m = mailText(raw).match(/https?:\/\/[^\s"'<>]+\/v\/[A-Za-z0-9_.~-]+/);
        check(m, `a confirm link in ${f}`);
        check(m[0].startsWith(`${this.public}/v/`), 'the link starts with public_base_url', m[0]);
        return m[0];
      }
      return null;
    }, `the mail of ${id} in ${this.mailDir}`);
  }

  async stop() {
    if (this.proc && this.proc.exitCode === null) {
      this.proc.kill('SIGTERM');
      const t = setTimeout(() => this.proc.kill('SIGKILL'), 5000);
      await this.exited;
      clearTimeout(t);
    }
  }
}

// The decoded text/plain part of a MIME message (base64 or quoted-printable), else all of it.
function mailText(raw) {
  const parts = raw.split(/\r?\n--[^\r\n]+/);
  for (const part of parts) {
    const [head, ...rest] = part.split(/\r?\n\r?\n/);
    if (!/content-type:\s*text\/plain/i.test(head)) continue;
    const body = rest.join('\n\n');
    if (/content-transfer-encoding:\s*base64/i.test(head)) return Buffer.from(body.replace(/\s+/g, ''), 'base64').toString('utf8');
    if (/content-transfer-encoding:\s*quoted-printable/i.test(head)) {
      return Buffer.from(body.replace(/=\r?\n/g, '').replace(/=([0-9A-F]{2})/gi, (_, h) => String.fromCharCode(parseInt(h, 16))), 'latin1').toString('utf8');
    }
    return body;
  }
  return raw;
}

// ---------------------------------------------------------------- the example, from another origin

async function serveExample() {
  const server = http.createServer((req, res) => {
    const p = new URL(req.url, 'http://x').pathname;
    if (p === '/blank') {
      res.writeHead(200, { 'Content-Type': 'text/html' }).end('<!doctype html><title>blank</title>');
      return;
    }
    const file = path.join(EXAMPLE, p === '/' ? 'index.html' : path.normalize(p).replace(/^(\.\.[/\\])+/, ''));
    if (!file.startsWith(EXAMPLE) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404).end('not found');
      return;
    }
    const type = file.endsWith('.html') ? 'text/html; charset=utf-8' : file.endsWith('.css') ? 'text/css' : 'application/octet-stream';
    res.writeHead(200, { 'Content-Type': type, 'Cache-Control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return { server, url: `http://127.0.0.1:${server.address().port}/` };
}

// ---------------------------------------------------------------- the run

const results = [];
async function step(name, fn) {
  const t0 = Date.now();
  try {
    await Promise.race([fn(), sleep(STEP_TIMEOUT_MS).then(() => { throw new Error(`step timed out after ${STEP_TIMEOUT_MS} ms`); })]);
    results.push({ name, ok: true });
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name} (${Date.now() - t0} ms)\n     ${String(e.message || e).split('\n').join('\n     ')}`);
  }
}

const daemon = new Daemon();
let browser, example;
const shot = (page, name) => page.screenshot({ path: path.join(SHOTS, name), fullPage: true });

// A "check your inbox" tab on a laptop, watching verification `v`; records how it gets updates.
async function openInbox(context, v, email, query = {}) {
  const page = await context.newPage();
  const seen = { navigations: 0, sockets: [], frames: [], sseRequests: [], errors: [] };
  page.on('framenavigated', (f) => { if (f === page.mainFrame()) seen.navigations++; });
  page.on('pageerror', (e) => seen.errors.push(e.message));
  page.on('websocket', (ws) => {
    seen.sockets.push(ws.url());
    ws.on('framereceived', (f) => seen.frames.push(String(f.payload)));
  });
  page.on('request', (r) => { if ((r.headers().accept || '').includes('text/event-stream')) seen.sseRequests.push(r.url()); });
  const q = new URLSearchParams({ base: daemon.public, id: v.id, token: v.watch_token, email, ...query });
  await page.goto(`${example.url}?${q}`);
  await page.waitForSelector('body[data-status="pending"]', { timeout: 10_000 });
  await page.evaluate(() => { window.__noReload = 'still the same document'; });
  return { page, seen };
}

async function assertFlipped(inbox, status, heading) {
  const { page, seen } = inbox;
  await page.waitForSelector(`body[data-status="${status}"]`, { timeout: 10_000 });
  check((await page.textContent('#title')).trim() === heading, `the inbox page says "${heading}"`, await page.textContent('#title'));
  check(await page.evaluate(() => window.__noReload) === 'still the same document', 'no reload: the marker set on window survived');
  check(seen.navigations === 1, 'no reload: exactly one navigation of the inbox tab', `${seen.navigations}`);
  check(seen.errors.length === 0, 'no script errors on the inbox page', seen.errors);
  check(await page.evaluate(() => document.body.dataset.final) === status, 'onFinal ran with the final status');
}

// Opens the mail's link on a "phone" and presses the button; returns the phone page.
async function confirmOnPhone(link, { expectTitle, expectButton, shotPrefix, locale = 'en-US' }) {
  const phone = await browser.newContext({ ...devices['Pixel 7'], locale });
  const page = await phone.newPage();
  const resp = await page.goto(link);
  check(resp.status() === 200, 'GET /v/{token} → 200', `${resp.status()}`);
  check((await page.textContent('h1')).trim() === expectTitle, `the landing page title is "${expectTitle}"`, await page.textContent('h1'));
  const button = page.locator('form[method="post"] button#confirm');
  check(await button.count() === 1, 'the landing page has one Confirm button in a POST form');
  check((await button.textContent()).trim() === expectButton, `the button says "${expectButton}"`, await button.textContent());
  if (shotPrefix) await shot(page, `${shotPrefix}-confirm.png`);
  return { phone, page, button };
}

async function main() {
  check(fs.existsSync(BIN), `the daemon binary exists: ${BIN}`);
  check(fs.existsSync(CHROMIUM), `Chromium exists: ${CHROMIUM} (apt-get install chromium)`);
  fs.mkdirSync(SHOTS, { recursive: true });
  for (const f of fs.readdirSync(SHOTS)) if (f.endsWith('.png')) fs.rmSync(path.join(SHOTS, f));
  console.log(`daemon: ${BIN}\nchromium: ${CHROMIUM}`);

  await daemon.start();
  console.log(`api ${daemon.api}, public ${daemon.public}, data ${daemon.dir}`);
  example = await serveExample();
  console.log(`example page ${example.url}`);
  browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox'] });
  if (JS_FROM_TREE) {
    console.log('pages get static/verigate-watch.js from the tree (BROWSER_WATCH_JS_FROM_TREE=1)');
    const orig = browser.newContext.bind(browser);
    browser.newContext = async (opts) => {
      const ctx = await orig(opts);
      await ctx.route(`${daemon.public}/static/verigate-watch.js`, (route) => route.fulfill({
        contentType: 'text/javascript; charset=utf-8', path: path.join(ROOT, 'static/verigate-watch.js'),
      }));
      return ctx;
    };
  }
  const laptop = await browser.newContext({ viewport: { width: 1000, height: 700 } });

  await step('GET /static/verigate-watch.js serves static/verigate-watch.js', async () => {
    const r = await fetch(`${daemon.public}/static/verigate-watch.js`);
    check(r.status === 200, 'status 200', `${r.status}`);
    check(/javascript/.test(r.headers.get('content-type') || ''), 'a JavaScript content type', r.headers.get('content-type'));
    const body = await r.text();
    check(body === fs.readFileSync(path.join(ROOT, 'static/verigate-watch.js'), 'utf8'),
      'the body is static/verigate-watch.js of this tree (an older binary? rebuild it)');
  });

  await step('WebSocket: the inbox page flips to "Verified ✓" when the link is confirmed on another device', async () => {
    const email = 'ada.lovelace@example.com';
    const v = await daemon.create(email, { locale: 'en' });
    const inbox = await openInbox(laptop, v, email);
    check((await inbox.page.textContent('#email')) === email, 'the page names the address');
    await shot(inbox.page, '01-inbox-waiting.png');
    const link = await daemon.linkFor(v.id);
    const { phone, page, button } = await confirmOnPhone(link, {
      expectTitle: 'Confirm your email address', expectButton: 'Confirm', shotPrefix: '02-phone',
    });
    check((await page.textContent('.addr')).trim() === email, 'the landing page names the address');
    // The GET changed nothing: the inbox is still waiting.
    await sleep(1000);
    check(await inbox.page.evaluate(() => document.body.dataset.status) === 'pending', 'opening the link (GET) does not verify');
    await Promise.all([page.waitForNavigation(), button.click()]);
    check((await page.textContent('h1')).trim() === 'Email address confirmed', 'the phone shows the result page', await page.textContent('h1'));
    await shot(page, '03-phone-confirmed.png');
    await assertFlipped(inbox, 'verified', 'Verified ✓');
    await shot(inbox.page, '04-inbox-verified.png');
    check(inbox.seen.sockets.some((u) => u.startsWith(`${daemon.public.replace('http', 'ws')}/v1/verifications/${v.id}/watch?token=`)),
      'the page used a WebSocket to the public listener', inbox.seen.sockets);
    check(inbox.seen.frames.some((f) => JSON.parse(f).status === 'verified'), 'the verified status came over the WebSocket', inbox.seen.frames);
    check(inbox.seen.sseRequests.length === 0, 'no SSE fallback was needed', inbox.seen.sseRequests);
    check(await inbox.page.evaluate(() => window.watcher.transport) === 'websocket', 'the watcher reports transport "websocket"');
    const api = await daemon.call('GET', `/v1/verifications/${v.id}`);
    check(api.body.status === 'verified', 'the API agrees: verified', api.body);
    await phone.close();
    await inbox.page.close();
  });

  await step('zh-CN: the landing page follows the verification\'s locale (not the browser\'s)', async () => {
    const email = 'zhang.wei@example.com';
    const v = await daemon.create(email, { locale: 'zh-CN' });
    const link = await daemon.linkFor(v.id);
    const { phone, page, button } = await confirmOnPhone(link, {
      expectTitle: '确认您的邮箱地址', expectButton: '确认', shotPrefix: '05-zh-CN', locale: 'en-US',
    });
    check((await page.textContent('main')).includes('请点击下方按钮，确认此邮箱地址属于您。'), 'the Chinese message is shown');
    check(await page.getAttribute('html', 'lang') === 'zh-CN', 'html lang="zh-CN"', await page.getAttribute('html', 'lang'));
    await Promise.all([page.waitForNavigation(), button.click()]);
    check((await page.textContent('h1')).trim() === '邮箱地址已确认', 'the result page is Chinese too', await page.textContent('h1'));
    await shot(page, '05-zh-CN-confirmed.png');
    await phone.close();
  });

  await step('SSE fallback: without WebSocket the inbox page uses EventSource and flips to "Verified ✓"', async () => {
    const email = 'grace.hopper@example.com';
    const v = await daemon.create(email);
    const noWs = await browser.newContext({ viewport: { width: 1000, height: 700 } });
    await noWs.addInitScript(() => { window.WebSocket = undefined; });
    const inbox = await openInbox(noWs, v, email);
    check(await inbox.page.evaluate(() => window.watcher.transport) === 'sse', 'the watcher reports transport "sse"');
    check(inbox.seen.sockets.length === 0, 'no WebSocket was opened', inbox.seen.sockets);
    check(inbox.seen.sseRequests.some((u) => u.startsWith(`${daemon.public}/v1/verifications/${v.id}/watch?token=`)),
      'an EventSource request went to the watch URL', inbox.seen.sseRequests);
    const link = await daemon.linkFor(v.id);
    const { phone, page, button } = await confirmOnPhone(link, { expectTitle: 'Confirm your email address', expectButton: 'Confirm' });
    await Promise.all([page.waitForNavigation(), button.click()]);
    await assertFlipped(inbox, 'verified', 'Verified ✓');
    await shot(inbox.page, '06-sse-verified.png');
    await phone.close();
    await noWs.close();
  });

  await step('forced SSE (?transport=sse): a verification canceled through the API shows "Verification canceled"', async () => {
    const email = 'alan.turing@example.com';
    const v = await daemon.create(email);
    const inbox = await openInbox(laptop, v, email, { transport: 'sse' });
    check(inbox.seen.sockets.length === 0, 'no WebSocket was opened', inbox.seen.sockets);
    const r = await daemon.call('DELETE', `/v1/verifications/${v.id}`);
    check(r.status === 200, 'DELETE /v1/verifications/{id} → 200', r);
    await assertFlipped(inbox, 'canceled', 'Verification canceled');
    await shot(inbox.page, '07-sse-canceled.png');
    await inbox.page.close();
  });

  await step('expiry: a 3-second verification turns the waiting page into "This link has expired"', async () => {
    const email = 'hedy.lamarr@example.com';
    const v = await daemon.create(email, { ttl_seconds: 3 });
    const inbox = await openInbox(laptop, v, email);
    await assertFlipped(inbox, 'expired', 'This link has expired');
    await shot(inbox.page, '08-expired.png');
    await inbox.page.close();
  });

  for (const transport of ['auto', 'sse']) {
    await step(`a forged watch token (transport ${transport}): the page says the link is not valid, and stops`, async () => {
      const email = `barbara.liskov+${transport}@example.com`;
      const v = await daemon.create(email);
      const page = await laptop.newPage();
      const q = new URLSearchParams({ base: daemon.public, id: v.id, token: `AAAA${v.watch_token}`, email, transport });
      await page.goto(`${example.url}?${q}`);
      await page.waitForSelector('body[data-status="error:token_invalid"]', { timeout: 10_000 });
      check((await page.textContent('#message')).includes('not valid'), 'the page says the link is not valid');
      await shot(page, `09-forged-token-${transport}.png`);
      await page.close();
    });
  }

  await step('daemon restart: watching pages (WebSocket and SSE) reconnect and still flip to "Verified ✓"', async () => {
    const email = 'katherine.johnson@example.com';
    const v = await daemon.create(email);
    const ws = await openInbox(laptop, v, email);
    const sse = await openInbox(laptop, v, email, { transport: 'sse' });
    await daemon.stop();
    await ws.page.waitForFunction(() => /reconnecting/.test(document.getElementById('detail-text').textContent), null, { timeout: 10_000 });
    await shot(ws.page, '10-restart-reconnecting.png');
    await daemon.spawn();
    for (const p of [ws.page, sse.page]) {
      await p.waitForFunction(() => /Waiting for you to confirm/.test(document.getElementById('detail-text').textContent), null, { timeout: 15_000 });
    }
    const link = await daemon.linkFor(v.id);
    const { phone, page, button } = await confirmOnPhone(link, { expectTitle: 'Confirm your email address', expectButton: 'Confirm' });
    await Promise.all([page.waitForNavigation(), button.click()]);
    await assertFlipped(ws, 'verified', 'Verified ✓');
    await assertFlipped(sse, 'verified', 'Verified ✓');
    check(await ws.page.evaluate(() => window.watcher.transport) === 'websocket', 'the WebSocket page stayed on WebSocket');
    await phone.close();
    await ws.page.close();
    await sse.page.close();
  });

  await step('protocol: WebSocket messages, final close 1000, close codes 4000/4002', async () => {
    const v = await daemon.create('edsger.dijkstra@example.com');
    const wsBase = `${daemon.public.replace('http', 'ws')}/v1/verifications/${v.id}/watch`;
    const page = await laptop.newPage();
    await page.goto(`${example.url}blank`);
    // Each socket: its messages and close code, in the browser (Node 20 has no WebSocket).
    await page.evaluate((urls) => {
      window.__ws = {};
      for (const [name, url] of Object.entries(urls)) {
        const rec = (window.__ws[name] = { messages: [], close: null });
        const ws = new WebSocket(url);
        ws.onmessage = (e) => rec.messages.push(e.data);
        ws.onclose = (e) => { rec.close = { code: e.code, reason: e.reason }; };
      }
    }, { good: `${wsBase}?token=${encodeURIComponent(v.watch_token)}`, missing: wsBase, forged: `${wsBase}?token=AAAA${encodeURIComponent(v.watch_token)}` });
    const state = () => page.evaluate(() => window.__ws);
    await waitFor(async () => (await state()).good.messages.length > 0, 'the first WebSocket message');
    const first = JSON.parse((await state()).good.messages[0]);
    check(first.id === v.id && first.status === 'pending' && first.final === false, 'first message: id, status pending, final false', first);
    check(['queued', 'retrying', 'sent', 'failed'].includes(first.delivery), 'first message: delivery', first);
    check(!Number.isNaN(Date.parse(first.expires_at)) && first.expires_at === v.expires_at, 'first message: expires_at as in the 202', first);
    await waitFor(async () => (await state()).missing.close && (await state()).forged.close, 'the refused sockets to close');
    const s = await state();
    check(s.missing.close.code === 4000 && s.missing.messages.length === 0, 'no token → close 4000', s.missing);
    check(s.forged.close.code === 4002 && s.forged.messages.length === 0, 'forged token → close 4002', s.forged);
    const r = await daemon.call('DELETE', `/v1/verifications/${v.id}`);
    check(r.status === 200, 'DELETE → 200', r);
    await waitFor(async () => (await state()).good.close, 'the good socket to close after the final status');
    const g = await state();
    const last = JSON.parse(g.good.messages.at(-1));
    check(last.status === 'canceled' && last.final === true, 'last message: canceled, final true', g.good.messages);
    check(g.good.close.code === 1000, 'closed with 1000 after the final status', g.good.close);
    await page.close();
  });

  await step('protocol: SSE stream, CORS, 401 JSON errors, 404', async () => {
    const v = await daemon.create('donald.knuth@example.com');
    const url = `${daemon.public}/v1/verifications/${v.id}/watch`;
    const origin = example.url.replace(/\/$/, '');
    const sse = { Accept: 'text/event-stream', Origin: origin };
    const ctl = new AbortController();
    const r = await fetch(`${url}?token=${encodeURIComponent(v.watch_token)}`, { headers: sse, signal: ctl.signal });
    check(r.status === 200, 'SSE → 200', `${r.status}`);
    check((r.headers.get('content-type') || '').startsWith('text/event-stream'), 'content-type text/event-stream', r.headers.get('content-type'));
    check(r.headers.get('access-control-allow-origin') === '*', 'Access-Control-Allow-Origin: *', r.headers.get('access-control-allow-origin'));
    const reader = r.body.getReader();
    let text = '';
    await waitFor(async () => {
      const { value } = await reader.read();
      text += Buffer.from(value).toString('utf8');
      return /^data: .*\n\n/m.test(text);
    }, 'the first SSE data message');
    const data = JSON.parse(text.match(/^data: (.*)$/m)[1]);
    check(/^retry: \d+$/m.test(text), 'the stream has a retry: hint', text);
    check(data.id === v.id && data.status === 'pending' && data.final === false, 'first SSE message: id, status pending, final false', data);
    // Delete, then the stream must carry the final status and end.
    await daemon.call('DELETE', `/v1/verifications/${v.id}`);
    await waitFor(async () => {
      const { value, done } = await reader.read();
      if (value) text += Buffer.from(value).toString('utf8');
      return done;
    }, 'the SSE stream to end after the final status');
    const msgs = [...text.matchAll(/^data: (.*)$/gm)].map((m) => JSON.parse(m[1]));
    check(msgs.at(-1).status === 'canceled' && msgs.at(-1).final === true, 'the stream ends with canceled, final true', text);
    ctl.abort();

    const errorCases = [
      ['no token', url, 401, 'token_missing', 4000],
      ['forged token', `${url}?token=AAAA${encodeURIComponent(v.watch_token)}`, 401, 'token_invalid', 4002],
    ];
    for (const [what, u, status, code, closeCode] of errorCases) {
      const e = await fetch(u, { headers: sse });
      const body = await e.text();
      check(e.status === status, `SSE ${what} → ${status}`, `${e.status} ${body}`);
      let j;
      try { j = JSON.parse(body); } catch { j = null; }
      check(j && j.error && j.error.code === code && j.error.close_code === closeCode,
        `SSE ${what} → {"error":{"code":"${code}","close_code":${closeCode}}}`, body);
      // Without this a page on another origin cannot read why, and keeps retrying.
      check(e.headers.get('access-control-allow-origin') === '*', `SSE ${what}: Access-Control-Allow-Origin: * on the error too`, e.headers.get('access-control-allow-origin'));
    }
    const nf = await fetch(`${daemon.public}/v1/verifications/vrf_00000000000000000000000000/watch?token=${encodeURIComponent(v.watch_token)}`, { headers: sse });
    const nfBody = await nf.text();
    check([404, 401].includes(nf.status), 'SSE, an unknown id with another verification\'s token → 404 (or 401 token_invalid)', `${nf.status} ${nfBody}`);
  });
}

let fatal = null;
try {
  await main();
} catch (e) {
  fatal = e;
  console.log(`FAIL setup: ${e.message}`);
}
if (browser) await browser.close().catch(() => {});
if (example) example.server.close();
await daemon.stop();
const passed = results.filter((r) => r.ok).length;
const failed = results.length - passed + (fatal ? 1 : 0);
if (failed && daemon.output) console.log(`--- daemon output ---\n${daemon.output.slice(-4000)}`);
if (daemon.dir) fs.rmSync(daemon.dir, { recursive: true, force: true });
console.log(`screenshots: ${SHOTS}`);
console.log(`browser: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
