/*! verigate-watch.js — live status of one verification, for a "check your inbox" page.
 * No dependencies, no build step (ES2017). Include it with a plain tag:
 *   <script src="https://verify.example.com/static/verigate-watch.js"></script>
 *
 *   const w = VerigateWatch.watch({
 *     base: "https://verify.example.com", id: "vrf_…", token: "<watch_token>",
 *     // or: url: "https://verify.example.com/v1/verifications/vrf_…/watch?token=…"
 *     onStatus(msg) {},  // {id, status, final, delivery, expires_at}; called when any of them
 *                        // changes (an identical repeat, e.g. after a reconnect, is dropped)
 *     onFinal(msg) {},   // optional: once, after onStatus, for a final status (verified,
 *                        // expired, canceled, superseded, locked, delivery_failed); it stops
 *     onError(err) {},   // {code, closeCode, fatal, message, retryIn}. fatal: true for
 *                        // token_missing (4000), token_expired (4001), token_invalid (4002)
 *                        // and not_found (4004): it stops. fatal: false while reconnecting.
 *     onOpen(info) {},   // optional: {transport}, when a connection (or reconnection) delivers
 *                        // its first message, e.g. to clear a "reconnecting…" note
 *     transport: "auto", // "auto" (WebSocket, else Server-Sent Events), "websocket" or "sse"
 *   });
 *   w.close();           // stop watching (e.g. when the page moves on)
 *   w.transport;         // "websocket" or "sse": what it uses now
 *
 * WebSocket first; Server-Sent Events (EventSource) when there is no WebSocket or it fails
 * before its first message (a proxy that does not pass upgrades). After an abnormal close
 * (1006, 1001 server restarting, network errors) it reconnects with exponential backoff and
 * jitter, 1 s doubling up to 30 s; the server sends the current status again at once.
 */
