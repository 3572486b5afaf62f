"""``wirehub plugin new``: the package it writes passes its own tests as generated; bad input exits 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wirehub.cli import main


def run_cli(*argv: str) -> int:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    return int(exc.value.code or 0)


def test_a_new_plugin_package_passes_its_own_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli("plugin", "new", "wirehub-shout") == 0
    here = tmp_path / "wirehub-shout"
    assert "created wirehub-shout/wirehub_shout/plugin.py" in capsys.readouterr().out
    assert sorted(p.relative_to(here).as_posix() for p in here.rglob("*") if p.is_file()) == [
        "README.md", "pyproject.toml", "tests/test_plugin.py",
        "wirehub_shout/__init__.py", "wirehub_shout/plugin.py", "wirehub_shout/py.typed",
    ]
    pyproject = (here / "pyproject.toml").read_text()
    assert '[project.entry-points.wirehub]\nshout = "wirehub_shout.plugin"' in pyproject
    assert 'asyncio_mode = "auto"' in pyproject
    # the public surface only: no internal module of wirehub
    for source in (here / "wirehub_shout" / "plugin.py", here / "tests" / "test_plugin.py"):
        imports = [line for line in source.read_text().splitlines() if "wirehub" in line and "import" in line]
        assert imports and all(line.startswith(("from wirehub import", "from wirehub.testing import"))
                               for line in imports), imports

    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=here,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout, result.stdout
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "."],
                          cwd=here, capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dir_option_and_an_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    assert run_cli("plugin", "new", "tally", "--dir", str(target)) == 0
    plugin = (target / "tally" / "plugin.py").read_text()
    assert 'return {"tally": make_handler}' in plugin and "class TallyHandler" in plugin


@pytest.mark.parametrize("name", ["Shout", "my.plugin", "1up", "two--dashes", "wirehub", "class", "tests", ""])
def test_an_invalid_name_exits_2_and_writes_nothing(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert run_cli("plugin", "new", name) == 2
    assert capsys.readouterr().err.startswith(f"wirehub: invalid plugin name {name!r}")
    assert list(tmp_path.iterdir()) == []


def test_a_non_empty_folder_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shout").mkdir()
    (tmp_path / "shout" / "notes.txt").write_text("mine")
    assert run_cli("plugin", "new", "shout") == 2
    assert capsys.readouterr().err == ("wirehub: shout already exists and is not an empty folder: "
                                       "choose another name or --dir\n")
    assert [p.name for p in (tmp_path / "shout").iterdir()] == ["notes.txt"]


def test_a_file_in_the_way_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shout").write_text("a file")
    assert run_cli("plugin", "new", "shout") == 2
    assert "shout already exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "shout").read_text() == "a file"
