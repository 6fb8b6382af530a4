"""Near-duplicate documents across a corpus: MinHash signatures, LSH bands, kept in memory.

A document's shingles are its word `shingle_words`-grams after datatrove's normalisation
(lower case, no punctuation, numbers as 0, no diacritics); a document with fewer words has
its whole normalised text as its one shingle. datatrove's MinhashDedupSignature hashes them
(its `get_shingles`/`get_signature`, with the universal hashes its seed draws) into `bands` ×
`rows_per_band` minima. Documents come in corpus order; each band maps its rows' values to
the first kept document that had them. A document sharing a band with a kept one is a
candidate, and a near-duplicate only when the two signatures agree on at least `threshold`
of their entries (the estimate of their Jaccard similarity): a band collision alone is not
enough. The first document of a cluster is kept; duplicates are not indexed.

Hashes are sha1 (datatrove's default, xxhash, is a package the curation extra does not
bring) truncated to 32 bits: the estimate does not need more, and a kept document costs
`bands * rows_per_band` * 4 bytes of signature (448 with the defaults) plus one dict entry
per band. Nothing depends on Python's `hash()` of strings, so decisions do not change with
PYTHONHASHSEED.
"""

from __future__ import annotations

from array import array

import numpy as np

from node.curation_config import NearDedupConfig
from node.quality import regex_word_tokenizer, require_datatrove

_BLOCK_ROWS = 4096  # kept signatures are stored in blocks of this many rows
_SHINGLE_CHUNK = 8192  # shingles hashed at once: bounds the (shingles × hashes) temporary


class NearDuplicates:
    def __init__(self, config: NearDedupConfig) -> None:
        self.config = c = config
        self.num_hashes = c.bands * c.rows_per_band
        self._bands: list[dict[bytes, int]] = [{} for _ in range(c.bands)]  # band -> row
        self._blocks: list[np.ndarray] = []  # kept signatures, row by row
        self._doc_ids = array("q")  # row -> doc_id
        self._clusters: dict[int, list[int]] = {}  # kept doc_id -> dropped doc_ids
        if not c.enabled:
            return
        require_datatrove()
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.hashing import HashConfig, create_hash_func
        from datatrove.utils.text import simplify_text

        hashing = HashConfig(precision=32, hash_fc="sha1")
        minhash = MinhashConfig(n_grams=c.shingle_words, num_buckets=c.bands,
                                hashes_per_bucket=c.rows_per_band, seed=c.seed,
                                hash_config=hashing)  # fmt: skip
        # Its output folder is only opened by run(), which is never called; an in-memory
        # filesystem makes sure nothing could reach the disk anyway.
        self._minhash = MinhashDedupSignature(
            output_folder="memory://fedpt-near-dedup-unused",
            config=minhash,
            language=regex_word_tokenizer(),
        )
        self._hash = create_hash_func(hashing)
        self._normalise = lambda text: simplify_text(text, minhash.norm_config)

    def signature(self, text: str) -> np.ndarray:
        """The document's MinHash signature: `bands * rows_per_band` uint32 values."""
        shingles = self._minhash.get_shingles(text)
        if shingles.size == 0:  # fewer words than a shingle
            shingles = np.array([[self._hash(self._normalise(text))]], dtype=np.uint64)
        shingles = np.unique(shingles).reshape(-1, 1)  # repeats cannot change a minimum
        signature = None
        for start in range(0, len(shingles), _SHINGLE_CHUNK):
            part = self._minhash.get_signature(shingles[start : start + _SHINGLE_CHUNK])
            part = np.array(part, dtype=np.uint32).reshape(-1)
            signature = part if signature is None else np.minimum(signature, part)
        return signature

    def check(self, doc_id: int, text: str) -> int | None:
        """The doc_id of an earlier kept document that `text` nearly duplicates, else None
        (and then `text` is kept and indexed). Documents must come in corpus order."""
        if not self.config.enabled:
            return None
        signature = self.signature(text)
        keys = [band.tobytes() for band in signature.reshape(self.config.bands, -1)]
        hits = (index.get(key) for index, key in zip(self._bands, keys, strict=True))
        rows = sorted({row for row in hits if row is not None})  # earliest kept first
        if rows:
            candidates = np.stack([self._row(r) for r in rows])
            similarity = (candidates == signature).mean(axis=1)
            best = int(np.argmax(similarity))  # the most similar; the earliest kept on ties
            if similarity[best] >= self.config.threshold:
                kept = self._doc_ids[rows[best]]
                self._clusters.setdefault(kept, []).append(doc_id)
                return kept
        self._keep(doc_id, signature, keys)
        return None

    def clusters(self) -> dict[int, list[int]]:
        """Kept doc_id -> the doc_ids dropped as its near-duplicates, in corpus order (only
        kept documents that have some)."""
        return {kept: list(dropped) for kept, dropped in self._clusters.items()}

    def _row(self, row: int) -> np.ndarray:
        return self._blocks[row // _BLOCK_ROWS][row % _BLOCK_ROWS]

    def _keep(self, doc_id: int, signature: np.ndarray, keys: list[bytes]) -> None:
        row = len(self._doc_ids)
        if row % _BLOCK_ROWS == 0:
            self._blocks.append(np.empty((_BLOCK_ROWS, self.num_hashes), dtype=np.uint32))
        self._blocks[-1][row % _BLOCK_ROWS] = signature
        self._doc_ids.append(doc_id)
        for index, key in zip(self._bands, keys, strict=True):
            index.setdefault(key, row)
