#!/usr/bin/env bash
# Installs Debian's chromium + chromedriver for the dashboard's browser test (idempotent).
# Fails loudly if they cannot be installed: the browser test must not be skipped silently.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
command -v chromium && command -v chromedriver
