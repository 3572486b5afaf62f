"""The docs keep up with the code: hooks, codes and config keys each have a documented entry."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

from wirehub import config, hookspecs
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
