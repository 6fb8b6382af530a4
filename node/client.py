"""The node's gRPC client for the aggregator: join, long-poll tasks, pull and push models.

Pulls and pushes are resumable: a stream that breaks part-way is continued from the last chunk
the other side verified, not restarted, within a bounded number of attempts. Only manifests,
model weights and deltas cross the wire (see tests/test_no_data_on_wire.py later on).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

import grpc
import torch

from node.round_order import ModelMismatch
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos import pki
from protos.codec import (
    DEFAULT_CHUNK_BYTES,
    ChunkVerifier,
    CodecError,
    EncodedPayload,
    Manifest,
    PayloadAssembler,
    SpooledPayload,
    TensorSpec,
    encode,
    receive_model,
    specs_of,
    update_messages,
)
from protos.delta_encoding import FlatLayout, add_decoded_chunk, wire_specs

SESSION_METADATA = "x-fedpt-session"
# A stream that broke on the way: resume it. INTERNAL is here because grpc reports a transport
# reset mid-stream (RST_STREAM) as INTERNAL; RESOURCE_EXHAUSTED is not: a message over a limit
# is over it on every attempt.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
             grpc.StatusCode.INTERNAL)  # fmt: skip


class TransferError(RuntimeError):
    """A pull or push did not complete within its attempts."""


class AggregatorClient:
    def __init__(
        self,
        address: str,
        organisation: str,
        *,
        kit: pki.StartupKit | None = None,
        max_message_bytes: int = 16 << 20,
        rpc_timeout: float = 60.0,
        attempts: int = 5,
        log: Callable[[str], None] = lambda _m: None,
        admission_token: str = "",
    ) -> None:
        self.address, self.organisation = address, organisation
        # Sent with every Join: the scheduler's one-time token (aggregator/admissions.py).
        self.admission_token = admission_token
        self.rpc_timeout, self.attempts, self.log = rpc_timeout, attempts, log
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        # With a startup kit: mutual TLS, and the organisation is the one its certificate names.
        if kit is not None:
            self.organisation = kit.organisation
            self.channel = grpc.secure_channel(
                address, pki.channel_credentials(kit), options=options
            )
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.stub = pb_grpc.FederationStub(self.channel)
        # What the node's shards were curated with: sent with every Join, re-joins included.
        self.curation: pb.DataCuration | None = None
        self.node_id = ""
        self.spec: pb.FederationSpec | None = None
        self._metadata: tuple[tuple[str, str], ...] = ()

    def close(self) -> None:
        self.channel.close()

    def join(
        self,
        capabilities: pb.Capabilities | None = None,
        curation: pb.DataCuration | None = None,
    ) -> pb.JoinReply:
        """Join (or re-join); `curation`, once given, is sent with this and every later Join."""
        if curation is not None:
            self.curation = curation
        reply = self.stub.Join(
            pb.JoinRequest(organisation=self.organisation,
                           capabilities=capabilities or pb.Capabilities(),
                           admission_token=self.admission_token, curation=self.curation),
            timeout=self.rpc_timeout,
        )  # fmt: skip
        self.node_id, self.spec = reply.node_id, reply.spec
        self._metadata = ((SESSION_METADATA, reply.session_token),)
        return reply

    def get_task(self, wait_seconds: float = 10.0, *, final_model: bool = False) -> pb.Task:
        return self.stub.GetTask(
            pb.TaskRequest(wait_seconds=wait_seconds, final_model=final_model),
            metadata=self._metadata,
            timeout=wait_seconds + self.rpc_timeout,
        )

    # ---- secure aggregation stages ------------------------------------------------------------
    def advertise_keys(self, request: pb.AdvertiseKeysRequest) -> None:
        self.stub.AdvertiseKeys(request, metadata=self._metadata, timeout=self.rpc_timeout)

    def share_keys(self, request: pb.ShareKeysRequest) -> None:
        self.stub.ShareKeys(request, metadata=self._metadata, timeout=self.rpc_timeout)

    def secagg_state(self, round_number: int) -> pb.SecAggState:
        request = pb.SecAggStateRequest(round=round_number)
        return self.stub.GetSecAggState(request, metadata=self._metadata, timeout=self.rpc_timeout)

    def unmask(self, request: pb.UnmaskRequest) -> None:
        self.stub.Unmask(request, metadata=self._metadata, timeout=self.rpc_timeout)

    def upload_status(self, round_number: int) -> pb.UploadStatus:
        return self.stub.GetUploadStatus(
            pb.UploadStatusRequest(round=round_number),
            metadata=self._metadata,
            timeout=self.rpc_timeout,
        )

    def pull_model(
        self,
        version: int,
        *,
        expected: Sequence[TensorSpec] | None = None,
        max_total_bytes: int | None = None,
        progress: Callable[[int], None] | None = None,
        into: dict[str, torch.Tensor] | None = None,
        announced_sha256: bytes | None = None,
    ) -> dict[str, torch.Tensor]:
        """The global model of `version`, verified chunk by chunk; a broken stream is resumed
        from the first chunk not yet received. `progress(n)` after each chunk received.

        `into`: tensors of the model's names, shapes and dtypes (an older version this node is
        done with) to receive into instead of new memory; they are spoiled if this raises.
        `announced_sha256`: the payload's sha256 as announced elsewhere (a scheduler's message):
        a manifest with another root raises ModelMismatch before any chunk is read."""
        assembler: PayloadAssembler | None = None
        for attempt in range(1, self.attempts + 1):
            first = assembler.next_index if assembler else 0
            stream = self.stub.PullModel(
                pb.PullRequest(model_version=version, first_chunk=first), metadata=self._metadata,
                timeout=self.rpc_timeout * 10,
            )  # fmt: skip
            breaks: list[grpc.RpcError] = []
            messages = _announced(_until_broken(stream, breaks), version, announced_sha256)
            try:
                assembler = receive_model(
                    _counting_chunks(messages, progress),
                    assembler,
                    expected=expected,
                    max_total_bytes=max_total_bytes,
                    into=into,
                )
            except CodecError:
                if not breaks:  # the server sent something wrong, not a network failure
                    raise
            if assembler is not None and assembler.complete:
                return assembler.tensors()
            if breaks:
                self.log(f"pull of version {version} broke ({breaks[0].code().name}); resuming")
            time.sleep(min(0.2 * 2**attempt, 5.0))
        raise TransferError(
            f"pull of model version {version} did not complete in {self.attempts} attempts"
        )

    def pull_from_previous(
        self,
        version: int,
        held: dict[str, torch.Tensor],
        encoding: str,
        *,
        progress: Callable[[int], None] | None = None,
        announced_sha256: bytes | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """Model `version` from `held`, this node's copy of version − 1, by adding the
        compressed outer update chunk by chunk into `held` (in place), resumable like a pull.
        When the aggregator sends the whole model instead (it has no update for this step),
        that model. None when the result is not the aggregator's model bit for bit (a broken
        stream, a hash mismatch): `held` is then spoiled and the caller pulls the whole model.
        `announced_sha256`: as for pull_model (the update's model_sha256 must equal it)."""
        specs = specs_of(held)
        layout = FlatLayout.of(specs)
        verifier: ChunkVerifier | None = None
        model_sha256 = b""
        for attempt in range(1, self.attempts + 1):
            first = verifier.next_index if verifier else 0
            stream = self.stub.PullModel(
                pb.PullRequest(model_version=version, first_chunk=first, from_previous=True),
                metadata=self._metadata, timeout=self.rpc_timeout * 10,
            )  # fmt: skip
            breaks: list[grpc.RpcError] = []
            messages = _counting_chunks(
                _announced(_until_broken(stream, breaks), version, announced_sha256), progress
            )
            head = next(messages, None)
            if head is not None and head.WhichOneof("payload") != "manifest":
                raise CodecError("model stream must start with a manifest")
            if head is not None and not head.manifest.model_sha256:
                if verifier is not None:
                    return None  # the update went away mid-transfer
                assembler = receive_model(itertools.chain([head], messages), expected=specs)
                return assembler.tensors() if assembler.complete else None
            if head is not None:
                manifest = Manifest.from_proto(head.manifest, expected=wire_specs(encoding, specs))
                if verifier is None:
                    verifier, model_sha256 = ChunkVerifier(manifest), head.manifest.model_sha256
                elif manifest != verifier.manifest:
                    return None
                for message in messages:
                    chunk = message.chunk
                    verifier.verify(chunk.index, chunk.data)
                    start, _ = manifest.chunk_span(chunk.index)
                    add_decoded_chunk(encoding, held, layout, start, chunk.data)
                if verifier.complete:
                    break
            if breaks:
                self.log(
                    f"pull of update to version {version} broke ({breaks[0].code().name}); resuming"
                )
            time.sleep(min(0.2 * 2**attempt, 5.0))
        if verifier is None or not verifier.complete:  # chunks checked, and their root
            return None
        if (
            encode(
                held, self.spec.chunk_bytes if self.spec else DEFAULT_CHUNK_BYTES
            ).manifest.sha256
            != model_sha256
        ):
            return None
        return held

    def push_update(
        self,
        round_number: int,
        base_version: int,
        delta: Mapping[str, torch.Tensor],
        num_tokens: int,
        train_loss: float,
        *,
        chunk_bytes: int | None = None,
        base_val_loss: float | None = None,
        gpu_energy_joules: float | None = None,
        cpu_energy_joules: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> pb.PushReply:
        """Send this round's delta as fp32 tensors (see `push_payload`)."""
        payload = encode(
            delta, chunk_bytes or (self.spec.chunk_bytes if self.spec else DEFAULT_CHUNK_BYTES)
        )
        return self.push_payload(round_number, base_version, payload, num_tokens, train_loss,
                                 base_val_loss=base_val_loss, gpu_energy_joules=gpu_energy_joules,
                                 cpu_energy_joules=cpu_energy_joules, progress=progress)  # fmt: skip

    def push_payload(
        self,
        round_number: int,
        base_version: int,
        payload: EncodedPayload | SpooledPayload,
        num_tokens: int,
        train_loss: float,
        *,
        base_val_loss: float | None = None,
        gpu_energy_joules: float | None = None,
        cpu_energy_joules: float | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> pb.PushReply:
        """Send an encoded update; after a broken stream, ask where the server is and resume.
        `base_val_loss`: this node's validation loss of the model it trained from.
        `gpu_energy_joules`, `cpu_energy_joules`: the round's energy (node/energy.py); None:
        not measured, and not sent.
        `progress(n)` after each chunk handed to the transport."""
        first = 0
        for attempt in range(1, self.attempts + 1):
            header = pb.UpdateHeader(round=round_number, base_version=base_version,
                                     num_tokens=num_tokens, train_loss=train_loss,
                                     base_val_loss=base_val_loss,
                                     gpu_energy_joules=gpu_energy_joules,
                                     cpu_energy_joules=cpu_energy_joules)  # fmt: skip
            try:
                reply = self.stub.PushUpdate(
                    _counting_chunks(update_messages(header, payload, first), progress),
                    metadata=self._metadata,
                    timeout=self.rpc_timeout * 10,
                )
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE or attempt == self.attempts:
                    raise
                self.log(f"push for round {round_number} broke ({e.code().name}); resuming")
                time.sleep(min(0.2 * 2**attempt, 5.0))
                status = self.upload_status(round_number)
                if status.complete:
                    return pb.PushReply(chunks_received=payload.manifest.num_chunks, complete=True)
                first = status.chunks_received
                continue
            if reply.complete:
                return reply
            first = reply.chunks_received
        raise TransferError(
            f"push for round {round_number} did not complete in {self.attempts} attempts"
        )


def _counting_chunks(messages: Iterator, progress: Callable[[int], None] | None) -> Iterator:
    """`messages`, calling progress(chunks so far) once each message has been taken (the
    first call, with 0, after the header or manifest)."""
    chunks = 0
    for message in messages:
        yield message
        if message.WhichOneof("payload") == "chunk":
            chunks += 1
        if progress is not None:
            progress(chunks)


def _announced(messages: Iterator[pb.ModelStreamMessage], version: int,
               sha256: bytes | None) -> Iterator[pb.ModelStreamMessage]:  # fmt: skip
    """The messages, once the first (the manifest) names the model `sha256`: the root of the
    whole model's payload, or an update's `model_sha256`, the model it leads to. None: no
    model was announced, the messages as they come."""
    if sha256 is None:
        yield from messages
        return
    first = next(messages, None)
    if first is None:
        return
    if first.WhichOneof("payload") == "manifest":
        root = first.manifest.model_sha256 or first.manifest.sha256
        if root != sha256:
            raise ModelMismatch(
                f"the data plane serves model version {version} as sha256 {root.hex()[:16]}…, "
                f"but the message that started this node announced {sha256.hex()[:16]}…"
            )
    yield first
    yield from messages


def _until_broken(stream, breaks: list[grpc.RpcError]):
    """The stream's messages until it breaks with a retryable error (recorded in `breaks`)."""
    try:
        yield from stream
    except grpc.RpcError as e:
        if e.code() not in RETRYABLE:
            raise
        breaks.append(e)
