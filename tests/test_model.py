"""Model: preset sizes, attention backends, forward/loss, weights I/O, tokenizers."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from model import attention
from model.config import PRESETS, ConfigError, ModelConfig, preset
from model.gpt import GPT
from model.io import CheckpointError, load_model, save_model
from model.tokenizer import BPETokenizer, ByteTokenizer, TokenizerError, load_tokenizer, train_bpe

# Nominal size of each preset and the band its parameter count must fall in.
PRESET_SIZES = {
    "tiny": (0.9e6, 1.2e6),
    "small": (9e6, 12e6),
    "125m": (115e6, 135e6),
    "350m": (330e6, 380e6),
    "1b": (1.0e9, 1.2e9),
    "7b": (6.5e9, 7.0e9),
}


@pytest.mark.parametrize("name", list(PRESET_SIZES))
def test_preset_parameter_count(name: str) -> None:
    cfg = preset(name)
    low, high = PRESET_SIZES[name]
    with torch.device("meta"):  # shapes only: a 7b model costs no memory here
        model = GPT(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == cfg.num_params()
    assert low <= counted <= high, f"{name}: {counted / 1e6:.1f}M params"


def test_every_preset_is_tested() -> None:
    assert set(PRESETS) == set(PRESET_SIZES)


def test_unknown_preset_and_bad_config_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(dim=100, n_heads=3)
    with pytest.raises(ConfigError, match="unknown model config keys: bogus"):
        ModelConfig.from_dict({**ModelConfig().to_dict(), "bogus": 1})
    with pytest.raises(ConfigError, match="'dim' must be int, got '128'"):
        ModelConfig.from_dict({"dim": "128"})
    with pytest.raises(ConfigError, match="'tie_embeddings' must be bool"):
        ModelConfig.from_dict({"tie_embeddings": 1})
    with pytest.raises(ConfigError, match="'n_kv_heads' must be int or none"):
        ModelConfig.from_dict({"n_kv_heads": 2.5})
    assert ModelConfig.from_dict({"rope_theta": 500000}).rope_theta == 500000.0
    assert ModelConfig.from_dict({"n_kv_heads": None, "n_heads": 4}).kv_heads == 4


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (8, 1)])
def test_sdpa_equals_explicit_softmax_attention(n_heads: int, n_kv_heads: int) -> None:
    g = torch.Generator().manual_seed(0)
    B, T, D = 2, 17, 16
    q = torch.randn(B, T, n_heads, D, generator=g)
    k = torch.randn(B, T, n_kv_heads, D, generator=g)
    v = torch.randn(B, T, n_kv_heads, D, generator=g)
    assert attention.backend_for(q) == "sdpa"
    torch.testing.assert_close(
        attention.causal_attention(q, k, v),
        attention.reference_attention(q, k, v),
        atol=1e-5,
        rtol=1e-5,
    )


def test_flash_attn_is_never_used_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_flash(*args, **kwargs):
        raise AssertionError("flash-attn must not run on CPU tensors")

    monkeypatch.setattr(attention, "_flash_attn_func", lambda: fake_flash)
    q = torch.randn(1, 4, 2, 8, dtype=torch.bfloat16)
    assert attention.flash_attn_available()
    assert attention.backend_for(q) == "sdpa"
    out = attention.causal_attention(q, q, q)
    assert out.shape == q.shape


def test_flash_attn_import_is_lazy_and_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDPT_DISABLE_FLASH_ATTN", "1")
    attention._flash_attn_func.cache_clear()
    try:
        assert not attention.flash_attn_available()
    finally:
        attention._flash_attn_func.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_attn_matches_sdpa_on_cuda() -> None:
    if not attention.flash_attn_available():
        pytest.skip("flash-attn not installed")
    q, k, v = (torch.randn(2, 128, 8, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    assert attention.backend_for(q) == "flash"
    flash = attention.causal_attention(q, k, v)
    ref = attention.reference_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(flash.float(), ref, atol=2e-2, rtol=2e-2)


def tiny_model(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 96, **overrides}))


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"tie_embeddings": False}])
def test_forward_shapes_and_initial_loss(overrides: dict) -> None:
    model = tiny_model(**overrides)
    tokens, targets = torch.randint(0, 320, (2, 3, 20))
    logits, loss = model(tokens, targets)
    assert logits.shape == (3, 20, 320)
    # At initialisation the prediction is near uniform.
    assert abs(loss.item() - math.log(320)) < 0.5


def test_model_is_causal() -> None:
    model = tiny_model().eval()
    tokens = torch.randint(0, 320, (1, 16))
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 320
    a, _ = model(tokens)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_too_long_sequence_is_refused() -> None:
    model = tiny_model(max_seq_len=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len 8"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_round_trip(tmp_path, tied: bool) -> None:
    model = tiny_model(tie_embeddings=tied).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path, tokenizer_spec=ByteTokenizer().spec())
    loaded, spec = load_model(path)
    assert spec == ByteTokenizer().spec()
    assert loaded.config == model.config
    tokens = torch.randint(0, 320, (2, 12))
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0], atol=0, rtol=0)
    if tied:
        assert loaded.output.weight is loaded.tok_embeddings.weight
    assert not list(tmp_path.glob(".*tmp*")), "temp file left behind"


def test_corrupt_or_mismatched_weights_are_refused(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path)
    data = bytearray(path.read_bytes())
    (tmp_path / "cut.safetensors").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "cut.safetensors")
    with pytest.raises(CheckpointError, match="no weights file"):
        load_model(tmp_path / "absent.safetensors")
    from model.io import load_tensors, load_weights_into

    tensors, _ = load_tensors(path)
    with pytest.raises(CheckpointError, match="shape"):
        load_weights_into(tiny_model(dim=32, ffn_dim=48), tensors)


def test_greedy_generation_is_deterministic() -> None:
    model = tiny_model().eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 8, temperature=0)
    b = model.generate(prompt, 8, temperature=0)
    assert a.shape == (1, 11)
    assert torch.equal(a, b)


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓\n\tdef f(): pass"
    ids = tok.encode(text)
    assert max(ids) < 256
    assert tok.decode([*ids, tok.eos_id]) == text
    assert load_tokenizer(tok.spec()).spec() == tok.spec()


def test_bpe_train_save_reload(tmp_path) -> None:
    docs = [
        "def add(a, b):\n    return a + b\n",
        "the quick brown fox jumps over the lazy dog",
    ] * 50
    path = tmp_path / "tok.json"
    tok = train_bpe(iter(docs), vocab_size=300, out_path=path)
    assert tok.vocab_size <= 300
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert tok.sha256 == digest
    assert (tmp_path / "tok.json.sha256").read_text().split()[0] == digest
    reloaded = load_tokenizer(tok.spec(), path)
    for d in docs[:2]:
        assert reloaded.encode(d) == tok.encode(d)
        assert reloaded.decode(reloaded.encode(d)) == d
    assert len(tok.encode(docs[1])) < len(docs[1].encode())  # merges were learned


def test_bpe_with_wrong_hash_or_bad_file_is_refused(tmp_path) -> None:
    path = tmp_path / "tok.json"
    train_bpe(iter(["abc abc abc"] * 10), vocab_size=270, out_path=path)
    with pytest.raises(TokenizerError, match="sha256"):
        BPETokenizer.from_file(path, expected_sha256="0" * 64)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer"):
        BPETokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        load_tokenizer({"kind": "sentencepiece"})
