#!/usr/bin/env bash
# Runs the matcher benchmarks (criterion) and prints the figures with their ratios to the
# baselines measured in the same run: the linear rule scan, and the full (non-cached) path.
# Run on a quiet machine; figures go into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(uname -r)"
echo "rustc:   $(rustc --version)"
cargo bench --locked -p enclave-netfilter --bench matcher 2>&1 | grep -E '^[a-z_/0-9]+ +time:|^[a-z_/0-9]+$|^\s+time:' || true
python3 - <<'PY'
import json, os
base = "target/criterion"
def ns(path):
    f = os.path.join(base, path, "new", "estimates.json")
    return json.load(open(f))["median"]["point_estimate"] if os.path.exists(f) else None
def fmt(v):
    return "   n/a" if v is None else (f"{v:8.1f} ns" if v < 1000 else f"{v/1000:8.2f} µs")
print()
print(f"{'measurement':<40}{'median':>12}  notes")
fast, full = ns("established_flow_decide"), ns("established_flow_decide_full_path")
print(f"{'established flow, flow cache':<40}{fmt(fast):>12}  goal <= 50 ns")
print(f"{'established flow, full path':<40}{fmt(full):>12}  " + (f"flow cache {full/fast:.1f}x faster" if fast and full else ""))
for n in (10, 1000, 10000):
    print(f"{'new flow, ' + str(n) + ' rules':<40}{fmt(ns(f'new_flow_decide/{n}')):>12}  goal <= 500 ns at 10,000")
lo, hi = ns("new_flow_decide/10"), ns("new_flow_decide/10000")
if lo and hi:
    print(f"{'new flow 10,000 rules / 10 rules':<40}{hi/lo:>12.2f}x (flat means ~1)")
for n in (10, 1000, 10000):
    c, l = ns(f"rule_lookup/compiled/{n}"), ns(f"rule_lookup/linear_baseline/{n}")
    r = f"linear baseline {l/c:,.0f}x slower" if c and l else ""
    print(f"{'rule lookup, ' + str(n) + ' rules: compiled':<40}{fmt(c):>12}  vs linear {fmt(l).strip()}: {r}")
PY

echo
echo "== enclave-vmm vs QEMU microvm on the probe guest (real KVM) =="
cargo bench --locked -p enclave-vmm --bench vmm_boot 2>&1 | grep -vE '^\s+(Compiling|Finished|Running|Downloaded|Downloading)' || true

echo
echo "== ctr run through containerd-shim-enclave-v2 vs runc (real containerd; guest under TCG here) =="
cargo bench --locked -p enclave-shim --bench ctr_run 2>&1 | grep -vE '^\s+(Compiling|Finished|Running|Downloaded|Downloading)' || true

echo
echo "== enclave-netd datapath: the probe guest on enclave-vmm, forward-only vs allow-all vs PCI CDE (real KVM) =="
cargo build --release --locked -p enclave-netd -q
cargo bench --locked -p enclave-vmm --bench net_datapath 2>&1 | grep -vE '^\s+(Compiling|Finished|Running|Downloaded|Downloading)' || true

echo
echo "== the pod network end to end: netd (allow-all, PCI CDE) vs QEMU's tap (guest under TCG here) =="
cargo bench --locked -p enclave-tests --bench pod_net 2>&1 | grep -vE '^\s+(Compiling|Finished|Running|Downloaded|Downloading)|^enclave-shim:' || true
