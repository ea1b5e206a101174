#!/usr/bin/env bash
# Headless Chromium for tests/test_feature_browser.py (the feature browser rendered in a real browser).
# Run by `make test` before pytest. It never fails: without a browser those tests skip, and this says why.
for name in chromium chromium-browser google-chrome; do
    if path=$(command -v "$name"); then
        echo "browser tests: using $path ($("$path" --version 2>/dev/null | head -n 1))"
        exit 0
    fi
done
skip() { echo "browser tests will be skipped: no chromium, chromium-browser or google-chrome on PATH ($1)"; exit 0; }
[ "$(id -u)" = 0 ] || skip "not root, so cannot apt-get install chromium"
command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install chromium with"
export DEBIAN_FRONTEND=noninteractive
install_chromium() { apt-get install -y -q chromium; }
# A fresh image often has no package lists: update them only when the install fails, not on every run.
install_chromium || { apt-get update -q && install_chromium; } || skip "apt-get install chromium failed (see above)"
echo "browser tests: installed $(command -v chromium) ($(chromium --version 2>/dev/null | head -n 1))"
