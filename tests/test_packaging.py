"""The wheel: one import package, `wirehub`, with the built-ins, static files and entry points inside it."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # Built from a clean copy: setuptools packs everything in build/lib, so a checkout's build/ left from an
    # earlier layout (a module since turned into a package) would put stale modules into the wheel.
    src = tmp_path_factory.mktemp("src") / "wirehub"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "node_modules", "__pycache__", ".*_cache", ".benchmarks"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(src)], check=True, capture_output=True, timeout=300)
    (path,) = out.glob("wirehub-*.whl")
    return zipfile.ZipFile(path)


def test_the_wheel_adds_one_top_level_name(wheel: zipfile.ZipFile) -> None:
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"wirehub"}, top
    assert not any(name.startswith(("service/", "plugins/")) for name in wheel.namelist())


def test_every_folder_of_service_and_plugins_is_in_the_wheel(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for folder, package in ((ROOT / "service", "wirehub"), (ROOT / "plugins", "wirehub/builtins")):
        for module in folder.rglob("*.py"):
            rel = module.relative_to(folder)
            if rel.parts[0] == "builtins":  # the link to plugins/, checked as wirehub/builtins
                continue
            assert f"{package}/{rel.as_posix()}" in names, f"{module} is not in the wheel"
    # the static files, with the JS client package's sources and types, but not its tests or node_modules
    dev_only = ("wirehub-client/test/", "wirehub-client/node_modules/")
    for static in (ROOT / "service" / "static").rglob("*"):
        rel = static.relative_to(ROOT / "service" / "static").as_posix()
        if static.is_file() and not rel.startswith(dev_only):
            assert f"wirehub/static/{rel}" in names, rel
    assert "wirehub/static/wirehub-client/types/index.d.ts" in names
    assert not any(name.startswith(tuple(f"wirehub/static/{d}" for d in dev_only)) for name in names)
    assert "wirehub/py.typed" in names and "wirehub/builtins/py.typed" in names


def test_the_wheel_holds_no_module_without_a_source_file(wheel: zipfile.ZipFile) -> None:
    """No stale module (a file since moved into a package) shadows or doubles a current one."""
    sources = {f"{package}/{m.relative_to(folder).as_posix()}"
               for folder, package in ((ROOT / "service", "wirehub"), (ROOT / "plugins", "wirehub/builtins"))
               for m in folder.rglob("*.py")}
    extra = sorted(n for n in wheel.namelist() if n.endswith(".py") and n not in sources)
    assert not extra, extra


def test_entry_points_name_the_package(wheel: zipfile.ZipFile) -> None:
    (ep_name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(ep_name).decode())
    assert parser["console_scripts"]["wirehub"] == "wirehub.cli:main"
    assert parser["pytest11"]["wirehub"] == "wirehub.testing"


def test_import_wirehub_is_the_public_surface() -> None:
    import wirehub

    for name in wirehub.__all__:
        assert hasattr(wirehub, name), name
    # what a plugin author needs, from one import
    for name in ("hookimpl", "Session", "OutFrame", "Handler", "Bus", "History", "Presence", "StateStore",
                 "Authenticator", "Identity", "ErrorCode", "CloseCode", "ProtocolError", "ConfigError", "opt",
                 "parse_block"):
        assert name in wirehub.__all__, name


def test_built_ins_and_examples_use_only_the_public_surface() -> None:
    """`from wirehub.<internal module> import ...` stays inside the core; plugins import `wirehub`."""
    offenders = []
    for base in ("plugins", "examples"):
        for path in (ROOT / base).rglob("*.py"):
            if "build" in path.parts:
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                stripped = line.strip()
                if stripped.startswith("from wirehub.") and not stripped.startswith(
                        ("from wirehub.builtins", "from wirehub.testing")):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {stripped}")
    assert not offenders, "\n".join(offenders)
