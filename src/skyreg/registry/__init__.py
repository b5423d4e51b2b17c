"""The OCI distribution API over HTTP, and nothing else."""

from skyreg.registry.app import CLIENT_MAX_SIZE, add_routes, middlewares

__all__ = ["CLIENT_MAX_SIZE", "add_routes", "middlewares"]
