import json, os, signal, subprocess, sys
import pytest
import buildserver
from test_buildserver import SCRIPT, Server, server_factory, server_final_build, wait_until  # noqa: F401


###############################################################################
# Client ######################################################################
###############################################################################

def client(server, *args, token=None, env=None, **kw):
    """Run `python buildserver.py <args>` against `server`; the CompletedProcess."""
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{server.host}:{server.port}",
               "BUILDSERVER_TOKEN": server.token if token is None else token, **(env or {})}
    return subprocess.run([sys.executable, SCRIPT, *args], env=environ, capture_output=True,
                          timeout=kw.pop("timeout", 60), **kw)


def start_client(server, *args):
    environ = {**os.environ, "BUILDSERVER_URL": f"http://{server.host}:{server.port}",
               "BUILDSERVER_TOKEN": server.token}
    return subprocess.Popen([sys.executable, SCRIPT, *args], env=environ, bufsize=0,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


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
    first = result.stderr.decode().splitlines()[0]
    assert first == f"build 1: http://{served.host}:{served.port}/api/v1/admin/app/builds/1"


def test_run_uses_the_projects_command_env_name_tags_and_timeout(served):
    result = client(served, "run", "admin/app", "--env", "A=1", "--env", "B=two words",
                    "--name", "nightly", "--tag", "x", "--tag", "y", "--timeout", "60",
                    "--json")
    assert result.returncode == 0, result.stderr
    build = json.loads(result.stdout.split(b"default\n", 1)[1])
    assert (build["env"], build["name"], build["tags"], build["timeout"], build["command"]) == (
        {"A": "1", "B": "two words"}, "nightly", ["x", "y"], 60, "echo default")


@pytest.mark.parametrize("command, code", [("exit 3", 3), ("exit 255", 255),
                                           ("kill -9 $$", 1)])
def test_run_exits_with_the_builds_own_exit_code_or_1(served, command, code):
    assert client(served, "run", "admin/app", "--command", command).returncode == code


def test_run_with_no_follow_prints_the_id_and_returns_at_once(served):
    result = client(served, "run", "admin/app", "--command", "sleep 30", "--no-follow")
    assert (result.returncode, result.stdout) == (0, b"1\n")
    status, body = served.json("GET", "/api/v1/admin/app/builds/1")
    assert body["last_status"] in ("scheduled", "running")


def test_unreachable_server_and_refused_token_have_their_own_exit_codes(served):
    refused = client(served, "builds", "admin/app", token="not-a-token")
    assert refused.returncode == buildserver.EXIT_REFUSED
    assert b"not-a-token" not in refused.stderr + refused.stdout
    unreachable = client(served, "run", "admin/app", env={"BUILDSERVER_URL": "http://127.0.0.1:1"})
    assert unreachable.returncode == buildserver.EXIT_UNREACHABLE
    assert b"cannot reach" in unreachable.stderr


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
    assert stopped.stdout == b"build 2 of admin/app: stopped\n"

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


def test_ctrl_c_with_stop_on_interrupt_stops_the_build_and_exits_130(served):
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60",
                        "--stop-on-interrupt")
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert server_final_build(served, "/api/v1/admin/app/builds/1")["last_status"] == "stopped"


def test_ctrl_c_without_a_terminal_leaves_the_build_running(served):
    proc = start_client(served, "run", "admin/app", "--command", "echo started; sleep 60")
    assert proc.stdout.readline() == b"started\n"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) == 130
    assert served.json("GET", "/api/v1/admin/app/builds/1")[1]["last_status"] == "running"


def test_follow_survives_a_server_restart_without_losing_or_repeating_output(tmp_path):
    data_dir = tmp_path / "restarted"
    first = Server(data_dir, "--stop-grace", "1").start()
    try:
        first.json("POST", "/api/v1/admin", {"name": "app"})
        command = "i=0; while [ $i -lt 400 ]; do echo line $i; i=$((i+1)); sleep 0.01; done"
        proc = start_client(first, "run", "admin/app", "--command", command)
        assert proc.stdout.readline() == b"line 0\n"
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
