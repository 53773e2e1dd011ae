#!/usr/bin/env bash
# The main job: set everything up, then run the demos: pods in microVMs through containerd
# and CRI (a PCI CDE pod and a web pod, each in its own VM, torn down clean), a microVM and
# its agent up close, enclave-vmm on real KVM (the probe guest, jailed), and the policy demo
# (a PCI cardholder-data environment's traffic through per-pod enforcers, the node audit
# log, its verification).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n==> demo 1: pods in microVMs through containerd and CRI (RuntimeClass handler enclave)\n'
cargo run -q --release --locked -p enclave-shim --example pod_demo
printf '\n==> demo 2: a pod sandbox microVM and its agent, up close\n'
cargo run -q --release --locked -p enclave-tests --example guest_demo
printf '\n==> demo 3: enclave-vmm on real KVM: a jailed microVM, checked from inside\n'
cargo run -q --release --locked -p enclave-vmm --example vmm_demo
printf '\n==> demo 4: zone policy decisions and the audit log\n'
exec target/release/enclavectl demo --out target/demo "$@"
