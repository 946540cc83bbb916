#!/usr/bin/env python3
"""Bounded etcd load for Spillway's cluster mode (issue 15, "scale on paper").

Starts its own etcd (data dir under /dev/shm, loopback, free ports), then measures through the
v3 JSON gateway -- the interface Spillway's EtcdClient uses:

  a. lease keep-alives: N leases granted, then POST /v3/lease/keepalive from a pool of
     persistent connections for T seconds -> renewals/s, p50/p99 latency;
  b. record puts: ~250-byte values under those leases, one key per lease -> puts/s, p50/p99;
  c. a full prefix range of the N records (what a client reads when it opens or reconnects)
     -> bytes per range, ranges/s;
  d. watch fan-out: W streaming watches (POST /v3/watch, one HTTP connection each) on the
     prefix while one writer puts at R puts/s -> delivered events/s, put->event delay
     p50/p99 across watchers, etcd CPU per 1,000 events delivered.

Everything is bounded (--max-seconds, 180 at most) and etcd is killed and its data dir removed
at exit (normal, exception, SIGINT/SIGTERM, or this process killed: etcd gets SIGTERM through
PR_SET_PDEATHSIG; the data dir is then left, named /dev/shm/spillway-etcd-scale-<pid>).
The load generator is Python on the same machine: with few cores it competes with etcd for
CPU, so the figures are a lower bound of what etcd does; etcd's own CPU use is reported.

  Bench/etcd-scale.py [--json] [--leases 1000] [--duration 4] [--watchers 200]
                      [--rates 20,200] [--threads 8] [--procs 2] [--max-seconds 120]
Python 3 standard library only.
"""
import argparse
import atexit
import base64
import ctypes
import http.client
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

PREFIX = "/spillway/scale/daemons/"
STOP_KEY = PREFIX + "~stop"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_etcd = None        # subprocess.Popen
_data_dir = None
_owner = os.getpid()  # forked load processes inherit handlers; only this process cleans up


def b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


def prefix_end(prefix):
    p = bytearray(prefix.encode())
    p[-1] += 1
    return bytes(p)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_value(i, stamp=0):
    """A daemon record like Spillway's, padded to about 250 bytes."""
    rec = {"address": "10.%d.%d.%d:7450" % (i >> 16 & 255, i >> 8 & 255, i & 255),
           "transports": ["tcp", "rma"], "capacity": 68719476736, "free_slabs": 40000 + stamp % 1000,
           "slab_size": 1048576, "failure_domain": "rack-%03d" % (i % 50),
           "instance": "%016x" % (0x5a11000000000000 + i), "registered_at": 1790000000 + stamp}
    s = json.dumps(rec, separators=(",", ":"))
    return s + " " * max(0, 250 - len(s))


# ---------------------------------------------------------------- etcd lifecycle

def cleanup():
    global _etcd, _data_dir
    if os.getpid() != _owner:
        return
    for proc in (_etcd,):
        if proc is None:
            continue
        try:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        except Exception:
            pass
    _etcd = None
    if _data_dir is not None:
        shutil.rmtree(_data_dir, ignore_errors=True)
        _data_dir = None


def _on_signal(signum, frame):
    if os.getpid() != _owner:
        os._exit(128 + signum)
    cleanup()
    os._exit(128 + signum)


def _pdeathsig():
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start_etcd(etcd_bin):
    global _etcd, _data_dir
    _data_dir = "/dev/shm/spillway-etcd-scale-%d" % os.getpid()
    shutil.rmtree(_data_dir, ignore_errors=True)
    os.makedirs(_data_dir)
    cport, pport = free_port(), free_port()
    curl, purl = "http://127.0.0.1:%d" % cport, "http://127.0.0.1:%d" % pport
    log = open(os.path.join(_data_dir, "etcd.log"), "wb")
    _etcd = subprocess.Popen(
        [etcd_bin, "--name", "scale", "--data-dir", os.path.join(_data_dir, "data"),
         "--listen-client-urls", curl, "--advertise-client-urls", curl,
         "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
         "--initial-cluster", "scale=" + purl],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=_pdeathsig)
    log.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if _etcd.poll() is not None:
            raise RuntimeError("etcd exited at startup (log: %s/etcd.log)" % _data_dir)
        try:
            c = http.client.HTTPConnection("127.0.0.1", cport, timeout=1)
            c.request("GET", "/health")
            r = c.getresponse()
            body = r.read()
            c.close()
            if r.status == 200 and b'"true"' in body:
                return cport
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("etcd did not become healthy within 15 s")


