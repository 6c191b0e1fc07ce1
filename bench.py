#!/usr/bin/env python3
"""bench.py: measure buildserver against its speed goals (the README's "Speed").

    python bench.py                      # the full run: a minute or two
    python bench.py --quick              # smaller sizes, fewer repeats: seconds
    python bench.py --json figures.json  # also write every figure as JSON
    python bench.py --only dispatch,stop # some scenarios only (for profiling)

It starts real `buildserver.py serve` processes (waitress on loopback, each in
a temporary data folder) and drives them with keep-alive `http.client`
connections. Every figure has a baseline measured in the same run, and the
figures are medians of interleaved repeats (baseline, server, baseline, ...):
these shared 2-core machines are noisy, and a baseline alone can swing 2x
between runs. It prints a table (figure, value, baseline, ratio, goal, met)
and exits 0 even when goals are missed; only an error exits nonzero.

Units: ms and s of wall time, MB = 10**6 bytes (memory too), CPU time in s.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import http.client
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "buildserver.py")
MB = 10 ** 6
USER = "admin"  # the admin that a fresh server creates

# 100-byte lines (99 zeros and a newline), cut at exactly N bytes.
LOG_COMMAND = "yes \"$(printf '%099d' 0)\" | head -c {size}"
# About 1 MB/s of 100-byte lines in bursts, without a process per line (dash
# builtins); a build that streams its log the way a chatty compiler does.
STREAM_COMMAND = ("L=$(printf '%099d' 0); while :; do i=0; while [ $i -lt 100 ]; do "
                  "echo \"$L\"; i=$((i+1)); done; sleep 0.01; done")
SCENARIOS = ("idle_rss", "dispatch", "burst", "stop", "api", "log_capture", "log_read", "scale")


class BenchError(Exception):
    """The benchmark could not measure (a server failed, or answered wrongly)."""


@dataclasses.dataclass
class Params:
    """Sizes and repeats of one mode."""
    mode: str
    dispatch_n: int
    burst_reps: int
    stop_n: int
    api_seconds: float
    api_reps: int
    latency_n: int
    log_bytes: int
    log_pairs: int
    read_reps: int
    tail_n: int
    scale_builds: int
    scale_n: int
    burst_n: int = 50
    scale_small: int = 100


QUICK = Params("quick", dispatch_n=20, burst_reps=3, stop_n=5, api_seconds=1.0, api_reps=2,
               latency_n=300, log_bytes=10 * MB, log_pairs=5, read_reps=3, tail_n=20,
               scale_builds=2000, scale_n=30)
FULL = Params("full", dispatch_n=50, burst_reps=7, stop_n=30, api_seconds=3.0, api_reps=5,
              latency_n=2000, log_bytes=100 * MB, log_pairs=7, read_reps=7, tail_n=100,
              scale_builds=100_000, scale_n=200)


###############################################################################
# Measuring ###################################################################
###############################################################################

def median(values):
    return statistics.median(values)


def percentile(values, p):
    """Nearest-rank percentile: the smallest value with p% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def timed(fn, *args):
    """(seconds fn(*args) took, its result)."""
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def proc_status(pid, field):
    """A kB field of /proc/<pid>/status (VmRSS, VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise BenchError(f"/proc/{pid}/status has no {field}")


def proc_cpu(pid):
    """The process's own user+system CPU seconds (not its children's)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_cpu(pid):
    """The CPU seconds all the process's threads have run, ended ones too,
    exactly: the process's scheduler clock (Linux's clock id for another
    process's CPU time; /proc/<pid>/stat counts clock ticks, too coarse for a
    dispatch). None where there is no such clock."""
    try:
        return time.clock_gettime(((~pid) << 3) | 2)  # CPUCLOCK_SCHED of process `pid`
    except (OSError, OverflowError):
        return None


