"""The docs keep up with the code: hooks, codes and config keys each have a documented entry."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from wirehub import config, hookspecs, testing
from wirehub.protocol import CloseCode, ErrorCode

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_every_hookspec_is_documented_in_plugins_md() -> None:
    text = (DOCS / "plugins.md").read_text()
    specs = [name for name, obj in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("wirehub_")]
    assert len(specs) >= 12
    missing = [name for name in specs if not re.search(rf"^#### `{name}\(", text, re.MULTILINE)]
    assert not missing, f"hooks without an entry in docs/plugins.md: {missing}"


def test_every_error_and_close_code_is_in_protocol_md() -> None:
    text = (DOCS / "protocol.md").read_text()
    missing = [c.value for c in ErrorCode if f"`{c.value}`" not in text]
    missing += [str(c.value) for c in CloseCode if not re.search(rf"\b{c.value}\b", text)]
    assert not missing, f"codes missing from docs/protocol.md: {missing}"


def test_every_core_config_key_is_in_configuration_md() -> None:
    text = (DOCS / "configuration.md").read_text()
    missing = []
    for section, cls in config._SECTIONS.items():
        for field in dataclasses.fields(cls):
            if not re.search(rf"^\| `{field.name}` \|", text, re.MULTILINE):
                missing.append(f"{section}.{field.name}")
        if f"## `{section}`" not in text:
            missing.append(section)
    assert not missing, f"config keys missing from docs/configuration.md: {missing}"


def test_every_core_config_key_is_in_the_default_file() -> None:
    text = (Path(__file__).resolve().parent.parent / "config" / "wirehub.yaml").read_text()
    missing = [f"{s}.{f.name}" for s, cls in config._SECTIONS.items() for f in dataclasses.fields(cls)
               if not re.search(rf"^\s+{f.name}:", text, re.MULTILINE)]
    assert not missing, f"keys missing from config/wirehub.yaml: {missing}"


def test_every_testing_fixture_and_contract_fixture_is_documented_in_plugins_md() -> None:
    """Each fixture wirehub.testing provides, and each one its contract suites take, has a table row."""
    text = (DOCS / "plugins.md").read_text()
    section = text[text.index("### Fixtures and contract suites"):text.index("## Packaging checklist")]
    provided = set(re.findall(r"@pytest\.fixture[^\n]*\n(?:async )?def (\w+)", inspect.getsource(testing)))
    assert {"wirehub_server", "redis_server", "nats_server"} <= provided
    suites = [obj for name, obj in vars(testing).items() if inspect.isclass(obj) and name.endswith("Contract")]
    assert len(suites) == 5
    needed = {param for suite in suites for name, method in inspect.getmembers(suite, inspect.isfunction)
              if name.startswith("test_") for param in list(inspect.signature(method).parameters)[1:]}
    assert {"backend", "backend_pair", "small_history_backend", "footprint", "presence_replica", "broker_ops"} <= needed
    missing = sorted(f for f in provided | needed if not re.search(rf"^\| `{f}` \|", section, re.MULTILINE))
    missing += [s.__name__ for s in suites if f"`{s.__name__}`" not in section]
    assert not missing, f"fixtures or suites without a row in docs/plugins.md: {missing}"


def test_the_plugin_docs_answer_what_authors_hit() -> None:
    """issue 14: what broke a first plugin, each said where an author looks."""
    reference, tutorial = (DOCS / "plugins.md").read_text(), (DOCS / "plugin-tutorial.md").read_text()
    for text in (reference, tutorial):
        assert "asyncio_mode = auto" in text
        assert "synchronous" in text and "never `await`" in text
        assert "ConfigError(key, message)" in text
        assert "plugin new" in text
    readme = (DOCS.parent / "README.md").read_text()
    assert "wirehub plugin new" in readme and "docs/plugin-tutorial.md" in readme
