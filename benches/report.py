#!/usr/bin/env python3
"""Writes BENCHMARKS.md from the raw results of benches/run.sh (see benches/README.md).

    report.py RESULTS_KV META_KV OUT_MD

RESULTS_KV: `key=value` lines appended by load.sh (http.*), delivery.sh (delivery.*), run.sh's
syntax step (syntax.*) and backlog.sh (backlog.*). META_KV: machine, software, commands, section
exit codes and times, from run.sh. A later line wins over an earlier one with the same key.
"""

import statistics
import sys


def read_kv(path):
    d = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if "=" in line:
                k, v = line.split("=", 1)
                d[k] = v
    return d


R = read_kv(sys.argv[1])
M = read_kv(sys.argv[2])
OUT = sys.argv[3]
QUICK = M.get("run.quick") == "1"


def num(key, d=R):
    v = d.get(key)
    if v is None or v in ("", "?"):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def fmt(v, spec=",.0f", none="—"):
    return none if v is None else format(v, spec)


def ms_us(us):
    return "—" if us is None else f"{us / 1000:.2f} ms"


def mib(kib):
    return "—" if kib is None else f"{kib / 1024:.1f} MiB"


def verdict(ok):
    if ok is None:
        return "n/a"
    return "**PASS**" if ok else "**MISS**"


def section_state(name):
    rc = M.get(f"section.{name}.rc")
    if rc is None:
        return "not run"
    return "ok" if rc == "0" else f"FAILED (exit {rc})"


rows = []  # (no, benchmark, verigate, reference, ratio/figure, target, result)
obs = []   # observations with numbers

# ------------------------------------------------------------------------------------------------
# 1. HTTP
def http(label, key):
    return num(f"http.{label}.{key}")


def lat(label):
    return (f"p50 {ms_us(http(label, 'p50_us'))} · p99 {ms_us(http(label, 'p99_us'))} · "
            f"p99.9 {ms_us(http(label, 'p999_us'))}")


http_ran = "section.http.rc" in M
for no, scen, name, target in (
    ("1a", "create", "HTTP durable create `POST /v1/verifications` (202)", 0.40),
    ("1b", "check", "HTTP code check, wrong code `POST /v1/verifications/check` (400)", 0.40),
    ("1c", "link", "HTTP link POST, the confirm button `POST /v/{token}` (public listener)", 0.40),
    ("1d", "get", "HTTP status `GET /v1/verifications/{id}`", None),
):
    v, b = http(f"{scen}-verigate", "rps"), http(f"{scen}-baseline", "rps")
    ratio = v / b if v is not None and b else None
    caveat = ""
    if scen == "link" and (http("link-verigate", "reused") or 0) > 0:
        caveat = f"<br>(caution: {http('link-verigate', 'reused'):,.0f} tokens POSTed twice, the cheaper path)"
    rows.append((
        no, name,
        f"{fmt(v)} req/s<br>{lat(f'{scen}-verigate')}{caveat}" if v is not None else (section_state("http") if http_ran else "not run"),
        f"{fmt(b)} req/s<br>{lat(f'{scen}-baseline')}" if b is not None else "—",
        f"{ratio * 100:.1f}%" if ratio is not None else "—",
        f"≥ {target * 100:.0f}% of baseline" if target else "— (no target)",
        verdict(ratio >= target if ratio is not None else None) if target else "info",
    ))
half_p99 = http("half-verigate", "p99_us")
half_rate = http("half-verigate", "rps")
half_target = num("http.half_target")
rows.append((
    "1e", "HTTP create p99 at half the maximum create rate (paced wrk, see §1)",
    (f"p99 {ms_us(half_p99)} at {fmt(half_rate)} req/s (target rate {fmt(half_target)})<br>"
     f"p50 {ms_us(http('half-verigate', 'p50_us'))} · p99.9 {ms_us(http('half-verigate', 'p999_us'))}")
    if half_p99 is not None else "not run",
    (f"baseline at the same pace: p99 {ms_us(http('half-baseline', 'p99_us'))} at "
     f"{fmt(http('half-baseline', 'rps'))} req/s") if http("half-baseline", "p99_us") is not None else "—",
    ms_us(half_p99) if half_p99 is not None else "—",
    "p99 ≤ 5 ms",
    verdict(half_p99 <= 5000 if half_p99 is not None else None),
))

