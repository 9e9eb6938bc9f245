#!/usr/bin/env bash
# Install the real peers the tests and the demo talk to (Debian 12 packages).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
need=()
for pair in docker-registry:docker-registry skopeo:skopeo podman:podman htpasswd:apache2-utils tinyproxy:tinyproxy redis-server:redis-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
