"""Data curation: how fast it runs, and what it does for a federation trained on dirty data.

Throughput: the curation stage (node/curation.py) over every document of the built-in corpus,
in memory (read once before the clock starts), MB/s of input text: each stage alone (PII
scrubbing, the quality filters, near-duplicate detection) and the whole stage, with
BENCH_CONFIG. Medians of --repeats; the share of the clean corpus each keeps is printed too.

Effect: each of the first --nodes built-in organisations, dirtied: --junk junk documents per
clean one (character soup, link spam repeated line after line, digit tables, one word
repeated) and --dups near-duplicates per clean one (variants of training-split documents, so
none leaks a validation document, with one passage of ~4% of their words rewritten and a new
first line), written as a folder of text
files per organisation. Two `fedpt simulate` runs with the same rounds, inner steps and batch
(so the same tokens): one with `--curation` (BENCH_CONFIG), one without. Scored on the
organisations' CLEAN validation splits (the built-in corpus's per-document hash split, never
trained on): held-out loss, perplexity and bits per byte of each run's last global model.

    python -m bench.curation [--nodes 3] [--rounds 12] [--inner-steps 10] [--junk 0.5] [--dups 1]
"""

from __future__ import annotations

import argparse
import math
import random
import tempfile
import time
from pathlib import Path

from bench.common import median, node_round_records, print_table, run_fedpt
from bench.convergence import Contender, federated_model, held_out_sets, score
from node.corpus import IngestReport, iter_documents, resolve_files
from node.curation import CurationReport, curate
from node.curation_config import CurationConfig, NearDedupConfig, PIIConfig, QualityConfig
from node.shards import split_key

# The built-in corpus is Python code and its documentation, not web prose: the checks that
# assume English sentences (stop words, lines ending in punctuation, alphabetic words) are
# relaxed; those that catch junk (length, word length, symbols, digits, repetition) are not.
BENCH_QUALITY = QualityConfig(min_words=20, min_stop_words=0, min_alpha_words_ratio=0.4,
                              max_symbol_word_ratio=0.5, min_lines_ending_punctuation=0.0,
                              max_bullet_lines_ratio=1.0, max_ellipsis_lines_ratio=1.0,
                              max_duplicate_line_fraction=0.5, max_duplicate_line_char_fraction=0.5,
                              max_top_2gram_fraction=0.3, max_top_3gram_fraction=0.3,
                              max_top_4gram_fraction=0.3, max_duplicate_5gram_fraction=0.6,
                              max_duplicate_10gram_fraction=0.5)  # fmt: skip
BENCH_CONFIG = CurationConfig(quality=BENCH_QUALITY)
BENCH_TOML = """[curation]
exact_dedup = true
[curation.quality]
{quality}
"""
VAL_FRACTION = 0.05  # node/shards.py's default split


def clean_documents(orgs: list[str]) -> dict[str, list[str]]:
    out = {}
    for org in orgs:
        report = IngestReport()
        out[org] = list(iter_documents(resolve_files(f"builtin:{org}", report), report))
    return out


# ---- throughput -------------------------------------------------------------------------------
def stage_configs() -> dict[str, CurationConfig]:
    off = {"exact_dedup": False, "pii": PIIConfig(enabled=False),
           "quality": QualityConfig(enabled=False), "near_dedup": NearDedupConfig(enabled=False)}  # fmt: skip
    return {
        "PII scrubbing": CurationConfig(**{**off, "pii": PIIConfig()}),
        "quality filters": CurationConfig(**{**off, "quality": BENCH_QUALITY}),
        "near-duplicates": CurationConfig(**{**off, "near_dedup": NearDedupConfig()}),
        "whole stage": BENCH_CONFIG,
    }


def throughput(documents: list[str], repeats: int) -> list[list[object]]:
    megabytes = sum(len(d.encode("utf-8")) for d in documents) / 1e6
    rows = []
    for name, config in stage_configs().items():
        rates, kept = [], 0
        for _ in range(repeats):
            report = CurationReport()
            start = time.perf_counter()
            kept = sum(1 for _ in curate(documents, config, report))
            rates.append(megabytes / (time.perf_counter() - start))
        rows.append([name, median(rates), min(rates), max(rates),
                     f"{kept / len(documents):.1%}"])  # fmt: skip
    return rows


