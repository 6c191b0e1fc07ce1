"""Tests for buildserver.py, in the module's order.

webtest drives the WSGI app for the API; real `serve` processes on loopback,
real shell commands and real SQLite files are used wherever behaviour crosses
a process boundary (runner, stop, timeouts, crash recovery, following).
Every wait is a loop with a deadline.
"""

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import webtest

import buildserver

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "buildserver.py")


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

    def __init__(self, data_dir, *args, env=None):
        self.data_dir = str(data_dir)
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.proc = None
        self.token = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, SCRIPT, "serve", "--port", "0", "--data-dir", self.data_dir,
             *self.args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
            text=True)
        self.stdout_lines = []
        while True:
            line = self.proc.stdout.readline()
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

    def start(*args, data_dir=None, env=None):
        server = Server(data_dir or tmp_path / "served", *args, env=env).start()
        servers.append(server)
        return server
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
    assert build["last_status"] == "scheduled"
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
