"""The collector while serving (``server.gc_*``, service/gc_policy.py): the keys are checked at load, the
generation-0 threshold is applied, and with ``gc_freeze_survivors`` a full collection freezes what survived
it (later full collections skip it) until the first full collection ``gc_thaw_interval`` s after the last
thaw, which frees the cycles among the frozen objects."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from wirehub.config import ConfigError, config_from_dict
from wirehub.gc_policy import CollectorPolicy


@pytest.mark.parametrize(("raw", "key", "fragment"), [
    ({"gc_threshold0": 10}, "server.gc_threshold0", "at least 700"),
    ({"gc_threshold0": "many"}, "server.gc_threshold0", ""),
    ({"gc_thaw_interval": 0}, "server.gc_thaw_interval", "at least 1"),
    ({"gc_freeze_survivors": "sometimes"}, "server.gc_freeze_survivors", ""),
])
def test_bad_gc_keys_are_rejected_naming_the_key(raw: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        config_from_dict({"server": raw})
    assert err.value.key == key
    assert fragment in str(err.value)


def test_the_defaults() -> None:
    server = config_from_dict({}).server
    assert (server.gc_threshold0, server.gc_freeze_survivors, server.gc_thaw_interval) == (50_000, False, 600.0)


class _Node:
    """A cycle (it refers to itself) that a weak reference can watch."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def restored_collector() -> Iterator[None]:
    """This test process's collector as it was: thresholds, callbacks, nothing frozen."""
    thresholds, callbacks = gc.get_threshold(), list(gc.callbacks)
    try:
        yield
    finally:
        gc.callbacks[:] = callbacks
        gc.set_threshold(*thresholds)
        gc.unfreeze()


@pytest.mark.usefixtures("restored_collector")
def test_start_freezes_startup_and_sets_the_generation_0_threshold() -> None:
    server = config_from_dict({"server": {"gc_threshold0": 12_345}}).server
    policy = CollectorPolicy(server)
    policy.start()
    assert gc.get_threshold()[0] == 12_345
    assert gc.get_freeze_count() > 0
    assert policy._on_collection not in gc.callbacks  # gc_freeze_survivors is off by default


@pytest.mark.usefixtures("restored_collector")
def test_full_collections_skip_survivors_until_the_thaw_interval_passed() -> None:
    now = [0.0]
    server = config_from_dict({"server": {"gc_freeze_survivors": True, "gc_thaw_interval": 10}}).server
    policy = CollectorPolicy(server, clock=lambda: now[0])
    policy.start()
    try:
        stayers = [[i] for i in range(5_000)]  # long-lived objects (a storm's new sessions)
        node = _Node()
        watch = weakref.ref(node)
        frozen = gc.get_freeze_count()
        gc.collect()
        assert policy.freezes == 1 and policy.thaws == 0
        assert gc.get_freeze_count() >= frozen + len(stayers)  # the survivors: later collections skip them
        del node  # now garbage, but a cycle among frozen objects: only a thaw frees it
        gc.collect()
        assert watch() is not None
        now[0] = 9.9
        gc.collect()
        assert watch() is not None and policy.thaws == 0
        now[0] = 10.0
        gc.collect()  # the interval passed: unfrozen first, then walked and freed
        assert watch() is None
        assert policy.thaws == 1 and policy.freezes == 4
        assert gc.get_freeze_count() >= len(stayers)  # and the survivors frozen again
        now[0] = 15.0
        node = _Node()
        watch = weakref.ref(node)
        gc.collect()
        del node
        gc.collect()
        assert watch() is not None and policy.thaws == 1  # the next thaw is 10 s after this one
    finally:
        policy.close()
    assert policy._on_collection not in gc.callbacks


@pytest.mark.usefixtures("restored_collector")
def test_without_freeze_survivors_full_collections_walk_everything() -> None:
    policy = CollectorPolicy(config_from_dict({}).server)
    policy.start()
    node = _Node()
    watch = weakref.ref(node)
    gc.collect()
    del node
    gc.collect()
    assert watch() is None and policy.freezes == 0
