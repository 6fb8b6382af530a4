"""The model leaves fedpt and comes back: `fedpt export --format hf` writes a folder that
transformers loads with no fedpt importable (a fresh process that refuses to import fedpt's
packages) and that computes fedpt's logits and greedy generations; `fedpt import` and
`[federation] init_from` bring a transformers Llama back, byte for byte. Skipped without the
`hf` extra (transformers)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from aggregator.config import load_config
from aggregator.server import start_aggregator
from fedpt.simulate import free_port
from model.io import load_tensors
from node.local_training import open_model
from tests.test_cli import SMALL_RUN, fedpt

pytest.importorskip("transformers")

TEXT = ("Federated pretraining lets organisations train one language model together; "
        "each keeps its corpus at home and sends only an update.")  # fmt: skip
PACKAGES = ("fedpt", "model", "node", "aggregator", "protos")

# Runs in a fresh interpreter, outside the repository, with fedpt's packages made unimportable:
# what a user with only transformers installed gets.
HF_SIDE = f"""
import importlib.abc, json, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {PACKAGES!r}:
            raise ImportError("fedpt must not be imported here: " + name)
sys.meta_path.insert(0, Refuse())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, text, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
ids = tokenizer(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0]
    out = model.generate(torch.tensor([ids[:8]]), max_new_tokens=new, do_sample=False,
                         eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
print(json.dumps({{"ids": ids, "logits": logits.tolist(), "generated": out[0].tolist(),
                  "decoded": tokenizer.decode(ids)}}))
"""


def hf_side(folder: Path, tmp_path: Path, new_tokens: int = 24) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", HF_SIDE, str(folder), TEXT, str(new_tokens)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def trained_run(corpus_dir: Path, out: Path, *extra: str) -> Path:
    fedpt("train", "--data", corpus_dir, "--out", out, "--steps", "8", *SMALL_RUN, *extra)
    return out


def assert_same_as_fedpt(run: Path, exported: Path, tmp_path: Path) -> None:
    model, tokenizer, _ = open_model(run, None, torch.device("cpu"))
    theirs = hf_side(exported, tmp_path)
    ids = tokenizer.encode(TEXT)
    assert theirs["ids"] == ids  # the same tokens for the same text
    assert theirs["decoded"] == TEXT
    with torch.no_grad():
        mine = model(torch.tensor([ids]))[0][0]
        greedy = model.generate(torch.tensor([ids[:8]]), 24, temperature=0.0)
    assert (mine - torch.tensor(theirs["logits"])).abs().max().item() <= 1e-4
    assert theirs["generated"] == greedy[0].tolist()


@pytest.mark.slow
def test_an_exported_byte_model_loads_in_transformers_without_fedpt_and_agrees(
    corpus_dir: Path, tmp_path: Path
) -> None:
    run = trained_run(corpus_dir, tmp_path / "run")
    exported = tmp_path / "hf"
    proc = fedpt("export", "--checkpoint", run, "--format", "hf", "--out", exported)
    assert "training run" in proc.stdout
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"
    ]  # fmt: skip
    assert json.loads((exported / "config.json").read_text())["model_type"] == "llama"
    assert_same_as_fedpt(run, exported, tmp_path)


@pytest.mark.slow
def test_an_exported_bpe_model_loads_in_transformers_without_fedpt_and_agrees(
    corpus_dir: Path, tmp_path: Path
) -> None:
    tokenizer = tmp_path / "tok.json"
    fedpt("tokenizer", "train", "--data", corpus_dir, "--vocab-size", "300", "--out", tokenizer)
    run = trained_run(corpus_dir, tmp_path / "run", "--tokenizer", tokenizer)
    exported = tmp_path / "hf"
    fedpt("export", "--checkpoint", run, "--out", exported)
    assert_same_as_fedpt(run, exported, tmp_path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_import_then_export_gives_byte_identical_weights(corpus_dir: Path, tmp_path: Path) -> None:
    run = trained_run(corpus_dir, tmp_path / "run")
    fedpt("export", "--checkpoint", run, "--out", tmp_path / "hf1")
    fedpt("import", "--from", tmp_path / "hf1", "--out", tmp_path / "back")
    assert not (tmp_path / "back" / "tokenizer.json").exists()  # recognised as the byte tokenizer
    original, _ = load_tensors(run / "model.safetensors")
    imported, _ = load_tensors(tmp_path / "back" / "model.safetensors")
    assert original.keys() == imported.keys()
    assert all(torch.equal(original[k], imported[k]) for k in original)
    fedpt("export", "--checkpoint", tmp_path / "back", "--out", tmp_path / "hf2")
    assert sha256(tmp_path / "hf1" / "model.safetensors") == sha256(
        tmp_path / "hf2" / "model.safetensors"
    )
    # eval scores the imported model with the length it was trained with, saying which it is
    proc = fedpt("eval", "--checkpoint", tmp_path / "back", "--data", corpus_dir)
    assert f"weights file {tmp_path / 'back' / 'model.safetensors'}" in proc.stdout
    assert "windows of 64 tokens, the length it was trained with" in proc.stdout


def transformers_llama(folder: Path, **shape) -> dict[str, torch.Tensor]:
    """A randomly initialised LlamaForCausalLM saved by transformers itself, with fedpt's byte
    tokenizer beside it; its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.hf import _hf_tokenizer
    from model.tokenizer import ByteTokenizer

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, **shape)  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    _hf_tokenizer(ByteTokenizer()).save_pretrained(str(folder))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def aggregator_toml(tmp_path: Path, init_from: Path, port: int) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(f"""[server]
host = "127.0.0.1"
port = {port}
insecure = true
long_poll_seconds = 1.0
[federation]
name = "continued"
rounds = 1
inner_steps = 2
delta_encoding = "fp32"
download_encoding = "fp32"
init_from = "{init_from}"
[round]
min_nodes = 2
start_grace_seconds = 0.5
timeout_seconds = 300
[train]
micro_batch_size = 2
seq_len = 32
[store]
state_dir = "{tmp_path / "state"}"
""")
    return path