# ------------------------------------------------------------------------------------------------
# 2. delivery
wl = R.get("delivery.workers_list", "").split()
for w in wl:
    v, s = num(f"delivery.vg{w}.rate"), num(f"delivery.src{w}.rate")
    ratio = v / s if v is not None and s else None
    rows.append((
        f"2 (W={w})",
        f"Delivery: {R.get('delivery.backlog', '?')}-mail backlog drain to smtp-sink, {w} workers/sessions",
        f"{fmt(v)} msgs/s (send {R.get(f'delivery.vg{w}.send_ms', '?')} ms/mail)" if v is not None else "—",
        f"smtp-source -d -s {w}: {fmt(s)} msgs/s",
        f"{ratio * 100:.1f}%" if ratio is not None else "—",
        "≥ 50% of smtp-source",
        verdict(ratio >= 0.5 if ratio is not None else None),
    ))
if not wl:
    rows.append(("2", "Delivery: backlog drain to smtp-sink vs smtp-source", section_state("delivery"),
                 "—", "—", "≥ 50% of smtp-source", "n/a"))

# ------------------------------------------------------------------------------------------------
# 3. syntax
rn, pn = num("syntax.rust_ns"), num("syntax.py_ns")
sp = num("syntax.speedup")
rows.append((
    "3", "Address syntax: `parse` over the email-validator corpus (per address)",
    f"{fmt(rn, ',.1f')} ns/address (criterion median)" if rn is not None else section_state("syntax"),
    f"email-validator {M.get('sw.email_validator', '?')}: {fmt(pn)} ns/address (mean)" if pn is not None else "—",
    f"{sp:.1f}× (median of {R.get('syntax.pairs', '?')} pairs)" if sp is not None else "—",
    "≥ 50× faster",
    verdict(sp >= 50 if sp is not None else None),
))

# ------------------------------------------------------------------------------------------------
# 4-6. memory, start-up, recovery
pending = num("backlog.pending")
pend_s = f"{pending:,.0f}" if pending is not None else "?"
quick_note = " (QUICK: not the 1,000,000 of the target)" if QUICK else ""
idle = num("backlog.mem.idle_rss_kib")
bl_idle = num("backlog.mem.baseline_idle_rss_kib")
rows.append(("4a", "Memory at idle after start (VmRSS, empty data dir)", mib(idle),
             f"baseline server idle: {mib(bl_idle)}" if bl_idle is not None else "—", "—", "≤ 15 MB",
             verdict(idle / 1024 <= 15 if idle is not None else None)))
peak = num("backlog.mem.load_hwm_kib")
rows.append(("4b", f"Memory peak under HTTP create load (VmHWM, {fmt(num('backlog.mem.load_rps'))} req/s)",
             mib(peak), f"load.sh create run: {mib(num('http.create_hwm_kib'))}" if num("http.create_hwm_kib") else "—",
             "—", "— (no target)", "info"))
full = num("backlog.mem.full_rss_kib")
full_after = num("backlog.mem.full_after_metrics_rss_kib")
full_hwm = num("backlog.mem.full_hwm_kib")
restart_rss = num("backlog.mem.restart_rss_kib")
rows.append(("4c", f"Memory with {pend_s} pending outbox entries (VmRSS after {R.get('backlog.settings', '').split('MEM_SETTLE=')[-1].split()[0] if 'MEM_SETTLE=' in R.get('backlog.settings', '') else '?'} s){quick_note}",
             (f"first start: {mib(full)} (VmHWM {mib(full_hwm)}; {mib(full_after)} after one /metrics)"
              + (f"<br>restart of the same store: {mib(restart_rss)}" if restart_rss is not None else ""))
             if full is not None else "not run",
             "—", "—", "≤ 100 MB",
             verdict(max(full, full_after or 0) / 1024 <= 100 if full is not None else None)))
