"""The compressed download: a node that holds version v − 1 receives the outer update to v.

With `[federation] download_encoding` = bf16 or int8, committing version v encodes the step
θ'_v − θ_{v−1} (what the outer optimizer proposed) with that encoding and *defines* the new global
model as θ_v = θ_{v−1} + decoded(step), computed from the very bytes nodes receive with
`protos.delta_encoding.add_decoded_chunk`. Every node that adds the update to its own θ_{v−1}
therefore holds θ_v bit for bit, which it checks against the model's sha256 sent with the update.
A node without θ_{v−1} (new, restarted, or away for a round) gets the whole model.

The update payload lives in a spool file beside the checkpoints and is not durable: after a
restart the aggregator has none, and nodes pull the whole model once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from protos import federation_pb2 as pb
from protos.codec import Manifest, SpooledPayload
from protos.delta_encoding import apply_update_file, encode_update_in_place

_ROUNDING_TAG = b"fedpt/download-rounding/v1/"


@dataclass(frozen=True)
class OuterUpdate:
    """The compressed update from version `version - 1` to `version`."""

    version: int
    payload: SpooledPayload
    model_sha256: bytes  # of the fp32 model payload it produces

    def manifest_proto(self) -> pb.TensorManifest:
        message = self.payload.manifest.to_proto()
        message.model_sha256 = self.model_sha256
        return message


def compress_step(
    previous: dict[str, torch.Tensor],
    proposed: dict[str, torch.Tensor],
    encoding: str,
    path: Path,
    chunk_bytes: int,
    version: int,
) -> tuple[dict[str, torch.Tensor], Manifest]:
    """θ_v = θ_{v−1} + decoded(encode(proposed − θ_{v−1})): returns θ_v and the update's manifest.

    `proposed`'s memory is reused (the step, then θ_v): no model-sized buffer is added.
    Stochastic rounding is keyed by the version alone: public, and the same if a commit is
    retried."""
    for name, tensor in proposed.items():
        tensor.sub_(previous[name])
    key = _ROUNDING_TAG + str(version).encode()
    manifest = encode_update_in_place(proposed, encoding, path, chunk_bytes, rounding_key=key)
    for name, tensor in proposed.items():  # the encoding's loss is dropped: θ_v is what is sent
        tensor.copy_(previous[name])
    apply_update_file(encoding, proposed, path, chunk_bytes)
    return proposed, manifest
