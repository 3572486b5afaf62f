"""wirehub.logs.LogLimiter: one line per (logger, template) per interval, then the count of the rest."""

from __future__ import annotations

import logging

import pytest

from wirehub.logs import LogLimiter


def test_one_line_per_interval_then_the_count(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = LogLimiter(10.0, clock=lambda: now[0])
    log = logging.getLogger("wirehub.test-limiter")
    caplog.set_level(logging.INFO, logger=log.name)
    written = [limiter.error(log, "session %s failed", i) for i in range(50)]
    assert written == [True] + [False] * 49
    assert limiter.warning(log, "another template %s", 1)  # a key of its own
    now[0] += 9.9
    assert not limiter.error(log, "session %s failed", 99)
    now[0] += 0.2
    assert limiter.error(log, "session %s failed", 100)
    assert [r.getMessage() for r in caplog.records] == [
        "session 0 failed", "another template 1", "session 100 failed (50 more like this in the last 10s)"]


def test_a_traceback_only_with_the_written_line(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(60.0)
    log = logging.getLogger("wirehub.test-limiter")
    caplog.set_level(logging.INFO, logger=log.name)
    for _ in range(20):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            limiter.exception(log, "op failed")
    assert caplog.text.count("Traceback") == 1 and len(caplog.records) == 1


def test_interval_zero_writes_everything_and_disabled_levels_cost_nothing(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(0.0)
    log = logging.getLogger("wirehub.test-limiter")
    caplog.set_level(logging.WARNING, logger=log.name)
    assert all(limiter.error(log, "x %d", i) for i in range(5))
    assert not limiter.log(log, logging.DEBUG, "debug %d", 1)
    assert len(caplog.records) == 5


def test_an_extra_key_gives_each_plugin_and_hook_its_own_line(caplog: pytest.LogCaptureFixture) -> None:
    limiter = LogLimiter(60.0)
    log = logging.getLogger("wirehub.test-limiter")
    caplog.set_level(logging.INFO, logger=log.name)
    template = "plugin %s: hook %s raised"
    for _ in range(10):
        for plugin, hook in (("a", "authorize"), ("a", "filter_message"), ("b", "authorize")):
            limiter.error(log, template, plugin, hook, key=(plugin, hook))
    assert [r.getMessage() for r in caplog.records] == [
        "plugin a: hook authorize raised", "plugin a: hook filter_message raised", "plugin b: hook authorize raised"]
