"""Generation: the KV cache against the uncached loop, the sampling rules, the stop string and
the `fedpt generate` flags. Tiny fp32 models on the CPU."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

from fedpt.cli import main
from model.config import ModelConfig
from model.generation import KVCache, generate_text, sample_next
from model.gpt import GPT
from model.io import save_model

WINDOW = 24  # max_seq_len of the test models: short, so generation runs past it


def tiny_model(**overrides) -> GPT:
    """Initialised 15× wider than for training: an untrained model at the usual scale repeats
    its last token whatever the context, so a broken cache would still match greedily."""
    torch.manual_seed(0)
    cfg = {"dim": 64, "n_layers": 2, "n_heads": 4, "ffn_dim": 96, "max_seq_len": WINDOW,
           "init_std": 0.3}  # fmt: skip
    return GPT(ModelConfig(**{**cfg, **overrides})).eval()


def forward_lengths(model: GPT) -> list[int]:
    """The number of tokens of each later model forward, appended as they run."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    return lengths


class Letters:
    """A stand-in tokenizer whose every id decodes to one letter, so text is easy to slice."""

    eos_id = 10**6  # never sampled: the runs end at the stop string or the token budget

    def encode(self, text: str) -> list[int]:
        return [string.ascii_letters.index(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(string.ascii_letters[i % 52] for i in ids)


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}, {"n_kv_heads": 1}])
def test_cached_greedy_generation_matches_the_uncached_loop(overrides: dict) -> None:
    model = tiny_model(**overrides)
    for prompt in ([[1, 2, 3]], [[200]], [list(range(40, 60))], [list(range(30))]):
        prompt = torch.tensor(prompt)
        # 40 new tokens run well past the window: the cache must slide exactly as the crop does.
        cached = model.generate(prompt, 40, temperature=0, use_cache=True)
        uncached = model.generate(prompt, 40, temperature=0, use_cache=False)
        assert cached.shape == (1, prompt.shape[1] + 40)
        assert torch.equal(cached, uncached)


def test_the_cache_feeds_one_token_per_step_until_the_window_is_full() -> None:
    model = tiny_model()
    lengths = forward_lengths(model)
    prompt_len, new = 5, 30
    model.generate(torch.arange(prompt_len)[None], new, temperature=0, use_cache=True)
    single_steps = WINDOW - prompt_len  # then every step re-prefills the last WINDOW tokens
    assert lengths == [prompt_len] + [1] * single_steps + [WINDOW] * (new - 1 - single_steps)
    lengths.clear()
    model.generate(torch.arange(prompt_len)[None], new, temperature=0, use_cache=False)
    assert lengths == [min(prompt_len + i, WINDOW) for i in range(new)]


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 2}])
def test_cached_forward_logits_equal_the_full_forward(overrides: dict) -> None:
    model = tiny_model(init_std=0.02, **overrides)  # the training init: logits of order 0.1
    tokens = torch.randint(0, 256, (2, WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)[0]
        cache = KVCache.for_model(model)
        # A prefill, a chunk of several tokens after cached ones (the offset causal mask), then
        # single tokens (RoPE at their own positions, attending to every cached key).
        chunks = [(0, 8), (8, 13), *((t, t + 1) for t in range(13, WINDOW))]
        for start, end in chunks:
            assert cache.length == start
            logits = model(tokens[:, start:end], cache=cache)[0]
            torch.testing.assert_close(logits, full[:, start:end], atol=1e-5, rtol=0)
        assert cache.length == WINDOW
        with pytest.raises(ValueError, match="exceeds max_seq_len"):
            model(tokens[:, :1], cache=cache)


def test_tiny_top_p_and_top_k_of_one_are_greedy() -> None:
    model = tiny_model()
    prompt = torch.tensor([[5, 6, 7]])
    greedy = model.generate(prompt, 20, temperature=0)

    def sampled(**kwargs) -> torch.Tensor:
        return model.generate(prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(0), **kwargs)  # fmt: skip

    # Plain sampling wanders off greedy: the tiny models' logits are far from one-hot.
    assert not torch.equal(sampled(), greedy)
    assert torch.equal(sampled(top_p=1e-6), greedy)
    assert torch.equal(sampled(top_k=1), greedy)


def test_top_p_samples_only_from_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    generator = torch.Generator().manual_seed(0)
    for top_p, nucleus in ((0.4, {0}), (0.75, {0, 1}), (0.9, {0, 1, 2}), (1.0, {0, 1, 2, 3})):
        drawn = sample_next(logits, top_p=top_p, generator=generator)
        assert set(drawn.flatten().tolist()) == nucleus, top_p
    # Within the nucleus the probabilities keep their ratios: 0.5 / (0.5 + 0.3) for token 0.
    share = (sample_next(logits, top_p=0.75, generator=generator) == 0).float().mean().item()
    assert abs(share - 0.625) < 0.03


def test_sampling_with_a_seed_is_reproducible() -> None:
    model = tiny_model(n_kv_heads=2)
    prompt = torch.tensor([[9, 8, 7]])

    def sampled(seed: int, use_cache: bool = True) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 30, temperature=0.9, top_k=100, top_p=0.95,
                              generator=generator, use_cache=use_cache)  # fmt: skip

    torch.manual_seed(123)  # the global RNG must play no part
    a = sampled(7)
    torch.manual_seed(456)
    assert torch.equal(sampled(7), a)
    assert torch.equal(sampled(7, use_cache=False), a)
    assert not torch.equal(sampled(8), a)


def test_a_stop_string_ends_generation_and_is_cut_off() -> None:
    model, tokenizer = tiny_model(), Letters()

    def generate(stop: str | None) -> str:
        return generate_text(model, tokenizer, "abc", 30, temperature=1.0, stop=stop,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip

    whole = generate(None)
    new_text = whole[3:]
    assert len(new_text) == 30
    stop = new_text[12:14]
    cut = new_text.index(stop)
    lengths = forward_lengths(model)
    assert generate(stop) == "abc" + new_text[:cut]
    assert len(lengths) == cut + len(stop)  # no token sampled after the stop string appeared
    assert generate("not there") == whole


def test_generate_command_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "model.safetensors"
    save_model(tiny_model(vocab_size=320), weights)
    args = ["generate", "--checkpoint", str(weights), "--prompt", "hi", "--max-new-tokens", "30"]
    outputs = []
    for extra in ([], ["--no-kv-cache"]):
        assert main([*args, "--temperature", "0", *extra]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("hi")
    stop = next(c for c in outputs[0][2:] if c.isascii() and c.isalnum())  # one from midway
    assert main([*args, "--temperature", "0", "--stop", stop]) == 0
    assert capsys.readouterr().out == outputs[0][: outputs[0].index(stop, 2)] + "\n"
    assert main([*args, "--top-p", "0.5"]) == 0
    capsys.readouterr()

    for top_p in ("0", "1.5", "-0.1", "nan"):
        assert main([*args, "--top-p", top_p]) == 2
        err = capsys.readouterr().err
        assert err == f"fedpt: error: --top-p must be in (0, 1], got {float(top_p)}\n"
    assert main([*args, "--stop", ""]) == 2
    assert capsys.readouterr().err == "fedpt: error: --stop must not be empty\n"
