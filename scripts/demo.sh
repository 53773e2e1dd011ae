#!/usr/bin/env bash
# The main job: set everything up, then run the demos: a microVM (the guest image booted
# under QEMU, a container run through the agent over vsock), enclave-vmm on real KVM (the
# probe guest, jailed), and the policy demo (a PCI cardholder-data environment's traffic
# through per-pod enforcers, the node audit log, its verification).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
printf '\n==> demo 1: a pod sandbox microVM and its agent\n'
cargo run -q --release --locked -p enclave-tests --example guest_demo
printf '\n==> demo 2: enclave-vmm on real KVM: a jailed microVM, checked from inside\n'
cargo run -q --release --locked -p enclave-vmm --example vmm_demo
printf '\n==> demo 3: zone policy decisions and the audit log\n'
exec target/release/enclavectl demo --out target/demo "$@"
