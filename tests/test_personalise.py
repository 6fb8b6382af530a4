"""Personalisation (node/personalise.py): LoRA's exact algebra, and real fine-tuning on shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.io import model_state
from model.tokenizer import ByteTokenizer
from model.train_config import TrainConfig
from node.parallel import DistEnv
from node.personalise import (
    PersonaliseConfig,
    PersonaliseError,
    adapted_linears,
    add_lora,
    merge_lora,
    personalise,
    validation_loss,
)
from node.shards import TokenShards, pack_shards
from tests.conftest import synthetic_documents

MODEL = ModelConfig(dim=64, n_layers=2, n_heads=4, ffn_dim=160, max_seq_len=64)
INNER = TrainConfig(micro_batch_size=4, seq_len=32, eval_batches=4, lr=3e-3)


def fresh(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(MODEL)


def test_lora_starts_as_the_global_model_and_trains_only_its_factors() -> None:
    model = fresh()
    x = torch.randint(0, MODEL.vocab_size, (2, 16))
    logits_before, _ = model(x)
    trainable = add_lora(model, rank=4, alpha=8.0)
    logits_lora, _ = model(x)
    assert torch.equal(logits_before, logits_lora)  # B = 0: exactly the global model
    # r·(d_in + d_out) per adapted matrix, and nothing else trains
    expected = sum(4 * (m.in_features + m.out_features) for _, m in adapted_linears(model))
    assert sum(p.numel() for p in trainable) == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert len(adapted_linears(model)) == 7 * MODEL.n_layers  # wq wk wv wo w1 w2 w3


def test_merged_lora_weight_is_w_plus_scaled_b_times_a() -> None:
    model = fresh()
    add_lora(model, rank=4, alpha=8.0)
    name, linear = adapted_linears(model)[0]
    update = linear.parametrizations.weight[0]
    with torch.no_grad():
        update.b.copy_(torch.arange(update.b.numel(), dtype=torch.float32).view_as(update.b) / 100)
    base = linear.parametrizations.weight.original.detach().clone()
    expected = base + (8.0 / 4) * (update.b.detach() @ update.a.detach())
    x = torch.randint(0, MODEL.vocab_size, (2, 16))
    logits_adapted, _ = model(x)
    merge_lora(model)
    assert torch.equal(dict(model.named_parameters())[f"{name}.weight"].detach(), expected)
    assert set(model_state(model)) == set(model_state(fresh()))  # an ordinary model file again
    logits_merged, _ = model(x)
    torch.testing.assert_close(logits_merged, logits_adapted)


@pytest.fixture
def own_data(tmp_path: Path) -> tuple[TokenShards, TokenShards]:
    pack_shards(
        synthetic_documents(60, seed=3), ByteTokenizer(), tmp_path / "own", val_fraction=0.2
    )
    return TokenShards(tmp_path / "own" / "train"), TokenShards(tmp_path / "own" / "val")


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_personalising_lowers_the_loss_on_the_organisations_own_validation_data(
    own_data: tuple[TokenShards, TokenShards], mode: str
) -> None:
    train, val = own_data
    global_model = fresh()
    before = {k: v.clone() for k, v in model_state(global_model).items()}
    result = personalise(global_model, train, val, INNER, PersonaliseConfig(30, mode),
                         start_step=5)  # fmt: skip
    assert result.global_val_loss == pytest.approx(
        validation_loss(global_model, val, INNER, DistEnv())
    )
    assert result.val_loss < result.global_val_loss - 0.3, result.report()
    assert result.val_loss == pytest.approx(validation_loss(result.model, val, INNER, DistEnv()))
    # The global model it started from is left as it was.
    assert all(torch.equal(v, before[k]) for k, v in model_state(global_model).items())
    total = sum(t.numel() for t in model_state(global_model).values())
    if mode == "lora":
        assert 0 < result.trainable_params < total / 5
        assert result.lr == pytest.approx(3 * INNER.lr * INNER.min_lr_ratio)
    else:
        assert result.trainable_params == sum(p.numel() for p in global_model.parameters())
        assert result.lr == pytest.approx(INNER.lr * INNER.min_lr_ratio)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_personalisation_repeats_exactly_and_follows_the_data_position(
    own_data: tuple[TokenShards, TokenShards], mode: str
) -> None:
    train, val = own_data
    runs = [personalise(fresh(), train, val, INNER, PersonaliseConfig(5, mode), start_step=s)
            for s in (7, 7, 8)]  # fmt: skip
    weights = [model_state(r.model) for r in runs]
    torch.manual_seed(123)  # the global generator plays no part
    again = model_state(personalise(fresh(), train, val, INNER, PersonaliseConfig(5, mode),
                                    start_step=7).model)  # fmt: skip
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert all(torch.equal(weights[0][k], again[k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


@pytest.mark.parametrize(
    "settings, message",
    [({"mode": "prefix"}, "personalise_mode"), ({"steps": -1}, "personalise_steps"),
     ({"lr": float("nan")}, "personalise_lr"), ({"lora_rank": 0}, "lora_rank")],
)  # fmt: skip
def test_bad_personalisation_settings_are_refused(settings: dict, message: str) -> None:
    with pytest.raises(PersonaliseError, match=message):
        PersonaliseConfig(**settings)


def test_full_personalisation_continues_the_nodes_inner_optimizer_state(
    own_data: tuple[TokenShards, TokenShards], tmp_path: Path
) -> None:
    from node.trainer import Trainer

    train, val = own_data
    # A constant lr, so that one personalisation step and one more inner step use the same one.
    inner = TrainConfig(micro_batch_size=4, seq_len=32, eval_batches=4, lr=1e-3, warmup_steps=0,
                        min_lr_ratio=1.0, steps=20)  # fmt: skip
    trainer = Trainer(MODEL, inner, train, tokenizer_spec=ByteTokenizer().spec(),
                      out_dir=tmp_path / "node", log=lambda _m: None)  # fmt: skip
    trainer.train(6)
    kept = trainer.save_checkpoint()
    model_now = GPT(MODEL)
    model_now.load_state_dict(trainer.model.state_dict())
    pcfg = PersonaliseConfig(1, "full", lr=1e-3)
    continued = personalise(model_now, train, val, inner, pcfg, start_step=6, inner_state=kept)
    fresh = personalise(model_now, train, val, inner, pcfg, start_step=6)
    trainer.train(1)  # the same batch, the same lr, the kept moments
    expected = model_state(trainer.model)
    got, other = model_state(continued.model), model_state(fresh.model)
    worst = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    fresh_gap = max(float((other[k] - expected[k]).abs().max()) for k in expected)
    assert worst < 1e-6 < fresh_gap / 100, (worst, fresh_gap)


def test_the_default_peak_is_where_the_federations_schedule_ended() -> None:
    from model.train_config import TrainConfig
    from node.personalise import PersonaliseConfig

    cosine = TrainConfig.from_dict({"lr": 1e-3, "min_lr_ratio": 0.1, "steps": 100})
    constant = TrainConfig.from_dict({"lr": 1e-3, "steps": 100, "schedule": "constant"})
    assert PersonaliseConfig(steps=10).peak_lr(cosine) == pytest.approx(1e-4)
    assert PersonaliseConfig(steps=10).peak_lr(constant) == pytest.approx(1e-3)  # never decayed
    assert PersonaliseConfig(steps=10, mode="lora").peak_lr(constant) == pytest.approx(3e-3)
