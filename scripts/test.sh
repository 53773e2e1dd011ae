#!/usr/bin/env bash
# The test suite: formatting, lints, the fuzz targets compile, and every test.
# Privileged tests (network namespaces, nftables) run when root; in CI, or as root, a
# privileged test that cannot run fails instead of reporting itself skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh

if [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; then
  export ENCLAVE_REQUIRE_PRIVILEGED=1
  # setup.sh has installed QEMU, the vhost-user backends and built the guest image, so a
  # guest test that cannot boot is a failure, not a skip.
  export ENCLAVE_REQUIRE_VM=1
fi

printf '\n==> rustfmt\n'
cargo fmt --all -- --check
echo "formatted"

printf '\n==> clippy (warnings are errors)\n'
cargo clippy --locked --all-targets -q -- -D warnings
echo "clean"

printf '\n==> fuzz targets compile\n'
cargo check -q --manifest-path netfilter/fuzz/Cargo.toml --bins
cargo check -q --manifest-path guest/fuzz/Cargo.toml --bins
cargo check -q --manifest-path vmm/fuzz/Cargo.toml --bins
echo "ok"

printf '\n==> tests\n'
# Every binary first: tests of one crate run another's (the VMM tests start enclave-netd),
# and `cargo test` builds only the binaries of the crate under test.
cargo build --locked --workspace --bins -q
# --nocapture so that SKIPPED lines from passing tests reach the log and are counted.
cargo test --locked --workspace --no-fail-fast -- --nocapture 2>&1 | tee target/test.log | grep -E '^(test |running|test result)|SKIPPED|panicked' || true
if ! grep -q "test result" target/test.log || grep -q "test result: FAILED" target/test.log || grep -qE "^error" target/test.log; then
  grep -E -A3 "^error|FAILED|panicked" target/test.log | head -40
  echo "TESTS FAILED" >&2
  exit 1
fi
passed=$(grep -oE '[0-9]+ passed' target/test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -oE '[0-9]+ failed' target/test.log | awk '{s+=$1} END {print s+0}')
skipped=$(grep -c SKIPPED target/test.log || true)
echo
echo "tests: $passed passed, $failed failed, $skipped skipped ($(( $(date +%s) - start ))s)"
