"""A forged Ingest.Push from an outside gRPC client (grpcio over TLS): sends the given
pre-encoded gpulse.v1.Batch messages with the given bearer token (or none) and prints how the
collector answered: `ACK <through_seq>` lines, then `END OK` or `CODE <status> <details>`.

Usage: forged_push.py TARGET CA_FILE TOKEN|- HEX_BATCH...
"""

import sys

import grpc


def varint_field_1(ack):
    """through_seq (field 1) of an encoded gpulse.v1.Ack, without generated code."""
    if not ack or ack[0] != 0x08:
        return 0
    value, shift = 0, 0
    for b in ack[1:]:
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            break
    return value


def main():
    target, ca_file, token = sys.argv[1:4]
    batches = [bytes.fromhex(h) for h in sys.argv[4:]]
    with open(ca_file, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])
    push = channel.stream_stream(
        "/gpulse.v1.Ingest/Push",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    metadata = [] if token == "-" else [("authorization", "Bearer " + token)]
    try:
        for ack in push(iter(batches), metadata=metadata, timeout=10):
            print("ACK", varint_field_1(ack), flush=True)
        print("END OK", flush=True)
    except grpc.RpcError as e:
        print("CODE", e.code().name, e.details(), flush=True)


main()
