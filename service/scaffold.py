"""``wirehub plugin new NAME``: a plugin package whose tests pass right after it is generated.

The package has metadata (``pyproject.toml``, ``README.md``), the ``wirehub`` entry point, a handler
skeleton that imports only from ``wirehub``, and tests on ``wirehub.testing`` (a live server and a real
WebSocket client; pytest-asyncio in auto mode). tests/test_scaffold.py generates one and runs its tests.
"""

from __future__ import annotations

import keyword
import re
from pathlib import Path
from string import Template

#: a distribution name as pip normalises it: lower case, words joined by one '-' or '_'
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")
#: import names a plugin package must not take: it would hide wirehub itself or the package's tests
_RESERVED = frozenset({"wirehub", "tests", "test"})


class ScaffoldError(Exception):
    """The name or the destination is unusable; the message says why (the CLI exits 2)."""


def names(name: str) -> dict[str, str]:
    """The template values for distribution ``name``: ``pkg`` (import name), ``short`` (the handler and
    entry-point name: ``name`` without a ``wirehub-`` prefix), ``cls`` (the handler class's prefix)."""
    if not _NAME.match(name):
        raise ScaffoldError(f"invalid plugin name {name!r}: use lower-case letters, digits and single '-' or '_' "
                            "between words, starting with a letter (e.g. wirehub-shout)")
    pkg = name.replace("-", "_")
    short = re.sub(r"^wirehub_", "", pkg) or pkg
    if pkg in _RESERVED or short in _RESERVED or keyword.iskeyword(pkg) or keyword.iskeyword(short):
        raise ScaffoldError(f"invalid plugin name {name!r}: {pkg!r} is reserved; choose another name")
    cls = "".join(part.capitalize() for part in short.split("_"))
    return {"name": name, "pkg": pkg, "short": short, "cls": cls}


def render(name: str) -> dict[str, str]:
    """The files of the package for ``name``, by path relative to its folder."""
    values = names(name)
    pkg = values["pkg"]
    return {path.replace("PKG", pkg): Template(text).substitute(values) for path, text in _FILES.items()}


def create(name: str, dest: Path) -> list[Path]:
    """Write the package for ``name`` into ``dest`` (created; it must not hold anything yet)."""
    files = render(name)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ScaffoldError(f"{dest} already exists and is not an empty folder: choose another name or --dir")
    written = []
    for rel, text in files.items():
        path = dest / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68", "wheel"]
build-backend = "setuptools.build_meta"

[project]
name = "$name"
version = "0.1.0"
description = "A wirehub plugin: the $short handler."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["wirehub"]

[project.optional-dependencies]
test = ["pytest>=8", "pytest-asyncio>=0.24"]

# wirehub finds installed plugins through this group; `wirehub plugins` lists it once installed
[project.entry-points.wirehub]
$short = "$pkg.plugin"

[tool.setuptools]
packages = ["$pkg"]

[tool.setuptools.package-data]
$pkg = ["py.typed"]

[tool.pytest.ini_options]
testpaths = ["tests"]
# the tests import the package from this folder, installed or not
pythonpath = ["."]
# wirehub.testing's fixtures and tests are async: pytest-asyncio runs them
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
filterwarnings = ["error"]

[tool.ruff]
line-length = 120

[tool.ruff.lint]
select = ["E", "F", "I", "UP"]
'''

_README = '''\
# $name

A wirehub plugin: the `$short` handler answers each text frame
with a `reply` frame.

```
pip install -e '.[test]'
python -m pytest          # a live wirehub server and a real WebSocket client (wirehub.testing)
```

Once installed, wirehub loads it through its entry point (`wirehub plugins` lists it). Use it in the
config:

```yaml
endpoints:
  - path: /ws/$short
    handler: $short
    options: {greeting: hello, max_length: 1000}
```

| option | type | default | meaning |
|---|---|---|---|
| `greeting` | string | `hello` | put before each reply |
| `max_length` | integer >= 1 | `1000` | longer frames get `error too_large` |

Client-visible errors: `bad_request` (a binary frame), `too_large`.
'''

_PLUGIN = '''\
"""The `$short` handler: answers each text frame with ``{"op": "reply", "text": "<greeting>, <text>"}``.

Options (the endpoint's ``options`` block): ``greeting`` (default "hello"), ``max_length`` (default 1000).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wirehub import ErrorCode, HandlerContext, HandlerFactory, Session, hookimpl, opt, parse_block


@dataclass(frozen=True)
class ${cls}Options:
    greeting: str = "hello"
    max_length: int = opt(1000, min=1)


class ${cls}Handler:
    """One instance serves every session of its endpoint; per-session data goes in ``session.state``."""

    def __init__(self, options: ${cls}Options, context: HandlerContext) -> None:
        self.options = options
        self.context = context

    async def on_open(self, session: Session) -> None:
        # session.send / send_error / send_frame queue a frame and return at once: never await them
        session.send({"op": "welcome", "user": session.identity.user})

    async def on_message(self, session: Session, data: str | bytes) -> None:
        if isinstance(data, bytes):
            session.send_error(ErrorCode.BAD_REQUEST, "send text frames")
        elif len(data) > self.options.max_length:
            session.send_error(ErrorCode.TOO_LARGE, f"at most {self.options.max_length} characters")
        else:
            session.send({"op": "reply", "text": f"{self.options.greeting}, {data}"})

    async def on_close(self, session: Session) -> None:
        return None


def make_handler(options: Mapping[str, Any], key: str, context: HandlerContext) -> ${cls}Handler:
    # parse_block raises ConfigError naming the dotted key, e.g. endpoints[0].options.max_length
    return ${cls}Handler(parse_block(${cls}Options, options, key), context)


@hookimpl
def wirehub_register_handlers() -> Mapping[str, HandlerFactory]:
    return {"$short": make_handler}
'''

_TESTS = '''\
"""Against a real wirehub server with this plugin loaded, and real WebSocket clients (wirehub.testing)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from wirehub import ConfigError
from wirehub.testing import LiveServer

ServerFactory = Callable[..., Awaitable[LiveServer]]


def config(**options: Any) -> dict[str, Any]:
    return {
        "plugins": {"load": ["$pkg.plugin"]},
        "endpoints": [{"path": "/ws/$short", "handler": "$short", "options": options}],
    }


async def test_replies_to_text(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config(greeting="hi"))
    client = await server.ws("/ws/$short")
    assert (await client.recv())["op"] == "welcome"
    await client.send("world")
    assert await client.recv() == {"op": "reply", "text": "hi, world"}


async def test_bad_frames_get_an_error_and_the_session_stays_open(wirehub_server: ServerFactory) -> None:
    server = await wirehub_server(config(max_length=5))
    client = await server.ws("/ws/$short")
    await client.recv_op("welcome")
    await client.send(b"binary")
    assert (await client.recv())["code"] == "bad_request"
    await client.send("too long")
    assert (await client.recv())["code"] == "too_large"
    await client.send("ok")
    assert await client.recv() == {"op": "reply", "text": "hello, ok"}


async def test_a_bad_option_names_its_key(wirehub_server: ServerFactory) -> None:
    with pytest.raises(ConfigError, match=r"endpoints\\[0\\]\\.options\\.max_length"):
        await wirehub_server(config(max_length=0))
'''

_FILES = {
    "pyproject.toml": _PYPROJECT,
    "README.md": _README,
    "PKG/__init__.py": '"""$name: a wirehub plugin (see plugin.py)."""\n',
    "PKG/py.typed": "",
    "PKG/plugin.py": _PLUGIN,
    "tests/test_plugin.py": _TESTS,
}
