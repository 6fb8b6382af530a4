"""GPU paths: bf16 autocast training, flash-attn inside the model, NCCL. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

from model import attention
from model.config import ModelConfig
from model.gpt import GPT
from model.train_config import TrainConfig
from node.parallel import DistEnv
from node.trainer import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MODEL = ModelConfig(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=256)


def test_bf16_autocast_training_on_cuda_learns(shards) -> None:
    train, _ = shards
    cfg = TrainConfig(steps=30, micro_batch_size=8, seq_len=128, warmup_steps=3, log_every=30)
    trainer = Trainer(
        MODEL, cfg, train, env=DistEnv(device=torch.device("cuda", 0)), log=lambda _m: None
    )
    assert trainer.amp_dtype is torch.bfloat16
    assert next(trainer.model.parameters()).dtype is torch.float32  # fp32 master weights
    losses = trainer.train(30)
    assert losses[-1] < losses[0] - 1.0
    assert trainer.last_log is not None and trainer.last_log.mfu is not None


def test_model_forward_with_flash_attn_matches_sdpa() -> None:
    if not attention.flash_attn_available():
        pytest.skip("flash-attn not installed")
    torch.manual_seed(0)
    model = GPT(MODEL).cuda().eval()
    tokens = torch.randint(0, MODEL.vocab_size, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        flash_logits, _ = model(tokens)
        attention._flash_attn_func.cache_clear()
        try:
            os.environ["FEDPT_DISABLE_FLASH_ATTN"] = "1"
            sdpa_logits, _ = model(tokens)
        finally:
            os.environ.pop("FEDPT_DISABLE_FLASH_ATTN")
            attention._flash_attn_func.cache_clear()
    torch.testing.assert_close(flash_logits.float(), sdpa_logits.float(), atol=5e-2, rtol=5e-2)
