#!/usr/bin/env bash
# Installs what tests/test_html_page.py needs to load memfit's HTML page in a real browser:
# Debian's chromium (apt) and the Python package playwright, which drives it through
# executable_path=/usr/bin/chromium. Never `playwright install`: that downloads browser builds
# from a CDN. Idempotent and quiet; where apt or pip cannot be used it says so and exits 0,
# and the browser tests skip with their reason.
#
# Usage: tools/install_browser.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
    :
elif ! command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: no apt-get here; install Chromium yourself (the browser tests skip without it)" >&2
elif [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then
    echo "install_browser: not root and no sudo; run as root: apt-get install -y chromium" >&2
else
    SUDO=""; [ "$(id -u)" != 0 ] && SUDO="sudo -n"
    $SUDO apt-get update -qq >/tmp/install_browser.apt.log 2>&1
    if ! DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >>/tmp/install_browser.apt.log 2>&1; then
        echo "install_browser: apt-get install chromium failed (see /tmp/install_browser.apt.log);" \
             "the browser tests will skip" >&2
    fi
fi

if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
    if ! "$PY" -m pip install -q "playwright>=1.40" >/tmp/install_browser.pip.log 2>&1; then
        echo "install_browser: pip install playwright failed (see /tmp/install_browser.pip.log);" \
             "the browser tests will skip" >&2
    fi
fi
exit 0
