"""The other serving replicas. Every response id names the replica that made it ("<replica id>.<hex>"); a rating
for another replica's answer is forwarded there with the caller's own key (so the same checks apply there: the
key, its application, the rate), and its answer passed back as it came. Behind any load balancer, a rating may
arrive anywhere and still lands where its exchange is."""

from __future__ import annotations

import grpc

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc
from instructd.v1.metadata import AUTHORIZATION

from .config import ServerConfig
from .errors import NotFound, Relayed, preview

SEPARATOR = "."


class Peers:
    def __init__(self, config: ServerConfig, replica_id: str) -> None:
        self.replica_id = replica_id
        self._targets = dict(config.peers)
        self._credentials = grpc.ssl_channel_credentials(config.peer_tls_ca.read_bytes()) \
            if config.peer_tls_ca else None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def new_response_id(self, unique_hex: str) -> str:
        return f"{self.replica_id}{SEPARATOR}{unique_hex}"

    def owner(self, response_id: str) -> str | None:
        """The address of the replica that made this answer; None if this one did."""
        replica, dot, _ = response_id.rpartition(SEPARATOR)
        if not dot or replica == self.replica_id:
            return None
        if replica not in self._targets:
            raise NotFound(f"no response with id {preview(response_id)}")
        return self._targets[replica]

    async def forward_feedback(self, target: str, request: pb.FeedbackRequest, authorization: str | None):
        channel = self._channels.get(target)
        if channel is None:
            channel = self._channels[target] = (grpc.aio.secure_channel(target, self._credentials)
                                                if self._credentials else grpc.aio.insecure_channel(target))
        metadata = ((AUTHORIZATION, authorization),) if authorization else ()
        try:
            return await pb_grpc.FeedbackStub(channel).Submit(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as error:
            raise Relayed(error.code(), error.details() or "") from None

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
