"""The Tuning servicer: what a tuner needs over the network (rated data out, adapters in and out, its runs
recorded). It only translates; the caller is `CALLER.get()`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .adapters import Upload, files_of
from .config import ServerConfig
from .domain import is_held_out, json_object
from .errors import InvalidRequest
from .interceptor import CALLER
from .records import RunTrigger
from .router import AdapterRouter
from .store import Store

_RATINGS = {"up": pb.RATING_UP, "down": pb.RATING_DOWN}
CHUNK = 1 << 20  # bytes per message of a download


class TuningServicer(pb_grpc.TuningServicer):
    def __init__(self, config: ServerConfig, router: AdapterRouter, store: Store) -> None:
        self.config, self.router, self.store = config, router, store

    async def ExportFeedback(self, request, context):
        wanted = {pb.HELD_OUT_ALL: None, pb.HELD_OUT_ONLY: True, pb.HELD_OUT_EXCLUDED: False}[request.held_out]
        after = request.after
        while rows := await self.store.export_page(after, request.until, request.app_id):
            for row in rows:
                held_out = is_held_out(row["exchange_id"], self.config.held_out_share)
                if wanted is None or held_out == wanted:
                    await context.write(_rated_pb(row, held_out))
            after = rows[-1]["cursor"]

    async def UploadAdapter(self, request_iterator, context):
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("part") != "header":
            raise InvalidRequest("an upload starts with its header")
        header = first.header
        upload = Upload([(f.name, f.size, f.sha256) for f in header.files], self.config.versions_dir,
                        self.config.max_adapter_bytes)
        try:
            async for message in request_iterator:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidRequest("an upload has one header, first")
                await asyncio.to_thread(upload.write, message.chunk.name, message.chunk.data)
            staged = upload.finish()
        except BaseException:
            upload.discard()
            raise
        metadata = json_object(header.metadata_json, "metadata_json")
        record = await self.router.register_staged(staged, header.parent_version, {**metadata, "uploaded": True},
                                                   header.rejected, CALLER.get())
        return record.to_pb()

    async def DownloadAdapter(self, request, context):
        record = await self.store.get_adapter(request.version)
        folder = Path(record.path)
        files = await asyncio.to_thread(files_of, folder)
        await context.write(pb.AdapterUpload(header=pb.UploadHeader(
            files=[pb.UploadFile(name=n, size=size, sha256=digest) for n, size, digest in files],
            parent_version=record.parent_version, metadata_json=json.dumps(record.metadata))))
        for name, _, _ in files:
            with open(folder / name, "rb") as f:
                while data := await asyncio.to_thread(f.read, CHUNK):
                    await context.write(pb.AdapterUpload(chunk=pb.FileChunk(name=name, data=data)))

    async def StartRun(self, request, context):
        if request.trigger == pb.RUN_TRIGGER_UNSPECIFIED:
            raise InvalidRequest("trigger must be set")
        return (await self.store.start_run(RunTrigger(request.trigger), CALLER.get())).to_pb()

    async def UpdateRun(self, request, context):
        return (await self.store.update_run(request)).to_pb()

    async def ClaimRequest(self, request, context):
        return pb.ClaimRequestResponse(requested=await self.store.claim_request())

    async def RecoverRuns(self, request, context):
        failed, rejected = await self.store.recover_runs(CALLER.get())
        return pb.RecoverRunsResponse(failed_runs=failed, rejected_versions=rejected)


def _rated_pb(row: dict, held_out: bool) -> pb.RatedExchange:
    return pb.RatedExchange(
        cursor=row["cursor"], exchange_id=row["exchange_id"], app_id=row["app_id"] or "",
        messages=[pb.ChatMessage(**m) for m in json.loads(row["messages_json"])], response=row["response"],
        finish_reason=row["finish_reason"] or "", adapter_version=row["adapter_version"] or 0,
        rating=_RATINGS[row["rating"]], correction=row["correction"] or "", comment=row["comment"] or "",
        rater=row["rater"] or "", rated_at=row["rated_at"], held_out=held_out)
