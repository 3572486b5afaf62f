"""``server.processes``: one ``wirehub serve`` that runs a supervisor and two worker processes on one port and
one Redis, with real WebSocket clients: connections spread over both workers, a message crosses workers in
order, ``/metrics`` answers for the pod, SIGTERM drains every worker with 1001, a SIGKILLed worker is
restarted, a worker whose event loop is stuck fails the pod's probes and is killed and restarted, a worker that
fails at startup fails the serve, and the memory bus is refused at config load."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import ServerProcess, bus_block, run_cli, write_config
from wirehub.brokers import NatsServer, RedisServer
from wirehub.cli import TextFormatter
from wirehub.testing import WsClient, free_port, unique_room, ws_connect
from wirehub.workers import MetricsShare, merge_expositions

pytestmark = pytest.mark.slow

GRACE = 3.0
HINT = re.compile(r"^server going away; retry_ms=(\d+)$")
LISTENING = re.compile(r"worker (\d+) listening \(pid (\d+)")


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


def pod_config(directory: Path, redis: RedisServer, name: str, **server: Any) -> tuple[Path, int]:
    """A two-worker config on a free port with JSON logs (each line names its worker)."""
    port = free_port()
    config = {
        "server": {"host": "127.0.0.1", "port": port, "node_id": name, "ping_interval": 0, "processes": 2,
                   **server},
        "logging": {"level": "info", "format": "json", "access_log": False},
        "drain": {"grace": GRACE, "reconnect_jitter": 1},
        "bus": bus_block("redis", redis, f"p{uuid.uuid4().hex[:6]}"),
        "endpoints": [{"path": "/ws/chat", "handler": "chat",
                       "options": {"publish_rate": 1000, "publish_burst": 1000}}],
    }
    return write_config(directory / f"{name}.yaml", config), port


@pytest.fixture
async def pod(redis: RedisServer, tmp_path: Path) -> AsyncIterator[ServerProcess]:
    path, port = pod_config(tmp_path, redis, "pod")
    server = await ServerProcess(path, port, name="pod", new_session=True).start_ready()
    await wait_listening(server, 2)
    yield server
    server.stop(GRACE + 10)


class Clients:
    def __init__(self) -> None:
        self.open: list[WsClient] = []

    async def connect(self, server: ServerProcess) -> tuple[WsClient, str]:
        """A chat client and the node (worker) that welcomed it."""
        client = await ws_connect(server.url("/ws/chat", "ws"))
        self.open.append(client)
        welcome = await client.recv()
        assert welcome["op"] == "welcome", welcome
        return client, str(welcome["node"])

    async def by_worker(self, server: ServerProcess, count: int) -> dict[str, list[WsClient]]:
        got: dict[str, list[WsClient]] = {}
        for _ in range(count):
            client, node = await self.connect(server)
            got.setdefault(node, []).append(client)
        return got


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    c = Clients()
    yield c
    for client in c.open:
        await client.aclose()


async def wait_listening(server: ServerProcess, count: int, timeout: float = 20.0) -> dict[int, int]:
    """Worker index -> pid of its latest start, once ``count`` workers have logged that they listen."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {int(i): int(pid) for i, pid in LISTENING.findall(server.output())}
        if len(pids) >= count:
            return pids
        assert time.monotonic() < deadline, server.output()
        await asyncio.sleep(0.05)


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]


