"""Runner tests (draft, to be merged into test_buildserver.py as the "Runner" section).

Real shell commands run under the in-process app (webtest) where the runner
alone is at stake, and under real `serve` processes where following, crashes
and signals cross a process boundary. A build that must stay running waits
for a gate file that the test creates, never for a fixed time.
"""

from test_buildserver import *  # noqa: F401,F403 (fixtures and helpers)
from test_buildserver import (  # noqa: F401 (fixtures pytest finds by name)
    admin, alice, app, auth, config, final_build, pids_with_marker, project,
    server_factory, server_final_build, wait_until, web)

import http.client
import json
import os
import shlex
import signal
import sqlite3
import time

import pytest

import buildserver

# Draft only (drop when merging): the star import also brought test_buildserver's
# own tests, which pytest would run a second time here.
for _name in [n for n, v in list(globals().items())
              if n.startswith("test_") and getattr(v, "__module__", "") == "test_buildserver"]:
    del globals()[_name]


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
    build = post_build(web, alice, project, {"command": "setsid sleep 30 & echo bye"})
    marker = f"BUILD_UUID={build['uuid']}"
    try:
        done = final_build(web, alice, f"{project}/builds/{build['id']}", timeout=20)
        assert (done["last_status"], done["exit_code"]) == ("succeeded", 0)
        assert build_log(web, alice, project, build["id"]) == b"bye\n"
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
    wait_gone(f"BUILD_UUID={build['uuid']}")


# Following a log over a real server ----------------------------------------------

def admin_project(server):
    status, _ = server.json("POST", "/api/v1/admin", {"name": "app"})
    assert status == 201
    return "/api/v1/admin/app"


def open_follow(server, path, timeout=10):
    """A follow request on its own connection; returns (connection, response)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    conn.request("GET", path + "/logs?follow=1",
                 headers={"Authorization": f"Token {server.token}"})
    return conn, conn.getresponse()


def server_wait_for_log(server, path, text, timeout=15.0):
    return wait_until(lambda: text in server.request("GET", path + "/logs")[2], timeout,
                      message=f"{text!r} in the log of {path}")


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
    server = server_factory("--threads", "4", "--stop-grace", "1")
    cap = buildserver.Config(threads=4).max_followers
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_signal_stops_running_builds_keeps_waiting_ones_and_flushes_followers(
        server_factory, tmp_path, signum):
    data_dir = tmp_path / "graceful"
    stop_grace = 1
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
    assert (last_status, exit_code) == ("stopped", -9)