se = num("backlog.startup.empty.median_ms")
bl_start = num("backlog.startup.baseline.median_ms")
rows.append(("5a", "Start to ready (exec → first 200 on /readyz), empty data dir",
             f"{fmt(se, ',.1f')} ms median ({R.get('backlog.startup.empty.all_ms', '')})" if se is not None else "not run",
             f"baseline server exec → first 200 on /healthz: {fmt(bl_start, ',.1f')} ms median" if bl_start is not None else "—",
             "—", "≤ 100 ms", verdict(se <= 100 if se is not None else None)))
sf = num("backlog.startup.full.median_ms")
sfr = num("backlog.startup.full_restart.median_ms")
rows.append(("5b", f"Start to ready with {pend_s} pending outbox entries{quick_note}",
             (f"first start on a copy of the filled store: {fmt(sf, ',.1f')} ms median ({R.get('backlog.startup.full.all_ms', '')})"
              + (f"<br>restart of that store: {fmt(sfr, ',.1f')} ms median ({R.get('backlog.startup.full_restart.all_ms', '')})"
                 if sfr is not None else "")) if sf is not None else "not run",
             "—", "—", "≤ 2 s", verdict(sf <= 2000 if sf is not None else None)))
rr = num("backlog.recovery.ready_ms")
miss = num("backlog.recovery.missing")
rows.append(("6", f"Recovery: SIGKILL under create load with {pend_s} pending, restart to ready{quick_note}",
             (f"{fmt(rr, ',.1f')} ms; {fmt(num('backlog.recovery.acked_before_kill'))} creates acknowledged before the kill, "
              f"{fmt(miss)} missing after") if rr is not None else "not run",
             "—", "—", "— (no target; start target is 2 s)", "info"))

# ------------------------------------------------------------------------------------------------
# observations (numbers only; the reading is the engineer's)
mt = num("backlog.fill.metrics_secs") or num("backlog.mem.full_metrics_secs")
if mt is not None:
    obs.append(f"`GET /metrics` with {pend_s} pending entries took {mt:.3f} s (after the fill), "
               f"{R.get('backlog.mem.full_metrics_secs', '?')} s and {R.get('backlog.mem.full_metrics2_secs', '?')} s "
               f"on a fresh start, {R.get('backlog.recovery.metrics_secs', '?')} s after recovery "
               f"(it counts the outbox on every scrape).")
if full is not None:
    obs.append(f"VmRSS with {pend_s} pending, first start on a copy of the filled store: "
               f"{mib(num('backlog.mem.full_ready_rss_kib'))} at ready, samples each second after: "
               f"{R.get('backlog.mem.full_rss_samples_kib', '?')} KiB, with {R.get('backlog.mem.full_cpu_after_ready_ms', '?')} ms "
               f"of CPU in those seconds; after one /metrics {mib(full_after)} "
               f"(VmHWM {mib(num('backlog.mem.full_after_metrics_hwm_kib'))}).")
if restart_rss is not None:
    obs.append(f"The same store restarted after a graceful stop: ready in {R.get('backlog.startup.full_restart.first_ms', '?')} ms "
               f"(all restarts: {R.get('backlog.startup.full_restart.all_ms', '?')} ms), VmRSS "
               f"{mib(num('backlog.mem.restart_ready_rss_kib'))} at ready and {mib(restart_rss)} after the settle time, "
               f"{R.get('backlog.mem.restart_cpu_after_ready_ms', '?')} ms of CPU in it. The first start on a copy of the "
               "filled store (the fill daemon stopped with SIGTERM right after its last write, as a deploy would) is the "
               "slow, large case; presumably the store replays its journal at start and flushes or compacts after ready.")
