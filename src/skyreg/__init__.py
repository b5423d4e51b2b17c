"""skyreg: a global, multi-tenant OCI container registry and the deploy path behind it."""

__version__ = "0.1.0"
