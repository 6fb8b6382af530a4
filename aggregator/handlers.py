"""Register the Federation service so that fedpt, not grpcio, parses every request.

grpcio's generated registration deserializes in its own callback: bytes that do not parse are
answered INTERNAL before fedpt runs, a push stream cut that way looks like a dropped connection
(its chunks were kept to resume), and grpcio 1.85 can leave such calls open so that
`Server.stop()` never returns. Here every method receives raw bytes; parsing and the size limit
are checked in the handler, so a bad message is a clear INVALID_ARGUMENT / RESOURCE_EXHAUSTED
refusal and a refused upload leaves nothing behind (the servicer's usual refusal path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from aggregator.errors import InvalidArgument, Refused, ResourceExhausted
from protos import federation_pb2 as pb

SERVICE_NAME = "fedpt.v1.Federation"


def parse_request(message_class: type[Message], raw: bytes, limit: int) -> Message:
    """The request `raw` encodes, or a refusal saying why not."""
    if len(raw) > limit:
        raise ResourceExhausted(
            f"{message_class.__name__} of {len(raw)} bytes is over the {limit}-byte message limit"
        )
    try:
        return message_class.FromString(raw)
    except DecodeError as e:
        raise InvalidArgument(f"the request is not a valid {message_class.__name__}: {e}") from e


def _parsed_or_aborted(
    request_class: type[Message], raw: bytes, limit: int, context: grpc.ServicerContext
) -> Message:
    """The request, or the call ends here with the refusal's status (abort raises)."""
    try:
        return parse_request(request_class, raw, limit)
    except Refused as e:
        context.abort(grpc.StatusCode[e.code], e.message)
        raise  # not reached: abort raises


def _unary_request(method: Callable, request_class: type[Message], limit: int) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext):
        return method(_parsed_or_aborted(request_class, raw, limit, context), context)

    return handle


def _streaming_reply(method: Callable, request_class: type[Message], limit: int) -> Callable:
    def handle(raw: bytes, context: grpc.ServicerContext):
        yield from method(_parsed_or_aborted(request_class, raw, limit, context), context)

    return handle


def _request_stream(method: Callable, request_class: type[Message], limit: int) -> Callable:
    # A bad message raises its refusal inside the servicer's loop, which discards the upload.
    def handle(raw_messages: Iterator[bytes], context: grpc.ServicerContext):
        parsed = (parse_request(request_class, raw, limit) for raw in raw_messages)
        return method(parsed, context)

    return handle


def federation_handlers(servicer: object, limit: int) -> dict[str, grpc.RpcMethodHandler]:
    """One handler per RPC in federation.proto, each taking raw bytes; the descriptor (not a
    hand-written list) decides the kinds, so a new RPC cannot be registered the old way."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in pb.DESCRIPTOR.services_by_name["Federation"].methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        reply_class = message_factory.GetMessageClass(method.output_type)
        implementation = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            raise ValueError(f"{method.name}: bidirectional streams are not supported")
        if method.client_streaming:
            make, wrap = grpc.stream_unary_rpc_method_handler, _request_stream
        elif method.server_streaming:
            make, wrap = grpc.unary_stream_rpc_method_handler, _streaming_reply
        else:
            make, wrap = grpc.unary_unary_rpc_method_handler, _unary_request
        handlers[method.name] = make(
            wrap(implementation, request_class, limit),
            request_deserializer=None,
            response_serializer=reply_class.SerializeToString,
        )
    return handlers


def add_federation_service(server: grpc.Server, servicer: object, limit: int) -> None:
    handlers = federation_handlers(servicer, limit)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)  # grpcio's faster dispatch
