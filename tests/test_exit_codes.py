"""Every failure class ends the command the same way: one ``raysft.build: error:`` line that
names what failed and where (file, row, folder, address), and the exit code ``raysft.errors``
documents for its class. One case per class here, through ``raysft.build.main`` as a user runs it;
the rarer members of each class have their own tests (compressed inputs, job files and tokenizer
files in test_red_team.py; storage faults wrapped by Ray in test_errors.py; a frozen S3 endpoint,
a stall, in test_s3.py; SIGTERM on both engines, exit 130, in test_red_team.py; a lost head in
test_errors.py)."""

from __future__ import annotations

import gzip
import json
import signal
import subprocess
import sys

import pytest
from helpers import free_port

from raysft import build as build_cli
from raysft import errors


@pytest.fixture
def cli(capsys):
    """``raysft.build.main(argv)`` -> (exit code, its error lines, all of stderr); SIGTERM's
    handler (the command installs its own) put back after."""
    saved = signal.getsignal(signal.SIGTERM)

    def run(argv: list[str], fresh: bool = False):
        if fresh:  # a process of its own: this one may hold a Ray instance already (init_ray keeps it)
            p = subprocess.run([sys.executable, "-m", "raysft.build", *map(str, argv)], capture_output=True,
                               text=True, timeout=300)
            return p.returncode, [x for x in p.stderr.splitlines() if ": error: " in x], p.stderr
        try:
            code = build_cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own refusals end the command there
            code = e.code
        err = capsys.readouterr().err
        return code, [x for x in err.splitlines() if ": error: " in x], err

    yield run
    signal.signal(signal.SIGTERM, saved)


def _rows(shared_data, n: int = 6) -> list[dict]:
    return json.loads((shared_data / "alpaca_en_demo.json").read_text())[:n]


def _case(name: str, tmp_path, shared_data, llama3_dir, monkeypatch) -> tuple[list, int, list[str]]:
    """(argv, the exit code, what the error line must name) of one failure class."""
    good = tmp_path / "in.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _rows(shared_data)))
    out = tmp_path / "out"
    base = ["--tokenizer", llama3_dir, "--template", "llama3", "--engine", "local", "--output", out]
    if name == "bad record":
        bad = tmp_path / "bad.jsonl"
        lines = good.read_text().splitlines()
        lines[2] = '{"instruction": "cut", "output": '
        bad.write_text("\n".join(lines) + "\n")
        return ["--input", bad, "--on-bad-record", "fail", *base], errors.BAD_INPUT, [str(bad), "line 3"]
    if name == "bad input file":
        cut = tmp_path / "cut.jsonl.gz"
        cut.write_bytes(gzip.compress(good.read_bytes() * 50)[:-40])
        return ["--input", cut, *base], errors.BAD_INPUT, [str(cut)]
    if name == "missing input":
        return ["--input", tmp_path / "nothing-here.jsonl", *base], errors.BAD_INPUT, ["nothing-here.jsonl"]
    if name == "tokenizer":
        return ["--input", good, *base, "--tokenizer", tmp_path / "no-tokenizer"], errors.BAD_INPUT, ["no-tokenizer"]
    if name == "usage: unknown template":
        return ["--input", good, *base, "--template", "nosuch"], errors.USAGE, ["--template", "nosuch"]
    if name == "usage: bad value":
        return ["--input", good, *base, "--seq-length", "lots"], errors.USAGE, ["--seq-length", "lots"]
    if name == "output: a folder raysft did not write":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        return ["--input", good, *base], errors.STORAGE, [str(out), "holds no raysft dataset"]
    if name == "output: a file":
        out.write_text("not a folder")
        return ["--input", good, *base], errors.STORAGE, [str(out)]
    if name == "cluster: nothing at --ray-address":
        port = free_port()
        argv = ["--input", good, *base, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]
        return argv, errors.CLUSTER, [f"127.0.0.1:{port}", "nothing answers"]
    if name == "internal":
        def bug(*a, **k):
            raise ZeroDivisionError("division by zero")

        monkeypatch.setattr("raysft.engine.plan.plan_bfd", bug)
        return ["--input", good, *base], errors.INTERNAL, ["internal error (ZeroDivisionError)", "--debug"]
    raise AssertionError(name)


CLASSES = ["bad record", "bad input file", "missing input", "tokenizer", "usage: unknown template",
           "usage: bad value", "output: a folder raysft did not write", "output: a file",
           "cluster: nothing at --ray-address", "internal"]


@pytest.mark.parametrize("name", CLASSES)
def test_each_failure_class_is_one_line_naming_where_with_its_exit_code(name, cli, tmp_path, shared_data,
                                                                        llama3_dir, monkeypatch):
    argv, code, names = _case(name, tmp_path, shared_data, llama3_dir, monkeypatch)
    got, lines, err = cli(argv, fresh=name.startswith("cluster"))
    assert got == code, err[-2000:]
    assert len(lines) == 1, err[-2000:]
    for what in names:
        assert what in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "_SUCCESS").exists()
