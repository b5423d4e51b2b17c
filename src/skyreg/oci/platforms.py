"""Platforms: this host's architecture in OCI words, and picking an index entry for it."""

from __future__ import annotations

import platform

from skyreg.oci.manifest import Descriptor, Manifest

_ARCHITECTURES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def host_architecture() -> str:
    """The OCI name of this host's CPU architecture."""
    machine = platform.machine().lower()
    return _ARCHITECTURES.get(machine, machine)


def platform_entry(index: Manifest, arch: str) -> Descriptor | None:
    """The index entry for linux/`arch` (any variant; attestation entries are not images)."""
    for entry in index.manifests:
        p = entry.platform or {}
        if p.get("os") == "linux" and p.get("architecture") == arch:
            return entry
    return None