(function (global) {
  "use strict";
  const FATAL = { 4000: "token_missing", 4001: "token_expired", 4002: "token_invalid", 4004: "not_found" };
  const FATAL_BY_NAME = { token_missing: 4000, token_expired: 4001, token_invalid: 4002, not_found: 4004 };

  function watchUrl(opts) {
    const raw = opts.url || String(opts.base).replace(/\/+$/, "") + "/v1/verifications/" +
      encodeURIComponent(opts.id) + "/watch?token=" + encodeURIComponent(opts.token || "");
    return new URL(raw, global.location ? global.location.href : undefined).href;
  }

  function watch(opts) {
    const httpUrl = watchUrl(opts);
    const wsUrl = httpUrl.replace(/^http/, "ws");
    const hasWs = typeof global.WebSocket === "function";
    const hasSse = typeof global.EventSource === "function";
    const connectTimeout = opts.connectTimeoutMs || 10000;
    const handle = { transport: opts.transport === "sse" || (!hasWs && opts.transport !== "websocket") ? "sse" : "websocket", close: stop };
    let stopped = false, conn = null, timer = null, attempt = 0, lastKey = null, wsWorked = false;

    const call = (fn, arg) => { try { if (fn) fn(arg); } catch (e) { setTimeout(() => { throw e; }); } };

    function stop() {
      stopped = true;
      clearTimeout(timer);
      if (conn) conn.close();
      conn = null;
      if (global.removeEventListener) global.removeEventListener("online", onOnline);
    }

    function fatal(closeCode, message) {
      stop();
      call(opts.onError, { code: FATAL[closeCode], closeCode, fatal: true, message: message || FATAL[closeCode] });
    }

    // One status message from either transport.
    function deliver(data) {
      let msg;
      try { msg = JSON.parse(data); } catch (e) { return; }
      if (!msg || typeof msg.status !== "string") return;
      const isFinal = msg.final === true || (msg.final === undefined && msg.status !== "pending");
      const key = [msg.status, msg.delivery, msg.expires_at, isFinal].join("|");
      if (key !== lastKey) { lastKey = key; call(opts.onStatus, msg); }
      if (isFinal && !stopped) { stop(); call(opts.onFinal, msg); }
    }

    // The first message of a connection: connected (again). Reset the backoff.
    function opened() { attempt = 0; call(opts.onOpen, { transport: handle.transport }); }

    // A connection ended without a final status: try again later.
    function retry(reason, closeCode) {
      if (stopped) return;
      if (conn) conn.close();
      conn = null;
      const ceiling = Math.min(30000, 1000 * Math.pow(2, attempt++));
      const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
      call(opts.onError, { code: reason, closeCode, fatal: false, message: "reconnecting", retryIn: delay });
      clearTimeout(timer);
      timer = setTimeout(connect, delay);
    }

    function onOnline() { if (!stopped && !conn) { clearTimeout(timer); connect(); } }

    function connect() {
      if (stopped) return;
      if (handle.transport === "websocket") openWebSocket(); else openEventSource();
    }

    function openWebSocket() {
      let got = false, ws;
      try { ws = new global.WebSocket(wsUrl); } catch (e) { return fallBackOr("websocket_error"); }
      const giveUp = setTimeout(() => { ws.onclose = null; ws.close(); fallBackOr("timeout"); }, connectTimeout);
      conn = { close: () => { clearTimeout(giveUp); ws.onclose = ws.onmessage = ws.onerror = null; try { ws.close(1000); } catch (e) { /* closed */ } } };
      ws.onmessage = (ev) => { if (!got) opened(); got = wsWorked = true; clearTimeout(giveUp); deliver(ev.data); };
      ws.onclose = (ev) => {
        clearTimeout(giveUp);
        conn = null;
        if (stopped) return;
        if (FATAL[ev.code]) return fatal(ev.code, ev.reason);
        if (!got) return fallBackOr("closed_" + ev.code, ev.code);
        retry(ev.code === 1001 ? "server_restarting" : "disconnected", ev.code);
      };
    }

    // The WebSocket failed before its first message. If it never worked here (a proxy that
    // does not pass upgrades), use SSE if we may; else the server is away: try again later.
    function fallBackOr(reason, closeCode) {
      conn = null;
      if (!wsWorked && opts.transport !== "websocket" && hasSse) { handle.transport = "sse"; return connect(); }
      retry(reason, closeCode);
    }

    function openEventSource() {
      if (!hasSse) return retry("no_transport");
      const es = new global.EventSource(httpUrl);
      let got = false;
      const giveUp = setTimeout(() => retry("timeout"), connectTimeout);
      conn = { close: () => { clearTimeout(giveUp); es.onmessage = es.onerror = null; es.close(); } };
      es.onmessage = (ev) => { if (!got) opened(); got = true; clearTimeout(giveUp); deliver(ev.data); };
      es.onerror = () => {
        // CONNECTING: the stream broke (EventSource would reconnect by itself; we pace it).
        // CLOSED: the server refused (401, 404, 503…), which EventSource cannot tell apart.
        const refused = es.readyState === global.EventSource.CLOSED;
        if (conn) conn.close();
        conn = null;
        if (stopped) return;
        if (refused && !got) explainRefusal(); else retry("disconnected");
      };
    }

    // Asks once more with fetch to read the status and the JSON error of a refused stream.
    function explainRefusal() {
      const ctl = typeof AbortController === "function" ? new AbortController() : null;
      conn = { close: () => { if (ctl) ctl.abort(); } };
      fetch(httpUrl, { headers: { Accept: "text/event-stream" }, cache: "no-store", signal: ctl && ctl.signal })
        .then((r) => {
          if (r.ok) { if (ctl) ctl.abort(); return null; }
          if (r.status === 404) return { code: 4004 };
          return r.json().then((b) => ({ code: b && b.error && (b.error.close_code || FATAL_BY_NAME[b.error.code]), message: b && b.error && b.error.message }), () => null);
        })
        .catch(() => null)
        .then((res) => {
          if (stopped) return;
          conn = null;
          if (res && FATAL[res.code]) fatal(res.code, res.message); else retry("refused");
        });
    }

    if (global.addEventListener) global.addEventListener("online", onOnline);
    connect();
    return handle;
  }

  global.VerigateWatch = { watch, version: "1" };
})(typeof window !== "undefined" ? window : globalThis);