@pytest.mark.slow
def test_a_federation_round_starts_from_a_llama_written_by_transformers(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    weights = transformers_llama(folder)
    config = load_config(aggregator_toml(tmp_path, folder, free_port()))
    lines: list[str] = []
    running = start_aggregator(config, log=lines.append)
    try:
        coordinator = running.coordinator
        assert f"version 0 is transformers folder {folder}" in lines
        version0 = coordinator.params
        assert torch.equal(version0["layers.1.feed_forward.w1.weight"],
                           weights["model.layers.1.mlp.gate_proj.weight"])  # fmt: skip
        assert torch.equal(version0["output.weight"], weights["lm_head.weight"])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        nodes = [subprocess.Popen(
            [sys.executable, "-m", "fedpt", "node", "join", "--aggregator", running.address,
             "--insecure", "--data", f"builtin:{org}", "--work-dir", str(tmp_path / org)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
            for org in ("web", "systems")]  # fmt: skip
        give_up = time.monotonic() + 600
        while coordinator.version < 1 and time.monotonic() < give_up:
            assert all(n.poll() in (None, 0) for n in nodes), [n.stderr.read() for n in nodes]
            time.sleep(0.2)
        assert coordinator.version == 1, lines[-5:]
        moved = coordinator.params["layers.0.attention.wq.weight"]
        assert not torch.equal(moved, weights["model.layers.0.self_attn.q_proj.weight"])
        for node in nodes:
            assert node.wait(timeout=120) == 0, node.stderr.read()[-2000:]
    finally:
        running.stop(grace=0)


@pytest.mark.slow
def test_fedpt_train_continues_a_llama_written_by_transformers(
    corpus_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "llama"
    weights = transformers_llama(folder)
    proc = fedpt("train", "--data", corpus_dir, "--out", tmp_path / "run", "--init-from", folder,
                 "--steps", "2", "--seq-len", "32", "--micro-batch-size", "2", "--eval-batches", "2")  # fmt: skip
    assert f"initial weights from transformers folder {folder}" in proc.stdout
    trained, _ = load_tensors(tmp_path / "run" / "model.safetensors")
    before = weights["model.layers.0.mlp.down_proj.weight"]
    after = trained["layers.0.feed_forward.w2.weight"]
    assert after.shape == before.shape and not torch.equal(after, before)
    assert (after - before).abs().max() < 0.01  # two small steps on from it, not from scratch


def test_what_fedpt_cannot_express_is_refused_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "llama"
    transformers_llama(folder, attention_bias=True)
    proc = fedpt("import", "--from", folder, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"fedpt: error: {folder}: attention_bias is True; fedpt's model supports only False"
    ]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    proc = fedpt("import", "--from", folder, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "fedpt imports the Llama architecture only" in proc.stderr
    assert not (tmp_path / "out").exists()
