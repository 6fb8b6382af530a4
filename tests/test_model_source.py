"""What `--checkpoint` names (node/model_source.py): a node's work dir gives the federation's final
global model, or says loudly that it is the node's own local one; an aggregator's state dir (or a
simulate run) gives its newest global checkpoint, which now records its model, tokenizer and
training length; and bits per byte count the text the scored tokens stand for."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from aggregator.checkpoints import CheckpointStore, model_description
from model.config import ModelConfig
from model.gpt import GPT
from model.io import CheckpointError, model_state, save_model
from model.tokenizer import ByteTokenizer, train_bpe
from node.checkpoint import LATEST, STATE_FILE
from node.evaluation import bits_per_byte
from node.model_source import locate
from node.shards import TokenShards, pack_shards
from tests.conftest import synthetic_documents

CONFIG = ModelConfig(vocab_size=320, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=64)


def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def node_work_dir(root: Path, with_final: bool) -> Path:
    """What `fedpt node join` leaves: its round log, its inner checkpoints, maybe final/."""
    (root / "checkpoints" / "step_00000006").mkdir(parents=True)
    (root / "rounds.jsonl").write_text('{"round": 0}\n')
    save_model(model(), root / "checkpoints" / "step_00000006" / "model.safetensors", seq_len=32)
    (root / "checkpoints" / "step_00000006" / STATE_FILE).write_text("{}")
    (root / "checkpoints" / LATEST).write_text("step_00000006\n")
    if with_final:
        (root / "final").mkdir()
        save_model(model(), root / "final" / "global.safetensors", seq_len=32)
    return root


def test_a_node_work_dir_means_the_final_global_model_or_says_it_is_local(tmp_path: Path) -> None:
    final = locate(node_work_dir(tmp_path / "with", with_final=True))
    assert final.weights == tmp_path / "with" / "final" / "global.safetensors"
    assert "the federation's final global model" in final.description
    local = locate(node_work_dir(tmp_path / "without", with_final=False))
    assert local.weights.parent.name == "step_00000006"
    assert "OWN local model" in local.description and "not the federation's" in local.description
    assert local.seq_len == final.seq_len == 32


def test_an_aggregator_state_dir_means_its_newest_global_checkpoint(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path / "state" / "checkpoints")
    described = model_description(CONFIG.to_json(), json.dumps(ByteTokenizer().spec()), 48)
    params = model_state(model())
    for version in (0, 1, 2):
        store.write(version, version - 1, params, {}, {}, described)
    for path in (tmp_path / "state", tmp_path):  # a state dir; a simulate run holding one
        if path == tmp_path:
            (tmp_path / "state").rename(tmp_path / "aggregator")
        source = locate(path)
        assert source.description.startswith("global model v2 (aggregator checkpoint")
        assert source.config == CONFIG and source.seq_len == 48
        assert source.state().keys() == params.keys()  # the outer optimizer's tensors left out
    undescribed = CheckpointStore(tmp_path / "old" / "checkpoints")
    undescribed.write(0, -1, params, {}, {})
    with pytest.raises(CheckpointError, match="before fedpt recorded the model"):
        locate(tmp_path / "old")


def test_bits_per_byte_count_the_text_each_token_stands_for(tmp_path: Path) -> None:
    texts = ["plain ascii text", "ünïcödé — 漢字 and emoji 🙂", "  spaces\tand\nnewlines  "]
    documents = synthetic_documents(40)
    bpe = train_bpe(iter(documents), 300, tmp_path / "bpe.json")
    for tokenizer in (ByteTokenizer(), bpe):
        lengths = tokenizer.byte_lengths()
        for text in texts:
            assert sum(lengths[i] for i in tokenizer.encode(text)) == len(text.encode("utf-8"))
        assert lengths[tokenizer.eos_id] == 0
    pack_shards(iter(documents), bpe, tmp_path / "shards", val_fraction=0.0)
    shards = TokenShards(tmp_path / "shards" / "train")
    windows = shards.num_windows(16)
    bpb = bits_per_byte(math.log(2), shards, seq_len=16, windows=windows,
                        byte_lengths=bpe.byte_lengths())  # fmt: skip
    # one bit per token, over the bytes those tokens spell: well under one bit per byte
    tokens = windows * 16
    text_bytes = sum(bpe.byte_lengths()[t] for t in shards.window(0, 16)[1:])
    assert 0 < bpb < 1 and text_bytes > 16
    assert bpb == pytest.approx(tokens / sum(
        sum(bpe.byte_lengths()[t] for t in shards.window(w, 16)[1:]) for w in range(windows)))  # fmt: skip
