"""Continual pretraining: `fedpt train --init-from` starts a new run from an existing model's
weights, with a fresh optimizer and the learning-rate schedule from step 0 (the re-warm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.config import preset
from model.gpt import GPT
from model.io import load_tensors, save_model
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig
from node.local_training import load_initial_weights, run_training
from node.schedule import lr_at
from node.trainer import Trainer
from tests.test_cli import SMALL_RUN, fedpt

QUIET = {"log": lambda _msg: None}
TRAIN = {"steps": 4, "micro_batch_size": 4, "seq_len": 64, "warmup_steps": 2, "eval_batches": 2,
         "log_every": 1}  # fmt: skip


def test_a_run_starts_from_the_old_runs_final_weights_with_a_rewarm(
    corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = tmp_path / "old"
    run_training(data=str(corpus_dir), model_config=preset("tiny"),
                 train_config=TrainConfig(**TRAIN), out_dir=old, **QUIET)  # fmt: skip
    final, _ = load_tensors(old / "model.safetensors")
    old_lrs = [r["lr"] for r in map(json.loads, (old / "metrics.jsonl").read_text().splitlines())
               if r["event"] == "train"]  # fmt: skip
    assert old_lrs[-1] < 0.6 * TrainConfig(**TRAIN).lr  # the old run was decaying

    seen: dict = {}
    real_train_step = Trainer.train_step

    def first_step_is_watched(self: Trainer):
        if not seen:  # what the first optimizer step starts from
            seen["weights"] = {n: t.clone() for n, t in self.full_weights().items()}
            seen["step"], seen["lr"] = self.step, lr_at(self.step, self.cfg)
            seen["optimizer_state"] = len(self.optimizer.state)
        return real_train_step(self)

    monkeypatch.setattr(Trainer, "train_step", first_step_is_watched)
    new = tmp_path / "new"
    cfg = TrainConfig(**{**TRAIN, "seed": 7})  # another seed: other random initial weights
    run_training(data=str(corpus_dir), model_config=None, train_config=cfg, out_dir=new,
                 init_from=old, **QUIET)  # fmt: skip

    assert seen["weights"].keys() - {"output.weight"} == final.keys()
    for name, tensor in final.items():
        assert torch.equal(seen["weights"][name], tensor), name
    assert seen["step"] == 0 and seen["lr"] == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert seen["optimizer_state"] == 0  # AdamW starts without moments
    info = json.loads((new / "run.json").read_text())
    assert info["init_from"] == str((old / "model.safetensors").resolve())
    assert info["model_config"] == json.loads((old / "run.json").read_text())["model_config"]


def test_a_weights_file_a_checkpoint_folder_and_a_run_folder_all_name_the_model(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = GPT(preset("tiny").with_vocab(ByteTokenizer.vocab_size))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000003"
    checkpoint.mkdir(parents=True)
    save_model(model, checkpoint / "model.safetensors", tokenizer_spec=ByteTokenizer().spec())
    (checkpoint.parent / "latest").write_text("step_00000003\n")
    (checkpoint / "trainer_state.json").write_text("{}")
    for path in (checkpoint / "model.safetensors", checkpoint, tmp_path / "run"):
        init = load_initial_weights(path)
        assert init.weights == checkpoint / "model.safetensors"
        assert init.config == model.config and init.tokenizer_spec["kind"] == "byte"
        assert init.state().keys() == load_tensors(init.weights)[0].keys()


def test_fedpt_train_init_from_logs_the_rewarm_and_learns_on(
    corpus_dir: Path, tmp_path: Path
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    fedpt("train", "--data", corpus_dir, "--out", old, "--steps", "4", *SMALL_RUN)
    proc = fedpt("train", "--data", corpus_dir, "--out", new, "--steps", "4", "--init-from", old,
                 *SMALL_RUN)  # fmt: skip
    assert "initial weights from" in proc.stdout
    steps = [r for r in map(json.loads, (new / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "train"]  # fmt: skip
    assert steps[0]["step"] == 1 and steps[0]["lr"] == pytest.approx(3e-3 / 2)  # warmup 2
    old_losses = [r["loss"] for r in map(json.loads, (old / "metrics.jsonl").read_text().splitlines())
                  if r["event"] == "train"]  # fmt: skip
    # Random weights start near ln(vocab) = 5.8; the old run's weights where that run ended.
    assert steps[0]["loss"] < old_losses[0] - 0.2


@pytest.fixture
def byte_model(tmp_path: Path) -> Path:
    """A `tiny` model's weights file, as `fedpt train` with the byte tokenizer leaves it."""
    path = tmp_path / "base" / "model.safetensors"
    path.parent.mkdir()
    model = GPT(preset("tiny").with_vocab(ByteTokenizer.vocab_size))
    save_model(model, path, tokenizer_spec=ByteTokenizer().spec())
    return path


def refused(*args: object) -> str:
    proc = fedpt("train", *map(str, args), "--steps", "1", *SMALL_RUN[2:], check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedpt: error:"), proc.stderr
    return lines[0]


def test_a_shape_that_disagrees_with_the_init_model_is_refused(
    corpus_dir: Path, tmp_path: Path, byte_model: Path
) -> None:
    out = tmp_path / "out"
    line = refused("--data", corpus_dir, "--out", out, "--init-from", byte_model,
                   "--preset", "small")  # fmt: skip
    assert "--init-from" in line and "dim=384 (--preset small)" in line and "dim=128" in line
    config = tmp_path / "shape.toml"
    config.write_text("[model]\nn_layers = 2\n")
    line = refused("--data", corpus_dir, "--out", out, "--init-from", byte_model,
                   "--config", config)  # fmt: skip
    assert "n_layers=2 ([model] n_layers)" in line and "n_layers=5" in line
    assert not out.exists()


def test_another_tokenizer_than_the_init_models_is_refused(
    corpus_dir: Path, tmp_path: Path, byte_model: Path
) -> None:
    tok = tmp_path / "tok.json"
    fedpt("tokenizer", "train", "--data", corpus_dir, "--vocab-size", "300", "--out", tok)
    out = tmp_path / "out"
    line = refused("--data", corpus_dir, "--out", out, "--init-from", byte_model,
                   "--tokenizer", tok)  # fmt: skip
    assert "byte tokenizer" in line and "leave out --tokenizer" in line
    # A model trained with that BPE refuses a BPE with another sha256.
    bpe_model = tmp_path / "bpe" / "model.safetensors"
    bpe_model.parent.mkdir()
    spec = {"kind": "bpe", "sha256": "0" * 64, "vocab_size": 300}
    save_model(GPT(preset("tiny").with_vocab(300)), bpe_model, tokenizer_spec=spec)
    line = refused("--data", corpus_dir, "--out", out, "--init-from", bpe_model,
                   "--tokenizer", tok)  # fmt: skip
    assert "needs its own tokenizer" in line and "expected 000000000000" in line
    line = refused("--data", corpus_dir, "--out", out, "--init-from", bpe_model)
    assert "pass --tokenizer" in line
    assert not out.exists()


def test_init_from_and_resume_are_mutually_exclusive(
    corpus_dir: Path, tmp_path: Path, byte_model: Path
) -> None:
    out = tmp_path / "out"
    line = refused("--data", corpus_dir, "--out", out, "--init-from", byte_model, "--resume")
    assert "--init-from and --resume are mutually exclusive" in line
    assert not out.exists()
