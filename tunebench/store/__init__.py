"""The results store: the winners and trials `tunebench tune` measures, in a database that SQLAlchemy opens (an
embedded SQLite file by default, PostgreSQL for many hosts). It never imports a kernel.

    models.py   the tables, and the values in and out of their rows (TrialResult, Winner)
    engine.py   URLs, engines, SQLite and PostgreSQL setup, schema checks
    store.py    Store: rows in and out

Not imported by ``import tunebench``: the dispatcher imports it on its first call.
"""
from .engine import SCHEMA_VERSION, StoreError, default_db_path, resolve_url
from .models import STATUSES, TrialResult, Winner
from .store import Store, StoreWarning

__all__ = ["SCHEMA_VERSION", "STATUSES", "Store", "StoreError", "StoreWarning", "TrialResult", "Winner",
           "default_db_path", "resolve_url"]
