"""The `fedpt` command, run as real processes: multi-rank equivalence, resume, errors."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.io import load_tensors

SMALL_RUN = ["--preset", "tiny", "--seq-len", "64", "--micro-batch-size", "4", "--log-every", "1",
             "--warmup-steps", "2", "--eval-batches", "4"]  # fmt: skip


def fedpt(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "fedpt", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"fedpt {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def step_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["event"] == "train"]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    wa, _ = load_tensors(a / "model.safetensors")
    wb, _ = load_tensors(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=0, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_rank_with_doubled_accumulation(
    corpus_dir: Path, tmp_path: Path, mode: str
) -> None:
    two = tmp_path / "two"
    one = tmp_path / "one"
    fedpt("train", "--data", corpus_dir, "--out", two, "--steps", "6", "--nproc-per-node", "2",
          "--parallel", mode, *SMALL_RUN)  # fmt: skip
    fedpt(
        "train", "--data", corpus_dir, "--out", one, "--steps", "6", "--grad-accum", "2", *SMALL_RUN
    )
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    losses_two, losses_one = step_losses(two), step_losses(one)
    assert len(losses_two) == len(losses_one) == 6
    assert losses_two == pytest.approx(losses_one, abs=1e-5)
    assert_same_weights(two, one, atol=1e-5)


RANKS = {"1-rank": [], "fsdp-2-ranks": ["--nproc-per-node", "2", "--parallel", "fsdp"]}


@pytest.mark.slow
@pytest.mark.parametrize("ranks", RANKS.values(), ids=RANKS.keys())
def test_resume_from_a_checkpoint_in_a_new_process_is_exact(
    corpus_dir: Path, tmp_path: Path, ranks: list[str]
) -> None:
    run = ["--data", corpus_dir, "--steps", "8", "--checkpoint-every", "4", *ranks, *SMALL_RUN]
    full = tmp_path / "full"
    fedpt("train", "--out", full, *run)
    # A run that stopped right after its step-4 checkpoint.
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000004", cut / "checkpoints" / "step_00000004")
    (cut / "checkpoints" / "latest").write_text("step_00000004\n")
    proc = fedpt("train", "--out", cut, "--resume", *run)
    assert "resumed from" in proc.stdout
    assert step_losses(cut) == step_losses(full)[4:]
    assert_same_weights(cut, full, atol=0)


def test_train_eval_generate_with_a_bpe_tokenizer(corpus_dir: Path, tmp_path: Path) -> None:
    tok = tmp_path / "tok.json"
    out = fedpt(
        "tokenizer", "train", "--data", corpus_dir, "--vocab-size", "300", "--out", tok
    ).stdout
    assert "sha256" in out
    run = tmp_path / "run"
    fedpt(
        "train", "--data", corpus_dir, "--out", run, "--steps", "3", "--tokenizer", tok, *SMALL_RUN
    )
    assert (run / "tokenizer.json").read_bytes() == tok.read_bytes()
    ev = fedpt("eval", "--checkpoint", run, "--data", corpus_dir, "--seq-len", "64").stdout
    assert "perplexity" in ev
    gen = fedpt(
        "generate", "--checkpoint", run, "--prompt", "the model", "--max-new-tokens", "5"
    ).stdout
    assert gen.startswith("the model")


def test_data_prepare_and_orgs(corpus_dir: Path, tmp_path: Path) -> None:
    out = fedpt("data", "prepare", "--data", corpus_dir, "--out", tmp_path / "shards").stdout
    assert "train:" in out and "val:" in out
    assert (tmp_path / "shards" / "train" / "manifest.json").is_file()
    orgs = fedpt("data", "orgs").stdout
    for org in ("web", "systems", "apps", "core", "docs"):
        assert f"builtin:{org}" in orgs


BAD_COMMANDS = [
    (["train", "--out", "X"], "required"),
    (["train", "--data", "/no/such/folder", "--out", "OUT", "--steps", "1"], "/no/such/folder"),
    (["train", "--data", "CORPUS", "--out", "OUT", "--preset", "huge"], "unknown preset"),
    (["train", "--data", "CORPUS", "--out", "OUT", "--steps", "0"], "steps must be positive"),
    (["train", "--data", "CORPUS", "--out", "OUT", "--steps", "x"], "invalid int"),
    (
        ["train", "--data", "CORPUS", "--out", "OUT", "--config", "BADCONFIG"],
        "unknown train config keys: bogus",
    ),
    (["train", "--data", "builtin:nowhere", "--out", "OUT"], "nowhere"),
    (["eval", "--checkpoint", "/no/such/run", "--data", "CORPUS"], "no model at /no/such/run"),
    (["export", "--checkpoint", "GARBAGE", "--out", "OUT"], "cannot read weights"),
    (["import", "--from", "CORPUS", "--out", "OUT"], "config.json is unreadable"),
    (["generate", "--checkpoint", "GARBAGE", "--prompt", "hi"], "cannot read weights"),
    (["frobnicate"], "invalid choice"),
    (["simulate", "--out", "OUT", "--outer-momentum", "1.5"], "--outer-momentum must be in [0, 1)"),
    (["simulate", "--out", "OUT", "--outer-lr", "-2"], "--outer-lr must be positive"),
    (["simulate", "--out", "OUT", "--personalise-steps", "-1"], "--personalise-steps must not be negative"),
    (["simulate", "--out", "OUT", "--proximal-mu", "nan"], "proximal_mu must be a finite number"),
    (["simulate", "--out", "OUT", "--proximal-mu", "-1"], "proximal_mu must not be negative"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--personalise-lr", "0"], "personalise_lr must be positive"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--lora-rank", "0"], "lora_rank must be at least 1"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--once", "--expect-model", "3:beef"],
     "--expect-model '3:beef': expected VERSION:SHA256"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--expect-model", "3:" + "ab" * 32],
     "--expect-round and --expect-model go with --once"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--once", "--expect-round", "2"],
     "--expect-round needs --expect-model VERSION:SHA256"),
    (["node", "join", "--insecure", "--data", "CORPUS", "--once", "--secagg-by-scheduler",
      "--expect-model", "3:" + "ab" * 32],
     "--secagg-by-scheduler needs --expect-round ROUND"),
    # One rule for organisation names, the one `fedpt ca issue` certifies:
    (["node", "join", "--insecure", "--data", "CORPUS", "--organisation", "acme corp"],
     "--organisation: organisation 'acme corp' is not valid: use 1-64 characters of A-Z a-z 0-9 . _ -"),
    (["ca", "issue", "--ca", "OUT", "--org", "acme corp"],
     "organisation 'acme corp' is not valid: use 1-64 characters of A-Z a-z 0-9 . _ -"),
    (["node", "personalise", "--work-dir", "OUT", "--data", "CORPUS"], "holds no round state"),
    (["node", "personalise", "--work-dir", "OUT", "--data", "CORPUS", "--steps", "0"], "--steps must be at least 1"),
    (["node", "personalise", "--work-dir", "OUT", "--data", "CORPUS", "--mode", "prefix"], "invalid choice"),
]  # fmt: skip


@pytest.mark.parametrize("argv,message", BAD_COMMANDS)
def test_bad_input_is_one_clear_line(
    corpus_dir: Path, tmp_path: Path, argv: list[str], message: str
) -> None:
    (tmp_path / "bad.toml").write_text("[train]\nbogus = 1\n")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    subst = {"CORPUS": str(corpus_dir), "OUT": str(tmp_path / "out"), "BADCONFIG": str(tmp_path / "bad.toml"),
             "GARBAGE": str(tmp_path / "garbage.safetensors")}  # fmt: skip
    proc = fedpt(*[subst.get(a, a) for a in argv], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error:"), proc.stderr
    assert message in lines[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_an_existing_run_is_not_overwritten(corpus_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fedpt("train", "--data", corpus_dir, "--out", run, "--steps", "2", *SMALL_RUN)
    before = (run / "model.safetensors").read_bytes()
    proc = fedpt(
        "train", "--data", corpus_dir, "--out", run, "--steps", "2", *SMALL_RUN, check=False
    )
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (run / "model.safetensors").read_bytes() == before


def test_resume_of_a_finished_run_trains_nothing_and_exits_0(
    corpus_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    fedpt("train", "--data", corpus_dir, "--out", run, "--steps", "2", *SMALL_RUN)
    before = (run / "model.safetensors").read_bytes()
    fedpt("train", "--data", corpus_dir, "--out", run, "--steps", "2", "--resume", *SMALL_RUN)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_per_second"] is None  # no step this time
    assert (run / "model.safetensors").read_bytes() == before


def test_a_bad_crash_point_is_one_line_and_without_the_testing_switch_it_is_inert(
    tmp_path: Path,
) -> None:
    bad = {"FEDPT_CRASH_AT": "node.pul@2", "FEDPT_TESTING": "1"}
    proc = fedpt("data", "orgs", env=bad, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error: FEDPT_CRASH_AT='node.pul@2'")
    proc = fedpt("data", "orgs", env={**bad, "FEDPT_CRASH_AT": "node.pull@x"}, check=False)
    assert proc.returncode == 2 and "must be an integer" in proc.stderr
    # Outside tests (no switch) the variable is never read: not even a valid one arms a kill.
    env = {**os.environ, "FEDPT_CRASH_AT": "aggregator.open"}
    env.pop("FEDPT_TESTING", None)
    probe = "from protos import crash_points as c; c.check(); print(c.armed('aggregator.open'))"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    env["FEDPT_TESTING"] = "1"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_an_organisation_that_disagrees_with_the_kit_is_refused(
    corpus_dir: Path, tmp_path: Path
) -> None:
    from protos import pki

    pki.init_ca(tmp_path / "ca")
    kit = pki.issue_kit(tmp_path / "ca", "alpha", tmp_path / "alpha")
    proc = fedpt("node", "join", "--kit", kit, "--organisation", "beta", "--aggregator",
                 "127.0.0.1:1", "--data", corpus_dir, "--work-dir", tmp_path / "w",
                 check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--organisation 'beta' disagrees with the kit" in lines[0]
    assert "issued to 'alpha'" in lines[0]
    assert "joined" not in proc.stdout


def test_an_aggregator_that_never_answers_is_one_line_after_the_reconnect_timeout(
    corpus_dir: Path, tmp_path: Path
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = fedpt("node", "join", "--insecure", "--aggregator", f"127.0.0.1:{port}", "--data",
                 corpus_dir, "--work-dir", tmp_path / "w", "--reconnect-timeout-seconds", "1",
                 check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"fedpt: error: join: the aggregator at 127.0.0.1:{port} was "
                               "unreachable for 1 s (UNAVAILABLE")  # fmt: skip


def test_every_flag_of_every_command_has_a_help_line() -> None:
    from fedpt.cli import build_parser

    def walk(parser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest != "help":
                yield f"{path} {action.option_strings[0]}", action.help

    flags = list(walk(build_parser(), "fedpt"))
    assert len(flags) > 100  # every command's flags were walked
    missing = [flag for flag, text in flags if not text or not text.strip()]
    assert missing == []