if num("backlog.fill.secs") is not None:
    obs.append(f"Fill: {pend_s} creates in {R['backlog.fill.secs']} s ({R.get('backlog.fill.rate')}/s, "
               f"p99 {ms_us(num('backlog.fill.p99_us'))}); fill daemon VmRSS every 10 s (KiB): "
               f"{R.get('backlog.fill.rss_samples_kib', '')}; at the end VmRSS {mib(num('backlog.fill.rss_kib'))}, "
               f"VmHWM {mib(num('backlog.fill.hwm_kib'))}; data dir {R.get('backlog.fill.disk', '?')}.")
stops = [R.get(k) for k in ("backlog.fill.stop_secs", "backlog.mem.full_stop_secs", "backlog.mem.restart_stop_secs") if R.get(k)]
if stops or R.get("backlog.startup.full.stop_all_secs"):
    obs.append(f"SIGTERM to exit with {pend_s} pending (relay down, max_per_second = 1): {', '.join(stops)} s "
               f"(fill daemon, memory run, its restart); start-up runs stopped right after ready: "
               f"{R.get('backlog.startup.full.stop_all_secs', '?')} s.")
if idle is not None:
    obs.append(f"Memory, empty daemon: idle {mib(idle)}; under {R.get('backlog.settings', '').split('DURATION=')[-1].split()[0]} "
               f"of creates VmHWM {mib(peak)}, VmRSS {mib(num('backlog.mem.load_rss_kib'))} at the end and "
               f"{mib(num('backlog.mem.after_load_5s_rss_kib'))} 5 s later "
               f"(outbox then {R.get('backlog.mem.load_outbox_depth', '?')} entries).")
if num("http.link-verigate.reused"):
    obs.append(f"The link run POSTed {R['http.link-verigate.reused']} tokens a second time (pool "
               f"{R.get('http.link_pool')}): part of that run measured the cheaper repeat path.")
if num("http.link_eml_secs") is not None:
    obs.append(f"Link pool: {R.get('http.link_pool')} link verifications; the file transport wrote their .eml files "
               f"within {R['http.link_eml_secs']} s after the creates.")
for w in wl:
    other = num(f"delivery.vg{w}.other")
    if other is not None and other > 30:
        obs.append(f"Delivery W={w}: other processes used {other:.0f}% of a core during the drain (shared machine).")

# ------------------------------------------------------------------------------------------------
# write
L = []
w = L.append
w("# verigate benchmarks")
w("")
w(f"Generated by `benches/run.sh` on {M.get('run.date', '?')} in {int(num('run.secs', M) or 0) // 60} min "
  f"{int(num('run.secs', M) or 0) % 60} s. Each benchmark runs with its baseline in the same run, on the same "
  "machine, one after the other: the machine is shared and small, so the **ratios** are the figures to compare "
  "between runs, not the absolute rates. How each figure is measured: `benches/README.md`.")
w("")
if QUICK:
    w("> **QUICK run** (`QUICK=1`): shorter runs and 100,000 pending entries instead of 1,000,000. A smoke test "
      "of the suite, not the benchmark.")
    w("")
w("## Machine")
w("")
w(f"- CPU: {M.get('machine.cpu', '?')}, `nproc` = {M.get('machine.nproc', '?')} ({M.get('machine.cpu_mhz', '?')} MHz); "
  f"memory {M.get('machine.mem', '?')}; disk {M.get('machine.disk', '?')}")
w(f"- Kernel: {M.get('machine.kernel', '?')}; OS: {M.get('machine.os', '?')}")
w(f"- {M.get('sw.rustc', '?')}; {M.get('sw.cargo', '?')}; {M.get('sw.wrk', '?')}; {M.get('sw.python', '?')} "
  f"with email-validator {M.get('sw.email_validator', '?')}; postfix (smtp-sink, smtp-source) {M.get('sw.postfix', '?')}")
