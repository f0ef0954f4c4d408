"""Applications and the command line talk to instructd through this package."""

from .channel import Tls
from .client import AsyncClient, Client
from .types import Adapter, AdapterStats, Answer, ApiError, ApiKey, AuditEvent, Promotion, Stats, TuningRun, TuningStatus

__all__ = ["Adapter", "AdapterStats", "Answer", "ApiError", "ApiKey", "AsyncClient", "AuditEvent", "Client", "Promotion",
           "Stats", "Tls", "TuningRun", "TuningStatus"]
