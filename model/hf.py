"""fedpt models to and from the Hugging Face transformers format (the Llama architecture).

fedpt's decoder is Llama's (RMSNorm, rotary embeddings rotating halves as transformers'
LlamaRotaryEmbedding does, SwiGLU, grouped-query attention, no biases), so the weights map one
to one under other names and nothing is permuted:

    tok_embeddings            model.embed_tokens          layers.N.attention.wq  ....self_attn.q_proj
    layers.N.attention_norm   ....input_layernorm         layers.N.attention.wk  ....self_attn.k_proj
    layers.N.ffn_norm         ....post_attention_layernorm                 (wv, wo: v_proj, o_proj)
    layers.N.feed_forward.w1  ....mlp.gate_proj           norm                   model.norm
    layers.N.feed_forward.w3  ....mlp.up_proj             output                 lm_head (untied)
    layers.N.feed_forward.w2  ....mlp.down_proj

The folder written is what `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` read: config.json, model.safetensors, and the tokenizer
(tokenizer.json with tokenizer_config.json). fedpt's byte tokenizer becomes a byte-level BPE
without merges whose ids are the bytes, with the same three special tokens after them. The
`hf` extra (transformers) writes the config and tokenizer files, so they are what the installed
transformers line expects, and reads a folder's config the way transformers does; imported
lazily. Weights never pass through pickle: safetensors only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from model.config import ConfigError, ModelConfig
from model.io import save_tensors_atomic
from model.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, BPETokenizer, ByteTokenizer, Tokenizer

HF_WEIGHTS = "model.safetensors"
HF_TOKENIZER = "tokenizer.json"
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight",
              "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}  # fmt: skip


class HFFormatError(ValueError):
    """A Hugging Face folder that fedpt's model cannot express, or a missing `hf` extra."""


def hf_name(name: str) -> str:
    """The transformers Llama name of a fedpt parameter."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise HFFormatError(f"no Llama counterpart for fedpt parameter {name!r}")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"


def fedpt_names(config: ModelConfig) -> list[str]:
    """Every fedpt parameter name of a model with `config` (without the tied output)."""
    names = ["tok_embeddings.weight"]
    for i in range(config.n_layers):
        names += [f"layers.{i}.{n}" for n in _LAYER_NAMES]
    names.append("norm.weight")
    if not config.tie_embeddings:
        names.append("output.weight")
    return names


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise HFFormatError(
            'the Hugging Face format needs the hf extra: pip install "fedpt[hf]"'
        ) from e
    return transformers


# ---- export ---------------------------------------------------------------------------------
def hf_config(config: ModelConfig, tokenizer: Tokenizer, seq_len: int | None = None) -> dict:
    """config.json for `config`, as the installed transformers writes a LlamaConfig."""
    llama = _transformers().LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.head_dim, hidden_act="silu",
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps,
        initializer_range=config.init_std, tie_word_embeddings=config.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"], dtype="float32",
    )  # fmt: skip
    out = llama.to_dict()
    if seq_len:
        out["fedpt_train_seq_len"] = seq_len  # ignored by transformers; read back by import
    return out


def export_hf(state: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer,
              out_dir: Path, seq_len: int | None = None) -> Path:  # fmt: skip
    """Write the transformers folder for fedpt weights `state` (fp32, as trained)."""
    missing = sorted(set(fedpt_names(config)) - set(state))
    if missing:
        raise HFFormatError(f"the weights lack {', '.join(missing[:3])}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(n): state[n].detach().to(torch.float32).contiguous()
               for n in fedpt_names(config)}  # fmt: skip
    save_tensors_atomic(tensors, out_dir / HF_WEIGHTS, {"format": "pt"})
    (out_dir / "config.json").write_text(
        json.dumps(hf_config(config, tokenizer, seq_len), indent=2, sort_keys=True) + "\n"
    )
    _hf_tokenizer(tokenizer).save_pretrained(str(out_dir))
    return out_dir


def _hf_tokenizer(tokenizer: Tokenizer):
    """transformers' fast tokenizer with the same ids as `tokenizer`."""
    fast = _transformers().PreTrainedTokenizerFast
    backend = byte_level_backend() if isinstance(tokenizer, ByteTokenizer) else tokenizer._tok
    return fast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                model_max_length=10**9, clean_up_tokenization_spaces=False)  # fmt: skip