def wait_idle(pid, quiet=0.3, timeout=10.0):
    """Until the process has used no CPU for `quiet` seconds (work it put off,
    such as a checkpoint, is done), or `timeout`."""
    deadline = time.monotonic() + timeout
    used, since = proc_cpu(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = proc_cpu(pid)
        if now != used:
            used, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def spawn(command, **kw):
    """Run `sh -c command` to its end, as the server would (minus the capture)."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], stdin=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True, **kw)
    if proc.wait() != 0:
        raise BenchError(f"{command!r} failed with {proc.returncode}")


def machine():
    model = ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    return (f"{os.cpu_count()} cores{f' ({model})' if model else ''}, "
            f"Python {platform.python_version()} ({platform.python_implementation()}), "
            f"{platform.system()} {platform.release()}")


###############################################################################
# The server and its clients ##################################################
###############################################################################

class Server:
    """A real `python buildserver.py serve` on a free loopback port.

    :param args: more `serve` flags, e.g. ("--workers", "6").
    """
    started = []  # every one, so that an error can show what they logged last

    def __init__(self, data_dir, *args):
        self.data_dir = str(data_dir)
        self.args = args
        self.proc = None
        self.token = None
        self.command = [sys.executable, SCRIPT, "serve", "--port", "0",
                        "--data-dir", self.data_dir, *args]

    def start(self):
        Server.started.append(self)
        os.makedirs(self.data_dir, exist_ok=True)
        # The server's log goes to a file, as it would to a journal: a thread
        # here draining a pipe line by line would compete with the measuring
        # thread for this process's interpreter.
        self.log_path = os.path.join(self.data_dir, "server.log")
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=log_file,
                                         text=True)
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError("the server did not start: " + "".join(self.log_tail()))
            if "token, shown only now: " in line:
                self.token = line.rsplit(" ", 1)[1].strip()
            if "listening on http://" in line:
                host_port = line.rsplit(" ", 1)[1].strip().rstrip("/")[len("http://"):]
                self.host, port = host_port.rsplit(":", 1)
                self.port = int(port)
                break
        self.proc.stdout.close()  # nothing more comes there
        return self

    def log_tail(self, lines=50):
        """The last lines the server logged."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - 64 * 1024))
                return f.read().decode("utf-8", "replace").splitlines(True)[-lines:]
        except (OSError, AttributeError):
            return []

    @property
    def pid(self):
        return self.proc.pid

    def client(self, timeout=300):
        return Client(self, timeout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


class FloorServer(Server):
    """The floor of a dispatch on this machine: `bench.py --floor-server`, a
    bare waitress app that answers the same three requests and runs `sh -c
    true` on a worker thread, with no database, authentication or routing.
    What a dispatch costs above it is buildserver's own work."""

    def __init__(self, data_dir):
        super().__init__(data_dir)
        self.command = [sys.executable, os.path.abspath(__file__), "--floor-server"]


def serve_floor():
    """Serve the floor app (see FloorServer) until SIGTERM."""
    import collections
    import waitress

    builds, queue, ready = {}, collections.deque(), threading.Condition()

    def work():
        while True:
            with ready:
                ready.wait_for(lambda: queue)
                build = queue.popleft()
            spawn("true")
            build["last_status"] = "succeeded"
            build["done"].set()

    def app(environ, start_response):
        path = environ["PATH_INFO"].rstrip("/")
        if environ["REQUEST_METHOD"] == "POST":  # .../builds: create and queue one
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            build = {"id": len(builds) + 1, "last_status": "scheduled",
                     "done": threading.Event()}
            builds[build["id"]] = build
            with ready:
                queue.append(build)
                ready.notify()
            status, body = "201 Created", {"id": build["id"], "last_status": "scheduled"}
        elif path.endswith("/logs"):  # followed: answered once the build is done
            builds[int(path.split("/")[-2])]["done"].wait(30)
            status, body = "200 OK", None
        else:
            build = builds[int(path.split("/")[-1])]
            status, body = "200 OK", {"id": build["id"], "last_status": build["last_status"]}
        data = b"" if body is None else json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(data)))])
        return [data]

    for _ in range(6):
        threading.Thread(target=work, daemon=True).start()
    server = waitress.create_server(app, host="127.0.0.1", port=0, threads=32)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    print(f"listening on http://127.0.0.1:{server.effective_port}/", flush=True)
    server.run()


