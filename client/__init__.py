"""Applications and the command line talk to instructd through this package."""

from .client import AsyncClient, Client
from .types import Adapter, AdapterStats, Answer, ApiError, Promotion, Stats, TuningRun, TuningStatus

__all__ = ["Adapter", "AdapterStats", "Answer", "ApiError", "AsyncClient", "Client", "Promotion", "Stats", "TuningRun",
           "TuningStatus"]
