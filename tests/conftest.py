"""Shared test setup: wirehub's pytest plugin, the broker fixtures of the fault and replica tests, the
broker clusters of the cluster and failover tests, the event loop of in-process tests, and skips turned
into failures on CI."""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Iterator, Mapping

import pytest
import uvloop

from wirehub.broker_clusters import RedisCluster, RedisSentinel, TlsFiles
from wirehub.brokers import BrokerProcess
from wirehub.nats_cluster import NatsCluster

# -- the event loop of in-process tests ----------------------------------------------------------------------------
#
# Servers started with the CLI run on the configured loop (``server.event_loop: auto``, uvloop); in-process
# servers run on the test's loop, which pytest-asyncio makes with the factory named here. Every async test
# runs on $WIREHUB_TEST_LOOP (asyncio by default; ``WIREHUB_TEST_LOOP=uvloop python -m pytest ...`` runs
# them all on uvloop); the modules of BOTH_LOOPS, where a loop's own behaviour shows (the socket takeover
# with add_reader/add_writer, timers, frame I/O), run on both loops in every run, and so does a test marked
# ``@pytest.mark.asyncio(loop_factories=["asyncio", "uvloop"])`` (pytest-asyncio >= 1.4).

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}
#: modules whose async tests run once per loop of LOOP_FACTORIES
BOTH_LOOPS = frozenset({"test_socket_stream.py", "test_keepalive_pong.py", "test_upgrade_head.py"})


def chosen_loop() -> str:
    """The loop of $WIREHUB_TEST_LOOP (default asyncio)."""
    name = os.environ.get("WIREHUB_TEST_LOOP") or "asyncio"
    if name not in LOOP_FACTORIES:
        raise pytest.UsageError(f"WIREHUB_TEST_LOOP={name!r}: expected one of {', '.join(LOOP_FACTORIES)}")
    return name


@pytest.hookimpl(optionalhook=True)
def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    marker = item.get_closest_marker("asyncio")
    if item.path.name in BOTH_LOOPS or (marker is not None and "loop_factories" in marker.kwargs):
        return LOOP_FACTORIES
    name = chosen_loop()
    return {name: LOOP_FACTORIES[name]}


@pytest.fixture(params=["redis", "nats"])
def kind(request: pytest.FixtureRequest) -> str:
    """The bus under test: each test that asks for it runs on Redis and on NATS."""
    return str(request.param)


@pytest.fixture
def broker(kind: str, redis_server_factory: Callable[..., BrokerProcess],
           nats_server_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker of ``kind`` of this test's own (it may be killed, paused or restarted)."""
    return redis_server_factory() if kind == "redis" else nats_server_factory()


# -- broker clusters, shared by the cluster and failover modules --------------------------------------------------
#
# A Redis topology takes seconds to start, so one of each serves the whole session. A test may kill or stop
# cluster nodes only if it restores them after (``restore()``, in test_redis_failover's fixture): the next
# test finds the cluster whole, if not with the same node as primary. A killed sentinel-managed master takes
# longer to come back than a fresh setup takes to start: the sentinel failover test has its own. A NATS
# cluster starts in under a second but keeps every R3 stream and bucket that tests create (hundreds after
# the contract suites), and a killed node's share of them is re-elected and caught up during the failover
# tests: one per module instead.


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster (3 primaries + 3 replicas), shared by the session."""
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """A Redis master with 2 replicas and 3 sentinels, shared by the session."""
    with RedisSentinel() as sentinel:
        yield sentinel


@pytest.fixture(scope="module")
def tls() -> Iterator[TlsFiles]:
    """A CA and a server and client certificate it signed, for the module's TLS Redis servers."""
    files = TlsFiles()
    yield files
    files.close()


@pytest.fixture(scope="module")
def nats_cluster() -> Iterator[NatsCluster]:
    """A 3-node NATS cluster with JetStream, shared by the module."""
    with NatsCluster() as cluster:
        yield cluster


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