class Client:
    """One keep-alive connection to a server, authenticated as its admin."""

    def __init__(self, server, timeout=300):
        self.conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
        self.auth = {"Authorization": f"Token {server.token}"}

    def send(self, method, path, body=None):
        """Send a request; returns the response, its body not yet read."""
        headers = dict(self.auth)
        if body is not None:
            body = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        self.conn.request(method, path, body=body, headers=headers)
        return self.conn.getresponse()

    def call(self, method, path, body=None, expect=(200,)):
        """The body of the answer, which must have a status in `expect`."""
        resp = self.send(method, path, body)
        data = resp.read()
        if resp.status not in expect:
            raise BenchError(f"{method} {path} answered {resp.status}: {data[:500]!r}")
        return data

    def json(self, method, path, body=None, expect=(200,)):
        return json.loads(self.call(method, path, body, expect))

    def download(self, path, buffer):
        """Read the answer into `buffer` piece by piece; returns the byte count."""
        resp = self.send("GET", path)
        if resp.status != 200:
            raise BenchError(f"GET {path} answered {resp.status}: {resp.read()[:500]!r}")
        total = 0
        while True:
            n = resp.readinto(buffer)
            if not n:
                return total
            total += n

    def close(self):
        self.conn.close()


def project_path(name):
    return f"/api/v1/{USER}/{name}"


def create_project(client, name, command="true"):
    client.call("POST", f"/api/v1/{USER}", {"name": name, "command": command}, expect=(201,))
    return project_path(name)


def create_build(client, project, command=None, **fields):
    """POST a build; returns its path."""
    body = dict(fields, **({"command": command} if command else {}))
    build = client.json("POST", project + "/builds", body, expect=(201,))
    return f"{project}/builds/{build['id']}"


def wait_final(client, build, expect="succeeded"):
    """Follow the build's log past its end (so nothing is sent) until the build
    is final, then GET it once; returns its JSON."""
    client.call("GET", build + "/logs?follow=1&offset=1000000000000000")
    body = client.json("GET", build)
    if body["last_status"] != expect:
        raise BenchError(f"{build} ended {body['last_status']}, not {expect}")
    return body


def wait_status(client, build, status, timeout=30):
    deadline = time.monotonic() + timeout
    while client.json("GET", build)["last_status"] != status:
        if time.monotonic() > deadline:
            raise BenchError(f"{build} did not become {status} in {timeout} s")
        time.sleep(0.005)


def rps(server, path, threads, seconds):
    """Requests per second of GET `path` from `threads` keep-alive clients."""
    clients = [server.client() for _ in range(threads)]
    for c in clients:
        c.call("GET", path)  # connected and warm
    counts, barrier = [0] * threads, threading.Barrier(threads + 1)

    def hammer(i):
        barrier.wait()
        while time.perf_counter() < deadline:
            clients[i].call("GET", path)
            counts[i] += 1
    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    deadline = time.perf_counter() + seconds
    start = time.perf_counter()
    barrier.wait()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    return sum(counts) / elapsed


###############################################################################
# The report ##################################################################
###############################################################################

@dataclasses.dataclass
class Figure:
    """One row of the table; `key`, `baseline_key` and `ratio_key` name it in the JSON."""
    name: str
    key: str
    value: float
    unit: str
    goal: str
    met: bool  # None: a figure without a goal
    baseline: float = None
    baseline_key: str = None
    ratio_key: str = None
    ratio: float = None


