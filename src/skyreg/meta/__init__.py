"""Metadata: one SQL schema (SQLAlchemy Core, Alembic migrations) for SQLite and PostgreSQL."""

from skyreg.meta.registry import RegistryMeta, open_database

__all__ = ["RegistryMeta", "open_database"]
