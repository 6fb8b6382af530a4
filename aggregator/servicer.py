"""The gRPC servicer: thin. It finds the calling node, hands the request to the Coordinator and
turns every refusal into a status code with a clear message. No round logic, SQL or tensor math."""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable, Iterator

import grpc

from aggregator.errors import (
    Cancelled,
    InvalidArgument,
    PermissionDenied,
    Refused,
    Unauthenticated,
)
from aggregator.limits import NodeCallLimits
from aggregator.rounds import Coordinator
from aggregator.store import NodeRow
from protos import federation_pb2 as pb
from protos import federation_pb2_grpc as pb_grpc
from protos import pki
from protos.codec import model_stream_messages

SESSION_METADATA = "x-fedpt-session"
MAX_STATUS_CHARS = 1000  # a refusal quoting a huge value must still fit in the status trailer
VERIFIED_CACHE_SIZE = 4096
VERIFIED_CACHE_SECONDS = 300.0


def _answer_refusals(method: Callable) -> Callable:
    """Abort the call with the refusal's status code; anything else is a bug: INTERNAL."""

    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(self, method.__name__, e, context)

    return wrapper


def _answer_refusals_streaming(method: Callable) -> Callable:
    """The same for server-streaming methods (the generator's body runs lazily)."""

    @functools.wraps(method)
    def wrapper(self, request, context: grpc.ServicerContext):
        try:
            yield from method(self, request, context)
        except Exception as e:
            _abort(self, method.__name__, e, context)

    return wrapper


def _abort(servicer, name: str, error: Exception, context: grpc.ServicerContext) -> None:
    """End the call: a refusal with its own status code, anything else as INTERNAL (a bug)."""
    if isinstance(error, Refused):
        context.abort(grpc.StatusCode[error.code], _clipped(error.message))
    servicer.log(f"{name}: internal error: {type(error).__name__}: {error}")
    context.abort(grpc.StatusCode.INTERNAL, f"internal error in {name}")


def _clipped(message: str) -> str:
    return message if len(message) <= MAX_STATUS_CHARS else message[:MAX_STATUS_CHARS] + "… (cut)"


