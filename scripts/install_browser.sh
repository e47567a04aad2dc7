#!/usr/bin/env bash
# Make sure a Chrome/Chromium is there, for plotly's static image export (scripts/install_figures.sh:
# kaleido drives it) and for the tests that draw the report pages in a headless browser
# (tests/unit/test_pages_in_browser.py; scripts/install.sh --dev runs this).
#   scripts/install_browser.sh             a browser, or exit 1
#   scripts/install_browser.sh --optional  the same, but without apt-get only a note (exit 0)
# Nothing to do when $BROWSER_PATH or a chromium / chromium-browser / google-chrome on PATH is there;
# otherwise Debian's chromium (+ fonts-liberation, Arial's metrics) with apt-get (as root, else sudo).
set -euo pipefail
OPTIONAL=0
[[ ${1:-} == --optional ]] && OPTIONAL=1

find_browser() {
  local found=${BROWSER_PATH:-$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)}
  [[ -n $found && -x $found ]] && echo "$found"
  return 0
}

browser=$(find_browser)
if [[ -n $browser ]]; then
  echo "install_browser: browser $browser"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  if [[ $OPTIONAL == 1 ]]; then
    echo "install_browser: no Chrome/Chromium and no apt-get; the browser tests will be skipped (install one, or set BROWSER_PATH)" >&2
    exit 0
  fi
  echo "install_browser: no Chrome/Chromium and no apt-get; install one and set BROWSER_PATH" >&2
  exit 1
fi
SUDO=()
[[ $(id -u) == 0 ]] || SUDO=(sudo)
echo "install_browser: apt-get install chromium fonts-liberation"
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation
browser=$(find_browser)
if [[ -z $browser ]]; then
  echo "install_browser: apt-get installed chromium, but no chromium is on PATH" >&2
  exit 1
fi
echo "install_browser: browser $browser"
