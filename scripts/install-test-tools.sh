#!/usr/bin/env bash
# Debian packages the test suite and benchmarks drive: real clients and the anchor registry.
set -euo pipefail
pkgs=(curl skopeo podman docker.io containerd docker-registry wrk busybox-static uidmap
      fuse-overlayfs iptables)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
