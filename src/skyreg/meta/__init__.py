"""Metadata: one SQL schema (SQLAlchemy Core, Alembic migrations) for SQLite and PostgreSQL."""