# ---- dirty data -------------------------------------------------------------------------------
def junk(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:  # character soup
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz{}[]#$%&*@!~ \n") for _ in range(3000))
    if kind == 1:  # link spam, the same lines again and again
        line = rng.choice(["CLICK HERE to win a FREE prize!!! http://spam.example/win",
                           "Buy cheap watches now >>> best price guaranteed <<<"])  # fmt: skip
        return "\n".join([line] * rng.randrange(40, 120))
    if kind == 2:  # digit tables
        return "\n".join(" ".join(str(rng.randrange(10**6)) for _ in range(12)) for _ in range(80))
    word = rng.choice(["lorem", "data", "function", "the"])  # one word, repeated
    return " ".join([word] * rng.randrange(300, 1500))


def variant(text: str, rng: random.Random, edit: float = 0.04) -> str:
    """`text` as a near-duplicate: one passage of about `edit` of its words rewritten (an edited
    paragraph, another date or name: how copies of a page differ), and a new first line."""
    words = text.split(" ")
    span = max(1, round(edit * len(words)))
    start = rng.randrange(max(1, len(words) - span))
    words[start : start + span] = [
        rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(span)
    ]
    return f"mirror {rng.randrange(10**6)}\n" + " ".join(words)


def dirty_corpus(clean: dict[str, list[str]], root: Path, junk_per_doc: float, dups_per_doc: float,
                 seed: int) -> dict[str, int]:  # fmt: skip
    """A folder of .txt files per organisation: its clean documents, junk, near-duplicates of
    its training-split documents. Returns the documents written per organisation."""
    rng = random.Random(seed)
    written = {}
    for org, docs in clean.items():
        folder = root / org
        folder.mkdir(parents=True)
        train = [d for d in docs if split_key(d) >= VAL_FRACTION]
        extra = [junk(rng) for _ in range(round(junk_per_doc * len(docs)))]
        extra += [variant(rng.choice(train), rng) for _ in range(round(dups_per_doc * len(docs)))]
        everything = docs + extra
        rng.shuffle(everything)
        for i, text in enumerate(everything):
            (folder / f"{i:06d}.txt").write_text(text, "utf-8")
        written[org] = len(everything)
    return written


def bench_toml(path: Path) -> Path:
    lines = [f"{k} = {v}" for k, v in vars(BENCH_QUALITY).items() if k != "enabled"]
    path.write_text(BENCH_TOML.format(quality="\n".join(lines)))
    return path


def effect(args: argparse.Namespace, clean: dict[str, list[str]], work: Path) -> None:
    written = dirty_corpus(clean, work / "dirty", args.junk, args.dups, args.seed)
    print(
        f"dirty corpus: {', '.join(f'{o} {n} documents ({len(clean[o])} clean)' for o, n in written.items())}"
    )
    cache = work / "cache"
    config = bench_toml(work / "curation.toml")
    data = ",".join(str(work / "dirty" / org) for org in clean)
    contenders = []
    for name, extra in (("curation off", []), ("curation on", ["--curation", str(config)])):
        run = work / name.replace(" ", "-")
        sim = ["simulate", "--nodes", str(len(clean)), "--data", data, "--rounds", str(args.rounds),
               "--inner-steps", str(args.inner_steps), "--seed", str(args.seed), "--no-alone",
               "--personalise-steps", "0", "--out", str(run), *extra]  # fmt: skip
        seconds = run_fedpt(sim, work / f"{run.name}.log", cache=cache, timeout=args.timeout)
        model, _, _, version, committed = federated_model(run)
        tokens = sum(r["tokens"] for records in node_round_records(run).values() for r in records
                     if r.get("pushed"))  # fmt: skip
        contenders.append(Contender(name, "dirty corpus", tokens, seconds, model))
        print(f"{name}: {committed} rounds committed (version {version}), {tokens:,} tokens "
              f"trained, {seconds:.0f} s")  # fmt: skip
    val = held_out_sets(list(clean), cache)
    rows = []
    for contender in contenders:
        score(contender, val, args.eval_batches, args.eval_batch_size)
        mean = sum(contender.losses.values()) / len(contender.losses)
        rows.append([contender.name, *(f"{math.exp(contender.losses[o]):.3f}" for o in clean),
                     f"{math.exp(mean):.3f}", contender.mean_bpb(list(clean))])  # fmt: skip
    print_table(["run", *(f"ppl {o}" for o in clean), "ppl mean", "bits/byte"], rows)
    off, on = (sum(c.losses.values()) / len(c.losses) for c in contenders)
    print(
        f"held-out perplexity, curation on / off: {math.exp(on) / math.exp(off):.3f} (same tokens)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--inner-steps", type=int, default=10)
    parser.add_argument("--junk", type=float, default=0.5, help="junk documents per clean one")
    parser.add_argument("--dups", type=float, default=1.0, help="near-duplicates per clean one")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--no-effect", action="store_true", help="throughput only")
    parser.add_argument("--out", type=Path, help="keep the corpora and runs here")
    args = parser.parse_args()

    from bench.convergence import federation_orgs

    orgs = federation_orgs(args.nodes)
    clean = clean_documents(orgs)
    everything = [d for docs in clean.values() for d in docs]
    megabytes = sum(len(d.encode("utf-8")) for d in everything) / 1e6
    print(f"throughput over the built-in {', '.join(orgs)}: {len(everything)} documents, "
          f"{megabytes:.1f} MB, {args.repeats} repetitions")  # fmt: skip
    print_table(["stage", "median MB/s", "min MB/s", "max MB/s", "clean docs kept"],
                throughput(everything, args.repeats))  # fmt: skip
    if args.no_effect:
        return
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=False)
        effect(args, clean, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        effect(args, clean, Path(tmp))


if __name__ == "__main__":
    main()