def byte_level_backend():
    """fedpt's ByteTokenizer as a `tokenizers` Tokenizer: a byte-level BPE with no merges, so
    every UTF-8 byte is one token whose id is the byte, then the special tokens 256, 257, 258."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    # No regex split: a text is one piece, turned into its bytes' characters and looked up.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    return backend


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte, as the ByteLevel pre-tokenizer maps them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


# ---- import ---------------------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def model_config_from_hf(raw: dict, where: Path) -> ModelConfig:
    """fedpt's ModelConfig for a transformers config.json; HFFormatError for anything fedpt's
    model cannot express."""
    config = _transformers().AutoConfig.for_model(**raw) if "model_type" in raw else None
    if config is None or config.model_type != "llama":
        raise HFFormatError(
            f"{where}: model_type {raw.get('model_type')!r}; fedpt imports the Llama architecture only"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
    refusals = {
        "hidden_act": (config.hidden_act, "silu"),
        "attention_bias": (bool(config.attention_bias), False),
        "mlp_bias": (bool(getattr(config, "mlp_bias", False)), False),
        "rope_type": (rope.get("rope_type", "default"), "default"),
        "head_dim": (config.head_dim, config.hidden_size // config.num_attention_heads),
    }
    for key, (got, wanted) in refusals.items():
        if got != wanted:
            raise HFFormatError(
                f"{where}: {key} is {got!r}; fedpt's model supports only {wanted!r}"
            )
    try:
        return ModelConfig(
            vocab_size=config.vocab_size, dim=config.hidden_size,
            n_layers=config.num_hidden_layers, n_heads=config.num_attention_heads,
            n_kv_heads=(None if config.num_key_value_heads in (None, config.num_attention_heads)
                        else config.num_key_value_heads),
            ffn_dim=config.intermediate_size, max_seq_len=config.max_position_embeddings,
            rope_theta=float(theta if theta is not None else 10000.0),
            norm_eps=float(config.rms_norm_eps), tie_embeddings=bool(config.tie_word_embeddings),
            init_std=float(config.initializer_range),
        )  # fmt: skip
    except ConfigError as e:
        raise HFFormatError(f"{where}: {e}") from e


def read_hf_config(folder: Path) -> tuple[ModelConfig, int | None]:
    """(model config, the sequence length fedpt trained it with, if fedpt exported it)."""
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{folder}/config.json is unreadable: {e}") from e
    if not isinstance(raw, dict):
        raise HFFormatError(f"{folder}/config.json is not a JSON object")
    seq_len = raw.get("fedpt_train_seq_len")
    return model_config_from_hf(raw, folder), seq_len if isinstance(seq_len, int) else None


def import_hf(folder: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], int | None]:
    """(model config, fedpt weights in fp32, the sequence length fedpt trained it with if it
    was exported by fedpt) from a transformers Llama folder of safetensors weights."""
    config, seq_len = read_hf_config(folder)
    tensors = _read_safetensors(folder)
    state, unused = {}, set(tensors)
    for name in fedpt_names(config):
        source = hf_name(name)
        if source not in tensors:
            raise HFFormatError(f"{folder}: the weights lack {source}")
        state[name] = tensors[source].to(torch.float32)
        unused.discard(source)
    if config.tie_embeddings:
        unused.discard("lm_head.weight")  # some writers keep the tied copy
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}  # derived, not weights
    if unused:
        raise HFFormatError(f"{folder}: weights fedpt's model has no place for: "
                            f"{', '.join(sorted(unused)[:3])}")  # fmt: skip
    _check_shapes(config, state, folder)
    return config, state, seq_len


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / f"{HF_WEIGHTS}.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / HF_WEIGHTS).is_file():
        files = [HF_WEIGHTS]
    else:
        raise HFFormatError(f"{folder} has no {HF_WEIGHTS} (fedpt reads safetensors weights only, "
                            "never pickled .bin files)")  # fmt: skip
    tensors = {}
    for name in files:
        try:
            with safe_open(str(folder / name), framework="pt", device="cpu") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise HFFormatError(f"cannot read {folder / name}: {e}") from e
    return tensors


def _tokenizes_alike(a, b) -> bool:
    """Same ids for every text (as fedpt encodes: no special tokens added), whatever
    post-processor transformers put in the file."""
    keys = ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens")
    left, right = json.loads(a.to_str()), json.loads(b.to_str())
    return all(left.get(k) == right.get(k) for k in keys)


def _check_shapes(config: ModelConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    from model.gpt import GPT
    from model.io import model_state

    with torch.device("meta"):
        expected = model_state(GPT(config))
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise HFFormatError(f"{folder}: {hf_name(name)} has shape {tuple(tensor.shape)}, the "
                                f"config implies {tuple(expected[name].shape)}")  # fmt: skip


def import_tokenizer(folder: Path, out_dir: Path) -> Tokenizer:
    """The folder's tokenizer as fedpt's: the byte tokenizer when it is fedpt's own byte-level
    export, else its tokenizer.json, which must hold fedpt's three special tokens (copied to
    out_dir/SHA256/tokenizer.json: a BPE tokenizer is identified by its file's sha256)."""
    path = folder / HF_TOKENIZER
    if not path.is_file():
        raise HFFormatError(f"{folder} has no {HF_TOKENIZER} (a fast tokenizer's file)")
    raw = path.read_bytes()
    from tokenizers import Tokenizer as Backend

    try:
        backend = Backend.from_str(raw.decode("utf-8"))
    except Exception as e:  # tokenizers raises a bare Exception
        raise HFFormatError(f"{path} is not a tokenizer JSON: {e}") from e
    if _tokenizes_alike(backend, byte_level_backend()):
        return ByteTokenizer()
    out = out_dir / hashlib.sha256(raw).hexdigest() / HF_TOKENIZER
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(raw)
    try:
        return BPETokenizer.from_file(out)
    except Exception as e:  # tokenizers raises a bare Exception
        raise HFFormatError(f"{path}: {e}") from e