class FederationServicer(pb_grpc.FederationServicer):
    """With `ca_pem` (mutual TLS) a caller is the organisation its verified client certificate
    names; without it (--insecure) the session token Join returned."""

    def __init__(
        self,
        coordinator: Coordinator,
        log: Callable[[str], None] = print,
        *,
        ca_pem: bytes | None = None,
    ) -> None:
        self.coordinator, self.log, self.ca_pem = coordinator, log, ca_pem
        server = coordinator.config.server
        self.limits = NodeCallLimits(server.max_calls_per_node, server.max_long_polls_per_node)
        self._verified: dict[bytes, tuple[pki.PeerIdentity, float]] = {}

    def _certified(self, context: grpc.ServicerContext) -> pki.PeerIdentity:
        """The caller's verified identity. The TLS handshake already checked the chain; the
        full re-check in Python costs ~0.2 ms, so a verified certificate is remembered briefly."""
        certificate = pki.caller_certificate(context)
        now = time.monotonic()
        cached = self._verified.get(certificate) if certificate else None
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            identity = pki.caller_organisation(context, self.ca_pem)
        except pki.PKIError as e:
            raise Unauthenticated(f"client certificate refused: {e}") from e
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[certificate] = (identity, now + VERIFIED_CACHE_SECONDS)
        return identity

    def _certified_node(self, context: grpc.ServicerContext) -> pki.PeerIdentity:
        """The caller's identity, refused if it is an operator's (status only, never a node)."""
        identity = self._certified(context)
        if identity.operator:
            raise PermissionDenied("an operator credential may read the federation's status; "
                                   "it cannot act as a node")  # fmt: skip
        return identity

    def _caller(self, context: grpc.ServicerContext) -> NodeRow:
        if self.ca_pem is not None:
            return self.coordinator.node_of_organisation(self._certified_node(context).organisation)
        token = dict(context.invocation_metadata()).get(SESSION_METADATA)
        if not token:
            raise Unauthenticated(f"missing {SESSION_METADATA} metadata: call Join first")
        return self.coordinator.authenticate(token)

    @_answer_refusals
    def Join(self, request: pb.JoinRequest, context) -> pb.JoinReply:
        caps = request.capabilities
        capabilities = {"num_devices": caps.num_devices, "device_kind": caps.device_kind,
                        "fedpt_version": caps.fedpt_version}  # fmt: skip
        if len(json.dumps(capabilities)) > 4096:
            raise InvalidArgument("capabilities are too large")
        organisation = request.organisation
        if self.ca_pem is not None:
            certified = self._certified_node(context).organisation
            if organisation and organisation != certified:
                raise PermissionDenied(
                    f"this certificate belongs to {certified!r}; it cannot join as {organisation!r}"
                )
            organisation = certified
        # A certified organisation's joins count against its limit; plain-text callers have no
        # identity before they join.
        limit = (
            self.limits.call(f"organisation:{organisation}")
            if self.ca_pem is not None
            else contextlib.nullcontext()
        )
        with limit:
            curation = request.curation if request.HasField("curation") else None
            node, token = self.coordinator.join(organisation, capabilities,
                                                request.admission_token, curation)  # fmt: skip
        return pb.JoinReply(node_id=node.id, session_token=token, spec=self.coordinator.spec)

    @_answer_refusals
    def GetTask(self, request: pb.TaskRequest, context) -> pb.Task:
        node = self._caller(context)
        wants_to_wait = request.wait_seconds > 0  # also False for NaN
        with self.limits.call(node.id), self.limits.long_poll(node.id, wants_to_wait) as may_wait:
            return self.coordinator.get_task(node.id, request.wait_seconds if may_wait else 0.0,
                                             request.final_model, context.is_active)  # fmt: skip

    @_answer_refusals_streaming
    def PullModel(self, request: pb.PullRequest, context) -> Iterator[pb.ModelStreamMessage]:
        node = self._caller(context)
        with self.limits.call(node.id):
            payload, manifest = self.coordinator.model_payload(
                request.model_version, request.from_previous
            )
            if request.first_chunk > payload.manifest.num_chunks:
                raise InvalidArgument(
                    f"first_chunk {request.first_chunk} is past the last chunk ({payload.manifest.num_chunks})"
                )
            metrics, sent = self.coordinator.shared.metrics, 0
            try:
                for message in model_stream_messages(payload, request.first_chunk, manifest):
                    yield message
                    size = message.ByteSize()  # taken by grpc to send
                    metrics.sent(size)
                    sent += size
                    self.coordinator.pulling(node.id, request.model_version, sent)
            finally:  # a cut stream's bytes were sent too
                self.coordinator.downloaded(node.id, sent)

    @_answer_refusals
    def PushUpdate(self, request_iterator: Iterator[pb.UpdateMessage], context) -> pb.PushReply:
        try:
            node = self._caller(context)
            with self.limits.call(node.id):
                return self._push_update(node, request_iterator)
        except Refused as e:  # by its status code name: a small fixed set of label values
            self.coordinator.shared.metrics.upload_refused(e.code)
            raise

    def _push_update(
        self, node: NodeRow, request_iterator: Iterator[pb.UpdateMessage]
    ) -> pb.PushReply:
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("an update stream must start with its header")
        session = self.coordinator.begin_upload(node.id, first.header)
        try:
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only chunks may follow the header")
                self.coordinator.add_chunk(session, message.chunk)
        except Refused:
            self.coordinator.reject_upload(session)
            raise
        except grpc.RpcError:
            # The connection broke mid-stream: keep what arrived so the node can resume. The
            # client already has its status; this is not a server error.
            self.coordinator.release_upload(session)
            self.log(f"PushUpdate from {node.organisation}: stream cut after "
                     f"{session.chunks_received} chunks; kept to resume")  # fmt: skip
            raise Cancelled("the update stream was cut") from None
        except Exception:
            self.coordinator.release_upload(session)
            raise
        return self.coordinator.end_upload(session)

    # ---- secure aggregation -------------------------------------------------------------------
    def _secure_caller(self, context) -> tuple[NodeRow, pki.PeerIdentity]:
        if self.ca_pem is None:
            raise Refused("secure aggregation needs mutual TLS; this aggregator runs --insecure")
        identity = self._certified_node(context)
        return self.coordinator.node_of_organisation(identity.organisation), identity

    @_answer_refusals
    def AdvertiseKeys(self, request: pb.AdvertiseKeysRequest, context) -> pb.StageAck:
        node, identity = self._secure_caller(context)
        certificate = pki.caller_certificate(context) or b""
        with self.limits.call(node.id):
            self.coordinator.advertise_keys(node.id, request, certificate, identity.identity_public)
        return pb.StageAck()

    @_answer_refusals
    def ShareKeys(self, request: pb.ShareKeysRequest, context) -> pb.StageAck:
        node, _ = self._secure_caller(context)
        with self.limits.call(node.id):
            self.coordinator.share_keys(node.id, request)
        return pb.StageAck()

    @_answer_refusals
    def GetSecAggState(self, request: pb.SecAggStateRequest, context) -> pb.SecAggState:
        node, _ = self._secure_caller(context)
        with self.limits.call(node.id):
            return self.coordinator.secagg_state(node.id, request.round)

    @_answer_refusals
    def Unmask(self, request: pb.UnmaskRequest, context) -> pb.StageAck:
        node, _ = self._secure_caller(context)
        with self.limits.call(node.id):
            self.coordinator.unmask(node.id, request)
        return pb.StageAck()

    # ---- operators ----------------------------------------------------------------------------
    @_answer_refusals
    def GetFederationStatus(
        self, request: pb.FederationStatusRequest, context
    ) -> pb.FederationStatus:
        if self.ca_pem is None:
            raise Refused("the federation's status is for operator kits over mutual TLS; this "
                          "aggregator runs --insecure: read its state folder with fedpt status "
                          "--state-dir")  # fmt: skip
        identity = self._certified(context)
        if not identity.operator:
            raise PermissionDenied(f"{identity.organisation!r} holds a node's credential; the "
                                   "federation's status needs an operator kit (fedpt ca issue "
                                   "--operator)")  # fmt: skip
        with self.limits.call(f"operator:{identity.organisation}"):
            return self.coordinator.federation_status()

    @_answer_refusals
    def GetUploadStatus(self, request: pb.UploadStatusRequest, context) -> pb.UploadStatus:
        node = self._caller(context)
        with self.limits.call(node.id):
            return self.coordinator.upload_status(node.id, request.round)
