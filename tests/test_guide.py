"""docs/plugin-tutorial.md is executed: its files become a package whose tests pass and which a server loads.

Every fenced block whose info string names a file (```python title="wirehub_shout/handler.py"```) is written
into an empty folder. That package's own tests run with pytest in a subprocess (imported from the folder,
as the tutorial says); then it is installed into a folder of its own, and ``wirehub serve`` started with
the tutorial's config finds it through its entry points and serves it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from wirehub.testing import free_port, ws_connect

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "plugin-tutorial.md"
#: ```lang title="path"  ...  ```
BLOCK = re.compile(r'^```(\w+) title="([^"]+)"\n(.*?)^```$', re.MULTILINE | re.DOTALL)


def guide_files() -> dict[str, str]:
    files: dict[str, str] = {}
    for _, path, body in BLOCK.findall(GUIDE.read_text()):
        assert path not in files, f"{path} is written twice in {GUIDE.name}"
        files[path] = body
    return files


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("guide") / "wirehub-shout"
    for rel, body in guide_files().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
    return root


def test_the_guide_builds_a_whole_package() -> None:
    assert sorted(guide_files()) == [
        "pyproject.toml", "shout.yaml", "tests/test_bus.py", "tests/test_shout.py",
        "wirehub_shout/__init__.py", "wirehub_shout/bus.py", "wirehub_shout/handler.py",
        "wirehub_shout/moderation.py", "wirehub_shout/plugin.py",
    ]
    # the tutorial's code imports the public surface only
    for rel, body in guide_files().items():
        for line in body.splitlines():
            if re.match(r"\s*(from|import) wirehub\b", line):
                assert line.startswith(("from wirehub import", "from wirehub.testing import")), (rel, line)


def test_the_packages_own_tests_pass(package: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=package,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    passed = re.search(r"(\d+) passed", result.stdout)
    # the contract suites (bus, history, presence, state) and the live-server tests all ran
    assert passed and int(passed.group(1)) >= 30, result.stdout
    assert "failed" not in result.stdout and "skipped" not in result.stdout
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--isolated", "--line-length", "120", "--select",
                           "E,F,I,UP", "."], cwd=package, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


@pytest.fixture(scope="module")
def installed(package: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a process that has the package installed (into a folder of its own)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q", "--target",
                    str(target), str(package)], check=True, capture_output=True, timeout=300)
    path = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def wirehub(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "wirehub.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_the_installed_plugin_is_found_by_its_entry_points(installed: dict[str, str], package: Path) -> None:
    listed = wirehub("plugins", "--json", env=installed, cwd=package.parent)
    assert listed.returncode == 0, listed.stderr
    ours = {p["name"]: p for p in json.loads(listed.stdout) if "wirehub-shout" in p["source"]}
    assert set(ours) == {"shout", "moderation"}, listed.stdout
    assert all(p["source"] == "entry point wirehub-shout 0.1.0" for p in ours.values())
    checked = wirehub("check-config", str(package / "shout.yaml"), env=installed, cwd=package.parent)
    assert checked.returncode == 0, checked.stderr


@pytest.fixture
def served(installed: dict[str, str], package: Path) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wirehub.cli", "serve", "--config", str(package / "shout.yaml"),
                             "--port", str(port)], env=installed, cwd=package.parent,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        yield port
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, err


async def test_a_server_runs_the_installed_plugin(served: int) -> None:
    url = f"ws://127.0.0.1:{served}"
    for _ in range(100):  # until the server listens
        try:
            shout = await ws_connect(f"{url}/ws/shout", welcome=True, timeout=1.0)
            break
        except OSError:
            await asyncio.sleep(0.1)
    else:
        raise AssertionError("the server did not start")
    reply = await shout.request({"op": "shout", "text": "hey"})
    assert reply["op"] == "shouted" and reply["text"] == "HEY!!"

    chat = await ws_connect(f"{url}/ws/chat", welcome=True)
    listener = await ws_connect(f"{url}/ws/chat", welcome=True)
    for client in (chat, listener):
        assert (await client.request({"op": "join", "room": "lobby"}))["op"] == "joined"
    assert (await chat.request({"op": "join", "room": "news"}))["op"] == "joined"
    await chat.request({"op": "publish", "room": "lobby", "data": {"text": "darn"}})
    assert (await listener.recv_op("message"))["data"] == {"text": "***"}  # moderation, from its config block
    assert (await chat.request({"op": "publish", "room": "news", "data": {"text": "x"}}))["code"] == "forbidden"
    for client in (shout, chat, listener):
        client.close()
        await client.wait_closed()
