#!/usr/bin/env bash
# Installs what Enclave needs on a Debian 12 machine (as root) and builds it.
# Safe to run again: it installs only what is missing. Prints each step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# netfilter: libnftnl/libmnl/nftables/iproute2. guest: qemu (test VMs), busybox-static
# (test container rootfs), lz4 (kernel payload), libcap-ng/libseccomp (to build virtiofsd).
# shim: containerd and runc (the real containerd the shim is tested with), tar (images),
# CNI plugins (pods through CRI). tests and the pod demo: protobuf-compiler (protoc, which
# the k8s-cri crate's build.rs runs), iputils-ping (the pod-IP checks), python3 and
# ca-certificates (the image builder; cargo's registry over TLS), util-linux (nsenter),
# bsdutils (script: the tty test), cpio/xz-utils/binutils (kernel package, strip), procps
# (sysctl: the shim's pod network plumbing), rsyslog (the receiver the audit export test
# ships records and heads to), postgresql/redis-server/redis-tools/curl (the real servers
# and clients the inspection test runs through pods), tshark (reads the captures back),
# dnsmasq-base and openssl (the cluster DNS and the TLS servers of the names test and the
# pod demo), chromium (the segmentation test loads its HTML report in a headless browser).
APT_PACKAGES=(pkg-config libnftnl-dev libmnl-dev nftables iproute2 build-essential
  qemu-system-x86 busybox-static lz4 libcap-ng-dev libseccomp-dev containerd runc tar
  containernetworking-plugins protobuf-compiler iputils-ping python3 ca-certificates
  util-linux bsdutils binutils xz-utils procps rsyslog postgresql redis-server redis-tools
  curl tshark dnsmasq-base openssl chromium)

step "system packages: ${APT_PACKAGES[*]}"
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${missing[*]} (run as root, or: sudo apt-get install ${missing[*]})" >&2
    exit 2
  fi
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "all present"
fi

step "Rust toolchain"
if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust 1.80 or newer (https://rustup.rs), then run this again" >&2
  exit 2
fi
rustc_minor=$(rustc --version | sed -E 's/rustc 1\.([0-9]+).*/\1/')
if [ "$rustc_minor" -lt 80 ]; then
  echo "rustc $(rustc --version) is too old: Enclave needs 1.80 or newer" >&2
  exit 2
fi
rustc --version

step "build (release): enclavectl, enclave-vmm, enclave-jailer, enclave-netd, containerd-shim-enclave-v2"
cargo build --release --locked --bin enclavectl --bin enclave-vmm --bin enclave-jailer --bin enclave-netd \
  --bin containerd-shim-enclave-v2 2>&1 \
  | grep -vE '^\s+(Compiling|Downloaded|Downloading)' || true
for b in enclavectl enclave-vmm enclave-jailer enclave-netd containerd-shim-enclave-v2; do
  test -x "target/release/$b" || { echo "build failed: target/release/$b" >&2; exit 1; }
done
echo "built target/release/{enclavectl,enclave-vmm,enclave-jailer,enclave-netd,containerd-shim-enclave-v2}"

# Tools built from crates.io, cached outside the clone (keyed by name and version) so a
# fresh clone does not rebuild them.
CACHE=${ENCLAVE_CACHE:-$HOME/.cache/enclave}
TOOLS=(vhost-device-vsock:0.3.0 virtiofsd:1.14.0)
step "host tools for guest VMs: ${TOOLS[*]} (cached in $CACHE/tools)"
for t in "${TOOLS[@]}"; do
  name=${t%%:*}; ver=${t##*:}
  if [ -x "$CACHE/tools/bin/$name" ] && grep -q "^\"$name $ver " "$CACHE/tools/.crates.toml" 2>/dev/null; then
    echo "$name $ver: cached"
  else
    echo "$name $ver: building (a few minutes, once)"
    cargo install -q --locked --root "$CACHE/tools" --version "$ver" "$name"
  fi
done
# The shim runs the vsock backend as an unprivileged uid, which cannot reach a cache under
# /root: the helpers live where a node keeps them (the shim looks there first).
if [ "$(id -u)" = 0 ]; then
  install -d -m 0755 /usr/local/lib/enclave/bin
  for t in "${TOOLS[@]}"; do
    name=${t%%:*}
    cmp -s "$CACHE/tools/bin/$name" "/usr/local/lib/enclave/bin/$name" \
      || install -m 0755 "$CACHE/tools/bin/$name" "/usr/local/lib/enclave/bin/$name"
  done
  echo "installed in /usr/local/lib/enclave/bin"
fi

step "guest image (kernel cached in $CACHE/kernel)"
bash guest/image/build.sh
