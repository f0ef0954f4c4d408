"""The tuner's side of the API (the Tuning service): rated data out, adapters in and out, runs recorded. A tuner
on another machine needs nothing else from a server; `instructd export` uses the same export."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import grpc

from instructd.v1 import instructd_pb2 as pb
from instructd.v1 import instructd_pb2_grpc as pb_grpc

from .client import Client
from .types import Adapter, ApiError, TuningRun

CHUNK = 256 << 10  # bytes per upload message: well under the server's request size limit (1 MiB by default)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "instructd_training.json")
_TRIGGERS = {"requested": pb.TRIGGER_REQUESTED, "threshold": pb.TRIGGER_THRESHOLD, "period": pb.TRIGGER_PERIOD}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def upload_messages(folder: Path, parent_version: int = 0, metadata: dict | None = None,
                    rejected: bool = False) -> Iterator[pb.AdapterUpload]:
    """An upload: the header (each file's size and SHA-256), then the files' bytes in chunks."""
    files = [folder / name for name in ADAPTER_FILES if (folder / name).is_file()]
    yield pb.AdapterUpload(header=pb.UploadHeader(
        files=[pb.UploadFile(name=f.name, size=f.stat().st_size, sha256=_sha256(f)) for f in files],
        parent_version=parent_version, metadata_json=json.dumps(metadata or {}), rejected=rejected))
    for path in files:
        with open(path, "rb") as f:
            while data := f.read(CHUNK):
                yield pb.AdapterUpload(chunk=pb.FileChunk(name=path.name, data=data))


class TuningClient(Client):
    """A Client with the Tuning service's calls (a tuner or admin key)."""

    def __init__(self, target: str | None = None, **options) -> None:
        super().__init__(target, **options)
        self._tuning = pb_grpc.TuningStub(self.channel)

    def export(self, after: int = 0, until: int = 0, app_id: str = "",
               held_out: int = pb.HELD_OUT_ALL) -> Iterator[pb.RatedExchange]:
        """Rated exchanges whose rating changed in (after, until], oldest first; resume from the last .cursor."""
        call = self._tuning.ExportFeedback(pb.ExportRequest(after=after, until=until, app_id=app_id,
                                                            held_out=held_out), metadata=self.metadata)
        try:
            yield from call
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None
        finally:
            call.cancel()

    def upload_adapter(self, folder: Path, parent_version: int = 0, metadata: dict | None = None,
                       rejected: bool = False) -> Adapter:
        """Sends an adapter folder's files in chunks; the server registers them as a new version."""
        return self.upload(upload_messages(folder, parent_version, metadata, rejected))

    def upload(self, messages: Iterator[pb.AdapterUpload]) -> Adapter:
        return Adapter.from_pb(self._call(self._tuning.UploadAdapter, messages))

    def download_adapter(self, version: int, folder: Path) -> Path:
        """Writes a registered version's files into `folder` (made fresh); checks each file's checksum."""
        folder.mkdir(parents=True, exist_ok=True)
        call = self._tuning.DownloadAdapter(pb.DownloadAdapterRequest(version=version), metadata=self.metadata,
                                            timeout=self.timeout)
        expected: dict[str, str] = {}
        try:
            for message in call:
                if message.WhichOneof("part") == "header":
                    expected = {f.name: f.sha256 for f in message.header.files}
                    for name in expected:
                        (folder / name).write_bytes(b"")
                else:
                    with open(folder / message.chunk.name, "ab") as f:
                        f.write(message.chunk.data)
        except grpc.RpcError as error:
            raise ApiError.from_rpc(error) from None
        broken = [name for name, digest in expected.items() if _sha256(folder / name) != digest]
        if not expected or broken:
            raise ApiError(grpc.StatusCode.DATA_LOSS, f"version {version} arrived damaged: {broken or 'no files'}")
        return folder

    def start_run(self, trigger: str) -> TuningRun:
        return TuningRun.from_pb(self._call(self._tuning.StartRun, pb.StartRunRequest(trigger=_TRIGGERS[trigger])))

    def update_run(self, run_id: int, **fields) -> TuningRun:
        """Sets a run's step, total_steps, loss, examples, candidate_version, data, verdict, reason, data_until,
        and (outcome: "promoted", "rejected", "failed" or "skipped") ends it."""
        outcome = fields.pop("outcome", None)
        request = pb.UpdateRunRequest(id=run_id, **fields)
        if outcome:
            request.outcome = pb.RunOutcome.Value(f"RUN_{outcome.upper()}")
        return TuningRun.from_pb(self._call(self._tuning.UpdateRun, request))

    def claim_request(self) -> bool:
        return self._call(self._tuning.ClaimRequest, pb.ClaimRequestRequest()).requested

    def recover_runs(self) -> tuple[list[int], list[int]]:
        """Fails runs left running by a tuner that stopped and rejects their candidates; returns both."""
        reply = self._call(self._tuning.RecoverRuns, pb.RecoverRunsRequest())
        return list(reply.failed_runs), list(reply.rejected_versions)
