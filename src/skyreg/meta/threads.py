"""How many threads a process runs database queries on (see `skyreg.meta.db.Database`).

Kept apart from `db.py` so that the command line can name the bounds without importing
SQLAlchemy.
"""

DEFAULT_THREADS = 16
MAX_THREADS = 64
SQLITE_WRITE_THREADS = 4
