"""The metadata keys of the wire contract (see the top of instructd.proto), declared once for the server
and the clients."""

AUTHORIZATION = "authorization"          # request: "Bearer <key>"
BEARER = "Bearer "
RESPONSE_ID = "x-instructd-response-id"  # GenerateStream's initial metadata: the response id, before any text
RETRY_AFTER = "retry-after"              # trailing, with RESOURCE_EXHAUSTED: seconds to wait
RETRY_PUSHBACK_MS = "grpc-retry-pushback-ms"  # the same for gRPC's own retry policy (gRFC A6), in milliseconds
