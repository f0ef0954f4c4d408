"""The store: the one owner of instructd's SQLite database (WAL, migrations in schema.py). Nothing else in the
repository writes SQL against its tables; the tuner reaches them through the API only.

    schema.py     tables, migrations, how a connection opens
    base.py       the writer thread (group commit) and reads in worker threads
    exchanges.py  exchanges and ratings, the export, forgetting, retention
    registry.py   adapter versions, evaluations, promotions
    tuning.py     tuning runs and requests
    keys.py       API keys and the audit log
"""

from .exchanges import ExchangeTables
from .keys import AccessTables
from .registry import RegistryTables
from .schema import utc_now
from .tuning import TuningState, TuningTables


class Store(ExchangeTables, RegistryTables, TuningTables, AccessTables):
    """The service's persistent state."""


__all__ = ["Store", "TuningState", "utc_now"]