async def scrape(server: ServerProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics`` (parsed by prometheus_client's own parser: the merge must stay valid)."""
    status, body = await asyncio.get_running_loop().run_in_executor(None, server.get, "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


async def chat_sessions(server: ServerProcess, want: dict[str, float], timeout: float = 5.0) -> None:
    """Until ``wirehub_sessions{endpoint="/ws/chat"}`` per worker is ``want`` (snapshots are up to 1 s old)."""
    deadline = time.monotonic() + timeout
    while True:
        samples = await scrape(server)
        got = {dict(labels)["worker"]: value for (name, labels), value in samples.items()
               if name == "wirehub_sessions" and dict(labels).get("endpoint") == "/ws/chat"}
        if got == want:
            return
        assert time.monotonic() < deadline, f"sessions per worker {got}, expected {want}"
        await asyncio.sleep(0.2)


# -- config -----------------------------------------------------------------------------------------------------


def test_memory_bus_with_several_processes_fails_check_config_and_serve(tmp_path: Path) -> None:
    for processes in (2, 0):
        path = write_config(tmp_path / f"m{processes}.yaml", {"server": {"processes": processes}})
        for args in (("check-config", str(path)), ("--config", str(path), "serve")):
            result = run_cli(*args, timeout=30)
            assert result.returncode == 2, result
            assert result.stderr.startswith("wirehub: server.processes: ")
            assert "bus.plugin: memory" in result.stderr and "server.processes: 1" in result.stderr
    path = write_config(tmp_path / "neg.yaml", {"server": {"processes": -1}})
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "server.processes: must be at least 0" in result.stderr
    path = write_config(tmp_path / "mode.yaml", {"server": {"process_listen": "fork"}})
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "server.process_listen: 'fork' is not one of: reuseport, shared" in result.stderr
    # from the environment and the option, named as such
    result = run_cli("check-config", env={"WIREHUB_PROCESSES": "3"})
    assert result.returncode == 2 and result.stderr.startswith("wirehub: server.processes: 3 worker processes")
    assert "(from $WIREHUB_PROCESSES)" in result.stderr
    result = run_cli("serve", "--processes", "many", env={"WIREHUB_PROCESSES": "1"})
    assert result.returncode == 2
    assert "server.processes: expected an integer, got 'many' (from --processes)" in result.stderr
    path = write_config(tmp_path / "stall.yaml", {"server": {"worker_stall_timeout": 0.5}})
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "server.worker_stall_timeout: must be at least 1.0, got 0.5" in result.stderr
    # one process on the memory bus stays as it was
    path = write_config(tmp_path / "one.yaml", {"server": {"processes": 1}})
    assert run_cli("check-config", str(path)).returncode == 0


def test_text_log_lines_name_their_worker() -> None:
    record = logging.LogRecord("wirehub", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    assert TextFormatter(3).format(record).endswith(" INFO wirehub [worker 3]: hello there")
    assert TextFormatter().format(record).endswith(" INFO wirehub: hello there")


# -- the metrics merge ------------------------------------------------------------------------------------------


def test_merge_labels_every_sample_and_keeps_each_family_together() -> None:
    a = (b"# HELP x_total X\n# TYPE x_total counter\nx_total 1.0\n"
         b'# HELP s Sessions\n# TYPE s gauge\ns{endpoint="/ws/chat"} 2.0\n')
    b = (b"# HELP x_total X\n# TYPE x_total counter\nx_total 3.0\n"
         b'# HELP s Sessions\n# TYPE s gauge\ns{endpoint="/ws/chat"} 5.0\n'
         b'# HELP h H\n# TYPE h histogram\nh_bucket{le="+Inf"} 4.0\nh_count 4.0\nh_sum 0.5\n')
    own = b"# HELP r_total Restarts\n# TYPE r_total counter\nr_total{worker=\"1\"} 2\n"
    text = merge_expositions([("0", a), ("1", b), (None, own)]).decode()
    assert text.count("# TYPE x_total counter") == 1 and text.count("# HELP s Sessions") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert [(s.labels, s.value) for s in families["x"].samples] == [({"worker": "0"}, 1.0), ({"worker": "1"}, 3.0)]
    assert [(s.labels, s.value) for s in families["s"].samples] == [
        ({"worker": "0", "endpoint": "/ws/chat"}, 2.0), ({"worker": "1", "endpoint": "/ws/chat"}, 5.0)]
    assert [s.labels for s in families["h"].samples] == [{"worker": "1", "le": "+Inf"}, {"worker": "1"},
                                                         {"worker": "1"}]
    assert [(s.labels, s.value) for s in families["r"].samples] == [({"worker": "1"}, 2.0)]


def test_share_slots_read_back_the_latest_write_and_refuse_an_oversized_one(caplog: pytest.LogCaptureFixture
                                                                             ) -> None:
    share = MetricsShare(2)
    assert share.read(0) is None and share.read(1) is None
    share.write(1, b"first")
    share.write(1, b"second, longer")
    got = share.read(1)
    assert got is not None and got[1] == b"second, longer" and abs(got[0] - time.time()) < 5
    share.write(1, b"x" * MetricsShare.SLOT)  # over the slot: the previous snapshot stays, one warning
    share.write(1, b"x" * MetricsShare.SLOT)
    got = share.read(1)
    assert got is not None and got[1] == b"second, longer"
    assert len([r for r in caplog.records if "over the" in r.getMessage()]) == 1
    # a writer killed in the middle of a write leaves its slot odd: unreadable, until the next write
    MetricsShare._HEAD.pack_into(share.buf, MetricsShare.SLOT, 7, 0.0, 0)
    assert share.read(1) is None
    share.write(1, b"after the restart")
    got = share.read(1)
    assert got is not None and got[1] == b"after the restart"


def test_heartbeats_name_the_workers_whose_loop_stopped_beating() -> None:
    from wirehub.workers import Heartbeats, Stall, stalled_siblings

    beats = Heartbeats(3)
    assert beats.stalled(1.0) == []  # never started: not judged
    beats.start(0, 100)
    beats.start(1, 101)
    beats.start(2, 102)
    assert beats.stalled(1.0) == []
    Heartbeats._SLOT.pack_into(beats.buf, Heartbeats._SLOT.size, time.monotonic() - 3.0, 101)  # 1 beat 3 s ago
    [stall] = beats.stalled(1.0)
    assert (stall.index, stall.pid) == (1, 101) and 3.0 <= stall.age < 4.0
    assert beats.stalled(5.0) == [] and beats.stalled(1.0, skip=1) == []
    [named] = stalled_siblings(beats, 2, 1.0, "pod-a-w2")
    assert named["worker"] == 1 and named["node"] == "pod-a-w1" and named["pid"] == 101
    assert stalled_siblings(beats, 1, 1.0, "pod-a-w1") == []  # a worker that answers is not stalled itself
    beats.beat(1)
    assert beats.stalled(1.0) == []
    Heartbeats._SLOT.pack_into(beats.buf, 0, time.monotonic() - 9.0, 100)
    beats.clear(0)  # draining, dead or restarting: no longer judged
    assert beats.stalled(1.0) == [] and Stall(0, 100, 1.0).index == 0


# -- a pod of two workers on Redis --------------------------------------------------------------------------


async def test_connections_spread_over_both_workers_and_a_message_crosses_them_in_order(
        pod: ServerProcess, clients: Clients) -> None:
    workers = await clients.by_worker(pod, 40)
    assert set(workers) == {"pod-w0", "pod-w1"}, {k: len(v) for k, v in workers.items()}
    assert min(len(v) for v in workers.values()) >= 8, "the kernel's spread is far from even"
    room = unique_room("procs")
    sender, member = workers["pod-w0"][0], workers["pod-w1"][0]
    for client in (sender, member):
        assert (await client.request({"op": "join", "room": room}))["op"] == "joined"
    for i in range(30):
        await sender.send({"op": "publish", "room": room, "data": {"n": i}})
    got = [await member.recv_op("message") for _ in range(30)]
    assert [m["data"]["n"] for m in got] == list(range(30))
    assert [m["offset"] for m in got] == sorted(m["offset"] for m in got)
    # and back: a member on worker 0 hears worker 1
    await member.send({"op": "publish", "room": room, "data": "back"})
    assert (await sender.recv_op("message"))["data"] == "back"


async def test_on_nats_too_a_message_and_presence_cross_workers(tmp_path: Path, clients: Clients) -> None:
    with NatsServer() as nats:
        port = free_port()
        path = write_config(tmp_path / "nats.yaml", {
            "server": {"host": "127.0.0.1", "port": port, "node_id": "np", "ping_interval": 0, "processes": 2},
            "logging": {"level": "warning"}, "drain": {"grace": GRACE},
            "bus": bus_block("nats", nats, f"p{uuid.uuid4().hex[:6]}")})
        server = await ServerProcess(path, port, name="nats-pod", new_session=True).start_ready()
        try:
            workers = await clients.by_worker(server, 30)
            assert set(workers) == {"np-w0", "np-w1"}
            room = unique_room("procs")
            sender, member = workers["np-w0"][0], workers["np-w1"][0]
            for client in (sender, member):
                assert (await client.request({"op": "join", "room": room}))["op"] == "joined"
            for i in range(10):
                await sender.send({"op": "publish", "room": room, "data": i})
            assert [(await member.recv_op("message"))["data"] for _ in range(10)] == list(range(10))
            presence = await member.request({"op": "presence", "room": room})
            assert presence["count"] == {"users": 2, "connections": 2}
            for client in clients.open:
                await client.aclose()
            clients.open.clear()
        finally:
            assert server.stop(GRACE + 10) == 0


async def test_metrics_answer_for_the_pod_on_either_worker(pod: ServerProcess, clients: Clients) -> None:
    workers = await clients.by_worker(pod, 20)
    want = {"0": float(len(workers.get("pod-w0", []))), "1": float(len(workers.get("pod-w1", [])))}
    await chat_sessions(pod, want)
    # a scrape lands on either worker (SO_REUSEPORT hashes each connection): every answer has both workers,
    # the supervisor's series, and how old each worker's part is
    for _ in range(6):
        samples = await scrape(pod)
        ages = {dict(labels)["worker"]: v for (name, labels), v in samples.items()
                if name == "wirehub_worker_metrics_age_seconds"}
        assert set(ages) == {"0", "1"} and min(ages.values()) == 0.0 and max(ages.values()) < 3.0
        assert samples["wirehub_workers", ()] == 2.0
        assert samples["wirehub_worker_restarts_total", (("worker", "0"),)] == 0.0
        assert {dict(labels)["worker"] for (name, labels) in samples if name == "wirehub_build_info"} == {"0", "1"}
    logs = log_lines(pod)
    assert {e.get("worker") for e in logs if "listening on port" in e["msg"] and "node pod-w" in e["msg"]} == {0, 1}
    # the supervisor says what becomes of connections queued on a worker that dies (this netns's sysctl)
    from wirehub.workers import migrate_req

    migrate = migrate_req()
    said = [e["msg"] for e in logs if e["msg"].startswith("queued connections of a dying worker")]
    assert said == [f"queued connections of a dying worker move to the other workers (net.ipv4.tcp_migrate_req = "
                    f"{migrate})" if migrate else
                    f"queued connections of a dying worker are reset (net.ipv4.tcp_migrate_req = "
                    f"{'absent' if migrate is None else migrate}); docs/operations.md, several processes per pod"]


async def test_sigterm_drains_every_worker_with_1001_and_the_supervisor_exits_0(
        pod: ServerProcess, clients: Clients) -> None:
    workers = await clients.by_worker(pod, 30)
    assert set(workers) == {"pod-w0", "pod-w1"}
    started = time.monotonic()
    pod.proc.send_signal(signal.SIGTERM)
    for client in clients.open:
        code, reason = await client.wait_closed(GRACE + 5)
        assert code == 1001 and HINT.match(reason or ""), (code, reason)
    code = await asyncio.get_running_loop().run_in_executor(None, pod.proc.wait, GRACE + 10)
    assert code == 0, pod.output()
    assert time.monotonic() - started < GRACE + 2
    logs = log_lines(pod)
    closed = [e for e in logs if e.get("event") == "session_close"]
    assert len(closed) == 30 and {e["code"] for e in closed} == {1001}
    assert {e["worker"] for e in closed} == {0, 1}
    assert any("SIGTERM received: stopping 2 workers" in e["msg"] for e in logs)


async def test_a_killed_worker_is_restarted_and_its_clients_come_back(pod: ServerProcess, clients: Clients
                                                                     ) -> None:
    pids = await wait_listening(pod, 2)
    workers = await clients.by_worker(pod, 20)
    victims = workers["pod-w1"]
    survivors = workers["pod-w0"]
    room = unique_room("procs")
    assert (await survivors[0].request({"op": "join", "room": room}))["op"] == "joined"
    os.kill(pids[1], signal.SIGKILL)
    for client in victims:  # the kernel closes their sockets: no close frame
        code, _ = await client.wait_closed(5)
        assert code is None
    deadline = time.monotonic() + 10
    while (restarted := LISTENING.findall(pod.output())) and len(restarted) < 3:
        assert time.monotonic() < deadline, pod.output()
        await asyncio.sleep(0.05)
    assert restarted[-1][0] == "1" and int(restarted[-1][1]) != pids[1]
    assert f"worker 1 (pid {pids[1]}) died with signal SIGKILL" in pod.output()
    # the victims reconnect; some land on the new worker 1, which serves and reaches worker 0's members
    back = await clients.by_worker(pod, 20)
    assert set(back) == {"pod-w0", "pod-w1"}
    newcomer = back["pod-w1"][0]
    assert (await newcomer.request({"op": "join", "room": room}))["op"] == "joined"
    await newcomer.send({"op": "publish", "room": room, "data": "again"})
    assert (await survivors[0].recv_op("message"))["data"] == "again"
    # worker 0 never noticed: its clients are still open
    assert all(c.close_code is None for c in survivors)
    samples = await scrape(pod)
    assert samples["wirehub_worker_restarts_total", (("worker", "1"),)] == 1.0
    # a second crash in a row waits twice as long
    os.kill(int(restarted[-1][1]), signal.SIGKILL)
    deadline = time.monotonic() + 10
    while len(LISTENING.findall(pod.output())) < 4:
        assert time.monotonic() < deadline, pod.output()
        await asyncio.sleep(0.05)
    assert f"worker 1 (pid {restarted[-1][1]}) died with signal SIGKILL" in pod.output()
    assert "restarting it in 1.0s" in pod.output()


def probe(port: int, path: str, timeout: float = 0.5) -> tuple[int, dict[str, Any]] | None:
    """GET ``path`` on a new connection (so on any worker): the status and JSON body, or None when nothing
    answered within ``timeout`` (the kernel accepted the connection for a worker whose loop does not run)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    except OSError:
        return None
    finally:
        conn.close()


async def probes(port: int, path: str, answered: int, silent: int = 0, timeout: float = 30.0
                 ) -> tuple[list[tuple[int, dict[str, Any]]], int]:
    """Probes of ``path`` until ``answered`` of them got an answer and ``silent`` did not: (the answers, the
    unanswered count). SO_REUSEPORT hashes each connection to a worker, so both kinds come in time."""
    loop = asyncio.get_running_loop()
    got: list[tuple[int, dict[str, Any]]] = []
    unanswered = 0
    deadline = time.monotonic() + timeout
    while len(got) < answered or unanswered < silent:
        assert time.monotonic() < deadline, (got, unanswered)
        answer = await loop.run_in_executor(None, probe, port, path)
        if answer is None:
            unanswered += 1
        else:
            got.append(answer)
    return got, unanswered


async def test_a_worker_whose_loop_is_stuck_fails_the_pods_probes_and_is_killed_and_restarted(
        redis: RedisServer, tmp_path: Path, clients: Clients) -> None:
    """Worker 1's loop blocks (a loop callback sleeps, as a plugin's blocking I/O would) while its process lives.
    With the supervisor frozen, worker 0's /healthz and /readyz answer 503 naming worker 1 once its heartbeat is
    older than the default ``server.worker_stall_timeout`` (5 s); the probes that land on worker 1 get no
    answer. Once the supervisor runs, it SIGKILLs worker 1 and restarts it, and the probes pass again."""
    from tests.plugins_for_tests.loop_blocker import MODULE

    path, port = pod_config(tmp_path, redis, "stall")
    config = yaml.safe_load(path.read_text())
    config["plugins"] = {"load": [MODULE]}
    write_config(path, config)
    server = await ServerProcess(path, port, name="stall", new_session=True).start_ready()
    supervisor = server.proc.pid
    try:
        pids = await wait_listening(server, 2)
        workers = await clients.by_worker(server, 20)
        assert set(workers) == {"stall-w0", "stall-w1"}
        answers, _ = await probes(port, "/healthz", 4)
        assert {status for status, _ in answers} == {200}
        os.kill(pids[0], signal.SIGUSR1)  # at any time: a worker's stack on stderr, and it goes on serving
        deadline = time.monotonic() + 5
        while "(most recent call first):" not in server.output():
            assert time.monotonic() < deadline, server.output()
            await asyncio.sleep(0.05)
        os.kill(supervisor, signal.SIGSTOP)  # the probes' side alone first
        blocked_at = time.monotonic()
        os.kill(pids[1], signal.SIGUSR2)
        await asyncio.sleep(5.5)
        named = {"worker": 1, "node": "stall-w1", "pid": pids[1]}
        for probe_path in ("/healthz", "/readyz"):
            answers, _ = await probes(port, probe_path, 3, silent=1)
            for status, body in answers:  # every answer is worker 0's, and names worker 1
                assert status == 503 and body["node"] == "stall-w0", body
                [stalled] = body["stalled"]
                assert {k: stalled[k] for k in named} == named
                assert 5.0 < stalled["heartbeat_age"] < time.monotonic() - blocked_at + 1.0
                if probe_path == "/readyz":
                    assert body["status"] == "not_ready" and body["reason"] == "worker_stalled"
                else:
                    assert body["status"] == "worker_stalled"
        assert "blocking the event loop" in server.output() and "stalled:" not in server.output()  # none acted
        os.kill(supervisor, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while len(restarted := LISTENING.findall(server.output())) < 3:
            assert time.monotonic() < deadline, server.output()
            await asyncio.sleep(0.05)
        assert restarted[-1][0] == "1" and int(restarted[-1][1]) != pids[1]
        out = server.output()
        assert re.search(rf"worker 1 \(pid {pids[1]}\) stalled: its event loop has not run for \d+\.\ds "
                         r"\(server.worker_stall_timeout: 5s\); its Python stack follows; killing it \(SIGKILL\) to "
                         r"restart it", out), out
        # the stack says where: faulthandler's dump of the stuck worker, the plugin's sleep on top
        stack = out.split(") stalled: ", 1)[1]
        assert re.search(r'Current thread 0x[0-9a-f]+ \(most recent call first\):\n  File ".*loop_blocker\.py", '
                         r"line \d+ in _block\n", stack), stack
        assert f"worker 1 (pid {pids[1]}) died with signal SIGKILL" in out
        # the pod has recovered: every probe answers 200, on either worker; worker 0's clients never noticed
        for probe_path in ("/healthz", "/readyz"):
            answered: set[str] = set()
            until = time.monotonic() + 20
            while answered != {"stall-w0", "stall-w1"}:
                assert time.monotonic() < until, f"only {answered} answered {probe_path}"
                [(status, body)], silent = await probes(port, probe_path, 1)
                assert status == 200 and silent == 0, body
                answered.add(body["node"])
        for client in workers["stall-w1"]:
            assert (await client.wait_closed(5))[0] is None  # the kill reset them
        assert all(c.close_code is None for c in workers["stall-w0"])
        samples = await scrape(server)
        assert samples["wirehub_worker_stalls_total", (("worker", "1"),)] == 1.0
        assert samples["wirehub_worker_stalls_total", (("worker", "0"),)] == 0.0
        assert samples["wirehub_worker_restarts_total", (("worker", "1"),)] == 1.0
        assert samples["wirehub_worker_restarts_total", (("worker", "0"),)] == 0.0  # SIGUSR1 left it running
    finally:
        os.kill(supervisor, signal.SIGCONT)
        server.stop(GRACE + 10)


async def test_a_worker_that_fails_at_startup_fails_the_serve(redis: RedisServer, tmp_path: Path) -> None:
    path, port = pod_config(tmp_path, redis, "nobroker")
    config = yaml.safe_load(path.read_text())
    config["bus"]["redis"]["url"] = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    write_config(path, config)
    server = ServerProcess(path, port, name="nobroker", new_session=True).start()
    code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
    assert code == 1, server.output()
    out = server.output()
    assert "failed at startup (exit code 1): stopping the pod's workers" in out
    assert out.count("worker 0 started") == 1 and out.count("worker 1 started") == 1, "a startup failure looped"


async def test_a_restart_that_fails_at_startup_fails_the_serve(tmp_path: Path) -> None:
    """The broker is gone when a crashed worker restarts: its start fails as a first start would, so the pod
    drains its other worker and exits 1 (Kubernetes restarts it with backoff) instead of looping inside."""
    with RedisServer() as own:
        path, port = pod_config(tmp_path, own, "lost")
        server = await ServerProcess(path, port, name="lost", new_session=True).start_ready()
        pids = await wait_listening(server, 2)
    # the broker is stopped (the with block); worker 1 crashes
    os.kill(pids[1], signal.SIGKILL)
    code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, GRACE + 20)
    out = server.output()
    assert code == 1, out
    assert "worker 1 failed at startup (exit code 1): stopping the pod's workers" in out
    assert out.count("worker 1 started") == 2, "restarted once, not in a loop"


async def test_a_worker_that_ignores_the_drain_is_killed_after_the_grace(pod: ServerProcess) -> None:
    pids = await wait_listening(pod, 2)
    os.kill(pids[0], signal.SIGSTOP)  # hung: it will never handle SIGTERM
    started = time.monotonic()
    pod.proc.send_signal(signal.SIGTERM)
    code = await asyncio.get_running_loop().run_in_executor(None, pod.proc.wait, GRACE + 20)
    assert code == 1, pod.output()
    assert GRACE + 4 < time.monotonic() - started < GRACE + 10
    assert "workers [0] still running 5s after the drain grace: killing them" in pod.output()
    assert "worker 1 stopped" in pod.output()


@pytest.mark.parametrize("mode", ["reuseport", "shared"])
async def test_a_port_in_use_fails_the_serve_before_any_worker(redis: RedisServer, tmp_path: Path, mode: str) -> None:
    path, port = pod_config(tmp_path, redis, f"taken-{mode}", process_listen=mode)
    with socket.socket() as other:  # a listener without SO_REUSEPORT: neither mode may share its port
        other.bind(("127.0.0.1", port))
        other.listen()
        server = ServerProcess(path, port, name=f"taken-{mode}", new_session=True).start()
        code = await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
    assert code == 1, server.output()
    out = server.output()
    assert f"startup failed: cannot listen on 127.0.0.1:{port}: Address already in use" in out
    assert "worker 0 started" not in out


async def test_shared_socket_mode_serves_and_drains(redis: RedisServer, tmp_path: Path, clients: Clients) -> None:
    path, port = pod_config(tmp_path, redis, "shared", process_listen="shared")
    server = await ServerProcess(path, port, name="shared", new_session=True).start_ready()
    try:
        await wait_listening(server, 2)
        workers = await clients.by_worker(server, 20)
        assert set(workers) <= {"shared-w0", "shared-w1"} and sum(map(len, workers.values())) == 20
        server.proc.send_signal(signal.SIGTERM)
        for client in clients.open:
            code, _ = await client.wait_closed(GRACE + 5)
            assert code == 1001
        assert await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, GRACE + 10) == 0
    finally:
        server.stop(GRACE + 10)


async def test_workers_drain_when_the_supervisor_is_killed(pod: ServerProcess, clients: Clients) -> None:
    pids = await wait_listening(pod, 2)
    await clients.by_worker(pod, 6)
    pod.proc.send_signal(signal.SIGKILL)
    for client in clients.open:
        code, _ = await client.wait_closed(GRACE + 5)
        assert code == 1001, "an orphaned worker must drain, not linger"
    deadline = time.monotonic() + GRACE + 5
    for pid in pids.values():
        while running(pid):
            assert time.monotonic() < deadline, f"worker {pid} still runs"
            await asyncio.sleep(0.05)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (an orphan's exit is reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(("files", "cpus"), [
    ({"cpu.max": "250000 100000\n"}, 3),  # cgroup v2, a limit of 2.5 CPUs
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "150000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2),  # cgroup v1
    ({"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_the_cpu_limit_of_cgroup_v2_and_v1(tmp_path: Path, files: dict[str, str], cpus: int | None) -> None:
    from wirehub.workers import _cgroup_cpus

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_cpus(tmp_path) == cpus


def test_the_migrate_sysctl_is_read_as_a_number_or_none(tmp_path: Path) -> None:
    from wirehub.workers import migrate_req

    (tmp_path / "on").write_text("1\n")
    (tmp_path / "bad").write_text("yes\n")
    assert migrate_req(tmp_path / "on") == 1
    assert migrate_req(tmp_path / "bad") is None and migrate_req(tmp_path / "absent") is None


def test_a_signal_without_a_name_is_logged_by_number() -> None:
    from wirehub.workers import _signal_name

    assert _signal_name(9) == "SIGKILL"
    assert _signal_name(40) == "40"  # a real-time signal: signal.Signals(40) raises
