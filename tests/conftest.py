"""Shared test setup: wirehub's pytest plugin, the broker fixtures of the fault and replica tests, and skips
turned into failures on CI."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator

import pytest

from wirehub.brokers import BrokerProcess


@pytest.fixture(params=["redis", "nats"])
def kind(request: pytest.FixtureRequest) -> str:
    """The bus under test: each test that asks for it runs on Redis and on NATS."""
    return str(request.param)


@pytest.fixture
def broker(kind: str, redis_server_factory: Callable[..., BrokerProcess],
           nats_server_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker of ``kind`` of this test's own (it may be killed, paused or restarted)."""
    return redis_server_factory() if kind == "redis" else nats_server_factory()


@pytest.fixture(autouse=True)
def _leaks_fail_their_own_test() -> Iterator[None]:
    """With WIREHUB_GC_EACH_TEST=1, collect garbage at each test's teardown: a socket or file a test
    leaves unclosed is then a ResourceWarning (an error here) in that test, not in whichever later test
    the collector happens to run in. Off by default: some replica tests still leak Tornado client
    sockets (being traced); on, it is the tool that names them."""
    yield
    if os.environ.get("WIREHUB_GC_EACH_TEST") == "1":
        gc.collect()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Under .ci/run (WIREHUB_NO_SKIP=1) a skip is a failure: CI must have every system tool."""
    report = yield
    if os.environ.get("WIREHUB_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, which must have every tool: {report.longrepr}"
    return report
