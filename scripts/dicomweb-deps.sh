#!/bin/sh
# Idempotent installs for the DICOMweb mode and its tests: Orthanc + DICOMweb plugin and Chromium
# (Debian packages), playwright-core (npm, tests/e2e), dcmqi's itkimage2segimage (PyPI, into the venv).
# Each step is skipped when already there, so a ready machine passes in well under a second.
set -eu
VENV_BIN=${1:-.venv/bin}
E2E_DIR=${2:-tests/e2e}

missing=""
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
if [ -n "$missing" ]; then
    echo "dicomweb-deps: apt-get install$missing"
    if [ "$(id -u)" -ne 0 ]; then
        echo "dicomweb-deps: need root for apt-get (run: sudo apt-get install$missing)" >&2
        exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if [ ! -x "$VENV_BIN/itkimage2segimage" ]; then
    echo "dicomweb-deps: pip install dcmqi (itkimage2segimage)"
    "$VENV_BIN/python" -m pip install -q "dcmqi==1.5.7"
fi

if [ ! -f "$E2E_DIR/node_modules/playwright-core/package.json" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || { echo "dicomweb-deps: npm is required (apt-get install nodejs npm)" >&2; exit 1; }
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    fi
    echo "dicomweb-deps: npm ci in $E2E_DIR (playwright-core)"
    (cd "$E2E_DIR" && npm ci --no-audit --no-fund --silent)
fi
