"""A newcomer's mistakes at the command line (issue 22 item 4): each ends in one stderr line that
names it and the fix, exit 2, before any model is loaded (``check_bundle`` and the app are made
to fail here, so a check that ran after loading would show), and nothing else breaks.

Mutations caught: dropping the preflight call in service/server/cli.py (the key file, level,
variable and port cases), probing the port after check_bundle (test_a_busy_port_*), the screen's
url or bundle check removed, ``hopgate-export``'s command listing or per-command options removed."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hopgate.service import app
from hopgate.service.config import Settings
from hopgate.service.screening import main as screen
from hopgate.service.server import cli as serve_cli
from hopgate.service.server.preflight import NOT_SETTINGS, unknown_variable

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def nothing_loads(monkeypatch):
    """check_bundle (the first thing that opens the bundle) and the app must not be reached."""
    def loaded(*_a, **_k):
        raise AssertionError("the model was loaded before the mistake was reported")

    monkeypatch.setattr(serve_cli, "check_bundle", loaded)
    monkeypatch.setattr(app, "create_app", loaded)


def one_line(capsys, code: int, *expected: str) -> str:
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


def test_an_unreadable_api_key_file_refuses_to_start(monkeypatch, capsys, tmp_path, nothing_loads):
    monkeypatch.setenv("HOPGATE_API_KEY_FILE", "/nonexistent")
    one_line(capsys, serve_cli.main(["--port", "0"]), "HOPGATE_API_KEY_FILE='/nonexistent'",
             "cannot read the API key file", "No such file")
    empty = tmp_path / "key"
    empty.write_text("\n")  # an empty key would serve without a key: refused too
    monkeypatch.setenv("HOPGATE_API_KEY_FILE", str(empty))
    one_line(capsys, serve_cli.main(["--port", "0"]), "the API key file is empty")


def test_a_bad_log_level_is_one_line(capsys, nothing_loads):
    one_line(capsys, serve_cli.main(["--log-level", "nonsense"]), "--log-level 'nonsense'",
             "debug")


def test_a_misspelt_setting_names_the_closest_one(monkeypatch, capsys, nothing_loads):
    monkeypatch.setenv("HOPGATE_MAX_BATCH", "8")
    one_line(capsys, serve_cli.main([]),
             "HOPGATE_MAX_BATCH is not a setting; did you mean HOPGATE_MAX_IMAGES?")
    monkeypatch.delenv("HOPGATE_MAX_BATCH")
    monkeypatch.setenv("HOPGATE_ZZZ", "1")  # nothing close: where the settings are
    one_line(capsys, serve_cli.main([]), "HOPGATE_ZZZ is not a setting", "docs/serving.md")


def test_variables_that_others_set_are_not_refused():
    """Every HOPGATE_ name the chart, the images, the scripts and the tests set passes, and so do
    the ones Kubernetes injects for a Service named hopgate (service links)."""
    fields = Settings.model_fields
    names = set()
    for folder in ("helm", "docker", "scripts", "tests", "benchmarks"):
        for f in (ROOT / folder).rglob("*"):
            if f.is_file() and f != Path(__file__) and f.suffix not in (".pyc", ".onnx"):
                text = f.read_text(errors="ignore")
                names |= set(re.findall(r"HOPGATE_[A-Z0-9_]*[A-Z0-9]", text))
    assert "HOPGATE_MODEL" in names and NOT_SETTINGS & names
    assert [n for n in sorted(names) if unknown_variable({n: "1"}, fields)] == []
    k8s = {"HOPGATE_SERVICE_HOST": "10.0.0.1", "HOPGATE_SERVICE_PORT_HTTP": "8000",
           "HOPGATE_PORT_8000_TCP_ADDR": "10.0.0.1", "HOPGATE_ADMIN_PORT": "9901",
           "HOPGATE_METRICS_PORT": "tcp://10.0.0.2:9090"}
    assert unknown_variable(k8s, fields) is None


def test_a_busy_port_is_found_before_the_model_loads(capsys, nothing_loads):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        one_line(capsys, serve_cli.main(["--port", str(port)]),
                 f"cannot listen on 127.0.0.1 port {port} (Address already in use)",
                 "--port, HOPGATE_PORT")


def test_the_console_script_refuses_in_one_line(tmp_path):
    """The real command: the same line, exit 2, in well under the time a model takes to load."""
    run = subprocess.run([sys.executable, "-m", "hopgate.service.server.cli", "--port", "0"],
                         capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "HOPGATE_API_KEY_FILE": "/nonexistent"})
    assert run.returncode == 2 and run.stdout == "", (run.stdout, run.stderr)
    assert run.stderr.strip().splitlines() == [
        "hopgate-serve: HOPGATE_API_KEY_FILE='/nonexistent': cannot read the API key file "
        "(No such file or directory)"]


@pytest.mark.parametrize(("args", "expected"), [
    (["--bundle", "missing.onnx"], "missing.onnx: no such bundle file"),
    (["--bundle", "{notonnx}"], "not a readable ONNX file"),
    (["--url", "127.0.0.1:8000"], "has no scheme: write http://127.0.0.1:8000"),
    (["--url", "http://127.0.0.1:8000/score"], "not a bare origin"),
    (["--url", "ftp://127.0.0.1"], "http:// or https://"),
])
def test_screen_names_a_wrong_bundle_or_address(capsys, tmp_path, args, expected):
    (tmp_path / "not.onnx").write_text("hello")
    args = [a.format(notonnx=tmp_path / "not.onnx") for a in args]
    out = tmp_path / "out.csv"
    one_line(capsys, screen([str(tmp_path), "-o", str(out), *args]), expected)
    assert not out.exists()  # refused before anything was written


def test_export_help_lists_every_command_and_each_its_options():
    from hopgate.model_export.cli import COMMANDS

    def helped(*args: str) -> str:
        run = subprocess.run([sys.executable, "-m", "hopgate.model_export.cli", *args, "--help"],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        return run.stdout

    top = helped()
    assert "``" not in top
    assert set(COMMANDS) >= {"train", "fit", "calibrate", "export", "build", "evaluate",
                             "attach"}
    for name, line in COMMANDS.items():
        assert f"  {name:<11}{line}\n" in top, name  # one line each
    build = helped("build")
    assert "usage: hopgate-export build" in build
    assert "--no-card" in build and "--report" not in build
    assert "--model MODEL" in helped("attach")  # attach's own arguments
    assert "--bootstrap" in helped("evaluate")
