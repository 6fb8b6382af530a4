"""Heuristic quality filters of large web corpora, one document at a time.

datatrove's filters do the work, called directly (no pipeline executor): GopherQualityFilter
(word count, mean word length, '#' and ellipsis per word, bullet and ellipsis lines, words
with a letter, stop words), GopherRepetitionFilter (duplicate lines and their characters, the
most frequent 2/3/4-grams, characters in repeated 5- and 10-grams) and FineWebQualityFilter
(the share of lines that end a sentence). The digit ratio is ours: datatrove has none.

datatrove's English word tokenizer needs spaCy, which fedpt does not install: the filters get
`regex_word_tokenizer()`, a regex that splits like spaCy does on ordinary text (words, with
runs of punctuation as tokens of their own), so that the thresholds tuned on FineWeb mean the
same here. The same instance also serves the MinHash shingles (node/near_dedup.py).
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

from node.curation_config import QualityConfig

if TYPE_CHECKING:
    from datatrove.utils.word_tokenizers import WordTokenizer

# Every reason `QualityFilter.reason` can give, in the order the checks run.
QUALITY_REASONS: tuple[str, ...] = (
    "word_count", "mean_word_length", "symbol_ratio", "bullet_lines", "ellipsis_lines",
    "alpha_words", "stop_words", "digit_ratio", "duplicate_lines", "duplicate_line_chars",
    "top_2gram", "top_3gram", "top_4gram", "duplicate_5gram", "duplicate_10gram",
    "line_punctuation",
)  # fmt: skip

# datatrove's reasons, by the config threshold each one tests.
_DATATROVE_REASONS = {
    "gopher_short_doc": "word_count", "gopher_long_doc": "word_count",
    "gopher_below_avg_threshold": "mean_word_length",
    "gopher_above_avg_threshold": "mean_word_length",
    "gopher_too_many_hashes": "symbol_ratio", "gopher_too_many_ellipsis": "symbol_ratio",
    "gopher_too_many_bullets": "bullet_lines", "gopher_too_many_end_ellipsis": "ellipsis_lines",
    "gopher_below_alpha_threshold": "alpha_words", "gopher_enough_stop_words": "stop_words",
    "dup_line_frac": "duplicate_lines", "dup_line_char_frac": "duplicate_line_chars",
    "top_2_gram": "top_2gram", "top_3_gram": "top_3gram", "top_4_gram": "top_4gram",
    "duplicated_5_n_grams": "duplicate_5gram", "duplicated_10_n_grams": "duplicate_10gram",
    "line_punct_ratio": "line_punctuation",
}  # fmt: skip

# A word, with inner apostrophes, hyphens and dots (don't, e-mail, 3.14, U.S), or a run of
# other non-space characters ("...", "#", "--"). Linear: no nested choices.
_WORD = re.compile(r"\w+(?:['’.\-]\w+)*|[^\w\s]+")
# A sentence: up to terminal punctuation (and closing quotes) before a space, or a line end.
_SENTENCE = re.compile(r"\S[^\n]*?(?:[.!?…]+[\"'”’)\]]*(?=\s|$)|$)", re.M)
_NON_DIGITS = re.compile(r"\D+")
_TINY = 1e-12  # stands for a maximum of 0 (see _strict_max)


class CurationUnavailable(RuntimeError):
    """The optional `curation` extra (datatrove) is not installed."""

    def __init__(self) -> None:
        super().__init__("data curation needs the curation extra: pip install 'fedpt[curation]'")


def require_datatrove() -> None:
    try:
        import datatrove  # noqa: F401
    except ImportError as e:
        raise CurationUnavailable() from e


@functools.cache
def regex_word_tokenizer() -> WordTokenizer:
    """One shared instance: datatrove caches tokenizers and recent splits by instance."""
    require_datatrove()
    from datatrove.utils.word_tokenizers import WordTokenizer

    class RegexWordTokenizer(WordTokenizer):
        """Deterministic, dependency-free English-style tokenization."""

        def __init__(self) -> None:
            super().__init__("en")

        def word_tokenize(self, text: str) -> list[str]:
            return _WORD.findall(text)

        def sent_tokenize(self, text: str) -> list[str]:
            return _SENTENCE.findall(text)

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            return [m.span() for m in _SENTENCE.finditer(text)]

    return RegexWordTokenizer()


def _strict_max(value: float) -> float:
    """datatrove skips a check whose maximum is 0 (falsy); a maximum of 0 here allows none."""
    return value if value > 0 else _TINY


class QualityFilter:
    def __init__(self, config: QualityConfig) -> None:
        self.config = c = config
        if not config.enabled:
            return
        require_datatrove()
        from datatrove.data import Document
        from datatrove.pipeline.filters import (
            FineWebQualityFilter,
            GopherQualityFilter,
            GopherRepetitionFilter,
        )
        from datatrove.utils.text import PUNCTUATION_SET, split_into_words

        self._document, self._split_into_words = Document, split_into_words
        self._punctuation = PUNCTUATION_SET
        self._tokenizer = tok = regex_word_tokenizer()
        # Minimums of 0 are falsy to datatrove too: those checks are skipped, as meant.
        self._gopher = GopherQualityFilter(
            min_doc_words=c.min_words,
            max_doc_words=_strict_max(c.max_words),
            min_avg_word_length=c.min_mean_word_length,
            max_avg_word_length=_strict_max(c.max_mean_word_length),
            max_symbol_word_ratio=_strict_max(c.max_symbol_word_ratio),
            max_bullet_lines_ratio=_strict_max(c.max_bullet_lines_ratio),
            max_ellipsis_lines_ratio=_strict_max(c.max_ellipsis_lines_ratio),
            max_non_alpha_words_ratio=c.min_alpha_words_ratio,  # datatrove's name, a minimum
            min_stop_words=c.min_stop_words,
            language=tok,
        )
        self._repetition = GopherRepetitionFilter(
            dup_line_frac=_strict_max(c.max_duplicate_line_fraction),
            dup_para_frac=None,  # paragraphs: not in the configuration
            dup_line_char_frac=_strict_max(c.max_duplicate_line_char_fraction),
            dup_para_char_frac=None,
            top_n_grams=((2, c.max_top_2gram_fraction), (3, c.max_top_3gram_fraction),
                         (4, c.max_top_4gram_fraction)),
            dup_n_grams=((5, c.max_duplicate_5gram_fraction),
                         (10, c.max_duplicate_10gram_fraction)),
            language=tok,
        )  # fmt: skip
        # Only its line-punctuation check: the others get limits no document reaches.
        self._line_punctuation = None
        if c.min_lines_ending_punctuation > 0:
            self._line_punctuation = FineWebQualityFilter(
                line_punct_thr=c.min_lines_ending_punctuation,
                short_line_thr=float("inf"),
                char_duplicates_ratio=float("inf"),
                new_line_ratio=float("inf"),
                language=tok,
            )

    def reason(self, text: str) -> str | None:
        """None keeps the document; otherwise the first failing check, a QUALITY_REASONS name.

        A document without a single word fails "word_count" when `min_words` > 0; otherwise it
        passes, since every other check is a ratio per word or per line."""
        if not self.config.enabled:
            return None
        text = text.replace("\r\n", "\n")  # a line ending in ".\r" still ends a sentence
        # Fills datatrove's cache of recent splits: the filters below reuse these words.
        words = self._split_into_words(text, self._tokenizer)
        if not any(ch not in self._punctuation for w in words for ch in w):
            return "word_count" if self.config.min_words > 0 else None
        doc = self._document(text=text, id="")
        if (reason := self._datatrove(self._gopher, doc)) is not None:
            return reason
        digits = len(_NON_DIGITS.sub("", text))  # what is left: the digits
        if digits / len(text) > _strict_max(self.config.max_digit_ratio):
            return "digit_ratio"
        if (reason := self._datatrove(self._repetition, doc)) is not None:
            return reason
        if self._line_punctuation is not None:
            return self._datatrove(self._line_punctuation, doc)
        return None

    @staticmethod
    def _datatrove(step, doc) -> str | None:
        result = step.filter(doc)
        if result is True:
            return None
        return _DATATROVE_REASONS[result[1]]
