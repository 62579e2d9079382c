#!/usr/bin/env bash
# Installs what the real-browser test (tests/browser/) needs: Debian's chromium at
# /usr/bin/chromium. Playwright for Python comes with the `dev` extra; it drives this
# chromium through executable_path, so `playwright install` (a download) is not needed.
#
#   sudo scripts/install-browser.sh      # or as root in CI
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    echo "install-browser: /usr/bin/chromium is already installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-browser: no apt-get here; install Chromium so that /usr/bin/chromium exists" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q chromium
/usr/bin/chromium --version || true
