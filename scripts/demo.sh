#!/usr/bin/env bash
# The main job: set everything up, then run the policy demo (a PCI cardholder-data
# environment's traffic through per-pod enforcers, the node audit log, its verification).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n==> demo\n'
exec target/release/enclavectl demo --out target/demo "$@"
