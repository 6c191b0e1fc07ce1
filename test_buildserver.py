"""Tests for buildserver.py, in the module's order.

webtest drives the WSGI app for the API; real `serve` processes on loopback,
real shell commands and real SQLite files are used wherever behaviour crosses
a process boundary (runner, stop, timeouts, crash recovery, following).
Every wait is a loop with a deadline.
"""

import ast
import collections
import contextlib
import dataclasses
import errno
import glob
import gzip
import http.client
import http.server
import importlib.util
import inspect
import io
import json
import logging
import os
import platform
import random
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import struct
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import webtest
from waitress import wasyncore

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # only the browser tests need it; they say so
    expect = sync_playwright = None

import buildserver

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "buildserver.py")

# Commands run here as on most machines, whose standard streams are buffered:
# with PYTHONUNBUFFERED (which some set) a full disk fails otherwise, and these
# tests missed that the client then exited 120.
os.environ.pop("PYTHONUNBUFFERED", None)

# Run under nohup, or as a script's background job, the tests would pass on
# SIGHUP or SIGINT ignored to every server and client they start, and the
# tests of those signals fail (a user's terminal sends them as it should).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


###############################################################################
# Fixtures and helpers ########################################################
###############################################################################

def wait_until(predicate, timeout=15.0, interval=0.02, message="condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def while_page_waits(page, predicate, message, timeout=15.0):
    """wait_until for what only the page's events bring (a request routed, a
    request finished): Playwright handles them only while it is waited on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        page.wait_for_timeout(50)


def three_frames(page):
    """Until the page has drawn three frames: what its last events made of
    the page is drawn, and any scroll the browser makes of it is done."""
    page.evaluate("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame("
                  "() => requestAnimationFrame(r))))")


@contextlib.contextmanager
def answers_handled(page, *ends, message):
    """Until the page's requests whose URLs end in each of `ends` (sent, or
    let go, within the block) have been answered, and three frames have
    passed: a check after it that nothing changed is one that could fail."""
    finished = []
    listener = lambda request: finished.append(request.url)  # noqa: E731
    page.on("requestfinished", listener)
    try:
        yield
        while_page_waits(page, lambda: all(any(u.endswith(end) for u in finished)
                                           for end in ends), message)
    finally:
        page.remove_listener("requestfinished", listener)
    three_frames(page)


def read_within(proc, read, timeout=60.0):
    """`read()` of a child process's output (proc.stdout.readline, say): a
    child that hangs is killed, with what it started (a server under a
    wrapper), and the test fails after `timeout`, where a bare read would
    hang the whole run."""
    done, failed = [], []

    def run():
        try:
            done.append(read())
        except Exception as e:
            failed.append(e)
    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout)
    if done:
        return done[0]
    for pid in [*descendants(proc.pid), proc.pid]:  # (their pipe then ends, and the reader)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    reader.join(10)
    if failed:
        raise failed[0]
    raise AssertionError(f"pid {proc.pid} wrote nothing awaited within {timeout} s")


def descendants(pid):
    """The live descendants of process `pid` (Linux /proc)."""
    children = collections.defaultdict(list)
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = buildserver._stat(entry)
        if len(fields) > 1:
            children[int(fields[1])].append(int(entry))
    found, todo = [], [pid]
    while todo:
        found += children[todo[-1]]
        todo[-1:] = children[todo[-1]]
    return found


def auth(token):
    return {"Authorization": f"Token {token}"}


@pytest.fixture
def config(tmp_path):
    return buildserver.Config(data_dir=str(tmp_path / "data"), workers=2, stop_grace=2.0)


@pytest.fixture
def app(config):
    application = buildserver.make_app(config)
    yield application
    application.close()


@pytest.fixture
def web(app):
    return webtest.TestApp(app)


@pytest.fixture
def admin(app):
    """An admin's token."""
    return app.store.create_user("root", is_admin=True)


@pytest.fixture
def alice(app):
    return app.store.create_user("alice")


@pytest.fixture
def bob(app):
    return app.store.create_user("bob")


@pytest.fixture
def project(web, alice):
    """alice/app, whose default command prints a line."""
    web.post_json("/api/v1/alice", {"name": "app", "command": "echo hello"}, headers=auth(alice))
    return "/api/v1/alice/app"


def final_build(web, token, path, timeout=15.0):
    """GET a build until it is final; returns its JSON."""
    def final():
        body = web.get(path, headers=auth(token)).json
        return body if body["last_status"] in buildserver.FINAL else None
    return wait_until(final, timeout, message=f"{path} to finish")


class Server:
    """A real `python buildserver.py serve` on a free loopback port."""

    def __init__(self, data_dir, *args, env=None, preexec_fn=None, wrap=()):
        self.data_dir = str(data_dir)
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.preexec_fn = preexec_fn
        self.wrap = wrap  # a command that runs it (unshare ...)
        self.proc = None
        self.token = None

    def start(self):
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, SCRIPT, "serve", "--port", "0", "--data-dir",
             self.data_dir, *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self.env, text=True, preexec_fn=self.preexec_fn)
        self.stdout_lines = []
        while True:
            line = read_within(self.proc, self.proc.stdout.readline)
            if not line:
                raise AssertionError("server did not start: " + self.proc.stderr.read())
            self.stdout_lines.append(line)
            if "token, shown only now: " in line:
                self.token = line.rsplit(" ", 1)[1].strip()
            if "listening on http://" in line:
                url = line.rsplit(" ", 1)[1].strip().rstrip("/")
                self.host, port = url[len("http://"):].rsplit(":", 1)
                self.port = int(port)
                break
        # Keep draining stderr so the server never blocks on a full pipe.
        self.stderr_lines = []
        threading.Thread(target=lambda: self.stderr_lines.extend(self.proc.stderr),
                         daemon=True).start()
        return self

    def request(self, method, path, body=None, token=None, headers=None, timeout=30):
        """(status, headers, body bytes) of one request on a fresh connection."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = dict(headers or {})
            token = self.token if token is None else token
            if token:
                hdrs["Authorization"] = f"Token {token}"
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                hdrs.setdefault("Content-Type", "application/json")
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def json(self, method, path, body=None, **kw):
        status, _, data = self.request(method, path, body, **kw)
        return status, json.loads(data) if data else None

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait(self, timeout=30):
        return self.proc.wait(timeout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def server_factory(tmp_path):
    """Start real servers; each is stopped at the end of the test."""
    servers = []

    def start(*args, data_dir=None, env=None, wrap=()):
        server = Server(data_dir or tmp_path / "served", *args, env=env, wrap=wrap)
        servers.append(server)  # (stopped even if its start fails)
        return server.start()
    yield start
    for server in servers:
        server.stop()


def server_final_build(server, path, timeout=15.0):
    def final():
        status, body = server.json("GET", path)
        return body if status == 200 and body["last_status"] in buildserver.FINAL else None
    return wait_until(final, timeout, message=f"{path} to finish")


def pids_with_marker(marker):
    """Pids of live processes whose environment holds `marker` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state != b"Z":
            found.append(int(pid))
    return found


###############################################################################
# Smoke #######################################################################
###############################################################################

def test_a_managed_build_runs_and_its_log_is_stored(web, project, alice):
    build = web.post_json(project + "/builds", {}, headers=auth(alice)).json
    assert build["last_status"] in ("scheduled", "running")  # a free worker may be quicker
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    assert web.get(f"{project}/builds/{build['id']}/logs", headers=auth(alice)).body == b"hello\n"


def test_real_server_serves_health_and_prints_admin_token(server_factory):
    server = server_factory()
    assert server.token
    status, body = server.json("GET", "/api/v1/health", token="")
    assert (status, body) == (200, {"status": "ok"})
    status, body = server.json("GET", "/api/v1/admin", token="")
    assert status == 401


def test_serve_runs_the_file_as_a_module_in_the_same_process_keeping_python_options(tmp_path):
    # The script's syntax tree would stay in memory for the server's life.
    server = Server(tmp_path / "served")
    proc_args = [sys.executable, "-X", "utf8", SCRIPT, "serve", "--port", "0",
                 "--data-dir", server.data_dir]
    server.proc = subprocess.Popen(proc_args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
    try:
        line = ""
        while "listening on http://" not in line:
            line = read_within(server.proc, server.proc.stdout.readline)
            assert line, "server did not start: " + server.proc.stderr.read()
        with open(f"/proc/{server.proc.pid}/cmdline", "rb") as f:
            cmdline = f.read().split(b"\0")[:-1]
        # (The path it was started by, which a `..` in it does not change.)
        assert os.path.abspath(cmdline[0]) == os.path.abspath(sys.executable).encode()
        assert cmdline[1:4] == [b"-X", b"utf8", b"-c"]
        assert b"SourceFileLoader" in cmdline[4]
        assert cmdline[5:] == [os.path.abspath(SCRIPT).encode(), *map(str.encode, proc_args[4:])]
        server.host, server.port = "127.0.0.1", int(line.rstrip().rstrip("/").rsplit(":", 1)[1])
        assert server.json("GET", "/api/v1/health", token="") == (200, {"status": "ok"})
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        assert "stopped" in server.proc.stderr.read()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_a_connection_stays_open_after_a_followed_log(server_factory):
    server = server_factory()
    # The build waits for a gate file, so the log is followed while it runs (chunked).
    status, _ = server.json("POST", "/api/v1/admin", {
        "name": "app", "command": "while [ ! -e gate ]; do sleep 0.01; done; echo hi"})
    assert status == 201
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        auth_header = {"Authorization": f"Token {server.token}"}
        conn.request("POST", "/api/v1/admin/app/builds", body=b"{}",
                     headers={**auth_header, "Content-Type": "application/json"})
        created = conn.getresponse()
        assert created.status == 201 and json.loads(created.read())["id"] == 1
        first_socket = conn.sock
        conn.request("GET", "/api/v1/admin/app/builds/1/logs?follow=1", headers=auth_header)
        followed = conn.getresponse()  # the head comes before any output
        assert followed.getheader("Transfer-Encoding") == "chunked"
        workspace = os.path.join(server.data_dir, "workspaces", "admin", "app", "1")
        wait_until(lambda: os.path.isdir(workspace), message="the build's workspace")
        open(os.path.join(workspace, "gate"), "w").close()
        assert followed.status == 200 and followed.read() == b"hi\n"
        assert not followed.will_close  # HTTP/1.1 keep-alive, not "Connection: close"
        conn.request("GET", "/api/v1/admin/app/builds/1", headers=auth_header)
        build = conn.getresponse()
        assert build.status == 200 and json.loads(build.read())["last_status"] == "succeeded"
        assert conn.sock is first_socket  # the same connection all along
        conn.request("GET", "/api/v1/admin/app/builds/1/logs?follow=1", headers={
            **auth_header, "Connection": "close"})
        asked_to_close = conn.getresponse()
        assert asked_to_close.read() == b"hi\n" and asked_to_close.will_close
    finally:
        conn.close()


def test_a_head_of_a_followed_log_leaves_the_connection_usable(server_factory):
    server = server_factory()
    assert server.json("POST", "/api/v1/admin", {"name": "app", "command": "sleep 30"})[0] == 201
    assert server.json("POST", "/api/v1/admin/app/builds", {})[0] == 201
    wait_until(lambda: server.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"]
               == "running", message="the build to run")
    sock = socket.create_connection((server.host, server.port), timeout=30)
    try:  # HEAD, then a request on the same connection; read until the server closes
        sock.sendall(f"HEAD /api/v1/admin/app/builds/1/logs?follow=1 HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Token {server.token}\r\n\r\n".encode()
                     + b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    finally:
        sock.close()
    assert received.startswith(b"HTTP/1.1 200 ")
    after_head = received.split(b"\r\n\r\n", 1)[1]
    # Nothing follows a HEAD's head but the next answer, whole.
    assert after_head.startswith(b"HTTP/1.1 200 "), after_head[:40]
    assert after_head.endswith(b"\r\n\r\n{\"status\":\"ok\"}"), after_head
    assert server.json("POST", "/api/v1/admin/app/builds/1/stop")[1]["last_status"] == "stopped"


###############################################################################
# HTTP API ####################################################################
###############################################################################
# The API through webtest against make_app: every route, its fields, pages,
# errors and access rules; then the command line as subprocesses and one real
# server. Builds here are unmanaged (nothing runs them) or live in an app
# without workers (they stay `scheduled`), so a build only changes when a test
# changes it and two GETs of it compare equal.


MiB = 1024 * 1024
HEX32 = re.compile(r"[0-9a-f]{32}")
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z")
PAGE_KEYS = {"count", "next", "previous", "results"}
PROJECT_KEYS = {"name", "owner", "description", "command", "env", "timeout", "created_at",
                "updated_at", "builds_count", "last_build"}
BUILD_KEYS = {"id", "uuid", "name", "unique_name", "user", "project", "description", "tags",
              "last_status", "is_managed", "created_at", "updated_at", "started_at",
              "finished_at", "command", "env", "timeout", "exit_code", "duration", "log_size",
              "truncated", "restarted_from", "bookmarked"}
STATUS_KEYS = {"id", "uuid", "job", "status", "message", "created_at"}
LOG_JSON_KEYS = {"job", "offset", "next_offset", "size", "complete", "truncated", "text"}

_NO_JSON = object()


def call(web, method, path, token=None, json_body=_NO_JSON, body=None, content_type=None,
         headers=None):
    """One request through webtest, whatever its status. `json_body` goes as JSON,
    `body` as raw bytes."""
    hdrs = dict(headers or {})
    if token:
        hdrs.update(auth(token))
    params = {}
    if json_body is not _NO_JSON:
        body = json.dumps(json_body).encode()
        content_type = content_type or "application/json"
    if body is not None:
        params["body"] = body
        params["content_type"] = content_type or "application/octet-stream"
    return web.request(path, method=method, headers=hdrs, expect_errors=True, **params)


def send(web, method, path, token, body, headers=None):
    """`body` as JSON if it is a dict, raw if bytes, nothing if None."""
    if isinstance(body, (dict, list)):
        return call(web, method, path, token, body, headers=headers)
    return call(web, method, path, token, body=body, headers=headers)


def ok(res, status=200):
    """The JSON of a successful answer (raw bytes if it is not JSON)."""
    assert res.status_int == status, (res.status, res.body[:500])
    return res.json if res.content_type == "application/json" else res.body


def assert_error(res, status, field=None):
    """An error answer: `status`, a JSON body {"detail": a sentence}, and when
    `field` is given an "errors" object naming it."""
    assert res.status_int == status, (res.status, res.body[:500])
    assert res.content_type == "application/json"
    body = res.json
    assert isinstance(body, dict) and isinstance(body.get("detail"), str), body
    assert body["detail"].strip()
    if field is not None:
        assert isinstance(body.get("errors"), dict) and field in body["errors"], body
        assert isinstance(body["errors"][field], str) and body["errors"][field]
    return body


def _stable(build):
    """A build as stored: a running build's duration grows by itself."""
    if build.get("last_status") in ("running", "stopping"):
        return {**build, "duration": "(running)"}
    return build


def snapshot(web, token, project):
    """All that GETs show of `project`, its owner's list and its builds: equal
    before and after a write that was refused."""
    owner = project.rsplit("/", 1)[0]
    state = {"projects": call(web, "GET", owner + "?limit=1000", token).json,
             "project": call(web, "GET", project, token).json,
             "builds": call(web, "GET", project + "/builds?limit=1000", token).json}
    if "results" in state["builds"]:
        state["builds"]["results"] = [_stable(b) for b in state["builds"]["results"]]
    for build in state["builds"].get("results", []):
        url = f"{project}/builds/{build['id']}"
        state[url] = (_stable(call(web, "GET", url, token).json),
                      call(web, "GET", url + "/statuses?limit=1000", token).json,
                      call(web, "GET", url + "/logs", token).body)
    return state


def unmanaged(web, token, project, **fields):
    """A new build that nothing runs: it stays `created` until someone reports."""
    return ok(call(web, "POST", project + "/builds", token, {"is_managed": False, **fields}), 201)


def report(web, token, build_url, *statuses):
    for status in statuses:
        ok(call(web, "POST", build_url + "/statuses", token, {"status": status}), 201)


def append_log(web, token, build_url, data):
    return ok(call(web, "POST", build_url + "/logs", token, body=data))


def log_json(web, token, build_url, query=""):
    res = call(web, "GET", f"{build_url}/logs?format=json&{query}", token)
    body = ok(res)
    assert set(body) == LOG_JSON_KEYS
    return body


def link(url):
    """A page link as (path, query dict), after checking it is an absolute URL."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme in ("http", "https") and parts.netloc, url
    return parts.path, dict(urllib.parse.parse_qsl(parts.query))


def relative(url):
    """The path and query of a page link, to GET it through webtest."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    return parts.path + "?" + parts.query


def walk_pages(web, token, url):
    """Follow `next` links from `url`; returns (every result, number of pages)."""
    results, pages = [], 0
    while url:
        page = ok(call(web, "GET", url, token))
        assert set(page) == PAGE_KEYS
        results += page["results"]
        pages += 1
        assert pages <= 100, "next links do not end"
        url = relative(page["next"])
    return results, pages


@pytest.fixture
def populated(web, alice, project):
    """alice/app with two unmanaged builds: 1 `created`, named and tagged, with a
    log; 2 `succeeded` with a log. Only requests change them."""
    unmanaged(web, alice, project, name="first", description="one", tags=["x", "y"],
              env={"K": "v"})
    append_log(web, alice, project + "/builds/1", b"first line\nsecond line\n")
    unmanaged(web, alice, project)
    append_log(web, alice, project + "/builds/2", b"done\n")
    report(web, alice, project + "/builds/2", "running", "succeeded")
    return project


def _app_fixture(tmp_path, name, **config):
    application = buildserver.make_app(
        buildserver.Config(data_dir=str(tmp_path / name), **config))
    client = webtest.TestApp(application)
    alice_token = application.store.create_user("alice")
    ok(call(client, "POST", "/api/v1/alice", alice_token,
            {"name": "app", "command": "make all", "env": {"A": "project", "B": "project"},
             "timeout": 600}), 201)
    return application, types.SimpleNamespace(app=application, web=client, alice=alice_token,
                                              project="/api/v1/alice/app")


@pytest.fixture
def idle(tmp_path):
    """An app with no workers, so managed builds stay `scheduled` until stopped;
    its alice/app has a command, an env and a timeout for builds to inherit."""
    application, ns = _app_fixture(tmp_path, "idle", workers=0)
    yield ns
    application.close()


@pytest.fixture
def small_logs(tmp_path):
    """Like `idle`, with --max-log-bytes 64."""
    application, ns = _app_fixture(tmp_path, "small", workers=0, max_log_bytes=64)
    yield ns
    application.close()


# Health ----------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/health/"])
def test_health_answers_ok_without_a_token(web, path):
    res = call(web, "GET", path)
    assert res.status_int == 200 and res.json == {"status": "ok"}


# Projects --------------------------------------------------------------------

def test_create_project_answers_201_with_every_field(web, alice):
    body = {"name": "Web-site_2", "description": "the site", "command": "make",
            "env": {"CI": "1"}, "timeout": 60}
    created = ok(call(web, "POST", "/api/v1/alice", alice, body), 201)
    assert set(created) == PROJECT_KEYS
    assert {key: created[key] for key in body} == body
    assert created["owner"] == "alice"
    assert created["builds_count"] == 0 and created["last_build"] is None
    assert RFC3339_UTC.fullmatch(created["created_at"])
    assert RFC3339_UTC.fullmatch(created["updated_at"])
    assert ok(call(web, "GET", "/api/v1/alice/Web-site_2", alice)) == created


def test_create_project_with_only_a_name_has_null_defaults(web, alice):
    created = ok(call(web, "POST", "/api/v1/alice", alice, {"name": "bare"}), 201)
    assert (created["description"], created["command"], created["env"], created["timeout"]) \
        == (None, None, {}, None)


def test_create_project_with_a_taken_name_is_400_and_keeps_the_first(web, alice, bob, populated):
    before = snapshot(web, alice, populated)
    res = call(web, "POST", "/api/v1/alice", alice, {"name": "app", "command": "rm -rf ~"})
    assert_error(res, 400, "name")
    assert snapshot(web, alice, populated) == before
    # Names are per owner: bob may have an `app` of his own.
    assert ok(call(web, "POST", "/api/v1/bob", bob, {"name": "app"}), 201)["owner"] == "bob"


def test_a_project_name_differing_only_in_case_is_taken_too(web, alice, bob, populated):
    # On a case-insensitive file system (macOS's default) alice/App and
    # alice/app would share their workspace folder.
    before = snapshot(web, alice, populated)
    res = call(web, "POST", "/api/v1/alice", alice, {"name": "APP"})
    assert_error(res, 400, "name")
    assert res.json["detail"] == ("The project name 'APP' is taken by 'app' (names differing "
                                  "only in case would share a workspace folder).")
    assert snapshot(web, alice, populated) == before
    assert ok(call(web, "POST", "/api/v1/bob", bob, {"name": "APP"}), 201)["name"] == "APP"


def test_create_project_without_a_name_is_400_naming_it(web, alice, populated):
    before = snapshot(web, alice, populated)
    assert_error(call(web, "POST", "/api/v1/alice", alice, {"command": "make"}), 400, "name")
    assert snapshot(web, alice, populated) == before


def test_patch_project_changes_only_the_fields_given(web, alice):
    ok(call(web, "POST", "/api/v1/alice", alice, {
        "name": "p", "description": "d", "command": "c", "env": {"A": "1", "B": "2"},
        "timeout": 5}), 201)
    before = ok(call(web, "GET", "/api/v1/alice/p", alice))
    patched = ok(call(web, "PATCH", "/api/v1/alice/p", alice, {"env": {"C": "3"}, "timeout": None}))
    assert patched["env"] == {"C": "3"}  # replaced, not merged
    assert patched["timeout"] is None
    for key in ("name", "owner", "description", "command", "created_at", "builds_count",
                "last_build"):
        assert patched[key] == before[key], key
    assert patched["updated_at"] >= before["updated_at"]
    assert ok(call(web, "GET", "/api/v1/alice/p", alice)) == patched

    patched = ok(call(web, "PATCH", "/api/v1/alice/p", alice,
                      {"description": None, "command": "make test"}))
    assert (patched["description"], patched["command"], patched["env"]) == (None, "make test",
                                                                            {"C": "3"})
    assert ok(call(web, "PATCH", "/api/v1/alice/p", alice, {})) == patched


def test_delete_project_removes_it_with_its_builds_statuses_and_logs(web, alice, populated):
    res = call(web, "DELETE", populated, alice)
    assert res.status_int == 200 and isinstance(res.json["detail"], str)
    assert_error(call(web, "GET", populated, alice), 404)
    for suffix in ("/builds", "/builds/1", "/builds/2/statuses", "/builds/2/statuses/1",
                   "/builds/1/logs"):
        assert_error(call(web, "GET", populated + suffix, alice), 404)
    assert_error(call(web, "DELETE", populated, alice), 404)
    assert ok(call(web, "GET", "/api/v1/alice", alice))["count"] == 0
    # A new project of the same name starts empty.
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "app", "command": "true"}), 201)
    listing = ok(call(web, "GET", populated + "/builds", alice))
    assert (listing["count"], listing["results"]) == (0, [])


def test_project_counts_its_builds_and_shows_the_last_one(web, alice, project):
    def current():
        one = ok(call(web, "GET", project, alice))
        listed = ok(call(web, "GET", "/api/v1/alice", alice))["results"]
        assert listed == [one]
        return one["builds_count"], one["last_build"]

    assert current() == (0, None)
    unmanaged(web, alice, project)
    unmanaged(web, alice, project)
    assert current() == (2, {"id": 2, "last_status": "created"})
    report(web, alice, project + "/builds/2", "running")
    assert current() == (2, {"id": 2, "last_status": "running"})
    report(web, alice, project + "/builds/1", "stopped")
    assert current() == (2, {"id": 2, "last_status": "running"})
    ok(call(web, "DELETE", project + "/builds/2", alice))
    assert current() == (1, {"id": 1, "last_status": "stopped"})
    ok(call(web, "DELETE", project + "/builds/1", alice))
    assert current() == (0, None)


def test_projects_list_pages_with_limit_offset_and_links(web, alice, bob):
    names = [f"p{i:02d}" for i in range(25)]
    for name in names:
        ok(call(web, "POST", "/api/v1/alice", alice, {"name": name}), 201)
    ok(call(web, "POST", "/api/v1/bob", bob, {"name": "bobs"}), 201)

    first = ok(call(web, "GET", "/api/v1/alice", alice))
    assert set(first) == PAGE_KEYS
    assert first["count"] == 25 and len(first["results"]) == 20  # the default limit
    assert all(set(p) == PROJECT_KEYS and p["owner"] == "alice" for p in first["results"])
    assert first["previous"] is None
    assert link(first["next"]) == ("/api/v1/alice", {"limit": "20", "offset": "20"})

    results, pages = walk_pages(web, alice, "/api/v1/alice?limit=7")
    assert pages == 4 and sorted(p["name"] for p in results) == names

    middle = ok(call(web, "GET", "/api/v1/alice?limit=7&offset=10", alice))
    assert len(middle["results"]) == 7
    assert link(middle["next"]) == ("/api/v1/alice", {"limit": "7", "offset": "17"})
    assert link(middle["previous"]) == ("/api/v1/alice", {"limit": "7", "offset": "3"})
    near = ok(call(web, "GET", "/api/v1/alice?limit=7&offset=3", alice))
    assert link(near["previous"])[1] == {"limit": "7", "offset": "0"}
    last = ok(call(web, "GET", "/api/v1/alice?limit=7&offset=21", alice))
    assert len(last["results"]) == 4 and last["next"] is None
    beyond = ok(call(web, "GET", "/api/v1/alice?offset=30", alice))
    assert beyond["count"] == 25 and beyond["results"] == [] and beyond["next"] is None
    assert beyond["previous"] is not None
    assert len(ok(call(web, "GET", "/api/v1/alice?limit=1000", alice))["results"]) == 25


def test_page_links_carry_other_query_parameters_byte_for_byte(web, alice, project):
    # Bottle hands query values over as Latin-1: re-encoded as UTF-8, a
    # non-ASCII value grew at every page.
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "second"}), 201)
    first = ok(call(web, "GET", "/api/v1/alice?limit=1&q=%C3%BC&raw=%FF&tag=a&tag=b", alice))
    assert first["next"].endswith("?limit=1&q=%C3%BC&raw=%FF&tag=a&tag=b&offset=1")
    path = first["next"].split("//", 1)[1].split("/", 1)[1]
    second = ok(call(web, "GET", "/" + path, alice))
    assert second["previous"].endswith("?limit=1&q=%C3%BC&raw=%FF&tag=a&tag=b&offset=0")


def test_a_query_value_is_read_as_utf8_and_refused_when_it_is_not(web, alice, project):
    res = call(web, "GET", project + "/builds?status=r%C3%BCnning", alice)
    assert_error(res, 400)
    assert "'rünning'" in res.json["detail"]
    res = call(web, "GET", project + "/builds?status=%FF", alice)
    assert_error(res, 400)
    assert res.json["detail"] == "The query parameter status is not valid UTF-8."


# Builds ----------------------------------------------------------------------

@pytest.mark.parametrize("host", ["a b@evil.example", "evil.example/x?y=", "x:1:2"])
def test_page_links_never_name_a_host_header_that_is_no_host(web, alice, project, host):
    # A script following `next` would send its token to whatever the header named.
    for _ in range(3):
        unmanaged(web, alice, project)
    page = ok(call(web, "GET", project + "/builds?limit=1&offset=1", alice,
                   headers={"Host": host}))
    for link in (page["next"], page["previous"]):
        assert link.startswith("http://localhost:80/api/v1/alice/app/builds?"), link
    page = ok(call(web, "GET", project + "/builds?limit=1&offset=1", alice,
                   headers={"Host": "build.example.org:8443"}))
    assert page["next"].startswith("http://build.example.org:8443/api/v1/alice/app/builds?")


def test_builds_list_is_newest_first_and_pages(web, alice, project):
    for _ in range(5):
        unmanaged(web, alice, project)
    listing = ok(call(web, "GET", project + "/builds", alice))
    assert set(listing) == PAGE_KEYS and listing["count"] == 5
    assert [b["id"] for b in listing["results"]] == [5, 4, 3, 2, 1]
    assert all(set(b) == BUILD_KEYS for b in listing["results"])
    assert listing["next"] is None and listing["previous"] is None

    page = ok(call(web, "GET", project + "/builds?limit=2&offset=1", alice))
    assert [b["id"] for b in page["results"]] == [4, 3]
    assert link(page["next"]) == (project + "/builds", {"limit": "2", "offset": "3"})
    assert link(page["previous"]) == (project + "/builds", {"limit": "2", "offset": "0"})
    results, pages = walk_pages(web, alice, project + "/builds?limit=2")
    assert [b["id"] for b in results] == [5, 4, 3, 2, 1] and pages == 3


def _first_build_id(store):
    return store.build_at("alice", "app", 1)["id"]


@pytest.mark.parametrize("listing, change", [
    ("/api/v1/alice/app/builds", lambda store: store.delete_build(_first_build_id(store))),
    ("/api/v1/alice/app/builds?status=created",
     lambda store: store.delete_build(_first_build_id(store))),
    ("/api/v1/alice", lambda store: store.delete_project(store.project("alice", "other")["id"])),
    ("/api/v1/alice/app/builds/1/statuses",
     lambda store: store.transition(_first_build_id(store), "running")),
    ("/api/v1/bookmarks/alice/builds", lambda store: store.bookmark(_first_build_id(store), False)),
])
def test_a_page_and_its_count_see_the_same_moment_while_another_thread_writes(
        web, app, alice, project, monkeypatch, listing, change):
    # The count was read before the rows, apart: a page could say count 40 and
    # no next page beside 41 results, or hold rows it did not count.
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "other"}), 201)
    for _ in range(2):
        unmanaged(web, alice, project)
    ok(call(web, "POST", project + "/builds/1/bookmark", alice))
    before = ok(call(web, "GET", listing, alice))["count"]
    read_rows, changed = app.db.all, []

    def another_thread_writes_first(sql, params=()):  # between the count and the rows
        if "LIMIT" in sql and not changed:
            changed.append(threading.Thread(target=change, args=(app.store,)))
            changed[0].start()
            changed[0].join(10)
        return read_rows(sql, params)

    monkeypatch.setattr(app.db, "all", another_thread_writes_first)
    page = ok(call(web, "GET", listing, alice))
    assert changed and page["count"] == len(page["results"]) == before
    monkeypatch.undo()
    assert ok(call(web, "GET", listing, alice))["count"] != before  # the write took


@pytest.mark.parametrize("statuses", [[], ["created"]])
def test_a_list_of_a_project_deleted_meanwhile_is_none_filtered_or_not(app, statuses):
    # (The route then answers 404, as for any lookup a delete won.)
    app.store.create_user("carol")
    owner = app.store.user_by_name("carol")["id"]
    app.store.create_project(owner, {"name": "gone"})
    project = app.store.project("carol", "gone")
    assert app.store.builds(project["id"], statuses, 20, 0) == (0, [])
    assert app.store.delete_project(project["id"])
    assert app.store.builds(project["id"], statuses, 20, 0) is None


@pytest.mark.parametrize("query, expected", [
    ("created", [6, 1]),
    ("created,succeeded", [6, 3, 1]),
    ("running", [2]),
    ("failed,stopped", [5, 4]),
    ("scheduled", []),
    ("succeeded,", [3]),
    ("stopped,stopped", [4]),
])
def test_builds_list_filters_on_last_status(web, alice, project, query, expected):
    walks = {1: [], 2: ["running"], 3: ["running", "succeeded"], 4: ["stopped"],
             5: ["running", "failed"], 6: []}
    for number, walk in walks.items():
        unmanaged(web, alice, project)
        report(web, alice, f"{project}/builds/{number}", *walk)
    listing = ok(call(web, "GET", f"{project}/builds?status={query}", alice))
    assert [b["id"] for b in listing["results"]] == expected
    assert listing["count"] == len(expected)
    # Paging keeps the filter in its links.
    results, pages = walk_pages(web, alice, f"{project}/builds?status={query}&limit=1")
    assert [b["id"] for b in results] == expected and pages == max(1, len(expected))


def test_build_create_takes_command_env_and_timeout_from_the_project(idle):
    build = ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, {}), 201)
    assert set(build) == BUILD_KEYS
    assert build["command"] == "make all"
    assert build["env"] == {"A": "project", "B": "project"}
    assert build["timeout"] == 600
    assert build["id"] == 1 and HEX32.fullmatch(build["uuid"])
    assert build["unique_name"] == "alice.app.builds.1"
    assert (build["user"], build["project"]) == ("alice", "alice/app")
    assert build["is_managed"] is True and build["last_status"] == "scheduled"
    assert build["tags"] == [] and build["log_size"] == 0 and build["truncated"] is False
    assert build["bookmarked"] is False
    for key in ("name", "description", "started_at", "finished_at", "exit_code", "duration",
                "restarted_from"):
        assert build[key] is None, key
    assert RFC3339_UTC.fullmatch(build["created_at"])
    assert RFC3339_UTC.fullmatch(build["updated_at"])
    assert ok(call(idle.web, "GET", idle.project + "/builds/1", idle.alice)) == build


def test_build_fields_win_over_the_project_and_env_is_merged(idle):
    body = {"command": "make test", "env": {"B": "build", "C": "build"}, "timeout": 5,
            "name": "nightly-1", "description": "the nightly", "tags": ["ci", "nightly"]}
    build = ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, body), 201)
    assert build["env"] == {"A": "project", "B": "build", "C": "build"}
    assert {key: build[key] for key in ("command", "timeout", "name", "description", "tags")} \
        == {key: body[key] for key in ("command", "timeout", "name", "description", "tags")}
    assert ok(call(idle.web, "GET", idle.project + "/builds/1", idle.alice)) == build


def test_a_timeout_of_null_means_no_limit_and_one_left_out_the_projects(web, alice):
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "p", "command": "true",
                                                    "timeout": 600}), 201)
    assert unmanaged(web, alice, "/api/v1/alice/p", timeout=None)["timeout"] is None
    assert unmanaged(web, alice, "/api/v1/alice/p")["timeout"] == 600


def test_is_managed_null_is_managed(web, alice, project):
    build = ok(call(web, "POST", project + "/builds", alice, {"is_managed": None}), 201)
    assert build["is_managed"] is True and build["last_status"] != "created"


def test_build_create_with_no_body_uses_every_default(idle):
    build = ok(call(idle.web, "POST", idle.project + "/builds/", idle.alice), 201)
    assert (build["command"], build["timeout"], build["last_status"]) == ("make all", 600,
                                                                          "scheduled")


def test_build_create_ignores_the_null_fields_polyaxon_client_sends(idle):
    body = {"id": None, "uuid": None, "unique_name": None, "user": None, "project": None,
            "last_status": None, "created_at": None, "updated_at": None, "started_at": None,
            "finished_at": None, "content": None, "definition": None, "backend": None,
            "name": "from-client", "description": None, "tags": None}
    build = ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, body), 201)
    assert build["name"] == "from-client" and build["user"] == "alice"
    assert build["last_status"] == "scheduled" and build["tags"] == []


def test_polyaxons_image_fields_are_taken_and_not_kept(idle):
    # Its tracking client sends backend "other" with every create, and
    # log_backend and log_dockerfile patch them: each was refused.
    path = idle.project + "/builds"
    build = ok(call(idle.web, "POST", path, idle.alice, {"backend": "other", "name": "b"}), 201)
    patched = ok(call(idle.web, "PATCH", f"{path}/{build['id']}", idle.alice,
                      {"backend": "kaniko", "dockerfile": "FROM scratch\n"}))
    assert "backend" not in patched and "dockerfile" not in patched and patched["name"] == "b"
    for bad in ({"backend": 3}, {"dockerfile": ["FROM x"]}):
        assert_error(call(idle.web, "PATCH", f"{path}/{build['id']}", idle.alice, bad), 400,
                     next(iter(bad)))


def test_tags_patched_with_merge_are_added_to_the_builds(idle):
    # Polyaxon's log_tags sends {"tags": [...], "merge": true}: "merge" was refused.
    path = idle.project + "/builds"
    build = ok(call(idle.web, "POST", path, idle.alice, {"tags": ["a", "b"]}), 201)
    url = f"{path}/{build['id']}"
    merged = ok(call(idle.web, "PATCH", url, idle.alice, {"tags": ["c", "a", "c"], "merge": True}))
    assert merged["tags"] == ["a", "b", "c"]
    assert ok(call(idle.web, "PATCH", url, idle.alice, {"tags": ["d"], "merge": False}))["tags"] \
        == ["d"]
    many = [f"t{i}" for i in range(20)]
    assert_error(call(idle.web, "PATCH", url, idle.alice, {"tags": many, "merge": True}), 400,
                 "tags")
    assert ok(call(idle.web, "GET", url, idle.alice))["tags"] == ["d"]
    assert_error(call(idle.web, "PATCH", url, idle.alice, {"tags": ["e"], "merge": "yes"}), 400,
                 "merge")
    before = ok(call(idle.web, "GET", url, idle.alice))
    for nothing in (None, [], ["d"]):  # log_tags(""), log_tags([]): none taken away, nor changed
        assert ok(call(idle.web, "PATCH", url, idle.alice, {"tags": nothing, "merge": True})) \
            == before


def test_a_tracker_that_reports_its_own_stop_or_its_end_after_one_ends_stopped(
        web, alice, project):
    # Polyaxon's tracking client never reads its build back: it reports
    # `stopped` from `running`, and `succeeded` after its owner's stop.
    for number, stop in ((1, False), (2, True)):
        unmanaged(web, alice, project)
        url = f"{project}/builds/{number}"
        report(web, alice, url, "running")
        if stop:
            ok(call(web, "POST", url + "/stop", alice))
        said = ok(call(web, "POST", url + "/statuses", alice,
                       {"status": "succeeded" if stop else "stopped"}), 201)
        assert said["status"] == "stopped"
        history = ok(call(web, "GET", url + "/statuses", alice))["results"]
        assert [e["status"] for e in history] == ["created", "running", "stopping", "stopped"]
        assert [e["id"] for e in history] == [1, 2, 3, 4]


def test_build_create_by_an_admin_records_the_admin_as_its_user(web, admin, alice, project):
    build = unmanaged(web, admin, project)
    assert build["user"] == "root" and build["project"] == "alice/app"


def test_unmanaged_build_stays_created_and_is_never_run(web, alice, project, tmp_path):
    marker = tmp_path / "ran"
    build = unmanaged(web, alice, project, command=f"touch {marker}")
    assert build["last_status"] == "created" and build["is_managed"] is False
    # The runner takes and finishes a build created after it...
    managed = ok(call(web, "POST", project + "/builds", alice, {}), 201)
    assert final_build(web, alice, f"{project}/builds/{managed['id']}")["last_status"] \
        == "succeeded"
    # ...and never touched the unmanaged one.
    again = ok(call(web, "GET", f"{project}/builds/{build['id']}", alice))
    assert again == build
    statuses = ok(call(web, "GET", f"{project}/builds/{build['id']}/statuses", alice))
    assert [s["status"] for s in statuses["results"]] == ["created"]
    assert not marker.exists()


@pytest.mark.parametrize("body", [{}, {"command": None}, {"is_managed": True, "env": {"A": "1"}}])
def test_build_without_a_command_anywhere_is_400_and_creates_nothing(web, alice, body):
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "bare"}), 201)
    before = snapshot(web, alice, "/api/v1/alice/bare")
    assert_error(call(web, "POST", "/api/v1/alice/bare/builds", alice, body), 400, "command")
    assert snapshot(web, alice, "/api/v1/alice/bare") == before
    assert unmanaged(web, alice, "/api/v1/alice/bare", command="true")["id"] == 1


def test_patch_build_changes_name_description_and_tags(web, alice, populated):
    url = populated + "/builds/1"
    before = ok(call(web, "GET", url, alice))
    patched = ok(call(web, "PATCH", url, alice,
                      {"name": "renamed", "description": "new words", "tags": ["z"]}))
    assert (patched["name"], patched["description"], patched["tags"]) == ("renamed", "new words",
                                                                          ["z"])
    unchanged = {key for key in BUILD_KEYS} - {"name", "description", "tags", "updated_at"}
    assert {k: patched[k] for k in unchanged} == {k: before[k] for k in unchanged}
    assert patched["updated_at"] >= before["updated_at"]
    assert ok(call(web, "GET", url, alice)) == patched

    cleared = ok(call(web, "PATCH", url + "/", alice, {"name": None, "tags": []}))
    assert (cleared["name"], cleared["description"], cleared["tags"]) == (None, "new words", [])


def test_delete_build_answers_200_then_404_and_its_id_is_never_reused(web, alice, project):
    for _ in range(3):
        unmanaged(web, alice, project)
    append_log(web, alice, project + "/builds/3", b"bye\n")
    res = call(web, "DELETE", project + "/builds/3", alice)
    assert res.status_int == 200 and isinstance(res.json["detail"], str)
    for method, suffix in (("GET", ""), ("DELETE", ""), ("PATCH", ""), ("GET", "/statuses"),
                           ("GET", "/statuses/1"), ("GET", "/logs"), ("POST", "/stop"),
                           ("POST", "/restart")):
        body = {"name": "x"} if method == "PATCH" else None
        assert_error(send(web, method, project + "/builds/3" + suffix, alice, body), 404)
    listing = ok(call(web, "GET", project + "/builds", alice))
    assert [b["id"] for b in listing["results"]] == [2, 1] and listing["count"] == 2
    # The highest id was deleted; the next build still gets a new one.
    assert unmanaged(web, alice, project)["id"] == 4
    ok(call(web, "DELETE", project + "/builds/1/", alice))
    assert unmanaged(web, alice, project)["id"] == 5
    assert ok(call(web, "GET", project, alice))["builds_count"] == 3


@pytest.mark.parametrize("suffix", ["", "/", "/stop", "/stop/"])
def test_stop_of_a_scheduled_build_stops_it_at_once(idle, suffix):
    build = ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, {}), 201)
    assert build["last_status"] == "scheduled"
    url = f"{idle.project}/builds/{build['id']}"
    stopped = ok(call(idle.web, "POST", url + suffix, idle.alice))
    assert set(stopped) == BUILD_KEYS
    assert stopped["last_status"] == "stopped"
    assert RFC3339_UTC.fullmatch(stopped["finished_at"])
    assert stopped["started_at"] is None and stopped["exit_code"] is None
    statuses = ok(call(idle.web, "GET", url + "/statuses", idle.alice))["results"]
    assert [s["status"] for s in statuses] == ["created", "scheduled", "stopped"]
    assert statuses[-1]["message"] == "stopped by alice"
    assert ok(call(idle.web, "GET", url, idle.alice)) == stopped


@pytest.mark.parametrize("route, method", [("/builds", "POST"), ("", "PATCH"),
                                           ("/builds/1", "PATCH"), ("/builds/1/coderef", "POST")])
@pytest.mark.parametrize("body", [b"\x0b", b"\x0c", b" \x0c\n"])
def test_a_body_of_what_json_does_not_call_space_is_no_empty_body(web, alice, project, route,
                                                                  method, body):
    # bytes.strip() takes \x0b and \x0c for space: such a body made a build,
    # or wiped a build's code reference, as an empty one would.
    unmanaged(web, alice, project)
    ok(call(web, "POST", project + "/builds/1/coderef", alice, {"commit": "abcd1234"}), 201)
    before = ok(call(web, "GET", project + "/builds/1/coderef", alice))
    res = call(web, method, project + route, alice, body=body, content_type="application/json")
    assert_error(res, 400)
    assert res.json["detail"] == "The request body is not valid JSON."
    assert ok(call(web, "GET", project + "/builds/1/coderef", alice)) == before
    assert ok(call(web, "GET", project + "/builds", alice))["count"] == 1


@pytest.mark.parametrize("route", ["", "/builds/1"])
@pytest.mark.parametrize("body", [b"", b"\t", b" \r\n"])
def test_a_patch_of_a_blank_body_changes_nothing_and_answers_the_object(web, alice, project,
                                                                         route, body):
    # README: a blank body (JSON's white space alone) counts as none.
    unmanaged(web, alice, project)
    before = ok(call(web, "GET", project + route, alice))
    res = call(web, "PATCH", project + route, alice, body=body, content_type="application/json")
    assert ok(res) == before == ok(call(web, "GET", project + route, alice))


@pytest.mark.parametrize("body, headers, status, detail", [
    # Stored as it came, compressed; or said to be no JSON, which it was.
    (gzip.compress(b'{"description": "x"}'), {"Content-Encoding": "gzip"}, 415,
     "The request body must be sent uncompressed, not with Content-Encoding 'gzip'."),
    # json.loads takes UTF-16 and UTF-32 bytes: the spec says UTF-8.
    ('{"description": "x"}'.encode("utf-16"), {}, 400, "The request body is not UTF-8 text."),
    ('{"description": "x"}'.encode("utf-32"), {}, 400, "The request body is not UTF-8 text."),
    # Valid JSON, past Python's limit on an int's digits: "not valid JSON".
    (b'{"timeout": ' + b"9" * 4301 + b"}", {}, 400,
     "The request body holds a number with more digits than any field takes."),
    (json.dumps({f"unknown{n:05}": 1 for n in range(5000)}).encode(), {}, 400,
     "The request has invalid fields: " + ", ".join(f"unknown{n:05}" for n in range(10))
     + " and 4990 more.")], ids=["gzip", "utf-16", "utf-32", "digits", "fields"])
def test_a_body_compressed_not_utf_8_or_past_pythons_limits_is_refused_saying_why(
        web, alice, project, body, headers, status, detail):
    res = call(web, "PATCH", project, alice, body=body, content_type="application/json",
               headers=headers)
    assert_error(res, status)
    assert res.json["detail"] == detail
    assert len(res.json.get("errors") or {}) <= 10
    assert ok(call(web, "GET", project, alice))["description"] is None


@pytest.mark.parametrize("coding", ["", "identity", "identity, identity", " Identity "])
def test_a_content_encoding_that_compresses_nothing_is_taken(web, alice, project, coding):
    res = call(web, "PATCH", project, alice, body=b'{"description": "x"}',
               content_type="application/json", headers={"Content-Encoding": coding})
    assert ok(res)["description"] == "x"


def test_a_bodiless_request_with_a_content_encoding_is_no_415(web, alice, project):
    unmanaged(web, alice, project)
    res = call(web, "POST", project + "/builds/1/stop", alice, headers={"Content-Encoding": "gzip"})
    assert ok(res)["last_status"] == "stopped"


def test_a_log_sent_compressed_is_refused_not_stored_compressed(web, alice, project):
    unmanaged(web, alice, project)
    res = call(web, "POST", project + "/builds/1/logs", alice, body=gzip.compress(b"hello\n"),
               content_type="text/plain", headers={"Content-Encoding": "gzip"})
    assert_error(res, 415)
    assert ok(call(web, "GET", project + "/builds/1", alice))["log_size"] == 0


def test_a_status_is_found_by_its_uuid_in_capitals_too(web, alice, project):
    unmanaged(web, alice, project)
    entry = ok(call(web, "POST", project + "/builds/1/statuses", alice, {"status": "running"}), 201)
    found = ok(call(web, "GET", f"{project}/builds/1/statuses/{entry['uuid'].upper()}", alice))
    assert found["uuid"] == entry["uuid"]


def test_a_status_is_found_by_its_uuid_with_hyphens_but_not_half_hyphenated(web, alice, project):
    unmanaged(web, alice, project)
    entry = ok(call(web, "POST", project + "/builds/1/statuses", alice, {"status": "running"}), 201)
    hyphenated = str(uuid.UUID(entry["uuid"]))
    found = ok(call(web, "GET", f"{project}/builds/1/statuses/{hyphenated.upper()}", alice))
    assert found["uuid"] == entry["uuid"]
    half = hyphenated.replace("-", "", 1)
    assert_error(call(web, "GET", f"{project}/builds/1/statuses/{half}", alice), 404)


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_other_methods_on_the_project_wide_invalidate_are_405_not_a_build_named_so(
        web, alice, project, method):
    res = call(web, method, project + "/builds/invalidate", alice)
    assert_error(res, 405)
    assert res.headers["Allow"] == "POST"


def test_bookmarks_of_a_reserved_name_ask_for_a_token_first_and_then_name_no_user(
        web, alice, admin):
    # It was "There is no endpoint at ...", before any token was asked for.
    assert_error(call(web, "GET", "/api/v1/bookmarks/health/builds"), 401)
    assert_error(call(web, "GET", "/api/v1/bookmarks/health/builds", alice), 403)
    res = call(web, "GET", "/api/v1/bookmarks/health/builds", admin)
    assert_error(res, 404)
    assert res.json["detail"] == "There is no user 'health'."


def test_stop_of_a_created_unmanaged_build_stops_it_at_once(web, alice, project):
    unmanaged(web, alice, project)
    stopped = ok(call(web, "POST", project + "/builds/1/stop", alice))
    assert stopped["last_status"] == "stopped"


def test_stop_of_a_running_unmanaged_build_asks_its_runner_to_stop(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    report(web, alice, url, "running")
    assert ok(call(web, "POST", url, alice))["last_status"] == "stopping"
    # Whatever runs it sees `stopping` and reports the end.
    report(web, alice, url, "stopped")
    assert ok(call(web, "GET", url, alice))["last_status"] == "stopped"


def test_statuses_reported_at_once_are_timed_in_the_order_they_are_recorded(server_factory):
    # Each report read the clock before it waited for the write lock: behind
    # a slow commit (here another connection's), `succeeded` could be stamped
    # before the `running` recorded ahead of it, and the duration came out < 0.
    server = server_factory()
    assert server.json("POST", "/api/v1/admin", {"name": "timed"})[0] == 201
    made = [server.json("POST", "/api/v1/admin/timed/builds", {"is_managed": False})[1]
            for _ in range(20)]
    builds = [f"/api/v1/admin/timed/builds/{build['id']}" for build in made]
    holder = sqlite3.connect(os.path.join(server.data_dir, "buildserver.db"),
                             isolation_level=None, timeout=30)
    holder.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(40) as pool:
        answers = [pool.submit(server.json, "POST", build + "/statuses", {"status": status})
                   for build in builds for status in ("succeeded", "running")]
        time.sleep(1)  # (every report is waiting for the lock by now, or soon)
        holder.execute("COMMIT")
        holder.close()
        assert {answer.result(timeout=60)[0] for answer in answers} <= {201, 400}
    for build in builds:
        _, detail = server.json("GET", build)
        _, statuses = server.json("GET", build + "/statuses")
        times = [entry["created_at"] for entry in statuses["results"]]
        assert times == sorted(times), statuses
        assert detail["duration"] is None or detail["duration"] >= 0, detail


@pytest.mark.parametrize("walk", [["running", "succeeded"], ["running", "failed"], ["stopped"],
                                  ["running", "stopping", "stopped"]])
def test_stop_of_a_finished_build_changes_nothing(web, alice, project, walk):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    report(web, alice, url, *walk)
    before = snapshot(web, alice, project)
    for suffix in ("", "/stop"):
        assert ok(call(web, "POST", url + suffix, alice)) == before[url][0]
    assert snapshot(web, alice, project) == before


def test_restart_makes_a_new_build_with_the_same_command_env_timeout_name_and_tags(idle):
    body = {"command": "make test", "env": {"C": "build"}, "timeout": 7, "name": "n1",
            "tags": ["t1", "t2"]}
    original = ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, body), 201)
    url = idle.project + "/builds/1"
    original = ok(call(idle.web, "POST", url + "/stop", idle.alice))
    # The project changing afterwards does not change what a restart runs.
    ok(call(idle.web, "PATCH", idle.project, idle.alice,
            {"command": "other", "env": {}, "timeout": 1}))

    again = ok(call(idle.web, "POST", url + "/restart", idle.alice), 201)
    assert set(again) == BUILD_KEYS
    assert again["id"] == 2 and again["restarted_from"] == 1
    assert again["uuid"] != original["uuid"]
    for key in ("command", "env", "timeout", "name", "tags"):
        assert again[key] == original[key], key
    assert again["env"] == {"A": "project", "B": "project", "C": "build"}
    assert again["last_status"] == "scheduled" and again["finished_at"] is None
    assert ok(call(idle.web, "GET", url, idle.alice)) == original
    assert ok(call(idle.web, "GET", idle.project + "/builds/2", idle.alice)) == again

    third = ok(call(idle.web, "POST", idle.project + "/builds/2/restart/", idle.alice), 201)
    assert (third["id"], third["restarted_from"], third["command"]) == (3, 2, "make test")


def test_a_deleted_builds_id_is_never_given_to_another_build(web, alice, bob, project, app):
    # A request looks a build up, then writes and reads it by its id: SQLite
    # would give a deleted newest build's id to the next build, whoever makes
    # it, and the request would reach (and show) that other user's build.
    unmanaged(web, alice, project)
    first = app.db.one("SELECT id FROM builds")[0]
    ok(call(web, "DELETE", project + "/builds/1", alice))
    ok(call(web, "POST", "/api/v1/bob", bob, {"name": "b", "command": "true"}), 201)
    unmanaged(web, bob, "/api/v1/bob/b")
    assert app.db.one("SELECT id FROM builds")[0] == first + 1
    with app.db.write() as c:  # a row written by hand (a restore, say) is stepped over too
        c.execute("INSERT INTO builds (id, project_id, number, uuid, user, last_status,"
                  " is_managed, created_at, updated_at) SELECT 1000, project_id, 99, ?,"
                  " 'bob', 'created', 0, created_at, updated_at FROM builds",
                  (secrets.token_hex(16),))
    unmanaged(web, bob, "/api/v1/bob/b")
    assert app.db.one("SELECT max(id) FROM builds")[0] == 1001


def test_a_deleted_projects_id_is_never_given_to_another_project(web, alice, bob, app):
    # As for builds: a delete that looked a project up and then waited for its
    # builds deleted whichever project had taken its id meanwhile (bob's).
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "a"}), 201)
    first = app.db.one("SELECT id FROM projects")[0]
    ok(call(web, "DELETE", "/api/v1/alice/a", alice))
    ok(call(web, "POST", "/api/v1/bob", bob, {"name": "b"}), 201)
    assert app.db.one("SELECT id FROM projects")[0] == first + 1


# What Polyaxon's client records beside a run ------------------------------------

def test_a_bookmark_is_set_and_removed_and_shows_in_the_build_and_the_list(
        web, alice, bob, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    before = ok(call(web, "GET", url, alice))
    for _ in range(2):  # twice: the same answer
        marked = ok(call(web, "POST", url + "/bookmark", alice))
        assert marked == {**before, "bookmarked": True}
    assert ok(call(web, "GET", project + "/builds", alice))["results"][0]["bookmarked"] is True
    assert_error(call(web, "POST", url + "/bookmark", bob), 403)
    assert_error(call(web, "DELETE", url + "/unbookmark", bob), 403)
    assert ok(call(web, "GET", url, alice))["bookmarked"] is True
    unmarked = ok(call(web, "DELETE", url + "/unbookmark/", alice))
    assert unmarked["bookmarked"] is False and unmarked["updated_at"] == before["updated_at"]
    assert_error(call(web, "POST", project + "/builds/2/bookmark", alice), 404)
    assert_error(call(web, "GET", url + "/bookmark", alice), 405)


def test_bookmarked_builds_are_listed_per_user_newest_first_as_polyaxon_lists_them(
        web, alice, bob, admin, project):
    other = "/api/v1/alice/other"
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "other"}), 201)
    for path in (project, project, other, project):
        unmanaged(web, alice, path)
    for url in (project + "/builds/1", other + "/builds/1", project + "/builds/3"):
        ok(call(web, "POST", url + "/bookmark", alice))
    ok(call(web, "POST", "/api/v1/bob", bob, {"name": "b"}), 201)
    unmanaged(web, bob, "/api/v1/bob/b")
    ok(call(web, "POST", "/api/v1/bob/b/builds/1/bookmark", bob))
    listing = ok(call(web, "GET", "/api/v1/bookmarks/alice/builds", alice))
    assert listing["count"] == 3 and listing["next"] is None
    assert [(r["content_object"]["project"], r["content_object"]["id"])
            for r in listing["results"]] == [("alice/app", 3), ("alice/other", 1), ("alice/app", 1)]
    assert listing["results"][0]["content_object"] == ok(call(web, "GET", project + "/builds/3",
                                                                alice))
    first = ok(call(web, "GET", "/api/v1/bookmarks/alice/builds/?limit=2", alice))
    assert len(first["results"]) == 2 and first["next"].endswith(
        "/api/v1/bookmarks/alice/builds/?limit=2&offset=2")
    ok(call(web, "DELETE", project + "/builds/3/unbookmark", alice))
    assert ok(call(web, "GET", "/api/v1/bookmarks/alice/builds", alice))["count"] == 2
    assert ok(call(web, "GET", "/api/v1/bookmarks/alice/builds", admin))["count"] == 2
    assert_error(call(web, "GET", "/api/v1/bookmarks/alice/builds", bob), 403)
    assert_error(call(web, "GET", "/api/v1/bookmarks/nobody/builds", admin), 404)
    assert_error(call(web, "GET", "/api/v1/bookmarks/alice/builds?limit=0", alice), 400, "limit")


def test_a_projects_builds_invalidate_is_answered_and_changes_nothing(web, alice, bob, project):
    unmanaged(web, alice, project)
    before = snapshot(web, alice, project)
    answer = ok(call(web, "POST", project + "/builds/invalidate/", alice))
    assert answer["detail"].startswith("Nothing to invalidate in alice/app")
    assert_error(call(web, "POST", project + "/builds/invalidate", bob), 403)
    assert_error(call(web, "POST", "/api/v1/alice/nope/builds/invalidate", alice), 404)
    assert snapshot(web, alice, project) == before


BODILESS = [("POST", "/builds/1/restart"), ("POST", "/builds/1/stop"), ("POST", "/builds/1"),
            ("POST", "/builds/1/bookmark"), ("DELETE", "/builds/1/unbookmark"),
            ("POST", "/builds/1/invalidate"), ("POST", "/builds/1/_heartbeat"),
            ("POST", "/builds/invalidate"), ("DELETE", "/builds/1"), ("DELETE", "")]


@pytest.mark.parametrize("method, suffix", BODILESS)
@pytest.mark.parametrize("body", [b'{"command": "echo other"}', b"garbage", b"[]", b'"x"'])
def test_a_body_sent_to_a_route_that_takes_none_is_400_and_changes_nothing(
        web, alice, bob, project, method, suffix, body):
    # A restart's "command", say, would otherwise be silently ignored.
    unmanaged(web, alice, project)
    before = snapshot(web, alice, project)
    res = call(web, method, project + suffix, alice, body=body, content_type="application/json")
    assert "takes no request body" in assert_error(res, 400)["detail"]
    assert snapshot(web, alice, project) == before
    assert_error(call(web, method, project + suffix, bob, body=body,
                      content_type="application/json"), 403)  # 403 first, as always


@pytest.mark.parametrize("body", [None, b"", b"  \n", b"{}", b" { } ", b"null"])
def test_an_empty_body_nothing_or_null_is_taken_where_a_route_takes_no_body(
        web, alice, project, body):
    unmanaged(web, alice, project)
    res = call(web, "POST", project + "/builds/1/restart", alice, body=body,
               content_type="application/json" if body is not None else None)
    assert ok(res, 201)["restarted_from"] == 1
    assert ok(call(web, "POST", project + "/builds/1/bookmark", alice, body=body,
                   content_type="application/json" if body is not None else None))["bookmarked"]


def test_a_code_reference_is_recorded_read_back_and_replaced(web, alice, bob, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1/coderef"
    nothing = {"commit": None, "head": None, "branch": None, "git_url": None, "is_dirty": None}
    assert ok(call(web, "GET", url, alice)) == nothing  # until one is recorded
    first = {"commit": "3f2a9c0d" * 5, "branch": "main", "git_url": "git@host:team/app.git",
             "is_dirty": False}
    assert ok(call(web, "POST", url, alice, first), 201) == {**first, "head": None}
    assert ok(call(web, "GET", url + "/", alice)) == {**first, "head": None}
    # Each POST replaces the whole reference; "" (what Polyaxon's tracker sends
    # for a repository without a remote) is null.
    second = {"commit": "ab12", "head": "ab12", "git_url": "", "branch": ""}
    assert ok(call(web, "POST", url, alice, second), 201) == \
        {"commit": "ab12", "head": "ab12", "branch": None, "git_url": None, "is_dirty": None}
    # What the tracker sends from a repository with no commit yet, with the id of its schema.
    fresh = {"id": None, "commit": "", "head": "HEAD", "branch": "HEAD", "git_url": None,
             "is_dirty": False}
    assert ok(call(web, "POST", url, alice, fresh), 201) == \
        {"commit": None, "head": None, "branch": "HEAD", "git_url": None, "is_dirty": False}
    assert_error(call(web, "POST", url, bob, first), 403)
    assert_error(call(web, "GET", url, bob), 403)
    assert_error(call(web, "GET", project + "/builds/2/coderef", alice), 404)
    # The build's own fields do not change, and a restart does not claim the same code.
    assert ok(call(web, "GET", project + "/builds/1", alice))["last_status"] == "created"
    ok(call(web, "POST", project + "/builds/1/restart", alice, {}), 201)
    assert ok(call(web, "GET", project + "/builds/2/coderef", alice)) == nothing


@pytest.mark.parametrize("field, value", [
    ("commit", "not-hex"), ("commit", "abc"), ("commit", "a" * 65), ("commit", 1234),
    ("head", "xyz1"), ("head", "head"), ("id", 3), ("branch", "a\nb"), ("branch", "b" * 256),
    ("branch", "a\x7fb"), ("branch", "a\u009bb"),  # (DEL; a C1 control, CSI to some terminals)
    ("git_url", "https://x/a b"), ("git_url", "u" * 2049), ("git_url", ["x"]),
    ("git_url", "https://x/a\u0085b"), ("git_url", "https://x/a\u00a0b"),
    ("git_url", "https://x/a\u3000b"),
    ("is_dirty", "no"), ("is_dirty", 0), ("colour", "red")])
def test_an_invalid_code_reference_is_400_naming_its_field_and_changes_nothing(
        web, alice, project, field, value):
    unmanaged(web, alice, project)
    url = project + "/builds/1/coderef"
    stored = ok(call(web, "POST", url, alice, {"commit": "abcdef12"}), 201)
    assert_error(call(web, "POST", url, alice, {"branch": "main", field: value}), 400, field)
    assert ok(call(web, "GET", url, alice)) == stored


@pytest.mark.parametrize("body", [b"[]", b'"main"', b"{", b"null"])
def test_a_code_reference_that_is_not_an_object_is_400(web, alice, project, body):
    unmanaged(web, alice, project)
    url = project + "/builds/1/coderef"
    assert_error(call(web, "POST", url, alice, body=body, content_type="application/json"), 400)
    assert ok(call(web, "GET", url, alice))["commit"] is None


def test_invalidate_and_heartbeat_are_answered_and_change_nothing(web, alice, bob, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    report(web, alice, url, "running")
    before = snapshot(web, alice, project)
    assert _stable(ok(call(web, "POST", url + "/invalidate", alice))) == before[url][0]
    for suffix in ("/_heartbeat", "/_heartbeat/"):
        assert ok(call(web, "POST", url + suffix, alice)) == {"status": "ok"}
    for suffix in ("/invalidate", "/_heartbeat"):
        assert_error(call(web, "POST", url + suffix, bob), 403)
        assert_error(call(web, "POST", project + "/builds/2" + suffix, alice), 404)
    assert snapshot(web, alice, project) == before


# Statuses --------------------------------------------------------------------

def test_a_running_builds_duration_grows_between_reads_of_an_unchanged_row(web, alice, project):
    # Nothing is committed between the reads: the row is remembered, and the
    # answer of a build that is not running is too, but a running one's is not.
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    ok(call(web, "POST", url + "/statuses", alice, {"status": "running"}), 201)
    first = ok(call(web, "GET", url, alice))["duration"]
    wait_until(lambda: ok(call(web, "GET", url, alice))["duration"] > first,
               message="the duration to grow")
    ok(call(web, "POST", url + "/statuses", alice, {"status": "succeeded"}), 201)
    done = ok(call(web, "GET", url, alice))
    assert ok(call(web, "GET", url, alice)) == done  # settled: the same answer
    renamed = ok(call(web, "PATCH", url, alice, {"name": "renamed"}))
    assert ok(call(web, "GET", url, alice)) == renamed != done


def test_reported_statuses_walk_created_running_succeeded(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    running = ok(call(web, "POST", url + "/statuses", alice,
                      {"status": "running", "message": "picked up by ci-3"}), 201)
    assert set(running) == STATUS_KEYS
    assert (running["id"], running["job"], running["status"], running["message"]) \
        == (2, 1, "running", "picked up by ci-3")
    build = ok(call(web, "GET", url, alice))
    assert build["last_status"] == "running" and RFC3339_UTC.fullmatch(build["started_at"])
    assert build["finished_at"] is None and build["duration"] >= 0

    done = ok(call(web, "POST", url + "/statuses/", alice, {"status": "succeeded"}), 201)
    assert (done["id"], done["status"], done["message"]) == (3, "succeeded", None)
    build = ok(call(web, "GET", url, alice))
    assert build["last_status"] == "succeeded" and RFC3339_UTC.fullmatch(build["finished_at"])
    assert build["duration"] >= 0

    listing = ok(call(web, "GET", url + "/statuses", alice))
    assert listing["count"] == 3
    entries = listing["results"]
    assert [e["status"] for e in entries] == ["created", "running", "succeeded"]
    assert [e["id"] for e in entries] == [1, 2, 3]
    assert all(set(e) == STATUS_KEYS and e["job"] == 1 and HEX32.fullmatch(e["uuid"])
               and RFC3339_UTC.fullmatch(e["created_at"]) for e in entries)
    assert len({e["uuid"] for e in entries}) == 3
    assert [e["created_at"] for e in entries] == sorted(e["created_at"] for e in entries)
    assert entries[1:] == [running, done]


def test_statuses_of_a_managed_build_are_listed_oldest_first_and_page(idle):
    ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, {}), 201)
    url = idle.project + "/builds/1"
    ok(call(idle.web, "POST", url + "/stop", idle.alice))
    listing = ok(call(idle.web, "GET", url + "/statuses", idle.alice))
    assert [e["status"] for e in listing["results"]] == ["created", "scheduled", "stopped"]
    page = ok(call(idle.web, "GET", url + "/statuses?limit=1&offset=1", idle.alice))
    assert [e["status"] for e in page["results"]] == ["scheduled"] and page["count"] == 3
    assert link(page["next"])[1] == {"limit": "1", "offset": "2"}
    results, pages = walk_pages(idle.web, idle.alice, url + "/statuses?limit=2")
    assert results == listing["results"] and pages == 2


def test_status_detail_by_number_and_by_uuid(web, alice, populated):
    url = populated + "/builds/2"
    entries = ok(call(web, "GET", url + "/statuses", alice))["results"]
    assert len(entries) == 3
    for entry in entries:
        for key in (str(entry["id"]), entry["uuid"]):
            for slash in ("", "/"):
                assert ok(call(web, "GET", f"{url}/statuses/{key}{slash}", alice)) == entry


@pytest.mark.parametrize("status_id", ["0", "4", "abc", "-1", "1.5", "99999999999999999999999",
                                       "0" * 32, "f" * 32, "OTHER_BUILDS_UUID", "%C2%B2",
                                       "%EF%BC%91"])
def test_unknown_status_is_404(web, alice, populated, status_id):
    if status_id == "OTHER_BUILDS_UUID":  # a real status, of another build
        status_id = ok(call(web, "GET", populated + "/builds/1/statuses", alice))[
            "results"][0]["uuid"]
    assert_error(call(web, "GET", f"{populated}/builds/2/statuses/{status_id}", alice), 404)


@pytest.mark.parametrize("walk", [
    ["running", "succeeded"], ["running", "failed"], ["running", "stopping", "stopped"],
    ["running", "stopping", "failed"], ["stopped"], ["scheduled", "running", "succeeded"],
    ["scheduled", "stopped"],
])
def test_reported_statuses_may_take_every_edge_of_the_machine(web, alice, project, walk):
    unmanaged(web, alice, project)
    report(web, alice, project + "/builds/1", *walk)
    statuses = ok(call(web, "GET", project + "/builds/1/statuses", alice))["results"]
    assert [s["status"] for s in statuses] == ["created", *walk]
    assert ok(call(web, "GET", project + "/builds/1", alice))["last_status"] == walk[-1]


def test_a_reported_traceback_is_appended_to_the_message(web, alice, project):
    url = f"{project}/builds/{unmanaged(web, alice, project)['id']}"
    report(web, alice, url, "running")
    entry = ok(call(web, "POST", url + "/statuses", alice,
                    {"status": "failed", "message": "boom", "traceback": "Traceback: x"}), 201)
    assert entry["message"] == "boom\nTraceback: x"
    alone = f"{project}/builds/{unmanaged(web, alice, project)['id']}"
    entry = ok(call(web, "POST", alone + "/statuses", alice, {"status": "stopped",
                                                              "traceback": "tb"}), 201)
    assert entry["message"] == "tb"


def test_an_unmanaged_build_that_succeeds_after_its_stop_ends_stopped_saying_so(
        web, alice, project):
    url = f"{project}/builds/{unmanaged(web, alice, project)['id']}"
    report(web, alice, url, "running")
    ok(call(web, "POST", url + "/stop", alice))
    entry = ok(call(web, "POST", url + "/statuses", alice, {"status": "succeeded"}), 201)
    assert (entry["status"], entry["message"]) == ("stopped",
                                                   "it succeeded after its stop was asked")


@pytest.mark.parametrize("walk, status", [
    ([], "created"),                               # the same status twice
    ([], "succeeded"),                             # skips running
    ([], "failed"),
    ([], "stopping"),
    (["running"], "running"),
    (["running"], "scheduled"),
    (["running"], "created"),
    (["running", "succeeded"], "running"),         # nothing after a final status
    (["running", "succeeded"], "succeeded"),
    (["running", "succeeded"], "failed"),
    (["running", "failed"], "stopped"),
    (["stopped"], "running"),
    (["stopped"], "stopped"),
    (["running", "stopping"], "running"),
    (["running", "stopping"], "stopping"),
])
def test_reported_status_that_breaks_the_machine_is_400_and_changes_nothing(
        web, alice, project, walk, status):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    report(web, alice, url, *walk)
    before = snapshot(web, alice, project)
    assert_error(call(web, "POST", url + "/statuses", alice, {"status": status}), 400, "status")
    assert snapshot(web, alice, project) == before


@pytest.mark.parametrize("body, field", [
    ({"status": "bogus"}, "status"),
    ({"status": "RUNNING"}, "status"),
    ({"status": ""}, "status"),
    ({"status": None}, "status"),
    ({"status": 1}, "status"),
    ({}, "status"),
    ({"message": "no status"}, "status"),
    ({"status": "running", "message": 5}, "message"),
    ({"status": "running", "color": "red"}, "color"),
])
def test_invalid_status_report_is_400_naming_the_field(web, alice, project, body, field):
    unmanaged(web, alice, project)
    before = snapshot(web, alice, project)
    assert_error(call(web, "POST", project + "/builds/1/statuses", alice, body), 400, field)
    assert snapshot(web, alice, project) == before


@pytest.mark.parametrize("status", ["running", "stopped", "succeeded", "scheduled"])
def test_reporting_a_status_on_a_managed_build_is_400(idle, status):
    ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, {}), 201)
    before = snapshot(idle.web, idle.alice, idle.project)
    res = call(idle.web, "POST", idle.project + "/builds/1/statuses", idle.alice,
               {"status": status})
    assert_error(res, 400)
    assert snapshot(idle.web, idle.alice, idle.project) == before


# Logs ------------------------------------------------------------------------

def test_log_append_stores_the_raw_body_and_answers_the_size(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    assert append_log(web, alice, url, b"one\n") == {"size": 4}
    # Anything not declared JSON is bytes, kept as they are.
    res = call(web, "POST", url + "/logs", alice, body=b'"quoted"\n', content_type="text/plain")
    assert ok(res) == {"size": 13}
    res = call(web, "POST", url + "/logs/", alice, body=b"\xff\x00bin",
               content_type="application/octet-stream")
    assert ok(res) == {"size": 18}
    res = call(web, "POST", url + "/logs", alice, body=b"a=b&c",  # what curl -d sends
               content_type="application/x-www-form-urlencoded")
    assert ok(res) == {"size": 23}
    assert ok(call(web, "GET", url + "/logs", alice)) == b'one\n"quoted"\n\xff\x00bina=b&c'
    assert ok(call(web, "GET", url, alice))["log_size"] == 23


@pytest.mark.parametrize("content_type, body, stored", [
    ("application/json", json.dumps("héllo wörld\n"), "héllo wörld\n".encode()),
    ("application/json; charset=utf-8", json.dumps("x"), b"x"),
    ("application/json", json.dumps(["one", "two"]), b"one\ntwo\n"),
    ("application/json", json.dumps("🎉\n", ensure_ascii=True), "🎉\n".encode()),
    ("application/json", json.dumps([]), b""),
])
def test_log_append_of_a_json_string_or_lines_appends_their_text(web, alice, project,
                                                                 content_type, body, stored):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"start\n")
    res = call(web, "POST", url + "/logs", alice, body=body.encode(), content_type=content_type)
    assert ok(res) == {"size": 6 + len(stored)}
    assert ok(call(web, "GET", url + "/logs", alice)) == b"start\n" + stored


@pytest.mark.parametrize("body", [b"{", b"5", b'{"text": "x"}', b'["a", 1]', b"null", b"\xff"])
def test_log_append_declared_json_but_not_a_string_is_appended_as_raw_bytes(web, alice, project,
                                                                           body):
    # SPEC: a JSON string appends its text; "any other body is appended as raw bytes".
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"kept\n")
    res = call(web, "POST", url + "/logs", alice, body=body, content_type="application/json")
    assert ok(res) == {"size": 5 + len(body)}
    assert ok(call(web, "GET", url + "/logs", alice)) == b"kept\n" + body


def test_log_append_is_refused_on_a_managed_build(idle):
    ok(call(idle.web, "POST", idle.project + "/builds", idle.alice, {}), 201)
    before = snapshot(idle.web, idle.alice, idle.project)
    assert_error(call(idle.web, "POST", idle.project + "/builds/1/logs", idle.alice,
                      body=b"forged output\n"), 400)
    assert snapshot(idle.web, idle.alice, idle.project) == before


@pytest.mark.parametrize("walk", [["running", "succeeded"], ["running", "failed"], ["stopped"],
                                  ["running", "stopping", "stopped"]])
def test_log_append_is_refused_once_the_build_is_final(web, alice, project, walk):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"the end\n")
    report(web, alice, url, *walk)
    before = snapshot(web, alice, project)
    assert_error(call(web, "POST", url + "/logs", alice, body=b"late\n"), 400)
    assert snapshot(web, alice, project) == before


def test_log_text_carries_size_and_more_data_headers(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"abc\n")
    res = call(web, "GET", url + "/logs", alice)
    assert res.status_int == 200 and res.body == b"abc\n"
    assert res.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert (res.headers["X-Log-Size"], res.headers["X-More-Data"]) == ("4", "true")
    res = call(web, "GET", url + "/logs?offset=2", alice)
    assert res.body == b"c\n" and res.headers["X-Log-Size"] == "4"
    report(web, alice, url, "running", "succeeded")
    res = call(web, "GET", url + "/logs", alice)
    assert (res.headers["X-Log-Size"], res.headers["X-More-Data"]) == ("4", "false")


LOG_TEXT = b"alpha\nbeta\ngamma\n"


def test_a_text_log_read_from_past_its_end_is_empty(web, alice, project):
    url = f"{project}/builds/{unmanaged(web, alice, project)['id']}"
    append_log(web, alice, url, b"abc\n")
    for query in ("offset=10", "offset=10&limit=3"):
        res = call(web, "GET", f"{url}/logs?{query}", alice)
        assert (res.status_int, res.body, res.headers["Content-Length"],
                res.headers["X-Log-Size"]) == (200, b"", "0", "4"), query


def test_tail_takes_up_to_ten_million_lines(web, alice, project):
    url = f"{project}/builds/{unmanaged(web, alice, project)['id']}"
    append_log(web, alice, url, b"a\nb\n")
    assert ok(call(web, "GET", f"{url}/logs?tail=10000000", alice)) == b"a\nb\n"
    assert_error(call(web, "GET", f"{url}/logs?tail=10000001", alice), 400, "tail")


@pytest.mark.parametrize("query, expected", [
    ("", LOG_TEXT),
    ("offset=0", LOG_TEXT),
    ("offset=6", b"beta\ngamma\n"),
    ("limit=5", b"alpha"),
    ("offset=6&limit=4", b"beta"),
    ("offset=16", b"\n"),
    ("offset=17", b""),
    ("offset=100", b""),
    ("limit=1000", LOG_TEXT),
    ("format=text", LOG_TEXT),
    ("follow=0", LOG_TEXT),
    ("follow=1", LOG_TEXT),            # the build is final: nothing to wait for
    ("follow=1&offset=11", b"gamma\n"),
    ("tail=2&limit=5", b"beta\n"),
    ("tail=2&offset=0", b"beta\ngamma\n"),   # the last lines, but none before offset
    ("tail=2&offset=11", b"gamma\n"),
])
def test_log_text_honours_offset_limit_and_tail(web, alice, project, query, expected):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, LOG_TEXT)
    report(web, alice, url, "running", "succeeded")
    res = call(web, "GET", f"{url}/logs?{query}", alice)
    assert res.status_int == 200 and res.body == expected
    assert res.headers["X-Log-Size"] == str(len(LOG_TEXT))


@pytest.mark.parametrize("log, tail, expected", [
    (b"a\nb\nc\n", 0, b""),
    (b"a\nb\nc\n", 1, b"c\n"),
    (b"a\nb\nc\n", 2, b"b\nc\n"),
    (b"a\nb\nc\n", 3, b"a\nb\nc\n"),
    (b"a\nb\nc\n", 1000, b"a\nb\nc\n"),
    (b"a\nb\nc", 0, b""),                 # no newline at the end
    (b"a\nb\nc", 1, b"c"),
    (b"a\nb\nc", 2, b"b\nc"),
    (b"a\nb\nc", 50, b"a\nb\nc"),
    (b"only line", 1, b"only line"),
    (b"", 5, b""),
    (b"x\n\n", 1, b"\n"),                 # an empty last line is a line
    (b"x\n\n", 2, b"x\n\n"),
])
def test_log_tail_sends_the_last_lines(web, alice, project, log, tail, expected):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    if log:
        append_log(web, alice, url, log)
    res = call(web, "GET", f"{url}/logs?tail={tail}", alice)
    assert res.status_int == 200 and res.body == expected


def test_log_reads_cross_stored_chunks(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    lines = [f"line {i:06d}\n".encode() for i in range(90000)]  # 12 bytes each
    # One big append (stored in pieces, split mid-line), then a second that
    # does not fit in the last piece.
    append_log(web, alice, url, b"".join(lines[:60000]))
    append_log(web, alice, url, b"".join(lines[60000:]))
    report(web, alice, url, "running", "succeeded")  # JSON pages then keep partial lines
    whole = b"".join(lines)
    assert ok(call(web, "GET", url + "/logs", alice)) == whole
    for n in (1, 29999, 30000, 30001, 46309, 46310, 46311, 89999, 90000, 100000):
        assert call(web, "GET", f"{url}/logs?tail={n}", alice).body == b"".join(lines[-n:]), n
    for offset in (524280, 719990):
        assert call(web, "GET", f"{url}/logs?offset={offset}&limit=24", alice).body \
            == whole[offset:offset + 24]
        page = log_json(web, alice, url, f"offset={offset}&limit=24")
        assert page["text"].encode() == whole[offset:offset + 24]


@pytest.mark.parametrize("how", ["accept", "query", "both"])
def test_log_json_form_has_every_field(web, alice, project, how):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"one\ntwo\n")
    report(web, alice, url, "running", "succeeded")
    headers = {"Accept": "application/json"} if how in ("accept", "both") else {}
    query = "?format=json" if how in ("query", "both") else ""
    res = call(web, "GET", f"{url}/logs{query}", alice, headers=headers)
    assert res.status_int == 200 and res.content_type == "application/json"
    assert res.json == {"job": 1, "offset": 0, "next_offset": 8, "size": 8, "complete": True,
                        "truncated": False, "text": "one\ntwo\n"}
    assert log_json(web, alice, url, "offset=4") == {
        "job": 1, "offset": 4, "next_offset": 8, "size": 8, "complete": True,
        "truncated": False, "text": "two\n"}
    assert log_json(web, alice, url, "limit=4") == {
        "job": 1, "offset": 0, "next_offset": 4, "size": 8, "complete": False,
        "truncated": False, "text": "one\n"}


@pytest.mark.parametrize("accept, json_wanted", [
    ("application/json", True),
    ("Application/JSON", True),
    ("application/json; charset=utf-8", True),
    ("application/json, text/plain, */*", True),  # axios's default: named, as much as text
    ("text/plain;q=0.5, application/json", True),
    ("application/json;q=0", False),               # q=0: not acceptable
    ("text/plain, application/json;q=0.5", False),
    ("*/*", False),
    ("text/html,application/xhtml+xml,*/*;q=0.8", False),  # a browser
    ("application/json;q=x", False),
])
def test_log_format_follows_the_accept_headers_preferences(web, alice, populated, accept,
                                                           json_wanted):
    res = call(web, "GET", populated + "/builds/1/logs", alice, headers={"Accept": accept})
    if json_wanted:
        assert res.content_type == "application/json" and res.json["text"] == \
            "first line\nsecond line\n"
    else:
        assert res.content_type == "text/plain" and res.body == b"first line\nsecond line\n"


def test_an_accept_header_that_is_not_utf8_gets_the_text_log_not_a_500(web, alice, populated):
    # WSGI hands headers over as Latin-1; Bottle's header lookup decoded them as UTF-8.
    res = call(web, "GET", populated + "/builds/1/logs", alice, headers={"Accept": "text/\xe9"})
    assert res.content_type == "text/plain" and res.body == b"first line\nsecond line\n"


@pytest.mark.parametrize("accept", ["application/json, */*;q=0.5", "application/json"])
def test_a_follow_is_text_whatever_the_accept_header_asks(web, alice, populated, accept):
    # HTTPie sends the first by default: its follows were a 400 "follow works
    # with the text format only".
    res = call(web, "GET", populated + "/builds/2/logs?follow=1", alice,
               headers={"Accept": accept})
    assert res.status_int == 200 and res.content_type == "text/plain" and res.body == b"done\n"


def test_log_format_text_wins_over_an_accept_json_header(web, alice, populated):
    res = call(web, "GET", populated + "/builds/1/logs?format=text", alice,
               headers={"Accept": "application/json"})
    assert res.content_type == "text/plain" and res.body == b"first line\nsecond line\n"


@pytest.mark.parametrize("limit, text", [
    # A limit inside the first character sends that character whole: an empty
    # page would leave next_offset where it was, and a pager would loop.
    (1, "é"), (2, "é"), (3, "é"), (4, "é"), (5, "é€"), (6, "é€"), (8, "é€"), (9, "é€🎉"),
    (10, "é€🎉\n"),
])
def test_log_json_cuts_a_split_utf8_character_back_to_a_boundary(web, alice, project, limit,
                                                                  text):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, "é€🎉\n".encode())  # 2 + 3 + 4 + 1 bytes
    report(web, alice, url, "running", "succeeded")
    page = log_json(web, alice, url, f"limit={limit}")
    assert page["text"] == text and page["next_offset"] == len(text.encode())
    assert page["complete"] is (page["next_offset"] == 10)


@pytest.mark.parametrize("limit", [1, 2, 3, 4, 5, 7, 64])
def test_log_json_pages_by_next_offset_until_complete(web, alice, project, limit):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    text = "naïve café – 日本語 🎉\n" * 3 + "no newline at the end"
    append_log(web, alice, url, text.encode())
    report(web, alice, url, "running", "failed")
    pieces, offset = [], 0
    for _ in range(200):
        page = log_json(web, alice, url, f"offset={offset}&limit={limit}")
        assert page["offset"] == offset and page["size"] == len(text.encode())
        pieces.append(page["text"])
        if page["complete"]:
            break
        assert page["next_offset"] > offset
        offset = page["next_offset"]
    assert page["complete"] and "".join(pieces) == text


def test_log_json_of_a_final_log_ending_mid_character_still_completes(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"ok\n\xe2\x82")  # the start of a 3-byte character
    report(web, alice, url, "running", "failed")
    offset = 0
    for _ in range(5):
        page = log_json(web, alice, url, f"offset={offset}")
        if page["complete"]:
            break
        assert page["next_offset"] > offset, page
        offset = page["next_offset"]
    assert page["complete"] and page["next_offset"] == page["size"] == 5


def test_log_json_of_an_unfinished_build_ends_at_the_last_whole_line(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"one\ntwo\nthr")
    report(web, alice, url, "running")
    page = log_json(web, alice, url)
    assert (page["text"], page["next_offset"], page["size"], page["complete"]) \
        == ("one\ntwo\n", 8, 11, False)
    # No whole line left: what there is, still cut to a character boundary.
    page = log_json(web, alice, url, "offset=8")
    assert (page["text"], page["next_offset"], page["complete"]) == ("thr", 11, False)
    append_log(web, alice, url, "ee\nf€".encode())
    page = log_json(web, alice, url, "offset=8")
    assert (page["text"], page["next_offset"]) == ("three\n", 14)
    page = log_json(web, alice, url, "offset=14&limit=3")
    assert (page["text"], page["next_offset"]) == ("f", 15)
    # Once final, the unfinished last line is sent too.
    report(web, alice, url, "succeeded")
    page = log_json(web, alice, url, "offset=8")
    assert (page["text"], page["next_offset"], page["size"], page["complete"]) \
        == ("three\nf€", 18, 18, True)


def test_log_past_max_log_bytes_is_truncated_with_one_line_saying_so(small_logs):
    web_, token = small_logs.web, small_logs.alice
    unmanaged(web_, token, small_logs.project)
    url = small_logs.project + "/builds/1"
    assert append_log(web_, token, url, b"a" * 40) == {"size": 40}
    size = append_log(web_, token, url, b"b" * 40)["size"]
    log = ok(call(web_, "GET", url + "/logs", token))
    assert len(log) == size
    assert log[:64] == b"a" * 40 + b"b" * 24  # kept up to the cap, the rest dropped
    notice = log[64:]
    assert notice.endswith(b"\n") and len(notice.strip(b"\n").splitlines()) == 1
    assert b"truncat" in notice.lower()
    build = ok(call(web_, "GET", url, token))
    assert build["truncated"] is True and build["log_size"] == size
    assert log_json(web_, token, url)["truncated"] is True
    # Later output is dropped and the notice stays the one last line.
    assert append_log(web_, token, url, b"more output\n") == {"size": size}
    assert ok(call(web_, "GET", url + "/logs", token)) == log
    report(web_, token, url, "running", "succeeded")
    page = log_json(web_, token, url)
    assert page["complete"] and page["truncated"] and page["text"].encode() == log


@pytest.mark.parametrize("writes, kept", [
    ([b"x" * 62 + "\u20ac".encode()], b"x" * 62 + b"\n"),  # the cap fell inside the euro
    # ... begun in an earlier write, which may have been sent: it is finished
    ([b"x" * 62 + b"\xe2", b"\x82\xacmore"], b"x" * 62 + "\u20ac".encode() + b"\n"),
    # ... but only by what continues it: these bytes begin characters of their own
    ([b"x" * 63 + b"\xf0", b"AAAA"], b"x" * 63 + b"\xf0\n"),
    ([b"x" * 62 + b"\xe2\x82", b"ABCD"], b"x" * 62 + b"\xe2\x82\n"),
    ([b"x" * 63 + b"\n", b"more"], b"x" * 63 + b"\n"),  # no empty line: the log ended one
    ([b"x" * 60 + b"abc\n", b"more"], b"x" * 60 + b"abc\n"),
    ([b"x" * 50 + b"\n" + b"y" * 10, b"yyyyy"], b"x" * 50 + b"\n" + b"y" * 13 + b"\n"),
])
def test_the_truncation_notice_starts_its_own_line_after_whole_characters(small_logs, writes,
                                                                         kept):
    # It cut a UTF-8 character in two ("xx\xe2\x82\n[buildserver]..."), and a
    # log that ended its line got an empty one before the notice.
    web_, token = small_logs.web, small_logs.alice
    unmanaged(web_, token, small_logs.project)
    url = small_logs.project + "/builds/1"
    for data in writes:
        append_log(web_, token, url, data)
    log = ok(call(web_, "GET", url + "/logs", token))
    assert log.startswith(kept) and log[len(kept):].startswith(b"[buildserver] log truncated")
    assert log.count(b"\n") == kept.count(b"\n") + 1 and log.endswith(b"\n")


def test_log_of_exactly_max_log_bytes_is_not_truncated(small_logs):
    web_, token = small_logs.web, small_logs.alice
    unmanaged(web_, token, small_logs.project)
    url = small_logs.project + "/builds/1"
    assert append_log(web_, token, url, b"x" * 64) == {"size": 64}
    assert ok(call(web_, "GET", url, token))["truncated"] is False
    assert append_log(web_, token, url, b"Q")["size"] > 65
    log = ok(call(web_, "GET", url + "/logs", token))
    assert log.startswith(b"x" * 64 + b"\n") and b"Q" not in log
    assert ok(call(web_, "GET", url, token))["truncated"] is True


# Trailing slashes --------------------------------------------------------------

# Every authenticated route, with a body it accepts; {user}, {project}, {build}.
ROUTES = [
    ("GET", "/api/v1/{user}", None),
    ("POST", "/api/v1/{user}", {"name": "fresh"}),
    ("GET", "/api/v1/{user}/{project}", None),
    ("PATCH", "/api/v1/{user}/{project}", {"description": "changed"}),
    ("DELETE", "/api/v1/{user}/{project}", None),
    ("GET", "/api/v1/{user}/{project}/builds", None),
    ("POST", "/api/v1/{user}/{project}/builds", {"is_managed": False}),
    ("GET", "/api/v1/{user}/{project}/builds/{build}", None),
    ("PATCH", "/api/v1/{user}/{project}/builds/{build}", {"name": "renamed"}),
    ("DELETE", "/api/v1/{user}/{project}/builds/{build}", None),
    ("POST", "/api/v1/{user}/{project}/builds/{build}", None),
    ("POST", "/api/v1/{user}/{project}/builds/{build}/stop", None),
    ("POST", "/api/v1/{user}/{project}/builds/{build}/restart", None),
    ("GET", "/api/v1/{user}/{project}/builds/{build}/statuses", None),
    ("POST", "/api/v1/{user}/{project}/builds/{build}/statuses", {"status": "running"}),
    ("GET", "/api/v1/{user}/{project}/builds/{build}/statuses/1", None),
    ("GET", "/api/v1/{user}/{project}/builds/{build}/logs", None),
    ("POST", "/api/v1/{user}/{project}/builds/{build}/logs", b"a line\n"),
]
ROUTE_IDS = [f"{method} {path.replace('/api/v1/', '')}" for method, path, _ in ROUTES]
VOLATILE = {"uuid", "created_at", "updated_at", "started_at", "finished_at", "duration"}


def _comparable(value):
    """A response with what differs between twin targets taken out."""
    if isinstance(value, dict):
        return {_comparable(k): _comparable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, (list, tuple)):
        return [_comparable(v) for v in value]
    if isinstance(value, str):
        return value.replace("twin", "app").replace("fresh2", "fresh")
    return value


@pytest.fixture
def twins(web, alice):
    """alice/app and alice/twin, alike: unmanaged build 1 `created` with a log."""
    for name in ("app", "twin"):
        ok(call(web, "POST", "/api/v1/alice", alice, {"name": name, "command": "true"}), 201)
        unmanaged(web, alice, f"/api/v1/alice/{name}", name="b1")
        append_log(web, alice, f"/api/v1/alice/{name}/builds/1", b"line\n")


@pytest.mark.parametrize("method, path, body", ROUTES + [("GET", "/api/v1/health", None)],
                         ids=ROUTE_IDS + ["GET health"])
def test_every_route_answers_the_same_with_and_without_a_trailing_slash(
        web, alice, twins, method, path, body):
    def request(project, slash):
        url = path.format(user="alice", project=project, build=1) + slash
        data = body
        if slash and isinstance(body, dict) and body.get("name") == "fresh":
            data = {"name": "fresh2"}
        return send(web, method, url, alice, data)

    if method == "GET":  # reads: the same target both ways
        plain, slashed = request("app", ""), request("app", "/")
        assert plain.status_int == 200 and slashed.status_int == 200
        assert slashed.headers["Content-Type"] == plain.headers["Content-Type"]
        assert slashed.body == plain.body
    else:  # writes: each on its own twin
        plain, slashed = request("app", ""), request("twin", "/")
        assert 200 <= plain.status_int < 300, plain.body
        assert slashed.status_int == plain.status_int, slashed.body
        assert "Location" not in slashed.headers
        assert _comparable(slashed.json) == _comparable(plain.json)
        assert _comparable(snapshot(web, alice, "/api/v1/alice/twin")) \
            == _comparable(snapshot(web, alice, "/api/v1/alice/app"))


# Errors ------------------------------------------------------------------------

@pytest.mark.parametrize("path", [
    "/index.html", "/api", "/api/v1", "/api/v2/health", "/health", "/api/v1/alice/app/nope",
    "/api/v1/alice/app/builds/1/nope", "/api/v1/alice/app/builds/1/statuses/1/nope",
    "/api/v1/alice/app/builds/1/logs/nope", "/api/v1/alice/app/builds/1/stop/now",
])
def test_unknown_route_is_404_json(web, alice, populated, path):
    for token in (alice, None):
        assert_error(call(web, "GET", path, token), 404)


@pytest.mark.parametrize("method, path, status", [
    ("POST", "/api/v1/health", 405), ("PATCH", "/api/v1/users", 405),
    ("POST", "/api/v1/openapi.json", 405), ("GET", "/api/v1/health/app", 404),
    ("GET", "/api/v1/users/app/builds", 404), ("DELETE", "/api/v1/health/app/builds/1", 404),
    ("GET", "/api/v1/bookmarks/app", 404), ("POST", "/api/v1/bookmarks", 404),
])
def test_the_fixed_routes_beside_user_names_are_never_taken_for_users(web, admin, method, path,
                                                                         status):
    for token in (admin, None):
        assert_error(call(web, method, path, token), status)


def test_the_dashboard_page_is_served_at_the_root_with_a_strict_policy(web):
    page = web.get("/")
    assert page.content_type == "text/html" and b"<script>" in page.body
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy
    assert "'unsafe-inline'" not in policy


def dashboard_constant(name):
    """The value of the dashboard script's `const NAME = ...;` (a literal)."""
    literal = re.search(rf"^const {name} = (.*?);", buildserver.DASHBOARD_HTML, re.M).group(1)
    literal = re.sub(r"^new Set\((.*)\)$", r"\1", literal)
    if literal.startswith("/"):  # a regular expression
        return literal[1:-1]
    return ast.literal_eval(literal)


def test_the_dashboard_knows_what_the_server_knows():
    # Its copies of the server's rules, which a change on one side only would split.
    assert dashboard_constant("STATUSES") == list(buildserver.STATUSES)
    assert set(dashboard_constant("FINAL")) == buildserver.FINAL
    # (A `stopping` build is being stopped already.)
    assert set(dashboard_constant("STOPPABLE")) == set(buildserver.ACTIVE) - {"stopping"}
    assert dashboard_constant("NAME_RE") == buildserver.NAME_RE
    assert "^" + dashboard_constant("NAME_PATTERN").replace("\\", "") + "$" == buildserver.NAME_RE
    assert set(dashboard_constant("RESERVED")) == buildserver.RESERVED_USERNAMES
    assert "^" + dashboard_constant("BUILD_NAME_PATTERN").replace("\\", "") + "$" == \
        buildserver.FIELDS["name"]["pattern"]
    assert dashboard_constant("PAGE") == dict(buildserver.PAGE_QUERY)["limit"]["default"]


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/api/v1/alice/app/builds/1/logs", 200),  # a log is text, whatever it holds
    ("GET", "/api/v1/alice/app/builds/1/logs?format=json", 200),
    ("HEAD", "/api/v1/alice/app/builds/1/logs", 200),
    ("GET", "/api/v1/alice/app/builds/9", 404),
    ("GET", "/api/v1/alice/app/builds/1/nothing-here", 404),  # Bottle's own 404
    ("PUT", "/api/v1/alice/app/builds/1", 405),  # and its own 405
    ("GET", "/api/v1/health", 200),
])
def test_no_api_answer_may_be_sniffed_into_another_type(web, alice, populated, method, path,
                                                          status):
    # A log holding "<html><script>..." served as text/plain must stay text.
    append_log(web, alice, populated + "/builds/1", b"<html><script>alert(1)</script>\n")
    answer = web.request(path, method=method, headers=auth(alice), expect_errors=True)
    assert answer.status_int == status
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("method, path", [
    ("PUT", "/api/v1/alice"),
    ("DELETE", "/api/v1/alice"),
    ("PATCH", "/api/v1/alice"),
    ("PUT", "/api/v1/alice/app"),
    ("POST", "/api/v1/alice/app"),
    ("PUT", "/api/v1/alice/app/builds"),
    ("DELETE", "/api/v1/alice/app/builds/"),
    ("PUT", "/api/v1/alice/app/builds/1"),
    ("GET", "/api/v1/alice/app/builds/1/stop"),
    ("GET", "/api/v1/alice/app/builds/1/restart"),
    ("DELETE", "/api/v1/alice/app/builds/1/statuses"),
    ("POST", "/api/v1/alice/app/builds/1/statuses/1"),
    ("DELETE", "/api/v1/alice/app/builds/1/logs"),
    ("DELETE", "/api/v1/health"),
])
def test_wrong_method_is_405_json_and_changes_nothing(web, alice, populated, method, path):
    before = snapshot(web, alice, populated)
    assert_error(call(web, method, path, alice, {"name": "x"}), 405)
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/api/v1/health/x", None),  # not /<username>/<project_name> for "health"
    ("PUT", "/api/v1/bookmarks", None),
    ("DELETE", "/api/v1/users/app/builds/1/logs", None),
    ("PUT", "/api/v1/bookmarks/alice/builds", "GET,HEAD"),  # not POST to a "bookmarks" user
    ("PUT", "/api/v1/alice/app/builds/invalidate", "POST"),  # not a build called "invalidate"
    ("PUT", "/api/v1/alice/app/builds/x", None),
    ("PUT", "/api/v1/alice/app/builds/1/statuses/x", None),
    ("PUT", "/api/v1/alice/app/builds/1/statuses/" + "0a" * 16, "GET,HEAD"),  # by its uuid
    ("PUT", "/api/v1/alice/app/builds/1", "DELETE,GET,HEAD,PATCH,POST"),
])
def test_a_405_names_only_methods_that_would_not_answer_404(web, alice, populated, method,
                                                             path, allowed):
    res = call(web, method, path, alice)
    if allowed is None:
        assert assert_error(res, 404)["detail"] == f"There is no endpoint at {path}."
        assert "Allow" not in res.headers
        return
    assert_error(res, 405)
    assert res.headers["Allow"] == allowed


def test_a_405_names_head_wherever_get_is_allowed(web, alice, populated):
    res = call(web, "PUT", populated + "/builds", alice, {"name": "x"})
    assert assert_error(res, 405)["detail"] == "PUT is not allowed here; use GET, HEAD, POST."
    assert res.headers["Allow"] == "GET,HEAD,POST"


JSON_TARGETS = [
    ("POST", "/api/v1/alice"),
    ("PATCH", "/api/v1/alice/app"),
    ("POST", "/api/v1/alice/app/builds"),
    ("PATCH", "/api/v1/alice/app/builds/1"),
    ("POST", "/api/v1/alice/app/builds/1/statuses"),
]


@pytest.mark.parametrize("method, path", JSON_TARGETS, ids=[f"{m} {p}" for m, p in JSON_TARGETS])
@pytest.mark.parametrize("body", [
    b"{", b"{'name': 'x'}", b'{"name": "x"} trailing', b'[{"name": "x"}]', b'"text"', b"null",
    b"\xff\xfe{}", b"[" * 100000,
], ids=["unclosed", "single-quotes", "trailing", "array", "string", "null", "not-utf8", "deep"])
def test_bad_json_body_is_400_and_changes_nothing(web, alice, populated, method, path, body):
    before = snapshot(web, alice, populated)
    assert_error(call(web, method, path, alice, body=body, content_type="application/json"), 400)
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("method, path", JSON_TARGETS, ids=[f"{m} {p}" for m, p in JSON_TARGETS])
def test_a_json_body_giving_a_key_twice_is_400_and_changes_nothing(web, alice, populated,
                                                                    method, path):
    # Which one counts would be a guess (json keeps the last): as with a query
    # parameter given twice, the request is refused. Nested objects too.
    before = snapshot(web, alice, populated)
    for body in (b'{"name": "x", "name": "y"}', b'{"env": {"A": "1", "A": "2"}}'):
        res = call(web, method, path, alice, body=body, content_type="application/json")
        assert_error(res, 400)
        assert "more than once" in res.json["detail"]
    assert snapshot(web, alice, populated) == before


LONG_ENV = {f"K{i}": "v" for i in range(101)}
BAD_VALUES = {
    "timeout": ["600", True, False, 1.5, 0, -1, 604801, [], {}],
    "env": [{"A": 1}, {"A": None}, {"A": True}, {"1BAD": "x"}, {"": "x"}, {"A-B": "x"},
            {"A B": "x"}, LONG_ENV, ["A=1"], "A=1", {"A": {"B": "c"}},
            {"A": "\u00e9" * (64 * 1024 - 128)}, {"N" * 257: "v"}],  # exec would refuse them
    "command": ["", "make\u0000all", "x" * (64 * 1024 + 1), 5, ["make"], True,
                "\u00e9" * (32 * 1024 + 1)],  # 64 KiB of UTF-8 plus 2 bytes, in fewer characters
    "description": ["d" * 4097, 5, ["d"], {"d": "d"}],
    "name": ["a.b", "a b", "n" * 129, "", 5, "é", "a/b", ["n"]],
    "tags": ["tag", ["t"] * 21, [""], [5], ["t" * 65], [None], {"a": "b"}, [["t"]]],
    "is_managed": ["yes", 1, 0, []],
}
PROJECT_NAMES_BAD = ["a.b", "a b", "-a", "_a", "p" * 65, "", 5, None, "é", "a/b", ["a"]]


def _field_cases(target, fields, extra, first=None):
    """Bad values of `fields` for `target` (the `first` few of each, when the
    full list runs against another target already), plus `extra` cases."""
    cases = [(target, field, value) for field in fields for value in BAD_VALUES[field][:first]]
    return cases + [(target, field, value) for field, value in extra]


FIELD_CASES = (
    [("create project", "name", v) for v in PROJECT_NAMES_BAD]
    + _field_cases("create project", ("description", "command", "env", "timeout"),
                   [("color", "red"), ("owner", "bob"), ("builds_count", 3), ("tags", ["t"]),
                    ("env", LONG_ENV), ("timeout", 604801)], first=4)
    + _field_cases("patch project", ("description", "command", "env", "timeout"),
                   [("name", "renamed"), ("owner", "bob"), ("builds_count", 3),
                    ("created_at", "2020-01-01T00:00:00.000000Z"), ("last_build", None),
                    ("color", "red"), ("env", LONG_ENV), ("timeout", 604801)], first=3)
    + _field_cases("create build", ("command", "env", "timeout", "name", "description", "tags",
                                    "is_managed"),
                   [("color", "red"), ("last_status", "succeeded"), ("uuid", "0" * 32),
                    ("exit_code", 0), ("restarted_from", 1), ("log_size", 5)])
    + _field_cases("patch build", ("name", "description", "tags"),
                   [("command", "make"), ("env", {"A": "1"}), ("timeout", 5),
                    ("is_managed", False), ("last_status", "succeeded"), ("id", 7),
                    ("uuid", "0" * 32), ("user", "bob"), ("exit_code", 0), ("log_size", 0),
                    ("restarted_from", 1), ("color", "red")])
)
FIELD_TARGETS = {
    "create project": ("POST", "/api/v1/alice", {"name": "new"}),
    "patch project": ("PATCH", "/api/v1/alice/app", {}),
    "create build": ("POST", "/api/v1/alice/app/builds", {"is_managed": False}),
    "patch build": ("PATCH", "/api/v1/alice/app/builds/1", {}),
}


def _case_id(target, field, value):
    text = json.dumps(value, ensure_ascii=True)
    return f"{target}-{field}-{text[:24]}{'...' if len(text) > 24 else ''}"


@pytest.mark.parametrize("target, field, value", FIELD_CASES,
                         ids=[_case_id(*case) for case in FIELD_CASES])
def test_invalid_field_is_400_naming_it_and_changes_nothing(web, alice, populated, target,
                                                           field, value):
    method, path, base = FIELD_TARGETS[target]
    before = snapshot(web, alice, populated)
    res = call(web, method, path, alice, {**base, field: value})
    assert_error(res, 400, field)
    assert snapshot(web, alice, populated) == before
    assert ok(call(web, "GET", "/api/v1/alice", alice))["count"] == 1


FULL_ENV = {f"K{i}": "v" for i in range(100)}
GOOD_CASES = [
    ("create project", "name", "p" * 64), ("create project", "name", "A-_9"),
    ("create project", "name", "9lives"),
    ("create project", "timeout", 1), ("create project", "timeout", 604800),
    ("create project", "timeout", None), ("create project", "env", FULL_ENV),
    ("create project", "env", {"_X": "", "lower_9": "ünïcode"}),
    ("create project", "description", "d" * 4096), ("create project", "description", ""),
    ("create project", "command", "c" * (64 * 1024)),
    ("create project", "command", "\u00e9" * (32 * 1024)),  # 64 KiB of UTF-8 exactly
    ("create project", "command", "printf 'é\\n' && exit 3"),
    ("patch project", "env", None), ("patch project", "command", None),
    ("create build", "name", "n" * 128), ("create build", "name", "-_"),
    ("create build", "tags", ["t" * 64] * 20), ("create build", "tags", []),
    ("create build", "timeout", 604800), ("create build", "env", FULL_ENV),
    ("patch build", "name", "N" * 128), ("patch build", "description", None),
    ("patch build", "tags", ["é", "with space", "a.b"]),
]


@pytest.mark.parametrize("target, field, value", GOOD_CASES,
                         ids=[_case_id(*case) for case in GOOD_CASES])
def test_values_at_the_limits_are_accepted_and_stored(web, alice, populated, target, field,
                                                     value):
    method, path, base = FIELD_TARGETS[target]
    res = call(web, method, path, alice, {**base, field: value})
    body = ok(res, 201 if method == "POST" else 200)
    if target == "create project":
        path = "/api/v1/alice/" + body["name"]
    elif target == "create build":
        path = f"{populated}/builds/{body['id']}"
    stored = ok(call(web, "GET", path, alice))
    assert stored == body
    expected = {} if field == "env" and value is None else value
    assert stored[field] == (None if value == "" else expected)  # unset is null, never ""


def test_a_build_env_past_100_pairs_with_the_projects_is_400_and_stores_nothing(
        web, alice, populated):
    ok(call(web, "PATCH", populated, alice, {"env": {f"P{i}": "p" for i in range(60)}}))
    before = snapshot(web, alice, populated)
    res = call(web, "POST", populated + "/builds", alice,
               {"env": {f"B{i}": "b" for i in range(41)}, "is_managed": False})
    assert assert_error(res, 400, "env")["detail"] == \
        "With the project's, the build's env would hold 101 pairs; a build holds at most 100."
    assert snapshot(web, alice, populated) == before
    env = {**{f"B{i}": "b" for i in range(40)}, "P0": "mine"}  # P0 replaces the project's
    body = ok(call(web, "POST", populated + "/builds", alice, {"env": env, "is_managed": False}),
              201)
    assert len(body["env"]) == 100 and body["env"]["P0"] == "mine"


@pytest.mark.parametrize("name", [
    "BUILD_ID", "BUILD_UUID", "BUILD_PROJECT", "BUILD_USER", "BUILD_WORKSPACE"])
def test_an_env_that_names_a_variable_the_server_sets_is_400_and_stores_nothing(
        web, alice, populated, name):
    # The server sets BUILD_ID and its kin last: the build's own value was
    # stored and shown, but never what its command saw.
    before = snapshot(web, alice, populated)
    for method, path in (("POST", populated + "/builds"), ("PATCH", populated),
                         ("POST", "/api/v1/alice")):
        body = {"env": {"MINE": "x", name: "mine"}, "is_managed": False} \
            if path.endswith("/builds") else {"env": {name: "mine"}}
        if method == "POST" and not path.endswith("/builds"):
            body["name"] = "other"
        error = assert_error(call(web, method, path, alice, body), 400, "env")
        assert "not BUILD_ID, BUILD_UUID, BUILD_PROJECT, BUILD_USER or BUILD_WORKSPACE, " \
               "which the server sets" in error["errors"]["env"], error
    assert snapshot(web, alice, populated) == before
    assert ok(call(web, "GET", "/api/v1/alice", alice))["count"] == 1
    for allowed in (name.lower(), name + "_X", "X" + name):  # only the names themselves
        ok(call(web, "POST", populated + "/builds", alice,
                {"env": {allowed: "mine"}, "is_managed": False}), 201)


BAD_QUERIES = [
    ("", "limit=abc", "limit"), ("", "limit=0", "limit"), ("", "limit=1001", "limit"),
    ("", "limit=-5", "limit"), ("", "limit=1.5", "limit"), ("", "offset=-1", "offset"),
    ("", "offset=x", "offset"),
    ("/app/builds", "limit=abc", "limit"), ("/app/builds", "offset=-1", "offset"),
    ("/app/builds", "status=bogus", "status"), ("/app/builds", "status=created,bogus", "status"),
    ("/app/builds", "status=CREATED", "status"),
    ("/app/builds/1/statuses", "limit=0", "limit"), ("/app/builds/1/statuses", "offset=-1", "offset"),
    ("/app/builds/1/logs", "tail=x", "tail"), ("/app/builds/1/logs", "tail=-1", "tail"),
    ("/app/builds/1/logs", "follow=maybe", "follow"), ("/app/builds/1/logs", "format=xml", "format"),
    ("/app/builds/1/logs", "offset=-1", "offset"), ("/app/builds/1/logs", "offset=x", "offset"),
    ("/app/builds/1/logs", "limit=abc", "limit"), ("/app/builds/1/logs", "limit=-1", "limit"),
    # A JSON page of 0 bytes would never move on: next_offset is its offset.
    ("/app/builds/1/logs", "limit=0", "limit"), ("/app/builds/1/logs", "format=json&limit=0", "limit"),
    ("/app/builds/1/logs", "format=json&limit=x", "limit"),
    ("/app/builds/1/logs", "follow=1&format=json", "follow"),
    # Given twice, a parameter is ambiguous whichever value is valid.
    ("", "limit=abc&limit=1", "limit"), ("", "limit=1&limit=abc", "limit"),
    ("/app/builds", "status=running&status=created", "status"),
    ("/app/builds/1/logs", "tail=1&tail=2", "tail"),
    ("/app/builds/1/logs", "format=json&format=text", "format"),
    ("/app/builds/1/logs", "follow=0&follow=1", "follow"),
]


@pytest.mark.parametrize("suffix, query, param", BAD_QUERIES,
                         ids=[f"{s or '/'}?{q}" for s, q, _ in BAD_QUERIES])
def test_invalid_query_parameter_is_400_naming_it(web, alice, populated, suffix, query, param):
    body = assert_error(call(web, "GET", f"/api/v1/alice{suffix}?{query}", alice), 400)
    assert param in body.get("errors", {}) or param in body["detail"], body


@pytest.mark.parametrize("suffix", ["", "/app/builds", "/app/builds/1/statuses"])
def test_limit_from_1_to_1000_is_accepted_and_empty_means_default(web, alice, populated, suffix):
    for query in ("limit=1", "limit=1000", "limit=", "offset=", "offset=0"):
        assert ok(call(web, "GET", f"/api/v1/alice{suffix}?{query}", alice))["count"] >= 1


BUILD_SUBROUTES = [("GET", "", None), ("PATCH", "", {"name": "n"}), ("DELETE", "", None),
                   ("POST", "", None), ("POST", "/stop", None), ("POST", "/restart", None),
                   ("GET", "/statuses", None), ("POST", "/statuses", {"status": "running"}),
                   ("GET", "/statuses/1", None), ("GET", "/logs", None),
                   ("POST", "/logs", b"x\n")]


@pytest.mark.parametrize("build_id", ["abc", "1.5", "-1", "0", "3", "99",
                                      "99999999999999999999999", "9223372036854775808",
                                      "1e3", "0x1", "%201", "first",
                                      "%C2%B2", "%EF%BC%91", "%D9%A1"])  # ², fullwidth and Arabic 1
def test_missing_or_non_numeric_build_id_is_404_on_every_build_route(web, alice, populated,
                                                                    build_id):
    before = snapshot(web, alice, populated)
    for method, suffix, body in BUILD_SUBROUTES:
        res = send(web, method, f"{populated}/builds/{build_id}{suffix}", alice, body)
        assert_error(res, 404)
    assert snapshot(web, alice, populated) == before


# A lone surrogate is valid JSON ("\ud800") but cannot be encoded as UTF-8.
SURROGATE_CASES = [
    ("POST", "/api/v1/alice", '{"name": "new", "description": "\\ud800"}'),
    ("PATCH", "/api/v1/alice/app", '{"env": {"A": "\\ud800"}}'),
    ("POST", "/api/v1/alice/app/builds", '{"is_managed": false, "tags": ["\\ud800"]}'),
    ("POST", "/api/v1/alice/app/builds", '{"is_managed": false, "env": {"A": "\\udfff"}}'),
    ("PATCH", "/api/v1/alice/app/builds/1", '{"description": "\\ud800"}'),
    ("POST", "/api/v1/alice/app/builds/1/statuses", '{"status": "running", "message": "\\ud800"}'),
]


@pytest.mark.parametrize("method, path, body", SURROGATE_CASES,
                         ids=[f"{m} {b[:40]}" for m, _, b in SURROGATE_CASES])
def test_lone_surrogate_in_a_field_is_400_and_changes_nothing(web, alice, populated, method,
                                                             path, body):
    before = snapshot(web, alice, populated)
    res = call(web, method, path, alice, body=body.encode(), content_type="application/json")
    assert_error(res, 400)
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("message, status", [
    ("database or disk is full", 503), ("disk I/O error", 503), ("database is locked", 503),
    ("no such column: nope", 500),  # a bug: a 500, and its traceback in the log
])
def test_a_database_that_cannot_be_written_is_503_but_a_bug_stays_a_500(
        web, alice, populated, app, monkeypatch, caplog, message, status):
    def failing(*args):
        raise sqlite3.OperationalError(message)
    monkeypatch.setattr(app.store, "build_at", failing)
    res = call(web, "GET", populated + "/builds/1", alice)
    assert_error(res, status)
    assert ("Retry-After" in res.headers) is (status == 503)
    assert ("Traceback" in caplog.text) is (status == 500)


def test_lone_surrogate_in_a_json_log_body_is_400_and_stores_nothing(web, alice, project):
    unmanaged(web, alice, project)
    url = project + "/builds/1"
    append_log(web, alice, url, b"before\n")
    for body in ('"\\ud800x"', '["ok", "\\udfff"]'):
        assert_error(call(web, "POST", url + "/logs", alice, body=body.encode(),
                          content_type="application/json"), 400)
    assert call(web, "GET", url + "/logs", alice).body == b"before\n"


@pytest.mark.parametrize("method, path, field", [
    ("POST", "/api/v1/alice", "description"), ("PATCH", "/api/v1/alice/app", "description"),
    ("POST", "/api/v1/alice/app/builds", "tags"), ("PATCH", "/api/v1/alice/app/builds/1", "tags"),
    ("POST", "/api/v1/alice/app/builds/1/statuses", "message"),
])
def test_json_nested_just_deep_enough_to_decode_is_400_not_500(web, alice, populated, method,
                                                                path, field):
    # Past some depth json.loads succeeds but encoding the value again overflows
    # the stack (where exactly depends on the caller's stack): try every depth.
    before = snapshot(web, alice, populated)
    for depth in range(850, 1050):
        body = '{"%s": %s%s}' % (field, "[" * depth, "]" * depth)
        res = call(web, method, path, alice, body=body.encode(), content_type="application/json")
        assert_error(res, 400)
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("method", ["GET", "PATCH", "DELETE"])
def test_path_that_is_not_utf8_is_400_and_never_reaches_a_namesake(web, alice, populated, method):
    # Bottle drops undecodable bytes: /vic%FFtim would otherwise act on /victim.
    before = snapshot(web, alice, populated)
    for path in ("/api/v1/alice/a%FFpp", "/api/v1/alice/app/builds/1%C3", "/api/v1/ali%80ce/app"):
        res = call(web, method, path, alice, json_body={"description": "changed"}
                   if method == "PATCH" else _NO_JSON)
        assert "UTF-8" in assert_error(res, 400)["detail"]
    assert snapshot(web, alice, populated) == before


class _Input(io.RawIOBase):
    """A request body that counts reads (the server should not read it)."""

    def __init__(self, data=b""):
        self.data, self.reads = io.BytesIO(data), 0

    def read(self, size=-1):
        self.reads += 1
        return self.data.read(size)

    def readline(self, size=-1):
        self.reads += 1
        return self.data.readline(size)


def wsgi_call(application, method, path, token, content_length, data=b""):
    """Call the WSGI app directly with a chosen Content-Length (or none) and body.

    :returns: (status code, headers, JSON body, the body's _Input)."""
    environ = webtest.TestRequest.blank(path, method=method, headers=auth(token)).environ
    environ["CONTENT_TYPE"] = "application/json"
    environ.pop("CONTENT_LENGTH", None)
    if content_length is not None:
        environ["CONTENT_LENGTH"] = str(content_length)
    body = environ["wsgi.input"] = _Input(data)
    answer = {}

    def start_response(status, headers, exc_info=None):
        answer["status"], answer["headers"] = int(status[:3]), dict(headers)
        return lambda chunk: None

    chunks = application(environ, start_response)
    try:
        data = b"".join(chunks)
    finally:
        getattr(chunks, "close", lambda: None)()
    return answer["status"], answer["headers"], json.loads(data), body


WRITE_TARGETS = JSON_TARGETS + [("POST", "/api/v1/alice/app/builds/1/logs")]


@pytest.mark.parametrize("method, path", WRITE_TARGETS,
                         ids=[f"{m} {p}" for m, p in WRITE_TARGETS])
def test_body_over_the_limit_is_413_from_content_length_without_reading_it(
        app, web, alice, populated, method, path):
    limit = 8 * MiB if path.endswith("/logs") else MiB
    before = snapshot(web, alice, populated)
    for length in (limit + 1, 2 ** 40, 10 ** 19, 10 ** 300):  # (not "not a number")
        status, _, body, stream = wsgi_call(app, method, path, alice, length)
        assert status == 413 and isinstance(body["detail"], str)
        assert stream.reads == 0
    assert snapshot(web, alice, populated) == before


def test_a_content_length_with_leading_zeros_is_its_number(app, alice):
    body = b'{"name": "zeros", "command": "true"}'
    status, _, project, _ = wsgi_call(app, "POST", "/api/v1/alice", alice,
                                      str(len(body)).zfill(25), body + b"more")
    assert (status, project["name"]) == (201, "zeros")


BODILESS_TARGETS = [
    ("DELETE", "/api/v1/alice/app"),
    ("DELETE", "/api/v1/alice/app/builds/1"),
    ("POST", "/api/v1/alice/app/builds/1/stop"),
    ("POST", "/api/v1/alice/app/builds/1/restart"),
    ("POST", "/api/v1/alice/app/builds/1/bookmark"),
    ("GET", "/api/v1/alice/app/builds/1"),
]


@pytest.mark.parametrize("method, path", BODILESS_TARGETS,
                         ids=[f"{m} {p}" for m, p in BODILESS_TARGETS])
def test_a_route_that_takes_no_body_refuses_one_over_the_limit_and_does_nothing(
        app, web, alice, populated, method, path):
    # The server leaves such a body unread: acting on its request anyway would
    # answer a request the server has refused to read.
    before = snapshot(web, alice, populated)
    status, _, body, stream = wsgi_call(app, method, path, alice, MiB + 1)
    assert status == 413
    assert body["detail"] == f"The request body is larger than the limit of {MiB} bytes."
    assert stream.reads == 0
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("method, path", JSON_TARGETS, ids=[f"{m} {p}" for m, p in JSON_TARGETS])
def test_json_body_over_1_mib_without_content_length_is_413(app, web, alice, populated, method,
                                                            path):
    before = snapshot(web, alice, populated)
    data = b'{"description": "' + b"x" * MiB + b'"}'
    status, _, body, _ = wsgi_call(app, method, path, alice, None, data)
    assert status == 413 and isinstance(body["detail"], str)
    assert snapshot(web, alice, populated) == before


def test_json_body_just_over_1_mib_is_413_and_exactly_1_mib_is_read(web, alice, populated):
    before = snapshot(web, alice, populated)
    small = b'{"description": "padded"}'
    res = call(web, "PATCH", populated, alice, body=small + b" " * (MiB + 1 - len(small)),
               content_type="application/json")
    assert_error(res, 413)
    assert snapshot(web, alice, populated) == before
    res = call(web, "PATCH", populated, alice, body=small + b" " * (MiB - len(small)),
               content_type="application/json")
    assert ok(res)["description"] == "padded"


def test_log_append_over_8_mib_is_413_and_exactly_8_mib_is_stored(web, alice, populated):
    url = populated + "/builds/1"
    before = snapshot(web, alice, populated)
    assert_error(call(web, "POST", url + "/logs", alice, body=b"x" * (8 * MiB + 1)), 413)
    assert snapshot(web, alice, populated) == before
    size = len(before[url][2])
    assert append_log(web, alice, url, b"y" * (8 * MiB)) == {"size": size + 8 * MiB}
    assert call(web, "GET", url + f"/logs?offset={size}&limit=3", alice).body == b"yyy"


# Authentication and access -----------------------------------------------------

@pytest.mark.parametrize("header", [
    None, "", "Token", "Token ", "Tokenabc", "Basic dXNlcjpwYXNz", "Token a b",
    "Token nope", "Bearer nope", 'Token ""', "{alice}", "Basic {alice}", "Token {alice}x",
    "Token {alice} {alice}", "Token x{alice}", "Digest {alice}",
    'Token "{alice}', 'Token {alice}"',  # (a quote without its pair: a fuzzer's)
])
def test_missing_malformed_or_unknown_token_is_401(web, alice, populated, header):
    headers = {} if header is None else {"Authorization": header.format(alice=alice)}
    before = snapshot(web, alice, populated)
    for method, path, body in (("GET", populated, None),
                               ("POST", populated + "/builds", {"is_managed": False}),
                               ("DELETE", populated, None)):
        res = send(web, method, path, None, body, headers=headers)
        assert_error(res, 401)
        assert res.headers["WWW-Authenticate"] == "Token"
        assert alice not in res.text
    assert snapshot(web, alice, populated) == before


@pytest.mark.parametrize("template", ["Token {}", "token {}", "TOKEN {}", 'Token "{}"',
                                      'TOKEN "{}"', 'token "{}"', "Bearer {}", "bearer {}",
                                      "BEARER {}"])
def test_accepted_authorization_forms(web, alice, populated, template):
    res = web.request(populated, method="GET", expect_errors=True,
                      headers={"Authorization": template.format(alice)})
    assert res.status_int == 200 and res.json["name"] == "app"


def _route(method, path, body, user="alice", project="app", build=1):
    return method, path.format(user=user, project=project, build=build), body


@pytest.mark.parametrize("method, path, body", ROUTES, ids=ROUTE_IDS)
def test_every_route_without_a_token_is_401(web, alice, populated, method, path, body):
    before = snapshot(web, alice, populated)
    method, url, body = _route(method, path, body)
    res = send(web, method, url, None, body)
    assert_error(res, 401)
    assert res.headers["WWW-Authenticate"] == "Token"
    assert snapshot(web, alice, populated) == before


def test_a_project_of_a_user_that_does_not_exist_is_404_naming_the_user(web, admin):
    res = call(web, "GET", "/api/v1/nobody/app", admin)
    assert_error(res, 404)
    assert "no user" in res.json["detail"], res.json


@pytest.mark.parametrize("target", ["existing", "missing build", "missing project",
                                    "missing user"])
@pytest.mark.parametrize("method, path, body", ROUTES, ids=ROUTE_IDS)
def test_every_route_in_a_foreign_namespace_is_403_before_404(web, alice, bob, populated,
                                                              method, path, body, target):
    where = {"existing": {}, "missing build": {"build": 99},
             "missing project": {"project": "ghost", "build": 99},
             "missing user": {"user": "nobody", "project": "ghost", "build": 99}}[target]
    before = snapshot(web, alice, populated)
    method, url, body = _route(method, path, body, **where)
    res = send(web, method, url, bob, body)
    detail = assert_error(res, 403)["detail"]
    assert "ghost" not in detail and "99" not in detail
    assert snapshot(web, alice, populated) == before
    assert ok(call(web, "GET", "/api/v1/bob", bob))["count"] == 0


@pytest.mark.parametrize("method, path, body", ROUTES, ids=ROUTE_IDS)
def test_admin_acts_in_every_namespace(web, admin, alice, populated, method, path, body):
    method, url, body = _route(method, path, body)
    res = send(web, method, url, admin, body)
    assert 200 <= res.status_int < 300, res.body


@pytest.mark.parametrize("method, path, body", ROUTES, ids=ROUTE_IDS)
def test_admin_gets_404_for_a_missing_user_project_or_build(web, admin, alice, populated,
                                                            method, path, body):
    before = snapshot(web, alice, populated)
    targets = [{"user": "nobody"}, {"user": "not.valid"}]
    if "{project}" in path:
        targets.append({"project": "ghost"})
    if "{build}" in path:
        targets.append({"build": 99})
    for where in targets:
        method_, url, body_ = _route(method, path, body, **where)
        assert_error(send(web, method_, url, admin, body_), 404)
    assert snapshot(web, alice, populated) == before
    assert_error(call(web, "GET", "/api/v1/nobody", admin), 404)  # POST made no user


def test_admin_actions_are_recorded_under_the_admins_name(web, admin, alice, populated):
    created = ok(call(web, "POST", "/api/v1/alice", admin, {"name": "by-root"}), 201)
    assert created["owner"] == "alice"
    assert ok(call(web, "GET", "/api/v1/alice/by-root", alice)) == created
    build = unmanaged(web, admin, populated)
    assert build["user"] == "root"
    ok(call(web, "POST", f"{populated}/builds/{build['id']}/stop", admin))
    statuses = ok(call(web, "GET", f"{populated}/builds/{build['id']}/statuses", alice))
    assert statuses["results"][-1]["message"] == "stopped by root"


def test_tokens_never_appear_in_responses_or_the_request_log(web, alice, bob, admin, populated,
                                                             caplog):
    caplog.set_level(logging.DEBUG)
    secrets_ = [alice, bob, admin]
    answers = []
    for token in secrets_:
        for method, path, body in ROUTES:
            method, url, body = _route(method, path, body, build=2)
            if method != "DELETE":
                answers.append(send(web, method, url, token, body))
    for header in (f"Token {alice}x", f"Basic {bob}", f"Token {admin} extra", f"{alice}"):
        answers.append(web.request(populated, headers={"Authorization": header},
                                   expect_errors=True))
    answers.append(call(web, "POST", "/api/v1/alice", alice, body=b"{" + alice.encode(),
                        content_type="application/json"))
    assert caplog.records, "the request log was not captured"
    for res in answers:
        seen = res.body + str(sorted(res.headers.items())).encode()
        for token in secrets_:
            assert token.encode() not in seen, (res.request.path, res.status)
    for token in secrets_:
        assert token not in caplog.text


# Command line --------------------------------------------------------------------

def cli(*args, env=None, cwd=None):
    """`python buildserver.py ARGS` with no BUILDSERVER_* variables but `env`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUILDSERVER_")}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          env={**clean, **(env or {})}, timeout=60, cwd=cwd)


@pytest.mark.parametrize("args", [["--token", "SECRET-1234", "builds", "admin/app"],
                                  ["--token=SECRET-1234", "status", "admin/app"],
                                  ["--tok", "SECRET-1234", "builds", "admin/app"],  # abbreviated
                                  ["run", "admin/app", "--t=SECRET-1234"]])  # ambiguous
def test_a_misplaced_token_option_is_not_quoted_in_the_usage_error(args):
    # argparse quoted it whole as an unrecognized argument, into a CI job's log.
    done = cli(*args)
    assert done.returncode == 2 and "error: " in done.stderr, done
    assert "SECRET" not in done.stderr and "<hidden>" in done.stderr


def test_a_data_folder_that_cannot_be_used_by_default_asks_whether_data_dir_is_missing(
        tmp_path):
    # `sudo -u buildserver ... adduser alice` from another folder said only
    # "Permission denied: ." (or "Not a folder"), with no word of --data-dir.
    (tmp_path / "buildserver-data").touch()
    done = cli("adduser", "alice", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (1, (
        "buildserver: Not a folder: ./buildserver-data (./buildserver-data, in this folder, "
        "is the default data folder: is a --data-dir missing?)\n"))
    named = cli("adduser", "alice", "--data-dir", str(tmp_path / "buildserver-data"))
    assert named.stderr == f"buildserver: Not a folder: {tmp_path}/buildserver-data\n"


@pytest.mark.parametrize("args, env, flag", [
    (["--port", "80800"], {}, "--port"), (["--port", "-1"], {}, "--port"),
    ([], {"BUILDSERVER_PORT": "99999"}, "--port"), (["--port", "http"], {}, "--port"),
    (["--workers", "-1"], {}, "--workers"), (["--stop-grace", "soon"], {}, "--stop-grace"),
    # past a day: a timer that overflows, or a stop that never ends, not a grace
    (["--stop-grace", "inf"], {}, "--stop-grace"), (["--stop-grace", "nan"], {}, "--stop-grace"),
    ([], {"BUILDSERVER_STOP_GRACE": "3000000"}, "--stop-grace"),
    (["--port", "1" + "0" * 400], {}, "--port"),  # too big for a float: no traceback
    (["--workers", "1" + "0" * 30], {}, "--workers"),  # would start threads until memory ends
    (["--threads", "100000"], {}, "--threads"),
    (["--threads", "3"], {}, "--threads"), ([], {"BUILDSERVER_THREADS": "0"}, "--threads"),
    ([], {"BUILDSERVER_MAX_LOG_BYTES": "9" * 30}, "--max-log-bytes"),  # too big for SQLite
    (["--auth-burst", "9" * 30], {}, "--auth-burst"),
    # waitress compares an address: "*" would trust anyone, a name nobody
    (["--trusted-proxy", "*"], {}, "--trusted-proxy"),
    ([], {"BUILDSERVER_TRUSTED_PROXY": "localhost"}, "--trusted-proxy"),
])
def test_serve_refuses_a_bad_flag_with_exit_2_before_touching_the_data_dir(tmp_path, args, env,
                                                                          flag):
    # A port past 65535 would otherwise wrap around to some other port.
    result = cli("serve", "--data-dir", str(tmp_path / "data"), *args, env=env)
    assert result.returncode == 2 and flag in result.stderr, result.stderr
    assert not (tmp_path / "data").exists()


def test_version_says_the_database_schema_which_upgrades_go_by():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout == f"{buildserver.__version__} (database schema {buildserver.SCHEMA_VERSION})\n"


@pytest.mark.parametrize("args, env, says", [
    (["--workers", "abc"], {}, "--workers: must be a whole number: abc\n"),
    # A systemd Environment= line: the option was never given, the variable was.
    ([], {"BUILDSERVER_STOP_GRACE": "soon"},
     "--stop-grace: must be a number: soon (from BUILDSERVER_STOP_GRACE)\n"),
    ([], {"BUILDSERVER_TRUSTED_PROXY": "proxy"}, ": proxy (from BUILDSERVER_TRUSTED_PROXY)\n"),
    (["--workers", "\uff11\uff12"], {}, "--workers: must be a whole number: \uff11\uff12\n"),
])
def test_serve_says_what_a_flag_that_is_no_number_should_be(tmp_path, args, env, says):
    result = cli("serve", "--data-dir", str(tmp_path / "data"), *args, env=env)
    assert result.returncode == 2 and says in result.stderr, result.stderr


def test_a_sqlite_without_what_the_queries_use_is_named_at_once(tmp_path, monkeypatch):
    # SQLite before 3.16 failed with "no such table: pragma_user_version; is
    # its disk full, or failing?", one without JSON1 after the first start's token.
    buildserver._check_sqlite()  # (this Python's has both)
    monkeypatch.setattr(buildserver.sqlite3, "sqlite_version_info", (3, 15, 0))
    with pytest.raises(buildserver.SchemaError, match="is older than 3.16: buildserver needs "
                                                      "SQLite 3.16 or newer with JSON1"):
        buildserver.Database(str(tmp_path / "buildserver.db")).migrate()
    assert not (tmp_path / "buildserver.db").exists()


@pytest.mark.parametrize("host", ["nosuch.invalid", "bad..host", ""])
def test_serve_on_a_host_that_is_no_address_says_so_without_a_traceback(tmp_path, host):
    # An empty BUILDSERVER_HOST is what an env file with `BUILDSERVER_HOST=` gives.
    result = cli("serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                 env={"BUILDSERVER_HOST": host})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot listen on {host}:0" in result.stderr


@pytest.fixture
def open_api():
    """open_api(data_dir) -> a webtest client of make_app on that folder."""
    opened = []

    def open_(data_dir):
        application = buildserver.make_app(buildserver.Config(data_dir=str(data_dir), workers=0))
        opened.append(application)
        return webtest.TestApp(application)
    yield open_
    for application in opened:
        application.close()


def test_cli_adduser_creates_the_data_dir_and_prints_a_working_token(tmp_path, open_api):
    data = tmp_path / "not" / "yet"
    made = cli("adduser", "carol", "--data-dir", str(data))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert len(token) >= 43 and " " not in token  # 32 random bytes, base64
    # Where it went, and that the database is new: `adduser` without the
    # server's --data-dir made one in ./buildserver-data, silently.
    assert f"Created the user 'carol' in {data}." in made.stdout
    assert f"there was no database in {data}: made a new one" in made.stderr
    root = cli("adduser", "root", "--admin", "--data-dir", str(data))
    assert root.returncode == 0, root.stderr
    assert "no database" not in root.stderr
    root_token = root.stdout.strip().splitlines()[-1]
    assert root_token != token
    # Only hashes are stored.
    stored = b"".join(p.read_bytes() for p in data.iterdir() if p.is_file())
    assert token.encode() not in stored and root_token.encode() not in stored

    client = open_api(data)
    assert ok(call(client, "POST", "/api/v1/carol", token, {"name": "mine"}), 201)
    assert ok(call(client, "GET", "/api/v1/carol", token))["count"] == 1
    assert_error(call(client, "GET", "/api/v1/root", token), 403)  # carol is no admin
    assert ok(call(client, "GET", "/api/v1/carol/mine", root_token))["owner"] == "carol"


def test_cli_adduser_of_an_existing_name_exits_2_with_one_line(tmp_path, open_api):
    data = tmp_path / "d"
    first = cli("adduser", "carol", "--data-dir", str(data))
    token = first.stdout.strip().splitlines()[-1]
    again = cli("adduser", "carol", "--admin", "--data-dir", str(data))
    assert again.returncode == 2
    assert again.stdout == "" and len(again.stderr.strip().splitlines()) == 1
    assert "carol" in again.stderr
    client = open_api(data)  # the first token still works, and carol is no admin
    assert ok(call(client, "GET", "/api/v1/carol", token))["count"] == 0
    assert_error(call(client, "GET", "/api/v1/root", token), 403)


def test_cli_adduser_of_a_name_differing_only_in_case_exits_2(tmp_path):
    # The two users' workspace folders would be one on a case-insensitive file system.
    data = tmp_path / "d"
    assert cli("adduser", "carol", "--data-dir", str(data)).returncode == 0
    again = cli("adduser", "Carol", "--data-dir", str(data))
    assert again.returncode == 2 and "'carol' exists already" in again.stderr


def test_two_adduser_at_once_make_one_user_whatever_the_case(tmp_path):
    # Both looked the name up, then both made it: "Eve" and "eve" (one folder on
    # macOS), or a raw UNIQUE error after printing a token that never worked.
    data = tmp_path / "d"
    assert cli("adduser", "seed", "--data-dir", str(data)).returncode == 0
    holder = sqlite3.connect(data / "buildserver.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # both commands get past their look, then wait here
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BUILDSERVER_")}
    adding = [subprocess.Popen([sys.executable, SCRIPT, "adduser", name, "--data-dir", str(data)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=clean) for name in ("Eve", "eve")]
    try:
        for proc in adding:  # each has printed its token: it is about to record it
            assert read_within(proc, proc.stdout.readline).startswith("Created the user")
            assert read_within(proc, proc.stdout.readline).strip()
    finally:
        holder.execute("COMMIT")
        holder.close()
    codes = sorted(proc.wait(60) for proc in adding)
    errors = [proc.stderr.read() for proc in adding]
    assert codes == [0, 2], errors
    assert any("was made meanwhile by another command; the token above was not recorded"
               in error for error in errors), errors
    names = sqlite3.connect(data / "buildserver.db").execute("SELECT name FROM users").fetchall()
    assert len(names) == 2 and {"Eve", "eve"} & {name for (name,) in names}


@pytest.mark.parametrize("args", [["adduser", "dave"], ["token", "carol"],
                                  ["backup", "copy.db"], ["serve", "--port", "0"]])
def test_an_empty_data_folder_is_a_usage_error(args):
    done = cli(*args, "--data-dir", "")  # it said "No such file or directory", or none at ""
    assert done.returncode == 2 and "--data-dir: must name a folder" in done.stderr, done.stderr


def test_adduser_and_token_do_not_upgrade_a_database_an_older_server_is_using(tmp_path):
    # Run between copying a new version in and restarting the server, they
    # upgraded its database under it: the older server's next start refused it.
    import fcntl
    data = tmp_path / "d"
    assert cli("adduser", "carol", "--data-dir", str(data)).returncode == 0
    with contextlib.closing(sqlite3.connect(data / "buildserver.db")) as db:
        db.executescript("DROP TABLE backup_taken; PRAGMA user_version = 8;")  # as before 9
    with open(data / "serve.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as that server holds it
        for args in (["token", "carol"], ["adduser", "dave"]):
            done = cli(*args, "--data-dir", str(data))
            assert done.returncode == 1 and "older buildserver is using" in done.stderr, done
            assert user_version(data / "buildserver.db") == 8
    assert cli("token", "carol", "--data-dir", str(data)).returncode == 0  # stopped: upgraded
    assert user_version(data / "buildserver.db") == max(schema_migrations())


def test_a_database_this_user_cannot_write_or_reach_is_said_so(tmp_path):
    # "... is not a SQLite database", or "there is no database at ...": it was there.
    data = tmp_path / "d"
    assert cli("adduser", "carol", "--data-dir", str(data)).returncode == 0
    if os.geteuid() != 0:
        os.chmod(data, 0)
        try:
            for args in (["token", "carol"], ["backup", str(tmp_path / "copy.db")]):
                done = cli(*args, "--data-dir", str(data))
                assert done.returncode == 2 and "Permission denied" in done.stderr, done.stderr
                assert "run this as its owner" in done.stderr
        finally:
            os.chmod(data, 0o700)
        return
    # Root reaches every folder, but not a read-only mount.
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"mount --bind -o ro {data} {data} && exec "
         f"{shlex.quote(sys.executable)} {SCRIPT} adduser dave --data-dir {data}"],
        capture_output=True, text=True, timeout=60)
    if "mount" in done.stderr or "unshare" in done.stderr:
        pytest.skip("needs unshare -m to mount the folder read-only")
    assert done.returncode == 1, done.stderr
    assert "this user must be able to read and write it and its folder" in done.stderr


def test_cli_token_gives_a_new_token_and_the_old_one_stops_working(tmp_path, open_api):
    data = tmp_path / "d"
    old = cli("adduser", "carol", "--data-dir", str(data)).stdout.strip().splitlines()[-1]
    renewed = cli("token", "carol", "--data-dir", str(data))
    assert renewed.returncode == 0, renewed.stderr
    new = renewed.stdout.strip().splitlines()[-1]
    assert new != old and len(new) >= 43
    client = open_api(data)
    assert_error(call(client, "GET", "/api/v1/carol", old), 401)
    assert ok(call(client, "GET", "/api/v1/carol", new))["count"] == 0


def test_a_token_replaced_with_the_cli_stops_working_on_a_running_server(server_factory):
    # The server remembers a token's user for a moment (Database.recent): a
    # token replaced by another process must still stop working within it.
    server = server_factory()
    old = server.token
    assert server.json("GET", "/api/v1/admin", token=old)[0] == 200  # now remembered
    renewed = cli("token", "admin", "--data-dir", str(server.data_dir))
    assert renewed.returncode == 0, renewed.stderr
    new = renewed.stdout.strip().splitlines()[-1]
    wait_until(lambda: server.json("GET", "/api/v1/admin", token=old)[0] == 401, timeout=10,
               message="the replaced token to be refused")
    assert server.json("GET", "/api/v1/admin", token=new)[0] == 200


def test_cli_token_for_an_unknown_user_fails_with_one_line(tmp_path):
    data = tmp_path / "d"
    cli("adduser", "carol", "--data-dir", str(data))
    res = cli("token", "dave", "--data-dir", str(data))
    assert res.returncode != 0 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1


def test_cli_token_with_a_mistyped_data_dir_creates_nothing(tmp_path):
    res = cli("token", "carol", "--data-dir", str(tmp_path / "typo"))
    assert res.returncode == 2 and "no database" in res.stderr
    assert not (tmp_path / "typo").exists()


def test_cli_says_a_reserved_user_name_is_an_endpoint_not_malformed(tmp_path):
    res = cli("adduser", "health", "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2 and "/api/v1/health is an endpoint" in res.stderr


@pytest.mark.parametrize("name", ["a.b", "health", "bookmarks", "a b", "x" * 65, "é"])
def test_cli_rejects_invalid_user_names(tmp_path, open_api, name):
    data = tmp_path / "d"
    res = cli("adduser", f"--data-dir={data}", "--", name)
    assert res.returncode != 0 and res.stdout == ""
    assert res.stderr.strip()
    if data.exists():  # nothing was created under the bad name
        assert open_api(data).app.store.user_by_name(name) is None


def test_cli_help_shows_every_serve_default():
    res = cli("serve", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    for flag, default in (("--host", "127.0.0.1"), ("--port", "8000"),
                          ("--data-dir", "./buildserver-data"), ("--workers", "2"),
                          ("--threads", "32"), ("--stop-grace", "10"),
                          ("--max-log-bytes", str(100 * MiB))):
        assert flag in text
        assert f"(default: {default})" in text, (flag, default)
    top = cli("--help")
    assert top.returncode == 0
    assert all(command in top.stdout for command in ("serve", "adduser", "token"))


def test_every_config_field_is_a_serve_flag_with_the_same_default(monkeypatch):
    for variable in [v for v in os.environ if v.startswith("BUILDSERVER_")]:
        monkeypatch.delenv(variable)
    args = buildserver.parser().parse_args(["serve"])
    fields = [field.name for field in dataclasses.fields(buildserver.Config)]
    assert {name: getattr(args, name) for name in fields} == \
        dataclasses.asdict(buildserver.Config())


def test_cli_reads_the_data_dir_from_the_environment(tmp_path, open_api):
    data = tmp_path / "from-env"
    res = cli("adduser", "erin", env={"BUILDSERVER_DATA_DIR": str(data)})
    assert res.returncode == 0, res.stderr
    client = open_api(data)
    assert ok(call(client, "GET", "/api/v1/erin", res.stdout.strip().splitlines()[-1]))


# A real server -------------------------------------------------------------------

def test_real_server_creates_a_project_runs_a_build_and_serves_its_log(server_factory):
    server = server_factory("--workers", "1")
    status, project = server.json("POST", "/api/v1/admin",
                                  {"name": "site", "command": "printf 'one\\ntwo\\n'"})
    assert status == 201 and project["owner"] == "admin"
    # A POST with a trailing slash over real HTTP: answered, not redirected.
    status, build = server.json("POST", "/api/v1/admin/site/builds/", {"name": "first"})
    assert status == 201 and build["name"] == "first"
    url = f"/api/v1/admin/site/builds/{build['id']}"
    assert server_final_build(server, url)["last_status"] == "succeeded"

    status, headers, body = server.request("GET", url + "/logs")
    headers = {k.lower(): v for k, v in headers.items()}
    assert status == 200 and body == b"one\ntwo\n"
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert (headers["x-log-size"], headers["x-more-data"]) == ("8", "false")
    assert server.request("GET", url + "/logs/?tail=1")[2] == b"two\n"
    status, page = server.json("GET", url + "/logs?format=json")
    assert status == 200 and page["text"] == "one\ntwo\n" and page["complete"] is True

    status, _, body = server.request("POST", "/api/v1/admin", body=b"{" + b" " * MiB + b"}",
                                     headers={"Content-Type": "application/json"})
    assert status == 413 and isinstance(json.loads(body)["detail"], str)
    status, _, body = server.request("GET", url + "/logs", token="wrong")
    assert status == 401 and server.token.encode() not in body

    wait_until(lambda: any("/logs" in line for line in list(server.stderr_lines)),
               message="the request log")
    assert not any(server.token in line for line in list(server.stderr_lines))


def test_real_server_log_follower_gets_reported_output_until_the_build_ends(server_factory):
    server = server_factory("--workers", "0")
    assert server.json("POST", "/api/v1/admin", {"name": "ext"})[0] == 201
    status, build = server.json("POST", "/api/v1/admin/ext/builds", {"is_managed": False,
                                                                     "command": "external"})
    assert status == 201
    url = f"/api/v1/admin/ext/builds/{build['id']}"
    result = {}
    follower = threading.Thread(
        target=lambda: result.setdefault("answer", server.request("GET", url + "/logs?follow=1")),
        daemon=True)
    follower.start()
    assert server.request("POST", url + "/logs", body=b"first\n")[0] == 200
    assert server.json("POST", url + "/statuses", {"status": "running"})[0] == 201
    assert server.request("POST", url + "/logs", body=b"second\n")[0] == 200
    assert server.json("POST", url + "/statuses", {"status": "succeeded"})[0] == 201
    wait_until(lambda: "answer" in result, timeout=20, message="the follower to end")
    status, headers, body = result["answer"]
    assert status == 200 and body == b"first\nsecond\n"


# Polyaxon's own client ------------------------------------------------------------
# polyaxon-client 0.6 (2019) is installed by .ci/run into a folder of its own,
# apart from the test environment, since it pins old libraries. It needs two
# shims on Python 3.10+: collections.Mapping and friends moved to
# collections.abc, and its Jinja2 needs MarkupSafe 2.0 (pinned at install).

POLYAXON_SHIM = """
import collections, collections.abc
for name in ("Mapping", "MutableMapping", "Sequence", "Iterable", "Callable", "Set",
             "MutableSet", "MutableSequence", "Hashable"):
    if not hasattr(collections, name):
        setattr(collections, name, getattr(collections.abc, name))
"""

POLYAXON_SCRIPT = """
import sys
from polyaxon_client.client import PolyaxonClient
host, port, token = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = PolyaxonClient(host=host, port=port, token=token, schema_response=True, reraise=True)
u, p = "admin", "app"
made = c.project.create_build(u, p, {"name": "from-polyaxon", "tags": ["px"], "is_managed": False})
print("create", made.id, made.unique_name, made.last_status)
b = c.build_job.get_build(u, p, made.id)
print("get", b.id, b.uuid.hex, b.name, b.tags)
b = c.build_job.update_build(u, p, made.id, {"description": "patched", "tags": ["a", "b"]})
print("update", b.description, b.tags)
s = c.build_job.create_status(u, p, made.id, status="running", message="agent started")
print("status", s.status, s.job, s.id)
print("send_logs", c.build_job.send_logs(u, p, made.id, ["line one", "line two"]).status_code)
print("logs", repr(c.build_job.logs(u, p, made.id, stream=False).text))
print("statuses", [x.status for x in c.build_job.get_statuses(u, p, made.id)["results"]])
ref = c.build_job.create_code_reference(u, p, made.id, {"commit": "ab12cd34", "branch": "main",
                                                         "git_url": "https://git/app.git",
                                                         "is_dirty": True})
print("coderef", ref.commit, ref.branch, ref.is_dirty)
ref = c.build_job.get_code_reference(u, p, made.id)
print("get_coderef", ref.commit, ref.head, ref.git_url)
print("bookmark", c.build_job.bookmark(u, p, made.id).json()["bookmarked"])
print("bookmarks", [x.id for x in c.bookmark.builds(u)["results"]])
print("unbookmark", c.build_job.unbookmark(u, p, made.id).json()["bookmarked"])
print("invalidate", c.build_job.invalidate(u, p, made.id).status_code)
print("invalidate_builds", c.project.invalidate_builds(u, p).status_code)
print("heartbeat", c.transport.post(c.build_job.get_heartbeat_url(u, p, made.id)).json())
print("final", c.build_job.create_status(u, p, made.id, status="succeeded").status)
print("list", [x.id for x in c.project.list_builds(u, p)["results"]])
managed = c.project.create_build(u, p, {"name": "managed"})
print("managed", managed.id, managed.last_status in ("scheduled", "running"))
print("stop", c.build_job.stop(u, p, managed.id).status_code,
      c.build_job.get_build(u, p, managed.id).last_status)
print("delete", c.build_job.delete_build(u, p, made.id).status_code)
try:
    c.build_job.get_build(u, p, made.id)
except Exception as e:
    print("gone", type(e).__name__)
me = c.auth.get_user()
print("me", me.username, me.email, me.is_superuser)
"""


def run_polyaxon(tmp_path, script, server, *args):
    """Run `script` with polyaxon-client 0.6.1 (installed by .ci/run) against `server`."""
    installed = os.environ.get("BUILDSERVER_POLYAXON", os.path.join(HERE, ".ci", "polyaxon"))
    if not os.path.isdir(os.path.join(installed, "polyaxon_client")):
        message = f"polyaxon-client 0.6.1 is not installed in {installed} (.ci/run does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    (tmp_path / "sitecustomize.py").write_text(POLYAXON_SHIM)
    (tmp_path / "drive.py").write_text(script)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "drive.py"), server.host, str(server.port), server.token,
         *args], env={**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{installed}"},
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_polyaxons_own_client_works_for_every_build_job_call(server_factory, tmp_path):
    server = server_factory("--stop-grace", "1")
    assert server.json("POST", "/api/v1/admin", {"name": "app", "command": "sleep 30"})[0] == 201
    done = run_polyaxon(tmp_path, POLYAXON_SCRIPT, server)
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"get 1 [0-9a-f]{32} from-polyaxon \['px'\]", lines.pop(1))
    assert lines == [
        "create 1 admin.app.builds.1 created",
        "update patched ['a', 'b']",
        "status running 1 2",
        "send_logs 200",
        "logs 'line one\\nline two'",
        "statuses ['created', 'running']",
        "coderef ab12cd34 main True",
        "get_coderef ab12cd34 None https://git/app.git",
        "bookmark True",
        "bookmarks [1]",
        "unbookmark False",
        "invalidate 200",
        "invalidate_builds 200",
        "heartbeat {'status': 'ok'}",
        "final succeeded",
        "list [1]",
        "managed 2 True",
        "stop 200 stopped",
        "delete 200",
        "gone NotFoundError",
        "me admin None True",
    ]


POLYAXON_TRACKING = """
import sys, time
from polyaxon_client.client import PolyaxonClient
from polyaxon_client.tracking import BuildJob
host, port, token, how = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
c = PolyaxonClient(host=host, port=port, token=token, schema_response=True, reraise=True)
job = BuildJob(project="admin/app", client=c, track_logs=False, track_code=False)
job.create(name="tracked", tags=["a"])  # (it sends backend: "other")
print("created", job.job_id, job.last_status)
if how == "itself":  # (these go in the background: the answers are not seen)
    job.log_tags(["b", "a"])  # (merged)
    job.log_backend("kaniko")
    job.log_dockerfile("FROM scratch")
    job.log_stopped()
    # Sent now, not left to the client's wait at exit: after 1 s that prints
    # its own lines ("... is attempting to send 2 pending messages").
    c.transport.worker._queue.join()
else:  # its owner stops it, and it ends as a script does (at exit: succeeded)
    for _ in range(3000):  # (its `running` goes in the background too)
        if c.build_job.get_build("admin", "app", job.job_id).last_status == "running":
            break
        time.sleep(0.01)
    c.build_job.stop("admin", "app", job.job_id)
"""


@pytest.mark.parametrize("how, tags, messages", [
    ("itself", ["a", "b"], [None, None, None, None]),
    ("by its owner", ["a"], [None, None, "stopped by admin", "it succeeded after its stop was asked"])])
def test_polyaxons_tracking_client_makes_and_ends_its_builds(server_factory, tmp_path, how, tags,
                                                              messages):
    # Its create sent backend "other" and was refused; its stop went from
    # `running` to `stopped`, refused, and the build stayed `running` for good
    # (or `stopping`, stopped by its owner, when it then reported `succeeded`).
    server = server_factory()
    assert server.json("POST", "/api/v1/admin", {"name": "app"})[0] == 201
    done = run_polyaxon(tmp_path, POLYAXON_TRACKING, server, how.split()[0])
    assert done.stdout.splitlines() == ["created 1 running"]
    path = "/api/v1/admin/app/builds/1"
    build = wait_until(lambda: (lambda b: b if b["last_status"] == "stopped" else None)(
        server.json("GET", path)[1]), message="the build to end stopped")
    assert build["tags"] == tags
    statuses = server.json("GET", path + "/statuses")[1]["results"]
    assert [(e["status"], e["message"]) for e in statuses] == list(zip(
        ["created", "running", "stopping", "stopped"], messages))


###############################################################################
# Runner ######################################################################
###############################################################################

@pytest.fixture
def configured(config, request):
    """Factory: set fields of `config`, then build the usual app on it.

    Returns (web, alice's token, the path of alice/app)."""
    def make(**fields):
        for name, value in fields.items():
            setattr(config, name, value)
        return (request.getfixturevalue("web"), request.getfixturevalue("alice"),
                request.getfixturevalue("project"))
    return make


class Gate:
    """A file that a build waits for: holds a build running until the test opens it."""

    def __init__(self, path):
        self.path = str(path)
        self.wait = f"while [ ! -e {shlex.quote(self.path)} ]; do sleep 0.02; done"

    def open(self):
        with open(self.path, "w"):
            pass


@pytest.fixture
def gate(tmp_path):
    """Factory of gates; every gate is opened at the end, so no build waits on."""
    gates = []

    def make(name="gate"):
        gates.append(Gate(tmp_path / f"{name}-{len(gates)}"))
        return gates[-1]
    yield make
    for g in gates:
        g.open()


def post_build(web, token, project, body=None):
    return web.post_json(project + "/builds", body or {}, headers=auth(token)).json


def build_log(web, token, project, number):
    return web.get(f"{project}/builds/{number}/logs", headers=auth(token)).body


def status_history(web, token, project, number):
    return web.get(f"{project}/builds/{number}/statuses?limit=100",
                   headers=auth(token)).json["results"]


def wait_for_status(web, token, project, number, status, timeout=15.0):
    def reached():
        body = web.get(f"{project}/builds/{number}", headers=auth(token)).json
        return body if body["last_status"] == status else None
    return wait_until(reached, timeout, message=f"build {number} to be {status}")


def wait_for_log(web, token, project, number, text, timeout=15.0):
    return wait_until(lambda: text in build_log(web, token, project, number), timeout,
                      message=f"{text!r} in the log of build {number}")


def wait_gone(marker, timeout=10.0):
    """Until no live process carries `marker` in its environment."""
    wait_until(lambda: not pids_with_marker(marker), timeout,
               message=f"the processes of {marker} to be gone")


def kill_marked(marker):
    for pid in pids_with_marker(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# Exit: succeeded, failed, killed ---------------------------------------------

def test_exit_0_succeeds_with_times_and_one_status_row_per_change(web, alice, project):
    build = post_build(web, alice, project, {"command": "echo built"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    assert done["exit_code"] == 0
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    started = buildserver.parse_iso(done["started_at"])
    finished = buildserver.parse_iso(done["finished_at"])
    assert done["duration"] == round((finished - started).total_seconds(), 3)
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history] == ["created", "scheduled", "running", "succeeded"]
    assert [s["id"] for s in history] == [1, 2, 3, 4]
    assert all(s["job"] == build["id"] for s in history)
    assert [s["created_at"] for s in history] == sorted(s["created_at"] for s in history)
    for entry in history[1:]:
        assert isinstance(entry["message"], str) and entry["message"].strip()
    assert build_log(web, alice, project, build["id"]) == b"built\n"


def test_nonzero_exit_fails_with_its_exit_code(web, alice, project):
    build = post_build(web, alice, project, {"command": "echo oops; exit 3"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("failed", 3)
    assert done["finished_at"] is not None and done["duration"] is not None
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history] == ["created", "scheduled", "running", "failed"]
    assert history[-1]["message"] == "exit code 3"


def test_build_killed_by_a_signal_fails_naming_the_signal(web, alice, project):
    build = post_build(web, alice, project, {"command": "kill -9 $$"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("failed", -9)
    history = status_history(web, alice, project, build["id"])
    assert history[-1]["status"] == "failed"
    assert history[-1]["message"] == "killed by signal SIGKILL"


# Environment, working folder, stdin -----------------------------------------------

def test_build_environment_merges_server_project_and_build_env(web, alice, admin, project,
                                                               config, monkeypatch):
    monkeypatch.setenv("RUNNER_TEST_FROM_SERVER", "server value")
    monkeypatch.setenv("RUNNER_TEST_OVERRIDDEN", "server value")
    web.patch_json(project, {"env": {"P_ONLY": "from project", "BOTH": "from project"}},
                   headers=auth(alice))
    build = post_build(web, admin, project, {
        "command": "env -0",
        "env": {"BOTH": "from build", "B_ONLY": "with spaces = and 'quotes'",
                "RUNNER_TEST_OVERRIDDEN": "build value"}})
    assert build["user"] == "root"
    assert build["env"] == {"P_ONLY": "from project", "BOTH": "from build",
                            "B_ONLY": "with spaces = and 'quotes'",
                            "RUNNER_TEST_OVERRIDDEN": "build value"}
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    raw = build_log(web, alice, project, build["id"])
    env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if item)
    env = {k.decode(): v.decode() for k, v in env.items()}
    workspace = os.path.join(config.workspaces, "alice", "app", str(build["id"]))
    assert env["P_ONLY"] == "from project"
    assert env["BOTH"] == "from build"
    assert env["B_ONLY"] == "with spaces = and 'quotes'"
    assert env["RUNNER_TEST_FROM_SERVER"] == "server value"
    assert env["RUNNER_TEST_OVERRIDDEN"] == "build value"
    assert env["PATH"] == os.environ["PATH"]
    assert env["BUILD_ID"] == str(build["id"])
    assert env["BUILD_UUID"] == build["uuid"]
    assert env["BUILD_PROJECT"] == "alice/app"
    assert env["BUILD_USER"] == "root"  # who created it, not the project's owner
    assert env["BUILD_WORKSPACE"] == workspace


def test_the_servers_own_settings_and_token_do_not_reach_builds_unless_their_env_says(
        web, alice, project, monkeypatch):
    # A token exported for the client went to every user's builds (and logs).
    monkeypatch.setenv("BUILDSERVER_TOKEN", "the-admins-token")
    monkeypatch.setenv("BUILDSERVER_DATA_DIR", "/the/servers/data")
    build = post_build(web, alice, project, {
        "command": "echo ${BUILDSERVER_TOKEN-none} ${BUILDSERVER_DATA_DIR-none} $BUILDSERVER_URL",
        "env": {"BUILDSERVER_URL": "http://127.0.0.1:8000"}})
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
        "succeeded"
    assert build_log(web, alice, project, build["id"]) == b"none none http://127.0.0.1:8000\n"


def test_an_env_value_at_the_limit_reaches_the_build(web, alice, project):
    # The limits are exec's own: a NAME=value of 128 KiB with its NUL.
    name, value = "N" * 256, "\u00e9" * ((128 * 1024 - 258) // 2)  # 130814 bytes of UTF-8
    build = ok(call(web, "POST", project + "/builds", alice, {
        "env": {name: value}, "command": f'printf %s "${name}" | wc -c'}), 201)
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded", build_log(web, alice, project, build["id"])
    assert build_log(web, alice, project, build["id"]).strip() == b"130814"


def test_build_workspace_is_absolute_with_a_relative_data_dir(tmp_path, monkeypatch):
    # The default --data-dir is ./buildserver-data; the build runs inside its
    # workspace, where a relative BUILD_WORKSPACE would lead nowhere.
    monkeypatch.chdir(tmp_path)
    application = buildserver.make_app(buildserver.Config(data_dir="relative-data", workers=1))
    try:
        web, alice = webtest.TestApp(application), application.store.create_user("alice")
        ok(call(web, "POST", "/api/v1/alice", alice, {"name": "app", "command": "true"}), 201)
        build = ok(call(web, "POST", "/api/v1/alice/app/builds", alice,
                        {"command": 'cd "$BUILD_WORKSPACE" && pwd -P'}), 201)
        done = final_build(web, alice, f"/api/v1/alice/app/builds/{build['id']}")
        assert done["last_status"] == "succeeded", build_log(web, alice, "/api/v1/alice/app", 1)
        expected = tmp_path.resolve() / "relative-data" / "workspaces" / "alice" / "app" / "1"
        assert build_log(web, alice, "/api/v1/alice/app", 1) == f"{expected}\n".encode()
    finally:
        application.close()


def test_build_runs_in_a_fresh_workspace_kept_after_and_removed_with_the_build(
        web, alice, project, config):
    workspace = os.path.join(config.workspaces, "alice", "app", "1")
    os.makedirs(workspace)
    with open(os.path.join(workspace, "stale"), "w") as f:
        f.write("left by someone else")
    build = post_build(web, alice, project,
                       {"command": "pwd -P; ls -A; echo made > product.txt"})
    assert build["id"] == 1
    done = final_build(web, alice, f"{project}/builds/1")
    assert done["last_status"] == "succeeded"
    log_text = build_log(web, alice, project, 1).decode()
    assert log_text == os.path.realpath(workspace) + "\n"  # empty listing: created fresh
    assert sorted(os.listdir(workspace)) == ["product.txt"]
    with open(os.path.join(workspace, "product.txt")) as f:
        assert f.read() == "made\n"
    web.delete(f"{project}/builds/1", headers=auth(alice))
    assert not os.path.exists(workspace)


def test_deleting_a_project_never_removes_the_workspace_of_a_namesake_made_meanwhile(
        web, alice, project, app, config, monkeypatch):
    # Removing a big workspace takes a while, and the name is free once the
    # rows are gone: a project made again under it, and its first build, must
    # keep their workspace. The namesake is made just as the removal begins.
    post_build(web, alice, project, {"command": "echo old > old.txt"})
    assert final_build(web, alice, f"{project}/builds/1")["last_status"] == "succeeded"
    namesakes = os.path.join(config.workspaces, "alice", "app", "1")
    rmtree, removed = shutil.rmtree, threading.Event()

    def namesake_made_first(path, *args, **kwargs):
        app.store.create_project(app.store.user_by_name("alice")["id"], {"name": "app"})
        os.makedirs(namesakes, exist_ok=True)
        with open(os.path.join(namesakes, "mine.txt"), "w") as f:
            f.write("the namesake's")
        rmtree(path, *args, **kwargs)
        removed.set()
    monkeypatch.setattr(buildserver.shutil, "rmtree", namesake_made_first)
    assert web.delete(project, headers=auth(alice)).status_int == 200
    assert removed.wait(30)  # (in a thread of its own)
    monkeypatch.undo()
    assert os.listdir(namesakes) == ["mine.txt"]  # and the old build's file is gone
    assert os.listdir(config.workspaces) == ["alice"]  # nothing left set aside


def test_workspaces_set_aside_by_deletes_before_a_stop_are_removed_at_start(config):
    # A server stopped between a delete and the removal of its workspaces. (In
    # a thread of its own: 100 000 builds' folders held the start for 11 s.)
    aside = os.path.join(config.workspaces, buildserver.SET_ASIDE + "0123abcd")
    os.makedirs(os.path.join(aside, "1"))
    open(os.path.join(aside, "1", "product.txt"), "w").close()
    os.makedirs(os.path.join(config.workspaces, "alice", "app", "1"))  # a live one stays
    application = buildserver.make_app(config)
    try:
        wait_until(lambda: sorted(os.listdir(config.workspaces)) == ["alice"],
                   message="the set-aside workspace to go")
        assert os.listdir(os.path.join(config.workspaces, "alice", "app")) == ["1"]
    finally:
        application.close()


def test_a_link_a_build_made_in_a_projects_place_goes_with_the_project(configured, config,
                                                                         tmp_path):
    # The link was set aside, then rmtree refused it: ".deleted-..." stayed, and
    # every start warned of it again. Its target stays, whole.
    web, alice, project = configured()
    ok(call(web, "POST", "/api/v1/alice", alice, {"name": "other"}), 201)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    build = post_build(web, alice, project, {"command": f"ln -s {target} ../../other"})
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
        "succeeded"
    assert os.path.islink(os.path.join(config.workspaces, "alice", "other"))
    ok(call(web, "DELETE", "/api/v1/alice/other", alice))
    wait_until(lambda: not [name for name in os.listdir(config.workspaces)
                            if name.startswith(buildserver.SET_ASIDE)],
               message="nothing left set aside")
    assert not os.path.lexists(os.path.join(config.workspaces, "alice", "other"))
    assert (target / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("making", ["mkfifo ../2", "echo x > ../2"])
def test_a_fifo_or_file_in_the_next_builds_place_is_removed_not_waited_on(configured, making):
    # rmtree opened the FIFO and waited for a writer for ever: the build showed
    # running with no process, its worker was gone, and stop could not end it.
    web, alice, project = configured()
    first = post_build(web, alice, project, {"command": making})
    assert final_build(web, alice, f"{project}/builds/{first['id']}")["last_status"] == \
        "succeeded"
    build = post_build(web, alice, project, {"command": "echo two"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded", done
    assert build_log(web, alice, project, build["id"]) == b"two\n"


def test_a_build_that_puts_a_link_in_place_of_the_workspaces_folder_aims_nothing_out(
        configured, config, tmp_path):
    # The next builds ran in the link's target, and their start and a delete
    # emptied what was there.
    web, alice, project = configured()
    outside = tmp_path / "outside"
    (outside / "alice" / "app" / "2").mkdir(parents=True)
    (outside / "alice" / "app" / "2" / "precious").write_text("mine")
    (outside / "alice" / "app" / "keep.txt").write_text("mine")
    moved = post_build(web, alice, project, {"command": (
        f"cd ../../../.. && mv workspaces moved && ln -s {outside} workspaces")})
    assert final_build(web, alice, f"{project}/builds/{moved['id']}")["last_status"] == "succeeded"
    assert os.path.islink(config.workspaces)
    build = post_build(web, alice, project, {"command": "pwd -P"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "failed" and build_log(web, alice, project, build["id"]) == b""
    ok(call(web, "DELETE", project, alice))
    # A removal in the background would have started before the answer, in a
    # thread named after its function (see _in_background): none may be left.
    wait_until(lambda: not any(thread.name.startswith("_remove")
                               for thread in threading.enumerate()),
               timeout=30, message="the removals in the background to end")
    assert (outside / "alice" / "app" / "2" / "precious").read_text() == "mine"
    assert (outside / "alice" / "app" / "keep.txt").read_text() == "mine"


def test_a_restart_over_a_link_in_place_of_the_workspaces_folder_refuses_to_start(
        configured, config, tmp_path):
    # The next start took the link's target for the workspaces folder: it
    # removed what it took for deleted workspaces there, and the next builds
    # ran and the next deletes removed there.
    web, alice, project = configured()
    outside = tmp_path / "outside"
    (outside / ".deleted-keep").mkdir(parents=True)
    (outside / ".deleted-keep" / "precious").write_text("mine")
    moved = post_build(web, alice, project, {"command": (
        f"cd ../../../.. && mv workspaces moved && ln -s {outside} workspaces")})
    assert final_build(web, alice, f"{project}/builds/{moved['id']}")["last_status"] == "succeeded"
    web.app.close()
    done = run_cli("serve", "--port", "0", "--data-dir", config.data_dir)
    assert_clear_failure(done, re.escape(config.workspaces) + r" is a link \(to " +
                         re.escape(str(outside)), "a build may have made it")
    assert (outside / ".deleted-keep" / "precious").read_text() == "mine"
    assert sorted(os.listdir(outside)) == [".deleted-keep"]


@pytest.mark.parametrize("delete", ["/builds/1", ""])
def test_a_running_unmanaged_build_deleted_ends_for_the_log_bus(web, app, alice, project,
                                                                  delete):
    # Its news stayed in the bus for ever: only ended builds' news is forgotten.
    unmanaged(web, alice, project)
    report(web, alice, project + "/builds/1", "running")
    append_log(web, alice, project + "/builds/1", b"output\n")
    build_id = app.store.build_at("alice", "app", 1)["id"]
    assert app.bus.news(build_id)[1] == len(b"output\n")
    ok(call(web, "DELETE", project + delete, alice))
    assert app.bus.news(build_id) == buildserver.LogBus.ENDED


@contextlib.contextmanager
def a_folder_for_nobody():
    """A fresh folder outside pytest's (whose parents nobody may not enter),
    removed afterwards, read-only folders in it too."""
    top = tempfile.mkdtemp(prefix="buildserver-ro-")
    try:
        yield top
    finally:
        for root, names, _ in os.walk(top):
            for name in names:
                os.chmod(os.path.join(root, name), 0o700)
        shutil.rmtree(top)


def give_to_nobody(top):
    """Under root, make everything in `top` nobody's (see as_an_ordinary_user)."""
    if os.geteuid() == 0:
        for root, names, files in os.walk(top):
            for name in [root] + [os.path.join(root, n) for n in names + files]:
                os.lchown(name, 65534, 65534)


def as_an_ordinary_user(code, *args):
    """Run Python `code` (with buildserver importable) as the user running the
    tests or, under root (which may delete anywhere), as nobody."""
    as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] \
        if os.geteuid() == 0 else []
    start = f"import sys; sys.path.insert(0, {HERE!r}); import buildserver; "
    if as_user and (not shutil.which("setpriv") or subprocess.run(
            [*as_user, sys.executable, "-c", start], capture_output=True, timeout=60).returncode):
        pytest.skip("cannot run this Python as nobody")
    return subprocess.run([*as_user, sys.executable, "-c", start + code, *args],
                          capture_output=True, text=True, timeout=60)


OLD_GLIBC = """
real_chmod = os.chmod
def chmod(path, mode, *, dir_fd=None, follow_symlinks=True):
    if not follow_symlinks:  # glibc before 2.32: fchmodat(AT_SYMLINK_NOFOLLOW) is ENOTSUP
        raise (ValueError if dir_fd is not None else NotImplementedError)("unavailable")
    return real_chmod(path, mode, dir_fd=dir_fd)
os.chmod = chmod
"""


@pytest.mark.parametrize("glibc", ["today's", "before 2.32"])
def test_a_workspace_with_read_only_folders_is_removed_and_no_link_is_followed(glibc):
    # Go makes its module cache read-only: rmtree(ignore_errors=True) left such
    # a deleted workspace behind for ever, and said nothing.
    with a_folder_for_nobody() as top:
        workspace, outside = os.path.join(top, "ws"), os.path.join(top, "outside")
        os.makedirs(os.path.join(workspace, "cache", "mod", "pkg"))
        os.makedirs(os.path.join(workspace, "locked", "inner"))
        os.makedirs(outside)
        open(os.path.join(workspace, "cache", "mod", "pkg", "f"), "w").close()
        os.symlink(outside, os.path.join(workspace, "cache", "link"))
        give_to_nobody(top)
        for folder in ("cache/mod/pkg", "cache/mod", "cache", "locked/inner"):
            os.chmod(os.path.join(workspace, folder), 0o555)
        os.chmod(os.path.join(workspace, "locked"), 0)
        os.chmod(outside, 0o555)
        done = as_an_ordinary_user(("import os\n" + OLD_GLIBC if glibc != "today's" else "") +
                                   "buildserver._remove(sys.argv[1])", workspace)
        assert done.returncode == 0 and "cannot remove" not in done.stderr, done.stderr
        assert not os.path.exists(workspace)
        assert stat.S_IMODE(os.stat(outside).st_mode) == 0o555  # the link was not followed


def test_a_read_only_workspace_is_set_aside_for_its_removal():
    # Moving a folder changes its "..": a build that made its own, or its
    # project's, folder read-only kept it on disk after its delete, and a
    # project made again under its name could start no build.
    with a_folder_for_nobody() as top:
        workspaces = os.path.join(top, "workspaces")
        os.makedirs(os.path.join(workspaces, "alice", "app", "1", "out"))
        give_to_nobody(top)
        os.chmod(os.path.join(workspaces, "alice", "app", "1"), 0o555)
        os.chmod(os.path.join(workspaces, "alice", "app"), 0o555)
        done = as_an_ordinary_user(
            "aside = buildserver._set_aside(sys.argv[1], 'alice', 'app')\n"
            "assert aside is not None\n"
            "buildserver._remove(aside)", workspaces)
        assert done.returncode == 0 and "cannot" not in done.stderr, done.stderr
        assert os.listdir(os.path.join(workspaces, "alice")) == []


def test_a_build_that_gets_no_output_pipe_fails_saying_why_and_the_worker_runs_on(
        web, alice, project, monkeypatch):
    pipe = os.pipe

    def no_pipe_for_output():  # the descriptors run out just as the build starts
        if sys._getframe(1).f_code.co_name == "_run":
            raise OSError(errno.EMFILE, "Too many open files")
        return pipe()
    monkeypatch.setattr(buildserver.os, "pipe", no_pipe_for_output)
    build = post_build(web, alice, project, {"command": "echo never"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    monkeypatch.undo()
    assert done["last_status"] == "failed"
    assert status_history(web, alice, project, build["id"])[-1]["message"] == \
        "could not start: Too many open files"
    build = post_build(web, alice, project, {"command": "echo ran"})
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
        "succeeded"


def test_a_build_that_cannot_start_fails_with_the_reason_and_the_worker_runs_on(
        web, alice, project, config):
    # A file where the project's workspace folder should be: no workspace can be made.
    os.makedirs(os.path.join(config.workspaces, "alice"))
    with open(os.path.join(config.workspaces, "alice", "app"), "w") as f:
        f.write("in the way")
    build = post_build(web, alice, project, {"command": "echo never"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "failed"
    assert done["log_size"] == 0 and done["started_at"] and done["finished_at"]
    entries = ok(web.get(f"{project}/builds/{build['id']}/statuses", headers=auth(alice)))
    assert [e["status"] for e in entries["results"]] == ["created", "scheduled", "running",
                                                          "failed"]
    assert entries["results"][-1]["message"] == "could not start: Not a directory: " + \
        os.path.join(config.workspaces, "alice", "app", str(build["id"]))  # (it said not where)
    os.remove(os.path.join(config.workspaces, "alice", "app"))
    build = post_build(web, alice, project, {"command": "echo ran"})
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
        "succeeded"


def test_a_build_whose_job_cannot_be_made_fails_even_if_stopped_meanwhile(
        web, alice, project, app, monkeypatch):
    # Out of file descriptors once the build is `running` (its Job's wake-up pipe),
    # and a stop in that moment, which finds no Job and records `stopping`.
    def no_job(build):
        raise OSError(errno.EMFILE, "Too many open files")
    label = app.store.label

    def stopped_meanwhile(build_id):
        app.runner.stop(build_id, "stopped by alice")
        return label(build_id)
    monkeypatch.setattr(buildserver, "Job", no_job)
    monkeypatch.setattr(app.store, "label", stopped_meanwhile)
    build = post_build(web, alice, project, {"command": "echo never"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    entries = ok(web.get(f"{project}/builds/{build['id']}/statuses", headers=auth(alice)))
    assert [e["status"] for e in entries["results"]][-3:] == ["running", "stopping", "failed"]
    assert done["last_status"] == "failed"
    assert entries["results"][-1]["message"] == "could not start: [Errno 24] Too many open files"


def made_again_meanwhile(app, name="app"):
    """Delete alice's project `name` and make a namesake of it, as another
    client may while a request runs; returns the namesake's row."""
    old = app.store.project("alice", name)
    assert app.store.delete_project(old["id"])
    assert app.store.create_project(old["owner_id"], {"name": name, "command": "echo new"})[1] is None
    return app.store.project("alice", name)


def test_a_patch_of_a_project_made_again_meanwhile_changes_neither_and_says_so(
        web, alice, project, app, monkeypatch):
    # It answered 200 with the namesake, which it had not changed: the change was lost.
    update = app.store.update_project

    def made_again_first(project_id, fields):
        made_again_meanwhile(app)
        return update(project_id, fields)
    monkeypatch.setattr(app.store, "update_project", made_again_first)
    answer = web.patch_json(project, {"timeout": 60}, headers=auth(alice), status=404)
    assert answer.json["detail"] == buildserver.DELETED_MEANWHILE
    monkeypatch.undo()
    assert ok(web.get(project, headers=auth(alice)))["timeout"] is None


def test_a_project_deleted_as_soon_as_made_is_answered_404_not_500(
        web, alice, app, monkeypatch):
    # Its answer read the project back by name, found none, and failed (500).
    create = app.store.create_project

    def deleted_at_once(owner_id, fields):
        made = create(owner_id, fields)
        app.store.delete_project(made[0])
        return made
    monkeypatch.setattr(app.store, "create_project", deleted_at_once)
    answer = web.post_json("/api/v1/alice", {"name": "brief"}, headers=auth(alice), status=404)
    assert answer.json["detail"] == buildserver.DELETED_MEANWHILE


def test_a_code_reference_of_a_build_deleted_meanwhile_is_not_said_to_be_recorded(
        web, alice, project, app, monkeypatch):
    build = post_build(web, alice, project, {"command": "true"})
    path = f"{project}/builds/{build['id']}"
    final_build(web, alice, path)
    update = app.store.update_build

    def deleted_first(build_id, fields):
        app.store.delete_build(build_id)
        return update(build_id, fields)
    monkeypatch.setattr(app.store, "update_build", deleted_first)
    answer = web.post_json(path + "/coderef", {"commit": "abcdef1"}, headers=auth(alice),
                           status=404)
    assert answer.json["detail"] == buildserver.DELETED_MEANWHILE


def test_a_restart_whose_project_was_made_again_meanwhile_copies_nothing_into_the_new_one(
        web, alice, project, app, monkeypatch):
    # The namesake got a copy of a build of the deleted project, and ran its command.
    build = post_build(web, alice, project, {"command": "echo from the old project"})
    path = f"{project}/builds/{build['id']}"
    final_build(web, alice, path)
    build_at = app.store.build_at

    def made_again_after(owner, name, number):
        found = build_at(owner, name, number)
        if found is not None:
            made_again_meanwhile(app)
        return found
    monkeypatch.setattr(app.store, "build_at", made_again_after)
    answer = web.post(path + "/restart", headers=auth(alice), status=404)
    assert answer.json["detail"] == buildserver.DELETED_MEANWHILE
    monkeypatch.undo()
    assert ok(web.get(project + "/builds", headers=auth(alice)))["count"] == 0


def idle_workers(app, count):
    wait_until(lambda: app.runner._idle == count, message=f"{count} idle workers")


@contextlib.contextmanager
def first_wake_up_held(runner):
    """The runner's next notice to an idle worker is lost, as when that
    worker is slow to be scheduled: it wakes only with the notice after."""
    notify, held = runner._cond.notify, []

    def hold_first(n=1):
        if not held:
            held.append(n)
        else:
            notify(n)
    runner._cond.notify = hold_first
    try:
        yield
    finally:
        runner._cond.notify = notify


def claim_fails_once_on_a_full_disk(app, monkeypatch, before_failing=lambda: None):
    """The next claim, once the other of two workers is idle, meets a full
    disk; the worker that made it then pauses until the returned Event is set.
    Returns (that Event, a list that gets the build's id when it fails)."""
    paused, failed = threading.Event(), []
    claim, transition = app.runner._claim, app.store.transition

    def claim_once_the_other_is_idle(build_id):
        if not failed:
            wait_until(lambda: app.runner._idle == 1, message="the other worker idle")
        return claim(build_id)

    def full_disk_once(build_id, status, *args, **kwargs):
        if status == "running" and not failed:
            failed.append(build_id)
            before_failing()
            raise sqlite3.OperationalError("database or disk is full")
        return transition(build_id, status, *args, **kwargs)
    monkeypatch.setattr(app.runner, "_pause", lambda seconds: paused.wait(30))
    monkeypatch.setattr(app.runner, "_claim", claim_once_the_other_is_idle)
    monkeypatch.setattr(app.store, "transition", full_disk_once)
    return paused, failed


def test_a_build_created_while_a_worker_is_idle_starts_in_the_same_commit(
        web, alice, project, app, tmp_path):
    # No claim of the worker's own: the create answer already says `running`.
    go = tmp_path / "go"
    idle_workers(app, 2)
    build = post_build(web, alice, project, {
        "command": f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.01; done; echo quick"})
    go.touch()
    assert build["last_status"] == "running"
    assert build["started_at"] == build["created_at"]
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history][:3] == ["created", "scheduled", "running"]
    assert history[1]["message"] == "a worker is free"  # (not waiting for one)
    assert {s["created_at"] for s in history[:3]} == {build["created_at"]}
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    assert build_log(web, alice, project, build["id"]) == b"quick\n"


def test_a_build_created_while_every_worker_is_busy_waits_scheduled(web, alice, project, app):
    idle_workers(app, 2)
    busy = [post_build(web, alice, project, {"command": "sleep 0.5"}) for _ in range(2)]
    assert [b["last_status"] for b in busy] == ["running", "running"]
    waiting = post_build(web, alice, project, {"command": "echo later"})
    assert (waiting["last_status"], waiting["started_at"]) == ("scheduled", None)
    for build in busy + [waiting]:
        assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
            "succeeded"
    assert build_log(web, alice, project, waiting["id"]) == b"later\n"
    history = status_history(web, alice, project, waiting["id"])
    assert history[1]["message"] == "waiting for a free worker"


def test_a_queued_build_whose_job_cannot_be_made_fails_and_the_worker_runs_on(
        web, alice, project, app, monkeypatch):
    idle_workers(app, 2)
    busy = [post_build(web, alice, project, {"command": "sleep 0.5"}) for _ in range(2)]

    def no_job(build):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(buildserver, "Job", no_job)
    queued = post_build(web, alice, project, {"command": "echo never"})
    assert queued["last_status"] == "scheduled"
    done = final_build(web, alice, f"{project}/builds/{queued['id']}")
    assert done["last_status"] == "failed"
    history = status_history(web, alice, project, queued["id"])
    assert [s["status"] for s in history] == ["created", "scheduled", "running", "failed"]
    assert history[-1]["message"] == "could not start: [Errno 24] Too many open files"
    monkeypatch.undo()
    for build in busy:
        assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
            "succeeded"
    again = post_build(web, alice, project, {"command": "echo ran"})
    assert final_build(web, alice, f"{project}/builds/{again['id']}")["last_status"] == \
        "succeeded"


def test_a_shutdown_while_a_build_is_made_for_an_idle_worker_stops_it(
        web, alice, project, app):
    # The idle worker has not woken for its build when the shutdown begins:
    # it must still take that build, which may be running already, not leave.
    idle_workers(app, 2)
    runner = app.runner
    make, entered = app.store.create_build, threading.Event()

    def slow_make(*args, **kwargs):
        if kwargs.get("running") or args[4:5] == (True,):
            entered.set()
            wait_until(runner._closing.is_set, message="the shutdown to begin")
            wait_until(lambda: runner._idle == 0, message="the workers to see it")
        return make(*args, **kwargs)
    app.store.create_build = slow_make
    answers = []
    poster = threading.Thread(target=lambda: answers.append(
        post_build(web, alice, project, {"command": "echo never; sleep 30"})))
    with first_wake_up_held(runner):  # the make's: the worker wakes with the shutdown's
        poster.start()
        assert entered.wait(10)
        stopper = threading.Thread(target=app.shutdown, kwargs={"timeout": 10})
        stopper.start()
        poster.join(20)
        stopper.join(20)
    assert not any(thread.is_alive() for thread in runner._threads)
    build = answers[0]  # made running, then stopped: not left running
    row = app.store.build_at("alice", "app", build["id"])
    history = [s["status"] for s in app.store.statuses(row["id"], 100, 0)[1]]
    assert history == ["created", "scheduled", "running", "stopping", "stopped"]
    assert row["pgid"] is None and row["log_size"] == 0  # its command never started


def test_a_shutdown_while_a_queued_build_is_claimed_stops_it_before_its_command(
        web, alice, project, app, tmp_path):
    # The shutdown begins while the claim writes `running`; it then waits for
    # the runner's lock, and the worker must not start the command meanwhile.
    runner = app.runner
    idle_workers(app, 2)
    go = tmp_path / "go"
    for _ in range(2):
        post_build(web, alice, project, {
            "command": f"while [ ! -e {shlex.quote(str(go))} ]; do sleep 0.01; done"})
    queued = post_build(web, alice, project, {"command": "echo started; sleep 30"})
    assert queued["last_status"] == "scheduled"
    transition, entered = app.store.transition, threading.Event()

    def slow_claim(build_id, status, *args, **kwargs):
        if status == "running" and kwargs.get("sources") == ("scheduled",):
            entered.set()
            wait_until(runner._closing.is_set, message="the shutdown to begin")
            time.sleep(0.3)  # (the shutdown reaches the runner's lock: the race is likely)
        return transition(build_id, status, *args, **kwargs)
    app.store.transition = slow_claim
    go.touch()
    assert entered.wait(10)
    stopper = threading.Thread(target=app.shutdown, kwargs={"timeout": 10})
    stopper.start()
    stopper.join(30)
    assert not any(thread.is_alive() for thread in runner._threads)
    row = app.store.build_at("alice", "app", queued["id"])
    history = [s["status"] for s in app.store.statuses(row["id"], 100, 0)[1]]
    assert history == ["created", "scheduled", "running", "stopping", "stopped"]
    assert row["pgid"] is None and row["log_size"] == 0  # its command never started


def test_a_claim_that_fails_on_the_machine_is_retried_by_an_idle_worker(
        web, alice, project, app, monkeypatch):
    # The worker whose claim met a full disk pauses (here until the test ends);
    # the build goes back first in line, and a worker that sat idle must wake for it.
    idle_workers(app, 2)
    paused, failed = claim_fails_once_on_a_full_disk(app, monkeypatch)
    busy = [post_build(web, alice, project, {"command": "sleep 0.2"}) for _ in range(2)]
    queued = post_build(web, alice, project, {"command": "echo claimed"})
    assert queued["last_status"] == "scheduled"
    try:
        done = final_build(web, alice, f"{project}/builds/{queued['id']}")
    finally:
        paused.set()
    assert failed and done["last_status"] == "succeeded"
    assert build_log(web, alice, project, queued["id"]) == b"claimed\n"
    for build in busy:
        assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
            "succeeded"


def test_a_build_made_for_an_idle_worker_goes_before_a_claim_put_back(
        web, alice, project, app, monkeypatch):
    # A worker's claim meets a full disk just as a build is made running for
    # the other, idle, worker; the claim goes back first in line, and the
    # idle worker wakes to it: it must take the build made for it first.
    runner = app.runner
    idle_workers(app, 2)
    paused, failed = claim_fails_once_on_a_full_disk(app, monkeypatch, lambda: wait_until(
        lambda: runner._handoffs, message="a build made for the idle worker"))
    busy = [post_build(web, alice, project, {"command": "sleep 0.2"}) for _ in range(2)]
    queued = post_build(web, alice, project, {"command": "echo queued"})
    assert queued["last_status"] == "scheduled"
    wait_until(lambda: failed, message="a worker to claim the queued build")
    try:
        with first_wake_up_held(runner):  # the idle worker wakes with the claim put back
            made = post_build(web, alice, project, {"command": "echo made"})
        assert made["last_status"] == "running"
        done = final_build(web, alice, f"{project}/builds/{made['id']}")  # the other pauses
        assert done["last_status"] == "succeeded"
    finally:
        paused.set()
    for build in busy + [queued]:
        assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
            "succeeded"
    assert build_log(web, alice, project, queued["id"]) == b"queued\n"


def test_build_stdin_is_dev_null(web, alice, project):
    build = post_build(web, alice, project,
                       {"command": "cat; echo cat ended; readlink /proc/$$/fd/0"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    assert build_log(web, alice, project, build["id"]) == b"cat ended\n/dev/null\n"


# Output ---------------------------------------------------------------------------

def test_stdout_and_stderr_are_merged_in_arrival_order(web, alice, project):
    command = "echo out1; echo err1 >&2; echo out2; echo err2 1>&2; printf 'no newline' >&2"
    build = post_build(web, alice, project, {"command": command})
    final_build(web, alice, f"{project}/builds/{build['id']}")
    assert build_log(web, alice, project, build["id"]) == b"out1\nerr1\nout2\nerr2\nno newline"


def test_large_output_is_stored_byte_exact(web, alice, project):
    size = 5 * 1024 * 1024 + 7
    build = post_build(web, alice, project,
                       {"command": f"yes 0123456789abcdefghijklmnopqrstuvwxyz | head -c {size}"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
    assert done["last_status"] == "succeeded"
    assert (done["log_size"], done["truncated"]) == (size, False)
    expected = (b"0123456789abcdefghijklmnopqrstuvwxyz\n" * (size // 37 + 1))[:size]
    response = web.get(f"{project}/builds/{build['id']}/logs", headers=auth(alice))
    assert response.headers["X-Log-Size"] == str(size)
    assert response.body == expected


def test_binary_output_keeps_every_byte_value(web, alice, project):
    octal = "".join(f"\\{value:03o}" for value in range(256))
    build = post_build(web, alice, project, {"command": f"printf '{octal}'; printf '{octal}'"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "succeeded"
    assert done["log_size"] == 512
    assert build_log(web, alice, project, build["id"]) == bytes(range(256)) * 2


def test_log_cap_drops_later_output_while_the_build_runs_on(configured, config):
    web, alice, project = configured(max_log_bytes=1000)
    # 3 MB is more than the pipe holds: a runner that stopped reading would hang the build.
    command = "yes 'a line of output' | head -c 3000000; echo went on > after.txt; echo end"
    build = post_build(web, alice, project, {"command": command})
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
    assert (done["last_status"], done["exit_code"], done["truncated"]) == ("succeeded", 0, True)
    log_bytes = build_log(web, alice, project, build["id"])
    assert len(log_bytes) == done["log_size"]
    assert log_bytes[:1000] == (b"a line of output\n" * 60)[:1000]
    kept, notice = log_bytes[:1000], log_bytes[1000:]
    assert b"end" not in notice
    assert notice.startswith(b"\n") and notice.endswith(b"\n") and notice.count(b"\n") == 2
    assert not kept.endswith(b"\n")  # (1000 is no multiple of 17: the notice begins a line)
    assert b"truncated" in notice and b"1000" in notice
    assert kept.count(b"a line of output\n") == 1000 // 17
    workspace = os.path.join(config.workspaces, "alice", "app", str(build["id"]))
    assert os.path.exists(os.path.join(workspace, "after.txt"))


# Workers --------------------------------------------------------------------------

def test_a_build_waits_scheduled_while_the_only_worker_is_busy(configured, gate):
    web, alice, project = configured(workers=1)
    hold = gate()
    first = post_build(web, alice, project, {"command": hold.wait + "; echo first"})
    wait_for_status(web, alice, project, first["id"], "running")
    second = post_build(web, alice, project, {"command": "echo second"})
    assert second["last_status"] == "scheduled"
    body = web.get(f"{project}/builds/{second['id']}", headers=auth(alice)).json
    assert (body["last_status"], body["started_at"]) == ("scheduled", None)
    assert web.get(f"{project}/builds/{first['id']}", headers=auth(alice)).json[
        "last_status"] == "running"
    hold.open()
    done = final_build(web, alice, f"{project}/builds/{second['id']}")
    assert done["last_status"] == "succeeded"
    first_done = final_build(web, alice, f"{project}/builds/{first['id']}")
    assert first_done["finished_at"] <= done["started_at"]
    assert build_log(web, alice, project, second["id"]) == b"second\n"


def test_waiting_builds_run_first_come_first_served(configured, gate, tmp_path):
    web, alice, project = configured(workers=1)
    hold = gate()
    order = shlex.quote(str(tmp_path / "order"))
    numbers = [post_build(web, alice, project,
                          {"command": hold.wait + f"; echo $BUILD_ID >> {order}"})["id"]]
    wait_for_status(web, alice, project, numbers[0], "running")
    for _ in range(4):
        numbers.append(post_build(web, alice, project,
                                  {"command": f"echo $BUILD_ID >> {order}"})["id"])
    hold.open()
    done = [final_build(web, alice, f"{project}/builds/{n}") for n in numbers]
    assert [b["last_status"] for b in done] == ["succeeded"] * 5
    with open(tmp_path / "order") as f:
        assert f.read().split() == [str(n) for n in numbers]
    starts = [b["started_at"] for b in done]
    assert starts == sorted(starts)


def test_zero_workers_keep_builds_scheduled(configured, config):
    web, alice, project = configured(workers=0)
    build = post_build(web, alice, project, {"command": "echo never"})
    time.sleep(0.5)  # nothing to wait for: no build may start
    body = web.get(f"{project}/builds/{build['id']}", headers=auth(alice)).json
    assert (body["last_status"], body["started_at"], body["log_size"]) == ("scheduled", None, 0)
    assert [s["status"] for s in status_history(web, alice, project, build["id"])] == [
        "created", "scheduled"]
    assert not os.path.exists(os.path.join(config.workspaces, "alice", "app", "1"))


# Stop, delete, timeout --------------------------------------------------------------

def test_stop_of_a_running_build_goes_through_stopping(web, alice, project):
    build = post_build(web, alice, project, {"command": "echo ready; sleep 60"})
    wait_for_log(web, alice, project, build["id"], b"ready")
    response = web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice))
    assert response.status_int == 200
    assert response.json["last_status"] in ("stopping", "stopped")
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "stopped"
    assert done["finished_at"] is not None
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history] == [
        "created", "scheduled", "running", "stopping", "stopped"]
    assert history[-1]["message"] == "stopped by alice"
    assert history[-2]["message"] == "stopped by alice"
    wait_gone(f"BUILD_UUID={build['uuid']}")
    again = web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice))
    assert again.status_int == 200 and again.json["last_status"] == "stopped"
    assert len(status_history(web, alice, project, build["id"])) == 5


def test_stop_of_a_scheduled_build_stops_it_at_once_and_it_never_runs(configured, gate,
                                                                      config):
    web, alice, project = configured(workers=1)
    hold = gate()
    first = post_build(web, alice, project, {"command": hold.wait})
    wait_for_status(web, alice, project, first["id"], "running")
    waiting = post_build(web, alice, project, {"command": "echo should not run"})
    response = web.post(f"{project}/builds/{waiting['id']}/stop", headers=auth(alice))
    assert response.status_int == 200
    assert response.json["last_status"] == "stopped"
    hold.open()
    assert final_build(web, alice, f"{project}/builds/{first['id']}")["last_status"] == "succeeded"
    # The freed worker finds nothing to run: a build created now runs next.
    after = post_build(web, alice, project, {"command": "true"})
    final_build(web, alice, f"{project}/builds/{after['id']}")
    body = web.get(f"{project}/builds/{waiting['id']}", headers=auth(alice)).json
    assert (body["last_status"], body["started_at"], body["log_size"]) == ("stopped", None, 0)
    history = status_history(web, alice, project, waiting["id"])
    assert [s["status"] for s in history] == ["created", "scheduled", "stopped"]
    assert history[-1]["message"] == "stopped by alice"
    assert not os.path.exists(os.path.join(config.workspaces, "alice", "app",
                                           str(waiting["id"])))


def test_a_stop_with_no_grace_answers_the_build_stopped(configured):
    # SIGKILL follows SIGTERM at once: the answer waits for the end all the same.
    web, alice, project = configured(stop_grace=0.0)
    build = post_build(web, alice, project, {"command": "trap '' TERM; echo ready; sleep 60"})
    wait_for_log(web, alice, project, build["id"], b"ready")
    answer = ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    assert answer["last_status"] == "stopped" and answer["exit_code"] == -9
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_build_ignoring_sigterm_is_killed_after_the_grace_period(configured):
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project,
                       {"command": "trap '' TERM; sleep 60 & echo ready; sleep 60; wait"})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    assert len(pids_with_marker(marker)) >= 3  # the shell and both sleeps
    response = web.post(f"{project}/builds/{build['id']}/", headers=auth(alice))  # seed's stop
    assert response.status_int == 200
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("stopped", -9)
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history][-3:] == ["running", "stopping", "stopped"]
    assert history[-1]["message"] == "stopped by alice"
    at = {s["status"]: buildserver.parse_iso(s["created_at"]) for s in history}
    assert (at["stopped"] - at["stopping"]).total_seconds() >= 0.95  # the 1 s grace was given
    wait_gone(marker)


CLEANS_UP = ("import signal, sys, time\n"
             "def cleanup(*_):\n"
             "    print('cleaning up', flush=True); time.sleep(0.5)\n"
             "    print('cleaned up', flush=True); sys.exit(0)\n"
             "signal.signal(signal.SIGTERM, cleanup); print('ready', flush=True)\n"
             "time.sleep(60)\n")


@pytest.mark.parametrize("ending, elsewhere", [("stop", False), ("timeout", False),
                                               ("stop", True)])
def test_a_command_the_shell_runs_as_its_child_has_the_grace_to_clean_up(configured, config,
                                                                          ending, elsewhere):
    # dash runs `python3 x.py` as its child: the SIGTERM ended the shell at once,
    # and its end killed the group, the child in the middle of its cleanup. (Its
    # output sent elsewhere, the group was killed once the shell had ended.)
    web, alice, project = configured(stop_grace=30.0)
    command = f"{shlex.quote(sys.executable)} -c {shlex.quote(CLEANS_UP)}"
    command += " >out.txt 2>&1; echo after" if elsewhere else "; echo after"
    build = post_build(web, alice, project, {"command": command,
                                             "timeout": 5 if ending == "timeout" else None})
    out = os.path.join(config.workspaces, "alice", "app", str(build["id"]), "out.txt")
    if elsewhere:
        wait_until(lambda: os.path.exists(out) and open(out, "rb").read() == b"ready\n",
                   message="the command to be ready")
    else:
        wait_for_log(web, alice, project, build["id"], b"ready")
    if ending == "stop":
        ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
    said = open(out, "rb").read() if elsewhere else build_log(web, alice, project, build["id"])
    assert said == b"ready\ncleaning up\ncleaned up\n"
    assert done["last_status"] == ("stopped" if ending == "stop" else "failed")
    assert status_history(web, alice, project, build["id"])[-1]["message"] == (
        "stopped by alice" if ending == "stop" else "timed out after 5 s")
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_child_of_a_stopped_shell_the_real_server_adopted_has_the_grace_to_clean_up(
        server_factory, tmp_path):
    # The served server adopts it once the shell has gone (the tests' in-process
    # one does not), and looks among what it adopted last before anywhere else.
    server, path, _ = serving_a_running_build(
        server_factory, tmp_path / "d", "--stop-grace", "30",
        command=f"{shlex.quote(sys.executable)} -c {shlex.quote(CLEANS_UP)}; echo after")
    status, stopped = server.json("POST", path + "/stop")
    assert (status, stopped["last_status"]) == (200, "stopped")  # (it waits 2 s at most)
    assert server.request("GET", path + "/logs")[2] == b"ready\ncleaning up\ncleaned up\n"


def test_a_member_adopted_before_others_still_holds_its_stopped_build_open(server_factory,
                                                                            tmp_path):
    # Among the server's 8 newest adoptees are another build's orphans, not
    # this member (orphaned early): only a look at every process finds it.
    server, path, _ = serving_a_running_build(
        server_factory, tmp_path / "d", "--stop-grace", "30",
        command="(trap '' TERM; (until [ -e go ]; do sleep 0.05; done; echo late > late.txt) "
                "> /dev/null 2>&1 &); echo ready; sleep 60")
    builds = path.rsplit("/", 1)[0]
    status, other = server.json("POST", builds, {
        "command": "for i in $(seq 10); do (sleep 60 &); done; echo ready; sleep 60"})
    assert status == 201
    other_path = f"{builds}/{other['id']}"
    workspace = os.path.join(server.data_dir, "workspaces", "admin", "app", "1")
    try:
        server_wait_for_log(server, other_path, b"ready")
        status, stopping = server.json("POST", path + "/stop")  # (it waits 2 s at most)
        assert (status, stopping["last_status"]) == (200, "stopping")
        open(os.path.join(workspace, "go"), "w").close()
        assert server_final_build(server, path, timeout=30)["last_status"] == "stopped"
        assert server.request("GET", path + "/logs")[2] == b"ready\n"
        assert os.path.exists(os.path.join(workspace, "late.txt"))  # (it ran to its end)
    finally:
        server.json("POST", other_path + "/stop")


MAIN_THREAD_ENDS = ("import ctypes, os, signal, threading, time\n"
                    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                    "threading.Thread(target=time.sleep, args=(60,)).start()\n"
                    "open('member.pid', 'w').write(str(os.getpid()))\n"
                    "ctypes.CDLL(None).pthread_exit(None)\n")


def test_a_member_whose_main_thread_ended_has_the_grace_and_then_is_killed(configured, config):
    # Its main thread gone, it read as ended ("Z") while a thread ran on: the
    # stop ended the build at once and nothing ever killed it.
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project, {
        "command": f"{shlex.quote(sys.executable)} -c {shlex.quote(MAIN_THREAD_ENDS)} & wait"})
    pid_file = os.path.join(config.workspaces, "alice", "app", str(build["id"]), "member.pid")
    pid = int(wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read()))

    def thread_of_member():
        return [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    thread = wait_until(lambda: open(f"/proc/{pid}/stat").read().split(") ")[1][0] == "Z" and
                        thread_of_member())[0]
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "stopped"
    wait_until(lambda: not os.path.exists(f"/proc/{pid}/task/{thread}"),
               message="the member's thread to be killed")


def test_a_group_it_made_whose_leaders_main_thread_ended_goes_with_the_build(configured, config):
    # Found by its BUILD_UUID, which the leader's environ no longer shows once
    # its main thread ended: it ran on, holding the build's output, for good.
    web, alice, project = configured(stop_grace=1.0)
    own_group = "import os; os.setpgid(0, 0)\n" + MAIN_THREAD_ENDS
    build = post_build(web, alice, project, {
        "command": f"{shlex.quote(sys.executable)} -c {shlex.quote(own_group)} & "
                   "while [ ! -e member.pid ]; do sleep 0.05; done; sleep 0.5; exit 3"})
    pid_file = os.path.join(config.workspaces, "alice", "app", str(build["id"]), "member.pid")
    pid = int(wait_until(lambda: os.path.exists(pid_file) and open(pid_file).read()))
    threads = [t for t in os.listdir(f"/proc/{pid}/task") if t != str(pid)]
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("failed", 3)
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}/task/{t}") for t in threads),
               message="the group's thread to be killed")


# Runs the server as the child of a process that adopts orphans and never reaps
# them, as some containers' first process does: what ends stays a zombie.
NEGLIGENT_INIT = ("import ctypes, os, signal, sys; "
                  "ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0); "  # a subreaper
                  "pid = os.fork()\n"
                  "if pid == 0: os.execv(sys.argv[1], sys.argv[1:])\n"
                  "signal.signal(signal.SIGTERM, lambda *a: os.kill(pid, signal.SIGTERM))\n"
                  "sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))")


def test_a_stopped_builds_processes_that_ended_unreaped_do_not_hold_it_stopping(
        server_factory, tmp_path):
    # The shell's group counted its zombies: under a first process slow to
    # reap (this machine's took 2 s) every stop waited for it, or the grace.
    server, path, _ = serving_a_running_build(server_factory, tmp_path / "d", "--stop-grace", "60",
                                              wrap=(sys.executable, "-c", NEGLIGENT_INIT))
    status, stopped = server.json("POST", path + "/stop")
    assert (status, stopped["last_status"]) == (200, "stopped")  # (it waits 2 s at most)


def _parent(pid):
    return int(buildserver._stat(pid)[1])  # (after the state)


def test_what_a_build_leaves_is_the_servers_to_reap_under_a_first_process_that_never_does(
        server_factory, tmp_path):
    # Orphans went to the first process: slow to reap (this VM's took 2 s), or
    # never, and a stop had to read every process's status to see past them.
    # The server is now their reaper (Linux), and reaps them as they end.
    server, path, _ = serving_a_running_build(
        server_factory, tmp_path / "d", wrap=(sys.executable, "-c", NEGLIGENT_INIT),
        command="setsid sleep 300 > /dev/null 2>&1 & echo $! > daemon.pid; echo ready")
    assert server_final_build(server, path)["last_status"] == "succeeded"
    with open(os.path.join(server.data_dir, "workspaces", "admin", "app", "1", "daemon.pid")) as f:
        daemon = int(f.read())
    try:
        server_pid = _parent(daemon)  # the server (which the first process started), adopted it
        assert _parent(server_pid) == server.proc.pid
    finally:
        os.kill(daemon, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{daemon}"), 10.0,
               message="the ended daemon to be reaped")


def test_the_server_adopts_nothing_under_a_proc_of_another_pid_namespace():
    # Under `unshare --pid` without `--mount-proc`, it took the host's pid 1's
    # (or 2's) children for its own, and reaped by those numbers its own
    # shells: a build that had failed ended `succeeded`, exit code 0.
    wrap = ("unshare", "--pid", "--fork", "--kill-child")
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --pid (root) to run in a pid namespace of its own")
    adopt = "import buildserver; buildserver._adopt_orphans(); print(buildserver._adopted)"
    seen = [subprocess.run([*wrap, *proc, sys.executable, "-c", adopt], cwd=HERE, timeout=60,
                           capture_output=True, text=True, check=True).stdout.strip()
            for proc in ((), ("--mount-proc",))]
    assert seen == ["None", "/proc/1/task/1/children"]  # (its own /proc: it adopts)


def test_the_reaping_of_what_builds_leave_never_takes_a_shell_its_worker_waits_for(
        web, alice, project, app, config, monkeypatch):
    # A shell that has exited is a zombie too, until its worker reaps it; were
    # it reaped first, its worker would read exit code 0 (Python does when the
    # child is gone). The adopted are the main thread's children; the shells, a worker's.
    monkeypatch.setattr(buildserver, "_adopted", f"/proc/{os.getpid()}/task/{os.getpid()}/children")
    build = post_build(web, alice, project, {"command": OUTPUT_THEN_EXIT_ON_GO + "; exit 7"})
    release, job = _held_after_output(app, monkeypatch, build)
    try:
        _let_exit(config, build, job)
        buildserver._reap_adopted()
    finally:
        release.set()
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("failed", 7)


def test_a_group_a_cleanup_makes_after_the_stop_gets_no_sigterm_of_its_own(configured,
                                                                         monkeypatch):
    # A bounded upload in the trap (`timeout` makes a group of its own) got the
    # SIGTERM meant for the groups the build had made before the stop; and
    # still did when the runner's thread ran late after sending the stop's
    # SIGTERM (on one busy core): the time of the stop, read then, was after
    # the upload had begun. Here the clock is read 0.2 s late.
    def late_ticks(*args, ticks=buildserver._boot_ticks, **kwargs):
        time.sleep(0.2)
        return ticks(*args, **kwargs)
    monkeypatch.setattr(buildserver, "_boot_ticks", late_ticks)
    web, alice, project = configured(stop_grace=30.0)
    build = post_build(web, alice, project, {"command": (
        "trap 'echo cleaning; timeout 20 sh -c \"sleep 1; echo uploaded\"; echo rc=$?; exit 1'"
        " TERM; echo ready; sleep 100 & wait")})
    wait_for_log(web, alice, project, build["id"], b"ready")
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
    assert build_log(web, alice, project, build["id"]) == b"ready\ncleaning\nuploaded\nrc=0\n"
    assert done["last_status"] == "stopped"
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_stop_where_there_is_no_boot_clock_gives_the_build_its_grace(configured,
                                                                      monkeypatch):
    # macOS has no CLOCK_BOOTTIME: dating the stop raised in the runner, whose
    # end then killed the build at once (no trap ran, no exit code).
    monkeypatch.delattr(time, "CLOCK_BOOTTIME")
    web, alice, project = configured(stop_grace=30.0)
    build = post_build(web, alice, project, {"command": (
        "trap 'echo cleaning; exit 3' TERM; echo ready; while :; do sleep 0.1; done")})
    wait_for_log(web, alice, project, build["id"], b"ready")
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
    assert (done["last_status"], done["exit_code"]) == ("stopped", 3)
    assert build_log(web, alice, project, build["id"]).endswith(b"cleaning\n")


# GNU timeout puts itself and its command in a process group of their own: a
# stop or timeout that signalled the shell's group alone left them running
# after the build had ended (and their worker had taken the next build).
ESCAPING = "timeout 300 sh -c 'echo ready; exec sleep 301'; echo after"


@pytest.mark.parametrize("ending", ["stop", "timeout"])
def test_a_stop_or_timeout_ends_what_left_the_group_too(configured, ending):
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project,
                       {"command": ESCAPING, "timeout": 3 if ending == "timeout" else None})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    groups = {os.getpgid(pid) for pid in pids_with_marker(marker)}
    assert len(groups) == 2  # the shell's, and timeout's with its sleep
    if ending == "stop":
        ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == ("stopped" if ending == "stop" else "failed")
    wait_gone(marker)
    assert build_log(web, alice, project, build["id"]) == b"ready\n"


def test_a_stop_answers_stopped_though_what_left_the_group_held_the_output(configured,
                                                                          monkeypatch):
    # The shell died at once, but timeout and its sleep kept the output pipe
    # open, and the end waited for the pipe to drain: the answer (which waits
    # 2 s) said `stopping`.
    monkeypatch.setattr(buildserver, "DRAIN_SECONDS", 30.0)
    web, alice, project = configured(stop_grace=20.0)
    build = post_build(web, alice, project, {"command": ESCAPING})
    wait_for_log(web, alice, project, build["id"], b"ready")
    answer = ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    assert answer["last_status"] == "stopped"
    wait_gone(f"BUILD_UUID={build['uuid']}")


@pytest.mark.skipif(not shutil.which("bash"), reason="needs bash (dash has no job control here)")
def test_groups_made_while_the_others_are_being_ended_are_ended_too(configured):
    # The last search came up to 50 ms before the SIGKILL: what a living
    # parent made in between ran on. (A grace longer than the output's drain.)
    web, alice, project = configured(stop_grace=3.0)
    build = post_build(web, alice, project, {"command": (
        "timeout 600 bash -c 'set -m; trap \"\" TERM; echo ready;"
        " while :; do sleep 300 >/dev/null 2>&1 & sleep 0.005; done'; :")})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == "stopped"
    wait_gone(marker)


def test_the_other_groups_get_the_stops_sigterm_while_the_shell_holds_out(configured, config):
    # A shell that traps TERM outlives it; the timeout group inside got nothing
    # until the grace had ended, and then SIGKILL 10 ms after its SIGTERM.
    web, alice, project = configured(stop_grace=5.0)
    build = post_build(web, alice, project, {"command": (
        "trap 'echo shell got TERM' TERM; timeout 600 sh -c "
        "'trap \"echo other group got TERM; exit 0\" TERM; echo ready; while :; do sleep 0.05; done'")})
    wait_for_log(web, alice, project, build["id"], b"ready")
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert done["last_status"] == "stopped"
    log_text = build_log(web, alice, project, build["id"])  # (sh may add "Terminated")
    assert log_text.index(b"other group got TERM") < log_text.index(b"shell got TERM")
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_delete_waits_for_the_other_groups_before_it_removes_the_workspace(
        configured, config, caplog):
    # They were still writing there for their grace: the removal failed
    # (Directory not empty) and the folder stayed until the next start.
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project, {"command": (
        "timeout 600 sh -c 'trap \"\" TERM; echo ready; i=0;"
        " while :; do i=$((i+1)); mkdir -p d/$i; : > d/$i/f; done'; :")})
    wait_for_log(web, alice, project, build["id"], b"ready")
    with caplog.at_level(logging.WARNING, logger="buildserver"):
        ok(web.delete(project, headers=auth(alice)))
        wait_until(lambda: os.listdir(config.workspaces) in ([], ["alice"]),
                   message="the workspace to be removed (in a thread of its own)")
    assert not [r for r in caplog.records if "cannot remove" in r.getMessage()]
    assert not os.path.exists(os.path.join(config.workspaces, "alice", "app"))
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_group_the_build_made_that_holds_its_output_ends_with_the_build(web, alice, project):
    # The build waited out the 1 s drain for it, and then left it running.
    build = post_build(web, alice, project, {
        "command": "timeout 600 sh -c 'echo ready; exec sleep 301' & sleep 0.5; echo done"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
    assert build_log(web, alice, project, build["id"]) == b"ready\ndone\n"
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_build_that_makes_a_link_of_its_projects_folder_cannot_aim_the_server_out(
        web, alice, project, config, tmp_path):
    # The next build's workspace was made empty, and a delete removed it,
    # in the folder the link pointed to.
    victim = tmp_path / "victim"
    (victim / "2").mkdir(parents=True)
    (victim / "2" / "data").write_text("keep")
    first = post_build(web, alice, project, {"command": f"cd ../..; mv app app.real; "
                                                        f"ln -s {victim} app"})
    assert final_build(web, alice, f"{project}/builds/{first['id']}")["last_status"] == \
        "succeeded"
    second = post_build(web, alice, project, {"command": "pwd"})
    done = final_build(web, alice, f"{project}/builds/{second['id']}")
    assert done["last_status"] == "failed"
    assert "link out of the data folder" in status_history(web, alice, project, second["id"])[
        -1]["message"]
    ok(web.delete(f"{project}/builds/{second['id']}", headers=auth(alice)))
    assert (victim / "2" / "data").read_text() == "keep"


def test_a_daemon_a_build_started_outlives_its_stop(configured):
    # A process that left the build's session on purpose (an agent, a Gradle
    # daemon that later builds share) is not the build's to end while the server runs.
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project, {
        "command": "setsid sleep 302 >/dev/null 2>&1 < /dev/null & echo ready; sleep 301"})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    wait_until(lambda: len(pids_with_marker(marker)) == 3, message="the daemon to start")
    try:
        ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
        assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == \
            "stopped"
        wait_until(lambda: len(pids_with_marker(marker)) == 1, message="the build to end")
        time.sleep(1.5)  # its grace, and then some: the daemon lives on
        daemon, = pids_with_marker(marker)
        assert os.getsid(daemon) == daemon
    finally:
        kill_marked(marker)


def test_what_left_the_group_and_ignores_sigterm_is_killed_when_the_grace_ends(configured):
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project, {
        "command": "timeout 300 sh -c \"trap '' TERM; echo ready; sleep 301; sleep 302\""})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    assert final_build(web, alice, f"{project}/builds/{build['id']}")["last_status"] == "stopped"
    wait_gone(marker)


def test_a_shutdown_ends_what_left_a_running_builds_group_too(server_factory):
    server = server_factory()
    path = admin_project(server)
    status, build = server.json("POST", path + "/builds", {"command": ESCAPING})
    assert status == 201
    marker = f"BUILD_UUID={build['uuid']}"
    wait_until(lambda: server.request("GET", f"{path}/builds/{build['id']}/logs")[2] ==
               b"ready\n", message="the build to be ready")
    assert len({os.getpgid(pid) for pid in pids_with_marker(marker)}) == 2
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    wait_gone(marker)


def test_background_children_die_when_the_shell_exits(web, alice, project):
    build = post_build(web, alice, project,
                       {"command": "sleep 60 >/dev/null 2>&1 </dev/null & echo started"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_background_child_holding_the_output_pipe_does_not_keep_the_build_running(
        web, alice, project):
    build = post_build(web, alice, project, {"command": "sleep 60 & echo bye; exit 0"})
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=20)
    assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
    assert build_log(web, alice, project, build["id"]) == b"bye\n"
    wait_gone(f"BUILD_UUID={build['uuid']}")


def test_a_child_outside_the_group_holding_the_pipe_does_not_keep_the_build_running(
        web, alice, project):
    # (the pause lets the child leave the group before the shell's exit kills the group)
    build = post_build(web, alice, project, {"command": "setsid sleep 30 & sleep 0.3; echo bye"})
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=20)
        assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
        assert build_log(web, alice, project, build["id"]) == b"bye\n"
    finally:
        kill_marked(marker)


# The shell exits 0 once a child has left its process group (killed with the
# group, the child would not hold the pipe), and that child holds the output open.
ESCAPE_THEN_EXIT = ("setsid sh -c ': > escaped; exec sleep 30' & "
                    "while [ ! -e escaped ]; do sleep 0.01; done; exit 0")


@pytest.fixture
def long_drain(monkeypatch):
    """The output of a build whose shell has exited drains for 3 s: its other
    process groups are sought (and ended) after that, not after 10 ms."""
    monkeypatch.setattr(buildserver, "ESCAPED_SEARCH_DELAY", 3.0)
    monkeypatch.setattr(buildserver, "DRAIN_SECONDS", 4.0)


def test_a_stop_while_the_last_output_drains_does_not_change_how_the_build_ended(
        web, alice, project, app, long_drain):
    # The shell exited 0, but a child outside its group holds the pipe: the
    # server drains the output for a moment. A stop then comes too late.
    build = post_build(web, alice, project, {"command": ESCAPE_THEN_EXIT})
    marker = f"BUILD_UUID={build['uuid']}"
    url = f"{project}/builds/{build['id']}"
    try:
        internal_id = app.db.one("SELECT id FROM builds WHERE uuid = ?", (build["uuid"],))[0]

        def draining():  # the server has seen the exit
            job = app.runner._jobs.get(internal_id)
            return job is not None and job.finishing
        wait_until(draining, message="the server to see the shell's exit")
        assert call(web, "POST", url + "/stop", alice).status_int == 200
        done = final_build(web, alice, url, timeout=20)
        assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
        history = web.get(url + "/statuses", headers=auth(alice)).json["results"]
        assert [s["status"] for s in history] == ["created", "scheduled", "running", "succeeded"]
    finally:
        kill_marked(marker)


def test_a_timeout_while_the_last_output_drains_does_not_change_how_the_build_ended(
        web, alice, project, long_drain):
    # Exit at once, output drained for 3 s more: the timeout at 2 s comes too late.
    build = post_build(web, alice, project, {"command": ESCAPE_THEN_EXIT, "timeout": 2})
    try:
        done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=20)
        assert (done["last_status"], done["exit_code"]) == ("succeeded", 0), done
    finally:
        kill_marked(f"BUILD_UUID={build['uuid']}")


def _held_after_output(app, monkeypatch, build):
    """Hold the runner in its first store of `build`'s output: (the event
    that lets it go on, its Job). The shell then exits while the runner has
    not seen it."""
    entered, release = threading.Event(), threading.Event()
    flush = app.runner._flush

    def held(job, data):
        if job.build["uuid"] == build["uuid"] and not entered.is_set():
            entered.set()
            release.wait(30)
        return flush(job, data)
    monkeypatch.setattr(app.runner, "_flush", held)
    assert entered.wait(15), "the runner to store the output"
    job, = [j for j in app.runner._jobs.values() if j.build["uuid"] == build["uuid"]]
    return release, job


def _let_exit(config, build, job):
    """Let a build running OUTPUT_THEN_EXIT_ON_GO exit; returns once its
    shell has (it is not reaped: the runner is held)."""
    open(os.path.join(config.workspaces, "alice", "app", str(build["id"]), "go"), "w").close()
    fd = os.pidfd_open(job.pgid)
    try:
        assert select.select([fd], [], [], 15)[0], "the shell to exit"
    finally:
        os.close(fd)


def _assert_succeeded_and_nothing_else(web, alice, project, build):
    done = final_build(web, alice, f"{project}/builds/{build['id']}")
    assert (done["last_status"], done["exit_code"]) == ("succeeded", 0), done
    assert [s["status"] for s in status_history(web, alice, project, build["id"])] == \
        ["created", "scheduled", "running", "succeeded"]


# Prints, then exits 0 once its workspace holds a file `go`.
OUTPUT_THEN_EXIT_ON_GO = "echo out; until [ -e go ]; do sleep 0.01; done"


def test_a_stop_after_the_shell_exited_changes_nothing_though_the_runner_had_not_seen_it(
        web, alice, project, app, config, monkeypatch):
    # The runner is held up storing output (another writer holds the database,
    # a busy machine) while the shell exits 0; a stop asked after that comes too late.
    build = post_build(web, alice, project, {"command": OUTPUT_THEN_EXIT_ON_GO})
    release, job = _held_after_output(app, monkeypatch, build)
    try:
        stop = job.stop

        def stop_then_go_on(*args):  # the runner goes on once the stop is asked
            stop(*args)
            release.set()
        monkeypatch.setattr(job, "stop", stop_then_go_on)
        _let_exit(config, build, job)
        assert call(web, "POST", f"{project}/builds/{build['id']}/stop", alice).status_int == 200
        assert release.is_set()
        _assert_succeeded_and_nothing_else(web, alice, project, build)
    finally:
        release.set()


def test_a_timeout_the_runner_comes_to_after_the_shell_exited_changes_nothing(
        web, alice, project, app, config, monkeypatch):
    # (3 s: the runner must reach its first store of output before the timeout.)
    build = post_build(web, alice, project, {"command": OUTPUT_THEN_EXIT_ON_GO, "timeout": 3})
    release, job = _held_after_output(app, monkeypatch, build)
    try:
        _let_exit(config, build, job)
        while time.monotonic() < job.started_at + 3.2:  # its timeout is past when the runner goes on
            time.sleep(0.05)
        release.set()
        _assert_succeeded_and_nothing_else(web, alice, project, build)
    finally:
        release.set()


def test_a_group_the_build_made_is_killed_when_the_grace_ends_also_if_the_shell_lasted_it(
        configured, monkeypatch):
    # The shell ignores SIGTERM, so the grace's SIGKILL is what ends it; the
    # group it made (which ignores SIGTERM and holds the output) goes then
    # too, not once the output has drained for DRAIN_SECONDS more.
    monkeypatch.setattr(buildserver, "DRAIN_SECONDS", 60.0)
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project, {"command": (
        "timeout 300 sh -c \"trap '' TERM; while :; do echo tick; sleep 0.1; done\" & "
        "trap '' TERM; echo ready; sleep 301")})
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        wait_for_log(web, alice, project, build["id"], b"ready")
        wait_until(lambda: len({os.getpgid(pid) for pid in pids_with_marker(marker)}) == 2,
                   message="the build's second group to start")
        ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
        done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=30)
        assert (done["last_status"], done["exit_code"]) == ("stopped", -9), done
        wait_gone(marker)
    finally:
        kill_marked(marker)


def test_deleting_a_running_build_stops_it_and_removes_it(web, alice, project, config):
    build = post_build(web, alice, project, {"command": "echo ready; sleep 60"})
    marker = f"BUILD_UUID={build['uuid']}"
    wait_for_log(web, alice, project, build["id"], b"ready")
    workspace = os.path.join(config.workspaces, "alice", "app", str(build["id"]))
    assert os.path.isdir(workspace) and pids_with_marker(marker)
    response = web.delete(f"{project}/builds/{build['id']}", headers=auth(alice))
    assert response.status_int == 200
    web.get(f"{project}/builds/{build['id']}", headers=auth(alice), status=404)
    web.get(f"{project}/builds/{build['id']}/logs", headers=auth(alice), status=404)
    assert not os.path.exists(workspace)
    wait_gone(marker)


def test_deleting_a_project_stops_its_builds(configured, config):
    web, alice, project = configured(workers=2)
    builds = [post_build(web, alice, project, {"command": "echo ready; sleep 60"})
              for _ in range(3)]  # two run, the third waits
    for build in builds[:2]:
        wait_for_log(web, alice, project, build["id"], b"ready")
    assert web.get(f"{project}/builds/{builds[2]['id']}", headers=auth(alice)).json[
        "last_status"] == "scheduled"
    response = web.delete(project, headers=auth(alice))
    assert response.status_int == 200
    web.get(project, headers=auth(alice), status=404)
    for build in builds:
        wait_gone(f"BUILD_UUID={build['uuid']}")
    assert not os.path.exists(os.path.join(config.workspaces, "alice", "app"))
    # A new project of the same name starts from scratch.
    web.post_json("/api/v1/alice", {"name": "app", "command": "true"}, headers=auth(alice))
    assert web.get(project + "/builds", headers=auth(alice)).json["count"] == 0


def test_timeout_stops_the_build_and_fails_it(web, alice, project):
    build = post_build(web, alice, project, {"command": "sleep 30", "timeout": 1})
    web.patch_json(project, {"timeout": 1}, headers=auth(alice))
    inherited = post_build(web, alice, project, {"command": "sleep 30"})
    assert inherited["timeout"] == 1
    for number in (build["id"], inherited["id"]):
        done = final_build(web, alice, f"{project}/builds/{number}", timeout=20)
        assert (done["last_status"], done["exit_code"]) == ("failed", -15)
        history = status_history(web, alice, project, number)
        assert [s["status"] for s in history] == [
            "created", "scheduled", "running", "stopping", "failed"]
        assert history[-1]["message"] == "timed out after 1 s"
        assert history[-2]["message"] == "timed out after 1 s"
        wait_gone(f"BUILD_UUID={done['uuid']}")


def test_timeout_of_a_build_ignoring_sigterm_kills_it_after_the_grace_period(configured):
    web, alice, project = configured(stop_grace=1.0)
    build = post_build(web, alice, project,
                       {"command": "trap '' TERM; sleep 60 & sleep 60; wait", "timeout": 1})
    done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=20)
    assert (done["last_status"], done["exit_code"]) == ("failed", -9)
    history = status_history(web, alice, project, build["id"])
    assert [s["status"] for s in history][-3:] == ["running", "stopping", "failed"]
    assert history[-1]["message"] == "timed out after 1 s"
    at = {s["status"]: buildserver.parse_iso(s["created_at"]) for s in history}
    assert (at["failed"] - at["stopping"]).total_seconds() >= 0.95  # the 1 s grace was given
    wait_gone(f"BUILD_UUID={build['uuid']}")


# Following a log over a real server ----------------------------------------------

def admin_project(server):
    status, _ = server.json("POST", "/api/v1/admin", {"name": "app"})
    assert status == 201
    return "/api/v1/admin/app"


def open_follow(server, path, timeout=10, port=None):
    """A follow request on its own connection (to `port` on loopback: a proxy
    in front of `server`); returns (connection, response)."""
    conn = http.client.HTTPConnection(*(("127.0.0.1", port) if port else
                                        (server.host, server.port)), timeout=timeout)
    conn.request("GET", path + "/logs?follow=1",
                 headers={"Authorization": f"Token {server.token}"})
    return conn, conn.getresponse()


def server_wait_for_log(server, path, text, timeout=15.0):
    return wait_until(lambda: text in server.request("GET", path + "/logs")[2], timeout,
                      message=f"{text!r} in the log of {path}")


def bus_waiter(bus, build_id, seen, position):
    """A thread waiting on `bus` (for up to 30 s), started; returns once it
    waits, unless news before it waited let it through at once."""
    thread = threading.Thread(target=bus.wait, args=(build_id, seen, position, 30), daemon=True)
    before = waiters_of(bus, build_id)
    thread.start()
    wait_until(lambda: waiters_of(bus, build_id) > before or not thread.is_alive(),
               message="the follower to wait")
    return thread


def waiters_of(bus, build_id):
    return len(bus._waiting.get(build_id, ()))


def test_log_bus_wakes_a_follower_only_for_output_past_its_position_or_the_end():
    bus = buildserver.LogBus()
    waiter = bus_waiter(bus, 1, bus.news(1), 10)
    bus.notify(2, 100)  # another build
    bus.notify(1, 10)   # short of the position
    waiter.join(0.3)
    assert waiter.is_alive(), "woken by output that was not for it"
    bus.notify(1, 11)
    waiter.join(10)
    assert not waiter.is_alive()
    ended = bus_waiter(bus, 1, bus.news(1), 11)
    bus.notify(1, None)  # the build ended
    ended.join(10)
    assert not ended.is_alive()
    assert bus._waiting == {}  # woken followers leave nothing behind


def test_log_bus_news_between_a_look_and_the_wait_is_not_missed():
    bus = buildserver.LogBus()
    seen = bus.news(1)  # the follower looks, finds nothing past 10 ...
    bus.notify(1, 20)   # ... output arrives before it waits
    waiter = threading.Thread(target=bus.wait, args=(1, seen, 10, 30), daemon=True)
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive()


def test_log_bus_forgets_ended_builds_now_and_then_but_never_a_running_ones_news(monkeypatch):
    # One entry per build for ever would grow without end on a long-lived server.
    monkeypatch.setattr(buildserver.LogBus, "KEPT_ENDED", 100)
    bus = buildserver.LogBus()
    bus.notify(0, 5)  # a build still running
    for build_id in range(1, 1001):
        bus.notify(build_id, 1)
        bus.notify(build_id, None)
    assert len(bus._news) <= 102
    assert bus.news(0) == (1, 5) and bus.news(1000) == bus.ENDED
    waiter = bus_waiter(bus, 0, bus.news(0), 5)  # its followers still wake
    bus.notify(0, None)
    waiter.join(10)
    assert not waiter.is_alive()


def test_auth_throttle_forgets_quiet_addresses_with_no_failure_to_prompt_it(clock):
    # After an attack from 24 000 addresses, all 24 000 were kept for ever (it
    # forgot only at a failure beyond twice what it kept).
    throttle = buildserver.AuthThrottle(burst=3, window=0.2)
    for n in range(3000):
        throttle.failed(f"10.1.{n // 256}.{n % 256}")
    clock[0] += 0.1
    throttle.forget_quiet()
    assert len(throttle._failures) == 3000  # still within their window
    clock[0] += 0.2
    throttle.forget_quiet()
    assert throttle._failures == {}


def test_auth_throttle_still_counts_an_address_among_thousands_of_others():
    throttle = buildserver.AuthThrottle(burst=3)
    for n in range(25000):  # many addresses failing at once: pruned now and then
        assert throttle.failed(f"10.0.{n // 256}.{n % 256}") == 0
    assert [throttle.failed("192.0.2.1") for _ in range(4)][:3] == [0, 0, 0]
    assert throttle.failed("192.0.2.1") > 0


def test_log_bus_close_wakes_every_follower():
    bus = buildserver.LogBus()
    waiters = [bus_waiter(bus, build_id, bus.news(build_id), 0) for build_id in (1, 1, 2)]
    assert all(waiter.is_alive() for waiter in waiters)
    bus.close()
    for waiter in waiters:
        waiter.join(10)
        assert not waiter.is_alive()
    late = threading.Thread(target=bus.wait, args=(3, bus.news(3), 0, 30), daemon=True)
    late.start()
    late.join(10)
    assert not late.is_alive()


def test_a_builds_end_is_the_last_news_its_followers_get(app, monkeypatch):
    # An unmanaged build's log appends and its final status come from two HTTP
    # threads: the notices must come in commit order, or a late one for the log
    # would hide the end and its followers would sleep on.
    store = app.store
    notices = []

    def slow_notice(build_id, size):  # a wide gap between a log write and its notice
        if size is not None:
            time.sleep(0.002)
        notices.append((build_id, size))
    monkeypatch.setattr(store, "on_change", slow_notice)
    store.create_user("alice")
    store.create_project(store.user_by_name("alice")["id"], {"name": "app"})
    project = store.project("alice", "app")
    for _ in range(5):
        build_id = store.create_build(project["id"], "alice", {"is_managed": False})["id"]
        store.transition(build_id, "running")

        def append():
            with contextlib.suppress(buildserver.LogClosed):
                while True:
                    store.append_log(build_id, b"x" * 100, 10 ** 9)

        appender = threading.Thread(target=append, daemon=True)
        appender.start()
        wait_until(lambda: store.build(build_id)["log_size"], message="output stored")
        store.transition(build_id, "succeeded")  # while a write's notice is on its way
        appender.join(30)
        mine = [size for notice_id, size in notices if notice_id == build_id]
        assert mine[-1] is None, mine[-3:]


def test_follow_streams_new_output_and_closes_when_the_build_ends(server_factory, gate):
    server = server_factory("--stop-grace", "1")
    project_path = admin_project(server)
    hold = gate()
    status, build = server.json("POST", project_path + "/builds",
                                {"command": f"echo one; {hold.wait}; echo two"})
    path = f"{project_path}/builds/{build['id']}"
    conn, response = open_follow(server, path)
    try:
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
        assert response.getheader("X-More-Data") == "true"
        assert response.readline() == b"one\n"
        assert server.json("GET", path)[1]["last_status"] == "running"
        hold.open()
        assert response.read() == b"two\n"  # to the end: the response closes
    finally:
        conn.close()
    assert server_final_build(server, path)["last_status"] == "succeeded"


NGINX_CONF = """
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 16; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass http://127.0.0.1:{upstream}; }}
    }}
}}
"""


NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")


@pytest.mark.skipif(not NGINX, reason="needs nginx (.ci/run installs it)")
def test_a_follow_streams_through_nginx_as_a_bare_proxy_pass_leaves_it(server_factory, gate,
                                                                       tmp_path):
    # nginx speaks HTTP/1.0 to the server and buffers its answers unless told
    # otherwise: behind it, a follow showed nothing until the build had ended.
    server = server_factory("--stop-grace", "1")
    project_path = admin_project(server)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "nginx").mkdir()
    conf = tmp_path / "nginx" / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path / "nginx", port=port, upstream=server.port))
    hold, conn, nginx = gate(), None, None
    try:
        nginx = subprocess.Popen([NGINX, "-c", str(conf), "-e", str(tmp_path / "nginx" / "error.log"),
                                  "-g", "daemon off;"], stderr=subprocess.PIPE)
        wait_until(lambda: _accepts(port) or nginx.poll() is not None, message="nginx to listen")
        assert nginx.poll() is None, nginx.stderr.read()
        status, build = server.json("POST", project_path + "/builds",
                                    {"command": f"echo one; {hold.wait}; echo two"})
        path = f"{project_path}/builds/{build['id']}"
        conn, response = open_follow(server, path, port=port)
        assert response.status == 200
        assert response.readline() == b"one\n"  # (buffered: a timeout, the build waiting on)
        assert server.json("GET", path)[1]["last_status"] == "running"
        hold.open()
        assert response.read() == b"two\n"
    finally:
        hold.open()
        if conn is not None:
            conn.close()
        if nginx is not None:
            nginx.terminate()
            try:
                nginx.wait(15)
            except subprocess.TimeoutExpired:
                nginx.kill()
                nginx.wait()


def _accepts(port):
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


def test_follow_sends_headers_before_the_first_output(server_factory, gate):
    server = server_factory("--stop-grace", "1")
    project_path = admin_project(server)
    hold = gate()
    status, build = server.json("POST", project_path + "/builds",
                                {"command": f"{hold.wait}; echo late"})
    path = f"{project_path}/builds/{build['id']}"
    wait_until(lambda: server.json("GET", path)[1]["last_status"] == "running",
               message="the build to run")
    conn = None
    try:
        conn, response = open_follow(server, path, timeout=3)  # the build prints nothing yet
        assert response.status == 200
        assert response.getheader("X-More-Data") == "true"
        assert response.getheader("X-Log-Size") == "0"
        hold.open()
        assert response.read() == b"late\n"
    finally:
        hold.open()
        if conn is not None:
            conn.close()


def test_followers_beyond_the_cap_get_503_with_retry_after(server_factory, gate):
    server = server_factory("--threads", "4", "--workers", "3", "--stop-grace", "1")
    cap = buildserver.Config(threads=4).max_waiting
    assert cap == 2
    project_path = admin_project(server)
    hold = gate()
    status, build = server.json("POST", project_path + "/builds",
                                {"command": f"echo first; {hold.wait}; echo last"})
    path = f"{project_path}/builds/{build['id']}"
    server_wait_for_log(server, path, b"first")
    followers = [open_follow(server, path) for _ in range(cap)]
    try:
        for _, response in followers:
            assert response.status == 200
            assert response.readline() == b"first\n"
        status, headers, body = server.request("GET", path + "/logs?follow=1")
        assert status == 503
        assert int(headers["Retry-After"]) > 0
        assert json.loads(body)["detail"]
        # The API keeps answering while every follower slot is taken.
        assert server.json("GET", path)[0] == 200
        hold.open()
        for _, response in followers:
            assert response.read() == b"last\n"
    finally:
        for conn, _ in followers:
            conn.close()
    assert server_final_build(server, path)["last_status"] == "succeeded"
    # The slots are free again.
    hold2 = gate()
    status, build2 = server.json("POST", project_path + "/builds",
                                 {"command": f"echo again; {hold2.wait}"})
    path2 = f"{project_path}/builds/{build2['id']}"
    server_wait_for_log(server, path2, b"again")
    followers = [open_follow(server, path2) for _ in range(cap)]
    try:
        assert [response.status for _, response in followers] == [200] * cap
        hold2.open()
        assert [response.read() for _, response in followers] == [b"again\n"] * cap
    finally:
        for conn, _ in followers:
            conn.close()


def test_stops_and_deletes_wait_only_in_the_followers_slots_and_the_api_answers_on(
        server_factory):
    # Each waiting request holds an HTTP thread: unbounded, a build that ignores
    # SIGTERM plus a client retrying its DELETE would take every thread.
    server = server_factory("--threads", "4", "--stop-grace", "3")
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds",
                                {"command": "trap '' TERM; echo ready; sleep 60"})
    path = f"{project_path}/builds/{build['id']}"
    server_wait_for_log(server, path, b"ready")
    followers = [open_follow(server, path) for _ in range(2)]  # both slots taken
    try:
        assert [response.status for _, response in followers] == [200, 200]
        status, stopped = server.json("POST", path + "/stop")  # answered at once, not waited
        assert status == 200 and stopped["last_status"] == "stopping"
        status, headers, body = server.request("DELETE", path)
        assert status == 503 and int(headers["Retry-After"]) > 0, body
        assert "waiting for builds to end" in json.loads(body)["detail"]
        assert server.json("GET", path)[0] == 200  # not deleted, and the API answers
        assert server.json("GET", "/api/v1/health")[0] == 200
    finally:
        for conn, _ in followers:
            conn.close()
    # Once the followers have gone, a delete waits for the build (killed after the grace).
    wait_until(lambda: server.request("DELETE", path)[0] == 200, timeout=30,
               message="the delete to go through")
    assert server.json("GET", path)[0] == 404


def free_slots(app):
    """How many follower slots (App.wait_slots) are free now."""
    taken = 0
    while app.wait_slots.acquire(blocking=False):
        taken += 1
    for _ in range(taken):
        app.wait_slots.release()
    return taken


@contextlib.contextmanager
def served_here(config):
    """buildserver's own waitress server (http_server) for `config`, run by a
    thread of this process, so that a test may change its constants."""
    app = buildserver.make_app(config)
    server = buildserver.http_server(app, config)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            wasyncore.loop(timeout=0.1, map=server._map, use_poll=True, count=1)
    thread = threading.Thread(target=loop, name="served-here", daemon=True)
    thread.start()
    try:
        yield app, server
    finally:
        app.shutdown(timeout=10)
        stop.set()
        thread.join(5)
        server.task_dispatcher.shutdown(timeout=5)
        wasyncore.close_all(server._map)
        app.close()


def test_a_follower_whose_client_stops_reading_ends_and_frees_its_slot(tmp_path, monkeypatch,
                                                                        caplog):
    # `logs -f | less` stops reading once less has a screenful: its follower
    # must not hold a thread, a follower slot and the log's bytes for ever.
    monkeypatch.setattr(buildserver, "FOLLOW_BACKLOG", 64 * 1024)
    monkeypatch.setattr(buildserver, "FOLLOW_STALL_SECONDS", 1.0)
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0, threads=4)
    assert config.max_waiting == 2
    with served_here(config) as (app, server):
        port = server.effective_port
        token = app.store.create_user("root", is_admin=True)
        api = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

        def ask(method, path, body=b""):
            api.request(method, path, body=body, headers=headers)
            response = api.getresponse()
            return response.status, response.read()
        for project in (b"other", b"app"):  # (so that app's build 1 is the second row)
            assert ask("POST", "/api/v1/root", b'{"name": "%s"}' % project)[0] == 201
            assert ask("POST", "/api/v1/root/%s/builds" % project.decode(),
                       b'{"is_managed": false}')[0] == 201
        path = "/api/v1/root/app/builds/1"
        assert ask("POST", path + "/statuses", b'{"status": "running"}')[0] == 201
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        # (Not tiny: a window smaller than a segment reopens only on TCP's slow probes.)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        stalled.sendall(f"GET {path}/logs?follow=1 HTTP/1.1\r\nHost: x\r\n"
                        f"Authorization: Token {token}\r\n\r\n".encode())
        log = b"".join(b"%07d %s\n" % (i, b"x" * 90) for i in range(80000))  # 8 MB
        for start in range(0, len(log), 256 * 1024):
            assert ask("POST", path + "/logs", log[start:start + 256 * 1024])[0] == 200

        # The stalled one held a slot; its answer is cut off with nothing read,
        # and its connection closed (waitress held it, and what it had not
        # taken, until its idle timeout: 120 s).
        wait_until(lambda: free_slots(app) == 2, timeout=30, message="the stalled follower to end")
        # It named the build by its row's id ("build 2"), which its owner never sees.
        assert "a follower of build 1 of root/app took nothing for" in caplog.text
        mine = stalled.getsockname()
        wait_until(lambda: all(tuple(channel.addr) != mine
                               for channel in list(server.active_channels.values())),
                   timeout=30, message="the server to close the stalled follower's connection")
        stalled.settimeout(30)
        received = b""
        while True:  # what was on its way, then the connection closes
            data = stalled.recv(1 << 20)
            if not data:
                break
            received += data
        stalled.close()
        body, rest = b"", received.partition(b"\r\n\r\n")[2]
        while rest:  # the chunked encoding undone, up to where it was cut off
            size, _, rest = rest.partition(b"\r\n")
            assert int(size, 16), "a last chunk: the answer would read as the log's end"
            body, rest = body + rest[:int(size, 16)], rest[int(size, 16) + 2:]
        assert 0 < len(body) < len(log) and log.startswith(body)
        here = types.SimpleNamespace(host="127.0.0.1", port=port, token=token)
        followers = [open_follow(here, path) for _ in range(2)]  # both slots serve again
        assert [response.status for _, response in followers] == [200, 200]
        assert followers[0][1].read(len(log) // 2) == log[:len(log) // 2]
        for conn, _ in followers:
            conn.close()


@pytest.mark.parametrize("query", ["", "?format=json&limit=4194304"], ids=["text", "json"])
def test_a_connection_whose_client_takes_nothing_of_a_log_is_closed(tmp_path, monkeypatch,
                                                                     query):
    # Only followers were cut off: a download or a JSON page (4 MiB of control
    # bytes: 24 MiB of JSON) that its client never read held its memory, or a
    # temporary file, for as long as the client liked.
    monkeypatch.setattr(buildserver, "ANSWER_STALL_SECONDS", 1.0)
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0)
    with served_here(config) as (app, server):
        server.adj.cleanup_interval = 0.2
        server.next_channel_cleanup = 0
        address = ("127.0.0.1", server.effective_port)
        token = app.store.create_user("root", is_admin=True)
        api = http.client.HTTPConnection(*address, timeout=30)
        headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

        def ask(method, path, body=b""):
            api.request(method, path, body=body, headers=headers)
            response = api.getresponse()
            return response.status, response.read()
        assert ask("POST", "/api/v1/root", b'{"name": "app"}')[0] == 201
        assert ask("POST", "/api/v1/root/app/builds", b'{"is_managed": false}')[0] == 201
        path = "/api/v1/root/app/builds/1"
        for _ in range(8):
            assert ask("POST", path + "/logs", b"\x01" * MiB)[0] == 200
        with contextlib.closing(socket.create_connection(address, timeout=30)) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            stalled.sendall(f"GET {path}/logs{query} HTTP/1.1\r\nHost: x\r\n"
                            f"Authorization: Token {token}\r\n\r\n".encode())
            mine = stalled.getsockname()
            wait_until(lambda: any(tuple(c.addr) == mine and c.total_outbufs_len
                                   for c in list(server.active_channels.values())),
                       message="its answer to wait for it")
            wait_until(lambda: all(tuple(c.addr) != mine
                                   for c in list(server.active_channels.values())),
                       timeout=30, message="the server to close the stalled connection")
        # A keep-alive connection with nothing waiting for it is no stalled one.
        assert ask("GET", path)[0] == 200


def test_requests_one_after_another_are_served_by_the_thread_that_went_idle_last(tmp_path):
    # waitress alone wakes the thread idle longest, so that one client's
    # requests go round every thread, each with cold caches.
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0, threads=8)
    with served_here(config) as (app, server):
        served_by = []
        application = server.application

        def recorded(environ, start_response):
            served_by.append(threading.current_thread().name)
            return application(environ, start_response)
        server.application = recorded
        conn = http.client.HTTPConnection("127.0.0.1", server.effective_port, timeout=30)
        for _ in range(40):
            conn.request("GET", "/api/v1/health")
            response = conn.getresponse()
            assert response.status == 200 and json.loads(response.read())
        conn.close()
    assert len(served_by) == 40
    # (Another may take one now and then: a request can come before the
    # thread that answered the last one is back waiting.)
    assert len(set(served_by)) <= 6, collections.Counter(served_by)  # of 8; oldest-first: all 8


def test_the_idle_threads_condition_wakes_them_last_in_first_out():
    lock = threading.Lock()
    idle = buildserver._WarmestFirst(lock)
    woken = []

    def wait(name):
        with lock:
            idle.wait()
            woken.append(name)
    threads = []
    for name in ("a", "b", "c", "d"):
        threads.append(threading.Thread(target=wait, args=(name,), daemon=True))
        threads[-1].start()
        wait_until(lambda: len(idle._waiters) == len(threads), timeout=10,
                   message=f"{name} to wait")
    for expected in (["d"], ["d", "c"]):
        with lock:
            idle.notify()
        wait_until(lambda: woken == expected, timeout=10, message=f"{expected[-1]} to wake")
    with lock:
        idle.notify_all()
    for thread in threads:
        thread.join(10)
    assert sorted(woken[2:]) == ["a", "b"] and not idle._waiters
    with lock:  # a wait that times out leaves no waiter for a notify to be spent on
        assert idle.wait(timeout=0.01) is False and not idle._waiters


def test_a_follower_whose_client_leaves_frees_its_slot_without_waiting_for_its_next_look(
        tmp_path, monkeypatch):
    # waitress only marks a connection whose client has gone; a follower saw
    # it at its next look (once a second), and held its thread and slot till
    # then: scripts following with a short timeout met 503s.
    monkeypatch.setattr(buildserver, "FOLLOW_WAIT_SECONDS", 300.0)  # no look in this test
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0, threads=4)
    assert config.max_waiting == 2
    with served_here(config) as (app, server):
        here, path = a_running_unmanaged_build(app, server)
        followers = [open_follow(here, path, timeout=30) for _ in range(3)]
        assert [response.status for _, response in followers] == [200, 200, 503]
        followers.pop()[0].close()
        assert free_slots(app) == 0
        followers[0][0].close()  # a client that leaves: FIN
        wait_until(lambda: free_slots(app) == 1, timeout=30, message="its slot to be free")
        # The other follower of the build, woken too, follows on.
        assert here_request(here, "POST", path + "/logs", b"still here\n", "text/plain") == 200
        assert followers[1][1].read(11) == b"still here\n"
        conn = followers[1][0]  # a client that leaves with a reset
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
        wait_until(lambda: free_slots(app) == 2, timeout=30, message="its slot to be free")


def test_a_follower_whose_client_resets_with_output_still_unsent_frees_its_slot(
        tmp_path, monkeypatch):
    # With output waiting for the client, waitress stops reading from the
    # connection: a reset then comes as a hang-up (handle_close), not a read.
    monkeypatch.setattr(buildserver, "FOLLOW_WAIT_SECONDS", 300.0)  # no look in this test
    monkeypatch.setattr(buildserver, "FOLLOW_BACKLOG", 256 * MiB)  # it waits on the bus
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0, threads=4)
    with served_here(config) as (app, server):
        here, path = a_running_unmanaged_build(app, server)
        client = socket.create_connection(("127.0.0.1", here.port), timeout=30)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.sendall(f"GET {path}/logs?follow=1 HTTP/1.1\r\nHost: x\r\n"
                       f"Authorization: Token {here.token}\r\n\r\n".encode())
        assert client.recv(12) == b"HTTP/1.1 200"
        # More than the sockets hold, less than makes waitress hold the follower back.
        for _ in range(6):
            assert here_request(here, "POST", path + "/logs", b"x" * MiB, "text/plain") == 200
        channel, = [c for c in list(server.active_channels.values())
                    if c.requests and "follow=1" in c.requests[0].query]
        wait_until(lambda: channel.total_outbufs_len > 0 and not channel.readable(), timeout=30,
                   message="output to wait for the client")
        assert free_slots(app) == 1
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        wait_until(lambda: free_slots(app) == 2, timeout=30, message="its slot to be free")


def a_running_unmanaged_build(app, server):
    """An admin and a running unmanaged build on a served_here server;
    returns (where to reach it as that admin, the build's path)."""
    token = app.store.create_user("root", is_admin=True)
    here = types.SimpleNamespace(host="127.0.0.1", port=server.effective_port, token=token)
    assert here_request(here, "POST", "/api/v1/root", b'{"name": "app"}') == 201
    assert here_request(here, "POST", "/api/v1/root/app/builds", b'{"is_managed": false}') == 201
    path = "/api/v1/root/app/builds/1"
    assert here_request(here, "POST", path + "/statuses", b'{"status": "running"}') == 201
    return here, path


def here_request(server, method, path, body=b"", content_type="application/json"):
    """One request on a connection of its own; returns its status."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Authorization": f"Token {server.token}",
                                                       "Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.skipif(len(getattr(os, "sched_getaffinity", lambda pid: ())(0)) < 2,
                    reason="needs Linux and two cores")
def test_the_servers_threads_keep_to_one_core_and_its_builds_get_them_all(server_factory):
    def allowed(status_text):
        return re.search(r"Cpus_allowed_list:\s*(\S+)", status_text).group(1)

    def read(path):
        with open(path) as f:
            return f.read()
    server = server_factory("--threads", "8")
    path = admin_project(server) + "/builds"
    status, build = server.json("POST", path, {"command": "cat /proc/self/status"})
    assert server_final_build(server, f"{path}/{build['id']}")["last_status"] == "succeeded"
    everything = allowed(read("/proc/self/status"))  # what this machine gives
    assert allowed(server.request("GET", f"{path}/{build['id']}/logs")[2].decode()) == everything
    one = {str(core) for core in os.sched_getaffinity(0)}
    pid = server.proc.pid
    assert allowed(read(f"/proc/{pid}/status")) in one  # its main thread
    kept = [allowed(read(f"/proc/{pid}/task/{tid}/status"))
            for tid in os.listdir(f"/proc/{pid}/task")]
    assert sum(cores in one for cores in kept) >= 8  # the HTTP threads
    assert all(cores in one or cores == everything for cores in kept)  # workers: all


def test_a_connection_whose_request_head_trickles_in_is_closed_and_others_are_not(
        tmp_path, monkeypatch):
    # A slow-loris: a byte now and then keeps waitress's idle timeout away,
    # and enough such connections reach the connection limit.
    monkeypatch.setattr(buildserver, "HEAD_SECONDS", 1.0)
    config = buildserver.Config(data_dir=str(tmp_path / "d"), port=0)
    with served_here(config) as (app, server):
        server.adj.cleanup_interval = 0.2
        server.next_channel_cleanup = 0
        address = ("127.0.0.1", server.effective_port)
        slow = socket.create_connection(address, timeout=30)
        mute = socket.create_connection(address, timeout=30)  # never a byte: it held its place 120 s
        idle = socket.create_connection(address, timeout=30)  # keep-alive, between requests
        idle.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        slow.sendall(b"GET /api/v1/health HTTP/1.1\r\n")
        closed_at = time.monotonic() + 30
        while True:  # a header byte every 0.1 s: never idle, never whole
            try:
                slow.sendall(b"X")
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    break
            except BlockingIOError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                break
            assert time.monotonic() < closed_at, "the slow head's connection stays open"
            time.sleep(0.1)
        assert mute.recv(1) == b""  # closed too (30 s at most: its timeout)
        # The connection between requests stays (waitress's idle timeout is 120 s),
        idle.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        # and so does one whose next head waits while its answer is under way
        # (a follower, read ahead): it is not trickling, it is waiting its turn.
        token = app.store.create_user("root", is_admin=True)
        headers = f"Host: x\r\nAuthorization: Token {token}\r\n"
        busy = socket.create_connection(address, timeout=30)
        busy.sendall(f"POST /api/v1/root HTTP/1.1\r\n{headers}Content-Length: 15\r\n\r\n"
                     '{"name": "app"}'.encode())
        assert busy.recv(4096).startswith(b"HTTP/1.1 201")
        busy.sendall(f"POST /api/v1/root/app/builds HTTP/1.1\r\n{headers}"
                     'Content-Length: 21\r\n\r\n{"is_managed": false}'.encode())
        assert busy.recv(4096).startswith(b"HTTP/1.1 201")
        busy.sendall(f"GET /api/v1/root/app/builds/1/logs?follow=1 HTTP/1.1\r\n{headers}\r\n"
                     "GET /api/v1/health HTTP/1.1\r\n".encode())
        assert busy.recv(4096).startswith(b"HTTP/1.1 200")  # the follower's head
        time.sleep(2.5)  # past HEAD_SECONDS, with maintenance every 0.2 s
        api = http.client.HTTPConnection(*address, timeout=30)
        api.request("POST", "/api/v1/root/app/builds/1/logs", body=b"still here\n",
                    headers={"Authorization": f"Token {token}"})
        assert api.getresponse().status == 200
        assert b"still here" in busy.recv(4096)  # the follow goes on
        for sock in (slow, mute, idle, busy):
            sock.close()
        api.close()


def test_a_malformed_header_line_is_refused_without_its_value(server_factory):
    # waitress quotes the line: a token file with Windows line endings sent
    # the token back in the 400, for a script's log to keep.
    server = server_factory()
    for value in (b"Token s3cret-t0ken", b'Token "s3cret-t0ken"', b'Token token="s3cret"'):
        sock = socket.create_connection((server.host, server.port), timeout=30)
        sock.sendall(b"GET /api/v1/admin HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: " + value + b"\r\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sock.close()
        assert b" 400 Bad Request" in answer.split(b"\r\n")[0], answer
        assert b"s3cret" not in answer and b'header line \\"Authorization: ...\\"' in answer, \
            answer


def test_connections_are_limited_by_file_descriptors_which_builds_inherit_unchanged(
        server_factory):
    import resource
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert buildserver._connection_limit(buildserver.Config()) == \
        (10000 if soft == resource.RLIM_INFINITY else max(100, min(10000, soft // 2)))
    server = server_factory()  # and the limit is the server's own: builds get it as it is
    path = admin_project(server) + "/builds"
    status, build = server.json("POST", path, {"command": "ulimit -Sn"})
    assert server_final_build(server, f"{path}/{build['id']}")["last_status"] == "succeeded"
    told = server.request("GET", f"{path}/{build['id']}/logs")[2].decode().strip()
    assert told == ("unlimited" if soft == resource.RLIM_INFINITY else str(soft))


# Crash recovery and shutdown ---------------------------------------------------------

def test_after_kill_9_a_restart_fails_the_interrupted_build_and_runs_the_waiting_one(
        server_factory, tmp_path):
    data_dir = tmp_path / "crashed"
    server = server_factory("--workers", "1", "--stop-grace", "1", data_dir=data_dir)
    project_path = admin_project(server)
    status, running = server.json("POST", project_path + "/builds",
                                  {"command": "echo before; sleep 60 & sleep 60; echo after"})
    status, waiting = server.json("POST", project_path + "/builds", {"command": "echo second"})
    running_path = f"{project_path}/builds/{running['id']}"
    waiting_path = f"{project_path}/builds/{waiting['id']}"
    server_wait_for_log(server, running_path, b"before")
    assert server.json("GET", running_path)[1]["last_status"] == "running"
    assert server.json("GET", waiting_path)[1]["last_status"] == "scheduled"
    marker = f"BUILD_UUID={running['uuid']}"
    assert len(pids_with_marker(marker)) >= 2
    server.proc.kill()
    server.wait()
    assert pids_with_marker(marker)  # a dead server leaves its build's processes behind

    restarted = server_factory("--workers", "1", "--stop-grace", "1", data_dir=data_dir)
    restarted.token = server.token
    done = server_final_build(restarted, running_path)
    assert done["last_status"] == "failed"
    history = restarted.json("GET", running_path + "/statuses")[1]["results"]
    assert [s["status"] for s in history] == ["created", "scheduled", "running", "failed"]
    assert history[-1]["message"].startswith("interrupted")
    wait_gone(marker)
    assert restarted.request("GET", running_path + "/logs")[2] == b"before\n"
    second = server_final_build(restarted, waiting_path)
    assert second["last_status"] == "succeeded"
    assert restarted.request("GET", waiting_path + "/logs")[2] == b"second\n"
    restarted.stop()
    assert restarted.proc.returncode == 0
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_after_kill_9_a_restart_kills_what_left_the_builds_process_group(server_factory,
                                                                         tmp_path):
    data_dir = tmp_path / "crashed"
    server = server_factory(data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds",
                                {"command": "setsid sleep 60 & echo before; sleep 60"})
    marker = f"BUILD_UUID={build['uuid']}"
    server_wait_for_log(server, f"{project_path}/builds/{build['id']}", b"before")
    wait_until(lambda: len(pids_with_marker(marker)) >= 2, message="both sleeps")
    server.proc.kill()
    server.wait()
    try:
        restarted = server_factory(data_dir=data_dir)
        restarted.token = server.token
        assert server_final_build(restarted, f"{project_path}/builds/{build['id']}")[
            "last_status"] == "failed"
        wait_gone(marker)  # the daemon that left the group, too
    finally:
        kill_marked(marker)


@contextlib.contextmanager
def unwritable(path):
    """`path` made a file no one may write, root too (immutable), while inside."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", path], capture_output=True).returncode:
            pytest.skip("this file system cannot make a file immutable (chattr +i)")
        undo = ["chattr", "-i", path]
    else:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        os.chmod(path, 0o400)
        undo = None
    try:
        yield
    finally:
        if undo:
            subprocess.run(undo, check=True)
        else:
            os.chmod(path, mode)


def test_a_restart_that_cannot_write_the_database_still_kills_what_the_crash_left(
        server_factory, tmp_path):
    # It recorded itself first, a write: on a full disk (or a read-only
    # database) it exited at once, and the builds ran on unsupervised.
    data_dir = tmp_path / "crashed"
    server, path, build = serving_a_running_build(server_factory, data_dir)
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        server.proc.kill()
        server.wait()
        with unwritable(str(data_dir / "buildserver.db")):
            refused = subprocess.run([sys.executable, SCRIPT, "serve", "--port", "0",
                                      "--data-dir", str(data_dir)],
                                     capture_output=True, text=True, timeout=60)
            assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused
            assert "readonly database" in refused.stderr, refused.stderr
            wait_gone(marker)
        restarted = server_factory(data_dir=data_dir)
        restarted.token = server.token
        assert server_final_build(restarted, path)["last_status"] == "failed"
    finally:
        kill_marked(marker)


def test_a_start_that_cannot_write_beside_the_database_never_calls_it_no_database(tmp_path):
    # On a full disk it said "is not a SQLite database (disk I/O error)": an
    # operator could restore a backup over a database that was fine.
    data_dir = str(tmp_path / "full")
    Server(data_dir).start().stop()  # made, and stopped cleanly: no -wal or -shm left
    no_file_may_grow = lambda: resource.setrlimit(resource.RLIMIT_FSIZE,  # noqa: E731
                                                  (0, resource.RLIM_INFINITY))
    refused = subprocess.run([sys.executable, SCRIPT, "serve", "--port", "0", "--data-dir",
                              data_dir], capture_output=True, text=True, timeout=60,
                             preexec_fn=no_file_may_grow)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused
    assert "not a SQLite database" not in refused.stderr, refused.stderr
    assert "is its disk full" in refused.stderr, refused.stderr
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    other = tmp_path / "other"  # while a file that is none is still called so
    other.mkdir(mode=0o700)
    (other / "buildserver.db").write_bytes(b"not sqlite at all\n" * 512)
    refused = cli("serve", "--port", "0", "--data-dir", str(other))
    assert refused.returncode == 1 and "is not a SQLite database" in refused.stderr, refused


@pytest.mark.parametrize("command", ["adduser", "token"])
def test_a_token_shown_but_not_recorded_on_a_full_disk_is_said_to_be_dead(tmp_path, command):
    # The token was printed, then its write failed: the only word was the
    # database's error, after "the earlier ones no longer work".
    data_dir = str(tmp_path / "full")
    server = Server(data_dir).start()
    server.stop()  # (no -wal or -shm left)
    one_page_may_be_written = lambda: resource.setrlimit(  # noqa: E731 (the -shm fits, a commit not)
        resource.RLIMIT_FSIZE, (32768, resource.RLIM_INFINITY))
    name = "carol" if command == "adduser" else "admin"
    done = subprocess.run([sys.executable, SCRIPT, command, name, "--data-dir", data_dir],
                          capture_output=True, text=True, timeout=60,
                          preexec_fn=one_page_may_be_written)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done
    assert "shown only now" in done.stdout or "New token" in done.stdout, done.stdout
    said = {"adduser": "the token above was not recorded; the user was not made\n",
            "token": "the token above was not recorded; the earlier ones still work\n"}[command]
    assert done.stderr.startswith("buildserver: cannot use the database in ") and \
        done.stderr.endswith(said), done.stderr
    again = Server(data_dir).start()
    try:
        again.token = server.token
        assert again.json("GET", "/api/v1/admin")[0] == 200  # the earlier token still works
        assert again.json("GET", "/api/v1/carol")[0] == 404
        printed = done.stdout.split()[-1]
        assert again.json("GET", "/api/v1/admin", token=printed)[0] == 401
    finally:
        again.stop()


NEW_GROUP = (  # `sh -c CMD` in a process group of its own, in the build's session (no setsid)
    "python3 -c 'import os, sys; os.setpgid(0, 0); os.execvp(\"sh\", [\"sh\", \"-c\", sys.argv[1]])'")


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_a_stopped_build_stays_stopping_while_a_group_it_made_holds_its_output(
        server_factory, how):
    # It read `stopped` a second after the stop while that group ran on to the
    # end of the grace, and its worker stayed busy: a scheduled build waited
    # with nothing running.
    server = server_factory("--workers", "1", "--stop-grace", "4")
    project_path = admin_project(server)
    # "up" once the group is made and deaf to SIGTERM (a timeout before that
    # would end it with the build's own group).
    holder = NEW_GROUP + " \"trap '' TERM; : > held; sleep 60\" & " \
        "while [ ! -e held ]; do sleep 0.01; done; echo up; sleep 60"
    _, build = server.json("POST", project_path + "/builds", {
        "command": holder, **({"timeout": 3} if how == "timeout" else {})})
    path = f"{project_path}/builds/{build['id']}"
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        server_wait_for_log(server, path, b"up")
        if how == "stop":
            assert server.json("POST", path + "/stop")[1]["last_status"] == "stopping"
        _, waiting = server.json("POST", project_path + "/builds", {"command": "true"})
        ended = server_final_build(server, path, timeout=30)
        assert not pids_with_marker(marker), "final while a process of it runs"
        assert ended["last_status"] == ("stopped" if how == "stop" else "failed"), ended
        history = server.json("GET", path + "/statuses")[1]["results"]
        assert [s["status"] for s in history][-2:] == ["stopping", ended["last_status"]]
        at = [buildserver.parse_iso(s["created_at"]) for s in history[-2:]]
        assert (at[1] - at[0]).total_seconds() >= 3.9  # stopping until the 4 s grace ended
        # It held its worker until then, and no longer.
        assert server_final_build(server, f"{project_path}/builds/{waiting['id']}")[
            "started_at"] >= ended["finished_at"]
    finally:
        kill_marked(marker)


def test_a_stop_waits_out_no_grace_for_a_daemon_that_left_with_the_output(server_factory):
    # Only a group of the build's own keeps it `stopping`: one that left the
    # session (setsid) is not the build's to end, and the stop waited the
    # whole grace for it, holding the worker.
    server = server_factory("--stop-grace", "60")
    project_path = admin_project(server)
    _, build = server.json("POST", project_path + "/builds",
                           {"command": "setsid sleep 300 & echo up; sleep 100"})
    path = f"{project_path}/builds/{build['id']}"
    try:
        server_wait_for_log(server, path, b"up")
        server.json("POST", path + "/stop")
        assert server_final_build(server, path, timeout=30)["last_status"] == "stopped"
    finally:
        kill_marked(f"BUILD_UUID={build['uuid']}")


# Files of releases that shipped a migration later changed in place: each
# said its version all the same, and no start could use it, its builds left
# running. 465c72c made migration 8 without server_process.pid_namespace ("no
# such column"); 54f2a08 made migration 9 without backup_taken ("no such table").
@pytest.mark.parametrize("as_that_release, made_good", [
    ("ALTER TABLE server_process DROP COLUMN pid_namespace; PRAGMA user_version = 8;",
     "SELECT pid_namespace IS NOT NULL FROM server_process"),
    ("DROP TABLE backup_taken; PRAGMA user_version = 9;",
     "SELECT count(*) = 0 FROM backup_taken")])
def test_a_database_of_a_release_whose_migration_changed_later_starts_and_kills_leftovers(
        server_factory, tmp_path, as_that_release, made_good):
    data_dir = tmp_path / "older"
    server, path, build = serving_a_running_build(server_factory, data_dir)
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        server.proc.kill()  # killed: 465c72c recorded no namespace either
        server.wait()
        with contextlib.closing(sqlite3.connect(data_dir / "buildserver.db")) as db:
            db.executescript(as_that_release)
        restarted = server_factory(data_dir=data_dir)
        restarted.token = server.token
        assert server_final_build(restarted, path)["last_status"] == "failed"
        wait_gone(marker)  # (no namespace recorded is no other container's)
        with contextlib.closing(sqlite3.connect(data_dir / "buildserver.db")) as db:
            assert db.execute("PRAGMA user_version").fetchone()[0] == buildserver.SCHEMA_VERSION
            assert db.execute(made_good).fetchone()[0]
    finally:
        kill_marked(marker)


def _ignoring_as_and_does():
    for signum in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_IGN)


def test_a_server_started_with_sigint_ignored_stops_on_it_and_its_builds_take_it(tmp_path):
    # A script's `cmd &` starts it ignoring SIGINT and SIGQUIT: had the server
    # kept that, `kill -INT` would not stop it, and every build would ignore both.
    server = Server(tmp_path / "d", preexec_fn=_ignoring_as_and_does).start()
    try:
        path = admin_project(server) + "/builds"
        status, build = server.json("POST", path, {"command": "grep SigIgn /proc/self/status"})
        done = server_final_build(server, f"{path}/{build['id']}")
        ignored = server.request("GET", f"{path}/{build['id']}/logs")[2].split()[-1]
        assert done["last_status"] == "succeeded"
        for signum in (signal.SIGINT, signal.SIGQUIT):
            assert not int(ignored, 16) & (1 << (signum - 1)), signum
        server.signal(signal.SIGQUIT)  # (nothing to the server, as before)
        assert server.json("GET", "/api/v1/health")[0] == 200
        server.signal(signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_a_server_started_with_sighup_ignored_nohup_keeps_running_on_sighup(tmp_path):
    server = Server(tmp_path / "d", preexec_fn=lambda: signal.signal(signal.SIGHUP,
                                                                     signal.SIG_IGN)).start()
    try:
        path = admin_project(server) + "/builds"
        status, build = server.json("POST", path, {"command": "echo up; sleep 30"})
        server_wait_for_log(server, f"{path}/{build['id']}", b"up")
        server.signal(signal.SIGHUP)
        time.sleep(0.5)  # (a shutdown would have begun: it refuses requests at once)
        assert server.proc.poll() is None
        assert server.json("GET", f"{path}/{build['id']}")[1]["last_status"] == "running"
    finally:
        server.stop()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.skipif(sys.version_info < (3, 10), reason="it replaces itself on 3.10+ (orig_argv)")
def test_a_stop_signal_while_the_server_starts_ends_it_with_0(tmp_path, signum):
    # A signal while the server replaced itself with a fresh Python (to run
    # as a module) or set itself up ended it by the signal, or with a
    # traceback, where SIGTERM and SIGINT promise an exit of 0; and builds
    # that wait stay waiting (a first fix started them, to stop them at once).
    waiting = Server(tmp_path / "d", "--workers", "0").start()
    path = admin_project(waiting) + "/builds"
    for _ in range(3):
        assert waiting.json("POST", path, {"command": "true"})[0] == 201
    waiting.stop()
    proc = subprocess.Popen([sys.executable, SCRIPT, "serve", "--port", "0", "--data-dir",
                             str(tmp_path / "d")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        wait_until(lambda: b"\0-c\0" in type(tmp_path)(f"/proc/{proc.pid}/cmdline").read_bytes(),
                   interval=0.001, message="the fresh Python")
        proc.send_signal(signum)  # while it starts: before its handlers are set
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err and b"stopped" in err, err
    with contextlib.closing(sqlite3.connect(tmp_path / "d" / "buildserver.db")) as db:
        assert db.execute("SELECT last_status FROM builds").fetchall() == [("scheduled",)] * 3


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_shutdown_signal_stops_running_builds_keeps_waiting_ones_and_flushes_followers(
        server_factory, tmp_path, signum):
    data_dir = tmp_path / "graceful"
    # The build obeys SIGTERM at once; a long grace keeps a loaded machine from
    # SIGKILLing its shell before it could run its trap.
    stop_grace = 8
    server = server_factory("--workers", "1", "--stop-grace", str(stop_grace),
                            data_dir=data_dir)
    project_path = admin_project(server)
    command = "trap 'echo got TERM; exit 143' TERM; echo start; sleep 60 & wait"
    status, running = server.json("POST", project_path + "/builds", {"command": command})
    status, waiting = server.json("POST", project_path + "/builds", {"command": "echo later"})
    running_path = f"{project_path}/builds/{running['id']}"
    server_wait_for_log(server, running_path, b"start")
    conn, response = open_follow(server, running_path)
    try:
        assert response.readline() == b"start\n"
        server.signal(signum)
        assert response.read() == b"got TERM\n"  # the output up to the build's end, then close
    finally:
        conn.close()
    assert server.wait(timeout=stop_grace + 10) == 0
    wait_gone(f"BUILD_UUID={running['uuid']}")
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        rows = dict(db.execute("SELECT uuid, last_status FROM builds").fetchall())
        assert rows == {running["uuid"]: "stopped", waiting["uuid"]: "scheduled"}
        history = db.execute(
            "SELECT s.status, s.message FROM statuses s JOIN builds b ON b.id = s.build_id"
            " WHERE b.uuid = ? ORDER BY s.number", (running["uuid"],)).fetchall()
        log_size = db.execute("SELECT log_size FROM builds WHERE uuid = ?",
                              (running["uuid"],)).fetchone()[0]
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert [s for s, _ in history][-3:] == ["running", "stopping", "stopped"]
    assert "shut down" in history[-1][1]
    assert log_size == len(b"start\ngot TERM\n")
    # The waiting build runs after the next start.
    restarted = server_factory("--workers", "1", "--stop-grace", str(stop_grace),
                               data_dir=data_dir)
    restarted.token = server.token
    later = server_final_build(restarted, f"{project_path}/builds/{waiting['id']}")
    assert later["last_status"] == "succeeded"


def test_a_shutdown_cuts_off_the_followers_of_builds_it_leaves_unfinished(server_factory):
    # Their follows ended like finished ones (the last chunk, exit 0 for curl):
    # `curl -N ...?follow=1 && deploy` took a build still scheduled as done.
    server = server_factory("--workers", "0")
    project_path = admin_project(server)
    _, scheduled = server.json("POST", project_path + "/builds", {"command": "true"})
    _, unmanaged_build = server.json("POST", project_path + "/builds", {"is_managed": False})
    reported = f"{project_path}/builds/{unmanaged_build['id']}"
    assert server.json("POST", reported + "/statuses", {"status": "running"})[0] == 201
    assert server.request("POST", reported + "/logs", b"partial\n")[0] == 200
    follows = [open_follow(server, f"{project_path}/builds/{scheduled['id']}"),
               open_follow(server, reported)]
    try:
        assert follows[1][1].readline() == b"partial\n"
        server.signal(signal.SIGTERM)
        for _, response in follows:
            assert response.status == 200
            with pytest.raises(http.client.IncompleteRead):
                response.read()
    finally:
        for conn, _ in follows:
            conn.close()
    assert server.wait(timeout=20) == 0


def test_a_shutdown_lets_a_slow_follower_take_the_rest_of_the_log(server_factory, tmp_path):
    # A follower more than 1 MiB behind was cut off the moment the server began
    # to shut down: curl said "transfer closed with outstanding read data". (Then
    # one that took nothing for a second: what the server holds for a client
    # that reads shrinks in bursts, as the kernel's buffers empty.)
    data_dir = tmp_path / "slow"
    server = server_factory("--stop-grace", "8", data_dir=data_dir)
    project_path = admin_project(server)
    write = ("import sys; sys.stdout.buffer.write(b''.join(b'%07d %s\\n' % (i, b'x' * 91)"
             " for i in range(50000)))")  # 5 MB
    status, build = server.json("POST", project_path + "/builds", {
        "command": f"{shlex.quote(sys.executable)} -c {shlex.quote(write)}; exec sleep 60"})
    path = f"{project_path}/builds/{build['id']}"
    wait_until(lambda: server.json("GET", path)[1]["log_size"] == 5_000_000, timeout=30,
               message="the whole log to be stored")
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    conn.connect()  # a small window: the server, not the kernel, holds what waits
    conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 128 * 1024)
    conn.request("GET", path + "/logs?follow=1", headers={"Authorization": f"Token {server.token}"})
    response = conn.getresponse()
    received = [response.read(1_000_000)]
    time.sleep(0.5)  # the server now holds its most for this client
    server.signal(signal.SIGTERM)
    wait_until(lambda: any("shutting down" in line for line in server.stderr_lines),
               message="the shutdown to begin")
    # A reader busy elsewhere, or seen as such (see above): more than the old
    # second, and well within the 3 s the server allows from the shutdown on
    # (this test may see the shutdown's line late).
    time.sleep(1.5)
    received.append(response.read())
    conn.close()
    assert server.wait(timeout=30) == 0
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        last_status, log_size = db.execute("SELECT last_status, log_size FROM builds").fetchone()
    assert (last_status, log_size) == ("stopped", 5_000_000)
    body = b"".join(received)
    assert len(body) == log_size and body.endswith(b"0049999 " + b"x" * 91 + b"\n")


def serving_a_running_build(server_factory, data_dir, *args, wrap=(), env=None,
                            command="echo ready; sleep 60"):
    """A real server at `data_dir` (started with `args`) whose build 1 of
    admin/app runs `command` and has said "ready"; returns the server, the
    build's path and the build."""
    server = server_factory(*args, data_dir=data_dir, wrap=wrap, env=env)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds",
                                {"command": command})
    path = f"{project_path}/builds/{build['id']}"
    server_wait_for_log(server, path, b"ready")
    return server, path, build


def test_a_token_exported_where_the_server_starts_is_not_in_its_environment(
        server_factory, tmp_path):
    # BUILDSERVER_* left the builds' own environment only: the server's, which
    # a build can read, still held the token.
    server, path, _ = serving_a_running_build(
        server_factory, tmp_path / "data",
        env={"BUILDSERVER_TOKEN": "a-token-of-another-server", "MARKER_BESIDE_THE_TOKEN": "1"},
        command="tr '\\0' '\\n' < /proc/$PPID/environ; echo ready")
    seen = server.request("GET", path + "/logs")[2]
    assert b"\nMARKER_BESIDE_THE_TOKEN=1\n" in seen  # (it read the server's)
    assert b"a-token-of-another-server" not in seen


def test_a_follow_ends_once_its_token_is_replaced(server_factory, tmp_path):
    # New requests with the old token were refused within a second, but an
    # open follow streamed on for as long as its build ran (days, maybe).
    server, path, _ = serving_a_running_build(server_factory, tmp_path / "data")
    conn, response = open_follow(server, path, timeout=30)
    try:
        assert response.readline() == b"ready\n"
        assert cli("token", "admin", "--data-dir", server.data_dir).returncode == 0
        with pytest.raises(http.client.IncompleteRead):  # cut off, not ended
            response.read()
    finally:
        conn.close()
    with contextlib.closing(sqlite3.connect(os.path.join(server.data_dir, "buildserver.db"))) as db:
        assert db.execute("SELECT last_status FROM builds").fetchall() == [("running",)]


def test_a_second_data_folder_whose_database_links_to_a_live_one_starts_no_server(
        server_factory, tmp_path):
    # Its serve.lock was its own: it started, took the live server for one
    # that had crashed (after one start of its own), and killed its builds.
    server, path, build = serving_a_running_build(server_factory, tmp_path / "live")
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    os.symlink(os.path.join(server.data_dir, "buildserver.db"), other / "buildserver.db")
    for _ in range(2):
        second = cli("serve", "--port", "0", "--data-dir", str(other))
        assert second.returncode == 1 and "another server is using" in second.stderr, second
    assert server.json("GET", path)[1]["last_status"] == "running"
    assert cli("adduser", "carol", "--data-dir", str(other)).returncode == 0  # (as beside it)


def test_a_serve_lock_that_cannot_be_taken_is_named_not_blamed_on_another_server(tmp_path):
    # Any failure to lock said "another server is using" the folder (NFS
    # without locks: ENOLCK), and one to open the lock was a traceback.
    folder = tmp_path / "data"
    (folder / "serve.lock").mkdir(parents=True)
    second = cli("serve", "--port", "0", "--data-dir", str(folder))
    assert second.returncode == 1, second
    assert second.stderr == f"buildserver: cannot lock {folder}/serve.lock: Is a directory\n"


def test_a_server_holds_its_lock_until_its_process_is_gone(server_factory, tmp_path):
    # It let go when serve returned: a server started while the first one's
    # interpreter wound down (35-85 ms, seconds on a busy machine; stopped
    # here) took it for live on a copy of the folder, and left its builds'
    # leftovers alone.
    import fcntl
    first = server_factory(data_dir=tmp_path / "data")
    first.signal(signal.SIGTERM)

    def free():
        with open(tmp_path / "data" / "serve.lock", "rb") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
    wait_until(free, message="the first server to let go")
    with contextlib.suppress(ProcessLookupError):
        os.kill(first.proc.pid, signal.SIGSTOP)  # (a process in its exit takes no stop)
    try:
        second = server_factory(data_dir=tmp_path / "data")
        second.stop()
        wait_until(lambda: any(line.endswith(" stopped\n") for line in second.stderr_lines))
        assert not any("still runs" in line for line in second.stderr_lines), second.stderr_lines
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(first.proc.pid, signal.SIGCONT)
    assert first.wait() == 0


def test_a_server_on_a_linked_database_holds_its_own_folders_lock_too(server_factory, tmp_path):
    # Older releases hold their folder's serve.lock alone: a newer adduser or
    # server there must see them.
    import fcntl
    (tmp_path / "dbs").mkdir()
    (tmp_path / "dbs" / "one.db").touch(mode=0o600)
    folder = tmp_path / "a"
    folder.mkdir(mode=0o700)
    os.symlink(tmp_path / "dbs" / "one.db", folder / "buildserver.db")
    with open(folder / "serve.lock", "w") as held:  # as an older release's server does
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        second = cli("serve", "--port", "0", "--data-dir", str(folder))
        assert second.returncode == 1 and "another server is using" in second.stderr, second
        assert buildserver._served(str(folder))


def test_data_folders_linked_to_two_databases_in_one_folder_each_start_a_server(
        server_factory, tmp_path):
    # (Files that only links reach, named otherwise than a data folder's, each have a lock.)
    shared = tmp_path / "dbs"
    shared.mkdir()
    servers = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir(mode=0o700)
        (shared / f"{name}.db").touch(mode=0o600)  # (empty: a new database)
        os.symlink(shared / f"{name}.db", folder / "buildserver.db")
        servers.append(server_factory(data_dir=folder))
    assert [s.json("GET", "/api/v1/health")[0] for s in servers] == [200, 200]


def backed_up_into(server, staging):
    """A copy of `server`'s database in the new folder `staging`, by `backup`."""
    staging.mkdir(mode=0o700)
    done = subprocess.run([sys.executable, SCRIPT, "backup", str(staging / "buildserver.db"),
                           "--data-dir", server.data_dir], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return staging


def test_a_grace_that_ends_while_the_output_drains_leaves_the_runner_idle(
        server_factory, tmp_path):
    # The member's end, seen once the grace's SIGKILL came, set a look due that
    # nothing cleared: the runner polled without waiting (100% of a core) until
    # the drain gave up, a second, while a daemon it made held the output.
    server, path, build = serving_a_running_build(
        server_factory, tmp_path / "d", "--stop-grace", "0.3", command=(
            "sh -c 'trap \"\" TERM; echo ready; sleep 60' & setsid sleep 5 & wait"))
    try:
        def ticks():  # the server's CPU time so far, in clock ticks
            with open(f"/proc/{server.proc.pid}/stat") as f:
                return sum(map(int, f.read().rsplit(") ", 1)[1].split()[11:13]))
        before = ticks()
        assert server.json("POST", path + "/stop")[0] == 200
        wait_until(lambda: server.json("GET", path)[1]["last_status"] == "stopped")
        assert ticks() - before < os.sysconf("SC_CLK_TCK") * 0.3  # idle: 1-2 ticks here
    finally:
        kill_marked(f"BUILD_UUID={build['uuid']}")


def test_a_copy_leaves_alone_the_builds_of_a_live_server_in_another_pid_namespace(
        server_factory, tmp_path):
    # A server in a container recorded its pid there (1): seen from the host,
    # pid 1 is init, started at another time, and the copy took it for dead.
    wrap = ("unshare", "--pid", "--fork", "--mount-proc", "--kill-child")
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare --pid (root) to run a server in a pid namespace of its own")
    live, _, build = serving_a_running_build(server_factory, tmp_path / "live", wrap=wrap)
    copy = server_factory("--workers", "0", data_dir=backed_up_into(live, tmp_path / "staging"))
    assert copy.json("GET", "/api/v1/health")[0] == 200
    assert pids_with_marker(f"BUILD_UUID={build['uuid']}")
    assert any("another pid namespace" in line for line in copy.stderr_lines)
    # (unshare ignores SIGTERM: the server, its namespace's pid 1, is told itself.)
    children = f"/proc/{live.proc.pid}/task/{live.proc.pid}/children"
    os.kill(int(buildserver._read(children).split()[0]), signal.SIGTERM)
    assert live.wait(30) == 0


def test_a_crashed_server_left_a_zombie_its_restart_still_kills_its_builds(server_factory,
                                                                           tmp_path):
    # Unreaped (a supervisor that restarts without waiting), the dead server's
    # /proc entry stayed, and the restart took it for a live server's copy.
    data_dir = tmp_path / "crashed"
    server, _, build = serving_a_running_build(server_factory, data_dir)
    os.kill(server.proc.pid, signal.SIGKILL)  # not waited for: a zombie
    wait_until(lambda: buildserver._stat(server.proc.pid)[:1] == [b"Z"],
               message="the killed server to be a zombie")
    restarted = server_factory(data_dir=data_dir)
    restarted.token = server.token
    wait_gone(f"BUILD_UUID={build['uuid']}")
    assert not any("still runs" in line for line in restarted.stderr_lines)


def test_a_server_on_a_copy_of_a_live_data_folder_leaves_the_live_ones_builds_alone(
        server_factory, tmp_path):
    # A backup restored for staging: its rows said `running`, and its start
    # killed the live server's builds (their uuids, groups and times matched).
    live, path, build = serving_a_running_build(server_factory, tmp_path / "live")
    staging = backed_up_into(live, tmp_path / "staging")
    copy = server_factory("--workers", "0", data_dir=staging)
    copy.token = live.token
    assert copy.json("GET", path)[1]["last_status"] == "failed"  # here, nothing runs it
    assert pids_with_marker(f"BUILD_UUID={build['uuid']}")
    wait_until(lambda: any("still runs: this is a copy" in line for line in copy.stderr_lines),
               message="the copy to say why it leaves them")
    copy.signal(signal.SIGTERM)  # and at its next start, it was the one recorded:
    assert copy.wait() == 0  # the sweep of ended builds' sessions killed them
    again = server_factory("--workers", "0", data_dir=staging)
    assert again.json("GET", "/api/v1/health")[0] == 200
    assert pids_with_marker(f"BUILD_UUID={build['uuid']}")
    assert live.json("GET", path)[1]["last_status"] == "running"
    assert live.json("POST", path + "/stop")[0] == 200
    assert server_final_build(live, path)["last_status"] == "stopped"


def test_after_kill_9_a_build_left_stopping_ends_failed_interrupted(server_factory, tmp_path):
    data_dir = tmp_path / "crashed"
    server = server_factory("--stop-grace", "30", data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds", {
        "command": "trap '' TERM; echo ready; sleep 60 & sleep 60; wait", "timeout": 1})
    path = f"{project_path}/builds/{build['id']}"
    wait_until(lambda: server.json("GET", path)[1]["last_status"] == "stopping",
               message="the timed-out build to be stopping")
    server.proc.kill()
    server.wait()
    restarted = server_factory("--stop-grace", "30", data_dir=data_dir)
    restarted.token = server.token
    done = server_final_build(restarted, path)
    assert done["last_status"] == "failed"
    history = restarted.json("GET", path + "/statuses")[1]["results"]
    assert [s["status"] for s in history][-3:] == ["running", "stopping", "failed"]
    assert history[-1]["message"].startswith("interrupted")
    wait_gone(f"BUILD_UUID={build['uuid']}")
    assert restarted.request("GET", path + "/logs")[2] == b"ready\n"


@pytest.mark.parametrize("recorded", ["nothing", "group only"])
def test_a_restart_kills_a_build_whose_process_group_was_never_recorded(
        server_factory, tmp_path, recorded):
    # The server died between starting the build and recording its group, or
    # (a database from before migration 2) recorded the group but not when its
    # leader started: the next start finds the leftovers by their BUILD_UUID.
    data_dir = tmp_path / "crashed"
    server = server_factory("--workers", "0", data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds", {"command": "sleep 60"})
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    leftover = subprocess.Popen(["sleep", "60"], start_new_session=True,
                                env={**os.environ, "BUILD_UUID": build["uuid"]})
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        db.execute("UPDATE builds SET last_status = 'running', pgid = ?, pg_started = NULL"
                   " WHERE uuid = ?", (None if recorded == "nothing" else leftover.pid,
                                       build["uuid"]))
    try:
        restarted = server_factory("--workers", "0", data_dir=data_dir)
        restarted.token = server.token
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        done = restarted.json("GET", f"{project_path}/builds/{build['id']}")[1]
        assert done["last_status"] == "failed"
    finally:
        if leftover.poll() is None:
            leftover.kill()


def test_ps_dates_a_process_where_there_is_no_proc():
    # (macOS's way: Linux has ps too.) The same process, the same date; none for the gone.
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        started = buildserver._ps_start_time(sleeper.pid)
        assert started and started == buildserver._ps_start_time(sleeper.pid)
        assert re.fullmatch(r"\w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}", started), started
    finally:
        sleeper.kill()
        sleeper.wait()
    assert buildserver._ps_start_time(sleeper.pid) is None


def test_without_proc_a_restart_leaves_alone_a_group_it_cannot_date(server_factory, tmp_path):
    # macOS has no /proc: the group a dead build's row named was killed,
    # whoever had its id since (after a power loss, any process of the user).
    if subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /proc"],
                      capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root) to hide /proc")
    data_dir = tmp_path / "crashed"
    server = server_factory("--workers", "0", data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds", {"command": "sleep 60"})
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)  # took the id
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        db.execute("UPDATE builds SET last_status = 'running', pgid = ?,"
                   " pg_started = 'Sat Jan  1 00:00:00 2000' WHERE uuid = ?",
                   (unrelated.pid, build["uuid"]))
    restart = None
    try:
        restart = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", "mount -t tmpfs none /proc && exec "
             f"{shlex.quote(sys.executable)} {SCRIPT} --port 0 --workers 0 --data-dir {data_dir}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        said = read_within(restart, restart.stdout.readline)
        assert "listening on" in said, restart.stderr.read()
        restart.send_signal(signal.SIGTERM)
        assert restart.wait(30) == 0
        assert unrelated.poll() is None
        with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
            assert db.execute("SELECT last_status FROM builds").fetchone() == ("failed",)
    finally:
        unrelated.kill()
        unrelated.wait()
        if restart is not None and restart.poll() is None:
            restart.kill()
            restart.wait()


def test_builds_wait_out_a_database_that_cannot_be_written_and_keep_their_order(tmp_path):
    # A full disk, made here with a file size limit on the server process: the
    # builds must neither be dropped from the queue nor left showing `running`.
    import resource
    data_dir = tmp_path / "full"
    first = Server(data_dir, "--workers", "0").start()
    project_path = admin_project(first)
    paths = []
    for command in ("echo a; sleep 1", "echo b"):
        status, build = first.json("POST", project_path + "/builds", {"command": command})
        paths.append(f"{project_path}/builds/{build['id']}")
    first.stop()
    wal = os.path.join(data_dir, "buildserver.db-wal")

    def limit_files(size):  # the shared-memory file (32 KiB) fits; a commit does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    server = Server(data_dir, "--workers", "1", preexec_fn=lambda: limit_files(32768)).start()
    server.token = first.token

    def logged(text):
        return lambda: any(text in line for line in server.stderr_lines)
    try:
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        wait_until(logged("could not start"), message="a claim to fail")
        assert [server.json("GET", p)[1]["last_status"] for p in paths] == ["scheduled"] * 2
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, unlimited)
        server_wait_for_log(server, paths[0], b"a")
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE,
                         (os.path.getsize(wal), resource.RLIM_INFINITY))
        wait_until(logged("cannot record its status"), message="the end of build a to fail")
        assert server.json("GET", paths[0])[1]["last_status"] == "running"
        status, body = server.json("POST", project_path + "/builds", {"command": "echo c"})
        assert status == 503 and "Try again later" in body["detail"], body
        assert server.json("GET", project_path + "/builds")[1]["count"] == 2
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, unlimited)
        a, b = (server_final_build(server, p) for p in paths)
        assert (a["last_status"], b["last_status"]) == ("succeeded", "succeeded")
        assert a["finished_at"] <= b["started_at"]
        # A stop whose `stopping` cannot be written: the build still ends `stopped`.
        status, build = server.json("POST", project_path + "/builds",
                                    {"command": "echo c; sleep 60"})
        path = f"{project_path}/builds/{build['id']}"
        server_wait_for_log(server, path, b"c")
        failures = sum("cannot record its status" in line for line in server.stderr_lines)
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE,
                         (os.path.getsize(wal), resource.RLIM_INFINITY))
        assert server.json("POST", path + "/stop")[0] == 200
        wait_until(lambda: sum("cannot record its status" in line
                               for line in server.stderr_lines) > failures,
                   message="the stopping to fail")
        assert server.json("GET", path)[1]["last_status"] == "running"
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, unlimited)
        assert server_final_build(server, path)["last_status"] == "stopped"
        history = server.json("GET", path + "/statuses")[1]["results"]
        assert [s["status"] for s in history][-3:] == ["running", "stopping", "stopped"]
        wait_gone(f"BUILD_UUID={build['uuid']}")
    finally:
        server.stop()


def process_alive(pid):
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def test_after_kill_9_leftovers_without_the_build_environment_are_killed_too(
        server_factory, tmp_path):
    data_dir = tmp_path / "crashed"
    pid_file = tmp_path / "leader.pid"
    server = server_factory(data_dir=data_dir)
    project_path = admin_project(server)
    command = f"echo $$ > {shlex.quote(str(pid_file))}; echo before; exec env -i sleep 60"
    status, build = server.json("POST", project_path + "/builds", {"command": command})
    path = f"{project_path}/builds/{build['id']}"
    server_wait_for_log(server, path, b"before")
    pid = int(pid_file.read_text())
    try:
        wait_until(lambda: not pids_with_marker(f"BUILD_UUID={build['uuid']}"),
                   message="the shell to exec env -i")
        assert process_alive(pid)
        server.proc.kill()
        server.wait()
        restarted = server_factory(data_dir=data_dir)
        restarted.token = server.token
        assert server_final_build(restarted, path)["last_status"] == "failed"
        wait_until(lambda: not process_alive(pid), timeout=3,
                   message=f"the build's leftover process {pid} to be gone")
    finally:
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_shutdown_kills_a_build_ignoring_sigterm_after_the_grace_period(server_factory,
                                                                        tmp_path):
    data_dir = tmp_path / "graceful"
    server = server_factory("--stop-grace", "1", data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds", {
        "command": "trap '' TERM; echo ready; sleep 60 & sleep 60; wait"})
    server_wait_for_log(server, f"{project_path}/builds/{build['id']}", b"ready")
    server.signal(signal.SIGTERM)
    assert server.wait(timeout=1 + 10) == 0
    wait_gone(f"BUILD_UUID={build['uuid']}")
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        last_status, exit_code = db.execute(
            "SELECT last_status, exit_code FROM builds WHERE uuid = ?",
            (build["uuid"],)).fetchone()
        at = dict(db.execute(
            "SELECT s.status, s.created_at FROM statuses s JOIN builds b ON b.id = s.build_id"
            " WHERE b.uuid = ?", (build["uuid"],)).fetchall())
    assert (last_status, exit_code) == ("stopped", -9)
    assert (buildserver.parse_iso(at["stopped"]) - buildserver.parse_iso(at["stopping"])
            ).total_seconds() >= 0.95  # the 1 s grace was given


# Found in review, pinned -----------------------------------------------------------

def test_the_server_log_names_builds_as_people_know_them(server_factory):
    # Not by the internal row id, which no API answer shows.
    server = server_factory()
    for name in ("one", "two"):
        assert server.json("POST", "/api/v1/admin", {"name": name, "command": "true"})[0] == 201
    for path in ("/api/v1/admin/one/builds", "/api/v1/admin/one/builds",
                 "/api/v1/admin/two/builds"):
        status, build = server.json("POST", path, {})
        server_final_build(server, f"{path}/{build['id']}")
    wait_until(lambda: any("build 1 of admin/two succeeded" in line
                           for line in server.stderr_lines), message="the build's log line")
    assert not any("build 3 " in line for line in server.stderr_lines)


def proc_cpu_ticks(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def test_a_download_whose_build_is_deleted_and_its_id_reused_ends_at_once(server_factory):
    # The next build created gets the deleted build's internal id (as after a
    # restore from a backup taken before the delete): the download must
    # neither send the new build's log, which covers where it has got to, nor
    # spin on it.
    server = server_factory()
    project_path = admin_project(server)
    status, old = server.json("POST", project_path + "/builds", {"is_managed": False})
    old_path = f"{project_path}/builds/{old['id']}"
    for _ in range(4):
        assert server.request("POST", old_path + "/logs", body=b"o" * (8 * 1024 * 1024 - 1),
                              headers={"Content-Type": "text/plain"})[0] == 200
    sock = socket.create_connection((server.host, server.port), timeout=30)
    # Nothing more is read until the delete: about 2.5 MB is then on its way
    # (this window, 512 KiB, and the server's send buffer, 2 MiB); a window
    # of 4 KiB, as before, trickled that at 40 KB/s, 50 s a test.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    sock.sendall(f"GET {old_path}/logs HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Token {server.token}\r\n\r\n".encode())
    assert sock.recv(4096)
    db = sqlite3.connect(os.path.join(server.data_dir, "buildserver.db"), isolation_level=None)
    row_id = "SELECT id FROM builds WHERE uuid = ?"
    (old_row,) = db.execute(row_id, (old["uuid"],)).fetchone()
    assert server.json("DELETE", old_path)[0] == 200
    db.execute("UPDATE build_ids SET next = ?", (old_row,))
    status, new = server.json("POST", project_path + "/builds", {"is_managed": False})
    assert db.execute(row_id, (new["uuid"],)).fetchone() == (old_row,)
    db.close()
    new_path = f"{project_path}/builds/{new['id']}"
    assert server.request("POST", new_path + "/logs", body=b"NEW BUILD'S LOG\n" * 400000,
                          headers={"Content-Type": "text/plain"})[0] == 200
    received = b""
    while data := sock.recv(1 << 20):
        received += data
    sock.close()
    assert b"NEW" not in received and len(received) < 4 * 8 * 1024 * 1024
    assert server.json("GET", "/api/v1/health", timeout=5)[0] == 200


def test_a_follower_of_a_deleted_build_never_gets_the_log_of_the_next_build(server_factory):
    server = server_factory()
    project_path = admin_project(server)
    status, old = server.json("POST", project_path + "/builds", {"is_managed": False})
    old_path = f"{project_path}/builds/{old['id']}"
    assert server.json("POST", old_path + "/statuses", {"status": "running"})[0] == 201
    assert server.request("POST", old_path + "/logs", body=b"old\n",
                          headers={"Content-Type": "text/plain"})[0] == 200
    conn, response = open_follow(server, old_path)
    assert response.read1(4096) == b"old\n"
    assert server.json("DELETE", old_path)[0] == 200
    status, new = server.json("POST", project_path + "/builds", {"is_managed": False})
    assert server.request("POST", f"{project_path}/builds/{new['id']}/logs",
                          body=b"SECRET\n", headers={"Content-Type": "text/plain"})[0] == 200
    assert response.read() == b""  # ends, with nothing more
    conn.close()


def test_a_log_append_after_the_build_ended_is_refused_as_it_is_written(web, alice, project,
                                                                         app):
    # The endpoint's own check can pass just before a status report ends the
    # build; the write itself checks again.
    build = unmanaged(web, alice, project)
    url = f"{project}/builds/{build['id']}"
    append_log(web, alice, url, b"before\n")
    report(web, alice, url, "running", "succeeded")
    build_id = app.db.one("SELECT id FROM builds WHERE uuid = ?", (build["uuid"],))[0]
    with pytest.raises(buildserver.LogClosed):
        app.store.append_log(build_id, b"late\n", 1 << 20)
    assert call(web, "GET", url + "/logs", alice).body == b"before\n"


def checkpoints_failing_once(db):
    """Give the checkpointer a connection whose first checkpoint fails (a full
    disk); returns (the SQL it was asked to run, the real connect)."""
    connect, calls = db.connect, []

    class FailingOnce:
        def __init__(self):
            self.conn = connect()

        def execute(self, sql, *args):
            calls.append(sql)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            return self.conn.execute(sql, *args)

        def close(self):
            self.conn.close()
    db.connect = FailingOnce
    return calls, connect


def test_a_database_deleted_while_the_server_runs_is_never_made_again_empty(config, caplog):
    # A thread's first connection made a new, empty file (mode 0644) where the
    # database had been, and its requests failed with 500: no such table.
    application = buildserver.make_app(config)
    try:
        token = application.store.create_user("alice")
        web = webtest.TestApp(application)
        os.remove(config.db_path)
        answers = []
        thread = threading.Thread(target=lambda: answers.append(
            web.get("/api/v1/alice", headers=auth(token), expect_errors=True)))
        thread.start()
        thread.join(30)
        assert answers[0].status_int == 503, answers[0].body
        assert "cannot use its database" in answers[0].json["detail"]
        assert not os.path.exists(config.db_path)
        with caplog.at_level(logging.ERROR, logger="buildserver"):
            assert application.db.replaced() and application.db.replaced()
        assert [r.getMessage() for r in caplog.records].count(
            f"the database {config.db_path} was deleted or replaced while the server ran: what "
            "it writes from now on is lost. Stop the server before you put a database "
            "back") == 1
        res = web.get("/api/v1/health", expect_errors=True)
        assert res.status_int == 503 and "stop the server" in res.json["detail"]
    finally:
        application.close()


def test_a_database_whose_path_is_not_utf8_opens(tmp_path):
    # Its file: URI quoted the path as text: 'utf-8' codec can't encode '\\udcff'.
    folder = os.path.join(tmp_path, os.fsdecode(b"d\xff"))
    os.makedirs(folder)
    db = buildserver.Database(os.path.join(folder, "buildserver.db"))
    try:
        db.migrate()
        assert buildserver.Store(db).create_user("alice")
    finally:
        db.close()
    assert os.listdir(folder)[0] == "buildserver.db"


def test_token_and_adduser_work_beside_a_server_whose_folder_is_not_utf8(server_factory,
                                                                         tmp_path):
    # With a server running they read the database's version, through a URI
    # that quoted the path as text: a UnicodeEncodeError traceback.
    data = os.path.join(tmp_path, os.fsdecode(b"d\xff"))
    server = server_factory(data_dir=data)
    for args in (["token", "admin"], ["adduser", "carol"]):
        done = subprocess.run([sys.executable, SCRIPT, *args, "--data-dir", data],
                              capture_output=True, timeout=60)
        assert done.returncode == 0, done.stderr
        token = done.stdout.split()[-1].decode()
        assert api(server, "GET", "/api/v1/users", token=token)[0] == 200


def test_the_servers_maintenance_says_when_its_database_file_is_gone(config, caplog):
    with served_here(config) as (application, server):
        os.remove(config.db_path)
        with caplog.at_level(logging.ERROR, logger="buildserver"):
            server.maintenance(time.time())  # (waitress calls it every 30 s)
        assert any("was deleted or replaced" in r.getMessage() for r in caplog.records)


def remembering_store(tmp_path):
    db = buildserver.Database(str(tmp_path / "r.db"))
    db.migrate()
    store = buildserver.Store(db)
    return store, store.create_user("alice")


def test_a_remembered_row_is_read_anew_after_any_commit_here(tmp_path):
    store, token = remembering_store(tmp_path)
    user = store.user_by_token(token)
    assert user["name"] == "alice" and store.user_by_token(token) is user  # remembered
    store.create_project(user["id"], {"name": "app"})  # a commit, of anything
    assert store.user_by_token(token) is not user
    store.new_token(user["id"])  # the old token is deleted here: refused at once
    assert store.user_by_token(token) is None
    store.db.close()


def test_a_read_around_a_commit_never_gets_the_row_from_before_it_after_it(tmp_path):
    # The commit is visible the moment COMMIT returns, while the writer has yet
    # to count it (it may wait for the GIL meanwhile): a follower can see a
    # build end there, and its client's GET must not then read `running`. Nor
    # may a read just before COMMIT be kept for after it.
    store, token = remembering_store(tmp_path)
    store.create_project(store.user_by_token(token)["id"], {"name": "app"})
    build = store.create_build(store.project("alice", "app")["id"], "alice",
                               {"is_managed": False, "name": "before"})
    assert store.build_at("alice", "app", 1) is store.build_at("alice", "app", 1)  # remembered
    seen = []

    def read_from_another_thread():
        reader = threading.Thread(
            target=lambda: seen.append(store.build_at("alice", "app", 1)["name"]))
        reader.start()
        reader.join(10)

    class ReadAroundCommit:
        """The writer connection, with a read from another thread just before
        and just after COMMIT, inside Database.write."""

        def __init__(self, conn):
            self.conn = conn

        def __getattr__(self, name):
            return getattr(self.conn, name)

        def execute(self, sql, *args):
            if sql == "COMMIT":
                read_from_another_thread()
            result = self.conn.execute(sql, *args)
            if sql == "COMMIT":
                read_from_another_thread()
            return result

    store.db._writer = ReadAroundCommit(store.db._writer)
    store.update_build(build["id"], {"name": "after"})
    store.db._writer = store.db._writer.conn
    assert seen == ["before", "after"]
    assert store.build_at("alice", "app", 1)["name"] == "after"
    store.db.close()


def test_a_builds_created_at_is_taken_when_its_number_is(tmp_path):
    # A create that waited for the write lock behind another must not carry
    # a time from before that wait: numbers and times go in the same order.
    store, token = remembering_store(tmp_path)
    store.create_project(store.user_by_token(token)["id"], {"name": "app"})
    project_id = store.project("alice", "app")["id"]
    made = []
    with store.db.write():
        creating = threading.Thread(target=lambda: made.append(store.create_build(
            project_id, "alice", {"is_managed": False})))
        creating.start()
        time.sleep(0.05)  # it waits for the lock (or has yet to ask: then any time passes)
        released = buildserver.now_iso()
    creating.join(10)
    assert made[0]["created_at"] >= released
    store.db.close()


def test_a_row_read_inside_a_write_that_rolled_back_is_not_remembered(tmp_path):
    store, token = remembering_store(tmp_path)
    user_id = store.user_by_token(token)["id"]
    with pytest.raises(RuntimeError):
        with store.db.write() as c:
            c.execute("INSERT INTO tokens (hash, user_id, created_at) VALUES (?, ?, ?)",
                      (buildserver.hash_token("ghost"), user_id, buildserver.now_iso()))
            assert store.user_by_token("ghost")["name"] == "alice"  # the write sees itself
            raise RuntimeError("rolled back")
    assert store.user_by_token("ghost") is None
    store.db.close()


def test_only_small_rows_and_their_answers_are_remembered(tmp_path):
    # A build's row may hold megabytes of env: remembering such rows would
    # keep their memory for good.
    store, token = remembering_store(tmp_path)
    store.create_project(store.user_by_token(token)["id"], {"name": "app"})
    project_id = store.project("alice", "app")["id"]
    small, big = (store.create_build(project_id, "alice", {"is_managed": False, "command": c})
                  for c in ("true", "x" * (store.db.RECENT_ROW_BYTES + 1)))
    read = [store.build_at("alice", "app", b["number"]) for b in (small, big, small, big)]
    assert read[2] is read[0] and read[3] is not read[1]
    assert buildserver.build_body(read[0]) is buildserver.build_body(read[2])
    assert buildserver.build_body(read[1]) is not buildserver.build_body(read[3])
    assert json.loads(buildserver.build_body(read[1]))["command"] == big["command"]
    store.db.close()


@pytest.fixture
def clock(monkeypatch):
    """buildserver's monotonic clock, moved by hand: `clock[0] += seconds`
    (the module's own time: nothing else's)."""
    clock = [1000.0]
    its_time = {name: getattr(time, name) for name in dir(time) if not name.startswith("_")}
    its_time["monotonic"] = lambda: clock[0]
    monkeypatch.setattr(buildserver, "time", types.SimpleNamespace(**its_time))
    return clock


def test_another_processs_write_is_seen_once_the_remembering_time_is_over(tmp_path, clock):
    store, token = remembering_store(tmp_path)
    assert store.user_by_token(token) is not None
    other = sqlite3.connect(store.db.path)  # as the CLI's `token` would
    with other:
        other.execute("DELETE FROM tokens")
    other.close()
    clock[0] += store.db.RECENT_SECONDS * 0.9
    assert store.user_by_token(token) is not None  # (remembered: not read again)
    clock[0] += store.db.RECENT_SECONDS * 0.2
    assert store.user_by_token(token) is None
    store.db.close()


def test_the_checkpointer_survives_a_failed_checkpoint(tmp_path):
    db = buildserver.Database(str(tmp_path / "c.db"), background_checkpoints=True)
    db.migrate()
    db.RETRY_SECONDS = 0.2
    calls, connect = checkpoints_failing_once(db)
    try:
        for _ in range(2):  # two checkpoints' worth of writes
            db.wrote(db.CHECKPOINT_BYTES)
            wait_until(lambda: len(calls) >= 1, message="a checkpoint")
            time.sleep(0.1)
        db.wrote(db.CHECKPOINT_BYTES)
        wait_until(lambda: len(calls) >= 2, message="a checkpoint after the failed one")
    finally:
        db.connect = connect
        db.close()


def test_a_failed_checkpoint_is_tried_again_on_an_idle_server(tmp_path):
    db = buildserver.Database(str(tmp_path / "c.db"), background_checkpoints=True)
    db.migrate()
    db.RETRY_SECONDS, db.CHECKPOINT_PAUSE = 0.2, 0.05
    calls, connect = checkpoints_failing_once(db)
    try:
        with db.write():
            db.wrote(db.CHECKPOINT_BYTES)  # then nothing more is ever written
        wait_until(lambda: len(calls) >= 2, message="a second try with no write to start it")
    finally:
        db.connect = connect
        db.close()


def appending_until(web, token, project, enough, pause=0.01, limit=200):
    """Append 1 MiB to an unmanaged build's log every `pause` seconds until
    `enough()`; returns how many MiB that took (at most `limit`)."""
    build = web.post_json(project + "/builds", {"is_managed": False}, headers=auth(token)).json
    url = f"{project}/builds/{build['id']}/logs"
    for count in range(1, limit + 1):
        web.post(url, b"x" * (MiB - 1) + b"\n", headers=auth(token))
        if enough(count):
            return count
        time.sleep(pause)
    return limit


def test_a_checkpoint_waits_until_the_log_writes_pause(web, alice, project, app):
    # Copying the WAL into the database while a build pours out output would
    # make the build share the cores and the disk with copies of its own log.
    # Far longer than the 10 ms gaps between the writes below: only a stall of
    # seconds in this process could let a checkpoint in between.
    app.db.CHECKPOINT_PAUSE = 5.0
    database = app.config.db_path
    size_before = os.path.getsize(database)
    assert appending_until(web, alice, project, lambda count: count == 40) == 40
    assert os.path.getsize(database) == size_before  # 40 MiB: due, but not yet copied
    wait_until(lambda: os.path.getsize(database) > 40 * MiB, message="the checkpoint after the pause")


def test_writes_that_never_pause_are_checkpointed_at_the_wal_limit(web, alice, project, app,
                                                                  monkeypatch):
    app.db.CHECKPOINT_PAUSE = 600.0
    app.db.WAL_LIMIT = 32 * MiB
    database = app.config.db_path
    size_before = os.path.getsize(database)
    at_limit, wrote = [], app.db.wrote

    def counted(size):  # (the checkpointer's reset waits for the write lock held here)
        wrote(size)
        at_limit.append(app.db._wal_bytes >= app.db.WAL_LIMIT)
    monkeypatch.setattr(app.db, "wrote", counted)
    # Written until the limit is reached (a commit counts its pages too), or
    # a checkpoint started before it: not at the first CHECKPOINT_BYTES.
    written = appending_until(web, alice, project, lambda count: (
        any(at_limit) or os.path.getsize(database) > size_before))
    assert 24 <= written < 40
    # Then copied without the 10 minutes' pause (however slow the disk: no
    # more is written meanwhile).
    wait_until(lambda: os.path.getsize(database) > size_before, timeout=60,
               message="the checkpoint at the limit")


@pytest.mark.parametrize("what", ["/builds/1", ""])
def test_deleting_a_big_log_writes_almost_nothing_to_the_wal(web, alice, project, app, what):
    # Debian's SQLite zeroes what a delete frees (secure_delete), through the
    # WAL: deleting old logs to make room took their size again first, and on
    # a nearly full disk the delete failed, and filled it.
    app.db.CHECKPOINT_PAUSE = 600.0  # no checkpoint moves the WAL meanwhile
    wal = app.config.db_path + "-wal"
    assert appending_until(web, alice, project, lambda count: count == 16) == 16
    before = os.path.getsize(wal)
    ok(call(web, "DELETE", project + what, alice))
    assert os.path.getsize(wal) - before < 1 * MiB


def test_a_download_whose_build_is_deleted_midway_ends_and_the_server_stays_idle(
        server_factory):
    server = server_factory("--stop-grace", "1")
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds",
                                {"command": "head -c 30000000 /dev/zero"})
    path = f"{project_path}/builds/{build['id']}"
    assert server_final_build(server, path)["log_size"] == 30000000
    sock = socket.create_connection((server.host, server.port), timeout=30)
    # Nothing more is read until the delete: about 2.5 MB is then on its way
    # (this window, 512 KiB, and the server's send buffer, 2 MiB); a window
    # of 4 KiB, as before, trickled that at 40 KB/s, 50 s a test.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
    sock.sendall(f"GET {path}/logs HTTP/1.1\r\nHost: x\r\n"
                 f"Authorization: Token {server.token}\r\n\r\n".encode())
    assert sock.recv(4096)  # the download has begun
    assert server.json("DELETE", path)[0] == 200
    received = 0
    while True:  # the server must end the response early, not hang or spin
        data = sock.recv(1 << 20)
        if not data:
            break
        received += len(data)
    sock.close()
    assert received < 30000000
    wait_until(lambda: any("deleted while its log was sent" in line
                           for line in server.stderr_lines), message="the log line")
    assert not server_errors(server), server_errors(server)  # a line, not a traceback
    before = proc_cpu_ticks(server.proc.pid)
    time.sleep(1)  # measuring idleness needs an interval; nothing waits on it
    assert proc_cpu_ticks(server.proc.pid) - before < 50  # not a core spinning (100/s)


def written_by_this_process():
    """Bytes this process has handed to write() so far (Linux /proc)."""
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["wchar"])


def test_a_trickling_log_keeps_the_wal_and_the_chunk_rows_small(web, alice, project, app):
    web.post_json(project + "/builds", {"is_managed": False}, headers=auth(alice))
    url = project + "/builds/1/logs"
    before = written_by_this_process()
    for number in range(3000):
        web.post(url, b"x" * 99 + b"\n", headers=auth(alice))
    # Each 100-byte append rewrites a chunk of at most 16 KiB and a few pages
    # (≈100 MB in all); rewriting the whole growing chunk, as before, ≈650 MB.
    assert written_by_this_process() - before < 300 * MiB
    log = web.get(url, headers=auth(alice)).body
    assert log == (b"x" * 99 + b"\n") * 3000
    rows = app.db.one("SELECT count(*), max(length(data)) FROM log_chunks")
    assert rows[0] <= 3000 * 100 // (16 * 1024) + 2 and rows[1] <= 16 * 1024


def test_a_path_cannot_forge_a_line_of_the_request_log(server_factory):
    server = server_factory()
    forged = "2026-11-28 00:00:00,000 INFO buildserver: POST /api/v1/admin/app/builds/1/stop"
    status, _, _ = server.request("GET", "/api/v1/x%0a" + forged.replace(" ", "%20"), token="")
    assert status == 404
    wait_until(lambda: any("/api/v1/x" in line for line in server.stderr_lines),
               message="the request's log line")
    assert not any(line.startswith(forged) for line in server.stderr_lines)


def test_a_failed_start_leaves_queued_builds_scheduled(server_factory, tmp_path):
    data_dir = tmp_path / "queued"
    first = server_factory("--workers", "0", data_dir=data_dir)
    project_path = admin_project(first)
    for _ in range(2):
        assert first.json("POST", project_path + "/builds", {"command": "sleep 30"})[0] == 201
    first.stop()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        done = subprocess.run([sys.executable, SCRIPT, "serve", "--data-dir", str(data_dir),
                               "--workers", "2", "--port", str(busy.getsockname()[1])],
                              capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert done.returncode == 1 and "cannot listen on" in done.stderr
    with sqlite3.connect(os.path.join(data_dir, "buildserver.db")) as db:
        statuses = [row[0] for row in db.execute(
            "SELECT status FROM statuses ORDER BY build_id, number")]
    assert statuses == ["created", "scheduled"] * 2  # nothing ran, nothing was stopped


def test_a_build_asked_for_while_its_project_is_deleted_is_refused(server_factory):
    # The delete waits out the grace until this test ends the build itself.
    server = server_factory("--stop-grace", "60", "--workers", "2")
    project_path = admin_project(server)
    status, stubborn = server.json("POST", project_path + "/builds",
                                   {"command": "trap '' TERM; echo ready; sleep 60"})
    server_wait_for_log(server, f"{project_path}/builds/{stubborn['id']}", b"ready")
    deleted = []
    deleting = threading.Thread(target=lambda: deleted.append(
        server.json("DELETE", project_path)[0]))
    deleting.start()  # waits the stop grace for the stubborn build
    wait_until(lambda: server.json("GET", f"{project_path}/builds/1")[1]["last_status"]
               == "stopping", message="the delete to stop build 1")
    status, late = server.json("POST", project_path + "/builds", {"command": "sleep 77"})
    assert (status, late["detail"]) == (409, "The project admin/app is being deleted.")
    kill_marked(f"BUILD_UUID={stubborn['uuid']}")
    deleting.join(30)
    assert deleted == [200]
    assert server.json("GET", project_path)[0] == 404
    wait_gone(f"BUILD_UUID={stubborn['uuid']}")


@pytest.mark.parametrize("waiting", ["project", "build"])
def test_a_delete_that_waited_never_deletes_what_took_the_place_of_what_it_looked_up(
        server_factory, waiting):
    # The delete looked up alice/app (or its build 1), then waited out the grace
    # of a group the build made. Meanwhile a retry deleted the project and it
    # was made again: the first delete then deleted the new project (which had
    # the old one's id), or the new build 1's workspace while it ran.
    # The first delete waits out the grace until this test ends that group.
    server = server_factory("--stop-grace", "60", "--workers", "2")
    project_path = admin_project(server)
    status, old = server.json("POST", project_path + "/builds", {"command": (
        "timeout 600 sh -c 'trap \"\" TERM; exec sleep 303' >/dev/null 2>&1 &"
        " echo ready; sleep 300")})
    old_path = f"{project_path}/builds/{old['id']}"
    server_wait_for_log(server, old_path, b"ready")
    answers = []
    deleting = threading.Thread(target=lambda: answers.append(
        server.json("DELETE", project_path if waiting == "project" else old_path)))
    deleting.start()
    wait_until(lambda: server.json("GET", old_path)[1]["last_status"] == "stopped",
               message="the build to be stopped (its other group in its grace)")
    assert server.json("DELETE", project_path)[0] == 200  # a retry: nothing runs any more
    assert server.json("POST", "/api/v1/admin", {"name": "app"})[0] == 201
    status, new = server.json("POST", project_path + "/builds",
                              {"command": "echo kept > f; sleep 7; cat f"})
    assert status == 201 and new["id"] == 1
    kill_marked(f"BUILD_UUID={old['uuid']}")  # the grace is over: the first delete ends
    deleting.join(30)
    assert [(status, body["detail"]) for status, body in answers] == [
        (404, "It was deleted while this request ran.")]
    done = server_final_build(server, f"{project_path}/builds/{new['id']}")
    assert done["last_status"] == "succeeded"
    assert server.request("GET", f"{project_path}/builds/{new['id']}/logs")[2] == b"kept\n"
    wait_gone(f"BUILD_UUID={old['uuid']}")


def test_a_crash_during_the_grace_of_an_ended_builds_other_group_leaves_it_to_the_restart(
        server_factory, tmp_path):
    # The build read `stopped` while the `timeout` group it made had the rest of
    # its grace; the restart looked only at builds still running or stopping.
    data_dir = tmp_path / "crashed"
    server = server_factory("--stop-grace", "60", data_dir=data_dir)
    project_path = admin_project(server)
    status, build = server.json("POST", project_path + "/builds", {"command": (
        "timeout 600 sh -c 'trap \"\" TERM; exec sleep 304' >/dev/null 2>&1 &"
        " echo ready; sleep 300")})
    path = f"{project_path}/builds/{build['id']}"
    server_wait_for_log(server, path, b"ready")
    assert server.json("POST", path + "/stop")[0] == 200
    wait_until(lambda: server.json("GET", path)[1]["last_status"] == "stopped",
               message="the build to be stopped")
    assert pids_with_marker(f"BUILD_UUID={build['uuid']}")  # in its grace
    server.proc.kill()
    server.wait()
    restarted = server_factory("--stop-grace", "60", data_dir=data_dir)
    restarted.token = server.token
    wait_gone(f"BUILD_UUID={build['uuid']}")
    assert restarted.json("GET", path)[1]["last_status"] == "stopped"  # as it was


def test_a_project_deleted_while_builds_keep_coming_leaves_no_build_running_unrecorded(
        server_factory, tmp_path):
    # Creates kept starting builds while the delete waited for its stops: its
    # last round deleted the rows anyway, and a crash in the stop that came
    # after left a running build no start could find.
    data_dir = tmp_path / "deleting"
    server = server_factory("--workers", "2", "--stop-grace", "2", data_dir=data_dir)
    status, _ = server.json("POST", "/api/v1/admin",
                            {"name": "app", "command": "trap '' TERM; echo ready; sleep 60"})
    assert status == 201
    uuids = [server.json("POST", "/api/v1/admin/app/builds", {})[1]["uuid"]]
    # (A TERM before its trap ends it at once, and the delete with it: on a busy machine.)
    server_wait_for_log(server, "/api/v1/admin/app/builds/1", b"ready")
    deleted = []
    deleting = threading.Thread(target=lambda: deleted.append(
        server.json("DELETE", "/api/v1/admin/app", timeout=60)))
    deleting.start()
    refusals = []
    while deleting.is_alive():
        if server.json("GET", "/api/v1/admin/app")[0] == 404:
            server.proc.kill()  # the rows are gone: nothing of theirs may run now
            break
        status, body = server.json("POST", "/api/v1/admin/app/builds", {})
        if status == 201:
            uuids.append(body["uuid"])
        elif status == 409:
            refusals.append(body["detail"])
        time.sleep(0.05)
    deleting.join(timeout=60)
    assert refusals and refusals[0] == "The project admin/app is being deleted."
    assert not deleted or deleted[0][0] == 200  # (none if the crash came first)
    server.proc.kill()
    server.wait()
    restarted = server_factory(data_dir=data_dir)
    restarted.token = server.token
    for build_uuid in uuids:
        wait_gone(f"BUILD_UUID={build_uuid}")
    assert restarted.json("GET", "/api/v1/admin/app")[0] == 404


def test_a_project_delete_that_keeps_meeting_started_builds_gives_up_and_deletes_nothing(
        configured):
    # Creates that came just before the 409s: the last of four rounds deleted
    # the rows all the same while one ran (a crash then left it running for good).
    # A build starts in each round between its stops and its check, as one
    # past the check would: a thread starting builds meanwhile missed that
    # window on a busy machine (all of a round's builds end within a few ms).
    web, alice, project = configured(workers=4)
    app = web.app
    row = app.store.project("alice", "app")
    user = app.store.user_by_name("alice")
    fields = {"command": "sleep 60", "env": {}, "timeout": None, "is_managed": True}
    started, kill_groups = [], app.runner.kill_groups_of_ended_builds

    def start_one_in_the_window(project_id=None, build_uuid=None):
        kill_groups(project_id=project_id, build_uuid=build_uuid)
        if project_id == row["id"]:  # the delete's round, after its stops
            started.append(app.runner.create(lambda running=False: app.store.create_build(
                row["id"], user["name"], fields, None, running)))
            wait_until(lambda: app.store.runs_builds(row["id"]), message="a build to start")
    app.runner.kill_groups_of_ended_builds = start_one_in_the_window
    try:
        res = web.delete(project, headers=auth(alice), expect_errors=True)
    finally:
        app.runner.kill_groups_of_ended_builds = kill_groups
    assert res.status_int == 503, res.body
    assert res.json["detail"] == ("Builds of the project kept starting while it was deleted; "
                                  "nothing was deleted, try again.")
    assert len(started) == 4  # one a round
    assert ok(web.get(project, headers=auth(alice)))["builds_count"] == len(started)
    assert [b["last_status"] for b in ok(web.get(project + "/builds", headers=auth(alice)))[
        "results"]] == ["running"] + ["stopped"] * 3
    ok(web.delete(project, headers=auth(alice)))  # once they stop coming
    for build in started:
        wait_gone(f"BUILD_UUID={build['uuid']}")


def test_one_deletes_end_leaves_another_under_way_its_409s_and_running_builds_alone(configured):
    # A second delete that failed (503: too many waiting) took the project's
    # mark away while the first still ran; and the first's search for what
    # ended builds left killed one that had started meanwhile.
    web, alice, project = configured(stop_grace=1.0)
    app = web.app
    build = post_build(web, alice, project, {"command": "echo ready; sleep 60"})
    wait_for_log(web, alice, project, build["id"], b"ready")
    row = app.store.project("alice", "app")
    with app.deleting_project(row["id"]):  # the first
        with app.deleting_project(row["id"]):  # the second
            pass
        res = web.post_json(project + "/builds", {}, headers=auth(alice), expect_errors=True)
        assert res.status_int == 409, res.body
        app.runner.kill_groups_of_ended_builds(project_id=row["id"])
        assert ok(web.get(f"{project}/builds/{build['id']}", headers=auth(alice)))[
            "last_status"] == "running"
        assert pids_with_marker(f"BUILD_UUID={build['uuid']}")
    assert post_build(web, alice, project, {"is_managed": False})["id"] == build["id"] + 1
    ok(web.post(f"{project}/builds/{build['id']}/stop", headers=auth(alice)))
    wait_gone(f"BUILD_UUID={build['uuid']}")


@pytest.mark.parametrize("delete", ["build", "project"])
def test_a_delete_kills_the_groups_an_ended_build_left(server_factory, delete):
    # Left until the next start, which finds them by the build's row: once
    # the row was deleted, they ran on in the deleted workspace for good.
    server = server_factory()
    project_path = admin_project(server)
    leaves = (f"{shlex.quote(sys.executable)} -c 'import os; os.setpgid(0, 0); "
              "open(\"grouped\", \"w\").close(); "
              "os.execvp(\"sleep\", [\"sleep\", \"300\"])' >/dev/null 2>&1 & "
              "while [ ! -e grouped ]; do sleep 0.01; done; echo started")
    _, build = server.json("POST", project_path + "/builds", {"command": leaves})
    path = f"{project_path}/builds/{build['id']}"
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        assert server_final_build(server, path)["last_status"] == "succeeded"
        assert pids_with_marker(marker)  # its own group: the build's end left it
        status, _ = server.json("DELETE", path if delete == "build" else project_path)
        assert status == 200
        wait_gone(marker)
    finally:
        kill_marked(marker)


###############################################################################
# Client ######################################################################
###############################################################################

def client(server, *args, token=None, env=None, **kw):
    """Run `python buildserver.py <args>` against `server`; the CompletedProcess."""
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{server.host}:{server.port}",
               "BUILDSERVER_TOKEN": server.token if token is None else token, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], env=environ, capture_output=True,
                          timeout=kw.pop("timeout", 60), **kw)


CLIENTS = []  # processes start_client started: killed at their test's end


@pytest.fixture(autouse=True)
def no_client_outlives_its_test():
    yield
    while CLIENTS:
        proc = CLIENTS.pop()
        if proc.poll() is None:  # a test that failed while it ran
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def start_client(server, *args, stdout=subprocess.PIPE, preexec_fn=None):
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{server.host}:{server.port}",
               "BUILDSERVER_TOKEN": server.token}
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], env=environ, bufsize=0,
                            stdout=stdout, stderr=subprocess.PIPE, preexec_fn=preexec_fn)
    CLIENTS.append(proc)
    return proc


@pytest.fixture
def served(server_factory):
    """A real server with the project admin/app."""
    server = server_factory("--stop-grace", "1")
    status, _ = server.json("POST", "/api/v1/admin", {"name": "app", "command": "echo default"})
    assert status == 201
    return server


def test_run_streams_the_log_and_exits_0_on_success(served):
    result = client(served, "run", "admin/app", "--command", "echo out; echo err >&2")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"out\nerr\n"
    first = result.stderr.decode().splitlines()[0]  # the dashboard's page (the API's needs a token)
    assert first == f"build 1: http://{served.host}:{served.port}/#/admin/app/builds/1"


def test_builds_checks_its_limit_and_statuses_and_pages_with_offset(served):
    # A limit or status the server would refuse exited 1 ("the server refused")
    # instead of 2, "failed, stopped" was refused for its space, and a project
    # of more than 1000 builds could not be listed past them.
    for args in (["--limit", "0"], ["--limit", "1001"], ["--status", "failed,bogus"],
                 ["--offset", "-1"]):
        done = client(served, "builds", "admin/app", *args)
        assert done.returncode == 2 and b"usage:" in done.stderr, (args, done)
    for command in ("exit 3", "true", "exit 4"):
        assert served.json("POST", "/api/v1/admin/app/builds", {"command": command})[0] == 201
    for n in (1, 2, 3):
        server_final_build(served, f"/api/v1/admin/app/builds/{n}")
    done = client(served, "builds", "admin/app", "--status", "failed, succeeded", "--limit", "1",
                  "--offset", "1", "--json")
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    assert (page["count"], [b["id"] for b in page["results"]]) == (3, [2])
    for chosen, count in (("", 3), ("failed,", 2)):  # (`--status "$S"`, S unset: all)
        done = client(served, "builds", "admin/app", "--status", chosen, "--json")
        assert json.loads(done.stdout)["count"] == count, done


@pytest.mark.parametrize("through", ["loopback", "a proxy 30 ms away"])
def test_run_whose_server_shuts_down_says_its_build_was_stopped_and_exits_1(served, through):
    # The follow ended with the shutdown's stop; the read of how the build
    # ended got 503 "shutting down" (then, through a proxy, the server had
    # already gone), which run rode out for a minute and then exited 76,
    # "may still run", for a build that was stopped.
    args = ["run", "admin/app", "--command", "echo started; exec sleep 60"]
    if through != "loopback":
        proxy = FaultyProxy(served.port)
        proxy.set("far")
        args += ["--url", proxy.url]
    proc = start_client(served, *args)
    assert read_within(proc, proc.stdout.readline) == b"started\n"
    served.signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if through != "loopback":
        proxy.close()
    assert proc.returncode == 1, err
    assert err.decode().splitlines()[-1] == "build 1: stopped (the server shut down)", err
    assert served.wait(timeout=30) == 0


def test_a_server_shutting_down_answers_reads_and_refuses_the_rest(web, app, alice, populated):
    app.closing = True  # what a signal does first
    assert ok(call(web, "GET", populated + "/builds/1", alice))["id"] == 1
    log = call(web, "GET", populated + "/builds/1/logs", alice)
    assert log.body == b"first line\nsecond line\n"
    for method, path, status in (("POST", populated + "/builds", 503),
                                 ("PATCH", populated, 503),
                                 ("GET", "/api/v1/health", 503),
                                 ("GET", populated + "/builds/1/logs?follow=1", 503),
                                 ("GET", populated + "/builds/2/logs?follow=1", 200)):  # final
        res = call(web, method, path, alice, *(() if method == "GET" else ({},)))
        assert res.status_int == status, (method, path, res.body)
        if status == 503:
            assert res.json["detail"] == "The server is shutting down."
            assert res.headers["Retry-After"] == "5"
    app.closing = False
    assert ok(call(web, "GET", populated, alice))["builds_count"] == 2


def test_run_refuses_an_env_the_server_would_override_before_it_makes_a_build(served):
    result = client(served, "run", "admin/app", "--env", "BUILD_ID=7")
    assert result.returncode == 2, result.stderr
    assert b"--env: the server sets BUILD_ID itself" in result.stderr, result.stderr
    assert served.json("GET", "/api/v1/admin/app/builds")[1]["count"] == 0


def test_run_uses_the_projects_command_env_name_tags_and_timeout(served):
    result = client(served, "run", "admin/app", "--env", "A=1", "--env", "B=two words",
                    "--name", "nightly", "--tag", "x", "--tag", "y", "--timeout", "60",
                    "--json")
    assert result.returncode == 0, result.stderr
    build = json.loads(result.stdout)  # the log went to standard error
    assert b"default\n" in result.stderr
    assert (build["env"], build["name"], build["tags"], build["timeout"], build["command"]) == (
        {"A": "1", "B": "two words"}, "nightly", ["x", "y"], 60, "echo default")


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_run_says_the_end_on_a_line_of_its_own_where_the_log_leaves_one_open(
        served, tmp_path, json_flag):
    # `run ... > nightly.log 2>&1` wrote "50%\r100%build 1: failed".
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
               "BUILDSERVER_TOKEN": served.token}
    with open(tmp_path / "both.log", "wb") as both:
        done = subprocess.run([sys.executable, SCRIPT, "run", "admin/app", *json_flag,
                               "--command", "echo compiling; printf '50%%\\r100%%'; exit 3"],
                              env=environ, stdout=both, stderr=both, timeout=60)
    assert done.returncode == 3
    written = (tmp_path / "both.log").read_bytes()
    last = b"build 1: failed (exit code 3)\n"
    after_log = b"compiling\n50%\r100%\n" + (b"{\n" if json_flag else last)
    assert after_log in written and written.endswith(b"\n" + last), written
    # Apart, the log stays byte for byte what the build wrote, and the note as it was.
    apart = client(served, "run", "admin/app", *json_flag, "--command", "printf 'no end'")
    assert apart.returncode == 0
    if json_flag:  # the log went to standard error too
        assert b"no end\nbuild 2: succeeded\n" in apart.stderr
    else:
        assert apart.stdout == b"no end"
        assert apart.stderr.decode().splitlines()[1] == "build 2: succeeded"


@pytest.mark.parametrize("command, code", [("exit 3", 3), ("exit 255", 255),
                                           ("kill -9 $$", 1)])
def test_run_exits_with_the_builds_own_exit_code_or_1(served, command, code):
    assert client(served, "run", "admin/app", "--command", command).returncode == code


@pytest.mark.parametrize("url", ["http://127.0.0.1:1/\u00fc", "http://a..b:1", "http://x:99999",
                                 "ftp://x"])
def test_a_server_url_that_cannot_work_is_a_one_line_usage_error(url):
    result = cli("builds", "admin/app", "--url", url, env={"BUILDSERVER_TOKEN": "abc"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_token_with_a_line_break_is_refused_at_once_and_not_echoed(served):
    result = client(served, "builds", "admin/app", token="abc\ndef-secret", timeout=20)
    assert result.returncode == 2, result.stderr
    assert b"def-secret" not in result.stderr + result.stdout


def test_logs_takes_no_json_flag_since_its_output_is_the_log(served):
    result = client(served, "logs", "admin/app", "1", "--json")
    assert result.returncode == 2 and b"--json" in result.stderr


def test_run_with_no_follow_prints_the_id_and_returns_at_once(served):
    result = client(served, "run", "admin/app", "--command", "sleep 30", "--no-follow")
    assert (result.returncode, result.stdout) == (0, b"1\n")
    status, body = served.json("GET", "/api/v1/admin/app/builds/1")
    assert body["last_status"] in ("scheduled", "running")


def test_a_bad_token_from_the_environment_is_not_blamed_on_the_url(served):
    done = client(served, "builds", "admin/app", token="abc def")
    assert (done.returncode, done.stderr) == (2, b"buildserver: the token holds characters no "
                                                 b"token has (spaces, line breaks, ...) "
                                                 b"(from BUILDSERVER_TOKEN)\n")


@pytest.mark.parametrize("token", [None, ""])
def test_a_client_with_no_token_says_where_to_put_one(served, token):
    # The server's 401 told a command-line user to send an HTTP header.
    environ = {k: v for k, v in os.environ.items() if k != "BUILDSERVER_TOKEN"}
    if token is not None:
        environ["BUILDSERVER_TOKEN"] = token
    done = subprocess.run([sys.executable, SCRIPT, "builds", "admin/app", "--url",
                           f"http://{served.host}:{served.port}"], env=environ,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == "buildserver: no token: set BUILDSERVER_TOKEN, or give --token\n"


def test_an_empty_token_option_is_refused_not_replaced_by_the_environments(served):
    # `--token "$TOKEN"` of an unset variable acted with BUILDSERVER_TOKEN's token.
    done = client(served, "run", "admin/app", "--token", "", "--command", "true")
    assert (done.returncode, done.stderr) == (2, b"buildserver: --token is empty\n")
    assert served.json("GET", "/api/v1/admin/app/builds")[1]["count"] == 0


def test_status_shows_the_code_reference_that_run_recorded(served):
    done = client(served, "run", "admin/app", "--command", "true", "--commit", "ab12cd34",
                  "--branch", "main", "--git-url", "https://git.example.org/app.git")
    assert done.returncode == 0, done.stderr
    said = client(served, "status", "admin/app").stdout.decode()
    assert "  code      ab12cd34 on main https://git.example.org/app.git\n" in said, said
    as_json = json.loads(client(served, "status", "admin/app", "--json").stdout)
    assert as_json["code_reference"]["commit"] == "ab12cd34"
    assert client(served, "run", "admin/app", "--command", "true").returncode == 0
    assert "  code      -\n" in client(served, "status", "admin/app", "2").stdout.decode()


def test_unreachable_server_and_refused_token_have_their_own_exit_codes(served):
    refused = client(served, "builds", "admin/app", token="not-a-token")
    assert refused.returncode == buildserver.EXIT_REFUSED
    assert b"not-a-token" not in refused.stderr + refused.stdout
    unreachable = client(served, "run", "admin/app", env={"BUILDSERVER_URL": "http://127.0.0.1:1"})
    assert unreachable.returncode == buildserver.EXIT_UNREACHABLE
    assert b"cannot reach" in unreachable.stderr


def test_a_token_refused_the_project_403_exits_as_refused(served):
    alice = add_user(served.data_dir, "alice")
    for args in (["builds", "admin/app"], ["status", "admin/app", "1"], ["run", "admin/app"]):
        done = client(served, *args, token=alice)
        assert done.returncode == buildserver.EXIT_REFUSED, (args, done.returncode, done.stderr)
        assert b"403" in done.stderr, done.stderr


def test_client_refuses_what_the_server_would_and_sends_what_it_is_given(served):
    # Not dropped as "unset" (running the project's command instead), and not
    # taken for an unreachable server (exit 75) because of a space in a query.
    for args, flag in ((["--command", ""], b"--command"), (["--timeout", "0"], b"--timeout"),
                       # `--commit "$(git rev-parse HEAD)"` outside a repository: the
                       # build ran with no code reference, and exit 0
                       (["--commit", ""], b"--commit is empty (an unset variable")):
        result = client(served, "run", "admin/app", *args)
        assert result.returncode == 2 and result.stderr.startswith(b"buildserver: " + flag), \
            result.stderr
        assert b"null" not in result.stderr  # (which no command line can give)
    listed = client(served, "builds", "admin/app", "--status", "failed, succeeded")
    assert listed.returncode == 0, listed.stderr
    listed = client(served, "builds", "admin/app", "--status", "failed&limit=5", "--json")
    assert listed.returncode == 2, listed  # refused, not a second parameter
    assert b"unknown status 'failed&limit=5'" in listed.stderr
    assert served.json("GET", "/api/v1/admin/app")[1]["builds_count"] == 0


def test_run_records_the_git_commit_branch_and_url_it_is_given(served):
    result = client(served, "run", "admin/app", "--command", "true", "--commit", "ab12cd34",
                    "--branch", "main", "--git-url", "https://git/app.git")
    assert result.returncode == 0, result.stderr
    code = served.json("GET", "/api/v1/admin/app/builds/1/coderef")[1]
    assert code == {"commit": "ab12cd34", "head": None, "branch": "main",
                    "git_url": "https://git/app.git", "is_dirty": None}
    refused = client(served, "run", "admin/app", "--commit", "HEAD~1")
    assert refused.returncode == 2 and b"--commit must be a git commit id" in refused.stderr
    assert served.json("GET", "/api/v1/admin/app")[1]["builds_count"] == 1  # none made


@pytest.mark.parametrize("args, flag", [
    (["--command", b"echo \xff"], b"--command"), (["--env", b"A=\xe9t\xe9"], b"--env"),
    (["--tag", b"caf\xe9"], b"--tag"), (["--name", b"x\xff"], b"--name")])
def test_run_refuses_text_that_is_no_utf8_as_its_command_line(served, args, flag):
    # It became escapes the user never typed ("a lone surrogate"), refused by
    # the server as a request's fault: exit 1, not a wrong command line's 2.
    refused = client(served, "run", "admin/app", *args)
    assert refused.returncode == 2 and refused.stderr.startswith(b"buildserver: " + flag)
    assert b"surrogate" not in refused.stderr
    assert served.json("GET", "/api/v1/admin/app")[1]["builds_count"] == 0  # none made


def test_status_logs_stop_and_builds_human_and_json(served):
    assert client(served, "run", "admin/app", "--command", "echo hi; exit 2",
                  "--name", "first").returncode == 2
    client(served, "run", "admin/app", "--command", "sleep 30", "--no-follow")
    wait_until(lambda: served.json("GET", "/api/v1/admin/app/builds/2")[1]["last_status"]
               == "running", message="build 2 to run")

    status = client(served, "status", "admin/app", "1").stdout.decode()
    assert "build 1 of admin/app: failed (exit code 2)" in status
    assert "exit code 2" in status.splitlines()[-1]  # the history ends with the reason
    latest = json.loads(client(served, "status", "admin/app", "--json").stdout)
    assert latest["id"] == 2 and [s["status"] for s in latest["statuses"]][-1] == "running"

    assert client(served, "logs", "admin/app", "1").stdout == b"hi\n"
    stopped = client(served, "stop", "admin/app", "2")
    assert (stopped.returncode, stopped.stdout) == (0, b"build 2 of admin/app: stopped\n")

    table = client(served, "builds", "admin/app").stdout.decode().splitlines()
    assert table[0].split() == ["ID", "STATUS", "NAME", "USER", "CREATED", "DURATION", "TAGS"]
    assert table[1].split()[:2] == ["2", "stopped"] and table[2].split()[:3] == ["1", "failed", "first"]
    only_failed = json.loads(client(served, "builds", "admin/app", "--status", "failed",
                                    "--json").stdout)
    assert [b["id"] for b in only_failed["results"]] == [1]


def test_logs_follow_prints_until_the_build_ends(served):
    client(served, "run", "admin/app", "--command", "echo a; sleep 1; echo b", "--no-follow")
    result = client(served, "logs", "admin/app", "1", "--follow")
    assert (result.returncode, result.stdout) == (0, b"a\nb\n")


def test_logs_into_a_pipe_closed_early_exit_at_once_quietly(served):
    # `... | head -1`: the reader is gone, there is nothing to reconnect for.
    client(served, "run", "admin/app", "--command", "seq 200000")
    proc = start_client(served, "logs", "admin/app", "1", "--follow")
    assert read_within(proc, proc.stdout.readline) == b"1\n"
    proc.stdout.close()
    assert proc.wait(30) == buildserver.EXIT_OUTPUT_CLOSED
    assert proc.stderr.read() == b""


def test_logs_into_a_full_disk_exit_74_saying_why(served):
    client(served, "run", "admin/app", "--command", "seq 200000")
    with open("/dev/full", "wb") as full:
        proc = start_client(served, "logs", "admin/app", "1", stdout=full)
        assert proc.wait(30) == buildserver.EXIT_OUTPUT_FAILED
    assert b"cannot write the log: No space left on device" in proc.stderr.read()


def test_run_into_a_full_disk_says_its_build_runs_on_and_how_to_stop_it(served):
    # It said only that the log could not be written, and left the build running.
    with open("/dev/full", "wb") as full:
        proc = start_client(served, "run", "admin/app", "--command", "echo out; sleep 60",
                            stdout=full)
        assert proc.wait(30) == buildserver.EXIT_OUTPUT_FAILED
    err = proc.stderr.read().decode()
    assert "cannot write the log: No space left on device" in err
    assert "build 1 runs on; stop it with: " in err and "stop admin/app 1" in err, err
    assert served.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"] == "running"


@pytest.mark.parametrize("args", [("builds", "admin/app"), ("builds", "admin/app", "--json"),
                                  ("status", "admin/app"), ("status", "admin/app", "1"),
                                  ("stop", "admin/app", "1"),
                                  ("run", "admin/app", "--command", "true", "--no-follow")])
def test_other_commands_into_a_full_disk_exit_74_too(served, args):
    # They exited 1, as if the server had refused: a script could not tell the two apart.
    assert client(served, "run", "admin/app", "--command", "true").returncode == 0
    with open("/dev/full", "wb") as full:
        proc = start_client(served, *args, stdout=full)
        assert proc.wait(30) == buildserver.EXIT_OUTPUT_FAILED
    assert b"cannot write the output: No space left on device" in proc.stderr.read()


def test_follow_waits_out_a_503_for_too_many_followers(server_factory):
    # --threads 4 leaves 2 followers: a third is told 503, and keeps trying.
    server = server_factory("--threads", "4", "--workers", "3", "--stop-grace", "1")
    assert server.json("POST", "/api/v1/admin", {"name": "app", "command": "sleep 60"})[0] == 201
    for _ in range(2):
        assert server.json("POST", "/api/v1/admin/app/builds", {})[0] == 201
    holders = [raw_request_head(server.host, server.port, "GET",
                                f"/api/v1/admin/app/builds/{n}/logs?follow=1",
                                {"Authorization": f"Token {server.token}"}) for n in (1, 2)]
    try:
        for sock in holders:
            assert " 200 " in read_status_line(sock, time.monotonic() + 10)
        assert server.json("POST", "/api/v1/admin/app/builds",
                           {"command": "sleep 2; echo done"})[0] == 201
        proc = start_client(server, "logs", "admin/app", "3", "--follow")
        time.sleep(1.5)  # time for its first try (refused at once): it must not give up
        assert proc.poll() is None
    finally:
        for sock in holders:
            sock.close()
    assert proc.wait(60) == 0
    assert proc.stdout.read() == b"done\n"


def test_the_question_on_ctrl_c_goes_to_standard_error(monkeypatch, capsys):
    # Standard output holds the log alone (it may be a file).
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert buildserver._ask("Stop build 1? [y/N] ") is False  # (`run ... 2>err`: to nobody)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert buildserver._ask("Stop build 1? [y/N] ") is True
    out, err = capsys.readouterr()
    assert out == "" and err == "Stop build 1? [y/N] "


def test_ctrl_c_with_stop_on_interrupt_stops_the_build_and_exits_130(served):
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60",
                        "--stop-on-interrupt")
    assert read_within(proc, proc.stdout.readline) == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert server_final_build(served, "/api/v1/admin/app/builds/1")["last_status"] == "stopped"


def test_ctrl_c_without_a_terminal_leaves_the_build_running(served):
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60")
    assert read_within(proc, proc.stdout.readline) == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert served.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"] == "running"


def test_the_client_prints_control_characters_from_the_server_as_text(served):
    # A tag or a status message could set the reader's clipboard (OSC 52) or
    # rewrite the lines above it in their terminal.
    status, build = served.json("POST", "/api/v1/admin/app/builds", {
        "is_managed": False, "tags": ["\x1b]52;c;ZWNobw==\x07x", "n\u202eame"]})
    path = f"/api/v1/admin/app/builds/{build['id']}"
    assert served.json("POST", path + "/statuses", {
        "status": "running", "message": "\x1b[1A\x1b[2K forged"})[0] == 201
    for args in (["status", "admin/app", str(build["id"])], ["builds", "admin/app"]):
        out = client(served, *args).stdout
        assert b"\x1b" not in out and b"\x07" not in out and "\u202e".encode() not in out, out
        assert b"<U+001B>]52;c;ZWNobw==<U+0007>x" in out and b"n<U+202E>ame" in out
    assert b"<U+001B>[1A<U+001B>[2K forged" in client(served, "status", "admin/app").stdout


def test_sigterm_with_stop_on_interrupt_stops_the_build_and_exits_143(served):
    # A CI job cancelled, or `timeout 600 buildserver.py run ...`: the build ran on.
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60",
                        "--stop-on-interrupt")
    assert read_within(proc, proc.stdout.readline) == b"started\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 143
    assert b"stop requested" in proc.stderr.read()
    assert server_final_build(served, "/api/v1/admin/app/builds/1")["last_status"] == "stopped"


@pytest.mark.parametrize("signum, ignored, code", [
    (signal.SIGINT, True, 130),   # a script's `&` starts it ignoring SIGINT: kill -INT did nothing
    (signal.SIGHUP, False, 129),  # its terminal or ssh session closed: the build ran on
    (signal.SIGTERM, False, 143),  # (as `timeout` sends it)
    (signal.SIGHUP, True, None)])  # under nohup, it follows on
def test_stop_on_interrupt_takes_an_ignored_sigint_and_sighup_unless_under_nohup(
        served, signum, ignored, code):
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60",
                        "--stop-on-interrupt", preexec_fn=lambda: ignored and signal.signal(
                            signum, signal.SIG_IGN))
    try:
        assert read_within(proc, proc.stdout.readline) == b"started\n"
        # As a closed terminal (the kernel, then the shell) or `timeout` (the
        # child, then its group) send it: twice. The second, coming while the
        # stop was asked for, ended `run` before it was (or with a traceback).
        proc.send_signal(signum)
        if signum != signal.SIGINT:  # (a second Ctrl-C ends it, on purpose)
            proc.send_signal(signum)
        if code is None:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(1)
            status = served.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"]
            assert status == "running"
            return
        deadline = time.monotonic() + 30
        while signum != signal.SIGINT and proc.poll() is None and time.monotonic() < deadline:
            # More, until it has exited: one that came as Python exited, once
            # it had put back each signal's default, ended `run` by the signal.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)
            time.sleep(0.001)
        assert proc.wait(30) == code
        assert b"stop requested" in proc.stderr.read()
        assert server_final_build(served, "/api/v1/admin/app/builds/1")["last_status"] == "stopped"
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_then_sigterm_with_stop_on_interrupt_stops_the_build_without_a_traceback(served):
    # Ctrl-C, then the terminal closed (or a supervisor's INT, then TERM): the
    # second raised in the middle of the stop's request, a traceback, exit 1.
    proxy = FaultyProxy(served.port)  # (to hold the stop's request while SIGTERM comes)
    try:
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, "run", "admin/app", "--command", "echo started; sleep 60",
             "--stop-on-interrupt"], env={**os.environ, "BUILDSERVER_URL": proxy.url,
                                          "BUILDSERVER_TOKEN": served.token},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert read_within(proc, proc.stdout.readline) == b"started\n"
        proxy.set("slow")  # answers on new connections come 3 s late
        proc.send_signal(signal.SIGINT)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
    finally:
        proxy.close()
        proc.kill()
    err = proc.stderr.read()
    assert b"stop requested" in err and b"Traceback" not in err, err
    assert server_final_build(served, "/api/v1/admin/app/builds/1")["last_status"] == "stopped"


def test_a_stopped_build_exits_1_whatever_its_shell_exits_with(served):
    # Its shell trapped TERM and exited 7: `run` said 7, "the build failed with 7".
    proc = start_client(served, "run", "admin/app", "--command",
                        "trap 'exit 7' TERM; echo started; while :; do sleep 0.1; done")
    assert read_within(proc, proc.stdout.readline) == b"started\n"
    assert served.json("POST", "/api/v1/admin/app/builds/1/stop")[0] == 200
    assert proc.wait(30) == 1
    assert served.json("GET", "/api/v1/admin/app/builds/1")[1]["exit_code"] == 7


@pytest.mark.parametrize("unbuffered", [False, True])
def test_a_log_into_a_pipe_made_non_blocking_arrives_whole(served, unbuffered):
    # A CI runner may share a pipe it made non-blocking: the client's writes
    # then took part of the log, or none of it, and the rest was lost (exit 0).
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    env = {**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
           "BUILDSERVER_TOKEN": served.token, **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}
    proc = subprocess.Popen([sys.executable, SCRIPT, "run", "admin/app", "--command",
                             "seq 200000"], stdout=write_fd, stderr=subprocess.PIPE, env=env)
    os.close(write_fd)
    try:  # nothing read until the build ended: the pipe was full long before
        wait_until(lambda: served.json("GET", "/api/v1/admin/app/builds/1")[1].get(
            "last_status") == "succeeded", timeout=30)
        chunks = []
        while select.select([read_fd], [], [], 30)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(30) == 0, proc.stderr.read()
    finally:
        os.close(read_fd)
        proc.kill()
    assert b"".join(chunks) == "".join(f"{n}\n" for n in range(1, 200001)).encode()


# select() and pselect6() by machine (Linux): in /proc/<pid>/syscall, a
# process waiting for room in a pipe (output made non-blocking) shows one.
SELECT_SYSCALLS = {"x86_64": {"23", "270"}, "aarch64": {"72"}}.get(platform.machine(), set())


def system_call(pid):
    """The number of the system call `pid` is in, as text; None if unknown
    (ended, or /proc/<pid>/syscall not readable here)."""
    try:
        return buildserver._read(f"/proc/{pid}/syscall").split()[0].decode()
    except (OSError, IndexError):
        return None


@pytest.mark.parametrize("unbuffered", [False, True])
def test_output_into_a_full_pipe_made_non_blocking_waits_for_room(served, unbuffered):
    # Only the log waited: a command's answer (builds, status, run's last
    # line) exited 74, "write could not complete without blocking".
    assert client(served, "run", "admin/app", "--command", "true").returncode == 0
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    filler = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            filler += os.write(write_fd, b"." * 4096)
    env = {**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
           "BUILDSERVER_TOKEN": served.token, **({"PYTHONUNBUFFERED": "1"} if unbuffered else {})}
    procs = [subprocess.Popen([sys.executable, SCRIPT, *args], stdout=write_fd,
                              stderr=write_fd if args[0] == "run" else subprocess.PIPE, env=env)
             for args in (["status", "admin/app", "1", "--json"],
                          ["run", "admin/app", "--command", "exit 3"])]
    os.close(write_fd)
    try:
        # Nothing read until each waits for room, or has given up (exit 74).
        if SELECT_SYSCALLS and any(system_call(proc.pid) is not None for proc in procs):
            wait_until(lambda: all(proc.poll() is not None or system_call(proc.pid)
                                   in SELECT_SYSCALLS for proc in procs), timeout=60,
                       message="both clients to wait for room in the pipe, or give up")
        else:  # (elsewhere: what does not wait for room has given up by then, most likely)
            with contextlib.suppress(subprocess.TimeoutExpired):
                for proc in procs:
                    proc.wait(3)
        chunks = []
        while select.select([read_fd], [], [], 30)[0]:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        assert [proc.wait(30) for proc in procs] == [0, 3]
    finally:
        os.close(read_fd)
        for proc in procs:
            proc.kill()
    said = b"".join(chunks)[filler:]
    assert b'"last_status": "succeeded"' in said and b"build 2: failed (exit code 3)" in said


def test_standard_error_that_cannot_be_written_changes_nothing_of_a_run(served):
    # The URL line went unguarded: `run` exited 1 and left its build unfollowed.
    with open("/dev/full", "wb") as full:
        proc = subprocess.Popen([sys.executable, SCRIPT, "run", "admin/app", "--command",
                                 "echo out; exit 5"], stdout=subprocess.PIPE, stderr=full,
                                env={**os.environ, "BUILDSERVER_URL": f"http://{served.host}:"
                                     f"{served.port}", "BUILDSERVER_TOKEN": served.token})
        out, _ = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (5, b"out\n")


@pytest.mark.parametrize("closed, code, stdout", [
    ("stdout", buildserver.EXIT_OUTPUT_FAILED, b""),  # a traceback, or exit 0 saying nothing
    ("stderr", 0, b"2\n"),  # print(file=None) wrote the URL line to standard output
])
def test_a_closed_standard_stream_is_no_traceback_and_no_mixed_output(served, closed, code,
                                                                       stdout):
    assert client(served, "run", "admin/app", "--command", "true").returncode == 0
    fd = 1 if closed == "stdout" else 2
    for args in (["logs", "admin/app", "1"], ["builds", "admin/app"],
                 ["run", "admin/app", "--command", "true", "--no-follow"]):
        if closed == "stderr" and args[0] != "run":
            continue
        out_r, out_w = os.pipe()
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdout=out_w, stderr=out_w,
            env={**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
                 "BUILDSERVER_TOKEN": served.token},
            preexec_fn=lambda: os.close(fd), pass_fds=(out_w,))
        os.close(out_w)
        with os.fdopen(out_r, "rb") as reader:
            said = read_within(proc, reader.read)
        assert proc.wait(30) == code, (args, said)
        assert b"Traceback" not in said
        if closed == "stderr":
            assert said == stdout
        else:
            assert said == b"buildserver: cannot write the output: standard output is closed\n"


class Redirecting(http.server.BaseHTTPRequestHandler):
    """A server that sends every request elsewhere, as http:// to https:// does."""
    prefix = "https://build.example.org"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(301)
        self.send_header("Location", self.prefix + self.path)
        self.send_header("Content-Length", "16")
        self.end_headers()
        self.wfile.write(b"<html>Moved</html>"[:16])

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("prefix", ["https://build.example.org", "/buildserver"])
def test_a_redirect_is_no_answer_and_the_client_says_where_it_points(prefix):
    # Taken for success: the HTML was printed as the log (exit 0), or read as
    # JSON ("cannot reach", 75).
    handler = type("RedirectingHere", (Redirecting,), {"prefix": prefix})
    redirecting = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{redirecting.server_address[1]}"
        server_url = urllib.parse.urljoin(url, prefix)  # (a relative Location is the same host's)
        for args in (["logs", "admin/app", "2"], ["logs", "admin/app", "2", "-f"],
                     ["builds", "admin/app"], ["run", "admin/app", "--command", "true"]):
            done = cli(*args, "--url", url, env={"BUILDSERVER_TOKEN": "abc"})
            assert (done.returncode, done.stdout) == (1, ""), (args, done)
            assert "301" in done.stderr and f"{server_url}/api/v1/admin/app" in \
                done.stderr, done.stderr
            # The URL to give is the server's, not the redirected request's: that one
            # became a prefix of every path ("no endpoint at /api/v1/.../api/v1/...").
            assert done.stderr.rstrip().endswith(f"; give {server_url} as the server URL"), \
                done.stderr
    finally:
        redirecting.shutdown()
        redirecting.server_close()


class Hostile(http.server.BaseHTTPRequestHandler):
    """A server (or a proxy in front of one) whose errors carry terminal escapes."""
    body = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(500)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("body", [
    b"Internal error\x1b]52;c;ZWNobyBvd25lZA==\x07\n\x1b[1Agone",
    json.dumps({"detail": "No\x1b[2J such \u202eexe.txt",
                "errors": {"name\x1b[8m": "hidden\x1b[0m"}}).encode()])
def test_an_error_the_server_sends_reaches_the_terminal_without_its_control_characters(body):
    # An escape in an error could set the terminal's clipboard or rewrite the
    # lines above, as one in a table or a status could (those were shown already).
    handler = type("HostileHere", (Hostile,), {"body": body})
    hostile = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=hostile.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{hostile.server_address[1]}"
        for args in (["builds", "admin/app"], ["run", "admin/app", "--command", "true"]):
            done = cli(*args, "--url", url, env={"BUILDSERVER_TOKEN": "abc"})
            assert done.returncode == 1, (args, done)
            assert "the server says (500)" in done.stderr, done.stderr
            assert not buildserver.CONTROLS.search(done.stderr.replace("\n", "")), done.stderr
            assert "<U+001B>" in done.stderr, done.stderr
    finally:
        hostile.shutdown()
        hostile.server_close()


def test_a_refused_field_is_explained_with_the_servers_reason(served):
    # (A value refused on its own is refused before it is sent: exit 2.)
    done = client(served, "run", "admin/app", "--command", "true", "--name", "x" * 200)
    assert done.returncode == 2 and b"--name must be 1 to 128" in done.stderr, done.stderr
    env = {f"V{n}": "x" for n in range(100)}
    assert served.json("PATCH", "/api/v1/admin/app", {"env": env})[0] == 200
    done = client(served, "run", "admin/app", "--command", "true", "--env", "ONE_MORE=x")
    assert done.returncode == 1
    assert b"\n  env: at most 100 pairs with the project's" in done.stderr, done.stderr


@pytest.mark.parametrize("url", ["", "http://", "http://someone:s3cret@127.0.0.1:1"])
def test_a_server_url_with_no_host_or_with_a_password_is_a_usage_error(url):
    result = cli("builds", "admin/app", "--url", url, env={"BUILDSERVER_TOKEN": "abc"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "s3cret" not in result.stderr


class DroppingProxy:
    """Forwards each connection to `port`, and cuts it after `life` seconds
    (a NAT's or a proxy's idle timeout, say)."""

    def __init__(self, port, life):
        self.port, self.life = port, life
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = self.listener.getsockname()
        self.cuts = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                far = socket.create_connection(("127.0.0.1", self.port))
                for a, b in ((near, far), (far, near)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()
                threading.Timer(self.life, self._cut, (near, far)).start()

    @staticmethod
    def _pipe(source, sink):
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)

    def _cut(self, *socks):
        self.cuts += 1
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self):
        self.listener.close()


def test_a_follow_cut_again_and_again_resumes_each_time(served, monkeypatch):
    # The time to get back counted from the first cut, so the second one,
    # RECONNECT_SECONDS later, ended the follow (exit 75) though the server was there.
    # (2 s to get back: a few tries, however slow the machine; cuts 3 s apart.)
    monkeypatch.setattr(buildserver, "RECONNECT_SECONDS", 2.0)
    proxy = DroppingProxy(served.port, life=3.0)
    try:
        status, build = served.json("POST", "/api/v1/admin/app/builds", {
            "command": "i=0; while [ $i -lt 25 ]; do echo tick $i; i=$((i+1)); sleep 0.4; done"})
        out = io.BytesIO()
        client_ = buildserver.Client("http://%s:%d" % proxy.address, served.token)
        done = client_.follow(f"/api/v1/admin/app/builds/{build['id']}", out)
    finally:
        proxy.close()
    assert proxy.cuts >= 2
    assert done["last_status"] == "succeeded"
    assert out.getvalue() == b"".join(b"tick %d\n" % i for i in range(25))


class FaultyProxy:
    """Forwards connections to `port` until `mode` says to fail as a network,
    or a proxy in front, can:
    - "silent": every connection open now, and each made meanwhile, carries
      nothing more and is never closed (a NAT that forgot it, a dead link);
    - "lose answers": new connections carry their request, then close
      before any answer comes back ("lose answers late": 3 s later);
    - "cut answers": new connections close 10 bytes into their answer's body
      ("cut an answer": the next new connection alone, then `after_cut`;
      "heads only": with none of its body);
    - "refuse": every connection is closed, and each new one at once;
    - "gateway": as its server restarts behind nginx, every connection is
      closed, and each new one gets nginx's HTML 502;
    - "slow": answers on new connections come 3 s late;
    - "far": new connections, and all they carry, take 30 ms each way.
    A connection gone silent stays so when the mode changes back to "pass"."""

    GATEWAY = (b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 157"
               b"\r\nConnection: close\r\n\r\n<html>\r\n<head><title>502 Bad Gateway</title></head>"
               b"\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx"
               b"</center>\r\n</body>\r\n</html>\r\n")

    def __init__(self, port):
        self.port, self.mode, self.after_cut = port, "pass", "pass"
        self.dead = set()  # the connections gone silent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = "http://%s:%d" % self.listener.getsockname()
        self.open = []
        threading.Thread(target=self._accept, daemon=True).start()

    def set(self, mode):
        if mode == "silent":
            self.dead.update(self.open)
        self.mode = mode
        if mode in ("refuse", "gateway"):
            for sock in self.open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self):
        with contextlib.suppress(OSError):
            while True:
                near, _ = self.listener.accept()
                self.open.append(near)
                mode = self.mode
                if mode == "cut an answer":
                    mode, self.mode = "cut answers", self.after_cut
                if mode == "silent":
                    self.dead.add(near)
                    continue  # (held open, never read)
                if mode == "refuse":
                    near.close()
                    continue
                if mode == "gateway":
                    with contextlib.suppress(OSError):
                        near.recv(65536)
                        near.sendall(self.GATEWAY)
                    near.close()
                    continue
                if mode == "far":
                    time.sleep(0.03)
                far = socket.create_connection(("127.0.0.1", self.port))
                threading.Thread(target=self._pipe,  # (requests are only delayed)
                                 args=(near, far, near, "far" if mode == "far" else "pass"),
                                 daemon=True).start()
                threading.Thread(target=self._pipe, args=(far, near, near, mode),
                                 daemon=True).start()

    def _pipe(self, source, sink, near, mode="pass"):
        answer = b""  # (for the cuts: the head and the body's first bytes may come apart)
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if near in self.dead:
                    continue
                if mode.startswith("lose answers"):
                    time.sleep(3 if mode.endswith("late") else 0)
                    near.shutdown(socket.SHUT_RDWR)
                    near.close()
                    return
                if mode in ("cut answers", "heads only"):
                    answer += data
                    head, gap, body = answer.partition(b"\r\n\r\n")
                    wanted = 10 if mode == "cut answers" else 0
                    if not gap or len(body) < wanted:
                        continue  # until the head and as much of the body are in
                    sink.sendall(head + gap + body[:wanted])
                    near.shutdown(socket.SHUT_RDWR)
                    near.close()
                    return
                if mode in ("slow", "far"):
                    time.sleep(3 if mode == "slow" else 0.03)
                sink.sendall(data)

    def close(self):
        self.listener.close()
        for sock in self.open:
            with contextlib.suppress(OSError):
                sock.close()


def follow_in_a_thread(url, token, path, out, timeout=30.0):
    """Client.follow in a thread: (the thread, a list that gets its build or error)."""
    result = []

    def follow():
        try:
            result.append(buildserver.Client(url, token, timeout).follow(path, out))
        except Exception as e:  # noqa: BLE001 (the test looks at it)
            result.append(e)
    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("fault", ["silent", "gateway"])
def test_a_follow_outlasts_a_dead_link_and_a_proxys_502_and_loses_no_byte(served, fault):
    # nginx's 502 while its server restarted ended the follow at once, with
    # exit 1 and the HTML page as the reason. (A link gone silent is taken
    # for one that dropped once the client's timeout passes: 1 s here.)
    proxy = FaultyProxy(served.port)
    try:
        _, build = served.json("POST", "/api/v1/admin/app/builds", {
            "command": "echo start; sleep 3; echo end"})
        path = f"/api/v1/admin/app/builds/{build['id']}"
        out = io.BytesIO()
        thread, result = follow_in_a_thread(proxy.url, served.token, path, out, timeout=1.0)
        wait_until(lambda: out.getvalue() == b"start\n", message="the first line")
        proxy.set(fault)
        time.sleep(1.5)  # (through a fault, not around it)
        proxy.set("pass")
        thread.join(30)
        assert not thread.is_alive(), "the follow hangs"
    finally:
        proxy.close()
    assert isinstance(result[0], dict) and result[0]["last_status"] == "succeeded", result
    assert out.getvalue() == b"start\nend\n"


def test_a_follow_waits_out_a_full_follower_cap_while_its_build_runs(server_factory,
                                                                      monkeypatch):
    # The 503 of a full cap counted as an outage: after 60 s `run` exited 1,
    # "the server says (503)", while its build ran on and succeeded.
    monkeypatch.setattr(buildserver, "RECONNECT_SECONDS", 1.0)
    server = server_factory("--threads", "4", "--workers", "3")  # two may follow
    assert server.json("POST", "/api/v1/admin", {"name": "app"})[0] == 201
    builds = "/api/v1/admin/app/builds"
    holders = [f"{builds}/{server.json('POST', builds, {'command': 'sleep 30'})[1]['id']}"
               for _ in range(2)]
    _, build = server.json("POST", builds, {"command": "echo a; sleep 3; echo b"})
    url = f"http://{server.host}:{server.port}"
    held = [follow_in_a_thread(url, server.token, path, io.BytesIO()) for path in holders]

    def cap_full():
        sock = raw_request_head(server.host, server.port, "GET",
                                f"{builds}/{build['id']}/logs?follow=1",
                                {"Authorization": f"Token {server.token}"})
        try:
            return " 503 " in read_status_line(sock, time.monotonic() + 10)
        finally:
            sock.close()
    wait_until(cap_full, message="a full cap")
    out = io.BytesIO()
    thread, result = follow_in_a_thread(url, server.token, f"{builds}/{build['id']}", out)
    thread.join(30)
    for path in holders:
        server.json("POST", path + "/stop")
    for holder, _ in held:
        holder.join(30)
    assert isinstance(result[0], dict) and result[0]["last_status"] == "succeeded", result
    assert out.getvalue() == b"a\nb\n"


@pytest.mark.parametrize("fault", ["lose answers", "cut answers", "gateway"])
def test_a_create_whose_answer_is_lost_is_no_reason_to_try_again(served, fault):
    # It said "cannot reach" and exited 75 (EX_TEMPFAIL: try again): a
    # wrapper that did deployed twice. The build had been made, and ran.
    # (A proxy's 502 or 504 to a POST says as little: exit 1 was "refused".)
    proxy = FaultyProxy(served.port)
    proxy.set(fault)
    try:
        done = client(served, "run", "admin/app", "--command", "echo ran",
                      env={"BUILDSERVER_URL": proxy.url})
    finally:
        proxy.close()
    assert done.returncode == buildserver.EXIT_UNKNOWN, done
    assert b"may have been made" in done.stderr and b"builds admin/app" in done.stderr, done
    made = 0 if fault == "gateway" else 1  # (this proxy forwards nothing then)
    assert served.json("GET", "/api/v1/admin/app/builds")[1]["count"] == made


@pytest.mark.parametrize("fault", ["refuse", "gateway"])
def test_run_that_loses_the_server_while_following_says_the_build_was_made(
        served, monkeypatch, capfd, fault):
    # After 60 s it exited 75, "nothing was done: safe to try again", while
    # its build ran on; behind a proxy, whose 502 it gave up on, 1 ("refused").
    monkeypatch.setattr(buildserver, "RECONNECT_SECONDS", 1.0)
    proxy = FaultyProxy(served.port)

    def cut_once_running():
        server_wait_for_log(served, "/api/v1/admin/app/builds/1", b"up")
        proxy.set(fault)
    cutter = threading.Thread(target=cut_once_running, daemon=True)
    cutter.start()
    try:
        code = buildserver.main(["run", "admin/app", "--url", proxy.url,
                                 "--token=" + served.token, "--command", "echo up; sleep 30"])
        cutter.join(30)
    finally:
        proxy.close()
        served.json("POST", "/api/v1/admin/app/builds/1/stop")
    err = capfd.readouterr().err
    assert code == buildserver.EXIT_UNKNOWN, err
    assert "build 1 was made, and may still run" in err and "status admin/app 1" in err, err


def test_a_proxys_502_to_a_read_and_a_log_download_cut_short_are_no_success_nor_refusal(
        served):
    # `builds` behind a proxy whose server was down exited 1 ("refused"), and
    # `logs` of an answer cut short exited 0 with part of the log; then 75
    # ("nothing was done": try again) with part of it written.
    _, build = served.json("POST", "/api/v1/admin/app/builds", {"command": "seq 1 100000"})
    server_final_build(served, f"/api/v1/admin/app/builds/{build['id']}")
    whole = client(served, "logs", "admin/app", str(build["id"])).stdout
    assert whole.endswith(b"\n100000\n")
    proxy = FaultyProxy(served.port)
    try:
        for fault, args in (("gateway", ["builds", "admin/app"]),
                            ("refuse", ["logs", "admin/app", str(build["id"])])):
            proxy.set(fault)
            done = client(served, *args, env={"BUILDSERVER_URL": proxy.url})
            assert done.returncode == buildserver.EXIT_UNREACHABLE, (fault, done)
        proxy.set("heads only")  # on every try: as before, it does not try for ever
        done = client(served, "logs", "admin/app", str(build["id"]),
                      env={"BUILDSERVER_URL": proxy.url})
        assert (done.returncode, done.stdout) == (buildserver.EXIT_UNREACHABLE, b""), done
        # It resumes from the last byte received, across a server down for a while.
        proxy.after_cut = "refuse"
        proxy.set("cut an answer")
        threading.Timer(1.5, proxy.set, ["pass"]).start()
        done = client(served, "logs", "admin/app", str(build["id"]),
                      env={"BUILDSERVER_URL": proxy.url})
        assert (done.returncode, done.stdout) == (0, whole), done.stderr
    finally:
        proxy.close()


def test_a_network_error_reaches_the_terminal_without_its_control_characters():
    # What http.client quotes of a bad status line went to the terminal as it was.
    hostile = socket.create_server(("127.0.0.1", 0))

    def answer():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = hostile.accept()
                conn.recv(65536)
                conn.sendall(b"\x1b]52;c;ZWNobyBvd25lZA==\x07\x1b[2J HTTP/1.1 200 OK\r\n\r\n")
                conn.close()
    threading.Thread(target=answer, daemon=True).start()
    try:
        url = "http://127.0.0.1:%d" % hostile.getsockname()[1]
        done = cli("builds", "admin/app", "--url", url, env={"BUILDSERVER_TOKEN": "abc"})
    finally:
        hostile.close()
    assert done.returncode == buildserver.EXIT_UNREACHABLE, done
    assert not buildserver.CONTROLS.search(done.stderr.replace("\n", "")), done.stderr
    assert "<U+001B>]52" in done.stderr, done.stderr


@pytest.mark.parametrize("fault", ["slow", "lose answers late"])
def test_a_sigterm_while_the_build_is_created_says_it_may_have_been_made(served, fault):
    # A CI job cancelled while the create waited for its answer (which may
    # then be lost) ended `run` saying nothing, its build running and its id
    # unsaid. (Holding the signal until the id was known made some later
    # signals go unseen for 30 s.)
    proxy = FaultyProxy(served.port)
    proxy.set(fault)
    try:
        run = subprocess.Popen(
            [sys.executable, SCRIPT, "run", "admin/app", "--stop-on-interrupt", "--command",
             "sleep 30"], env={**os.environ, "BUILDSERVER_URL": proxy.url,
                               "BUILDSERVER_TOKEN": served.token},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: served.json("GET", "/api/v1/admin/app/builds")[1]["count"] == 1,
                       message="the build made")
            run.send_signal(signal.SIGTERM)
            _, err = run.communicate(timeout=60)
        finally:
            run.kill()
    finally:
        proxy.close()
        served.json("POST", "/api/v1/admin/app/builds/1/stop")
    assert run.returncode == 143, err
    assert b"may have been made" in err and b"builds admin/app" in err, err


def test_the_client_prints_what_a_terminal_of_another_encoding_cannot_show_escaped(served):
    # Under a Latin-1 locale, `status` and `builds` ended in a UnicodeEncodeError
    # traceback, exit 1 ("the server refused").
    assert served.json("POST", "/api/v1/admin/app/builds",
                       {"command": "true", "tags": ["d\u00eda\u2713"]})[0] == 201
    for args in (["status", "admin/app"], ["builds", "admin/app"]):
        done = client(served, *args, env={"PYTHONIOENCODING": "latin-1"})
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done
        assert b"d\xeda\\u2713" in done.stdout, done.stdout


def test_run_json_with_standard_error_closed_makes_no_build(served):
    # The log goes to standard error with --json: it made the build, then
    # exited 74 and left it running, unfollowed.
    done = client(served, "run", "admin/app", "--json", "--command", "echo hi",
                  preexec_fn=lambda: os.close(2), stderr=None)
    assert done.returncode == buildserver.EXIT_OUTPUT_FAILED, done
    assert served.json("GET", "/api/v1/admin/app/builds")[1]["count"] == 0


def test_run_says_why_a_build_did_not_succeed(served):
    # It said "build 1: failed", and a CI log never told of the timeout.
    done = client(served, "run", "admin/app", "--timeout", "1", "--command", "sleep 5")
    assert done.returncode == 1, done
    assert done.stderr.decode().rstrip().endswith("build 1: failed (timed out after 1 s)"), done


def test_a_client_throttled_for_its_bad_tokens_exits_as_refused(server_factory):
    server = server_factory("--auth-burst", "2")
    codes = [client(server, "builds", "admin/app", token="not-a-token").returncode
             for _ in range(4)]
    assert codes == [buildserver.EXIT_REFUSED] * 4, codes  # 401, 401, then 429s


def test_run_interrupted_without_a_terminal_says_the_build_runs_on_and_how_to_stop_it(
        served):
    # Ctrl-C (SIGINT) with no terminal to ask on leaves the build running:
    # it said nothing, and the build's id had scrolled away. Then the command
    # it said could not be pasted: the file is no program (Permission denied),
    # and the server named by --url was left out.
    env = {**os.environ, "BUILDSERVER_TOKEN": served.token}
    env.pop("BUILDSERVER_URL", None)
    run = subprocess.Popen([sys.executable, SCRIPT, "run", "admin/app", "--url",
                            f"http://{served.host}:{served.port}", "--command",
                            "echo up; sleep 30"], env=env, stderr=subprocess.PIPE)
    try:
        server_wait_for_log(served, "/api/v1/admin/app/builds/1", b"up")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
        assert run.returncode == buildserver.EXIT_INTERRUPTED, err
        said = err.decode().strip().splitlines()[-1]
        assert said.startswith("build 1 runs on; stop it with: "), err
        pasted = subprocess.run(said.split(": ", 1)[1], shell=True, env=env, cwd=HERE,
                                capture_output=True, timeout=60)
        assert pasted.returncode == 0, pasted.stderr
        assert served.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"] in (
            "stopping", "stopped")
    finally:
        run.kill()
        served.json("POST", "/api/v1/admin/app/builds/1/stop")


def test_https_to_the_plain_http_port_is_refused_at_once_with_a_hint(served):
    # The server waited for a request head that a TLS handshake never ends,
    # and the client for its handshake: 30 s, then "The handshake operation
    # timed out".
    done = client(served, "builds", "admin/app", "--url",
                  f"https://{served.host}:{served.port}")
    assert done.returncode == buildserver.EXIT_UNREACHABLE
    assert b"(is it a plain http:// server?)" in done.stderr, done.stderr
    assert served.json("GET", "/api/v1/health")[0] == 200  # (it serves on)


@pytest.mark.parametrize("executable", [False, True])
def test_runs_hint_can_be_pasted_where_it_was_run_as_python3_buildserver_py(served, tmp_path,
                                                                            executable):
    # Run as `python3 buildserver.py` with the file executable, it said
    # `buildserver.py stop ...`: "not found", as no folder on PATH holds it.
    shutil.copy(SCRIPT, tmp_path / "buildserver.py")
    shutil.copy(os.path.join(HERE, "schema.sql"), tmp_path / "schema.sql")
    os.chmod(tmp_path / "buildserver.py", 0o755 if executable else 0o644)
    env = {**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
           "BUILDSERVER_TOKEN": served.token}
    run = subprocess.Popen([sys.executable, "buildserver.py", "run", "admin/app", "--command",
                            "echo up; sleep 30"], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
    try:
        server_wait_for_log(served, "/api/v1/admin/app/builds/1", b"up")
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=60)
        said = err.decode().strip().splitlines()[-1]
        assert said.startswith("build 1 runs on; stop it with: python3 buildserver.py stop"), err
        pasted = subprocess.run(said.split(": ", 1)[1], shell=True, env=env, cwd=tmp_path,
                                capture_output=True, timeout=60)
        assert pasted.returncode == 0, pasted.stderr
    finally:
        run.kill()
        served.json("POST", "/api/v1/admin/app/builds/1/stop")


def test_a_client_option_that_is_no_utf8_is_a_wrong_command_line(served):
    # `builds --status` ended in a traceback (UnicodeEncodeError), exit 1.
    done = client(served, "builds", "admin/app", "--status", b"f\xff")
    assert done.returncode == 2, done.stderr
    assert done.stderr == b"buildserver: --status holds bytes that are no UTF-8 text\n"


def test_run_whose_token_is_replaced_while_it_follows_says_the_build_was_made(served):
    # It said only the server's 401: a wrapper that tries again on 77 would
    # have run the build (a deploy) twice.
    go = os.path.join(served.data_dir, "workspaces", "admin", "app", "1", "go")
    run = start_client(served, "run", "admin/app", "--command",
                       "echo up; while [ ! -e go ]; do sleep 0.05; done")
    try:
        server_wait_for_log(served, "/api/v1/admin/app/builds/1", b"up")
        replaced = run_cli("token", "admin", "--data-dir", served.data_dir)
        assert replaced.returncode == 0, replaced.stderr
        open(go, "w").close()
        _, err = run.communicate(timeout=60)
        assert run.returncode == buildserver.EXIT_REFUSED, err
        assert b"(401)" in err and b"build 1 was made, and may still run" in err, err
    finally:
        run.kill()


def without_output(stdout, *args):
    """`python buildserver.py ARGS` whose standard output is a full disk, or closed."""
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, SCRIPT, *args], text=True, timeout=60,
                              stdout=full if stdout == "full" else None, stderr=subprocess.PIPE,
                              preexec_fn=None if stdout == "full" else lambda: os.close(1))


@pytest.mark.parametrize("stdout, says", [("full", "No space left on device"),
                                          ("closed", "standard output is closed")])
def test_a_first_start_that_cannot_show_the_token_makes_no_admin(tmp_path, stdout, says):
    # The admin was made, and its token lost: later starts printed none.
    data_dir = tmp_path / "fresh"
    done = without_output(stdout, "serve", "--port", "0", "--data-dir", str(data_dir))
    assert done.returncode == buildserver.EXIT_OUTPUT_FAILED and says in done.stderr, done.stderr
    server = Server(data_dir).start()
    try:
        assert server.token and server.json("GET", "/api/v1/admin")[0] == 200
    finally:
        server.stop()


def test_a_host_name_with_two_addresses_is_served_on_its_ipv4_one(tmp_path):
    # localhost as ::1 and 127.0.0.1 (Debian's /etc/hosts): waitress made a
    # server of another kind, and the start ended in a traceback.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    if subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts"],
                      capture_output=True).returncode != 0:
        pytest.skip("needs unshare -m (root) to give localhost two addresses")
    data_dir = tmp_path / "d"
    proc = subprocess.Popen(
        ["unshare", "-m", "sh", "-c", f"mount --bind {hosts} /etc/hosts && exec "
         f"{shlex.quote(sys.executable)} {SCRIPT} --host localhost --port 0 --data-dir {data_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [read_within(proc, proc.stdout.readline) for _ in range(2)]
        assert "listening on http://127.0.0.1:" in lines[1], (lines, proc.stderr.read())
        port = int(lines[1].rsplit(":", 1)[1].strip().rstrip("/"))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


@pytest.mark.parametrize("stdout", ["full", "closed"])
def test_adduser_and_token_that_cannot_show_the_token_make_none(tmp_path, stdout):
    # adduser made a user nobody could sign in as; token made the old token stop working.
    data = str(tmp_path / "d")
    old = cli("adduser", "carol", "--data-dir", data).stdout.strip().splitlines()[-1]
    for args in (["adduser", "dave"], ["token", "carol"]):
        done = without_output(stdout, *args, "--data-dir", data)
        assert done.returncode == buildserver.EXIT_OUTPUT_FAILED, done.stderr
        assert "cannot show the token" in done.stderr
    db = buildserver.Database(os.path.join(data, "buildserver.db"))
    try:
        store = buildserver.Store(db)
        assert store.user_by_name("dave") is None
        assert store.user_by_token(old)["name"] == "carol"  # still the one that works
    finally:
        db.close()


def test_a_token_that_waits_to_be_printed_holds_up_no_write_of_the_server(server_factory,
                                                                           tmp_path):
    # adduser printed inside its write transaction: with its terminal paused
    # (Ctrl-S) or its pipe full, every write of the running server waited, and
    # failed with 503 "database is locked" after 30 s.
    server = server_factory(data_dir=tmp_path / "d")
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    with contextlib.suppress(BlockingIOError):
        while True:  # full: the next write blocks
            os.write(write_end, b"x" * 65536)
    os.set_blocking(write_end, True)
    adding = subprocess.Popen([sys.executable, SCRIPT, "adduser", "dave", "--data-dir",
                               server.data_dir], stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    try:
        deadline = time.monotonic() + 5  # (a kernel that hides wchan: 5 s is past the print)
        while time.monotonic() < deadline and "pipe_write" not in buildserver._read(
                f"/proc/{adding.pid}/wchan").decode():
            time.sleep(0.05)
        assert adding.poll() is None
        status, _ = server.json("POST", "/api/v1/admin", {"name": "meanwhile"}, timeout=10)
        assert status == 201
    finally:
        with os.fdopen(read_end, "rb") as reader:
            shown = read_within(adding, reader.read)
        assert adding.wait(30) == 0, adding.stderr.read()
    token = shown.strip().splitlines()[-1].decode()
    assert server.json("GET", "/api/v1/users", token=token) == (200, {
        "username": "dave", "is_admin": False, "email": None, "is_superuser": False})


def test_the_file_holds_nothing_that_an_older_or_newer_python_it_runs_on_refuses():
    # Python 3.13 encodes docstrings as UTF-8 when it compiles: one holding a
    # lone surrogate ("\\ud800") kept the file from compiling at all. And the
    # sqlite3 module names SQLite's result codes from 3.11 on: on 3.9 and 3.10
    # every database error became an AttributeError (a worker thread died).
    tree = ast.parse(open(SCRIPT, encoding="utf-8").read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value.encode("utf-8")  # (raises on a lone surrogate)
    used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id == "sqlite3"}
    assert not {name for name in used if name.startswith("SQLITE_")}, used
    others = [shutil.which(f"python3.{minor}") for minor in (9, 10, 12, 13)] + [
        python for python in glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3"))
        if int(python.split("/versions/3.")[1].split(".")[0]) >= 9]  # those here, from 3.9
    for python in filter(None, others):
        if subprocess.run([python, "-c", "pass"], capture_output=True).returncode == 0:
            done = subprocess.run([python, "-c", f"import sys; sys.path.insert(0, {HERE!r}); "
                                   "import buildserver"], capture_output=True, text=True,
                                  timeout=60)
            assert done.returncode == 0, (python, done.stderr)


def test_the_help_says_that_serve_is_the_default_command():
    assert "is `buildserver.py serve --port 9000`" in cli("--help").stdout.replace("\n", " ")


def test_run_help_lists_every_exit_code_the_client_has():
    shown = cli("run", "--help").stdout
    codes = {value for name, value in vars(buildserver).items() if name.startswith("EXIT_")}
    assert codes and all(re.search(rf"^  (\S+, )?{code}\b", shown, re.M) for code in codes), shown


def test_follow_survives_a_server_restart_without_losing_or_repeating_output(tmp_path):
    data_dir = tmp_path / "restarted"
    first = Server(data_dir, "--stop-grace", "1").start()
    try:
        first.json("POST", "/api/v1/admin", {"name": "app"})
        command = "i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"
        proc = start_client(first, "run", "admin/app", "--command", command)
        assert read_within(proc, proc.stdout.readline) == b"line 0\n"
        first.proc.kill()  # kill -9 mid-build
        first.proc.wait(10)
        second = Server(data_dir, "--port", str(first.port)).start()
        second.token = first.token
        try:
            out, err = proc.communicate(timeout=60)
            build = server_final_build(second, "/api/v1/admin/app/builds/1")
            assert build["last_status"] == "failed"
            assert build["log_size"] > len("line 0\n")
            status, _, stored = second.request("GET", "/api/v1/admin/app/builds/1/logs")
            assert b"line 0\n" + out == stored  # every stored byte once, in order
            assert proc.returncode == 1
        finally:
            second.stop()
    finally:
        first.stop()


def test_follow_waiting_between_chunks_survives_a_server_restart(tmp_path):
    # Killed while the client waits for the next chunk, the server's socket
    # ends cleanly mid-answer: http.client raises IncompleteRead, which the
    # client must take as a dropped connection like any other.
    data_dir = tmp_path / "restarted"
    first = Server(data_dir, "--stop-grace", "1").start()
    try:
        first.json("POST", "/api/v1/admin", {"name": "app"})
        proc = start_client(first, "run", "admin/app", "--command", "echo started; sleep 60")
        assert read_within(proc, proc.stdout.readline) == b"started\n"
        time.sleep(0.5)  # the client is idle, waiting for the next chunk
        first.proc.kill()
        first.proc.wait(10)
        second = Server(data_dir, "--port", str(first.port)).start()
        second.token = first.token
        try:
            out, err = proc.communicate(timeout=60)
            assert b"Traceback" not in err, err.decode()
            assert proc.returncode == 1, err.decode()
            assert b"failed" in err and out == b"", (out, err)
        finally:
            second.stop()
    finally:
        first.stop()


def test_the_client_works_without_bottle_or_waitress(served):
    blocker = ("import runpy, sys; sys.modules['bottle'] = None; sys.modules['waitress'] = None;"
               f" sys.argv = [{SCRIPT!r}] + sys.argv[1:]; runpy.run_path({SCRIPT!r}, run_name='__main__')")
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{served.host}:{served.port}",
               "BUILDSERVER_TOKEN": served.token}
    result = subprocess.run([sys.executable, "-c", blocker, "run", "admin/app", "--command",
                             "echo standalone"], env=environ, capture_output=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, b"standalone\n"), result.stderr
    served_only = subprocess.run([sys.executable, "-c", blocker, "serve"], env=environ,
                                 capture_output=True, timeout=60)
    assert served_only.returncode == 1 and b"needs bottle and waitress" in served_only.stderr

###############################################################################
# Robustness ##################################################################
###############################################################################
# What the contract promises when things go wrong: who may do what (the full
# authorization matrix, taken from the routing table), the abuse limits (413,
# 429), many clients at once, `kill -9` of the server, unusable data folders
# and database files, migrations and online backups.

# Robustness: helpers --------------------------------------------------------

def db_dump(path):
    """Every row of the SQLite file at `path`, as SQL text (schema included)."""
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


class RowWatch:
    """Whether the rows of a SQLite file changed since the last look. The dump
    is compared only when PRAGMA data_version says another connection committed."""

    def __init__(self, path):
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.version = self._version()
        self.dump = db_dump(path)

    def _version(self):
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def changed(self):
        """Whether a row changed since the last call; the new state is then the reference."""
        version = self._version()
        if version == self.version:
            return False
        dump = db_dump(self.path)
        changed, self.version, self.dump = dump != self.dump, version, dump
        return changed

    def close(self):
        self.conn.close()


def integrity(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def user_version(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


def schema_migrations():
    """{number: sql} of schema.sql's `-- migration N` sections."""
    with open(buildserver.SCHEMA_PATH, encoding="utf-8") as f:
        parts = re.split(r"^-- migration (\d+)\s*$", f.read(), flags=re.M)
    return {int(n): sql for n, sql in zip(parts[1::2], parts[2::2])}


@pytest.mark.parametrize("release", ["older", "newer"])
def test_a_schema_sql_of_another_release_is_named_as_the_file_to_replace(tmp_path, release):
    # An upgrade that copied buildserver.py alone: "no such table:
    # server_process", or "written by a newer buildserver" about its own file.
    data = tmp_path / "data"
    assert run_cli("adduser", "carol", "--data-dir", str(data)).returncode == 0
    before = (data / "buildserver.db").read_bytes()
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(SCRIPT, copy / "buildserver.py")
    newest = max(schema_migrations())
    with open(buildserver.SCHEMA_PATH, encoding="utf-8") as f:
        schema = f.read()
    if release == "older":
        schema = schema[:schema.index(f"-- migration {newest}\n")]
    else:
        schema += f"\n-- migration {newest + 1}\nCREATE TABLE later (id INTEGER);\n"
    (copy / "schema.sql").write_text(schema, encoding="utf-8")
    for args in (["serve", "--port", "0"], ["adduser", "dave"], ["token", "carol"]):
        done = subprocess.run([sys.executable, str(copy / "buildserver.py"), *args,
                               "--data-dir", str(data)], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 1, (args, done.stderr)
        assert done.stderr == (f"buildserver: {copy / 'schema.sql'} is from another release "
                               f"than buildserver.py (its newest migration is "
                               f"{newest - 1 if release == 'older' else newest + 1}, "
                               f"buildserver.py's is {newest}): copy buildserver.py and "
                               "schema.sql together\n"), args
    assert (data / "buildserver.db").read_bytes() == before
    fresh = tmp_path / "fresh"
    done = subprocess.run([sys.executable, str(copy / "buildserver.py"), "adduser", "erin",
                           "--data-dir", str(fresh)], capture_output=True, timeout=60)
    assert done.returncode == 1 and not (fresh / "buildserver.db").exists(), done.stderr


def run_cli(*args, timeout=30):
    """`python buildserver.py ARGS`; the CompletedProcess, text mode."""
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=timeout)


def add_user(data_dir, name, *flags):
    """A new user made by the `adduser` command; returns its token."""
    done = run_cli("adduser", name, *flags, "--data-dir", str(data_dir))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def api(server, method, path, body=None, token=None, headers=None, timeout=30):
    """(status, parsed JSON or raw bytes) of one request to a real server."""
    status, _, data = server.request(method, path, body, token=token, headers=headers,
                                     timeout=timeout)
    try:
        return status, json.loads(data)
    except ValueError:
        return status, data


def all_builds(server, project_path, token=None):
    """Every build of a project, following the pages."""
    builds, offset = [], 0
    while True:
        status, page = api(server, "GET", f"{project_path}/builds?limit=1000&offset={offset}",
                           token=token)
        assert status == 200, page
        builds += page["results"]
        offset += 1000
        if page["next"] is None:
            return builds


def check_history(server, build_path, token=None):
    """Assert that a build's status history is a path through the status machine."""
    status, page = api(server, "GET", f"{build_path}/statuses?limit=1000", token=token)
    assert status == 200, page
    names = [entry["status"] for entry in page["results"]]
    assert names and names[0] == "created", (build_path, names)
    for before, after in zip(names, names[1:]):
        assert after in buildserver.TRANSITIONS[before], (build_path, names)
    assert [entry["id"] for entry in page["results"]] == list(range(1, len(names) + 1))
    return page["results"]


def raw_request_head(host, port, method, path, headers, first_bytes=b""):
    """Open a socket and send a request's head and the first bytes of its body."""
    sock = socket.create_connection((host, port), timeout=10)
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sock.sendall(head.encode("latin-1") + first_bytes)
    return sock


def read_status_line(sock, deadline):
    """The first line of the answer, waiting until `deadline` (monotonic) at most."""
    received = b""
    while b"\r\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("no answer before the deadline: the server waits for the body")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        if not chunk:
            break
        received += chunk
    return received.split(b"\r\n", 1)[0].decode("latin-1")


@pytest.mark.parametrize("head", [
    b"POST /api/v1/admin HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"GET /api/v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /api/v1/admin HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
], ids=["bad Content-Length", "raw non-ASCII path", "unknown transfer coding"])
def test_requests_waitress_refuses_get_the_json_error_shape_too(server_factory, head):
    server = server_factory()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(head)
    answer = b""
    while chunk := sock.recv(65536):  # waitress closes the connection after it
        answer += chunk
    sock.close()
    head_part, body = answer.split(b"\r\n\r\n", 1)
    assert head_part.split(b" ", 2)[1] in (b"400", b"501"), answer
    assert b"Content-Type: application/json" in head_part, answer
    detail = json.loads(body)["detail"]
    assert isinstance(detail, str) and detail.strip()


def server_errors(server):
    """Lines of a real server's log that betray a bug (a traceback, a 500)."""
    lines = list(server.stderr_lines)
    # Each with the lines after it: a failure shows the whole traceback.
    return ["".join(lines[i:i + 25]) for i, line in enumerate(lines)
            if "Traceback" in line or "internal error" in line or "database is locked" in line]


# Authorization matrix -------------------------------------------------------
# Every route of the routing table, with every kind of credential, against
# existing and missing resources. Refused requests must leave the database
# exactly as it was.

def is_public(path):
    """Health, the API's description and the pages outside the API (the
    dashboard's shell, which asks for the token in the browser) need no token."""
    return path in ("/api/v1/health", "/api/v1/openapi.json") or not path.startswith("/api/")


REFUSED_KINDS = ("none", "malformed", "unknown", "revoked")
EXISTING = {"username": "alice", "project_name": "app", "build_id": "1", "status_id": "1"}
MISSING = {"username": ["nobody"], "project_name": ["nothere"], "build_id": ["999", "abc"],
           "status_id": ["99", "0123456789abcdef0123456789abcdef"]}


def request_body(route, serial):
    """A body that the route would accept: a refusal is then about access alone."""
    if route.method not in ("POST", "PATCH"):
        return None, {}
    json_type = {"Content-Type": "application/json"}
    if route.path.endswith("/logs"):
        return b"some output\n", {"Content-Type": "text/plain"}
    if route.path.endswith("/statuses"):
        return json.dumps({"status": "running"}).encode(), json_type
    if route.path.endswith("/builds"):
        return json.dumps({"is_managed": False, "command": "true"}).encode(), json_type
    if route.path == "/api/v1/<username>":
        return json.dumps({"name": f"made-{serial}"}).encode(), json_type
    if route.path == "/api/v1/<username>/<project_name>":
        return json.dumps({"description": "changed"}).encode(), json_type
    if route.path.endswith("/<build_id>") and route.method == "PATCH":
        return json.dumps({"name": "renamed", "tags": ["x"]}).encode(), json_type
    return None, {}  # stop, restart: no body


def expected_status(route, params, kind):
    """What SPEC.md's "Authentication and access" says the answer must be."""
    if is_public(route.path):
        return route.answer[0]
    if kind in REFUSED_KINDS:
        return 401
    if "username" not in params:  # /api/v1/users: any valid token
        return route.answer[0]
    if kind == "foreign" or (kind == "owner" and params["username"] != "alice"):
        return 403  # before existence
    missing = any(params[name] != EXISTING[name] for name in params)
    return 404 if missing else route.answer[0]


@pytest.fixture
def open_app(tmp_path):
    """An app whose runner starts nothing and which never throttles failed auths."""
    application = buildserver.make_app(buildserver.Config(
        data_dir=str(tmp_path / "data"), workers=0, auth_burst=0))
    yield application
    application.close()


def test_every_route_answers_401_403_404_exactly_as_the_spec_says_and_refusals_change_nothing(
        open_app, request):
    web = webtest.TestApp(open_app)
    store = open_app.store
    admin = store.create_user("root", is_admin=True)
    revoked = store.create_user("alice")
    alice = store.new_token(store.user_by_name("alice")["id"])
    bob = store.create_user("bob")
    tokens = (admin, revoked, alice, bob)

    def make_project(name):
        """alice/<name> with an unmanaged build 1 (its status 1 is `created`)."""
        web.post_json("/api/v1/alice", {"name": name, "command": "true"},
                      headers={"Authorization": f"Token {admin}"})
        web.post_json(f"/api/v1/alice/{name}/builds", {"is_managed": False},
                      headers={"Authorization": f"Token {admin}"})
    make_project("app")

    credentials = [
        ("none", None),
        ("malformed", "Basic YWxpY2U6c2VjcmV0"),
        ("malformed", "Token"),
        ("malformed", f"Token {alice} extra"),
        ("malformed", "Token\u00e9"),
        ("unknown", f"Token {secrets.token_urlsafe(32)}"),
        ("revoked", f"Token {revoked}"),
        ("foreign", f"Token {bob}"),
        ("owner", f'token "{alice}"'),  # the spec's other spellings, too
        ("admin", f"Bearer {admin}"),
    ]
    routes = buildserver.ROUTES
    assert len(routes) >= 21
    watch = RowWatch(open_app.config.db_path)
    request.addfinalizer(watch.close)
    failures, forbidden_bodies, serial = [], {}, 0

    for route in routes:
        names = re.findall(r"<(\w+)>", route.path)
        fillings = [{n: EXISTING[n] for n in names}]
        for name in names:
            fillings += [{**fillings[0], name: value} for value in MISSING[name]]
        for params in fillings:
            for kind, header in credentials:
                for slash in ("", "/"):
                    serial += 1
                    expected = expected_status(route, params, kind)
                    filled = params
                    if expected < 300 and "project_name" in params:
                        # A success changes things: give it a project of its own.
                        filled = {**params, "project_name": f"fresh-{serial}"}
                        make_project(filled["project_name"])
                    path = re.sub(r"<(\w+)>", lambda m: filled[m.group(1)], route.path) + slash
                    body, headers = request_body(route, serial)
                    if header is not None:
                        headers = {**headers, "Authorization": header}
                    resp = web.request(path, method=route.method, headers=headers, body=body,
                                       expect_errors=True)
                    where = f"{route.method} {path} with {kind} token {header!r}"
                    if resp.status_int != expected:
                        failures.append(f"{where}: {resp.status_int}, expected {expected}: "
                                        f"{resp.body[:200]!r}")
                    if any(token in resp.text for token in tokens) or any(
                            token in value for token in tokens for value in resp.headers.values()):
                        failures.append(f"{where}: a token appears in the answer")
                    if resp.status_int >= 400:
                        if resp.content_type != "application/json" or not isinstance(
                                resp.json.get("detail"), str):
                            failures.append(f"{where}: not a JSON error: {resp.body[:200]!r}")
                    if resp.status_int == 401 and resp.headers.get("WWW-Authenticate") != "Token":
                        failures.append(f"{where}: 401 without WWW-Authenticate: Token")
                    if resp.status_int == 403:
                        forbidden_bodies.setdefault((route.method, route.path, kind), set()).add(
                            resp.body)
                    if watch.changed() and resp.status_int >= 300:
                        failures.append(f"{where}: refused with {resp.status_int} but the "
                                        "database changed")

    # A 403 never tells whether the thing exists: one body per route, whatever the ids.
    for route, bodies in forbidden_bodies.items():
        if len(bodies) != 1:
            failures.append(f"{route}: 403 answers differ with existence: {sorted(bodies)}")
    assert not failures, f"{len(failures)} deviations:\n" + "\n".join(failures[:40])


def test_methods_a_path_does_not_have_get_405_and_change_nothing(open_app):
    web = webtest.TestApp(open_app)
    admin = open_app.store.create_user("root", is_admin=True)
    web.post_json("/api/v1/root", {"name": "app", "command": "true"},
                  headers={"Authorization": f"Token {admin}"})
    web.post_json("/api/v1/root/app/builds", {"is_managed": False},
                  headers={"Authorization": f"Token {admin}"})
    routes = buildserver.ROUTES
    patterns = [(route.method, re.compile("^" + re.sub(r"<\w+>", "[^/]+", route.path) + "$"))
                for route in routes]
    fill = {"username": "root", "project_name": "app", "build_id": "1", "status_id": "1"}
    before = db_dump(open_app.config.db_path)
    failures = []
    for path in sorted({re.sub(r"<(\w+)>", lambda m: fill[m.group(1)], r.path) for r in routes}):
        served = {method for method, pattern in patterns if pattern.match(path)}
        for method in sorted({"GET", "POST", "PATCH", "DELETE", "PUT"} - served):
            for header in ({"Authorization": f"Token {admin}"}, {}):
                resp = web.request(path, method=method, headers=header, body=b"{}",
                                   expect_errors=True)
                if header and resp.status_int != 405 or resp.status_int not in (401, 405):
                    failures.append(f"{method} {path} {header and 'admin'}: {resp.status_int}")
                elif not isinstance(resp.json.get("detail"), str):
                    failures.append(f"{method} {path}: not a JSON error")
    assert not failures, failures
    assert db_dump(open_app.config.db_path) == before


# Abuse limits ---------------------------------------------------------------

def serving_admin_app_build_1(server_factory):
    """A server with admin/app and its unmanaged build 1; (server, its
    database's path, the database's rows)."""
    server = server_factory()
    db_path = os.path.join(server.data_dir, "buildserver.db")
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
    return server, db_path, db_dump(db_path)


def test_a_huge_content_length_gets_413_before_the_body_is_sent(server_factory):
    server, db_path, before = serving_admin_app_build_1(server_factory)
    for path, content_type in (("/api/v1/admin", "application/json"),
                               ("/api/v1/admin/app/builds", "application/json"),
                               ("/api/v1/admin/app/builds/1/logs", "text/plain")):
        sock = raw_request_head(server.host, server.port, "POST", path, {
            "Authorization": f"Token {server.token}", "Content-Type": content_type,
            "Content-Length": str(10 ** 12)}, b'{"name": "x')
        try:
            assert " 413 " in read_status_line(sock, time.monotonic() + 10)
        finally:
            sock.close()
    assert db_dump(db_path) == before
    assert api(server, "GET", "/api/v1/health", token="") == (200, {"status": "ok"})


def test_a_content_length_past_4300_digits_gets_an_answer(server_factory):
    # waitress's int() of it raised: the connection was dropped with no answer
    # and a traceback logged, for anyone, without a token.
    server = server_factory()
    sock = raw_request_head(server.host, server.port, "POST", "/api/v1/admin", {
        "Content-Type": "application/json", "Content-Length": "1" * 4301})
    try:
        assert " 400 " in read_status_line(sock, time.monotonic() + 10)
    finally:
        sock.close()
    assert api(server, "GET", "/api/v1/health", token="") == (200, {"status": "ok"})
    server.stop()
    assert not [line for line in server.stderr_lines if "ERROR" in line or "Traceback" in line]


def test_a_content_length_just_over_the_limits_gets_413_before_the_body_is_sent(server_factory):
    server = server_factory()
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
    sockets = [raw_request_head(server.host, server.port, "POST", path, {
        "Authorization": f"Token {server.token}", "Content-Type": content_type,
        "Content-Length": str(length)}, b'{"na')
        for path, content_type, length in (
            ("/api/v1/admin", "application/json", buildserver.JSON_BODY_LIMIT + 1),
            ("/api/v1/admin/app/builds/1/logs", "text/plain", buildserver.LOG_BODY_LIMIT + 1))]
    try:
        # A server that checks the header answers at once; one that waits for
        # the body never answers at all.
        deadline = time.monotonic() + 15
        for sock in sockets:
            assert " 413 " in read_status_line(sock, deadline)
    finally:
        for sock in sockets:
            sock.close()


def test_a_body_over_the_limit_sent_after_100_continue_is_413_not_a_bad_request(server_factory):
    # curl asks "Expect: 100-continue" above 1 MiB: the server must refuse at
    # once, not invite the body and then parse it as the next request's head.
    server = server_factory()
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    db_path = os.path.join(server.data_dir, "buildserver.db")
    before = db_dump(db_path)
    sock = raw_request_head(server.host, server.port, "POST", "/api/v1/admin", {
        "Authorization": f"Token {server.token}", "Content-Type": "application/json",
        "Expect": "100-continue", "Content-Length": str(buildserver.JSON_BODY_LIMIT + 1)}, b"")
    try:
        head = read_status_line(sock, time.monotonic() + 10)
        assert " 413 " in head, head
        sock.sendall(b"X-Body: " + b"a" * 1000 + b"\r\n\r\n")  # what a client that got 100 sends
        sock.settimeout(10)
        rest = b""
        with contextlib.suppress(ConnectionError):
            while data := sock.recv(65536):
                rest += data
        assert b"HTTP/1.1" not in rest  # no second answer: the body is never parsed
    finally:
        sock.close()
    assert db_dump(db_path) == before


def test_a_request_without_a_body_that_expects_100_continue_is_answered_and_ends(
        server_factory):
    # waitress invited a body that never came and waited; the connection's
    # next request then got this one's headers added to its own: a bookmark
    # sent without a token was made with the earlier request's.
    server = server_factory()
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    status, build = api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
    sock = raw_request_head(server.host, server.port, "GET", "/api/v1/health", {
        "Authorization": f"Token {server.token}", "Expect": "100-continue"})
    try:
        first = http.client.HTTPResponse(sock)  # (which passes over a 100 Continue)
        first.begin()
        assert (first.status, json.loads(first.read())) == (200, {"status": "ok"})
        sock.sendall(f"POST /api/v1/admin/app/builds/{build['id']}/bookmark HTTP/1.1\r\n"
                     f"Host: x\r\nContent-Length: 0\r\n\r\n".encode())
        second = http.client.HTTPResponse(sock)
        second.begin()
        assert second.status == 401, second.read()
    finally:
        sock.close()
    assert api(server, "GET", f"/api/v1/admin/app/builds/{build['id']}")[1]["bookmarked"] is False


def test_the_unread_body_of_a_413_is_never_taken_for_requests(server_factory):
    server = server_factory()
    smuggled = b"DELETE /api/v1/admin/app HTTP/1.1\r\nHost: x\r\nAuthorization: Token " + \
        server.token.encode() + b"\r\nContent-Length: 0\r\n\r\n"
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    sock = raw_request_head(server.host, server.port, "POST", "/api/v1/admin", {
        "Authorization": f"Token {server.token}", "Content-Type": "application/json",
        "Content-Length": str(buildserver.JSON_BODY_LIMIT + 1)}, smuggled)
    try:
        assert " 413 " in read_status_line(sock, time.monotonic() + 10)
        sock.settimeout(10)
        answers = b""
        while True:  # the server closes the connection after the 413
            data = sock.recv(65536)
            if not data:
                break
            answers += data
        assert b"HTTP/1.1" not in answers  # no second answer
    finally:
        sock.close()
    assert api(server, "GET", "/api/v1/admin/app")[0] == 200  # not deleted


def test_a_client_that_sends_its_whole_body_first_still_reads_the_413(server_factory):
    # Python's http.client (and requests) send the body before reading: a
    # server that closed with the body unread reset the connection, and the
    # client saw ConnectionResetError or BrokenPipeError instead of the 413.
    server, db_path, before = serving_admin_app_build_1(server_factory)
    logs = "/api/v1/admin/app/builds/1/logs"
    for path, body, detail in ((logs, b"x" * (buildserver.LOG_BODY_LIMIT + 1), "larger than"),
                               ("/api/v1/admin", b" " * (5 * MiB), "larger than"),
                               (logs, b"x" * (20 * MiB), "exceeds max_body")):  # waitress's own
        for _ in range(3):
            status, _, data = server.request("POST", path, body,
                                             headers={"Content-Type": "text/plain"})
            assert status == 413, (path, status, data[:200])
            assert detail in json.loads(data)["detail"]
    assert db_dump(db_path) == before
    assert api(server, "GET", "/api/v1/admin/app")[0] == 200


def test_a_path_with_an_encoded_slash_is_400_and_never_reaches_another_resource(server_factory):
    # The server decodes %2F before routing: app%2Fbuilds%2F1 reached build 1 of app.
    server, db_path, before = serving_admin_app_build_1(server_factory)
    for method, path in (("DELETE", "/api/v1/admin/app%2Fbuilds%2F1"),
                         ("GET", "/api/v1/admin%2fapp"), ("GET", "/api/v1/admin/app%2Fbuilds")):
        status, body = server.json(method, path)
        assert (status, body["detail"]) == (
            400, "The path holds an encoded slash (%2F); no name has one."), (method, path)
    assert db_dump(db_path) == before
    assert server.json("GET", "/api/v1/admin/app/builds?name=a%2Fb")[0] == 200  # a query may


def test_answers_refused_before_routing_or_by_waitress_say_nosniff_too(server_factory):
    server, db_path, before = serving_admin_app_build_1(server_factory)
    logs = "/api/v1/admin/app/builds/1/logs"
    for method, path, body, headers, status in (
            ("GET", "/api/v1/admin%2Fapp", None, {}, 400),  # refused before routing
            ("GET", "/api/v1/admin/%FF", None, {}, 400),
            ("POST", logs, b"x" * (20 * MiB), {"Content-Type": "text/plain"}, 413),  # waitress's
            ("GET", "/api/v1/admin", None, {"X-Big": "x" * (300 * 1024)}, 431)):
        answer_status, answer_headers, data = server.request(method, path, body, headers=headers)
        assert answer_status == status, (path, data[:200])
        assert answer_headers.get("X-Content-Type-Options") == "nosniff", (path, answer_headers)
    assert db_dump(db_path) == before


@pytest.mark.parametrize("host_line", [b"", b"Host: a b\r\n", b"Host: x\r\nHost: y\r\n"])
def test_page_links_without_a_usable_host_name_the_address_the_client_reached(
        server_factory, host_line):
    # They named waitress's placeholder, http://waitress.invalid:PORT/...
    server = server_factory()
    for name in ("one", "two"):
        assert server.json("POST", "/api/v1/admin", {"name": name})[0] == 201
    sock = socket.create_connection((server.host, server.port), timeout=10)
    try:
        sock.sendall(b"GET /api/v1/admin?limit=1 HTTP/1.0\r\n" + host_line +
                     f"Authorization: Token {server.token}\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    finally:
        sock.close()
    page = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert page["next"] == f"http://{server.host}:{server.port}/api/v1/admin?limit=1&offset=1"


@pytest.mark.parametrize("first", [
    b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n",
    # RFC 9112, 6.1: HTTP/1.0 has no chunks; waitress reads it by its length.
    b"GET /api/v1/health HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n"])
def test_a_request_framed_both_by_length_and_by_chunks_ends_its_connection(server_factory,
                                                                           first):
    # RFC 9112, 6.3: a proxy that framed it by its Content-Length would take
    # what follows the chunks for the body, and the server for a request of its own.
    server = server_factory()
    assert server.json("POST", "/api/v1/admin", {"name": "app"})[0] == 201
    body = b'{"is_managed": false}'
    smuggled = (f"POST /api/v1/admin/app/builds HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Token {server.token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    sock = socket.create_connection((server.host, server.port), timeout=10)
    try:
        sock.sendall(first + b"Transfer-Encoding: chunked\r\n\r\n" +
                     (b"0\r\n\r\n" if b"1.1" in first else b"") + smuggled)
        answers = b""
        while chunk := sock.recv(65536):
            answers += chunk
    finally:
        sock.close()
    assert len(re.findall(rb"HTTP/1\.[01] \d\d\d ", answers)) == 1, answers
    assert server.json("GET", "/api/v1/admin/app/builds")[1]["count"] == 0


def test_failed_authentications_past_the_burst_get_429_while_a_valid_token_still_works(
        server_factory):
    server = server_factory("--auth-burst", "5")
    db_path = os.path.join(server.data_dir, "buildserver.db")
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    before = db_dump(db_path)
    unknown = secrets.token_urlsafe(32)
    for _ in range(5):
        status, body = api(server, "POST", "/api/v1/admin/app/builds", {}, token=unknown)
        assert status == 401, body
        assert api(server, "GET", "/api/v1/admin/app")[0] == 200
    answers = [server.request("POST", "/api/v1/admin/app/builds", {}, token=token,
                              headers=headers)
               for token, headers in ((unknown, None), ("", {"Authorization": "Basic eDp5"}))]
    for status, headers, data in answers:
        assert status == 429, data
        assert 1 <= int(headers["Retry-After"]) <= 61
        assert isinstance(json.loads(data)["detail"], str)
    # A request with no token tried none: it is still told what is missing.
    status, headers, data = server.request("POST", "/api/v1/admin/app/builds", {}, token="")
    assert status == 401 and "missing" in json.loads(data)["detail"], data
    assert {k.lower(): v for k, v in headers.items()}["www-authenticate"] == "Token"
    assert db_dump(db_path) == before
    # The valid token is never throttled, reads and writes alike.
    assert api(server, "GET", "/api/v1/admin/app")[0] == 200
    assert api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})[0] == 201
    assert api(server, "GET", "/api/v1/health", token="")[0] == 200


@pytest.mark.parametrize("trusted", [True, False], ids=["behind-its-proxy", "no-proxy"])
def test_a_trusted_proxys_forwarded_headers_give_the_links_and_the_client_address(
        server_factory, trusted):
    flags = ("--trusted-proxy", "127.0.0.1") if trusted else ()
    server = server_factory("--auth-burst", "2", *flags)
    for name in ("one", "two"):
        api(server, "POST", "/api/v1/admin", {"name": name, "command": "true"})
    forwarded = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "build.example.org",
                 "X-Forwarded-For": "203.0.113.7"}
    status, _, body = server.request("GET", "/api/v1/admin?limit=1", headers=forwarded)
    link = json.loads(body)["next"]
    if trusted:
        assert link.startswith("https://build.example.org/api/v1/admin?"), link
    else:  # anyone can send these headers: believed only from the proxy named
        assert link.startswith(f"http://{server.host}:{server.port}/api/v1/admin?"), link
    unknown = secrets.token_urlsafe(32)

    def fail_from(client):
        headers = {**forwarded, "X-Forwarded-For": client}
        return server.request("GET", "/api/v1/admin", token=unknown, headers=headers)[0]
    assert [fail_from("203.0.113.7") for _ in range(3)] == [401, 401, 429]
    # Another client behind the proxy has its own count; without one, the same address.
    assert fail_from("198.51.100.9") == (401 if trusted else 429)


# Many clients at once -------------------------------------------------------

FAST = "echo start $BUILD_ID; sleep 0.05; echo end"
SLOW = "i=0; while [ $i -lt 15 ]; do echo line $i; i=$((i+1)); sleep 0.05; done"
STUBBORN = "trap '' TERM; echo stubborn; sleep 3"  # needs the SIGKILL after --stop-grace
FOLLOWED = "for i in 1 2 3 4 5 6 7 8; do echo followed $i; sleep 0.03; done"


class Workload:
    """What the client threads did, for the checks afterwards."""

    def __init__(self, server, deadline):
        self.server, self.deadline = server, deadline
        self.lock = threading.Lock()
        self.problems = []
        self.created = {}   # project path -> numbers answered 201
        self.deleted = {}   # project path -> numbers answered 200 to DELETE
        self.known = []     # (project path, number) for the readers
        self.requests = 0

    def call(self, method, path, token, body=None, ok=(200,), headers=None, allow=()):
        """One request; anything but `ok` (or an `allow`ed exception) is a problem."""
        with self.lock:
            self.requests += 1
        try:
            status, _, data = self.server.request(method, path, body, token=token,
                                                  headers=headers, timeout=30)
        except allow:
            return None, None
        except Exception as e:  # noqa: BLE001 (every failure is reported)
            self.problems.append(f"{method} {path}: {e!r}")
            return None, None
        if status not in ok or status >= 500 or b"database is locked" in data:
            self.problems.append(f"{method} {path}: {status} {data[:300]!r}")
        try:
            return status, json.loads(data)
        except ValueError:
            return status, data

    def record(self, project, number, deleted=False):
        with self.lock:
            (self.deleted if deleted else self.created).setdefault(project, set()).add(number)
            if not deleted:
                self.known.append((project, number))

    def running(self):
        return time.monotonic() < self.deadline


def managed_client(work, token, project, seed):
    """Creates, reads, patches, stops, restarts and deletes its own managed builds."""
    rng, mine, creates = random.Random(seed), [], 0
    for _ in range(300):
        if not work.running():
            return
        op = rng.choices(["create", "get", "patch", "stop", "delete", "restart", "list",
                          "statuses", "log"], [4, 3, 2, 2, 1, 1, 1, 2, 2])[0]
        if op in ("create", "restart") and creates >= 25 or op != "create" and not mine:
            op = "list"
        number = rng.choice(mine) if mine else None
        build = f"{project}/builds/{number}"
        if op == "create":
            command = rng.choices([FAST, SLOW, STUBBORN], [6, 2, 1])[0]
            status, body = work.call("POST", f"{project}/builds", token,
                                     {"command": command, "tags": ["load"]}, ok=(201,))
            if status == 201:
                creates += 1
                mine.append(body["id"])
                work.record(project, body["id"])
        elif op == "restart":
            status, body = work.call("POST", f"{build}/restart", token, ok=(201,))
            if status == 201:
                creates += 1
                mine.append(body["id"])
                work.record(project, body["id"])
        elif op == "get":
            work.call("GET", build + "/", token)
        elif op == "patch":
            work.call("PATCH", build, token, {"name": f"n{seed}", "tags": ["a", "b"],
                                              "description": "patched"})
        elif op == "stop":
            work.call("POST", rng.choice([build, build + "/stop"]), token)
        elif op == "delete":
            status, _ = work.call("DELETE", build, token)
            if status == 200:
                mine.remove(number)
                work.record(project, number, deleted=True)
        elif op == "list":
            work.call("GET", f"{project}/builds?status=scheduled,running&limit=50", token)
        elif op == "statuses":
            work.call("GET", f"{build}/statuses?limit=1000", token)
        else:
            work.call("GET", rng.choice([f"{build}/logs?tail=3", f"{build}/logs?format=json"]),
                      token)


def unmanaged_client(work, token, project, seed):
    """Reports statuses and appends logs to its own unmanaged builds, as a CI
    agent would; tracks each build's status to know the exact answers."""
    rng, mine = random.Random(seed), {}  # number -> the status it must have
    for _ in range(300):
        if not work.running():
            break
        op = rng.choices(["create", "log", "report", "bad report", "stop", "delete"],
                         [2, 5, 3, 1, 1, 1])[0]
        if op != "create" and not mine or op == "create" and len(mine) > 8:
            op = "create" if not mine else "log"
        if op == "create":
            status, body = work.call("POST", f"{project}/builds", token,
                                     {"is_managed": False, "name": f"agent{seed}"}, ok=(201,))
            if status == 201:
                mine[body["id"]] = "created"
                work.record(project, body["id"])
            continue
        number = rng.choice(sorted(mine))
        build, current = f"{project}/builds/{number}", mine[number]
        final = current in buildserver.FINAL
        if op == "log":
            if rng.random() < 0.5:
                work.call("POST", f"{build}/logs", token, b"raw line\n" * rng.randint(1, 50),
                          headers={"Content-Type": "text/plain"}, ok=(400,) if final else (200,))
            else:
                work.call("POST", f"{build}/logs", token, json.dumps("json line\n"),
                          headers={"Content-Type": "application/json"},
                          ok=(400,) if final else (200,))
        elif op == "report" and not final:
            new = rng.choice(sorted(buildserver.TRANSITIONS[current]))
            status, _ = work.call("POST", f"{build}/statuses", token,
                                  {"status": new, "message": "from the agent"}, ok=(201,))
            if status == 201:
                mine[number] = new
        elif op in ("report", "bad report"):
            wrong = sorted(set(buildserver.STATUSES) - buildserver.TRANSITIONS[current])
            work.call("POST", f"{build}/statuses", token, {"status": rng.choice(wrong)},
                      ok=(400,))
        elif op == "stop":
            status, body = work.call("POST", f"{build}/stop", token)
            if status == 200:
                mine[number] = body["last_status"]
        else:
            status, _ = work.call("DELETE", build, token)
            if status == 200:
                del mine[number]
                work.record(project, number, deleted=True)
    for number, current in mine.items():  # leave nothing active behind
        build = f"{project}/builds/{number}"
        if current in ("created", "scheduled"):
            work.call("POST", f"{build}/stop", token)
        elif current in ("running", "stopping"):
            end = "succeeded" if current == "running" else "stopped"
            work.call("POST", f"{build}/statuses", token, {"status": end}, ok=(201,))


def follower_client(work, token, project, seed):
    """Follows the logs of builds it creates; what it saw must be the stored log."""
    server = work.server
    for _ in range(20):
        if not work.running():
            return
        status, body = work.call("POST", f"{project}/builds", token, {"command": FOLLOWED},
                                 ok=(201,))
        if status != 201:
            continue
        work.record(project, body["id"])
        build = f"{project}/builds/{body['id']}"
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        try:
            conn.request("GET", f"{build}/logs?follow=1",
                         headers={"Authorization": f"Token {token}"})
            resp = conn.getresponse()
            followed = resp.read()
        except Exception as e:  # noqa: BLE001
            work.problems.append(f"follow {build}: {e!r}")
            continue
        finally:
            conn.close()
        if resp.status != 200:
            work.problems.append(f"follow {build}: {resp.status} {followed[:200]!r}")
            continue
        status, _, stored = server.request("GET", f"{build}/logs", token=token)
        if status != 200 or stored != followed:
            work.problems.append(f"follow {build}: saw {followed!r}, stored {stored!r}")


def reader_client(work, token, projects, seed):
    """Reads anything anyone made (an admin); builds may vanish under it."""
    rng = random.Random(seed)
    for _ in range(400):
        if not work.running():
            return
        with work.lock:
            target = rng.choice(work.known) if work.known else None
        op = rng.choice(["health", "projects", "list", "build", "statuses", "log", "json"])
        if target is None or op in ("health", "projects", "list"):
            project = rng.choice(projects)
            path = {"health": "/api/v1/health", "projects": project.rsplit("/", 1)[0],
                    "list": f"{project}/builds?status=running,stopping,succeeded&limit=100"}
            work.call("GET", path.get(op, path["list"]), token)
            continue
        build = f"{target[0]}/builds/{target[1]}"
        suffix = {"build": "", "statuses": "/statuses", "log": "/logs?offset=3",
                  "json": "/logs?format=json&limit=100"}[op]
        # A log deleted while it streams ends short: the answer cannot be taken back.
        work.call("GET", build + suffix, token, ok=(200, 404),
                  allow=(http.client.IncompleteRead,) if op == "log" else ())


def test_many_clients_at_once_get_no_5xx_and_leave_only_valid_histories(server_factory):
    server = server_factory("--workers", "3", "--stop-grace", "1")
    admin = server.token
    alice = add_user(server.data_dir, "alice")  # the CLI writes beside the running server
    for owner, token in (("admin", admin), ("alice", alice)):
        for name in ("m", "u"):
            assert api(server, "POST", f"/api/v1/{owner}", {"name": name, "command": FAST},
                       token=token)[0] == 201
    projects = [f"/api/v1/{owner}/{name}" for owner in ("admin", "alice") for name in "mu"]
    work = Workload(server, time.monotonic() + 6)
    clients = []
    for i in range(3):
        for owner, token in (("admin", admin), ("alice", alice)):
            clients.append((managed_client, token, f"/api/v1/{owner}/m", i))
    for i in range(2):
        for owner, token in (("admin", admin), ("alice", alice)):
            clients.append((unmanaged_client, token, f"/api/v1/{owner}/u", 10 + i))
    clients += [(follower_client, token, f"/api/v1/{owner}/m", 20 + i)
                for i, (owner, token) in enumerate((("admin", admin), ("alice", alice),
                                                    ("admin", admin)))]
    clients += [(reader_client, admin, projects, 30 + i) for i in range(3)]
    assert len(clients) >= 16
    threads = [threading.Thread(target=target, args=(work, *args), daemon=True)
               for target, *args in clients]
    for thread in threads:
        thread.start()
    # Meanwhile, more CLI writers on the same database file.
    cli_tokens = [add_user(server.data_dir, f"late{i}") for i in range(2)]
    assert all(cli_tokens)

    others = [t for t, (target, *_) in zip(threads, clients) if target is not follower_client]
    for thread in others:
        thread.join(60)
        assert not thread.is_alive(), "a client thread did not end by itself"

    # End every managed build still active, which also ends the followers.
    def stop_active():
        active = [(p, b["id"]) for p in projects[0::2] for b in all_builds(server, p)
                  if b["last_status"] not in buildserver.FINAL]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda pb: api(server, "POST", f"{pb[0]}/builds/{pb[1]}/stop"),
                          active))
        return not active
    wait_until(stop_active, timeout=60, interval=0.1, message="every build to end")
    for thread in threads:
        thread.join(60)
        assert not thread.is_alive(), "a follower did not end with its build"

    assert not work.problems, f"{len(work.problems)} problems:\n" + "\n".join(work.problems[:30])
    assert work.requests > 500, work.requests  # the load really happened
    histories = []
    for project in projects:
        builds = all_builds(server, project)
        numbers = [b["id"] for b in builds]
        assert len(numbers) == len(set(numbers))
        expected = work.created.get(project, set()) - work.deleted.get(project, set())
        assert set(numbers) == expected, (project, sorted(expected ^ set(numbers)))
        assert api(server, "GET", project)[1]["builds_count"] == len(builds)
        for build in builds:
            assert build["last_status"] in buildserver.FINAL, (project, build)
            history = check_history(server, f"{project}/builds/{build['id']}")
            assert history[-1]["status"] == build["last_status"]
            histories.append([entry["status"] for entry in history])
    # The load reached the interesting paths: runs, stops of running builds, early stops.
    assert ["created", "scheduled", "running", "succeeded"] in histories
    assert ["created", "scheduled", "running", "stopping", "stopped"] in histories
    assert ["created", "scheduled", "stopped"] in histories
    assert not server_errors(server), server_errors(server)


# A write that loses a race with a delete ------------------------------------
# A request finds its build (or project), then waits for the write lock while
# something else deletes it. Another process holds SQLite's write lock here, so
# the interleaving is the same every run: the request is seen waiting in
# SQLite's busy handler before the delete is committed.

def _waiting_in_sqlite(pid):
    """Whether a thread of process `pid` sleeps in SQLite's busy handler."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if "nanosleep" in f.read():
                    return True
        except OSError:
            pass
    return False


@pytest.fixture(scope="module")
def race_server(tmp_path_factory):
    sleeper = threading.Thread(target=time.sleep, args=(1,))
    sleeper.start()
    try:
        seen = os.path.isdir("/proc/self/task") and wait_until(
            lambda: _waiting_in_sqlite(os.getpid()), timeout=0.5, interval=0.01)
    except AssertionError:
        seen = False
    sleeper.join()
    if not seen:
        pytest.skip("needs /proc/<pid>/task/<tid>/wchan to see a thread sleep (Linux)")
    server = Server(tmp_path_factory.mktemp("race"), "--workers", "0").start()
    yield server
    server.stop()


@pytest.mark.parametrize("method, suffix, body, deleted", [
    pytest.param("PATCH", "/builds/1", {"name": "late"}, "build",
                 id="patch-build"),
    pytest.param("POST", "/builds/1", None, "build", id="stop-seed-route"),
    pytest.param("POST", "/builds/1/stop", None, "build", id="stop"),
    pytest.param("POST", "/builds/1/statuses", {"status": "running"}, "build", id="report-status"),
    pytest.param("POST", "/builds/1/logs", b"late output\n", "build", id="append-log"),
    pytest.param("POST", "/builds/1/restart", None, "build", id="restart"),
    pytest.param("DELETE", "/builds/1", None, "build", id="delete-build"),
    pytest.param("POST", "/builds", {"is_managed": False}, "project", id="create-build"),
    pytest.param("PATCH", "", {"description": "late"}, "project",
                 id="patch-project"),
    pytest.param("DELETE", "", None, "project", id="delete-project"),
])
def test_a_write_that_loses_a_race_with_a_delete_gets_a_4xx_never_a_500(
        race_server, method, suffix, body, deleted):
    server = race_server
    name = f"race-{secrets.token_hex(4)}"
    project = f"/api/v1/admin/{name}"
    assert api(server, "POST", "/api/v1/admin", {"name": name, "command": "true"})[0] == 201
    assert api(server, "POST", f"{project}/builds", {"is_managed": False})[0] == 201
    logged = len(server.stderr_lines)
    conn = sqlite3.connect(os.path.join(server.data_dir, "buildserver.db"), timeout=30,
                           isolation_level=None)
    answer = []
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        project_id, build_id = conn.execute(
            "SELECT p.id, b.id FROM projects p JOIN builds b ON b.project_id = p.id"
            " WHERE p.name = ? AND b.number = 1", (name,)).fetchone()
        conn.execute("BEGIN IMMEDIATE")
        headers = {"Content-Type": "text/plain"} if isinstance(body, bytes) else None
        client = threading.Thread(target=lambda: answer.append(
            api(server, method, project + suffix, body, headers=headers)))
        client.start()
        wait_until(lambda: _waiting_in_sqlite(server.proc.pid) or answer, timeout=10,
                   interval=0.005, message="the request to wait for the write lock")
        if deleted == "build":
            conn.execute("UPDATE projects SET builds_count = builds_count - 1 WHERE id = ?",
                         (project_id,))
            conn.execute("DELETE FROM builds WHERE id = ?", (build_id,))
        else:
            conn.execute("DELETE FROM projects WHERE id = ?", (project_id,))
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")
        conn.close()
    client.join(30)
    assert answer, "no answer"
    status, reply = answer[0]
    assert status < 500, reply
    assert isinstance(reply, dict) and reply.get("detail") != "internal error", reply
    request_line = f" {project + suffix} "
    wait_until(lambda: any(request_line in line for line in server.stderr_lines[logged:]),
               timeout=5, message="the request's log line")
    assert not [line for line in server.stderr_lines[logged:] if "Traceback" in line]


# kill -9 --------------------------------------------------------------------

def test_kill_9_in_the_middle_of_heavy_log_output_loses_nothing_stored(server_factory, tmp_path):
    data = tmp_path / "crash"
    server = server_factory("--workers", "1", data_dir=data)
    token = server.token
    api(server, "POST", "/api/v1/admin", {"name": "app"})
    # Fast output, verifiable line by line: 1, 2, 3, ... from a loop of `seq`s.
    loud = "i=1; while :; do seq $i $((i+999)); i=$((i+1000)); done"
    status, first = api(server, "POST", "/api/v1/admin/app/builds", {"command": loud})
    assert status == 201
    status, second = api(server, "POST", "/api/v1/admin/app/builds", {"command": "echo second"})
    assert (status, second["last_status"]) == (201, "scheduled")
    seen = wait_until(lambda: (lambda b: b["log_size"] >= 2 * 1024 * 1024 and b)(
        api(server, "GET", "/api/v1/admin/app/builds/1")[1]), timeout=30,
        message="2 MiB of output")
    assert seen["last_status"] == "running"
    server.proc.kill()
    server.proc.wait(10)
    marker = f"BUILD_UUID={first['uuid']}"
    assert pids_with_marker(marker), "the build's loop outlives the server"

    again = server_factory("--workers", "1", data_dir=data)
    again.token = token
    assert integrity(os.path.join(str(data), "buildserver.db")) == [("ok",)]
    wait_until(lambda: not pids_with_marker(marker), timeout=10,
               message="the leftover processes to be killed")
    build = api(again, "GET", "/api/v1/admin/app/builds/1")[1]
    assert build["last_status"] == "failed"
    history = check_history(again, "/api/v1/admin/app/builds/1")
    assert "interrupted" in history[-1]["message"]
    status, _, log = again.request("GET", "/api/v1/admin/app/builds/1/logs")
    assert status == 200 and len(log) == build["log_size"] >= seen["log_size"]
    *lines, partial = log.split(b"\n")
    assert lines == [str(n).encode() for n in range(1, len(lines) + 1)]
    assert str(len(lines) + 1).encode().startswith(partial)
    # The build that was waiting runs now.
    done = wait_until(lambda: (lambda b: b["last_status"] in buildserver.FINAL and b)(
        api(again, "GET", "/api/v1/admin/app/builds/2")[1]), message="build 2")
    assert done["last_status"] == "succeeded"
    assert again.request("GET", "/api/v1/admin/app/builds/2/logs")[2] == b"second\n"


def test_kill_9_in_the_middle_of_a_burst_of_writes_keeps_every_answered_write(
        server_factory, tmp_path):
    data = tmp_path / "burst"
    server = server_factory("--workers", "2", data_dir=data)
    token = server.token
    for name in ("m", "u"):
        api(server, "POST", "/api/v1/admin", {"name": name, "command": "echo hi"})
    lock = threading.Lock()
    created = {"m": set(), "u": set()}
    log_sizes = {}   # unmanaged build number -> the largest size a 200 reported
    reported = set()  # unmanaged builds whose report of `running` was answered 201
    dead, problems = threading.Event(), []

    def call(method, path, body, **kw):
        status, reply = api(server, method, path, body, timeout=10, **kw)
        if status >= 500:
            problems.append((method, path, status, reply))
        return status, reply

    def writer(seed):
        rng = random.Random(seed)
        for _ in range(2000):
            try:
                kind = rng.choice("mu")
                status, body = call("POST", f"/api/v1/admin/{kind}/builds",
                                    {"is_managed": kind == "m", "tags": [f"w{seed}"]})
                if status != 201:
                    continue
                with lock:
                    created[kind].add(body["id"])
                if kind == "u":
                    build = f"/api/v1/admin/u/builds/{body['id']}"
                    status, reply = call("POST", f"{build}/statuses", {"status": "running"})
                    if status == 201:
                        reported.add(body["id"])
                    for _ in range(3):
                        status, reply = call("POST", f"{build}/logs", b"x" * 5000,
                                             headers={"Content-Type": "text/plain"})
                        if status == 200:
                            log_sizes[body["id"]] = reply["size"]
                    call("PATCH", build, {"description": "patched"})
            except (OSError, http.client.HTTPException) as e:
                if not dead.is_set():
                    problems.append(repr(e))
                return

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(6)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(created["m"]) + len(created["u"]) >= 60, timeout=30,
               message="60 builds created")
    dead.set()
    server.proc.kill()
    server.proc.wait(10)
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    assert not problems

    again = server_factory("--workers", "2", data_dir=data)
    again.token = token
    assert integrity(os.path.join(str(data), "buildserver.db")) == [("ok",)]
    for kind in "mu":
        builds = {b["id"]: b for b in all_builds(again, f"/api/v1/admin/{kind}")}
        assert created[kind] <= set(builds), sorted(created[kind] - set(builds))
    unmanaged = {b["id"]: b for b in all_builds(again, "/api/v1/admin/u")}
    for number, size in log_sizes.items():
        assert unmanaged[number]["log_size"] >= size
    for number in reported:
        assert unmanaged[number]["last_status"] == "running"  # nobody else runs it
    # Managed builds: the interrupted ones failed, the waiting ones ran.
    def all_final():
        builds = all_builds(again, "/api/v1/admin/m")
        return all(b["last_status"] in buildserver.FINAL for b in builds) and builds
    for build in wait_until(all_final, timeout=60, interval=0.1, message="managed builds"):
        history = check_history(again, f"/api/v1/admin/m/builds/{build['id']}")
        assert build["last_status"] == "succeeded" or "interrupted" in history[-1]["message"]
    for number in list(unmanaged)[:20]:
        check_history(again, f"/api/v1/admin/u/builds/{number}")


# Data folders and database files --------------------------------------------

def assert_clear_failure(done, *patterns):
    """A nonzero exit with one line on standard error that says what is wrong
    (matching each regular expression of `patterns`)."""
    assert done.returncode != 0
    message = done.stderr.strip()
    assert message and "\n" not in message, done.stderr
    assert message.startswith("buildserver: ") and "Traceback" not in message
    for pattern in patterns:
        assert re.search(pattern, message), (pattern, message)


def test_adduser_on_a_terminal_that_cannot_show_the_folders_name_still_shows_the_token(
        tmp_path):
    # Only the client commands escaped what the terminal cannot show: adduser
    # ended in a UnicodeEncodeError, with its database made and no user.
    data_dir = tmp_path / "d\u00e9\u2713"
    done = cli("adduser", "bob", "--data-dir", str(data_dir), env={"PYTHONIOENCODING": "ascii"})
    assert done.returncode == 0, done.stderr
    assert "d\\xe9\\u2713" in done.stdout and "Traceback" not in done.stderr
    token = done.stdout.strip().splitlines()[-1]
    with contextlib.closing(sqlite3.connect(data_dir / "buildserver.db")) as db:
        assert db.execute("SELECT count(*) FROM users WHERE name = 'bob'").fetchone()[0] == 1
    assert len(token) > 20


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["adduser", "alice"],
                                     ["token", "alice"], ["backup", "copy.db"]])
def test_a_data_folder_that_cannot_be_made_gets_a_one_line_message(tmp_path, command):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"a regular file where a folder should be\n")
    data_dir = str(blocker / "data")  # ENOTDIR, even for root
    done = run_cli(*command, "--data-dir", data_dir)
    assert_clear_failure(done, re.escape(data_dir))
    assert blocker.read_bytes() == b"a regular file where a folder should be\n"


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["adduser", "alice"],
                                     ["token", "alice"], ["backup", "copy.db"]])
def test_a_data_folder_that_is_a_file_gets_a_one_line_message(tmp_path, command):
    blocker = tmp_path / "data"
    blocker.write_bytes(b"not a folder\n")
    done = run_cli(*command, "--data-dir", str(blocker))
    assert_clear_failure(done, re.escape(str(blocker)))
    assert "File exists" not in done.stderr and "its owner" not in done.stderr  # (it said so)
    assert blocker.read_bytes() == b"not a folder\n"


def test_a_read_inside_a_write_transaction_sees_it_and_no_other_write_comes_between(app):
    # What makes a claim's read of its build the row it just moved: a deleted
    # build's id goes to the next build made.
    db, other = app.db, threading.Thread(
        target=lambda: app.store.create_user("intruder"), daemon=True)
    with db.write() as c:
        c.execute("INSERT INTO users (name, created_at) VALUES ('ghost', ?)",
                  (buildserver.now_iso(),))
        assert db.one("SELECT name FROM users WHERE name = 'ghost'")["name"] == "ghost"
        other.start()
        other.join(0.2)
        assert other.is_alive()  # it waits for this transaction
        assert db.one("SELECT count(*) FROM users WHERE name = 'intruder'")[0] == 0
    other.join(10)
    assert db.one("SELECT count(*) FROM users WHERE name IN ('ghost', 'intruder')")[0] == 2


def test_a_second_server_on_the_same_data_folder_is_refused(server_factory, tmp_path):
    server = server_factory(data_dir=tmp_path / "shared")
    assert_clear_failure(run_cli("serve", "--port", "0", "--data-dir", server.data_dir),
                         re.escape(server.data_dir))
    assert api(server, "GET", "/api/v1/health", token="")[0] == 200


def test_a_backup_onto_the_database_itself_is_refused_and_changes_nothing(server_factory,
                                                                            tmp_path):
    # Replacing the file the server writes would lose whatever it answered for
    # afterwards: by its path, a relative one, or a link to it.
    server = server_factory(data_dir=tmp_path / "live")
    assert api(server, "POST", "/api/v1/admin", {"name": "app"})[0] == 201
    db = os.path.join(server.data_dir, "buildserver.db")
    os.symlink(db, tmp_path / "link.db")
    # serve.lock too: the copy took the lock's place, and a second server started.
    for dest in (db, db + "-wal", str(tmp_path / "link.db"), os.path.relpath(db, str(tmp_path)),
                 str(tmp_path / "live" / "." / "buildserver.db"),
                 os.path.join(server.data_dir, "serve.lock")):
        done = subprocess.run([sys.executable, SCRIPT, "backup", dest, "--data-dir",
                               server.data_dir], capture_output=True, text=True, timeout=60,
                              cwd=str(tmp_path))
        assert done.returncode == 2 and "name a file outside the data folder" in done.stderr, \
            (dest, done)
    assert api(server, "POST", "/api/v1/admin", {"name": "after"})[0] == 201
    assert api(server, "GET", "/api/v1/admin/after")[0] == 200
    second = run_cli("serve", "--port", "0", "--data-dir", server.data_dir)
    assert second.returncode == 1 and "another server is using" in second.stderr, second


def test_a_restored_backup_ends_the_builds_that_waited_or_ran_instead_of_running_them_again(
        server_factory, tmp_path):
    # A build still waiting at the backup, which ran (a deploy) before the
    # restore, ran a second time at the restored server's start.
    server = server_factory("--workers", "1")
    assert api(server, "POST", "/api/v1/admin", {"name": "app"})[0] == 201
    builds = "/api/v1/admin/app/builds"
    running = api(server, "POST", builds, {"command": "echo ran; sleep 60"})[1]
    waiting = api(server, "POST", builds, {"command": "echo deploy >> ../../deploys"})[1]
    unmanaged = api(server, "POST", builds, {"is_managed": False})[1]
    server_wait_for_log(server, f"{builds}/{running['id']}", b"ran")
    copy = tmp_path / "copy.db"
    assert run_cli("backup", str(copy), "--data-dir", server.data_dir).returncode == 0
    api(server, "POST", f"{builds}/{running['id']}/stop")
    server_final_build(server, f"{builds}/{waiting['id']}")  # it ran, once
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    shutil.copy(copy, restored / "buildserver.db")
    for start in range(2):  # (the second start changes nothing)
        again = server_factory("--workers", "1", data_dir=restored)
        again.token = server.token
        ended = {b["id"]: b for b in api(again, "GET", builds)[1]["results"]}
        assert ended[waiting["id"]]["last_status"] == "stopped", ended
        assert ended[running["id"]]["last_status"] == "failed", ended
        assert ended[unmanaged["id"]]["last_status"] == "created", ended  # not the server's
        for build in (waiting, running):
            history = api(again, "GET", f"{builds}/{build['id']}/statuses")[1]["results"]
            assert "restored from a backup" in history[-1]["message"], history
            assert sum("restored" in (h["message"] or "") for h in history) == 1, history
        made = api(again, "POST", builds, {"command": "echo new"})[1]  # the queue works
        assert server_final_build(again, f"{builds}/{made['id']}")["last_status"] == "succeeded"
        again.stop()
    assert not os.path.exists(restored / "workspaces" / "admin" / "deploys"), "it ran again"


def test_a_restore_mark_an_older_release_kept_ends_no_build_made_after_the_backup(
        server_factory, tmp_path):
    # An older release ignores the mark: a build made on the restored file by
    # it, before this release's first start, was ended as if it had waited.
    server = server_factory("--workers", "0")
    assert api(server, "POST", "/api/v1/admin", {"name": "app"})[0] == 201
    copy = tmp_path / "copy.db"
    assert run_cli("backup", str(copy), "--data-dir", server.data_dir).returncode == 0
    restored = tmp_path / "restored"
    restored.mkdir(mode=0o700)
    shutil.copy(copy, restored / "buildserver.db")
    with contextlib.closing(sqlite3.connect(restored / "buildserver.db")) as db:
        db.execute("UPDATE backup_taken SET taken_at = '2026-01-01T00:00:00.000000Z'")
        db.commit()  # (as if made then: every build there came after)
    with contextlib.closing(sqlite3.connect(copy)) as db:
        assert db.execute("SELECT count(*) FROM backup_taken").fetchone()[0] == 1
    again = server_factory("--workers", "0", data_dir=restored)
    again.token = server.token
    made = api(again, "POST", "/api/v1/admin/app/builds", {"command": "true"})[1]
    again.stop()
    with contextlib.closing(sqlite3.connect(restored / "buildserver.db")) as db:
        db.execute("INSERT INTO backup_taken VALUES ('2026-01-01T00:00:00.000000Z')")
        db.commit()  # the mark, as the older release left it
    third = server_factory("--workers", "1", data_dir=restored)
    third.token = server.token
    ran = server_final_build(third, f"/api/v1/admin/app/builds/{made['id']}")
    assert ran["last_status"] == "succeeded", ran


def make_bad_database(path, kind):
    """A buildserver.db that this buildserver must refuse; returns words the message needs."""
    if kind == "random bytes":
        path.write_bytes(random.Random(7).randbytes(64 * 1024))
        return "not a (SQLite )?database"
    conn = sqlite3.connect(path)
    try:
        if kind == "foreign":
            conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                               "INSERT INTO customers (name) VALUES ('Ada'), ('Grace');")
            return "did not make"
        if kind == "foreign with a version":  # another program numbers its schema too
            conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                               "PRAGMA user_version = 3;")
            return "not a buildserver database"
        if kind == "some of its tables":  # another program's namesakes, with a version
            conn.executescript("CREATE TABLE users (id INTEGER PRIMARY KEY);"
                               "CREATE TABLE projects (id INTEGER PRIMARY KEY);"
                               "PRAGMA user_version = 3;")
            return "not a buildserver database"
        for number, sql in sorted(schema_migrations().items()):
            conn.executescript(sql)
        conn.execute("PRAGMA user_version = 99")
        conn.commit()
        return "newer"
    finally:
        conn.close()


BAD_DATABASES = ["random bytes", "foreign", "foreign with a version", "some of its tables",
                 "newer"]


@pytest.mark.parametrize("kind", BAD_DATABASES)
@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["adduser", "alice"]])
def test_a_database_file_buildserver_cannot_use_is_refused_with_a_one_line_message(
        tmp_path, kind, command):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    words = make_bad_database(data_dir / "buildserver.db", kind)
    done = run_cli(*command, "--data-dir", str(data_dir))
    assert_clear_failure(done, re.escape(str(data_dir)), words)
    assert done.stdout == ""  # no admin token, no "listening"


@pytest.mark.parametrize("kind", BAD_DATABASES)
def test_a_database_file_buildserver_refuses_is_left_byte_for_byte_unchanged(tmp_path, kind):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = data_dir / "buildserver.db"
    make_bad_database(db, kind)
    before = db.read_bytes()
    for command in (["serve", "--port", "0"], ["adduser", "alice"], ["token", "alice"]):
        assert run_cli(*command, "--data-dir", str(data_dir)).returncode != 0
    assert db.read_bytes() == before
    assert sorted(p.name for p in data_dir.iterdir() if p.name.startswith("buildserver.db")) == [
        "buildserver.db"]


def test_an_empty_database_at_version_0_is_migrated_to_the_latest_schema(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    conn = sqlite3.connect(data_dir / "buildserver.db")
    conn.executescript("CREATE TABLE scratch (x); DROP TABLE scratch; PRAGMA user_version = 0;")
    conn.close()
    server = server_factory(data_dir=data_dir)
    assert server.token  # a fresh database: the admin user was made
    db = str(data_dir / "buildserver.db")
    assert user_version(db) == max(schema_migrations())
    assert api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})[0] == 201
    assert integrity(db) == [("ok",)]


def write_database_at(path, version):
    """A buildserver database at schema `version`, holding a user, a project, a
    finished build with its statuses and log; returns the user's token."""
    token = secrets.token_urlsafe(32)
    now = "2026-01-02T03:04:05.000006Z"
    conn = sqlite3.connect(path)
    try:
        for number, sql in sorted(schema_migrations().items()):
            if number <= version:
                conn.executescript(sql)
        conn.execute(f"PRAGMA user_version = {version:d}")
        conn.execute("INSERT INTO users (id, name, is_admin, created_at) VALUES (1, 'old', 1, ?)",
                     (now,))
        conn.execute("INSERT INTO tokens (hash, user_id, created_at) VALUES (?, 1, ?)",
                     (buildserver.hash_token(token), now))
        conn.execute("INSERT INTO projects (id, owner_id, name, command, created_at, updated_at,"
                     " builds_count, next_number) VALUES (1, 1, 'app', 'true', ?, ?, 1, 2)",
                     (now, now))
        conn.execute("INSERT INTO builds (id, project_id, number, uuid, user, last_status,"
                     " is_managed, command, created_at, updated_at, started_at, finished_at,"
                     " exit_code, log_size) VALUES (1, 1, 1, ?, 'old', 'succeeded', 1, 'true',"
                     " ?, ?, ?, ?, 0, 6)", ("a" * 32, now, now, now, now))
        for number, status in enumerate(("created", "scheduled", "running", "succeeded"), 1):
            conn.execute("INSERT INTO statuses (build_id, number, uuid, status, message,"
                         " created_at) VALUES (1, ?, ?, ?, ?, ?)",
                         (number, f"{number:032x}", status, f"message {number}", now))
        conn.execute("INSERT INTO log_chunks (build_id, offset, data) VALUES (1, 0, ?)",
                     (b"hello\n",))
        conn.commit()
    finally:
        conn.close()
    return token


OPEN_AT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import buildserver
while time.time() < float(sys.argv[3]):  # all start together
    pass
db = buildserver.Database(sys.argv[2])
db.migrate()
db.close()
"""


def test_processes_making_a_new_database_at_once_all_succeed(tmp_path):
    # adduser beside a first serve, say. SQLite answered some of their lock
    # waits with "locked" (switching to WAL); a read between two statements saw
    # another's tables without its version ("tables that buildserver did not
    # make"); and a closing process held the write lock while it waited for
    # readers, so another's migration gave up after the busy timeout.
    for attempt in range(5):
        path = str(tmp_path / f"{attempt}.db")
        start = str(time.time() + 1.5)  # after every import, even on a loaded machine
        procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, HERE, path, start],
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
        errors = [proc.communicate(timeout=120)[1] for proc in procs]
        assert [proc.returncode for proc in procs] == [0, 0, 0], errors
        assert user_version(path) == max(schema_migrations())
        assert integrity(path) == [("ok",)]


def test_a_database_at_the_latest_version_is_used_as_it_is(server_factory, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = str(data_dir / "buildserver.db")
    latest = max(schema_migrations())
    token = write_database_at(db, latest)
    before = db_dump(db)
    server = server_factory(data_dir=data_dir)
    assert server.token is None  # it has a user: no new admin
    server.token = token
    build = api(server, "GET", "/api/v1/old/app/builds/1")[1]
    assert (build["last_status"], build["log_size"]) == ("succeeded", 6)
    assert server.request("GET", "/api/v1/old/app/builds/1/logs")[2] == b"hello\n"
    server.stop()
    assert server.proc.returncode == 0
    assert user_version(db) == latest
    recorded = 'INSERT INTO "server_process" VALUES(%d,' % server.proc.pid
    assert [line for line in db_dump(db) if not line.startswith(recorded)] == before  # but itself


@pytest.mark.parametrize("version", range(1, max(schema_migrations())))
def test_a_database_at_an_older_version_is_migrated_and_keeps_its_data(
        server_factory, tmp_path, version):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    db = str(data_dir / "buildserver.db")
    token = write_database_at(db, version)
    server = server_factory(data_dir=data_dir)
    server.token = token
    assert user_version(db) == max(schema_migrations())
    assert server.request("GET", "/api/v1/old/app/builds/1/logs")[2] == b"hello\n"
    statuses = api(server, "GET", "/api/v1/old/app/builds/1/statuses")[1]["results"]
    assert [(s["id"], s["uuid"], s["status"], s["message"], s["created_at"])
            for s in statuses] == [
        (n, f"{n:032x}", status, f"message {n}", "2026-01-02T03:04:05.000006Z")
        for n, status in enumerate(("created", "scheduled", "running", "succeeded"), 1)]
    assert api(server, "GET", f"/api/v1/old/app/builds/1/statuses/{3:032x}")[1] == statuses[2]
    # The migrated tables take new rows: a build runs and records its statuses.
    api(server, "POST", "/api/v1/old/app/builds", {})
    wait_until(lambda: api(server, "GET", "/api/v1/old/app/builds/2")[1]["last_status"]
               == "succeeded", message="a build on the migrated database to succeed")
    assert [s["status"] for s in api(server, "GET", "/api/v1/old/app/builds/2/statuses")[1][
        "results"]] == ["created", "scheduled", "running", "succeeded"]
    server.stop()
    assert integrity(db) == [("ok",)]
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


# Backup ---------------------------------------------------------------------

def test_the_data_folder_database_and_backups_are_readable_by_their_owner_alone(tmp_path):
    # A build's env (a deploy key, say) and its log are in the database.
    data_dir = tmp_path / "private"
    server = Server(data_dir, preexec_fn=lambda: os.umask(0o022)).start()
    try:
        api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true",
                                              "env": {"DEPLOY_KEY": "secret"}})
        paths = [data_dir / name for name in ("buildserver.db", "buildserver.db-wal",
                                              "buildserver.db-shm")]
        modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths}
        assert modes == dict.fromkeys(modes, 0o600), modes
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        copy = tmp_path / "copy.db"
        old = os.umask(0o022)
        try:
            assert run_cli("backup", str(copy), "--data-dir", str(data_dir)).returncode == 0
        finally:
            os.umask(old)
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    finally:
        server.stop()


def test_two_backups_to_one_file_at_once_each_copy_whole_and_leave_nothing_else(
        server_factory, tmp_path):
    server = server_factory()
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    status, build = api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
    for _ in range(3):  # a database big enough for the copies to overlap
        api(server, "POST", f"/api/v1/admin/app/builds/{build['id']}/logs",
            os.urandom(8 * MiB - 1), headers={"Content-Type": "text/plain"})
    folder = tmp_path / "backups"
    folder.mkdir()
    dest = folder / "copy.db"
    def start():
        return subprocess.Popen([sys.executable, SCRIPT, "backup", str(dest), "--data-dir",
                                 server.data_dir], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    first = start()
    partial = wait_until(lambda: [p for p in folder.iterdir() if p.name.endswith(".partial")],
                         interval=0.001, message="the first copy to begin")[0]
    os.kill(first.pid, signal.SIGSTOP)  # held in the middle of its copy
    try:
        assert partial.exists(), "the first copy ended before the second began"
        second = start()
        second_result = second.communicate(timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    copies = [first, second]
    results = [first.communicate(timeout=120), second_result]
    assert [copy.returncode for copy in copies] == [0, 0], results
    assert integrity(str(dest)) == [("ok",)]
    assert [p.name for p in folder.iterdir()] == ["copy.db"]


def test_a_backup_that_fails_or_was_killed_leaves_no_copy_behind(server_factory, tmp_path):
    import resource
    server = server_factory()
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    status, build = api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
    api(server, "POST", f"/api/v1/admin/app/builds/{build['id']}/logs", os.urandom(4 * MiB),
        headers={"Content-Type": "text/plain"})
    folder = tmp_path / "backups"
    folder.mkdir()
    dest = folder / "copy.db"
    dead = subprocess.Popen(["true"])
    dead.wait()
    for suffix in ("", "-journal"):  # what an older release's backup killed with SIGKILL left
        (folder / f"copy.db.{dead.pid}.partial{suffix}").write_bytes(b"secrets")
    tag = buildserver._dest_tag(str(dest))
    left = folder / f".buildserver-backup.{dead.pid}.{tag}.x1y2z3.partial"  # and this one's
    # One to another destination (a dated backup's, the night before) is removed
    # if it was made here (this boot, this pid namespace); else its pid may be
    # another machine's or container's, as may an earlier release's, which did not say.
    other_tag = buildserver._dest_tag("b.db")
    here = folder / f".buildserver-backup.{dead.pid}.{other_tag}.{buildserver._copy_tag()}.r.partial"
    elsewhere = folder / f".buildserver-backup.{dead.pid}.{other_tag}.ns1.s.partial"
    other = folder / f".buildserver-backup.{dead.pid}.{other_tag}.q.partial"
    assert buildserver._copy_tag() not in ("ns1", "ns-")
    for partial in (left, here, elsewhere, other):
        partial.mkdir(mode=0o700)
        (partial / "copy.db").write_bytes(b"secrets")
        (partial / "copy.db-journal").write_bytes(b"secrets")
    full = subprocess.run(  # the destination's disk fills up (a file size limit here)
        [sys.executable, SCRIPT, "backup", str(dest), "--data-dir", server.data_dir],
        capture_output=True, text=True, timeout=60, preexec_fn=lambda: resource.setrlimit(
            resource.RLIMIT_FSIZE, (MiB, resource.RLIM_INFINITY)))
    assert full.returncode == 1 and f"the copy to {dest} failed" in full.stderr, full.stderr
    assert sorted(folder.iterdir()) == sorted([elsewhere, other])
    done = run_cli("backup", str(dest), "--data-dir", server.data_dir)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in folder.iterdir()) == sorted([elsewhere.name, other.name,
                                                               "copy.db"])


def test_a_data_folder_open_to_other_users_is_warned_about(tmp_path):
    # One made before buildserver made its folders private keeps its mode.
    data_dir = tmp_path / "old"
    data_dir.mkdir(mode=0o755)
    data_dir.chmod(0o755)
    server = Server(data_dir).start()
    try:
        wait_until(lambda: any("is open to other users (mode 755)" in line
                               for line in server.stderr_lines), message="the warning")
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o755  # told, not changed
        assert not any("buildserver.db is open" in line for line in server.stderr_lines)
    finally:
        server.stop()


def test_a_backup_to_a_folder_or_a_missing_one_is_refused_and_leaves_nothing(
        server_factory, tmp_path):
    server = server_factory()
    folder = tmp_path / "backups"
    folder.mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "elsewhere.db").write_bytes(b"kept")
    os.symlink(tmp_path / "elsewhere.db", folder / "link.db")
    for dest, says in (("", "the destination is empty"), (" ", "the destination is empty"),
                       (str(folder), "is a folder"), (str(folder) + os.sep, "is a folder"),
                      (str(tmp_path / "nowhere" / "copy.db"), "there is no folder"),
                      # /dev/null or /dev/stdout, as root, became a file for everyone
                      (str(tmp_path / "fifo"), "is not a file"),
                      (str(folder / "link.db"), "is not a file")):
        done = run_cli("backup", dest, "--data-dir", server.data_dir)
        assert done.returncode == 2 and says in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert list(folder.iterdir()) == [folder / "link.db"] and not (tmp_path / "nowhere").exists()
    assert stat.S_ISFIFO(os.lstat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "elsewhere.db").read_bytes() == b"kept"


@pytest.mark.parametrize("args, warning", [
    (["--host", "0.0.0.0"], "listening beyond this machine over plain HTTP"),
    (["--host", "127.0.0.1"], None), (["--host", "localhost"], None),
    # A proxy on this machine, which the server is reachable past
    (["--host", "0.0.0.0", "--trusted-proxy", "127.0.0.1"],
     "though the trusted proxy is on it (127.0.0.1): clients can reach the server past it"),
    (["--host", "0.0.0.0", "--trusted-proxy", "10.1.2.3"], None),  # (a proxy elsewhere)
    (["--host", "127.0.0.1", "--trusted-proxy", "127.0.0.1"], None)])
def test_a_server_listening_beyond_this_machine_warns_that_tokens_travel_unencrypted(
        server_factory, args, warning):
    server = server_factory(*args)
    assert server.json("GET", "/api/v1/health")[0] == 200
    wait_until(lambda: any("GET /api/v1/health" in line for line in server.stderr_lines),
               message="the request's log line, which comes after the start's")
    warned = [line for line in server.stderr_lines if "listening beyond this machine" in line]
    assert (warning is None and not warned) or (warned and warning in warned[0]), warned


def test_a_backup_into_a_folder_others_may_write_is_refused_unless_it_is_sticky(
        server_factory, tmp_path):
    # A local user renamed the copy (made at a name known in advance) away and
    # put a file of theirs in its place: SQLite wrote the whole database into it.
    import pwd
    server = server_factory()
    shared = next((u.pw_gid for u in pwd.getpwall() if u.pw_uid != os.getuid()), None)
    cases = [(0o777, None, True), (0o1777, None, False), (0o755, None, False)]
    if shared is not None:  # (daemon's group, say)
        cases.append((0o775, shared, True))
    if buildserver._group_of_one(os.getgid()):  # umask 002 makes 0775 in one's own group
        cases.append((0o775, os.getgid(), False))
    for n, (mode, group, refused) in enumerate(cases):
        folder = tmp_path / f"backups{n}"
        folder.mkdir()
        folder.chmod(mode)
        if group is not None:
            os.chown(folder, -1, group)
        done = run_cli("backup", str(folder / "copy.db"), "--data-dir", server.data_dir)
        if refused:
            assert done.returncode == 2, done
            assert f"other users may write in {folder} (mode {mode & 0o777:03o})" in done.stderr
            assert list(folder.iterdir()) == []
        else:
            assert done.returncode == 0, done.stderr
            assert [p.name for p in folder.iterdir()] == ["copy.db"]
            assert stat.S_IMODE((folder / "copy.db").stat().st_mode) == 0o600


def test_a_backup_into_a_folder_an_acl_opens_to_another_user_is_refused(server_factory, tmp_path):
    # 0770 in one's own private group passed, though the group's bits were
    # the ACL's mask and the ACL let `nobody` write there.
    import struct
    if not buildserver._group_of_one(os.getgid()):
        pytest.skip("this user's group holds others too")
    server = server_factory()
    folder = tmp_path / "acl"
    folder.mkdir(mode=0o700)

    def entry(tag, perms, who=0xFFFFFFFF):
        return struct.pack("<HHI", tag, perms, who)
    try:  # user::rwx, user:65534:rwx, group::---, mask::rwx, other::---
        os.setxattr(folder, "system.posix_acl_access", struct.pack("<I", 2) + entry(1, 7)
                    + entry(2, 7, 65534) + entry(4, 0) + entry(16, 7) + entry(32, 0))
    except OSError as e:
        pytest.skip(f"no ACLs here: {e}")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o770
    done = run_cli("backup", str(folder / "copy.db"), "--data-dir", server.data_dir)
    assert done.returncode == 2 and "other users may write in" in done.stderr, done
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("signum, code, said", [
    (signal.SIGINT, 130, "buildserver: interrupted: {dest} was not written\n"),
    (signal.SIGHUP, 129, "")])  # (its ssh session closed: it left the whole copy)
def test_a_backup_interrupted_by_ctrl_c_says_so_and_leaves_nothing(tmp_path, signum, code, said):
    # It ended in a KeyboardInterrupt traceback (SIGTERM was already quiet).
    data = tmp_path / "data"
    assert run_cli("adduser", "carol", "--data-dir", str(data)).returncode == 0
    with contextlib.closing(sqlite3.connect(data / "buildserver.db")) as db, db:
        db.execute("CREATE TABLE bulk (b BLOB)")  # a copy that takes a while
        db.executemany("INSERT INTO bulk VALUES (randomblob(1048576))", [()] * 300)
    dest = tmp_path / "copy.db"
    proc = subprocess.Popen([sys.executable, SCRIPT, "backup", str(dest), "--data-dir",
                             str(data)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)

    def begun():
        partial = [*tmp_path.glob(f".buildserver-backup.{proc.pid}.*.partial/copy.db")]
        return partial and partial[0].stat().st_size or proc.poll() is not None
    wait_until(begun, interval=0.002, message="the copy to begin")
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the copy was done before the interrupt came")
    assert (proc.returncode, err) == (code, said.format(dest=dest))
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_a_backup_onto_the_files_beside_a_linked_database_is_refused(server_factory, tmp_path):
    # A database linked to another disk has its -wal and -shm beside the link's
    # target: a backup written there replaced the live -wal (a crash then lost
    # committed builds), or vanished when the server closed.
    data, disk = tmp_path / "data", tmp_path / "disk"
    first = server_factory(data_dir=data)
    token = first.token
    first.stop()
    disk.mkdir()
    os.rename(data / "buildserver.db", disk / "buildserver.db")
    os.symlink(disk / "buildserver.db", data / "buildserver.db")
    server = server_factory(data_dir=data)
    server.token = token
    assert api(server, "POST", "/api/v1/admin", {"name": "app"})[0] == 201
    wal = disk / "buildserver.db-wal"
    assert wal.exists() and not (data / "buildserver.db-wal").exists()
    for dest in (wal, disk / "buildserver.db-shm", disk / "buildserver.db"):
        before = dest.read_bytes()
        done = run_cli("backup", str(dest), "--data-dir", str(data))
        assert done.returncode == 2 and "is the database itself" in done.stderr, done.stderr
        assert dest.read_bytes() == before
    assert api(server, "GET", "/api/v1/admin/app")[0] == 200


def test_a_backup_taken_while_the_server_writes_is_whole_and_holds_earlier_builds(
        server_factory, tmp_path):
    server = server_factory("--workers", "0")
    api(server, "POST", "/api/v1/admin", {"name": "app", "command": "true"})
    before = {}
    for _ in range(30):
        status, build = api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
        assert status == 201
        status, reply = api(server, "POST", f"/api/v1/admin/app/builds/{build['id']}/logs",
                            b"y" * 20000, headers={"Content-Type": "text/plain"})
        before[build["id"]] = reply["size"]
    writing, written, problems = threading.Event(), [], []

    def writer():
        while not writing.is_set():
            status, build = api(server, "POST", "/api/v1/admin/app/builds", {"is_managed": False})
            if status != 201:
                problems.append(build)
                return
            status, reply = api(server, "POST", f"/api/v1/admin/app/builds/{build['id']}/logs",
                                b"z" * 100000, headers={"Content-Type": "text/plain"})
            if status != 200:
                problems.append(reply)
            written.append(build["id"])

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(written) >= 3, message="the writers to be busy")
        dest = tmp_path / "copy.db"
        done = run_cli("backup", str(dest), "--data-dir", server.data_dir)
        during = len(written)
    finally:
        writing.set()
        for thread in threads:
            thread.join(30)
    assert done.returncode == 0, done.stderr
    assert not problems
    assert during > 3 or len(written) > during  # the writes went on around the backup
    assert integrity(str(dest)) == [("ok",)]
    assert user_version(str(dest)) == max(schema_migrations())
    conn = sqlite3.connect(dest)
    try:
        copied = dict(conn.execute("SELECT number, log_size FROM builds"))
    finally:
        conn.close()
    for number, size in before.items():
        assert copied[number] == size
    # The copy is a database a server starts on.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(dest, restored / "buildserver.db")
    other = server_factory("--workers", "0", data_dir=restored)
    other.token = server.token
    assert other.request("GET", "/api/v1/admin/app/builds/1/logs")[2] == b"y" * 20000

###############################################################################
# Schema-based fuzzing ########################################################
###############################################################################
# schemathesis (a test-only dependency) runs twice against a real server's
# own /api/v1/openapi.json, with a token, over every operation: no 5xx,
# nothing that breaks the document, a fixed seed and example budget.
# - "deep": the coverage and fuzzing phases with the path parameters pinned to
#   existing resources (admin/app/builds/1, ...), so bodies and query strings
#   reach validation and the handlers instead of stopping at a 404;
# - "wide": the fuzzing and stateful phases with the path parameters free, but
#   drawn from the existing names and ids half of the time.

FUZZ_SEED = 20261128
FUZZ_EXAMPLES = 20          # per operation and phase; the whole test takes about a minute
FUZZ_CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
               "response_schema_conformance", "negative_data_rejection",
               "positive_data_acceptance")

# A managed build with a log worth reading: 300 short lines, then multi-byte text.
LOGGED_COMMAND = "seq 1 300; printf 'caf\\303\\251 \\342\\234\\223\\n'"

# What the fuzzer may act on, made before it starts (ids are per project):
#   admin/app         command `true`, the target of every operation unless said otherwise
#     build 1         managed, succeeded, with a log (reads, stop, restart, PATCH)
#     build 2         unmanaged, created: status reports
#     build 3         unmanaged, created: log appends
#   admin/patched     PATCH of a project (a fuzzed PATCH of app would change the command
#                     every build of app runs, and a null one makes their creation a 400)
#   admin/doomed      DELETE of a project: a finished build and a running unmanaged one
#   admin/scratch     DELETE of a build: three builds that may go
FIXTURE_PROJECTS = ("app", "patched", "doomed", "scratch")

_COMMON_CONFIG = """\
workers = 1
request-timeout = 15
headers = {{ Authorization = "Token ${{BUILDSERVER_FUZZ_TOKEN}}" }}
hooks = "{hooks}"

[generation]
mode = "all"
database = "none"

[cache]
enabled = false

[checks]
enabled = false
{checks}

[phases.examples]
enabled = false
"""

# The deep pass: every path parameter pinned, so that the coverage phase (which
# takes no dictionaries) reaches past the lookups. The DELETEs and the project
# PATCH get projects of their own (see FIXTURE_PROJECTS): on admin/app they
# would wipe or rewrite what every other operation works on. No operation is
# left out.
_DEEP_CONFIG = """\
[phases.coverage]
enabled = true
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = false

[dictionaries.status_ids]
values = ["1", "2", "3"]

[parameters]
"path.username" = "admin"
"path.project_name" = "app"
"path.build_id" = "1"
"path.status_id" = { dictionary = "status_ids", probability = 0.5 }

[[operations]]
include-operation-id = "report_status_post"
parameters = { "path.build_id" = "2" }

[[operations]]
include-operation-id = "append_logs_post"
parameters = { "path.build_id" = "3" }

[[operations]]
include-operation-id = "patch_project_patch"
parameters = { "path.project_name" = "patched" }

[[operations]]
include-operation-id = "delete_project_delete"
parameters = { "path.project_name" = "doomed" }

[[operations]]
include-operation-id = "delete_build_delete"
parameters = { "path.project_name" = "scratch", "path.build_id" = "1" }
"""

# The wide pass: path parameters free, half of the time an existing one (and
# schemathesis also reuses names and ids seen in responses, which is why the
# DELETEs stay pinned to their own projects here too).
# follow is pinned to 0: a follower of a build that is never final (an
# unmanaged one: the fuzzer creates and restarts them) is answered only when
# the build ends, by design, so it would end in a client timeout instead.
# (The deep pass fuzzes follow on build 1, which is final.)
_WIDE_CONFIG = """\
[phases.coverage]
enabled = false
[phases.fuzzing]
enabled = true
[phases.stateful]
enabled = true
max-steps = 10

[dictionaries.users]
values = ["admin"]
[dictionaries.projects]
values = ["app"]
[dictionaries.builds]
values = ["1", "2", "3", "4"]
[dictionaries.status_ids]
values = ["1", "2", "3"]

[parameters]
"path.username" = { dictionary = "users", probability = 0.5 }
"path.project_name" = { dictionary = "projects", probability = 0.5 }
"path.build_id" = { dictionary = "builds", probability = 0.5 }
"path.status_id" = { dictionary = "status_ids", probability = 0.5 }

[[operations]]
include-operation-id = "get_logs_get"
parameters = { "query.follow" = "0" }

[[operations]]
include-operation-id = "patch_project_patch"
parameters = { "path.project_name" = "patched" }

[[operations]]
include-operation-id = "delete_project_delete"
parameters = { "path.project_name" = "doomed" }

[[operations]]
include-operation-id = "delete_build_delete"
parameters = { "path.project_name" = "scratch" }
"""

# schemathesis's own filter: `filter_failure` drops a failure the server is
# right about, matched as narrowly as the request and the server's answer allow. Everything else
# fails the run.
_HOOKS = '''\
import json
import os

import schemathesis

TRUTHY = ("1", "true", "yes")


def _answer(response):
    try:
        body = json.loads(response.content)
    except ValueError:
        return "", {}
    return (body.get("detail") or "", body.get("errors") or {}) if isinstance(body, dict) else ("", {})


def _blank(body):
    """Whether a body holds nothing but JSON's white space (or nothing)."""
    if isinstance(body, bytes):
        body = body.decode("latin-1")
    return isinstance(body, str) and not body.strip(" \\t\\r\\n")


def is_expected(code, operation, case, response):
    """Why a failure is not one: a short reason, or None."""
    query, body = case.query or {}, case.body
    detail, errors = _answer(response)
    if code == "ST201" and response.status_code < 300 and _blank(body):
        return "README: a blank body counts as none (a PATCH of nothing changes nothing)"
    if code == "ST202" and response.status_code == 400:
        # SPEC: these depend on stored state, which a schema cannot say.
        if operation == "create_project_post" and errors == {"name": "is taken"}:
            return "SPEC: a taken project name is a 400"
        if operation == "report_status_post" and (
                str(errors.get("status", "")).startswith("not allowed after")
                or detail.startswith("This build is managed")):
            return "SPEC: a report that breaks the status machine, or of a managed build, is a 400"
        if operation == "append_logs_post" and (
                detail.startswith("This build is managed") or detail.endswith("its log is closed.")):
            return "SPEC: only unmanaged builds that are not final take log appends"
        if operation == "create_build_post" and str(errors.get("command", "")).startswith("is required"):
            return "SPEC: no command in the request nor in the project is a 400"
        # SPEC: follow is for the text format; two parameters' rule, which
        # OpenAPI parameters cannot say.
        if operation == "get_logs_get" and errors.get("follow") == "needs format=text":
            return "SPEC: follow needs the text format"
    return None


@schemathesis.hook
def filter_failure(context, failure, case, response):
    operation = case.operation.definition.raw.get("operationId")
    reason = is_expected(failure.code, operation, case, response)
    if reason is not None:
        with open(os.environ["BUILDSERVER_FUZZ_DROPPED"], "a", encoding="utf-8") as f:
            f.write(f"{failure.code} {operation}: {reason}\\n")
    return reason is None
'''


def _fuzz_config(kind, hooks_path):
    checks = "\n".join(f"{name}.enabled = true" for name in FUZZ_CHECKS)
    specific = {"deep": _DEEP_CONFIG, "wide": _WIDE_CONFIG}[kind]
    return _COMMON_CONFIG.format(hooks=hooks_path, checks=checks) + "\n" + specific


def _make_fuzz_fixtures(server):
    def call(method, path, body=None, expect=(200, 201)):
        status, answer = server.json(method, "/api/v1/admin" + path, body)
        assert status in expect, (method, path, status, answer)
        return answer

    for name in FIXTURE_PROJECTS:
        call("POST", "", {"name": name, "command": "true"})
    assert call("POST", "/app/builds", {"command": LOGGED_COMMAND})["id"] == 1
    assert call("POST", "/app/builds", {"is_managed": False})["id"] == 2
    assert call("POST", "/app/builds", {"is_managed": False})["id"] == 3
    call("POST", "/doomed/builds", {})
    call("POST", "/doomed/builds", {"is_managed": False})
    call("POST", "/doomed/builds/2/statuses", {"status": "running"})
    call("POST", "/doomed/builds/2/logs", "a line\n")
    call("POST", "/scratch/builds", {})
    call("POST", "/scratch/builds", {"is_managed": False})
    call("POST", "/scratch/builds", {"is_managed": False})
    call("POST", "/scratch/builds/3/statuses", {"status": "running"})
    for path in ("/app/builds/1", "/doomed/builds/1", "/scratch/builds/1"):
        assert server_final_build(server, "/api/v1/admin" + path)["last_status"] == "succeeded"


def _run_schemathesis(server, tmp_path, kind):
    """Run one pass; returns (exit code, output)."""
    hooks = tmp_path / "fuzz_hooks.py"
    hooks.write_text(_HOOKS)
    config_file = tmp_path / f"schemathesis-{kind}.toml"
    config_file.write_text(_fuzz_config(kind, hooks))
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config_file), "run",
               f"http://{server.host}:{server.port}/api/v1/openapi.json",
               "--seed", str(FUZZ_SEED), "--max-examples", str(FUZZ_EXAMPLES), "--no-color"]
    env = {**os.environ, "BUILDSERVER_FUZZ_TOKEN": server.token,
           "BUILDSERVER_FUZZ_DROPPED": str(tmp_path / "dropped.txt")}
    try:
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
    except subprocess.TimeoutExpired as e:
        return "timed out", f"$ {' '.join(command)}\n{e.stdout or ''}{e.stderr or ''}"
    return proc.returncode, f"$ {' '.join(command)}\n{proc.stdout}{proc.stderr}"


def test_schemathesis_finds_nothing_against_a_real_server(server_factory, tmp_path):
    assert importlib.util.find_spec("schemathesis"), \
        "schemathesis is a test dependency: pip install -r requirements-dev.txt"
    data_dir = tmp_path / "fuzz"
    server = server_factory("--workers", "1", "--stop-grace", "1", "--auth-burst", "0",
                            data_dir=data_dir)
    _make_fuzz_fixtures(server)

    started = time.monotonic()
    outputs = []
    for kind in ("deep", "wide"):
        code, output = _run_schemathesis(server, tmp_path, kind)
        outputs.append(output)
        assert code == 0, f"schemathesis ({kind} pass) found something:\n{output}"
    print(f"schemathesis: both passes in {time.monotonic() - started:.1f} s; failures dropped:")
    dropped = tmp_path / "dropped.txt"
    for reason, count in collections.Counter(
            dropped.read_text().splitlines() if dropped.exists() else []).most_common():
        print(f"{count:6d}  {reason}")

    # The server survived, logged no error, and kept what the fuzzer was not given.
    assert server.proc.poll() is None, "\n".join(outputs)
    assert server.json("GET", "/api/v1/health", token="") == (200, {"status": "ok"})
    status, body = server.json("GET", "/api/v1/admin/app/builds/1/logs?format=json&tail=1")
    assert (status, body["text"]) == (200, "caf\u00e9 \u2713\n")
    for path in ("/api/v1/admin/app", "/api/v1/admin/app/builds/2", "/api/v1/admin/app/builds/3"):
        assert server.json("GET", path)[0] == 200, path
    errors = [line for line in server.stderr_lines if " ERROR " in line or "Traceback" in line]
    assert not errors, "".join(server.stderr_lines)
    server.stop()
    assert server.proc.returncode == 0
    with sqlite3.connect(data_dir / "buildserver.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


###############################################################################
# What the fuzzing found, pinned ##############################################
###############################################################################
# Each pins what the fuzz run found, once fixed.

def _json_request(web, method, path, token, body):
    """A request with a raw JSON body (for texts json.dumps would not write)."""
    return web.request(path, method=method, body=body,
                       headers={**auth(token), "Content-Type": "application/json"},
                       expect_errors=True)


@pytest.mark.parametrize("target", ["project", "build"])
def test_patch_without_a_body_changes_nothing(web, alice, project, target):
    path = project
    if target == "build":
        path = project + "/builds/%d" % web.post_json(
            project + "/builds", {"is_managed": False}, headers=auth(alice)).json["id"]
    before = web.get(path, headers=auth(alice)).json
    res = web.request(path, method="PATCH", headers=auth(alice), expect_errors=True)
    assert res.status_int == 200, res.body
    assert res.json == before


def _query_parameters(document):
    return [(f"{method.upper()} {path}", parameter)
            for path, operations in document["paths"].items()
            for method, operation in operations.items()
            for parameter in operation["parameters"] if parameter["in"] == "query"]


def test_the_document_says_an_empty_query_value_counts_as_absent(web, alice, project):
    build = project + "/builds/%d" % web.post_json(
        project + "/builds", {"is_managed": False}, headers=auth(alice)).json["id"]
    for url in ("/api/v1/alice?limit=&offset=", project + "/builds?limit=&offset=&status=",
                build + "/statuses?limit=&offset=",
                build + "/logs?offset=&limit=&tail=&follow=&format="):
        assert web.get(url, headers=auth(alice)).status_int == 200, url
    document = web.get("/api/v1/openapi.json").json
    parameters = _query_parameters(document)
    assert parameters
    assert [(operation, parameter["name"]) for operation, parameter in parameters
            if parameter.get("allowEmptyValue") is not True] == []


def test_the_documented_status_filter_takes_what_the_server_takes(web, alice, project):
    document = web.get("/api/v1/openapi.json").json
    (schema,) = [p["schema"] for operation, p in _query_parameters(document)
                 if p["name"] == "status"]
    for value in ("running", "running,failed", "running,", ",running", "running,,failed"):
        assert web.get(project + "/builds?status=" + value, headers=auth(alice)).status_int == 200
        assert buildserver.conforms(value, schema), value
    assert web.get(project + "/builds?status=runnin", headers=auth(alice),
                   expect_errors=True).status_int == 400
    assert not buildserver.conforms("runnin", schema)


def test_a_whole_number_written_with_a_fraction_is_a_whole_number(web, alice, project):
    res = web.post_json(project + "/builds", {"timeout": 70.0, "is_managed": False},
                        headers=auth(alice), expect_errors=True)
    assert res.status_int == 201, res.body
    assert res.json["timeout"] == 70 and type(res.json["timeout"]) is int
    res = web.patch_json(project, {"timeout": 600.0}, headers=auth(alice), expect_errors=True)
    assert (res.status_int, res.json["timeout"]) == (200, 600)
    res = web.post_json(project + "/builds", {"timeout": 70.5}, headers=auth(alice),
                        expect_errors=True)
    assert res.status_int == 400 and "timeout" in res.json["errors"]


def test_a_json_log_page_asked_beyond_the_cap_is_cut_to_the_cap(web, alice, project):
    build = project + "/builds/%d" % web.post_json(
        project + "/builds", {"is_managed": False}, headers=auth(alice)).json["id"]
    web.post(build + "/logs", b"one\ntwo\n", headers=auth(alice), content_type="text/plain")
    res = web.get(build + "/logs?format=json&limit=%d" % (buildserver.LOG_JSON_MAX + 1),
                  headers=auth(alice), expect_errors=True)
    assert res.status_int == 200, res.body
    assert (res.json["text"], res.json["next_offset"]) == ("one\ntwo\n", 8)


@pytest.mark.parametrize("method, path, body", [
    ("POST", "", b'{"name": "p2", "\\ud800": 1}'),
    ("PATCH", "/app", b'{"\\ud800": 1}'),
    ("POST", "/app/builds", b'{"\\udfff": null}'),
    ("POST", "/app/builds/1/statuses", b'{"status": "running", "\\ud800x": "y"}'),
], ids=["create project", "patch project", "create build", "report status"])
def test_a_lone_surrogate_in_a_field_name_is_a_400(web, alice, project, method, path, body):
    web.post_json(project + "/builds", {"is_managed": False}, headers=auth(alice))
    res = _json_request(web, method, "/api/v1/alice" + path, alice, body)
    assert res.status_int == 400, res.body
    assert res.json["detail"]
    assert web.get(project + "/builds", headers=auth(alice)).json["count"] == 1


def test_the_document_says_that_it_needs_no_token(web):
    # Finding 6 (found while writing the fuzz test, fixed in d6df5f3).
    document = web.get("/api/v1/openapi.json").json  # no token
    assert not document["paths"]["/api/v1/openapi.json"]["get"].get("security")
    assert not document["paths"]["/api/v1/health"]["get"].get("security")
    assert document["paths"]["/api/v1/users"]["get"]["security"] == [{"token": []}]


def test_the_document_asks_a_token_exactly_where_the_server_does(web):
    # (It named the routes without one by hand.) is_public is what the
    # authorization matrix holds every route's answer to.
    document = web.get("/api/v1/openapi.json").json
    operations = [(path, method, operation) for path, methods in document["paths"].items()
                  for method, operation in methods.items()]
    assert len(operations) == len(buildserver.ROUTES)
    assert [(method, path) for path, method, operation in operations
            if bool(operation.get("security")) == is_public(path)] == []


def test_the_document_names_every_error_the_api_answers_with():
    # The app's (ApiError, refusals before routing, statuses set outright:
    # a database that fails) and waitress's own, which the channel answers in
    # JSON too (a header too large, an unknown Transfer-Encoding).
    from waitress import utilities
    with open(buildserver.__file__, encoding="utf-8") as f:
        source = f.read()
    raised = set(re.findall(r"ApiError\((\d{3})", source))
    refused = set(re.findall(r"return (\d{3}), ", inspect.getsource(
        buildserver._refused_before_routing)))
    errors_set = {code for code in re.findall(r"\.status = (\d{3})\b", source) if code >= "400"}
    waitress_errors = {str(error.code) for error in vars(utilities).values()
                       if isinstance(error, type) and issubclass(error, utilities.Error)}
    assert raised and refused and {"431", "501"} <= waitress_errors and "503" in errors_set
    assert raised | refused | errors_set | waitress_errors <= set(buildserver.ERROR_ANSWERS)


@pytest.mark.filterwarnings("ignore::webtest.lint.WSGIWarning")  # (made-up methods)
@pytest.mark.parametrize("path", ["/api/v1/health", "/api/v1/users", "/api/v1/openapi.json",
                                  "/api/v1/bookmarks/alice/builds"])
def test_a_fixed_route_answers_405_to_the_methods_it_has_not(web, alice, path):
    # TRACE and made-up methods too: Bottle's own 405 named every method
    # routed at the path, those that answer 405 included.
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "PROPFIND", "FOO"):
        res = web.request(path, method=method, headers=auth(alice), expect_errors=True)
        assert res.status_int == 405, (method, res.status_int, res.body)
        assert res.headers["Allow"] == "GET,HEAD", method
        assert res.json["detail"] == f"{method} is not allowed here; use GET, HEAD."


@pytest.mark.filterwarnings("ignore::webtest.lint.WSGIWarning")  # (made-up methods)
def test_a_made_up_method_on_a_fixed_path_among_parameters_names_only_its_own(web, alice,
                                                                               populated):
    for method in ("TRACE", "FOO"):
        res = call(web, method, populated + "/builds/invalidate", alice)
        assert_error(res, 405)
        assert res.headers["Allow"] == "POST", method


###############################################################################
# Benchmark ###################################################################
###############################################################################

BENCH_KEYS = (
    "dispatch_ms_median", "dispatch_ratio", "burst_s", "log_capture_ratio",
    "log_capture_cpu_s", "log_capture_rss_growth_mb", "log_read_mb_s", "tail_ms",
    "api_ratio", "api_p99_ms", "stop_ms", "scale_ratio", "idle_rss_mb",
    "dispatch_floor_ms_median", "dispatch_floor_ratio", "dispatch_cpu_ms",
    "dispatch_floor_cpu_ms", "dispatch_cpu_ratio")


def test_bench_quick_writes_every_figure_as_a_number(tmp_path):
    """bench.py must not rot: --quick runs end to end (speed itself is not asserted)."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quick mode" in done.stdout
    figures = json.loads(out.read_text())
    for key in BENCH_KEYS:
        value = figures.get(key)
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (key, value)
    assert isinstance(figures["machine"], str) and figures["machine"]

###############################################################################
# Dashboard (in a real browser) ###############################################
###############################################################################
# Debian's Chromium driven by Playwright, against a real waitress server.
# Needs `pip install playwright` and `apt-get install chromium` (.ci/run does
# both; playwright's own browser download is never used).

CHROMIUM = os.environ.get("BUILDSERVER_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.environ.get("DASHBOARD_SCREENSHOTS", "/tmp")
LIVE_COMMAND = "for i in 1 2 3 4; do echo line $i; sleep 0.5; done"
if expect is not None:
    expect.set_options(timeout=10_000)


class Dashboard:
    """The served app: its URL, two users' tokens, and a small REST client."""

    def __init__(self, url, app):
        self.url, self.app = url, app
        self.alice = app.store.create_user("alice")
        self.root = app.store.create_user("root", is_admin=True)

    def api(self, method, path, body=None, token=None):
        request = urllib.request.Request(
            self.url + "/api/v1" + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Token {token or self.alice}",
                     "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            raise AssertionError(f"{method} {path}: {e.code} {e.read()!r}") from None

    def project(self, name, **fields):
        return self.api("POST", "/alice", {"name": name, **fields})

    def final_build(self, path, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            build = self.api("GET", path)
            if build["last_status"] in buildserver.FINAL:
                return build
            assert time.monotonic() < deadline, f"{path} did not finish"
            time.sleep(0.05)


def open_new_build(page, dash, name, command):
    """Sign in, make alice's project `name` with `command` and a build of it,
    and open the build's page; returns the build."""
    dash.project(name, command=command)
    sign_in(page, dash)
    build = dash.api("POST", f"/alice/{name}/builds")
    page.goto(dash.url + f"/#/alice/{name}/builds/{build['id']}")
    return build


def running_unmanaged(dash, project):
    """The path of a build of alice's new `project` that reads `running`, run by nobody."""
    dash.project(project)
    path = f"/alice/{project}/builds/" + str(
        dash.api("POST", f"/alice/{project}/builds", {"is_managed": False})["id"])
    dash.api("POST", path + "/statuses", {"status": "running"})
    return path


def dash_request(dash, method, path, body=None):
    """(status, headers, body) of a request as alice, `body` bytes sent as they are."""
    request = urllib.request.Request(dash.url + "/api/v1" + path, method=method, data=body,
                                     headers={"Authorization": f"Token {dash.alice}",
                                              "Content-Type": "application/octet-stream"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


@pytest.fixture(scope="module")
def dash(tmp_path_factory):
    """A real server on a free loopback port, run in a thread (see served_here)."""
    config = buildserver.Config(data_dir=str(tmp_path_factory.mktemp("dashboard")), port=0,
                                workers=2, threads=16, stop_grace=1)
    with served_here(config) as (app, server):
        yield Dashboard(f"http://127.0.0.1:{server.effective_port}", app)


@pytest.fixture(scope="module")
def browser():
    if sync_playwright is None or not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail(f"the browser tests need playwright and {CHROMIUM}; see .ci/run")
        pytest.skip(f"the browser tests need playwright and {CHROMIUM}; see .ci/run")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def open_page(browser, dash):
    """open_page(width, height): a fresh browser context's page. Every console
    message, page error and token-bearing URL is a failure, but for the
    messages a test lists in open_page.allowed."""
    contexts, problems, urls = [], [], []

    def open_(width=1280, height=800):
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("request", lambda r: urls.append(r.url))
        return page
    open_.allowed = []
    yield open_
    for context in contexts:
        context.close()
    assert [p for p in problems if not any(a in p for a in open_.allowed)] == []
    assert not [u for u in urls if dash.alice in u or dash.root in u], "a token went into a URL"


@pytest.fixture
def page(open_page):
    return open_page()


def sign_in(page, dash, token=None):
    page.goto(dash.url + "/")
    page.locator("#token").fill(token or dash.alice)
    page.locator("#token").press("Enter")
    expect(page.locator("#who-name")).to_have_text(re.compile("alice|root"))


def status_of(page):
    return page.locator("#status")


def log_of(page):
    return page.locator("#log")


# The page, scenario by scenario ------------------------------------------------

@pytest.mark.parametrize("slashes", ["//", "///"])
def test_the_page_at_doubled_slashes_talks_to_its_own_server(page, dash, slashes):
    # Its API's path read "//api/v1", to fetch() a host named "api": only
    # the page's CSP kept the token from going there.
    hosts = []
    page.on("request", lambda r: hosts.append(urllib.parse.urlsplit(r.url).netloc))
    page.goto(dash.url + slashes)
    page.locator("#token").fill(dash.alice)
    page.locator("#token").press("Enter")
    expect(page.locator("#who-name")).to_have_text("alice")
    assert set(hosts) == {urllib.parse.urlsplit(dash.url).netloc}


def test_a_wrong_token_gets_a_clear_message_and_the_right_one_lists_projects(page, dash, open_page):
    # Chromium itself logs every 4xx answer to fetch(); a page cannot silence that.
    open_page.allowed.append("console error: Failed to load resource: the server responded "
                             "with a status of 401 (Unauthorized)")
    dash.project("hello", command="true", description="says hello")
    dash.final_build("/alice/hello/builds/" + str(dash.api("POST", "/alice/hello/builds")["id"]))
    page.goto(dash.url + "/")
    expect(page.locator("#token")).to_be_focused()
    page.locator("#token").fill("not-a-real-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-error")).to_contain_text("That token was not accepted")
    expect(page.locator("#who")).to_be_hidden()

    page.locator("#token").fill(dash.alice)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Your projects")
    row = page.locator("tr", has=page.get_by_role("link", name="hello", exact=True))
    expect(row).to_contain_text("✓succeeded")
    expect(row).to_contain_text("says hello")
    expect(row.get_by_role("link", name="#1")).to_have_attribute("href", "#/alice/hello/builds/1")

    page.reload()  # the token is remembered
    expect(page.locator("#who-name")).to_have_text("alice")
    expect(page.get_by_role("link", name="hello", exact=True)).to_be_visible()
    page.get_by_role("button", name="Forget token").click()
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator("#login-error")).to_contain_text("Token forgotten")
    assert page.evaluate("localStorage.getItem('buildserver.token')") is None
    page.screenshot(path=os.path.join(SHOTS, "dashboard-sign-in.png"))


def test_an_admin_can_open_another_users_namespace(page, dash):
    dash.project("shared", description="alice's")
    sign_in(page, dash, dash.root)
    expect(page.locator("#who-name")).to_have_text("root (admin)")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your projects")
    page.get_by_label("Namespace").fill("alice")
    page.get_by_role("button", name="Show").click()
    expect(page).to_have_url(re.compile(r"#/alice$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("Projects of alice")
    expect(page.get_by_role("link", name="shared", exact=True)).to_be_visible()


def test_a_project_is_created_from_the_page_and_a_taken_name_is_explained(page, dash, open_page):
    open_page.allowed.append("console error: Failed to load resource: the server responded "
                             "with a status of 400 (Bad Request)")  # Chromium's own line, as above
    sign_in(page, dash)
    page.get_by_text("New project", exact=True).click()
    page.get_by_label("Name").fill("made-here")
    page.get_by_label("Default command").fill("echo made")
    page.get_by_role("button", name="Create project").click()
    expect(page).to_have_url(re.compile(r"#/alice/made-here$"))
    expect(page.locator(".fields")).to_contain_text("echo made")
    page.goto(dash.url + "/#/")
    page.get_by_text("New project", exact=True).click()
    page.get_by_label("Name").fill("made-here")
    page.get_by_role("button", name="Create project").click()
    expect(page.get_by_role("alert").filter(has_text="taken")).to_contain_text(
        "The project name 'made-here' is taken.")


def test_a_triggered_build_shows_its_log_live_and_ends_succeeded(page, dash):
    dash.project("live", command="echo default")
    sign_in(page, dash)
    page.get_by_role("link", name="live", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("live")
    page.get_by_text("Options: command, environment, name, tags").click()
    page.get_by_label("Command").fill(LIVE_COMMAND)
    page.get_by_label("Environment").fill("GREETING=hi")
    page.get_by_label("Tags").fill("smoke, ui")
    page.get_by_role("button", name="Trigger build").click()

    expect(page).to_have_url(re.compile(r"#/alice/live/builds/1$"))
    page.evaluate("window.sameDocument = true")
    expect(log_of(page)).to_contain_text("line 1")
    assert "line 4" not in log_of(page).text_content()  # it streams: the build is not done
    expect(status_of(page)).to_have_text("▶running")
    expect(log_of(page)).to_contain_text("line 1\nline 2\nline 3\nline 4")
    expect(status_of(page)).to_have_text("✓succeeded")
    assert page.evaluate("window.sameDocument") is True  # no reload
    expect(page.locator("#live")).to_be_hidden()
    expect(log_of(page)).to_have_text(re.compile(r"^line 1\nline 2\nline 3\nline 4\n$"))  # once each
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator("#restart")).to_be_enabled()
    expect(page.locator(".timeline")).to_contain_text("succeeded")
    expect(page.locator(".timeline")).to_contain_text("exit code 0")
    expect(page.locator(".fields")).to_contain_text("smoke")
    page.screenshot(path=os.path.join(SHOTS, "dashboard-build-desktop.png"), full_page=True)

    page.get_by_role("navigation", name="Breadcrumb").get_by_role("link", name="live").click()
    row = page.locator("tbody tr").first
    expect(row).to_contain_text("✓succeeded")
    expect(row).to_contain_text("#1")
    expect(row).to_contain_text("smoke")
    expect(row).to_contain_text("alice")
    page.screenshot(path=os.path.join(SHOTS, "dashboard-project-desktop.png"), full_page=True)


def _seen_as(hidden):
    """A script that makes the page see itself hidden (or shown), as a browser
    tells a tab put behind another (headless Chromium never hides one)."""
    state = "hidden" if hidden else "visible"
    return (f"Object.defineProperty(document, 'hidden', {{configurable: true, get: () => "
            f"{str(hidden).lower()}}}); Object.defineProperty(document, 'visibilityState', "
            f"{{configurable: true, get: () => '{state}'}}); "
            "document.dispatchEvent(new Event('visibilitychange'))")


def test_a_hidden_tab_lets_go_of_its_follow_and_takes_it_up_when_seen(page, dash):
    # Chromium opens six connections to a server: six tabs following logs held
    # them all, and every other request of every tab waited (a Stop, a page).
    path = running_unmanaged(dash, "hidden")
    dash.api("POST", path + "/logs", "before\n")  # (a JSON string: its text)
    idle = dash.app.config.max_waiting  # (once earlier tests' pages have let go of theirs)
    wait_until(lambda: free_slots(dash.app) == idle, message="every follower slot free")
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text("before")
    # (The follow starts after the first text is shown: on a busy machine, later.)
    wait_until(lambda: free_slots(dash.app) == idle - 1, message="the follow")
    page.evaluate(_seen_as(hidden=True))
    wait_until(lambda: free_slots(dash.app) == idle, message="the follow to end")
    dash.api("POST", path + "/logs", "while hidden\n")
    page.evaluate(_seen_as(hidden=False))
    expect(log_of(page)).to_have_text(re.compile(r"^before\nwhile hidden\n$"))
    wait_until(lambda: free_slots(dash.app) == idle - 1, message="a follow again")
    dash.api("POST", path + "/logs", "after\n")
    expect(log_of(page)).to_have_text(re.compile(r"^before\nwhile hidden\nafter\n$"))
    dash.api("POST", path + "/statuses", {"status": "succeeded"})
    expect(status_of(page)).to_have_text("✓succeeded")


def test_a_list_says_the_server_is_back_and_a_revoked_token_signs_out(page, dash, open_page):
    # A failed refresh's notice stayed after the server came back, and a
    # revoked token got "Send the header 'Authorization: ...'" beside
    # "Signed in as alice".
    open_page.allowed.append("Failed to load resource")  # Chromium logs each failed fetch
    dash.project("notices")
    build = dash.api("POST", "/alice/notices/builds", {"is_managed": False})
    dash.api("POST", f"/alice/notices/builds/{build['id']}/statuses", {"status": "running"})
    sign_in(page, dash)
    page.clock.install()  # (each step waits for a refresh: 5 s on the page's clock)
    page.goto(f"{dash.url}/#/alice/notices")
    expect(page.get_by_role("heading", level=1)).to_have_text("notices")
    page.route("**/api/v1/alice/notices/builds*", lambda route: route.abort())
    page.clock.run_for(6000)
    expect(page.locator("#notice")).to_contain_text(re.compile(".+"))
    page.unroute("**/api/v1/alice/notices/builds*")
    page.clock.run_for(6000)
    expect(page.locator("#notice")).to_be_empty()
    page.route("**/api/v1/alice/notices/builds*", lambda route: route.fulfill(
        status=401, content_type="application/json", body='{"detail": "Authentication failed"}'))
    page.clock.run_for(6000)
    expect(page.locator("#token")).to_be_visible()
    expect(page.get_by_text("no longer accepted")).to_be_visible()


@pytest.mark.parametrize("address", ["#/health", "#/users", "#/bookmarks", "#/health/x"])
def test_an_address_under_an_api_path_is_no_page(page, dash, address):
    # "Cannot read properties of undefined (reading 'some')", or "There is no
    # endpoint at /api/v1/bookmarks."
    sign_in(page, dash)
    page.goto(f"{dash.url}/{address}")
    expect(page.get_by_role("heading", level=1)).to_have_text("Not found")
    expect(page.get_by_text("There is no page at this address")).to_be_visible()


def test_stop_ends_a_running_build_stopped_and_restart_starts_another(page, dash):
    dash.project("sleepy", command="sleep 60")
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/sleepy")
    page.get_by_role("button", name="Trigger build").click()
    expect(page).to_have_url(re.compile(r"#/alice/sleepy/builds/1$"))
    expect(status_of(page)).to_have_text("▶running")
    expect(page.locator("#restart")).to_be_disabled()
    page.get_by_role("button", name="Stop").click()
    expect(status_of(page)).to_have_text("■stopped")
    expect(page.locator("#stop")).to_be_disabled()
    expect(page.locator(".timeline")).to_contain_text("stopped by alice")

    page.get_by_role("button", name="Restart").click()
    expect(page).to_have_url(re.compile(r"#/alice/sleepy/builds/2$"))
    expect(page.locator(".fields")).to_contain_text("#1")  # restarted from
    expect(status_of(page)).to_have_text("▶running")
    page.get_by_role("button", name="Stop").click()
    expect(status_of(page)).to_have_text("■stopped")


def test_a_build_is_bookmarked_from_its_page_and_shows_the_code_a_script_recorded(page, dash):
    dash.project("marked", command="true")
    build = dash.api("POST", "/alice/marked/builds")
    path = f"/alice/marked/builds/{build['id']}"
    dash.api("POST", path + "/coderef", {"commit": "0123456789abcdef" * 2 + "01234567",
                                         "branch": "release<b>", "git_url": "https://git/x.git",
                                         "is_dirty": True})
    dash.final_build(path)
    sign_in(page, dash)
    page.goto(dash.url + "/#" + path)
    fields = page.locator(".fields")
    expect(fields).to_contain_text("release<b> @ 0123456789ab (with uncommitted changes)")
    expect(fields).to_contain_text("https://git/x.git")
    mark = page.get_by_role("button", name="Bookmark")
    expect(mark).to_have_attribute("aria-pressed", "false")
    mark.click()
    expect(page.locator("#bookmark")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#bookmark")).to_have_text("★ Bookmarked")
    assert dash.api("GET", path)["bookmarked"] is True
    page.goto(dash.url + "/#/alice/marked")
    expect(page.locator("tr", has=page.locator(f"#build-{build['id']}"))).to_contain_text(
        "★ (bookmarked)")
    page.goto(dash.url + "/#" + path)
    page.locator("#bookmark").click()
    expect(page.locator("#bookmark")).to_have_attribute("aria-pressed", "false")
    assert dash.api("GET", path)["bookmarked"] is False


def test_ansi_colours_are_rendered_and_api_text_never_becomes_html(page, dash):
    dash.project("colours", description="<img src=x onerror=\"window.owned = 1\">",
                 command="printf '\\033[31mred\\033[0m plain \\033[1;38;5;82mgreen\\033[0m\\n<b>bold?</b>\\n'")
    dash.final_build(f"/alice/colours/builds/{dash.api('POST', '/alice/colours/builds')['id']}")
    sign_in(page, dash)
    expect(page.get_by_text("<img src=x onerror=\"window.owned = 1\">")).to_be_visible()
    page.goto(dash.url + "/#/alice/colours/builds/1")
    expect(log_of(page)).to_contain_text("red plain green\n<b>bold?</b>")
    text = log_of(page).text_content()
    assert "\x1b" not in text and "[31m" not in text and "[0m" not in text
    red = log_of(page).locator("span", has_text=re.compile("^red$"))
    assert red.evaluate("e => getComputedStyle(e).color") == "rgb(255, 107, 107)"
    green = log_of(page).locator("span", has_text=re.compile("^green$"))
    assert green.evaluate("e => getComputedStyle(e).fontWeight") == "700"
    assert green.evaluate("e => getComputedStyle(e).color") == "rgb(95, 255, 0)"  # xterm's 82
    assert page.locator("img").count() == 0 and log_of(page).locator("b").count() == 0
    assert page.evaluate("window.owned") is None

    # live, opened between the two halves of a line and of its colour sequence
    dash.project("split", command="printf 'a \\033[3'; sleep 1.5; printf '2mgreen\\033[0m b\\n'")
    dash.api("POST", "/alice/split/builds")
    deadline = time.monotonic() + 10
    while dash.api("GET", "/alice/split/builds/1")["log_size"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    page.goto(dash.url + "/#/alice/split/builds/1")
    expect(status_of(page)).to_have_text("✓succeeded")
    expect(log_of(page)).to_contain_text("a green b\n")
    assert log_of(page).inner_text().strip() == "a green b"  # as drawn: one line


def test_builds_are_paged_and_filtered_by_status(page, dash):
    dash.project("many")
    for number in range(1, 26):  # unmanaged builds: statuses are reported, nothing runs
        dash.api("POST", "/alice/many/builds", {"is_managed": False, "name": f"b{number}"})
        path = f"/alice/many/builds/{number}/statuses"
        dash.api("POST", path, {"status": "running"})
        dash.api("POST", path, {"status": "failed" if number % 5 == 0 else "succeeded"})
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/many")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(20)
    expect(rows.first).to_contain_text("#25")
    expect(page.locator(".pager")).to_contain_text("1–20 of 25")
    page.get_by_role("link", name="Older →").click()
    expect(rows).to_have_count(5)
    expect(page.locator(".pager")).to_contain_text("21–25 of 25")
    expect(page.locator("#page-next")).to_have_count(0)
    expect(page.get_by_role("heading", name="Builds")).to_be_focused()  # not lost to <body>

    page.get_by_label("failed").check()
    expect(rows).to_have_count(5)
    for row in rows.all():
        expect(row).to_contain_text("✗failed")
    expect(page).to_have_url(re.compile(r"#/alice/many\?status=failed$"))
    page.get_by_label("stopped").check()
    expect(page).to_have_url(re.compile(r"status=stopped%2Cfailed$|status=failed%2Cstopped$"))
    expect(rows).to_have_count(5)
    page.go_back()
    page.go_back()
    expect(page.get_by_label("failed")).not_to_be_checked()
    expect(rows).to_have_count(5)
    expect(rows.first).to_contain_text("#5")


def test_a_list_answer_that_comes_after_a_newer_ask_is_dropped(page, dash):
    # Older answer, drawn last: the address and the ticked filter said failed,
    # the list showed the builds of every status, until the next refresh.
    dash.project("racing")
    for status in ("succeeded", "failed", "succeeded"):
        build = dash.api("POST", "/alice/racing/builds", {"is_managed": False})
        for step in ("running", status):
            dash.api("POST", f"/alice/racing/builds/{build['id']}/statuses", {"status": step})
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/racing")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(3)
    held = []
    page.route(re.compile(r".*/builds\?limit=20&offset=0$"), lambda r: held.append(r))  # held
    page.evaluate("location.hash = '#/alice/racing?offset=0'")  # the unfiltered list, asked again
    while_page_waits(page, lambda: held, "the list asked again")
    page.get_by_label("failed").check()
    expect(rows).to_have_count(1)
    with answers_handled(page, "/builds?limit=20&offset=0", message="the older answer"):
        held[0].continue_()  # the older answer comes now
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("✗failed")
    page.unroute(re.compile(r".*/builds\?limit=20&offset=0$"))


def test_a_filter_clicked_while_the_server_is_away_keeps_the_page_and_what_was_typed(
        page, dash, open_page):
    # The whole page was replaced by "Something went wrong", the typed command lost.
    open_page.allowed.append("net::ERR_FAILED")
    dash.project("typed")
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/typed")
    page.get_by_text("Options: command, environment, name, tags").click()
    page.get_by_label("Command").fill("make deploy")
    page.route("**/builds?*status=failed*", lambda route: route.abort())
    page.get_by_label("failed").check()
    expect(page.locator("#notice")).to_contain_text("The server cannot be reached")
    expect(page.get_by_label("Command")).to_have_value("make deploy")
    page.unroute("**/builds?*status=failed*")
    page.get_by_label("failed").uncheck()
    expect(page.locator("#notice")).to_be_empty()  # it answers again


def test_a_notice_of_a_failed_try_goes_once_the_same_action_succeeds(page, dash, open_page):
    open_page.allowed.append("net::ERR_FAILED")
    dash.project("retried")
    build = dash.api("POST", "/alice/retried/builds", {"is_managed": False})
    dash.api("POST", f"/alice/retried/builds/{build['id']}/statuses", {"status": "stopped"})
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/retried/builds/{build['id']}")
    page.route("**/bookmark", lambda route: route.abort())
    page.locator("#bookmark").click()
    expect(page.locator("#notice")).to_contain_text("Could not change the bookmark")
    page.unroute("**/bookmark")
    page.locator("#bookmark").click()
    expect(page.locator("#bookmark")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#notice")).to_be_empty()


def test_a_notice_of_a_failed_try_outlasts_the_refreshes_that_work(page, dash, open_page):
    # The page's refresh of a running build (every 5 s) took it away within
    # seconds: a reader who looked away never learnt that their click failed.
    open_page.allowed.append("net::ERR_FAILED")
    path = running_unmanaged(dash, "outlasted")
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(status_of(page)).to_have_text("▶running")
    page.route("**/bookmark", lambda route: route.abort())
    page.locator("#bookmark").click()
    expect(page.locator("#notice")).to_contain_text("Could not change the bookmark")
    with answers_handled(page, "/api/v1" + path, "/statuses?limit=1000",
                         message="the next refresh"):
        pass
    expect(page.locator("#notice")).to_contain_text("Could not change the bookmark")


def test_load_earlier_that_failed_says_so_until_it_works(page, dash, open_page):
    open_page.allowed.append("net::ERR_FAILED")
    path = running_unmanaged(dash, "retried-earlier")
    dash.api("POST", path + "/logs", "".join(f"{n:09d}\n" for n in range(40_000)))  # 400 kB
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text(line_after_another("000039999"))
    page.route("**/logs?format=json*", lambda route: route.abort())
    page.locator("#earlier").click()
    expect(page.locator("#notice")).to_contain_text("Could not load earlier output")
    page.unroute("**/logs?format=json*")
    page.locator("#earlier").click()
    expect(log_of(page)).to_contain_text(line_after_another("000000001"))
    expect(page.locator("#notice")).to_be_empty()


def test_a_build_deleted_while_its_page_is_open_is_shown_deleted_with_nothing_to_do(
        page, dash, open_page):
    # It kept its last status, with Stop enabled, and asked every 5 s for ever.
    open_page.allowed.append("status of 404")
    dash.project("vanishing")
    build = dash.api("POST", "/alice/vanishing/builds", {"is_managed": False})
    open_page.allowed.append("net::ERR_FAILED")
    sign_in(page, dash)
    page.clock.install()
    page.route("**/logs?follow=1*", lambda route: route.abort())  # it learns by its refreshes
    answered = []
    page.on("requestfinished", lambda r: answered.append(r.url))
    page.goto(dash.url + f"/#/alice/vanishing/builds/{build['id']}")
    expect(status_of(page)).to_have_text("○created")
    # Its follow has failed and the refresh that follows answered (a look
    # during the delete would read the build `stopped`, final, never asked
    # again); then it waits on the page's clock.
    while_page_waits(page, lambda: all(
        sum(u.endswith(end) for u in answered) >= 2
        for end in (f"/vanishing/builds/{build['id']}", "/statuses?limit=1000")),
        "the refresh after the page's follow failed")
    dash.api("DELETE", f"/alice/vanishing/builds/{build['id']}")

    def a_refresh_shows_it_deleted():
        page.clock.run_for(6000)  # (one still on its way is asked again at the next)
        try:
            expect(status_of(page)).to_have_text("deleted", timeout=2000)
        except AssertionError:
            return False
        return True
    wait_until(a_refresh_shows_it_deleted, timeout=30.0, message="the build shown deleted")
    expect(page.locator("#notice")).to_contain_text("There is no build")
    for button in ("#stop", "#restart", "#bookmark"):
        expect(page.locator(button)).to_be_disabled()
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    page.clock.run_for(30000)
    assert [u for u in asked if "/vanishing/" in u] == []  # nothing more to ask


def test_forgetting_the_token_in_one_tab_signs_the_others_out(browser, dash):
    context = browser.new_context()
    try:
        first, second = context.new_page(), context.new_page()
        sign_in(first, dash)
        second.goto(dash.url + "/")
        expect(second.locator("#who-name")).to_have_text("alice")
        first.get_by_role("button", name="Forget token").click()
        expect(second.locator("#token")).to_be_visible()
        expect(second.locator("#login-error")).to_contain_text("Signed out in another tab (its token was forgotten there, or refused).")
    finally:
        context.close()


def test_times_on_a_page_left_open_grow_older(page, dash):
    dash.project("aging")
    dash.api("POST", "/alice/aging/builds", {"is_managed": False})
    page.clock.install()
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/aging")
    created = page.locator("tbody tr time")
    expect(created).to_have_text("just now")
    page.clock.fast_forward("03:00")  # (the list itself has not changed meanwhile)
    expect(created).to_have_text("3 min ago")
    page.goto(dash.url + "/#/alice/aging/builds/1")
    long_form = page.locator("time[data-long]").first
    expect(long_form).to_contain_text("(3 min ago)")
    clock_time = page.locator("ol.timeline time").first  # a time of day, which stays one
    shown = clock_time.inner_text()
    assert "ago" not in shown and "just now" not in shown, shown
    page.clock.fast_forward("01:00:00")
    expect(long_form).to_contain_text("(1 h ago)")
    expect(clock_time).to_have_text(shown)


@pytest.mark.parametrize("offset", ["1000", "99999999999999999999999", "3"])
def test_a_page_past_the_end_says_so_once_and_leads_back_to_the_last_page(page, dash, offset):
    # It said "1001–25 of 25" with a link back to 980, or the server's
    # refusal of 1e+23 as an offset, in two sentences that said the same.
    name = f"paged{len(offset)}"
    dash.project(name)
    for _ in range(25):
        dash.api("POST", f"/alice/{name}/builds", {"is_managed": False})
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/{name}?offset={offset}")
    if offset == "3":  # (not past the end: its previous page is the first, not -17)
        expect(page.locator("#page-prev")).to_have_attribute("href", f"#/alice/{name}")
        return
    expect(page.get_by_text("No builds on this page.")).to_be_visible()
    expect(page.locator(".pager")).to_contain_text("25 in all")
    expect(page.locator(".pager")).not_to_contain_text("of 25")
    page.locator("#page-prev").click()
    expect(page.locator("tbody tr")).to_have_count(5)
    expect(page.locator(".pager")).to_contain_text("21–25 of 25")


def test_a_big_log_shows_its_tail_and_loads_earlier_parts_on_demand(page, dash):
    dash.project("big", command="seq 1 200000")  # 1.3 MB
    build = dash.final_build(f"/alice/big/builds/{dash.api('POST', '/alice/big/builds')['id']}")
    expected = "".join(f"{i}\n" for i in range(1, 200001))
    assert build["log_size"] == len(expected)
    log_requests = []
    page.on("request", lambda r: log_requests.append(r.url) if "/logs" in r.url else None)
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/big/builds/1")
    expect(log_of(page)).to_contain_text("199999\n200000\n")
    shown = log_of(page).text_content()
    assert len(shown) <= 256 * 1024 and shown.split("\n")[0].isdigit()
    assert expected.endswith(shown)  # whole lines of the tail
    earlier = page.locator("#earlier")
    expect(earlier).to_contain_text("Load earlier output")
    box = log_of(page).bounding_box()
    assert box["height"] < 800  # the log scrolls inside its box
    for _ in range(10):
        if earlier.is_hidden():
            break
        before = len(log_of(page).text_content())
        earlier.click()
        expect(log_of(page)).not_to_have_text(re.compile(rf"^[\s\S]{{{before}}}$"))
    expect(earlier).to_be_hidden()
    assert log_of(page).text_content() == expected  # no gap, no repeat at the joins
    for url in log_requests:
        limit = re.search(r"[?&]limit=(\d+)", url)
        assert "follow=1" in url or (limit and int(limit.group(1)) <= 256 * 1024), url


def test_a_stalled_read_gives_up_and_leaves_load_earlier_to_try_again(page, dash):
    # A read that got no answer kept "Load earlier" disabled for good, and a
    # page's refreshes piled up behind one that stalled.
    dash.project("stalled", command="seq 100000")  # 589 KB: more than a page's 256 KiB
    build = dash.final_build(f"/alice/stalled/builds/{dash.api('POST', '/alice/stalled/builds')['id']}")
    page.clock.install()
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/stalled/builds/{build['id']}")
    expect(log_of(page)).to_contain_text("99999\n100000\n")
    earlier = page.locator("#earlier")
    held = []
    page.route("**/logs?format=*", lambda route: held.append(route))  # answered never
    earlier.click()
    while_page_waits(page, lambda: held, "Load earlier's read")
    expect(earlier).to_be_disabled()
    page.clock.run_for(29_000)
    expect(earlier).to_be_disabled()  # (it waits for as long as it should)
    page.clock.run_for(2000)
    expect(page.locator("#notice")).to_have_text(
        "Could not load earlier output: The server sent nothing for 30 seconds. "
        "Check that it is running, then try again.")
    expect(earlier).to_be_enabled()
    page.unroute("**/logs?format=*")
    first = log_of(page).evaluate("b => parseInt(b.textContent, 10)")
    earlier.click()  # and again, with the server answering
    expect(log_of(page)).to_contain_text(line_after_another(first))
    expect(page.locator("#notice")).to_be_empty()


def test_a_list_refresh_that_stalls_is_not_piled_on_and_says_so_when_it_gives_up(page, dash):
    # Every 5 s another refresh went out behind one that never answered: six
    # took every connection a browser opens to a server, and held them.
    dash.project("stalling")
    dash.api("POST", "/alice/stalling/builds", {"is_managed": False})  # never final: refreshed often
    page.add_init_script("window.lists = 0; const f = window.fetch; window.fetch = (url, o) =>"
                         " { if (/\\/alice\\?/.test(url)) window.lists++; return f(url, o); };")
    page.clock.install()
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice")
    expect(page.locator("main")).to_contain_text("stalling")
    held = []
    page.route("**/api/v1/alice?*", lambda route: held.append(route))  # answered never
    asked = page.evaluate("window.lists")
    page.clock.run_for(5000)
    while_page_waits(page, lambda: held, "the list's refresh")
    page.clock.run_for(24_000)  # five more ticks of the refresh, 29 s on the page's clock
    assert page.evaluate("window.lists") == asked + 1
    page.clock.run_for(7000)  # the first gave up at 35 s
    notice = page.locator("#notice")
    expect(notice).to_have_text("The server sent nothing for 30 seconds. "
                                "Check that it is running, then try again.")
    page.unroute("**/api/v1/alice?*")

    def a_refresh_clears_it():
        page.clock.run_for(5000)
        try:
            expect(notice).to_be_empty(timeout=2000)
        except AssertionError:
            return False
        return True
    wait_until(a_refresh_clears_it, timeout=30.0, message="a refresh that answered")
    assert page.evaluate("window.lists") > asked + 1


def open_running_log(page, dash, project, log, pattern, handler):
    """Sign in, the page's clock faked, and open the page of a running build
    of alice's new `project` whose log holds `log`, the page's requests that
    match `pattern` given to `handler` (page.route's); returns its path."""
    path = running_unmanaged(dash, project)
    dash.api("POST", path + "/logs", log)
    page.clock.install()
    sign_in(page, dash)
    page.route(pattern, handler)
    page.goto(f"{dash.url}/#{path}")
    return path


def test_a_log_whose_first_read_stalls_is_asked_for_again_until_it_comes(page, dash):
    # The pane said the log could not be loaded, and stayed so, never live,
    # long after the server answered again: it has no button to ask with.
    held = []
    path = open_running_log(page, dash, "late-log", "first line\n", "**/logs?format=json*",
                            lambda route: held.append(route))  # answered never
    while_page_waits(page, lambda: held, "the log's first read")
    page.clock.run_for(31_000)
    expect(log_of(page)).to_contain_text(
        "The log could not be loaded: The server sent nothing for 30 seconds. Check that it "
        "is running, then try again. (The page tries again by itself.)")
    page.unroute("**/logs?format=json*")
    page.clock.run_for(1500)  # (the first try again comes a second later)
    expect(log_of(page)).to_have_text("first line\n")  # and the note is gone
    dash.api("POST", path + "/logs", "second line\n")
    expect(log_of(page)).to_have_text("first line\nsecond line\n")  # followed


@pytest.mark.parametrize("broken", ["cut", "reset"])
def test_a_log_read_broken_off_is_asked_for_again(page, dash, open_page, broken):
    # A body cut short read as null, and a connection reset on a text read as
    # no ApiError: the pane said "Cannot read properties of null" or "Failed
    # to fetch", tried no more, and never followed the log.
    open_page.allowed.append("net::ERR_")
    broke = []

    def once(route):
        if broke:
            return route.continue_()
        broke.append(route.request.url)
        if broken == "cut":
            return route.fulfill(status=200, content_type="application/json", body='{"job": 1, "off')
        route.abort("connectionreset")
    # (with no newline in its last 256 KiB, the page reads where a character starts: as text)
    path = open_running_log(
        page, dash, f"broken-{broken}", "first line\n" if broken == "cut" else "start\n" + "x" * 300_000,
        "**/logs?format=json*" if broken == "cut" else "**/logs?format=text*", once)
    expect(log_of(page)).to_contain_text("(The page tries again by itself.)")
    assert "No output yet." not in log_of(page).inner_text()  # (not known)
    page.clock.run_for(1500)
    expect(log_of(page)).to_contain_text("first line\n" if broken == "cut" else "x" * 1000)
    expect(log_of(page)).not_to_contain_text("could not be loaded")
    dash.api("POST", path + "/logs", "\nnext line\n")
    expect(log_of(page)).to_contain_text("next line")  # followed


def test_a_build_deleted_before_its_log_is_read_is_shown_deleted(page, dash, open_page):
    # The page went on showing it succeeded, Restart and Bookmark enabled;
    # only the log's pane said there was no such build.
    open_page.allowed.append("status of 404")
    dash.project("gone-early", command="echo hello")
    build = dash.final_build(f"/alice/gone-early/builds/{dash.api('POST', '/alice/gone-early/builds')['id']}")
    sign_in(page, dash)
    held = []
    page.route("**/logs?format=json*", lambda route: held.append(route))
    page.goto(f"{dash.url}/#/alice/gone-early/builds/{build['id']}")
    while_page_waits(page, lambda: held, "the log's read")
    dash.api("DELETE", f"/alice/gone-early/builds/{build['id']}")
    held[0].continue_()  # (the server answers it: 404)
    expect(status_of(page)).to_have_text("deleted")
    expect(page.locator("#notice")).to_contain_text("There is no build")
    for button in ("#stop", "#restart", "#bookmark"):
        expect(page.locator(button)).to_be_disabled()


def test_a_build_deleted_before_its_log_is_read_as_bytes_is_shown_deleted_in_the_servers_words(
        page, dash, open_page):
    # The bytes' read said only "The server answered 404.".
    open_page.allowed.append("status of 404")
    path = running_unmanaged(dash, "gone-as-bytes")
    dash.api("POST", path + "/logs", "start\n" + "x" * 300_000)  # read where a character starts
    sign_in(page, dash)
    held = []
    page.route("**/logs?format=text*", lambda route: held.append(route))
    page.goto(f"{dash.url}/#{path}")
    while_page_waits(page, lambda: held, "the log's bytes read")
    dash.api("DELETE", path)
    held[0].continue_()
    expect(status_of(page)).to_have_text("deleted")
    expect(page.locator("#notice")).to_have_text(re.compile(r"^There is no build \d+"))


def test_a_write_whose_answer_was_cut_short_says_it_was_done_not_to_try_again(page, dash):
    # "Try again": the build was made, and a second click made another.
    dash.project("cut-write", command="true")
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/cut-write")

    def cut(route):
        answer = route.fetch()  # the server makes the build
        route.fulfill(status=answer.status, content_type="application/json",
                      body=answer.body()[:len(answer.body()) // 2])
    page.route("**/api/v1/alice/cut-write/builds", cut)
    page.get_by_role("button", name="Trigger build").click()
    expect(page.locator("form p.error")).to_have_text(
        "The server said yes, but its answer was cut short, or was not buildserver's: "
        "reload the page to see what was done.")
    assert dash.api("GET", "/alice/cut-write/builds")["count"] == 1


def test_a_log_read_tried_again_until_its_build_is_deleted_says_it_tries_no_more(
        page, dash, open_page):
    open_page.allowed += ["status of 502", "status of 404"]
    path = running_unmanaged(dash, "deleted-while-retried")
    page.clock.install()
    sign_in(page, dash)
    page.route("**/logs?format=json*", lambda route: route.fulfill(
        status=502, content_type="text/html", body="<html>Bad Gateway</html>"))
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text(
        "The log could not be loaded: The server answered 502 Bad Gateway. "
        "(The page tries again by itself.)")
    dash.api("DELETE", path)
    page.clock.run_for(6000)  # the next refresh learns it is gone
    expect(status_of(page)).to_have_text("deleted")
    expect(log_of(page)).to_have_text("The log could not be loaded: The server answered 502 Bad Gateway.",
                                      use_inner_text=True)


def test_a_followed_log_that_brings_nothing_while_the_server_has_more_is_opened_again(page, dash):
    # A follow held by a proxy (or its connection dropped without a word)
    # stayed "live" for ever while the build's details showed the log grow.
    follows = []
    path = open_running_log(page, dash, "stuck-follow", "first line\n", "**/logs?follow=1*",
                            lambda route: follows.append(route) if not follows
                            else route.continue_())  # the first, answered never
    expect(log_of(page)).to_have_text("first line\n")
    while_page_waits(page, lambda: follows, "the page's follow")
    dash.api("POST", path + "/logs", "second line\n")
    page.clock.run_for(20_000)  # refreshes see the log grow: not long enough to give up
    assert log_of(page).text_content() == "first line\n"
    page.clock.run_for(15_000)
    expect(log_of(page)).to_have_text("first line\nsecond line\n")
    expect(page.locator("#live")).to_have_text("live")
    dash.api("POST", path + "/logs", "third line\n")
    expect(log_of(page)).to_have_text("first line\nsecond line\nthird line\n")


def test_a_read_on_a_slow_link_is_no_stall_while_its_body_keeps_coming(page, dash):
    # The whole answer had 30 s: a 256 KiB page at 40 KB/s was cut off at
    # 30 s, and the page said the server did not answer.
    dash.project("trickle", command="seq 100000")  # 589 KB, of which a page fetches 256 KiB
    build = dash.final_build(f"/alice/trickle/builds/{dash.api('POST', '/alice/trickle/builds')['id']}")
    page.clock.install()
    sign_in(page, dash)
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    cdp.send("Network.emulateNetworkConditions", {  # about 7 s for the page, real time
        "offline": False, "latency": 0, "downloadThroughput": 40_000, "uploadThroughput": 40_000})
    page.evaluate(f"location.hash = '#/alice/trickle/builds/{build['id']}'")
    deadline = time.monotonic() + 60
    while "99999\n100000" not in log_of(page).text_content():
        assert time.monotonic() < deadline, "the log did not come"
        page.clock.run_for(2000)  # 2 s of the page's time for every 0.3 s: 30 s in 4.5 s
        page.wait_for_timeout(300)
    assert "could not be loaded" not in log_of(page).text_content()
    assert page.evaluate("performance.now()") > 35_000  # (past the 30 s a whole answer had)


def test_a_list_read_that_a_newer_one_replaced_says_nothing_when_it_fails(page, dash):
    # The list asked with the filter showed; the older read's failure, 30 s
    # on, said the server did not answer, over a list just loaded fine.
    dash.project("replaced")
    build = dash.api("POST", "/alice/replaced/builds", {"is_managed": False})
    for status in ("running", "succeeded"):  # final: the list is refreshed every 30 s
        dash.api("POST", f"/alice/replaced/builds/{build['id']}/statuses", {"status": status})
    page.clock.install()  # (its time also runs on by itself)
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/replaced")
    rows = page.locator("tbody tr")
    expect(rows).to_have_count(1)
    held, failed = [], []
    unfiltered = re.compile(r".*/builds\?limit=20&offset=0$")
    page.route(unfiltered, lambda route: held.append(route))  # answered never
    page.on("requestfailed", lambda r: failed.append(r.url) if unfiltered.match(r.url) else None)
    page.clock.run_for(30_000)
    while_page_waits(page, lambda: held, "the list's refresh")
    with answers_handled(page, "&status=succeeded", message="the list asked with the filter"):
        page.get_by_label("succeeded").check()
    page.clock.run_for(31_000)  # the older read gives up; the next refresh is 29 s away
    while_page_waits(page, lambda: failed, "the older read given up")
    three_frames(page)
    assert page.locator("#notice").text_content() == ""
    expect(rows).to_have_count(1)


def test_a_follow_that_keeps_failing_leaves_no_listener_behind_on_the_page(page, dash, open_page):
    # Each wait between tries left an 'abort' listener on the page's signal:
    # a page left open while its follow failed gathered 360 an hour.
    open_page.allowed.append("net::ERR_FAILED")
    path = running_unmanaged(dash, "retrying")
    page.add_init_script("""
        window.listening = new Set();
        const add = AbortSignal.prototype.addEventListener, remove = AbortSignal.prototype.removeEventListener;
        AbortSignal.prototype.addEventListener = function (type, fn, options) {
          if (type === 'abort') { (this.fns = this.fns || new Set()).add(fn); window.listening.add(this); }
          return add.call(this, type, fn, options);
        };
        AbortSignal.prototype.removeEventListener = function (type, fn, options) {
          if (type === 'abort' && this.fns) this.fns.delete(fn);
          return remove.call(this, type, fn, options);
        };""")
    page.clock.install()
    sign_in(page, dash)
    follows = []
    page.route("**/logs?follow=1*", lambda route: (follows.append(1), route.abort()))
    page.goto(f"{dash.url}/#{path}")
    while_page_waits(page, lambda: follows, "the page's follow")
    deadline = time.monotonic() + 60
    while len(follows) < 15:  # it tries again after 0.5, 1, 2, 4, 8, then every 10 s
        assert time.monotonic() < deadline, f"{len(follows)} tries, not 15"
        page.clock.run_for(5000)
        page.wait_for_timeout(50)  # (each try asks for the build before it waits again)
    most = page.evaluate("Math.max(...[...window.listening].filter(s => !s.aborted)"
                         ".map(s => s.fns.size))")
    assert most <= 3, most


def python_command(code):
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def load_all_of_the_log(page):
    earlier = page.locator("#earlier")
    for _ in range(20):
        if earlier.is_hidden():
            break
        before = len(log_of(page).text_content())
        earlier.click()
        expect(log_of(page)).not_to_have_text(re.compile(rf"^[\s\S]{{{before}}}$"))
    expect(earlier).to_be_hidden()


def test_a_log_of_bytes_that_are_not_utf8_loads_earlier_parts_without_repeats(page, dash):
    # Each U+FFFD was counted as 3 bytes where it stood for 1 or 2: the next
    # page began a few bytes too late, and the join showed them twice.
    data = b"".join(b"%06d bad\xff\xfe\xe2\x82 ok " % i + b"z" * 80 + b"\n" for i in range(8000))
    dash.project("binary", command=python_command(
        "import sys; sys.stdout.buffer.write(b''.join(b'%06d bad\\xff\\xfe\\xe2\\x82 ok ' % i"
        " + b'z' * 80 + b'\\n' for i in range(8000)))"))
    build = dash.final_build(
        f"/alice/binary/builds/{dash.api('POST', '/alice/binary/builds')['id']}")
    assert build["log_size"] == len(data)
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/binary/builds/{build['id']}")
    expect(log_of(page)).to_contain_text("007999 bad")
    load_all_of_the_log(page)
    assert log_of(page).text_content() == data.decode("utf-8", "replace")


def test_a_line_longer_than_a_page_is_shown_and_loaded_whole(page, dash):
    # The page held one partial line, which was dropped as partial: the log
    # showed nothing, and "Load earlier" never moved.
    dash.project("wide", command=python_command("print('x' * 300000)"))
    build = dash.final_build(f"/alice/wide/builds/{dash.api('POST', '/alice/wide/builds')['id']}")
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/wide/builds/{build['id']}")
    expect(log_of(page)).to_contain_text("xxxx")
    load_all_of_the_log(page)
    assert log_of(page).text_content() == "x" * 300000 + "\n"


def test_a_long_line_of_wide_characters_still_being_written_loads_without_stray_bytes(page, dash):
    # The page began at a byte offset inside a character: the view started
    # with U+FFFD, and "Load earlier" showed the character whole as well.
    path = running_unmanaged(dash, "wide-live")
    line = "€" * 100000  # 300 000 bytes, and 300 000 - 256 KiB falls inside a €
    dash.api("POST", path + "/logs", line)
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text("€€€€")
    assert "\ufffd" not in log_of(page).text_content()
    load_all_of_the_log(page)
    assert log_of(page).text_content() == line
    dash.api("POST", path + "/logs", "\ndone\n")
    expect(log_of(page)).to_have_text(re.compile("^\u20ac{100000}\ndone\n$"))  # (a string's spaces collapse)


def visual_lines(page):
    """How many lines the text of the log takes on screen (a block starts one)."""
    return log_of(page).evaluate(
        "e => { const w = document.createTreeWalker(e, NodeFilter.SHOW_TEXT), r = document.createRange(),"
        " tops = new Set(); while (w.nextNode()) { r.selectNodeContents(w.currentNode);"
        " for (const b of r.getClientRects()) tops.add(Math.round(b.top)); } return tops.size; }")


def test_a_followed_log_of_wrapped_lines_stays_at_its_end(page, dash, tmp_path):
    # A block was estimated at a row per line: drawn wrapped, it grew past the
    # view, which then read as "scrolled up" and stopped following for good.
    go = tmp_path / "go"
    open_new_build(page, dash, "wrapped", (
        "for i in $(seq 300); do printf '%s %0300d\\n' $i 0; sleep 0.01; done; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo end"))
    expect(log_of(page)).to_contain_text("300 000")
    go.touch()
    expect(status_of(page)).to_have_text("✓succeeded")
    expect(log_of(page)).to_contain_text("end")
    wait_at_end(page)
    expect(page.locator("#latest")).to_be_hidden()


def test_a_huge_line_that_comes_live_reads_as_one_line_as_after_a_reload(page, dash, tmp_path):
    # The page draws 64 KiB of a line without its newline at most undrawn; each
    # part drawn (and then its rest) went into a block of its own: one line read
    # as several, with "Wrap lines" off.
    go = tmp_path / "go"
    line = "x\u20ac" * 50000  # 200 kB, in characters of 1 and 3 bytes, in 4 writes
    open_new_build(page, dash, "huge", python_command(
        "import sys, time\nfor _ in range(4):\n"
        "    sys.stdout.buffer.write(b'x\\xe2\\x82\\xac' * 12500); sys.stdout.flush(); time.sleep(0.2)")
        + f"; while [ ! -e {go} ]; do sleep 0.05; done; echo; echo end")
    page.locator("#wrap").uncheck()
    expect(log_of(page)).to_have_text(re.compile("^(x\u20ac){50000}$"))  # all of it, drawn
    assert visual_lines(page) == 1
    go.touch()
    expect(status_of(page)).to_have_text("✓succeeded")
    expect(log_of(page)).to_contain_text("end")
    assert log_of(page).text_content() == line + "\nend\n"
    assert visual_lines(page) == 2
    height = log_of(page).evaluate("e => e.scrollHeight")  # (no blank line either)
    page.reload()
    page.locator("#wrap").uncheck()
    expect(log_of(page)).to_contain_text("end")
    assert log_of(page).text_content() == line + "\nend\n"
    assert visual_lines(page) == 2
    assert log_of(page).evaluate("e => e.scrollHeight") == height


def test_a_progress_bar_past_64_kib_shows_only_its_last_state_live_as_after_a_reload(
        page, dash, tmp_path):
    # Parts of its line drawn before its newline came stayed when "\r" wrote
    # the line again: stale bars above the last one, until a reload.
    go = tmp_path / "go"
    open_new_build(page, dash, "progress", (
        "printf '\\033[32m'; for j in $(seq 0 14); do for i in $(seq $((j*1000+1)) $((j*1000+1000))); do "
        "printf '\\rprogress %d' $i; done; sleep 0.1; done; "  # 214 kB in 1.5 s, in green
        f"while [ ! -e {go} ]; do sleep 0.05; done; printf '\\033[0m\\n'; echo done"))
    expect(log_of(page)).to_contain_text("progress 15000")
    assert log_of(page).text_content() == "progress 15000"
    assert visual_lines(page) == 1
    go.touch()
    expect(status_of(page)).to_have_text("✓succeeded")
    expect(log_of(page)).to_contain_text("done")
    assert log_of(page).text_content() == "progress 15000\ndone\n"
    assert visual_lines(page) == 2
    height = log_of(page).evaluate("e => e.scrollHeight")
    bar = log_of(page).locator("span[style]", has_text=re.compile("^progress 15000$"))
    assert bar.evaluate("e => getComputedStyle(e).color") == "rgb(95, 211, 141)"  # still green
    page.reload()
    expect(log_of(page)).to_contain_text("done")
    assert log_of(page).text_content() == "progress 15000\ndone\n"
    assert visual_lines(page) == 2
    assert log_of(page).evaluate("e => e.scrollHeight") == height
    assert bar.evaluate("e => getComputedStyle(e).color") == "rgb(95, 211, 141)"


@pytest.mark.parametrize("width", [375, 1280])
def test_a_long_name_or_description_wraps_instead_of_widening_the_page(open_page, dash, width):
    # "of alice/NNN…" and a description with a long URL pushed the page sideways.
    page = open_page(width=width)
    if "n" * 64 not in [p["name"] for p in dash.api("GET", "/alice?limit=1000")["results"]]:
        dash.project("n" * 64, command="true", description="see https://example.com/" + "u" * 300)
    build = dash.api("POST", f"/alice/{'n' * 64}/builds", {"name": "N" * 128})
    sign_in(page, dash)
    for path in (f"/#/alice/{'n' * 64}", f"/#/alice/{'n' * 64}/builds/{build['id']}"):
        page.goto(dash.url + path)
        expect(page.locator("main")).to_contain_text("u" * 50 if "builds" not in path else "N" * 50)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), path


def test_a_fast_live_log_keeps_only_its_tail_in_the_page(page, dash):
    dash.project("fast", command="for i in $(seq 0 11); do seq $((i*100000+1)) $((i*100000+100000)); "
                                  "sleep 0.25; done")  # 8.9 MB in about 3 s
    sign_in(page, dash)
    dash.api("POST", "/alice/fast/builds")
    page.goto(dash.url + "/#/alice/fast/builds/1")
    expect(status_of(page)).to_have_text("✓succeeded", timeout=30_000)
    expect(log_of(page)).to_contain_text("1199999\n1200000\n")
    text = log_of(page).text_content()
    # What is kept (2 to 4 MiB), not all 1.2 million lines, nor a frame's worth
    # (whole groups went while the rest held less than 2 MiB).
    assert 2 * 1024 * 1024 - 100 <= len(text.encode()) <= 4 * 1024 * 1024
    numbers = text.split("\n")[1:-1]  # the first line may be cut
    assert [int(n) for n in numbers] == list(range(int(numbers[0]), 1200001))
    page.locator("#earlier").click()
    expect(log_of(page)).to_contain_text(line_after_another(int(numbers[0]) - 1))
    numbers = log_of(page).text_content().split("\n")[1:-1]
    assert [int(n) for n in numbers] == list(range(int(numbers[0]), 1200001))


def numbers_in(page):
    """The numbers a `seq` log shows, but its first line (which may be cut)."""
    return [int(n) for n in log_of(page).text_content().split("\n")[1:-1]]


def line_after_another(text):
    """The line `text` with a line before it, for to_contain_text: a string
    there is matched with its whitespace collapsed and trimmed, so "\\n5\\n"
    matched the page's first line, and 15 or 51."""
    return re.compile(rf"\n{re.escape(str(text))}\n")


def test_a_reader_scrolled_up_in_a_fast_log_holds_newer_output_back_until_they_come_down(
        page, dash, tmp_path):
    # The page grew without limit while its reader was up the page: a 100 MB
    # log held 100 MB of page.
    go = tmp_path / "go"
    dash.project("uphill", command=f"seq 1 3000; while [ ! -e {go} ]; do sleep 0.05; done; "
                                   "for i in $(seq 0 9); do seq $((i*150000+3001)) "
                                   "$((i*150000+153000)); sleep 0.2; done")  # 10.5 MB in all
    sign_in(page, dash)
    build = dash.api("POST", "/alice/uphill/builds")
    page.goto(dash.url + f"/#/alice/uphill/builds/{build['id']}")
    expect(log_of(page)).to_contain_text(line_after_another(3000))
    log_of(page).evaluate("e => { e.scrollTop = 0; }")
    expect(page.locator("#latest")).to_be_visible()  # up the page: no longer following
    go.touch()
    expect(status_of(page)).to_have_text("✓succeeded", timeout=30_000)
    expect(page.locator("#latest")).to_contain_text(re.compile(r"\d+(\.\d+)? MiB more"))
    held = numbers_in(page)
    assert len(log_of(page).text_content()) <= 4 * 1024 * 1024  # LOG_HOLD
    assert held[:3] == [2, 3, 4] and held == list(range(2, held[-1] + 1))  # what they read stays

    page.locator("#latest").click()
    expect(log_of(page)).to_contain_text("1502999\n1503000\n")
    tail = numbers_in(page)
    assert len(log_of(page).text_content()) <= 2 * 1024 * 1024 + 64 * 1024  # LOG_KEEP
    assert tail == list(range(tail[0], 1503001))
    expect(page.locator("#latest")).to_be_hidden()
    page.locator("#earlier").click()  # and the join to what came before is whole
    expect(log_of(page)).to_contain_text(line_after_another(tail[0] - 1))
    shown = numbers_in(page)  # (once: the page loaded may still be being drawn above)
    assert shown == list(range(shown[0], 1503001))


def test_load_earlier_while_following_a_fast_log_shows_what_it_loaded(page, dash, tmp_path):
    # The reader stayed at the bottom, so the next frame trimmed the page back
    # to its last 2 MiB: what "Load earlier" fetched was gone at once.
    go = tmp_path / "go"
    dash.project("backwards", command=f"seq 1 700000; while [ ! -e {go} ]; do sleep 0.05; done; "
                                      "seq 700001 1100000")  # 4.9 MB (more than a page keeps), then 3.2
    sign_in(page, dash)
    build = dash.api("POST", "/alice/backwards/builds")
    page.goto(dash.url + f"/#/alice/backwards/builds/{build['id']}")
    expect(log_of(page)).to_contain_text(line_after_another(700000))
    expect(page.locator("#earlier")).to_be_visible()
    first = numbers_in(page)[0]
    page.locator("#earlier").click()
    expect(log_of(page)).to_contain_text(line_after_another(first - 1))
    go.touch()
    expect(status_of(page)).to_have_text("✓succeeded", timeout=30_000)
    numbers = numbers_in(page)
    assert first - 1 in numbers and numbers == list(range(numbers[0], numbers[-1] + 1))
    expect(page.locator("#latest")).to_be_visible()


LAST_LINE = ("b => { const t = b.textContent;"
             " return parseInt(t.slice(t.lastIndexOf('\\n', t.length - 2) + 1), 10); }")


@contextlib.contextmanager
def earlier_on_a_slow_network(page, dash, tmp_path, name):
    """A page following a build that prints numbered lines fast (5 MB/s or
    so), "Load earlier" clicked and its fetch held. Yields (let_go, first,
    grown): let_go() lets the fetch on, first is the page's first number,
    grown(n) waits until the log has n bytes more, and returns the number
    of its last line then. The build ends after."""
    stop = tmp_path / "stop"
    dash.project(name, command=f"i=0; while [ ! -e {stop} ]; do "
                               "seq $((i*10000+1)) $((i*10000+10000)); i=$((i+1)); sleep 0.01; done")
    sign_in(page, dash)
    path = f"/alice/{name}/builds/{dash.api('POST', f'/alice/{name}/builds')['id']}"
    try:
        page.goto(dash.url + "/#" + path)
        expect(page.locator("#earlier")).to_be_visible()
        held = []
        page.route("**/logs?format=json*", lambda route: held.append(route))
        page.locator("#earlier").click()
        while_page_waits(page, lambda: held, "Load earlier's fetch")
        first = log_of(page).evaluate("b => parseInt(b.textContent, 10)")
        size = dash.api("GET", path)["log_size"]

        def let_go():
            held[0].continue_()
            page.unroute("**/logs?format=json*")

        def grown(more):
            wait_until(lambda: dash.api("GET", path)["log_size"] > size + more)
            return int(dash.api("GET", f"{path}/logs?format=json&tail=2")["text"].split()[-1])
        yield let_go, first, grown
    finally:
        stop.touch()
    expect(status_of(page)).to_have_text("✓succeeded", timeout=30_000)


def test_load_earlier_answered_after_a_follower_would_have_dropped_older_lines_joins_them(
        page, dash, tmp_path):
    # What "Load earlier" fetched was put above the page's first line as it
    # was at the click; a page following a fast log had dropped older lines
    # while the fetch was on its way, and the join hid them: a gap, unmarked.
    with earlier_on_a_slow_network(page, dash, tmp_path, "joined") as (let_go, first, grown):
        last = grown(3 * MiB)  # (a follower's page keeps 2)
        # Drawn to there (a page that would drop older lines has), or held
        # back from there on: the page has 4 MiB while its reader is up.
        page.wait_for_function(f"() => ({LAST_LINE})(document.getElementById('log')) >= {last}"
                               " || document.getElementById('latest').textContent.endsWith('more)')",
                               polling=100, timeout=15_000)
        let_go()
        expect(log_of(page)).to_contain_text(line_after_another(first))
        expect(page.locator("#latest")).to_be_visible()  # up at the join
    numbers = numbers_in(page)
    assert first - 1 in numbers and numbers == list(range(numbers[0], numbers[-1] + 1))


def test_a_follower_can_come_back_down_while_load_earlier_waits(page, dash, tmp_path):
    # The page stopped at 4 MiB while the fetch waited, still "live", with no
    # "Latest output" to take the reader on: a finished-looking log.
    with earlier_on_a_slow_network(page, dash, tmp_path, "onward") as (let_go, first, grown):
        last = log_of(page).evaluate(LAST_LINE)
        grown(6 * MiB)  # 750 000 lines, more than a page holds
        expect(page.locator("#latest")).to_contain_text("MiB more")
        page.locator("#latest").click()
        page.wait_for_function(f"() => ({LAST_LINE})(document.getElementById('log')) > {last + 600_000}",
                               polling=100, timeout=15_000)
        log_of(page).evaluate("b => { b.scrollTop = 0; }")  # (up: what joined would stay)
        let_go()  # too late: the page it was for was replaced
        expect(page.locator("#earlier")).to_be_enabled()  # (its fetches are over)
        three_frames(page)
    numbers = numbers_in(page)
    assert numbers[0] > first and numbers == list(range(numbers[0], numbers[-1] + 1))


def test_a_reader_who_moves_while_load_earlier_waits_keeps_their_place(page, dash, tmp_path):
    # The reader was taken to the join, as if they had not moved.
    with earlier_on_a_slow_network(page, dash, tmp_path, "moved") as (let_go, first, grown):
        log_of(page).evaluate("b => { b.scrollTop = b.scrollHeight / 2; }")
        reading = int(wait_until(lambda: first_line_in_view(page)))  # (once its lines are drawn)
        grown(1 * MiB)
        let_go()
        expect(log_of(page)).to_contain_text(line_after_another(first))
        # (within a line or two: lines drawn above the view may differ from their estimate)
        assert abs(int(wait_until(lambda: first_line_in_view(page))) - reading) <= 3


def at_end(page):
    return log_of(page).evaluate("b => b.scrollHeight - b.scrollTop - b.clientHeight < 40")


def wait_at_end(page):
    """Until the log is scrolled to its end (a follower's place)."""
    page.wait_for_function("() => { const b = document.getElementById('log');"
                           " return b.scrollHeight - b.scrollTop - b.clientHeight < 40; }",
                           timeout=5000)


def test_load_earlier_on_a_running_build_leaves_the_reader_at_the_join(page, dash, tmp_path):
    # Taken up to the join, the reader was taken back to the end at once (the
    # page counted them as following while below where the end had been).
    go = tmp_path / "go"
    dash.project("join", command=f"seq -f '%0100g' 10000; "
                                 f"while [ ! -e {go} ]; do sleep 0.05; done; echo after")
    sign_in(page, dash)
    build = dash.api("POST", "/alice/join/builds")
    path = f"/alice/join/builds/{build['id']}"
    wait_until(lambda: dash.api("GET", path)["log_size"] == 10000 * 101)  # (opened on its tail)
    page.goto(dash.url + "/#" + path)
    expect(log_of(page)).to_contain_text("0" * 95 + "10000\n")
    first = log_of(page).text_content().split("\n")[1]
    page.locator("#earlier").click()
    expect(log_of(page)).to_contain_text(  # (the page's first line was first - 1 before the load)
        re.compile(rf"\n{int(first) - 2:0100d}\n{int(first) - 1:0100d}\n{first}\n"))
    go.touch()
    expect(log_of(page)).to_contain_text("after")
    expect(page.locator("#latest")).to_be_visible()
    assert not at_end(page)


def test_wrapping_turned_on_up_the_page_leaves_the_reader_where_they_read(page, dash, tmp_path):
    # The taller text moved the view down (the browser keeps the line read in
    # view), and that was taken for following: to the end.
    go = tmp_path / "go"
    open_new_build(page, dash, "rewrap", (
        f"for i in $(seq 600); do printf '%s %0300d\\n' $i 0; done; "
        f"while [ ! -e {go} ]; do sleep 0.05; done; echo after"))
    expect(log_of(page)).to_contain_text("600 000")
    page.locator("#wrap").uncheck()
    log_of(page).evaluate("b => { b.scrollTop = b.scrollHeight - b.clientHeight - 600; }")
    expect(page.locator("#latest")).to_be_visible()
    page.locator("#wrap").check()
    go.touch()
    expect(log_of(page)).to_contain_text("after")
    expect(page.locator("#latest")).to_be_visible()
    assert not at_end(page)


def first_line_in_view(page):
    """The text of the log's line at the top of its box."""
    return log_of(page).evaluate(
        "b => { const r = b.getBoundingClientRect(), p = document.caretRangeFromPoint(r.left + 8, r.top + 8);"
        " const t = p.startContainer.data || '', s = t.lastIndexOf('\\n', p.startOffset - 1) + 1;"
        " const e = t.indexOf('\\n', s); return t.slice(s, e < 0 ? t.length : e); }")


def test_wrapping_turned_off_up_the_page_leaves_the_reader_where_they_read(page, dash):
    # The shorter text left the view past its end: the reader was taken there.
    dash.project("unwrap", command="for i in $(seq 600); do printf '%s %0300d\\n' $i 0; done")
    build = dash.final_build(f"/alice/unwrap/builds/{dash.api('POST', '/alice/unwrap/builds')['id']}")
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/unwrap/builds/{build['id']}")
    expect(log_of(page)).to_contain_text("600 000")
    log_of(page).evaluate("b => { b.scrollTop = b.scrollHeight * 0.6; }")
    expect(page.locator("#latest")).to_be_visible()
    read = int(wait_until(lambda: first_line_in_view(page), message="the lines drawn").split()[0])
    page.locator("#wrap").uncheck()
    three_frames(page)
    now = wait_until(lambda: first_line_in_view(page), message="the lines drawn")
    assert abs(int(now.split()[0]) - read) <= 1, (read, now)
    assert not at_end(page)


def test_a_reader_up_the_page_while_a_huge_line_arrives_stays_there(page, dash, tmp_path):
    # The browser kept the end of the line being drawn in view (scroll
    # anchoring), which brought the reader back down to it within a second.
    go = tmp_path / "go"
    open_new_build(page, dash, "anchor", python_command(
        "import os, sys, time\nfor i in range(300): print('line %d' % i, 'y' * 100)\n"
        "k = 0\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    sys.stdout.write('%06d' % k + 'z' * 2042); sys.stdout.flush(); time.sleep(0.02)\n"
        "    k += 1\n"
        "print(); print('end')"))
    expect(log_of(page)).to_contain_text("000150z", timeout=30_000)  # in pieces by now
    log_of(page).scroll_into_view_if_needed()
    box = log_of(page).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -300)
    expect(page.locator("#latest")).to_be_visible()
    drawn = log_of(page).evaluate("b => Math.max(...[...b.textContent.matchAll(/(\\d{6})z/g)]"
                                  ".map(m => parseInt(m[1], 10)))")
    expect(log_of(page)).to_contain_text(f"{drawn + 25:06d}z")  # more of the line, drawn meanwhile
    three_frames(page)
    expect(page.locator("#latest")).to_be_visible()
    assert not at_end(page)
    go.touch()


def test_a_follower_whose_window_gets_shorter_keeps_following(page, dash, tmp_path):
    # The shorter box moved the view up a pixel, which read as the reader
    # scrolling up: new lines came out of sight.
    go = tmp_path / "go"
    open_new_build(page, dash, "shrink", f"seq 1 2000; i=0; while [ ! -e {go} ]; do "
                                         "i=$((i+1)); echo more $i; sleep 0.1; done; echo end")
    expect(log_of(page)).to_contain_text("more 2\n")
    page.set_viewport_size({"width": 1280, "height": 500})
    text = log_of(page).text_content()
    expect(log_of(page)).not_to_have_text(text)  # more came since
    go.touch()
    expect(log_of(page)).to_contain_text("end")
    expect(page.locator("#latest")).to_be_hidden()
    wait_at_end(page)


def test_a_huge_live_line_whose_characters_are_followed_by_stray_bytes_loses_none(page, dash):
    # A piece cut where a whole character was followed by a stray continuation
    # byte was cut inside the character: it showed as U+FFFDs.
    path = running_unmanaged(dash, "strays")
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(page.locator("#live")).to_have_text("live")
    piece = b"x" * 1000 + "\U0001f389".encode() + b"\x80"  # a whole 🎉, then a stray byte
    for _ in range(100):  # 100 KB in one line, drawn in pieces as it comes (each ends so)
        assert dash_request(dash, "POST", path + "/logs", piece)[0] == 200
        time.sleep(0.01)
    shown = (piece * 100).decode("utf-8", "replace")
    wait_until(lambda: log_of(page).text_content() == shown, message="the line as it was sent")


def test_end_on_a_busy_log_follows_its_end_again(page, dash, tmp_path):
    # The browser's End scrolled over a moment to where the end had been:
    # output arriving meanwhile left the reader short of it, not following.
    go = tmp_path / "go"
    open_new_build(page, dash, "busy", f"i=0; while [ ! -e {go} ]; do i=$((i+1)); echo tick $i;"
                                        " sleep 0.005; done; echo end")
    expect(log_of(page)).to_contain_text("tick 300\n")
    log_of(page).focus()
    for _ in range(3):
        page.keyboard.press("PageUp")
    expect(page.locator("#latest")).to_be_visible()
    page.wait_for_timeout(1000)  # (PageUp's scroll is animated: the reader is up, reading)
    page.keyboard.press("End")
    expect(page.locator("#latest")).to_be_hidden()
    text = log_of(page).text_content()
    expect(log_of(page)).not_to_have_text(text)  # more came since, and it is still followed
    assert at_end(page) or page.locator("#latest").is_hidden()
    go.touch()
    expect(log_of(page)).to_contain_text("end")
    wait_at_end(page)


def test_a_build_deleted_after_its_page_saw_it_end_says_deleted_on_restart(page, dash,
                                                                           open_page):
    # Its page showed `stopped` (the delete stops it first), and Restart said
    # only "There is no build", with its buttons still there to press.
    dash.project("doomed", command="true")
    sign_in(page, dash)
    path = f"/alice/doomed/builds/{dash.api('POST', '/alice/doomed/builds')['id']}"
    dash.final_build(path)
    page.goto(dash.url + f"/#{path}")
    expect(status_of(page)).to_have_text("✓succeeded")  # final: the page asks no more
    open_page.allowed.append("Failed to load resource")  # (Chromium logs the 404)
    assert dash_request(dash, "DELETE", path)[0] == 200
    expect(page.locator("#restart")).to_be_enabled()
    page.locator("#restart").click()
    expect(status_of(page)).to_have_text("deleted")
    for button in ("#stop", "#restart", "#bookmark"):
        expect(page.locator(button)).to_be_disabled()


def test_a_build_name_the_server_would_refuse_is_caught_by_the_form(page, dash):
    dash.project("named", command="true")
    sign_in(page, dash)
    page.goto(dash.url + "/#/alice/named")
    page.get_by_text("Options: command, environment, name, tags").click()
    page.get_by_label("Name").fill("my build")
    page.evaluate("() => { window.posts = 0; const f = window.fetch; window.fetch = (url, o) =>"
                  " { if (o && o.method === 'POST') window.posts++; return f(url, o); }; }")
    page.get_by_role("button", name="Trigger build").click()
    assert page.locator("#tb-name").evaluate("e => e.validity.patternMismatch")
    expect(page.locator("#tb-name-help")).to_have_text('Letters, digits, "-" and "_".')
    three_frames(page)
    assert page.evaluate("window.posts") == 0  # the form held it back (the server would refuse it too)


def test_progress_bars_keep_their_colour_and_escape_strings_and_bidi_controls_show_safely(
        page, dash):
    dash.project("bars", command=(
        "printf '\\033[32mfetching 10%%\\rfetching 100%%\\033[0m done\\n'; "  # a rewound line
        "printf 'a\\033P1;2|dcs-secret\\033\\\\b\\033_apc-secret\\033\\\\c\\n'; "  # DCS, APC
        "printf 'stray \\033Pstart\\nnext line\\n'; "  # never ended: it hid the lines after it
        "printf 'if admin \\342\\200\\256 { deny }\\n'; "  # U+202E, the right-to-left override
        "echo end"), env={"WHO": "admin\u202e"})
    made = dash.api("POST", "/alice/bars/builds", {"tags": ["safe", "\u202eexe.txt"],
                                                   "description": "see \u202e.gnp"})
    build = dash.final_build(f"/alice/bars/builds/{made['id']}")
    sign_in(page, dash)
    page.goto(dash.url + f"/#/alice/bars/builds/{build['id']}")
    expect(log_of(page)).to_contain_text("end")
    assert log_of(page).text_content() == (
        "fetching 100% done\nabc\nstray start\nnext line\nif admin <U+202E> { deny }\nend\n")
    bar = log_of(page).locator("span", has_text=re.compile("^fetching 100%$"))
    assert bar.evaluate("e => getComputedStyle(e).color") == "rgb(95, 211, 141)"  # still green
    assert page.locator(".fields details pre").text_content() == "WHO=admin<U+202E>"
    # Every field too (a tag read "txt.exe"), and in the list.
    expect(page.locator(".fields")).to_contain_text("<U+202E>exe.txt")
    expect(page.locator(".fields")).to_contain_text("see <U+202E>.gnp")
    page.goto(dash.url + "/#/alice/bars")
    expect(page.locator(".builds .tag").last).to_have_text("<U+202E>exe.txt")


def test_focus_stays_on_bookmark_and_on_stop_when_a_stop_fails(page, dash, open_page):
    # Disabled while they worked, both buttons dropped the focus to the page.
    dash.project("focused")
    sign_in(page, dash)
    build = dash.api("POST", "/alice/focused/builds", {"is_managed": False})  # runs elsewhere
    path = f"/alice/focused/builds/{build['id']}"
    page.goto(dash.url + "/#" + path)
    expect(status_of(page)).to_have_text("○created")
    page.locator("#bookmark").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#bookmark")).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#bookmark")).to_be_focused()

    # The server out of reach (a deleted build would be stopped first: the page
    # could see it `stopped`, its Stop disabled).
    open_page.allowed.append("net::ERR_FAILED")
    page.route("**/stop", lambda route: route.abort())
    page.locator("#stop").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#notice")).to_contain_text("Could not stop the build")
    expect(page.locator("#stop")).to_be_focused()


def test_load_earlier_of_wrapped_lines_shows_a_follower_the_join(page, dash):
    # The follower was put half a screen of new text above the join, by that
    # text's estimated height: wrapped lines are taller, and once drawn they
    # took the reader screens above it (and 60 lines above the join when put
    # at the join, by the same estimate).
    path = running_unmanaged(dash, "wrapped-join")
    dash.api("POST", path + "/logs", "".join(f"{n:06d} {'x' * 393}\n" for n in range(2_000)))
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text(re.compile(r"\n001999 x+\n$"))
    wait_at_end(page)
    first = log_of(page).text_content()[:6]
    page.locator("#earlier").click()
    expect(log_of(page)).to_contain_text(line_after_another(f"{first} {'x' * 393}"))
    # The join at the box's padding from its top, as the first line was (the
    # line above it shows in that padding): at once, and still once the browser
    # has drawn what is near the view (the frames after; on a busy machine the
    # page's look two frames on came before that, and left the estimate).
    join = (int(first) - 1, int(first))
    assert int(first_line_in_view(page)[:6]) in join
    three_frames(page)
    assert int(first_line_in_view(page)[:6]) in join


def test_load_earlier_by_keyboard_keeps_the_focus_until_there_is_no_more(page, dash):
    # Disabled while it fetched, the button dropped the focus to the page: the
    # next Enter did nothing, nor did End.
    path = running_unmanaged(dash, "keyed-earlier")
    dash.api("POST", path + "/logs", "".join(f"{n:09d}\n" for n in range(70_000)))  # 700 kB
    sign_in(page, dash)
    page.goto(f"{dash.url}/#{path}")
    expect(log_of(page)).to_contain_text(line_after_another("000069999"))
    page.locator("#earlier").focus()
    before = page.locator("#earlier").text_content()  # "(… KiB not shown)"
    page.keyboard.press("Enter")
    expect(page.locator("#earlier")).not_to_have_text(before)  # loaded
    expect(page.locator("#earlier")).to_be_enabled()
    expect(page.locator("#earlier")).to_be_focused()  # again
    page.keyboard.press("Enter")
    expect(log_of(page)).to_contain_text(re.compile(r"^000000000\n"))
    expect(page.locator("#earlier")).to_be_hidden()
    expect(log_of(page)).to_be_focused()  # no more: read on, End follows the end


def test_keyboard_alone_signs_in_opens_a_project_and_triggers_a_build(page, dash):
    dash.project("keys", command="echo typed")
    page.goto(dash.url + "/")
    page.keyboard.type(dash.alice)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("Your projects")

    def tab_to(locator, limit=40):
        for _ in range(limit):
            page.keyboard.press("Tab")
            if locator.evaluate("e => e === document.activeElement"):
                return
        raise AssertionError(f"Tab never reached {locator}")
    link = page.get_by_role("link", name="keys", exact=True)
    tab_to(link)
    assert link.evaluate("e => getComputedStyle(e).outlineStyle") != "none"  # focus is visible
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", level=1)).to_have_text("keys")
    tab_to(page.get_by_role("button", name="Trigger build"))
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/alice/keys/builds/1$"))
    expect(status_of(page)).to_have_text("✓succeeded")
    expect(log_of(page)).to_have_text("typed\n")
    tab_to(page.get_by_role("button", name="Restart"))


def test_a_phone_width_page_never_scrolls_sideways(open_page, dash):
    long_name = "a-project-with-a-rather-long-name-for-a-phone-screen-0123456789"
    dash.project(long_name, command="echo " + "x" * 3000 + "; echo done",
                 description="A description that goes on for a while, to wrap on a small screen.")
    build = dash.api("POST", f"/alice/{long_name}/builds", {"tags": ["nightly", "release-candidate"],
                                                           "name": "phone-check"})
    dash.final_build(f"/alice/{long_name}/builds/{build['id']}")
    page = open_page(375, 700)
    sign_in(page, dash)

    def no_sideways_scroll(shot):
        page.screenshot(path=os.path.join(SHOTS, f"dashboard-phone-{shot}.png"), full_page=True)
        width = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
        assert width[0] <= width[1], f"{shot}: the page is {width[0]} px wide in a {width[1]} px viewport"
    expect(page.get_by_role("link", name=long_name)).to_be_visible()
    no_sideways_scroll("projects")
    page.get_by_role("link", name=long_name).click()
    expect(page.locator("tbody tr")).to_have_count(1)
    no_sideways_scroll("project")
    page.get_by_role("link", name="#1").first.click()
    expect(log_of(page)).to_contain_text("done")
    log_of(page).scroll_into_view_if_needed()  # off-screen log lines are drawn only when seen
    no_sideways_scroll("build")
    page.get_by_label("Wrap lines").uncheck()  # long lines then scroll inside the log only
    no_sideways_scroll("build-nowrap")
