#!/usr/bin/env bash
# Debian packages the test suite and benchmarks drive: the real clients (skopeo, podman, dockerd,
# containerd/ctr), bubblewrap for machines, busybox-static for offline test images, and
# Distribution (docker-registry), wrk and umoci for the side-by-side benchmarks, and PostgreSQL
# (the metadata suite starts its own server from /usr/lib/postgresql/*/bin), iproute2 for the
# emulated WAN of the multi-region bench, nginx for the load-balancer example, strace for the
# power-loss test (it records what the server syncs), buildah (with runc) for `skyreg builder`,
# rpm (rpmbuild) for the RPM database the image indexer's tests read, chromium and its chromedriver
# (with a font) for the console's browser tests, fuse3 (and libfuse3-dev, pkg-config, gcc,
# python3-dev to build pyfuse3) for lazy pull's filesystem.
# Skips apt entirely when everything is installed already.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
pkgs=(curl ca-certificates skopeo podman crun conmon docker.io containerd runc docker-registry wrk
      busybox-static uidmap iptables bubblewrap umoci postgresql iproute2 nginx-light strace buildah rpm
      chromium chromium-driver fonts-dejavu-core fuse3 libfuse3-dev pkg-config gcc python3-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-test-tools: installing ${missing[*]}"
  apt-get update -qq
  # Tests start their own servers on free loopback ports: keep packages (nginx, postgresql,
  # docker) from starting system services during the install.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Fail here, loudly, rather than let the real-client tests skip.
for bin in skopeo podman dockerd docker containerd ctr docker-registry wrk busybox curl bwrap umoci ip tc \
           nginx strace buildah runc rpmbuild chromium chromedriver fusermount3 pkg-config gcc; do
  command -v "$bin" >/dev/null || { echo "install-test-tools: $bin missing" >&2; exit 1; }
done
# PostgreSQL's server binaries are not on PATH.
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null \
  || { echo "install-test-tools: initdb missing under /usr/lib/postgresql/*/bin" >&2; exit 1; }