w(f"- verigate under test: `{M.get('vg.path', '?')}` ({M.get('vg.version', '?')}, sha256 {M.get('vg.sha256', '?')}…, "
  f"built {M.get('vg.mtime', '?')}); baseline: `{M.get('bl.path', '—')}` (sha256 {M.get('bl.sha256', '—')}…); "
  f"repository at {M.get('git.rev', '?')} with {M.get('git.dirty', '?')}")
w(f"- Load average (1/5/15 min) at the start {M.get('load.start', '?')}, at the end {M.get('load.end', '?')}; "
  f"busiest processes at the start: {M.get('load.top_start', '?')}; at the end: {M.get('load.top_end', '?')}")
w("")
w("## Commands")
w("")
w("```sh")
w(M.get("run.command", "benches/run.sh"))
w("```")
w("")
w("which ran, from the repository root (binaries are copies in the run directory; each section's log is "
  f"kept in `{M.get('run.dir', '?')}`):")
w("")
w("| section | command | exit | time | machine busy before (other work) |")
w("|---|---|---|---|---|")
for name, key in (("http", "http"), ("delivery", "delivery"), ("syntax", "syntax"), ("memory, startup, recovery", "backlog")):
    cmd = M.get(f"cmd.{key}")
    if cmd is None:
        continue
    rc = M.get(f"section.{key}.rc", "?")
    waited = M.get(f"section.{key}.waited", "0")
    busy = (f"{M.get(f'section.{key}.busy_before', '?')}% of all cores"
            + (f" after waiting {waited} s" if waited not in ("0", "") else "")
            + f"; top: {M.get(f'section.{key}.top_before', '?')}")
    w(f"| {name} | `{cmd.strip()}` | {rc} | {M.get(f'section.{key}.secs', '?')} s | {busy} |")
w("")
for key in ("http", "delivery", "syntax", "backlog"):
    if M.get(f"section.{key}.rc", "0") != "0":
        w(f"> Section `{key}` failed (exit {M[f'section.{key}.rc']}): `{M.get(f'section.{key}.tail', '')}`")
        w("")
w("## Results")
w("")
w("| # | benchmark | verigate | baseline / reference (same run) | ratio | target | result |")
w("|---|---|---|---|---|---|---|")
for r in rows:
    w("| " + " | ".join(str(c) for c in r) + " |")
w("")
w("MB in the memory targets is read as MiB (VmRSS / VmHWM from `/proc/PID/status`, in KiB).")
w("")

