"""Inner trainer: learning, exact resume, schedule, activation checkpointing, eval."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig, TrainConfigError
from node.checkpoint import STATE_FILE
from node.schedule import lr_at
from node.shards import TokenShards, pack_shards
from node.trainer import Trainer, TrainingError, add_proximal_gradient_

MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=160, max_seq_len=64)
QUIET = {"log": lambda _msg: None}


def make_trainer(shards: TokenShards, tmp_path: Path | None = None, **train) -> Trainer:
    cfg = TrainConfig(
        **{"steps": 20, "micro_batch_size": 4, "seq_len": 32, "warmup_steps": 2, **train}
    )
    return Trainer(
        MODEL, cfg, shards, tokenizer_spec=ByteTokenizer().spec(), out_dir=tmp_path, **QUIET
    )


def test_tiny_model_overfits_one_batch(tmp_path: Path) -> None:
    # Exactly one micro-batch of windows: every step sees the same 4 sequences.
    text = "fedpt trains language models across organisations without moving data. " * 8
    pack_shards([text[: 4 * 32 + 10]], ByteTokenizer(), tmp_path / "one", val_fraction=0.0)
    one_batch = TokenShards(tmp_path / "one" / "train")
    assert one_batch.num_windows(32) == 4
    trainer = make_trainer(one_batch, steps=150, lr=1e-2, min_lr_ratio=1.0, log_every=50)
    losses = trainer.train(150)
    assert losses[-1] < 0.1 * losses[0], f"loss {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_resume_reproduces_the_uninterrupted_loss_sequence_exactly(shards, tmp_path: Path) -> None:
    train, _ = shards
    settings = {"steps": 12, "grad_accum": 2, "log_every": 1}
    uninterrupted = make_trainer(train, tmp_path / "a", **settings)
    expected = uninterrupted.train(12)

    first = make_trainer(train, tmp_path / "b", **settings)
    head = first.train(5)
    checkpoint = first.save_checkpoint()
    first.close()
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    second = make_trainer(train, tmp_path / "b", **settings)
    second.load_checkpoint(checkpoint)
    assert second.step == 5
    tail = second.train(7)

    assert head + tail == expected  # bit-for-bit, not approximately
    for (name, a), b in zip(
        uninterrupted.model.state_dict().items(), second.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resume_refuses_a_changed_schedule(shards, tmp_path: Path) -> None:
    train, _ = shards
    trainer = make_trainer(train, tmp_path, steps=4)
    trainer.train(2)
    checkpoint = trainer.save_checkpoint()
    changed = make_trainer(train, tmp_path, steps=4, lr=1e-4)
    with pytest.raises(TrainingError, match="lr"):
        changed.load_checkpoint(checkpoint)


def test_training_lowers_validation_loss(shards) -> None:
    train, val = shards
    trainer = make_trainer(train, steps=40, log_every=40)
    trainer.val_data = val
    before = trainer.evaluate()
    trainer.train(40)
    after = trainer.evaluate()
    assert after < before - 0.5


def test_activation_checkpointing_changes_nothing_but_memory(shards) -> None:
    train, _ = shards
    plain = make_trainer(train, steps=3, log_every=1).train(3)
    checkpointed = make_trainer(train, steps=3, log_every=1, activation_checkpointing=True).train(3)
    assert checkpointed == pytest.approx(plain, abs=1e-6)


@pytest.mark.slow
def test_torch_compile_matches_eager(shards) -> None:
    train, _ = shards
    eager = make_trainer(train, steps=3, log_every=1).train(3)
    compiled = make_trainer(train, steps=3, log_every=1, compile=True).train(3)
    assert compiled == pytest.approx(eager, abs=1e-4)


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way down the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)


def test_cosine_is_the_default_schedule_and_its_numbers_are_unchanged() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert cfg.schedule == "cosine" and cfg.decay_fraction == 0.2
    # The numbers lr_at gave before schedules were configurable (exact, not approximately).
    before = [1.0 * (s + 1) / 10 if s < 10 else
              0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 10) / 100)))
              for s in range(0, 130)]  # fmt: skip
    assert [lr_at(s, cfg) for s in range(130)] == before


def test_wsd_warms_up_holds_then_decays_linearly_over_the_last_fraction() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                      decay_fraction=0.2)  # fmt: skip
    assert lr_at(0, cfg) == pytest.approx(0.1)  # first step of the warm-up
    assert lr_at(9, cfg) == pytest.approx(1.0)  # end of the warm-up
    assert lr_at(10, cfg) == lr_at(50, cfg) == lr_at(79, cfg) == 1.0  # stable
    assert lr_at(80, cfg) == pytest.approx(1.0)  # start of the decay: the last 20 of 100 steps
    assert lr_at(81, cfg) == pytest.approx(1.0 - 0.9 / 20)
    assert lr_at(90, cfg) == pytest.approx(0.55)  # half way down, linearly
    assert lr_at(100, cfg) == pytest.approx(0.1)  # end of the decay: lr * min_lr_ratio
    assert lr_at(500, cfg) == pytest.approx(0.1)
    # A decay longer than what follows the warm-up starts when the warm-up ends.
    long = TrainConfig(steps=100, lr=1.0, warmup_steps=50, schedule="wsd", decay_fraction=0.9)
    assert lr_at(49, long) == pytest.approx(1.0) and lr_at(50, long) == pytest.approx(1.0)
    assert lr_at(75, long) == pytest.approx(0.55) and lr_at(100, long) == pytest.approx(0.1)


def test_constant_warms_up_then_holds_the_peak() -> None:
    cfg = TrainConfig(steps=100, lr=0.5, warmup_steps=4, min_lr_ratio=0.1, schedule="constant")
    assert lr_at(0, cfg) == pytest.approx(0.125)
    assert lr_at(3, cfg) == pytest.approx(0.5)
    assert {lr_at(s, cfg) for s in range(4, 200)} == {0.5}  # min_lr_ratio plays no part
    no_warmup = TrainConfig(steps=10, lr=0.3, warmup_steps=0, schedule="constant")
    assert lr_at(0, no_warmup) == 0.3 and lr_at(9, no_warmup) == 0.3


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"schedule": "linear"}, "schedule must be one of ('cosine', 'wsd', 'constant'), got 'linear'"),
        ({"decay_fraction": 0.0}, "decay_fraction must be in (0, 1], got 0.0"),
        ({"decay_fraction": 1.5}, "decay_fraction must be in (0, 1], got 1.5"),
        ({"decay_fraction": math.nan}, "decay_fraction must be in (0, 1], got nan"),
    ],
)  # fmt: skip
def test_bad_schedule_settings_are_refused(bad: dict, message: str) -> None:
    with pytest.raises(TrainConfigError) as e:
        TrainConfig(**bad)
    assert str(e.value) == message
    with pytest.raises(TrainConfigError, match="'schedule' must be str"):
        TrainConfig.from_dict({"schedule": 1})


def test_a_checkpoint_resumes_only_under_the_same_schedule(shards, tmp_path: Path) -> None:
    train, _ = shards
    first = make_trainer(train, tmp_path, steps=6, schedule="wsd")
    first.train(2)
    checkpoint = first.save_checkpoint()
    first.close()
    for changed in ({"schedule": "cosine"}, {"schedule": "wsd", "decay_fraction": 0.5}):
        with pytest.raises(TrainingError, match="changed settings"):
            make_trainer(train, tmp_path, steps=6, **changed).load_checkpoint(checkpoint)
    make_trainer(train, tmp_path, steps=6, schedule="wsd").load_checkpoint(checkpoint)


def test_a_checkpoint_from_before_schedules_resumes_as_cosine(shards, tmp_path: Path) -> None:
    train, _ = shards
    first = make_trainer(train, tmp_path, steps=6)
    first.train(2)
    checkpoint = first.save_checkpoint()
    first.close()
    state = json.loads((checkpoint / STATE_FILE).read_text())
    for key in ("schedule", "decay_fraction"):  # what a checkpoint of an older fedpt lacks
        del state["train_config"][key]
    (checkpoint / STATE_FILE).write_text(json.dumps(state))
    make_trainer(train, tmp_path, steps=6).load_checkpoint(checkpoint)
    with pytest.raises(TrainingError, match=r"changed settings \['schedule'\]"):
        make_trainer(train, tmp_path, steps=6, schedule="wsd").load_checkpoint(checkpoint)


def test_diverged_loss_is_a_clear_error(shards) -> None:
    train, _ = shards
    trainer = make_trainer(train, steps=5, log_every=1, lr=1e6, warmup_steps=0, grad_clip=0)
    with pytest.raises(TrainingError, match="loss became"):
        trainer.train(5)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"lr": -1.0},
        {"lr": math.nan},
        {"precision": "fp8"},
        {"parallel": "tp"},
        {"min_lr_ratio": 2.0},
    ],
)
def test_bad_train_config_is_refused(bad: dict) -> None:
    with pytest.raises(TrainConfigError):
        TrainConfig(**bad)


def test_train_config_from_untrusted_dict() -> None:
    with pytest.raises(TrainConfigError, match="unknown train config keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(TrainConfigError, match="'lr' must be float, got 'fast'"):
        TrainConfig.from_dict({"lr": "fast"})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0


def test_seq_len_longer_than_the_model_is_refused(shards) -> None:
    train, _ = shards
    with pytest.raises(TrainingError, match="max_seq_len"):
        make_trainer(train, seq_len=128)


def test_evaluation_without_enough_validation_tokens_is_none(shards, tmp_path: Path) -> None:
    train, _ = shards
    pack_shards(["tiny"], ByteTokenizer(), tmp_path / "short", val_fraction=0.0)
    short = TokenShards(tmp_path / "short" / "train")
    assert short.num_windows(32) == 0
    assert make_trainer(train).evaluate(short) is None


def test_loading_a_global_model_keeps_inner_optimizer_state_unless_reset(shards) -> None:
    train, _ = shards
    trainer = make_trainer(train, steps=4)
    trainer.train(2)
    moments = {id(p): s["exp_avg"].clone() for p, s in trainer.optimizer.state.items()}
    fresh = {k: torch.zeros_like(v) for k, v in trainer.full_weights().items()}
    trainer.load_global(fresh)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in trainer.full_weights().values())
    assert trainer.model.output.weight is trainer.model.tok_embeddings.weight  # still tied
    for p, state in trainer.optimizer.state.items():  # DiLoCo keeps the inner AdamW moments
        assert torch.equal(state["exp_avg"], moments[id(p)])
    trainer.reset_optimizer()
    assert not trainer.optimizer.state
    trainer.train(1)  # and training goes on from the new weights
    with pytest.raises(TrainingError, match="does not fit"):
        trainer.load_global({"bogus": torch.zeros(1)})


def test_proximal_gradient_adds_mu_times_the_distance_to_the_anchor_exactly() -> None:
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0, -4.0]))
    p.grad = torch.tensor([0.25, 0.25, 0.0])
    no_grad = torch.nn.Parameter(torch.tensor([7.0]))  # frozen/unused: left without a gradient
    add_proximal_gradient_([p, no_grad], [torch.tensor([0.5, 3.0, -4.0]), torch.tensor([0.0])], 0.5)
    assert p.grad.tolist() == [0.5, -0.25, 0.0]  # 0.25 + 0.5·(θ − θ_anchor)
    assert no_grad.grad is None


def test_a_proximal_term_holds_the_local_model_near_the_round_global_model(
    shards: tuple[TokenShards, TokenShards],
) -> None:
    train, _ = shards

    def distance_after_a_round(mu: float, from_global: bool = True) -> tuple[float, dict]:
        trainer = make_trainer(train, steps=40, proximal_mu=mu)
        start = {k: v.clone() for k, v in trainer.full_weights().items()}
        if from_global:
            trainer.load_global(start)
        trainer.train(10)
        end = trainer.full_weights()
        return math.sqrt(sum(float((end[k] - start[k]).pow(2).sum()) for k in start)), end

    free, _ = distance_after_a_round(0.0)
    held, _ = distance_after_a_round(20.0)
    assert held < 0.8 * free, (held, free)
    # Without a global model (`fedpt train`) there is nothing to hold to: the term is off.
    _, plain = distance_after_a_round(0.0, from_global=False)
    _, ignored = distance_after_a_round(20.0, from_global=False)
    assert all(torch.equal(plain[k], ignored[k]) for k in plain)


def test_resetting_the_inner_momentum_zeroes_the_first_moment_and_keeps_the_second(
    shards: tuple[TokenShards, TokenShards],
) -> None:
    trainer = make_trainer(shards[0])
    trainer.train(3)
    before = {
        id(p): {k: v.clone() for k, v in s.items()} for p, s in trainer.optimizer.state.items()
    }
    trainer.reset_optimizer(momentum_only=True)
    assert trainer.optimizer.state, "the state is kept"
    for p, state in trainer.optimizer.state.items():
        assert torch.count_nonzero(state["exp_avg"]) == 0
        assert torch.equal(state["exp_avg_sq"], before[id(p)]["exp_avg_sq"])
        assert torch.equal(state["step"], before[id(p)]["step"])
        assert torch.count_nonzero(before[id(p)]["exp_avg"]) > 0
    trainer.reset_optimizer()
    assert not trainer.optimizer.state


def test_a_crash_while_a_step_is_saved_again_leaves_latest_on_the_earlier_save(
    shards, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node saves its round state under the same step again (e.g. after a restart). The
    process dies after the old folder stepped aside and before the new one is renamed in:
    `latest` still finds a complete checkpoint (the earlier save), not a missing folder."""
    train, _ = shards
    trainer = make_trainer(train, tmp_path, steps=4)
    trainer.train(2)
    first = trainer.save_checkpoint()
    saved = (first / STATE_FILE).read_text()
    real_replace = os.replace

    def dies_when_the_new_folder_moves_in(src, dst):
        if Path(src).name.endswith(".tmp") and Path(dst) == first:
            raise KeyboardInterrupt("power cut")  # not an Exception: nothing cleans up
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dies_when_the_new_folder_moves_in)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.setattr(os, "replace", real_replace)
    found = trainer.latest_checkpoint()
    assert found is not None and (found / STATE_FILE).read_text() == saved
    resumed = make_trainer(train, tmp_path, steps=4)
    resumed.load_checkpoint(found)
    assert resumed.step == 2
    # The next save of that step completes and tidies up.
    assert trainer.save_checkpoint() == first and trainer.latest_checkpoint() == first
    assert not any(p.name.endswith(".previous") for p in first.parent.iterdir())
