"""The OCI distribution API over HTTP, and nothing else."""

from skyreg.registry.app import create_app

__all__ = ["create_app"]
