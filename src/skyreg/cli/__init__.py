"""Command-line interface: `skyreg ...`."""
