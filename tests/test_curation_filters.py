"""The curation stage's three document filters: PII placeholders (node/pii.py), heuristic
quality checks (node/quality.py) and MinHash near-duplicates (node/near_dedup.py), each on
documents crafted to be kept or removed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from node.curation_config import NearDedupConfig, PIIConfig, QualityConfig
from node.pii import PLACEHOLDERS, PIIScrubber

needs_datatrove = pytest.mark.skipif(
    importlib.util.find_spec("datatrove") is None, reason="needs the curation extra (datatrove)"
)
ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------- PII


def scrub(text: str, **kinds: bool) -> tuple[str, dict[str, int]]:
    return PIIScrubber(PIIConfig(**kinds)).scrub(text)


PRIVATE_KEY = """-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun
VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK
-----END RSA PRIVATE KEY-----"""
PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo
-----END PUBLIC KEY-----"""

PII_EXAMPLES = [
    ("emails", "bob.smith+news@example.co.uk"),
    ("emails", "alice@mail.example.com"),
    ("phone_numbers", "+44 20 7946 0958"),
    ("phone_numbers", "+1 (555) 123-4567"),
    ("phone_numbers", "+14155552671"),
    ("phone_numbers", "+33 1 23 45 67 89"),
    ("phone_numbers", "(555) 123-4567"),
    ("phone_numbers", "555-123-4567"),
    ("phone_numbers", "555.123.4567"),
    ("phone_numbers", "1-800-555-0199"),
    ("ip_addresses", "8.8.8.8"),
    ("ip_addresses", "2606:4700:4700::1111"),
    ("credit_cards", "4111 1111 1111 1111"),
    ("credit_cards", "4111-1111-1111-1111"),
    ("credit_cards", "5500000000000004"),
    ("credit_cards", "3782 822463 10005"),  # Amex, 4-6-5
    ("api_keys", "AKIAIOSFODNN7EXAMPLE"),
    ("api_keys", "ASIAY34FZKBOKMUTVV7A"),
    ("api_keys", "ghp_" + "a1B2c3D4e5" * 3 + "f6G7h8"),
    ("api_keys", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGH"),
    ("api_keys", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("api_keys", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("api_keys", "rk_live_51H8abcdefGHIJKLmnop"),
    ("api_keys", "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"),
    ("api_keys", "sk-proj-abcdefghij1234567890XYZabc"),
    ("api_keys", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("private_keys", PRIVATE_KEY),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "value"), PII_EXAMPLES)
def test_each_pii_kind_is_replaced_by_its_placeholder_and_counted(kind: str, value: str) -> None:
    text, counts = scrub(f"Reach the owner at {value}, they said.\n")
    assert text == f"Reach the owner at {PLACEHOLDERS[kind]}, they said.\n"
    assert counts == {**dict.fromkeys(PLACEHOLDERS, 0), kind: 1}


LOOK_ALIKES = [
    "a 16-digit number that fails the Luhn check: 4111111111111112",
    "a date 2024-01-05, another 2024.01.05 and 05/01/2024, at 12:30:45",
    "a five-part version 1.2.3.4.5, a build 10.0.19041.1 and v1.2.3.4",
    "x = 9223372036854775807; mask = 18446744073709551615; t_ms = 1704412800000",
    "pi = 3.14159265358979323846; n = 12345678901234567890123",
    # Pass the Luhn check, but no card number starts with 1 or 9.
    "ids 1000000000000008 and 9007199254740990 in code",
    "ISBN 978-3-16-148410-0 and a zip code 90210-1234",
    "pip install 'requests@2.31.0' and ssh git@localhost",
    "C++ std::vector, a slice x[::2], a MAC 00:1A:2B:3C:4D:5E",
    "private and documentation addresses 192.168.1.1, 10.0.0.7, 127.0.0.1, 2001:db8::1, fe80::1",
    "a kebab-case slug sk-learn-is-not-a-key-at-all and task-runner-config",
    PUBLIC_KEY,
]


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_are_kept(text: str) -> None:
    scrubbed, counts = scrub(text)
    assert scrubbed == text
    assert sum(counts.values()) == 0


def test_a_bare_dotted_quad_is_an_ip_address_whatever_it_meant() -> None:
    # Decision: "1.2.3.4" after "version" is indistinguishable from an address; only a letter
    # right before it (v1.2.3.4) or a fifth part marks it as a version.
    assert scrub("version 1.2.3.4 or v1.2.3.4")[0] == "version <IP_ADDRESS> or v1.2.3.4"


def test_unterminated_private_key_is_replaced_to_the_end_of_the_text() -> None:
    head = "config:\n"
    text = head + "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\nmore key"
    assert scrub(text) == (head + "<PRIVATE_KEY>", {**dict.fromkeys(PLACEHOLDERS, 0),
                                                     "private_keys": 1})  # fmt: skip


def test_private_key_block_is_replaced_whole_before_other_kinds_look_inside() -> None:
    # Order: a key block's body that looks like an e-mail or a card is not counted as one.
    block = PRIVATE_KEY.replace("VTLw7o", "bob@example.com 4111111111111111 VTLw7o")
    text, counts = scrub(f"{block}\nafter")
    assert text == "<PRIVATE_KEY>\nafter"
    assert counts["private_keys"] == 1 and counts["emails"] == counts["credit_cards"] == 0


def test_a_disabled_kind_is_left_alone_and_not_counted() -> None:
    text, counts = scrub("mail bob@example.com from 8.8.8.8", emails=False)
    assert text == "mail bob@example.com from <IP_ADDRESS>"
    assert "emails" not in counts and counts["ip_addresses"] == 1


def test_pii_disabled_returns_the_text_unchanged() -> None:
    text = "mail bob@example.com, card 4111 1111 1111 1111"
    assert scrub(text, enabled=False) == (text, {})


# ----------------------------------------------------------------------------------- quality

PROSE = """The old lighthouse stood at the edge of the harbour for more than a century, and the people of the town still speak of it with affection. Its keeper climbed the narrow stairs every evening to light the lamp, even during the worst winter storms.
When the council decided to replace it with an automatic beacon, many residents objected. They argued that the building was part of the history of the coast and that visitors came from far away to see it.
After a long debate, the council agreed to keep the tower as a museum. Today, children walk through the rooms where the keeper once lived, and they learn how ships found their way home before satellites and radio.
A small library on the ground floor holds letters, logbooks and photographs. Volunteers with a passion for local history have spent years sorting them, so that anyone who visits can read the stories of the sailors who passed this way."""
SENTENCES = PROSE.replace(". ", ".\n").splitlines()  # 8 lines, each one sentence
PROSE_WORDS = PROSE.split()


def pseudo_words(seed: int, n: int, shortest: int, longest: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(shortest, longest)))
            for _ in range(n)]  # fmt: skip


def as_sentences(words: list[str], per: int = 12) -> str:
    chunks = (words[i : i + per] for i in range(0, len(words), per))
    return " ".join(" ".join(chunk).capitalize() + "." for chunk in chunks)


def inserted_every(every: int, phrase: str) -> str:
    """PROSE with `phrase` after every `every`-th word (lines kept, never at the very end)."""
    words = PROSE.split(" ")
    for at in range(len(words) - len(words) % every - 1, 0, -every):
        words.insert(at, phrase)
    return " ".join(words)


def repeated_passages(span: int) -> str:
    """200 words of sentences, then their words again in passages of `span` words, each
    followed by a new word: every n-gram of up to `span` words repeats once, no longer one."""
    words = pseudo_words(6, 200, 3, 8)
    words[1::10] = ["the"] * 20  # lower case: datatrove's stop words are
    words[2::10] = ["of"] * 20
    fresh = iter(pseudo_words(7, 200, 9, 9))
    copy = [w for i in range(0, 200, span) for w in (*words[i : i + span], next(fresh))]
    return as_sentences(words) + "\n" + " ".join(copy) + "."


CRAFTED = {
    "word_count": SENTENCES[0] + " " + SENTENCES[1],  # 44 words
    "mean_word_length": as_sentences(["it", "the", "to", *pseudo_words(1, 80, 1, 2)]),
    "symbol_ratio": PROSE + "\n" + " ".join("#" + w for w in pseudo_words(2, 30, 4, 8)) + ".",
    "bullet_lines": "\n".join("- " + line for line in SENTENCES),
    "ellipsis_lines": "\n".join(line[:-1] + "..." if i % 2 else line
                                for i, line in enumerate(SENTENCES)),
    "alpha_words": " ".join(f"{w} {10 + i % 90}" for i, w in enumerate(PROSE.split(" "))),
    "stop_words": as_sentences(pseudo_words(3, 120, 4, 8)),
    "digit_ratio": PROSE + "\n" + " ".join(f"id{n}" for n in
                                           random.Random(4).sample(range(10**6, 10**7), 80)) + ".",
    "duplicate_lines": "\n".join([*SENTENCES, *["Click here to subscribe."] * 6]),
    # Lines that each appear twice and hold over 20% of the characters, but few lines.
    "duplicate_line_chars": PROSE + ("\n" + SENTENCES[7] + " " + SENTENCES[1] + " "
                                     + SENTENCES[4]) * 2,
    # A 2-gram over 20% of the characters; the 3-grams around it all differ.
    "top_2gram": inserted_every(4, "new york"),
    # A 3-gram over 18% of the characters, while its 2-grams stay under 20%.
    "top_3gram": inserted_every(16, "magnificent and extraordinary"),
    # A 4-gram over 16% of the characters, while its 3-grams stay under 18%.
    "top_4gram": inserted_every(20, "magnificent to be extraordinary"),
    "duplicate_5gram": repeated_passages(9),
    "duplicate_10gram": repeated_passages(19),
    "line_punctuation": "\n".join(line.rstrip(".") for line in SENTENCES),
}  # fmt: skip
# The check each crafted document is removed by, and the setting that, relaxed, keeps it.
RELAXED = {
    "word_count": {"min_words": 0},
    "mean_word_length": {"min_mean_word_length": 0.0},
    "symbol_ratio": {"max_symbol_word_ratio": 1.0},
    "bullet_lines": {"max_bullet_lines_ratio": 1.0},
    "ellipsis_lines": {"max_ellipsis_lines_ratio": 1.0},
    "alpha_words": {"min_alpha_words_ratio": 0.0},
    "stop_words": {"min_stop_words": 0},
    "digit_ratio": {"max_digit_ratio": 1.0},
    "duplicate_lines": {"max_duplicate_line_fraction": 1.0},
    # A line repeated whole repeats its 5- and 10-grams too.
    "duplicate_line_chars": {
        "max_duplicate_line_char_fraction": 1.0,
        "max_duplicate_5gram_fraction": 1.0,
        "max_duplicate_10gram_fraction": 1.0,
    },
    "top_2gram": {"max_top_2gram_fraction": 1.0},
    "top_3gram": {"max_top_3gram_fraction": 1.0},
    "top_4gram": {"max_top_4gram_fraction": 1.0},
    "duplicate_5gram": {"max_duplicate_5gram_fraction": 1.0},
    "duplicate_10gram": {"max_duplicate_10gram_fraction": 1.0},
    "line_punctuation": {"min_lines_ending_punctuation": 0.0},
}
# A repeated 10-gram repeats its 5-grams too: the 10-gram check is reached with those allowed.
BASE = {"duplicate_10gram": {"max_duplicate_5gram_fraction": 1.0}}


def quality_reason(text: str, **settings) -> str | None:
    from node.quality import QualityFilter

    return QualityFilter(QualityConfig(**settings)).reason(text)


@needs_datatrove
def test_good_prose_passes_every_check() -> None:
    assert 140 <= len(PROSE_WORDS) <= 170
    assert quality_reason(PROSE) is None


@needs_datatrove
def test_every_reason_has_a_crafted_document() -> None:
    from node.quality import QUALITY_REASONS

    assert list(CRAFTED) == list(RELAXED) == list(QUALITY_REASONS)


@needs_datatrove
@pytest.mark.parametrize("reason", list(CRAFTED))
def test_each_check_removes_the_document_crafted_for_it(reason: str) -> None:
    assert quality_reason(CRAFTED[reason], **BASE.get(reason, {})) == reason


@needs_datatrove
@pytest.mark.parametrize("reason", list(CRAFTED))
def test_relaxing_that_one_threshold_keeps_the_document(reason: str) -> None:
    settings = {**BASE.get(reason, {}), **RELAXED[reason]}
    assert quality_reason(CRAFTED[reason], **settings) is None


@needs_datatrove
def test_long_words_fail_the_mean_word_length_maximum() -> None:
    text = as_sentences(["it", "the", "of", *pseudo_words(5, 80, 11, 16)])
    assert quality_reason(text) == "mean_word_length"
    assert quality_reason(text, max_mean_word_length=20.0) is None


@needs_datatrove
def test_thresholds_are_read_from_the_config() -> None:
    assert quality_reason(PROSE, min_words=200) == "word_count"
    assert quality_reason(PROSE, max_words=100) == "word_count"
    assert quality_reason(PROSE, min_stop_words=9) == "stop_words"  # only 8 stop words exist
    assert quality_reason(PROSE, min_lines_ending_punctuation=1.0) is None  # all 4 lines do
    assert quality_reason(PROSE + "\nFollow us", min_lines_ending_punctuation=0.9) == (
        "line_punctuation"
    )


@needs_datatrove
def test_a_zero_maximum_allows_none() -> None:
    # datatrove skips a check whose limit is falsy; a maximum of 0 must still be one.
    assert quality_reason(PROSE + " In 1890 it was built.", max_digit_ratio=0.0) == "digit_ratio"
    assert quality_reason(PROSE + " #harbour", max_symbol_word_ratio=0.0) == "symbol_ratio"
    assert quality_reason("- " + PROSE, max_bullet_lines_ratio=0.0) == "bullet_lines"


@needs_datatrove
def test_windows_line_ends_still_end_sentences() -> None:
    assert quality_reason(PROSE.replace("\n", "\r\n"), min_lines_ending_punctuation=1.0) is None


@needs_datatrove
def test_a_document_without_words() -> None:
    assert quality_reason("... --- !!!") == "word_count"
    assert quality_reason("", min_words=0) is None


def test_quality_disabled_keeps_everything() -> None:
    from node.quality import QualityFilter

    keep_all = QualityFilter(QualityConfig(enabled=False))
    assert all(keep_all.reason(text) is None for text in [*CRAFTED.values(), ""])


def test_missing_curation_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from node.quality import CurationUnavailable, QualityFilter

    monkeypatch.setitem(sys.modules, "datatrove", None)  # import datatrove -> ImportError
    with pytest.raises(CurationUnavailable, match=r"pip install 'fedpt\[curation\]'"):
        QualityFilter(QualityConfig())


@needs_datatrove
def test_word_tokenizer_splits_words_from_punctuation_runs() -> None:
    from node.quality import regex_word_tokenizer

    tokenizer = regex_word_tokenizer()
    text = "Don't stop... #1 e-mail: 3.14, U.S. now! Next line\nhere"
    assert tokenizer.word_tokenize(text) == [
        "Don't", "stop", "...", "#", "1", "e-mail", ":", "3.14", ",", "U.S", ".", "now", "!",
        "Next", "line", "here",
    ]  # fmt: skip
    assert tokenizer.sent_tokenize(text) == [
        "Don't stop...", "#1 e-mail: 3.14, U.S.", "now!", "Next line", "here",
    ]  # fmt: skip
    assert [text[a:b] for a, b in tokenizer.span_tokenize(text)] == tokenizer.sent_tokenize(text)


# ------------------------------------------------------------------------------ near dedup


def near_duplicates(**settings):
    from node.near_dedup import NearDuplicates

    return NearDuplicates(NearDedupConfig(**settings))


VOCABULARY = pseudo_words(7, 3000, 3, 9)


def variant(rng: random.Random, words: list[str]) -> list[str]:
    """A copy with one passage of 3-5% of its words replaced, inserted or deleted (an edited
    sentence): scattered single-word edits at that rate leave a Jaccard similarity of 5-word
    shingles near 0.7, below any sensible near-duplicate threshold."""
    words = list(words)
    size = rng.randint(round(0.03 * len(words)), round(0.05 * len(words)))
    at = rng.randrange(len(words) - size)
    new = [rng.choice(VOCABULARY) for _ in range(size)]
    match rng.choice(("replace", "insert", "delete")):
        case "replace":
            words[at : at + size] = new
        case "insert":
            words[at:at] = new
        case "delete":
            del words[at : at + size]
    return words


def generated_corpus(seed: int = 11) -> list[tuple[int, str]]:
    """40 families of one 300-word original and 3 variants, shuffled: (family, text)."""
    rng = random.Random(seed)
    corpus = []
    for family in range(40):
        original = [rng.choice(VOCABULARY) for _ in range(300)]
        corpus.append((family, as_sentences(original)))
        corpus += [(family, as_sentences(variant(rng, original))) for _ in range(3)]
    rng.shuffle(corpus)
    return corpus


@needs_datatrove
def test_near_duplicate_recall_and_precision_on_generated_variants() -> None:
    corpus = generated_corpus()
    index = near_duplicates()
    found = 0
    for doc_id, (family, text) in enumerate(corpus):
        kept = index.check(doc_id, text)
        if kept is not None:
            assert corpus[kept][0] == family, "two distinct originals were flagged as duplicates"
            found += 1
    # Each family's first document is kept; the 3 others (the original when a variant came
    # first) should be found as duplicates of a family member.
    assert found >= 0.9 * 40 * 3


@needs_datatrove
def test_a_shared_band_below_the_threshold_is_not_a_duplicate() -> None:
    rng = random.Random(5)
    shared = [rng.choice(VOCABULARY) for _ in range(150)]
    first = as_sentences(shared + [rng.choice(VOCABULARY) for _ in range(150)])
    second = as_sentences(shared + [rng.choice(VOCABULARY) for _ in range(150)])  # Jaccard ~1/3
    # One hash per band: some band surely collides, so only the similarity check can say no.
    strict = near_duplicates(bands=112, rows_per_band=1, threshold=0.8)
    assert strict.check(0, first) is None and strict.check(1, second) is None
    loose = near_duplicates(bands=112, rows_per_band=1, threshold=0.2)
    assert loose.check(0, first) is None and loose.check(1, second) == 0


@needs_datatrove
def test_short_documents_are_one_shingle_of_their_normalised_text() -> None:
    index = near_duplicates()
    assert index.check(0, "Hello, World!") is None
    assert index.check(1, "hello   world") == 0  # same words once normalised
    assert index.check(2, "hello there") is None
    assert index.check(3, "") is None and index.check(4, " ... ") == 3


@needs_datatrove
def test_clusters_map_each_kept_document_to_its_dropped_duplicates() -> None:
    a, b = (as_sentences(random.Random(seed).choices(VOCABULARY, k=200)) for seed in (1, 2))
    index = near_duplicates()
    decisions = [index.check(i, text) for i, text in enumerate([a, b, a + " Extra.", a, b])]
    assert decisions == [None, None, 0, 0, 1]
    assert index.clusters() == {0: [2, 3], 1: [4]}


DECISIONS_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from tests.test_curation_filters import generated_corpus, near_duplicates
index = near_duplicates()
decisions = [index.check(i, text) for i, (_, text) in enumerate(generated_corpus())]
signature = index.signature(generated_corpus()[0][1])[:4].tolist()
print(json.dumps([decisions, signature]))
"""


@needs_datatrove
def test_decisions_do_not_depend_on_the_instance_or_python_hash_seed() -> None:
    corpus = generated_corpus()
    runs = []
    for _ in range(2):
        index = near_duplicates()
        runs.append([index.check(i, text) for i, (_, text) in enumerate(corpus)])
    assert runs[0] == runs[1]
    signature = near_duplicates().signature(corpus[0][1])[:4].tolist()
    for seed in ("0", "4242"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", DECISIONS_SCRIPT, str(ROOT)], env=env,
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert json.loads(out) == [runs[0], signature]


@needs_datatrove
def test_signature_values_are_pinned() -> None:
    # Pins the shingling, hashing and seeding: a change here changes what every node keeps,
    # and so must come with a new CURATION_CODE_VERSION.
    signature = near_duplicates().signature(PROSE)
    assert signature.shape == (14 * 8,) and str(signature.dtype) == "uint32"
    assert signature[:6].tolist() == SIGNATURE_PREFIX


SIGNATURE_PREFIX = [12607687, 22139100, 849532, 12172942, 1961817, 24703214]


def test_near_dedup_disabled_keeps_everything() -> None:
    from node.near_dedup import NearDuplicates

    index = NearDuplicates(dataclasses.replace(NearDedupConfig(), enabled=False))
    assert [index.check(i, "the same text") for i in range(3)] == [None, None, None]
    assert index.clusters() == {}
