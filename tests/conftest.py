"""Shared test setup: wirehub's pytest plugin, and skips turned into failures on CI."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["service.testing"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    """Under .ci/run (WIREHUB_NO_SKIP=1) a skip is a failure: CI must have every system tool."""
    report = yield
    if os.environ.get("WIREHUB_NO_SKIP") == "1" and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped on CI, which must have every tool: {report.longrepr}"
    return report