def etcd_cpu_seconds():
    with open("/proc/%d/stat" % _etcd.pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def etcd_rss_bytes():
    with open("/proc/%d/status" % _etcd.pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Conn:
    """A persistent HTTP/1.1 connection to the gateway, bounded by a socket timeout."""

    def __init__(self, port, timeout=10):
        self.c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def post(self, path, obj):
        body = json.dumps(obj)
        self.c.request("POST", path, body, {"Content-Type": "application/json"})
        r = self.c.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError("%s -> HTTP %d %s" % (path, r.status, data[:200]))
        return data

    def close(self):
        self.c.close()


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


# ---------------------------------------------------------------- a, b, c: closed-loop request pools

def _pool_worker(port, kind, items, threads, seconds, out):
    """One process: `threads` threads, each a persistent connection, looping over `items`."""
    end = time.monotonic() + seconds
    lat, errors = [], [0]
    lock = threading.Lock()

    def run(tid):
        conn = Conn(port)
        mine = items[tid::threads] or items
        local, i = [], 0
        while time.monotonic() < end:
            item = mine[i % len(mine)]
            i += 1
            t0 = time.monotonic()
            try:
                if kind == "keepalive":
                    data = conn.post("/v3/lease/keepalive", {"ID": str(item)})
                    if b'"TTL"' not in data:
                        raise RuntimeError("lease not renewed: %r" % data[:200])
                elif kind == "put":
                    key, lease = item
                    conn.post("/v3/kv/put", {"key": b64(key), "value": b64(record_value(i, i)), "lease": str(lease)})
                elif kind == "range":
                    data = conn.post("/v3/kv/range", {"key": b64(PREFIX), "range_end": b64(prefix_end(PREFIX))})
                    local.append(-len(data))  # bytes, marked negative; latency appended below
            except Exception:
                errors[0] += 1
                conn.close()
                conn = Conn(port)
                continue
            local.append(time.monotonic() - t0)
        conn.close()
        with lock:
            lat.extend(local)

    ts = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(seconds + 15)
    sizes = [-x for x in lat if x < 0]
    out.put({"lat": [x for x in lat if x >= 0], "errors": errors[0], "bytes": sizes[:1]})


def pool(ctx, port, kind, items, procs, threads, seconds):
    q = ctx.Queue()
    ps = [ctx.Process(target=_pool_worker, args=(port, kind, items if kind == "range" else items[p::procs], threads, seconds, q), daemon=True)
          for p in range(procs)]
    cpu0, t0 = etcd_cpu_seconds(), time.monotonic()
    for p in ps:
        p.start()
    results = [q.get(timeout=seconds + 30) for _ in ps]
    elapsed = time.monotonic() - t0
    cpu = etcd_cpu_seconds() - cpu0
    for p in ps:
        p.join(5)
    lat = [x for r in results for x in r["lat"]]
    out = {"requests": len(lat), "per_s": round(len(lat) / seconds, 1), "p50_ms": ms(pct(lat, 50)),
           "p99_ms": ms(pct(lat, 99)), "errors": sum(r["errors"] for r in results),
           "etcd_cpu_s": round(cpu, 2), "etcd_cores": round(cpu / elapsed, 2),
           "connections": procs * threads, "seconds": seconds}
    sizes = [b for r in results for b in r["bytes"]]
    if sizes:
        out["reply_bytes"] = sizes[0]
    return out


def ms(x):
    return None if x is None else round(x * 1000, 2)


# ---------------------------------------------------------------- d: watch fan-out

_REV = re.compile(rb'"mod_revision":"(\d+)"')
_STOP = b'"key":"' + b64(STOP_KEY).encode() + b'"'


def _watch_worker(port, n, ready, out, timeout):
    """One process: n watcher threads, each one streaming POST /v3/watch on its own connection.
    Records (revision, arrival time) of every event until it sees the stop key."""
    import array
    res = []
    lock = threading.Lock()

    def run():
        revs, times, err = array.array("q"), array.array("d"), None
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            c.request("POST", "/v3/watch", json.dumps({"create_request": {
                "key": b64(PREFIX), "range_end": b64(prefix_end(PREFIX))}}),
                {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                raise RuntimeError("watch -> HTTP %d" % r.status)
            first = r.readline()
            if b'"created":true' not in first:
                raise RuntimeError("watch not created: %r" % first[:200])
            ready.put(1)
            while True:
                line = r.readline()
                if not line:
                    raise RuntimeError("watch stream ended")
                now = time.monotonic()
                for m in _REV.findall(line):
                    revs.append(int(m))
                    times.append(now)
                if _STOP in line:
                    break
            c.close()
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            err = repr(e)
            ready.put(0)
        with lock:
            res.append((revs, times, err))

    ts = [threading.Thread(target=run, daemon=True) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout + 5)
    with lock:
        out.put([(r.tobytes(), t.tobytes(), e) for r, t, e in res])


def fanout(ctx, port, watchers, procs, rate, seconds, keys):
    import array
    ready, out = ctx.Queue(), ctx.Queue()
    timeout = seconds + 20
    per = [watchers // procs + (1 if p < watchers % procs else 0) for p in range(procs)]
    ps = [ctx.Process(target=_watch_worker, args=(port, n, ready, out, timeout), daemon=True) for n in per if n]
    t_setup = time.monotonic()
    for p in ps:
        p.start()
    ok = 0
    for _ in range(watchers):
        ok += ready.get(timeout=30)
    setup_s = time.monotonic() - t_setup
    time.sleep(0.3)
    # The writer: paced puts from 4 connections (like daemons' refreshes), each put's send
    # time kept by the revision etcd gave it.
    sent, behind, slock = {}, [0.0], threading.Lock()
    cpu0, t0 = etcd_cpu_seconds(), time.monotonic()

    def write(w, nw):
        conn = Conn(port)
        i = w
        while True:
            due = t0 + i / rate
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if due > now:
                time.sleep(due - now)
            else:
                behind[0] = max(behind[0], now - due)
            ts = time.monotonic()
            data = conn.post("/v3/kv/put", {"key": b64(keys[i % len(keys)]), "value": b64(record_value(i, i))})
            with slock:
                sent[int(json.loads(data)["header"]["revision"])] = ts
            i += nw
        conn.close()
    ws = [threading.Thread(target=write, args=(w, 4), daemon=True) for w in range(4)]
    for w in ws:
        w.start()
    for w in ws:
        w.join(seconds + 15)
    behind = behind[0]
    conn = Conn(port)
    write_s = time.monotonic() - t0
    conn.post("/v3/kv/put", {"key": b64(STOP_KEY), "value": b64("stop")})
    results = []
    for _ in ps:
        results.extend(out.get(timeout=timeout + 10))
    drain_s = time.monotonic() - t0
    cpu = etcd_cpu_seconds() - cpu0
    conn.post("/v3/kv/deleterange", {"key": b64(STOP_KEY)})
    conn.close()
    for p in ps:
        p.join(5)
    delays, delivered, errors, last = [], 0, [], 0.0
    for rb, tb, err in results:
        revs, times = array.array("q"), array.array("d")
        revs.frombytes(rb)
        times.frombytes(tb)
        if err:
            errors.append(err)
        for rev, t in zip(revs, times):
            if rev in sent:
                delivered += 1
                delays.append(t - sent[rev])
                last = max(last, t)
    expected = len(sent) * watchers
    span = max(write_s, (last - t0) if last else write_s)
    return {"watchers": watchers, "watch_ok": ok, "setup_s": round(setup_s, 2),
            "target_puts_per_s": rate, "puts": len(sent), "puts_per_s": round(len(sent) / write_s, 1),
            "writer_max_behind_ms": ms(behind),
            "events_expected": expected, "events_delivered": delivered,
            "events_per_s": round(delivered / span, 1),
            "delay_p50_ms": ms(pct(delays, 50)), "delay_p99_ms": ms(pct(delays, 99)),
            "delay_max_ms": ms(max(delays) if delays else None),
            "etcd_cpu_s": round(cpu, 2), "etcd_cores": round(cpu / drain_s, 2),
            "etcd_cpu_ms_per_1000_events": round(cpu * 1e3 / (delivered / 1000), 1) if delivered else None,
            "errors": errors[:3], "error_count": len(errors), "seconds": round(write_s, 2)}


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--etcd", default="/usr/bin/etcd")
    ap.add_argument("--leases", type=int, default=1000, help="leases and records (daemons), default 1000")
    ap.add_argument("--ttl", type=int, default=60, help="lease TTL while measuring (long, so none expires)")
    ap.add_argument("--duration", type=float, default=4, help="seconds per step (default 4)")
    ap.add_argument("--threads", type=int, default=8, help="connections per process for a-c")
    ap.add_argument("--procs", type=int, default=2, help="load processes (default 2)")
    ap.add_argument("--watchers", type=int, default=200, help="concurrent watches for d (default 200)")
    ap.add_argument("--rates", default="20,200", help="writer puts/s during d, comma-separated")
    ap.add_argument("--daemons", type=int, default=1000, help="daemons to extrapolate to (default 1000)")
    ap.add_argument("--clients", type=int, default=10000, help="watching clients to extrapolate to (default 10000)")
    ap.add_argument("--daemon-ttl", type=float, default=10, help="daemons' lease TTL to extrapolate with (default 10 s)")
    ap.add_argument("--max-seconds", type=float, default=120, help="hard bound on the whole run (<= 180)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    bound = min(args.max_seconds, 180)
    rates = [float(r) for r in args.rates.split(",") if r]
    args.duration = max(0.5, min(args.duration, 20))
    args.watchers = max(1, min(args.watchers, 2000))

    atexit.register(cleanup)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("--max-seconds %g reached" % bound)))
    signal.alarm(int(bound))

    ctx = multiprocessing.get_context("fork")
    started = time.monotonic()
    report = {"machine": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
              "params": {k: v for k, v in vars(args).items() if k != "json"}}
    try:
        port = start_etcd(args.etcd)
        ver = Conn(port)
        ver.c.request("GET", "/version")
        report["etcd_version"] = json.loads(ver.c.getresponse().read()).get("etcdserver")
        ver.close()

        # Leases (one per simulated daemon), granted from a few connections.
        leases, lock = [], threading.Lock()

        def grant(n):
            c = Conn(port)
            for _ in range(n):
                lid = json.loads(c.post("/v3/lease/grant", {"TTL": args.ttl}))["ID"]
                with lock:
                    leases.append(lid)
            c.close()
        t0 = time.monotonic()
        gs = [threading.Thread(target=grant, args=(args.leases // 8 + (1 if k < args.leases % 8 else 0),)) for k in range(8)]
        for g in gs:
            g.start()
        for g in gs:
            g.join(60)
        report["lease_grant"] = {"leases": len(leases), "per_s": round(len(leases) / (time.monotonic() - t0), 1)}
        keys = [PREFIX + "%016x" % (0x5a11000000000000 + i) for i in range(len(leases))]

        report["keepalive"] = pool(ctx, port, "keepalive", leases, args.procs, args.threads, args.duration)
        report["put"] = pool(ctx, port, "put", list(zip(keys, leases)), args.procs, args.threads, args.duration)
        report["range"] = pool(ctx, port, "range", [0], args.procs, max(1, args.threads // 4), args.duration)

        report["fanout"] = []
        for rate in rates:
            left = bound - (time.monotonic() - started)
            if left < args.duration + 25:
                report["fanout"].append({"skipped": "time bound", "target_puts_per_s": rate})
                continue
            report["fanout"].append(fanout(ctx, port, args.watchers, args.procs, rate, args.duration, keys))
        st = json.loads(Conn(port).post("/v3/maintenance/status", {}))
        report["db_size_bytes"] = int(st.get("dbSize", 0))
        report["etcd_rss_bytes"] = etcd_rss_bytes()
    finally:
        signal.alarm(0)
        cleanup()
    report["machine"]["loadavg_after"] = os.getloadavg()
    # Extrapolation: what --daemons and --clients need, and what the measured costs allow.
    need = {"keepalive_per_s": round(args.daemons / (args.daemon_ttl / 3), 1),
            "record_puts_per_s_worst": round(args.daemons / 3, 1)}
    # etcd CPU per event from the busiest fan-out step (its idle CPU weighs least there).
    steps = [f for f in report["fanout"] if f.get("etcd_cpu_ms_per_1000_events")]
    if steps:
        worst = max(steps, key=lambda f: f["events_delivered"])["etcd_cpu_ms_per_1000_events"]
        need["etcd_cpu_ms_per_event"] = round(worst / 1000, 4)
        need["changes_per_s_per_etcd_core_at_clients"] = round(1000 / (args.clients * worst / 1000), 2)
        need["etcd_cores_for_worst_record_rate"] = round(args.daemons / 3 * args.clients * worst / 1e6, 1)
    report["extrapolation"] = dict(need, daemons=args.daemons, clients=args.clients, daemon_ttl=args.daemon_ttl)
    report["wall_s"] = round(time.monotonic() - started, 1)

    if args.json:
        print(json.dumps(report))
        return
    print("etcd %s on 127.0.0.1, data dir in /dev/shm, %d CPUs, load average before %.2f, after %.2f"
          % (report["etcd_version"], report["machine"]["cpus"], report["machine"]["loadavg_before"][0],
             report["machine"]["loadavg_after"][0]))
    print("%d leases granted at %.0f/s" % (report["lease_grant"]["leases"], report["lease_grant"]["per_s"]))
    x = report["extrapolation"]
    print("%-44s %10s %9s %9s %10s" % ("step", "per s", "p50 ms", "p99 ms", "etcd cores"))
    for name, label in (("keepalive", "lease keep-alive"), ("put", "record put (250 B, leased)"),
                        ("range", "prefix range (%d keys, %d B)" % (len(keys), report["range"].get("reply_bytes", 0)))):
        r = report[name]
        print("%-44s %10.0f %9s %9s %10s  (%d conns, %d errors)" % (label, r["per_s"], r["p50_ms"], r["p99_ms"],
                                                               r["etcd_cores"], r["connections"], r["errors"]))
    for f in report["fanout"]:
        if "skipped" in f:
            print("watch fan-out at %g puts/s: skipped (time bound)" % f["target_puts_per_s"])
            continue
        print("%-44s %10.0f %9s %9s %10s  (%.0f puts/s, %d/%d events, etcd CPU per 1000 events %.0f ms, %d watch errors, watches opened in %.1f s)"
              % ("fan-out %d watches, %g puts/s" % (f["watchers"], f["target_puts_per_s"]), f["events_per_s"],
                 f["delay_p50_ms"], f["delay_p99_ms"], f["etcd_cores"], f["puts_per_s"],
                 f["events_delivered"], f["events_expected"], f["etcd_cpu_ms_per_1000_events"] or 0, f["error_count"], f["setup_s"]))
    print("%d daemons need %.0f keep-alives/s and at most %.0f record puts/s (TTL %g s, refresh 3 s)"
          % (x["daemons"], x["keepalive_per_s"], x["record_puts_per_s_worst"], x["daemon_ttl"]))
    if "etcd_cpu_ms_per_event" in x:
        print("watch delivery costs etcd %.3f ms CPU per event: at %d watching clients one etcd core absorbs %.2f"
              " membership changes/s; %.0f record puts/s would need %.0f etcd cores"
              % (x["etcd_cpu_ms_per_event"], x["clients"], x["changes_per_s_per_etcd_core_at_clients"],
                 x["record_puts_per_s_worst"], x["etcd_cores_for_worst_record_rate"]))
    print("db size %.1f MB, etcd RSS %.0f MB, wall %.1f s"
          % (report["db_size_bytes"] / 1e6, report["etcd_rss_bytes"] / 1e6, report["wall_s"]))


if __name__ == "__main__":
    try:
        main()
    except (TimeoutError, RuntimeError) as e:
        print("etcd-scale: %s" % e, file=sys.stderr)
        sys.exit(1)
