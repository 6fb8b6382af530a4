"""What a scheduler's message told a node started for one round (`fedpt node join --once`).

Under Flower the ServerApp's TRAIN or EVALUATE message names the round, the global model
version and the sha256 of that version's payload (the manifest root of protos.codec), and
carries a one-time admission token for the data plane's Join. The node holds the data plane to
them: it joins with the token, trains only the round it was started for, and refuses a model
whose manifest hashes to anything else — the model it trains from is the one the ServerApp
announced, whatever answers at the data plane's address.

In a secure federation the ServerApp sends secure aggregation's key, share and unmask stages
as messages of their own (node/flower_stages.py answers them, in the ClientApp); the process
started for the round then only trains and pushes its masked update (`--secagg-by-scheduler`),
with the round's secrets the key and share messages left in its work dir.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# The token reaches `node join` in the environment, not on its command line, which other
# users of the host can read.
ADMISSION_TOKEN_ENV = "FEDPT_ADMISSION_TOKEN"


class RoundOrderError(ValueError):
    """--expect-round / --expect-model are malformed."""


class ModelMismatch(RuntimeError):
    """The data plane serves another model, or runs another round, than the message said."""


@dataclass(frozen=True)
class RoundOrder:
    round: int  # the round to train; -1: none (EVALUATE, after the federation finished)
    version: int  # the global model version to start from (or the final one)
    model_sha256: bytes  # manifest root of that version's fp32 payload
    admission_token: str = ""
    # Secure aggregation's other stages come as the scheduler's messages, not on the data plane.
    secagg_by_scheduler: bool = False

    @classmethod
    def from_flags(cls, expect_round: int | None, expect_model: str | None,
                   secagg_by_scheduler: bool = False) -> RoundOrder | None:  # fmt: skip
        """From `--expect-round R`, `--expect-model VERSION:SHA256` and `--secagg-by-scheduler`
        (None: none given)."""
        if secagg_by_scheduler and expect_round is None:
            raise RoundOrderError("--secagg-by-scheduler needs --expect-round ROUND")
        if expect_model is None:
            if expect_round is not None:
                raise RoundOrderError("--expect-round needs --expect-model VERSION:SHA256")
            return None
        version_text, _, digest_text = expect_model.partition(":")
        try:
            version, digest = int(version_text), bytes.fromhex(digest_text)
        except ValueError:
            version, digest = -1, b""
        if version < 0 or len(digest) != 32:
            raise RoundOrderError(
                f"--expect-model {expect_model!r}: expected VERSION:SHA256 (a version ≥ 0 and "
                "64 hex digits)"
            )
        return cls(-1 if expect_round is None else expect_round, version, digest,
                   os.environ.get(ADMISSION_TOKEN_ENV, ""), secagg_by_scheduler)  # fmt: skip