# -- details: HTTP
if any(k.startswith("http.") for k in R):
    w("## 1. HTTP details")
    w("")
    w(f"`{R.get('http.settings', '')}`; client and server share the {M.get('machine.nproc', '?')} cores. "
      "Latencies from wrk (per request, keep-alive); p99.9 from the Lua `done()` (`latency:percentile(99.9)`). "
      "srv CPU: the server process, % of one core; µs/req: its CPU time per request; machine: all cores busy.")
    w("")
    w("| run | target | req/s | p50 | p75 | p90 | p99 | p99.9 | max | srv CPU | µs/req | machine | statuses | socket errors |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for scen in ("create", "half", "check", "get", "link"):
        for tgt in ("baseline", "floor", "verigate"):
            l = f"{scen}-{tgt}"
            if http(l, "rps") is None:
                continue
            errs = sum(http(l, k) or 0 for k in ("connect_err", "read_err", "write_err", "timeouts"))
            w(f"| {scen} | {tgt} | {fmt(http(l, 'rps'))} | {ms_us(http(l, 'p50_us'))} | {ms_us(http(l, 'p75_us'))} | "
              f"{ms_us(http(l, 'p90_us'))} | {ms_us(http(l, 'p99_us'))} | {ms_us(http(l, 'p999_us'))} | "
              f"{ms_us(http(l, 'max_us'))} | {fmt(http(l, 'srv_cpu'))}% | {fmt(http(l, 'us_req'))} | "
              f"{fmt(http(l, 'machine'))}% | {R.get(f'http.{l}.statuses', '')} | {errs:.0f} |")
    w("")
    floors = [(scen, http(f"{scen}-floor", "rps"), http(f"{scen}-baseline", "rps"), http(f"{scen}-verigate", "rps"))
              for scen in ("create", "check", "link")]
    floors = [f for f in floors if None not in f and f[1] and f[2]]
    if floors:
        w("**The durable floor** (`floor` rows: `baseline_server --durable`). The same minimal server, except that each "
          "POST also writes one record (the request body, or the token) to fjall and answers only after its group's "
          "`fdatasync`, through one writer thread, with verigate's engine settings (one worker, 16 MiB memtable). It is "
          "what the storage contract alone costs on this stack; verigate's reads, its four more keys per create, "
          "validation, crypto and outbox come on top. "
          + "; ".join(f"{scen}: floor {f / b * 100:.1f}% of the baseline, verigate {v / f * 100:.1f}% of the floor"
                      for scen, f, b, v in floors) + ".")
        w("")
    if half_p99 is not None:
        w(f"**p99 at half the maximum rate.** wrk is closed-loop. Half rate: the create run's {fmt(http('create-verigate', 'rps'))} "
          f"req/s / 2 = {fmt(half_target)} req/s. Every connection waits a random 0.5–1.5 × *pace* ms (Lua `delay()`) "
          "before each request, so the rate is about connections × 1000 / (pace + time per request). A calibration run at "
          f"pace = connections × 1000 / target gave {fmt(http('half-calibrate', 'rps'))} req/s; the measured run used pace "
          f"{R.get('http.half_pace', '?')} ms and achieved **{fmt(half_rate)} req/s**. The baseline ran at the same pace "
          f"({fmt(http('half-baseline', 'rps'))} req/s, p99 {ms_us(http('half-baseline', 'p99_us'))}): the client's and the "
          "machine's own share of that percentile. A paced closed loop still waits for slow answers (coordinated "
          "omission), so the real p99 at a fixed arrival rate is at least this.")
        w("")
    if R.get("http.link_pool"):
        w(f"**Link POST.** {R.get('http.link_pool')} `link` verifications created on a fresh daemon with the file "
          f"transport (unpaced); their links read from the .eml files (quoted-printable text part). Each wrk thread POSTs "
          f"its own slice of the tokens once, in order, so every request is a first confirm (token check, read, durable "
          f"write), and stops when its slice is used up: verigate's run took {R.get('http.link-verigate.secs', '?')} s "
          f"({fmt(http('link-verigate', 'requests'))} confirms; tokens used twice: {R.get('http.link-verigate.reused', '?')}). "
          "The baseline (no work per token) runs the full duration, going round the tokens. The pool size is fixed: the "
          "cost of a confirm depends on how much the store holds, so link figures compare only at the same pool.")
        w("")
    if R.get("http.check.commits"):
        parts = []
        for scen in ("create", "check", "get", "link"):
            c, o = num(f"http.{scen}.commits"), num(f"http.{scen}.ops")
            if c is not None:
                parts.append(f"{scen} {o:,.0f} operations in {c:,.0f} commits"
                             + (f" ({o / c:.1f} per commit)" if c else ""))
        w("Store group commits during the verigate runs: " + "; ".join(parts) + ".")
        w("")
    w(f"verigate VmRSS at idle in load.sh: {mib(num('http.idle_rss_kib'))}; after its create run VmRSS "
      f"{mib(num('http.create_rss_kib'))}, VmHWM {mib(num('http.create_hwm_kib'))}.")
    w("")

# -- details: delivery
if wl:
    w("## 2. Delivery details")
    w("")
    w(f"A backlog of {R.get('delivery.backlog')} `link_and_code` mails ({R.get('delivery.size')} bytes each as received) "
      "drained into Postfix's smtp-sink on 127.0.0.1, `max_per_second = 0`, workers = pool_size = W; the ceiling is "
      f"`smtp-source -d -s W -m N -l {R.get('delivery.size')}` into the same sink. `{R.get('delivery.settings', '')}`. "
      f"Disk fdatasync at the start: {R.get('delivery.fsync_start', '?')}; at the end: {R.get('delivery.fsync_end', '?')}.")
    w("")
    w("| W | smtp-source msgs/s | verigate msgs/s | ratio | verigate CPU | µs/msg | send ms | store writer CPU | conns | ops/commit | other CPU | RSS / HWM |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in wl:
        g = lambda k: R.get(f"delivery.vg{x}.{k}", "?")
        c, o = num(f"delivery.vg{x}.commits"), num(f"delivery.vg{x}.ops")
        w(f"| {x} | {R.get(f'delivery.src{x}.rate', '?')} | {g('rate')} | {g('ratio')} | {g('vg_cpu')}% | {g('vg_us')} | "
          f"{g('send_ms')} | {g('writer_cpu')}% | {g('conns')} | {(o / c) if c else 0:.1f} | {g('other')}% | "
          f"{mib(num(f'delivery.vg{x}.rss'))} / {mib(num(f'delivery.vg{x}.hwm'))} |")
    w("")
    extra = [f"smtp-source without session reuse: {R.get('delivery.src_noreuse.rate', '?')} msgs/s",
             f"paced run (max_per_second = 100): {R.get('delivery.paced.skip_rate', '?')} msgs/s after the first 2 s"]
    if R.get("delivery.live.create_rate"):
        extra.append(f"live (creates and deliveries at once): creates {R['delivery.live.create_rate']}/s, deliveries "
                     f"{R.get('delivery.live.during_rate')}/s while creating and {R.get('delivery.live.after_rate')}/s after, "
                     f"{R.get('delivery.live.e2e_rate')} msgs/s end to end")
    w("; ".join(extra) + ".")
    w("")

# -- details: syntax
if rn is not None or pn is not None:
    w("## 3. Address syntax details")
    w("")
    w(f"Rust and Python ran alternately, {R.get('syntax.pairs', '?')} times; each figure is the median over those runs. "
      f"criterion `parse/corpus`: {fmt(num('syntax.rust_iter_ns'))} ns per pass over {R.get('syntax.rust_cases', '?')} cases "
      f"= {fmt(rn, ',.1f')} ns/address. Python email-validator {M.get('sw.email_validator', '?')} "
      f"(`benches/email_validator_bench.py`, {R.get('syntax.py_cases', '?')} cases × {R.get('syntax.py_rounds', '?')} rounds): "
      f"mean {R.get('syntax.py_ns', '?')} ns/address, best round {R.get('syntax.py_best_ns', '?')}. "
      f"Speed-up, Python mean / Rust median, per pair: {R.get('syntax.speedups', '?')}; median {fmt(sp, '.1f')}×.")
    adv = [f"{k.split('.')[-1][:-3]} {v} ms" for k, v in sorted(R.items()) if k.startswith("syntax.adv.")]
    if adv:
        w("")
        w("Adversarial 1 MiB inputs (criterion median, for information): " + ", ".join(adv) + ".")
    w("")

# -- details: memory / startup / recovery
if any(k.startswith("backlog.") for k in R):
    w("## 4–6. Memory, start-up and recovery details")
    w("")
    w(f"`benches/backlog.sh` ({R.get('backlog.settings', '')}). Template: {pend_s} `link` verifications created through "
      "the HTTP API (wrk + `benches/delivery.lua`, unique addresses, ttl 7 days) on a daemon whose SMTP relay is a "
      "closed port and whose `delivery.max_per_second` is 1 (each attempt is a quick retry with backoff, so the "
      "backlog stays), `delivery.ready_requires_transport = false`, DNS checks and rate limits off; stopped with "
      "SIGTERM and copied with `cp -a` for every run (copies are in the page cache: warm starts). Start to ready: "
      "`benches/ready_timer.py` takes the time, forks and execs the daemon, and sends `GET /readyz` every 5 ms until "
      "a 200.")
    w("")
    w("| figure | value |")
    w("|---|---|")
    tbl = [
        ("template: pending entries (`verigate_outbox_depth{lane=\"email\"}`)", pend_s),
        ("template: fill time, rate", f"{R.get('backlog.fill.secs', '—')} s, {R.get('backlog.fill.rate', '—')}/s"),
        ("template: size on disk", R.get("backlog.fill.disk", "—")),
        ("VmRSS idle, empty (after 2 s)", mib(idle)),
        ("VmHWM / VmRSS under create load, empty start", f"{mib(peak)} / {mib(num('backlog.mem.load_rss_kib'))}"),
        ("VmRSS 5 s after the create load", mib(num("backlog.mem.after_load_5s_rss_kib"))),
        (f"VmRSS with {pend_s} pending: at ready / settled / after /metrics",
         f"{mib(num('backlog.mem.full_ready_rss_kib'))} / {mib(full)} / {mib(full_after)}"),
        (f"VmHWM with {pend_s} pending (after /metrics)", mib(num("backlog.mem.full_after_metrics_hwm_kib"))),
        (f"`GET /metrics` time with {pend_s} pending (fill end / fresh start / again / after recovery)",
         f"{R.get('backlog.fill.metrics_secs', '—')} / {R.get('backlog.mem.full_metrics_secs', '—')} / "
         f"{R.get('backlog.mem.full_metrics2_secs', '—')} / {R.get('backlog.recovery.metrics_secs', '—')} s"),
        ("start to ready, empty: each run", f"{R.get('backlog.startup.empty.all_ms', '—')} ms"),
        (f"start to ready, {pend_s} pending, first start on a copy: each run (listening at)",
         f"{R.get('backlog.startup.full.all_ms', '—')} ms ({R.get('backlog.startup.full.listen_all_ms', '—')} ms)"),
        (f"start to ready, {pend_s} pending, restart of that copy after SIGTERM: each run",
         f"{R.get('backlog.startup.full_restart.all_ms', '—')} ms"),
        (f"CPU used in the {R.get('backlog.settings', '').split('MEM_SETTLE=')[-1].split()[0] if 'MEM_SETTLE=' in R.get('backlog.settings', '') else '?'} s after ready, {pend_s} pending: first start / restart",
         f"{R.get('backlog.mem.full_cpu_after_ready_ms', '—')} / {R.get('backlog.mem.restart_cpu_after_ready_ms', '—')} ms"),
        (f"VmRSS with {pend_s} pending after a restart: at ready / settled (VmHWM)",
         f"{mib(num('backlog.mem.restart_ready_rss_kib'))} / {mib(restart_rss)} ({mib(num('backlog.mem.restart_hwm_kib'))})"),
        (f"SIGTERM to exit, {pend_s} pending", f"{R.get('backlog.startup.full.stop_all_secs', '—')} s"),
        ("recovery: creates answered 202 before SIGKILL", R.get("backlog.recovery.acked_before_kill", "—")),
        ("recovery: restart to ready (listening at)",
         f"{R.get('backlog.recovery.ready_ms', '—')} ms ({R.get('backlog.recovery.listen_ms', '—')} ms)"),
        ("recovery: outbox depth after / acknowledged creates missing",
         f"{R.get('backlog.recovery.outbox_depth', '—')} / {R.get('backlog.recovery.missing', '—')}"),
        ("recovery: VmRSS at ready", mib(num("backlog.recovery.rss_kib"))),
    ]
    for k, v in tbl:
        w(f"| {k} | {v} |")
    w("")

if obs:
    w("## Observations")
    w("")
    for o in obs:
        w(f"- {o}")
    w("")

with open(OUT, "w", encoding="utf-8") as f:
    f.write("\n".join(L))
