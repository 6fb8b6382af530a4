"""Generation with the KV cache vs without: tokens/s over the same model, prompt and length.

Without the cache every new token re-runs the model over the whole context; with it the prompt
is run once (prefill) and each step runs one token against the cached keys and values. Both
paths decode greedily from the same seeded random prompt, and the tokens they produce are
compared. Repetitions alternate between the two so machine noise hits both alike; medians are
quoted. Past the model's max_seq_len both paths re-run a full window per token (sliding window).

    python -m bench.generate [--preset tiny] [--prompt-tokens 64] [--new-tokens 128] [--repeats 5]
    python -m bench.generate --checkpoint runs/web/model.safetensors
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import median, print_table
from model.config import preset
from model.gpt import GPT
from model.io import load_model


def generate_seconds(
    model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool
) -> tuple[float, torch.Tensor]:
    """Wall seconds of one greedy generation, and the tokens it produced."""
    start = time.perf_counter()
    out = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    if out.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="tiny", help="model preset, randomly initialised")
    parser.add_argument("--checkpoint", help="a weights file to load instead of a preset")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the prompt")
    args = parser.parse_args()
    if min(args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        parser.error("--prompt-tokens, --new-tokens and --repeats must be positive")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    if args.checkpoint:
        model, tokenizer_spec = load_model(args.checkpoint, device)
        name, cfg = args.checkpoint, model.config
        vocab = min(tokenizer_spec.get("vocab_size", cfg.vocab_size), cfg.vocab_size)
    else:
        model = GPT(preset(args.preset)).to(device).eval()
        name, cfg = args.preset, model.config
        vocab = cfg.vocab_size
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, vocab, (1, args.prompt_tokens), generator=generator).to(device)

    # Warm-up: allocator, thread pools, first-touch pages; also the tokens both paths produce.
    _, uncached_tokens = generate_seconds(model, prompt, args.new_tokens, use_cache=False)
    _, cached_tokens = generate_seconds(model, prompt, args.new_tokens, use_cache=True)
    uncached_rates, cached_rates = [], []
    for _ in range(args.repeats):
        seconds, _ = generate_seconds(model, prompt, args.new_tokens, use_cache=False)
        uncached_rates.append(args.new_tokens / seconds)
        seconds, _ = generate_seconds(model, prompt, args.new_tokens, use_cache=True)
        cached_rates.append(args.new_tokens / seconds)

    ratios = [c / u for c, u in zip(cached_rates, uncached_rates, strict=True)]
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else device.type
    total = args.prompt_tokens + args.new_tokens
    window = "" if total <= cfg.max_seq_len else f" (past max_seq_len {cfg.max_seq_len})"
    print(f"model {name} ({cfg.num_params() / 1e6:.2f}M params), prompt {args.prompt_tokens} + {args.new_tokens} new tokens{window}, "
          f"greedy, {threads}, {args.repeats} alternating repetitions")  # fmt: skip
    print_table(
        ["path", "median tok/s", "min tok/s", "max tok/s"],
        [
            ["no cache", median(uncached_rates), min(uncached_rates), max(uncached_rates)],
            ["KV cache", median(cached_rates), min(cached_rates), max(cached_rates)],
        ],
    )
    print(f"speed-up KV cache / no cache: median {median(ratios):.2f}x (pairwise), "
          f"{median(cached_rates) / median(uncached_rates):.2f}x (of medians)")  # fmt: skip
    if torch.equal(cached_tokens, uncached_tokens):
        print(f"tokens: identical in both paths ({args.new_tokens} greedy tokens)")
    else:
        differ = (cached_tokens != uncached_tokens)[0].nonzero()[0].item() - args.prompt_tokens
        print(f"tokens: DIFFER between the paths from new token {differ} on")


if __name__ == "__main__":
    main()
