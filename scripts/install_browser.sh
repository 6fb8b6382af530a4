#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver (if missing) for the tests that open report.html in
# a real headless browser (tests/test_report_browser.py). Needs root (CI runs as root).
set -euo pipefail
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq chromium chromium-driver >&2
fi
chromium --version >&2