class Report:
    def __init__(self, params):
        self.params = params
        self.figures = []
        self.extra = {}  # more numbers for the JSON only
        self.load_before = os.getloadavg()[0]  # other jobs on the machine skew every figure

    def add(self, *args, **kw):
        figure = Figure(*args, **kw)
        self.figures.append(figure)
        print(f"  {figure.name}: {_show(figure.value, figure.unit)}"
              + (f" (baseline {_show(figure.baseline, figure.unit)})"
                 if figure.baseline is not None else ""), flush=True)

    def as_json(self, seconds):
        out = {"mode": self.params.mode, "machine": machine(), "bench_s": round(seconds, 2),
               "load_before": self.load_before, "load_after": os.getloadavg()[0]}
        for f in self.figures:
            out[f.key] = _round(f.value)
            if f.baseline_key:
                out[f.baseline_key] = _round(f.baseline)
            if f.ratio_key:
                out[f.ratio_key] = _round(f.ratio)
        out.update({k: _round(v) for k, v in self.extra.items()})
        return out

    def table(self, seconds):
        rows = [("figure", "value", "baseline", "ratio", "goal", "met")]
        for f in self.figures:
            rows.append((f.name, _show(f.value, f.unit),
                         "-" if f.baseline is None else _show(f.baseline, f.unit),
                         "-" if f.ratio is None else f"{f.ratio:.2f}x", f.goal,
                         "-" if f.met is None else "yes" if f.met else "NO"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [f"buildserver bench, {self.params.mode} mode, {seconds:.0f} s; {machine()}; "
                 f"load average {self.load_before:.1f} before, {os.getloadavg()[0]:.1f} after"]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        goals = [f.met for f in self.figures if f.met is not None]
        lines.append(f"{sum(goals)} of {len(goals)} goals met")
        return "\n".join(lines)


def _show(value, unit):
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "s":
        return f"{value:.3f} s"
    if unit in ("MB", "MB/s", "req/s"):
        return f"{value:.1f} {unit}"
    if unit == "x":
        return f"{value:.2f}x"
    return f"{value:.3g} {unit}"


def _round(value):
    return round(value, 6) if isinstance(value, float) else value


###############################################################################
# Scenarios ###################################################################
###############################################################################

def bench_idle_rss(report, server, p):
    """The server's RSS just after start, against an idle interpreter that
    imported what the server imports."""
    time.sleep(0.5)
    rss = proc_status(server.pid, "VmRSS")
    bare = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys, bottle, waitress; print(flush=True); "
                               "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE)
    try:
        bare.stdout.readline()
        baseline = proc_status(bare.pid, "VmRSS")
    finally:
        bare.stdin.close()
        bare.wait()
    report.add("idle_rss", "idle_rss_mb", rss, "MB", "< 35 MB", rss < 35,
               baseline=baseline, baseline_key="idle_rss_baseline_mb",
               ratio_key="idle_rss_ratio", ratio=rss / baseline)


def bench_dispatch(report, server, p, folder):
    """POST a `true` build until the client knows it succeeded, against `sh -c true`;
    also the same three requests against the floor (see FloorServer)."""
    client = server.client()
    project = create_project(client, "dispatch")
    with FloorServer(os.path.join(folder, "floor")) as floor:
        bare = floor.client()
        for c in (client, bare):
            wait_final(c, create_build(c, project))  # warm up
        spawns, builds, floors = [], [], []
        cpu_before = process_cpu(server.pid), process_cpu(floor.pid)
        for _ in range(p.dispatch_n):
            spawns.append(timed(spawn, "true")[0])
            floors.append(timed(lambda: wait_final(bare, create_build(bare, project)))[0])
            builds.append(timed(lambda: wait_final(client, create_build(client, project)))[0])
        cpu = [None if before is None else (process_cpu(pid) - before) * 1000 / p.dispatch_n
               for pid, before in zip((server.pid, floor.pid), cpu_before)]
        bare.close()
    client.close()
    ms, base, least = median(builds) * 1000, median(spawns) * 1000, median(floors) * 1000
    report.add("dispatch", "dispatch_ms_median", ms, "ms", "< 3 ms, ratio < 5",
               ms < 3 and ms / base < 5, baseline=base, baseline_key="dispatch_spawn_ms_median",
               ratio_key="dispatch_ratio", ratio=ms / base)
    report.add("dispatch_floor", "dispatch_floor_ms_median", least, "ms", "-", None,
               baseline=base, ratio_key="dispatch_floor_ratio", ratio=least / base)
    if None not in cpu and cpu[1] > 0:  # the server's own CPU per dispatch (not the build's)
        report.add("dispatch_cpu", "dispatch_cpu_ms", cpu[0], "ms", "-", None, baseline=cpu[1],
                   baseline_key="dispatch_floor_cpu_ms", ratio_key="dispatch_cpu_ratio",
                   ratio=cpu[0] / cpu[1])
    report.extra["dispatch_ms_p90"] = percentile(builds, 90) * 1000


def bench_burst(report, server, p):
    """50 `true` builds POSTed at once (server started with --workers 6) until
    all are final, against 50 `sh -c true` run 6 at a time."""
    setup = server.client()
    project = create_project(setup, "burst")
    active = project + "/builds?status=created,scheduled,running,stopping&limit=1"
    senders = [server.client() for _ in range(8)]
    for c in senders:
        c.call("GET", "/api/v1/health")  # connected

    senders_pool = concurrent.futures.ThreadPoolExecutor(len(senders))
    spawn_pool = concurrent.futures.ThreadPoolExecutor(6)

    def send(i):
        for _ in range(i, p.burst_n, len(senders)):
            create_build(senders[i], project)

    def burst():
        list(senders_pool.map(send, range(len(senders))))
        while setup.json("GET", active)["count"]:
            time.sleep(0.004)  # a lighter watcher leaves the CPU to the builds; lag counted

    def direct():
        list(spawn_pool.map(spawn, ["true"] * p.burst_n))

    list(senders_pool.map(lambda i: None, range(len(senders))))  # the threads exist
    list(spawn_pool.map(lambda i: None, range(6)))
    servers, bases = [], []
    for _ in range(p.burst_reps):
        bases.append(timed(direct)[0])
        servers.append(timed(burst)[0])
    senders_pool.shutdown()
    spawn_pool.shutdown()
    for c in senders + [setup]:
        c.close()
    s, base = median(servers), median(bases)
    report.add("burst", "burst_s", s, "s", "< 0.15 s", s < 0.15, baseline=base,
               baseline_key="burst_spawn_s", ratio_key="burst_ratio", ratio=s / base)


def bench_stop(report, server, p):
    """POST stop of a running `sleep` until it reads `stopped`, against
    SIGTERM to a `sleep` group of our own until it is reaped."""
    client = server.client()
    project = create_project(client, "stop", command="sleep 60")
    stops, bases = [], []
    for _ in range(p.stop_n):
        proc = subprocess.Popen(["/bin/sh", "-c", "sleep 60"], start_new_session=True)
        time.sleep(0.05)
        start = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        bases.append(time.perf_counter() - start)

        build = create_build(client, project)
        wait_status(client, build, "running")
        time.sleep(0.05)  # the shell has exec'd sleep
        start = time.perf_counter()
        status = client.json("POST", build + "/stop")["last_status"]
        while status != "stopped":
            status = client.json("GET", build)["last_status"]
        stops.append(time.perf_counter() - start)
    client.close()
    ms, base = median(stops) * 1000, median(bases) * 1000
    report.add("stop", "stop_ms", ms, "ms", "< 3 ms", ms < 3, baseline=base,
               baseline_key="stop_kill_ms", ratio_key="stop_ratio", ratio=ms / base)


def bench_api(report, server, p):
    """Build detail requests/s against /health (8 keep-alive clients), then
    build detail latency, idle and while two builds stream their logs."""
    client = server.client()
    project = create_project(client, "api")
    build = create_build(client, project, "echo hello")
    wait_final(client, build)
    health, detail = [], []
    for _ in range(p.api_reps):
        health.append(rps(server, "/api/v1/health", 8, p.api_seconds))
        detail.append(rps(server, build, 8, p.api_seconds))
    ratio = median(detail) / median(health)
    report.add("api", "api_detail_rps", median(detail), "req/s", "ratio >= 0.7", ratio >= 0.7,
               baseline=median(health), baseline_key="api_health_rps",
               ratio_key="api_ratio", ratio=ratio)

    def latencies():
        return [timed(client.call, "GET", build)[0] * 1000 for _ in range(p.latency_n)]
    idle = latencies()
    streams = [create_build(client, project, STREAM_COMMAND, timeout=600) for _ in range(2)]
    followed = [0, 0]

    def follow(i):
        c = server.client()
        followed[i] = c.download(streams[i] + "/logs?follow=1", bytearray(1 << 16))
        c.close()
    for s in streams:
        wait_status(client, s, "running")
    followers = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for f in followers:
        f.start()
    time.sleep(0.5)  # output is flowing
    busy = latencies()
    for s in streams:
        client.call("POST", s + "/stop")
    for f in followers:
        f.join(60)
    client.close()
    if not all(followed):
        raise BenchError("the streaming builds' followers received nothing")
    p99, p99_idle = percentile(busy, 99), percentile(idle, 99)
    report.add("api_p99", "api_p99_ms", p99, "ms", "< 50 ms", p99 < 50, baseline=p99_idle,
               baseline_key="api_p99_idle_ms", ratio_key="api_p99_ratio", ratio=p99 / p99_idle)
    report.add("api_p50", "api_p50_ms", median(busy), "ms", "-", None, baseline=median(idle),
               baseline_key="api_p50_idle_ms")
    report.extra["api_stream_followed_mb"] = sum(followed) / MB


def bench_log_capture(report, server, p, folder):
    """A build writing p.log_bytes in 100-byte lines until final, against the
    same command redirected to a file; also the server's CPU and peak RSS.
    Returns (the last build's path, the last baseline file) for bench_log_read."""
    client = server.client()
    project = create_project(client, "capture")
    command = LOG_COMMAND.format(size=p.log_bytes)
    target = os.path.join(folder, "capture.log")
    hwm_before = proc_status(server.pid, "VmHWM")
    bases, walls, cpus, producer_cpus = [], [], [], []
    build = None
    wait_idle(server.pid)
    for _ in range(p.log_pairs):
        children = os.times()
        bases.append(timed(spawn, f"{command} > {target}")[0])
        after = os.times()
        producer_cpus.append(after.children_user + after.children_system
                             - children.children_user - children.children_system)
        if os.path.getsize(target) != p.log_bytes:
            raise BenchError(f"the baseline wrote {os.path.getsize(target)} bytes")
        cpu, start = proc_cpu(server.pid), time.perf_counter()
        build = create_build(client, project, command)
        body = wait_final(client, build)
        walls.append(time.perf_counter() - start)
        # Its checkpoint waits for the writes to pause: it is counted here, and
        # is over before the next baseline runs.
        wait_idle(server.pid)
        cpus.append(proc_cpu(server.pid) - cpu)
        if body["log_size"] != p.log_bytes:
            raise BenchError(f"{build} logged {body['log_size']} bytes, not {p.log_bytes}")
    growth = proc_status(server.pid, "VmHWM") - hwm_before
    client.close()
    wall, base = median(walls), median(bases)
    report.add("log_capture", "log_capture_s", wall, "s", "ratio <= 1.5", wall / base <= 1.5,
               baseline=base, baseline_key="log_capture_redirect_s",
               ratio_key="log_capture_ratio", ratio=wall / base)
    per_100mb = 100 * MB / p.log_bytes
    cpu = median(cpus) * per_100mb
    producer = median(producer_cpus) * per_100mb
    report.add("log_capture_cpu", "log_capture_cpu_s", cpu, "s", "< 0.3 s per 100 MB",
               cpu < 0.3, baseline=producer, baseline_key="log_capture_producer_cpu_s",
               ratio_key="log_capture_cpu_ratio", ratio=cpu / producer)
    report.add("log_capture_rss", "log_capture_rss_growth_mb", growth, "MB", "< 30 MB",
               growth < 30, baseline=hwm_before, baseline_key="log_capture_hwm_before_mb")
    report.extra["log_capture_mb"] = p.log_bytes / MB
    return build, target


def bench_log_read(report, server, p, build, file_path):
    """Download of the captured log in MB/s, against reading the baseline's
    file; `?tail=100` of that log, against `?tail=100` of a 1000-line log."""
    client = server.client()
    buffer = bytearray(1 << 20)

    def read_file():
        with open(file_path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    downloads, reads = [], []
    for _ in range(p.read_reps):
        reads.append(timed(read_file)[0])
        seconds, size = timed(client.download, build + "/logs", buffer)
        if size != p.log_bytes:
            raise BenchError(f"the download of {build} had {size} bytes, not {p.log_bytes}")
        downloads.append(seconds)
    mb_s, base = p.log_bytes / MB / median(downloads), p.log_bytes / MB / median(reads)
    report.add("log_read", "log_read_mb_s", mb_s, "MB/s", ">= 700 MB/s", mb_s >= 700,
               baseline=base, baseline_key="log_read_file_mb_s",
               ratio_key="log_read_ratio", ratio=mb_s / base)

    small = create_build(client, project_path("capture"), "seq 1000")
    wait_final(client, small)
    tails, small_tails = [], []
    for _ in range(p.tail_n):
        for path, times in ((small, small_tails), (build, tails)):
            seconds, text = timed(client.call, "GET", path + "/logs?tail=100")
            lines = text.count(b"\n")
            if lines != 100:
                raise BenchError(f"?tail=100 of {path} gave {lines} lines")
            times.append(seconds * 1000)
    client.close()
    ms, base = median(tails), median(small_tails)
    report.add("tail", "tail_ms", ms, "ms", "< 3 ms", ms < 3,
               baseline=base, baseline_key="tail_small_ms", ratio_key="tail_ratio",
               ratio=ms / base)
    report.extra["tail_ms_p90"] = percentile(tails, 90)


def seed_builds(db_path, project, count):
    """Insert `count` succeeded builds (and their four statuses) straight into
    the database, keeping the project's counters right. The server is down."""
    conn = sqlite3.connect(db_path, isolation_level=None)
    try:
        project_id = conn.execute(
            "SELECT p.id FROM projects p JOIN users u ON u.id = p.owner_id"
            " WHERE u.name = ? AND p.name = ?", (USER, project)).fetchone()[0]
        first_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM builds").fetchone()[0]
        t0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)

        def at(n, ms):
            return (t0 + datetime.timedelta(seconds=n, milliseconds=ms)).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ")
        builds, statuses = [], []
        for n in range(1, count + 1):
            build_id = first_id + n - 1
            builds.append((build_id, project_id, n, uuid.uuid4().hex, USER, "succeeded", 1,
                           "true", "{}", at(n, 0), at(n, 3), at(n, 1), at(n, 3), 0))
            for number, status in enumerate(("created", "scheduled", "running", "succeeded"), 1):
                statuses.append((build_id, number, uuid.uuid4().hex, status, at(n, number - 1)))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO builds (id, project_id, number, uuid, user, last_status, is_managed,"
            " command, env, created_at, updated_at, started_at, finished_at, exit_code)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", builds)
        conn.executemany(
            "INSERT INTO statuses (build_id, number, uuid, status, created_at)"
            " VALUES (?, ?, ?, ?, ?)", statuses)
        conn.execute("UPDATE projects SET builds_count = ?, next_number = ? WHERE id = ?",
                     (count, count + 1, project_id))
        conn.execute("COMMIT")
    finally:
        conn.close()


def bench_scale(report, folder, p):
    """The first page of the build list and one build's detail in a project
    of p.scale_builds builds, against one of 100, in one server (--workers 0)."""
    data_dir = os.path.join(folder, "scale")
    with Server(data_dir, "--workers", "0") as server:
        client = server.client()
        small, big = create_project(client, "small"), create_project(client, "big")
        client.close()
        token = server.token
    db_path = os.path.join(data_dir, "buildserver.db")
    seed_builds(db_path, "small", p.scale_small)
    seed_builds(db_path, "big", p.scale_builds)
    with Server(data_dir, "--workers", "0") as server:
        server.token = token  # a restarted server prints no new one
        client = server.client()
        cases = {"list_small": small + "/builds", "list_big": big + "/builds",
                 "detail_small": f"{small}/builds/{p.scale_small // 2}",
                 "detail_big": f"{big}/builds/{p.scale_builds // 2}"}
        times = {name: [] for name in cases}
        for rep in range(p.scale_n + 5):  # the first 5 rounds warm up
            for name, path in cases.items():
                seconds, body = timed(client.call, "GET", path)
                if rep >= 5:
                    times[name].append(seconds * 1000)
        count = client.json("GET", big + "/builds")["count"]
        client.close()
    if count != p.scale_builds:
        raise BenchError(f"the big project lists {count} builds, not {p.scale_builds}")
    ms = {name: median(values) for name, values in times.items()}
    list_ratio = ms["list_big"] / ms["list_small"]
    detail_ratio = ms["detail_big"] / ms["detail_small"]
    ratio = max(list_ratio, detail_ratio)
    report.add("scale_list", "scale_list_ms", ms["list_big"], "ms", "ratio <= 2",
               list_ratio <= 2, baseline=ms["list_small"], baseline_key="scale_list_small_ms",
               ratio_key="scale_list_ratio", ratio=list_ratio)
    report.add("scale_detail", "scale_detail_ms", ms["detail_big"], "ms", "ratio <= 2",
               detail_ratio <= 2, baseline=ms["detail_small"],
               baseline_key="scale_detail_small_ms", ratio_key="scale_detail_ratio",
               ratio=detail_ratio)
    report.extra.update(scale_ratio=ratio, scale_builds=p.scale_builds)


###############################################################################
# Command line ################################################################
###############################################################################

def run(p, only, folder):
    """Every scenario in `only`, in an order that lets servers be shared."""
    report = Report(p)
    print(f"buildserver bench, {p.mode} mode, in {folder} (load average "
          f"{os.getloadavg()[0]:.1f})", flush=True)
    if only & {"idle_rss", "dispatch", "burst", "stop", "api"}:
        with Server(os.path.join(folder, "main"), "--workers", "6") as server:
            for name in ("idle_rss", "dispatch", "burst", "stop", "api"):
                if name == "dispatch" and name in only:
                    bench_dispatch(report, server, p, folder)
                elif name in only:
                    globals()["bench_" + name](report, server, p)
    if only & {"log_capture", "log_read"}:
        # A fresh server, so that its peak RSS starts from idle.
        with Server(os.path.join(folder, "capture"), "--workers", "1",
                    "--max-log-bytes", str(2 * p.log_bytes + MB)) as server:
            build, file_path = bench_log_capture(report, server, p, folder)
            if "log_read" in only:
                bench_log_read(report, server, p, build, file_path)
    if "scale" in only:
        bench_scale(report, folder, p)
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller sizes and fewer repeats: seconds, not a minute")
    ap.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    ap.add_argument("--only", metavar="NAMES", default=",".join(SCENARIOS),
                    help="comma-separated scenarios to run")
    ap.add_argument("--keep", action="store_true", help="keep the temporary data folders")
    ap.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.floor_server:
        return serve_floor()
    only = set(filter(None, args.only.split(",")))
    if only - set(SCENARIOS):
        ap.error(f"unknown scenarios: {', '.join(sorted(only - set(SCENARIOS)))}")
    params = QUICK if args.quick else FULL
    folder = tempfile.mkdtemp(prefix="buildserver-bench-")
    started = time.perf_counter()
    try:
        report = run(params, only, folder)
    except (BenchError, OSError, http.client.HTTPException) as e:
        for server in Server.started:
            tail = server.log_tail()
            if tail:
                print(f"--- the last lines server {server.pid} logged:", *tail,
                      sep="\n", end="", file=sys.stderr)
        print(f"bench.py: error: {e!r}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - started
    print()
    print(report.table(seconds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.as_json(seconds), f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
