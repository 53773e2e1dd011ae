#!/usr/bin/env bash
# Builds the purpose-built guest kernel from Debian's linux-source package with the
# fragment in guest/kernel/enclave-guest.config. Not needed by CI (which boots Debian's
# cloud kernel); this is the production option described in docs/guest.md.
set -euo pipefail
if [ "${1:-}" = -h ] || [ "${1:-}" = --help ]; then
    cat <<'HELP'
Usage: guest/kernel/build.sh [--out DIR] [--configure-only]

Installs linux-source and the kernel build dependencies (apt-get), configures
tinyconfig + guest/kernel/enclave-guest.config, checks every option of the fragment
survived, and builds DIR/vmlinux (default target/guest-kernel). Takes 10-30 minutes.
Use it with guest/image/build.sh output by replacing target/guest/vmlinux; with all
drivers built in, the initramfs module list is unused. --configure-only stops after the
configuration check (a minute or two).
HELP
    exit 0
fi
OUT=target/guest-kernel
CONFIGURE_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT=$2; shift 2 ;;
        --configure-only) CONFIGURE_ONLY=1; shift ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.."
ROOT=$PWD
FRAG=$ROOT/guest/kernel/enclave-guest.config
echo "==> packages"
DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-source bc bison flex libelf-dev libssl-dev \
    build-essential xz-utils >/dev/null
TARBALL=$(ls /usr/src/linux-source-*.tar.xz | sort -V | tail -1)
WORK=${ENCLAVE_CACHE:-$HOME/.cache/enclave}/kernel-src
mkdir -p "$WORK" "$OUT"
SRC=$WORK/$(basename "$TARBALL" .tar.xz)
if [ ! -d "$SRC" ]; then
    echo "==> unpacking $TARBALL"
    tar -C "$WORK" -xf "$TARBALL"
fi
cd "$SRC"
echo "==> configure: tinyconfig + $(basename "$FRAG")"
make -s tinyconfig
scripts/kconfig/merge_config.sh -m .config "$FRAG" >/dev/null
make -s olddefconfig
missing=0
while IFS= read -r line; do
    case "$line" in CONFIG_*=*) ;; *) continue ;; esac
    key=${line%%=*}; want=${line#*=}
    if [ "$want" = n ]; then
        grep -q "^$key=" .config && { echo "  $key should be off"; missing=1; }
    else
        grep -qx "$line" .config || { echo "  $key=$want did not survive (dependency missing?)"; missing=1; }
    fi
done < "$FRAG"
[ $missing = 0 ] || { echo "build.sh: the configuration lacks options above" >&2; exit 1; }
echo "every option of the fragment is set"
if [ $CONFIGURE_ONLY = 1 ]; then cp .config "$ROOT/$OUT/config"; exit 0; fi
echo "==> build vmlinux ($(nproc) jobs)"
make -s -j"$(nproc)" vmlinux
cp vmlinux "$ROOT/$OUT/vmlinux"
cp .config "$ROOT/$OUT/config"
echo "==> $OUT/vmlinux ($(du -h vmlinux | cut -f1))"
