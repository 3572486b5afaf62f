"""docs/local-cluster.md, run as written: its commands on free ports, with the test session's brokers."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, ServerProcess, run_cli_async
from wirehub.brokers import BrokerProcess
from wirehub.testing import free_port

DOC = ROOT / "docs" / "local-cluster.md"
#: the environment a replica must not inherit from the developer's shell
OVERRIDE_ENV = ("WIREHUB_CONFIG", "WIREHUB_HOST", "WIREHUB_PORT", "WIREHUB_NODE_ID", "POD_NAME")


def commands(section: str) -> list[list[str]]:
    """The commands of the ``sh`` blocks under ``## section``, split like a shell would (comments and a
    trailing ``&`` dropped)."""
    body = DOC.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    out = []
    for block in re.findall(r"```sh\n(.*?)```", body, re.DOTALL):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[-1] == "&":
                argv.pop()
            if argv:
                out.append(argv)
    return out


def test_the_broker_commands_run_the_bundled_or_installed_brokers() -> None:
    lines = commands("The brokers")
    assert [argv[:4] for argv in lines] == [["python", "-m", "wirehub.brokers", name]
                                            for name in ("redis-server", "nats-server")]
    for argv in lines:  # the same module and binary, asked for its version instead of serving
        proc = subprocess.run([sys.executable, "-m", "wirehub.brokers", argv[3], "--version"], cwd=ROOT,
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0 and re.search(r"v=?\d+\.\d+", proc.stdout), proc.stderr


@pytest.mark.parametrize(("section", "broker_fixture"), [("Two replicas on Redis", "redis_server"),
                                                         ("Two replicas on NATS", "nats_server")])
async def test_two_replicas_from_the_shipped_config_share_a_room(section: str, broker_fixture: str,
                                                                  request: pytest.FixtureRequest,
                                                                  tmp_path: Path) -> None:
    broker: BrokerProcess = request.getfixturevalue(broker_fixture)
    lines = commands(section)
    env: dict[str, str] = {}
    ports: dict[str, str] = {}  # the doc's port -> a free one
    serves: list[list[str]] = []
    clients: list[list[str]] = []
    for argv in lines:
        if argv[0] == "export":
            name, value = argv[1].split("=", 1)
            assert value.split(":", 1)[0] == broker.url.split(":", 1)[0]  # the same kind of broker URL
            env[name] = broker.url
        elif argv[:2] == ["wirehub", "serve"]:
            assert "-c" in argv and argv[argv.index("-c") + 1] in ("config/redis.yaml", "config/nats.yaml")
            ports[argv[argv.index("--port") + 1]] = str(free_port())
            serves.append(argv)
        else:
            assert argv[:2] in (["wirehub", "listen"], ["wirehub", "send"]), argv
            clients.append(argv)
    assert len(serves) == 2 and [argv[1] for argv in clients] == ["listen", "send"]

    def local(argv: list[str]) -> list[str]:
        """``argv`` on this test's ports: the doc's port numbers, alone or in a URL, are replaced."""
        return [re.sub(r"(?<![0-9])(" + "|".join(ports) + r")(?![0-9])", lambda m: ports[m.group(1)], a)
                for a in argv]

    replicas = [ServerProcess(None, int(local([argv[argv.index("--port") + 1]])[0]), env=env,
                              log=tmp_path / f"replica{i}.log", unset_env=OVERRIDE_ENV, serve_args=local(argv[2:]))
                for i, argv in enumerate(serves)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            await replica.wait_ready()
        listen, send = (local(argv[1:]) for argv in clients)
        assert listen[listen.index("--url") + 1] != send[send.index("--url") + 1]  # one replica each
        listener = asyncio.ensure_future(run_cli_async(*listen, env=env, timeout=60))
        for _ in range(100):  # send (as written) until the listener, which joined meanwhile, got one
            code, out, err = await run_cli_async(*send, env=env)
            assert code == 0, err
            done, _ = await asyncio.wait({listener}, timeout=0.2)
            if done:
                break
        code, out, err = await listener
        assert code == 0, err
        message = json.loads(out)
        assert message["room"] == "lobby" and message["data"] == json.loads(send[2])
    finally:
        codes = [replica.stop() for replica in replicas]
    assert codes == [0, 0], [replica.output()[-2000:] for replica in replicas]
