"""Progress bars (node/progress.py): drawn on a terminal, absent from piped output."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from node.progress import DISABLE_ENV, progress_enabled, transfer_bar
from tests.test_cli import SMALL_RUN, fedpt

BAR = "━"  # rich's bar


def run_on_terminal(*args: str, timeout: float = 300.0) -> str:
    """`fedpt ARGS` with a pseudo-terminal as stdout and stderr; everything it wrote."""
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "160"}
    env.pop(DISABLE_ENV, None)
    proc = subprocess.Popen([sys.executable, "-m", "fedpt", *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave, stderr=slave, env=env, close_fds=True)  # fmt: skip
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not data:
                break
            out += data
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out.decode(errors="replace")


def test_train_draws_a_bar_on_a_terminal_and_plain_lines_when_piped(
    corpus_dir: Path, tmp_path: Path
) -> None:
    run = ["--data", corpus_dir, "--steps", "4", *SMALL_RUN]
    shown = run_on_terminal("train", "--out", tmp_path / "tty", *run)
    assert "training" in shown and BAR in shown and "4/4" in shown and "100%" in shown
    assert "tok/s" in shown and "\x1b[" in shown
    assert "step      4 | loss" in shown  # the log lines still print, above the bar

    piped = fedpt("train", "--out", tmp_path / "piped", *run).stdout
    steps = [line for line in piped.splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].split()[1] for line in steps if "| loss" in line] == list("1234")
    assert BAR not in piped and "\x1b[" not in piped and "4/4" not in piped


def test_progress_enabled_needs_a_terminal_and_no_opt_out(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv(DISABLE_ENV, raising=False)
    assert progress_enabled(Terminal()) and not progress_enabled(io.StringIO())
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert not progress_enabled(Terminal())
    monkeypatch.setenv(DISABLE_ENV, "0")
    assert progress_enabled(Terminal())


def test_transfer_bar_renders_bytes_and_a_rate() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with transfer_bar("round 3 push", 4_000_000, 1_000_000, console=console) as on_chunks:
        for chunks in range(5):
            on_chunks(chunks)
            time.sleep(0.05)
    shown = out.getvalue()
    assert "round 3 push" in shown and BAR in shown
    assert "4.0/4.0 MB" in shown  # bytes done of the total, from the chunk count
    assert "MB/s" in shown  # the transfer speed


def test_transfer_bar_without_a_terminal_is_silent(capsys) -> None:
    with transfer_bar("round 1 pull", 1000, 100) as on_chunks:  # pytest's stdout: no terminal
        on_chunks(5)
    assert capsys.readouterr().out == ""
