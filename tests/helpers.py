"""Helpers for tests that run `wirehub` as a real process."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from tornado.httpclient import AsyncHTTPClient

ROOT = Path(__file__).resolve().parent.parent


def wirehub_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "service.cli", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(wirehub_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


class ServerProcess:
    """A `wirehub serve` subprocess; stderr goes to a file that tests can read."""

    def __init__(self, config: Path | None, port: int, env: dict[str, str] | None = None,
                 log: Path | None = None) -> None:
        """Runs ``wirehub --config CONFIG serve``, or plain ``wirehub serve`` when config is None."""
        self.port = port
        assert config is not None or log is not None
        self.log_path = log or config.with_suffix(".log")  # type: ignore[union-attr]
        self._log = self.log_path.open("wb")
        args = ("--config", str(config), "serve") if config is not None else ("serve",)
        self.proc = subprocess.Popen(wirehub_cmd(*args), cwd=ROOT,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    async def wait_ready(self, timeout: float = 20.0, path: str = "/readyz") -> None:
        deadline = time.monotonic() + timeout
        client = AsyncHTTPClient()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"wirehub exited with {self.proc.returncode}:\n{self.output()}")
            try:
                response = await client.fetch(self.url(path), raise_error=False, request_timeout=1)
                if response.code == 200:
                    return
            except OSError:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError(f"wirehub not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode
