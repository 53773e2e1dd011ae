#!/usr/bin/env bash
# Builds the guest image: target/guest/vmlinux (the kernel, an ELF that boots through PVH)
# and target/guest/initramfs.cpio (enclave-agent as /init plus the kernel modules it loads).
set -euo pipefail
usage() {
    cat <<'HELP'
Usage: guest/image/build.sh [--out DIR] [--kernel-package NAME | --kernel VMLINUX]

Builds the Enclave guest image into DIR (default: target/guest):
  vmlinux            the guest kernel (ELF, PVH entry)
  initramfs.cpio     /init = enclave-agent (static), and the modules it loads at boot
  cmdline            the kernel command line the image expects
  manifest           kernel package, agent hash, module list, cmdline-devices when the
                     kernel takes virtio-mmio devices from its command line

The kernel comes from Debian's cloud kernel package (the one linux-image-cloud-amd64
depends on, or --kernel-package), fetched with apt-get download and cached under
${ENCLAVE_CACHE:-~/.cache/enclave}/kernel/. With nothing changed a rebuild takes seconds.
--kernel VMLINUX uses a kernel built elsewhere instead, such as the purpose-built one
(bash guest/kernel/build.sh, then --kernel target/guest-kernel/vmlinux): its drivers are
built in, so the initramfs carries no modules. See guest/kernel/ and docs/guest.md.
HELP
}
OUT=target/guest
PKG=
KERNEL=
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --out) OUT=$2; shift 2 ;;
        --kernel-package) PKG=$2; shift 2 ;;
        --kernel) KERNEL=$(realpath "$2"); shift 2 ;;
        *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
cd "$(dirname "$0")/../.."
ROOT=$PWD
CACHE=${ENCLAVE_CACHE:-$HOME/.cache/enclave}
MODULES=(virtio_mmio virtio_net vsock vmw_vsock_virtio_transport fuse virtiofs overlay)
step() { echo "==> $*"; }

for tool in lz4 dpkg-deb apt-get python3; do
    command -v "$tool" >/dev/null || { echo "build.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done

step "agent: static release build"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --release -q \
    -p enclave-agent --target x86_64-unknown-linux-gnu
AGENT=$ROOT/target/x86_64-unknown-linux-gnu/release/enclave-agent
if ldd "$AGENT" 2>/dev/null | grep -q '=>'; then echo "build.sh: $AGENT is not static" >&2; exit 1; fi
if command -v strip >/dev/null; then
    strip -o "$AGENT.stripped" "$AGENT" && AGENT=$AGENT.stripped
fi

if [ -n "$KERNEL" ]; then
    [ -f "$KERNEL" ] || { echo "build.sh: --kernel $KERNEL: no such file" >&2; exit 1; }
    mkdir -p "$OUT"
    KSUM=$(sha256sum "$KERNEL" | cut -d' ' -f1)
    KEY=$( (sha256sum "$AGENT" guest/image/mkimage.py guest/image/build.sh; echo "custom $KSUM") | sha256sum | cut -c1-16)
    if [ -f "$OUT/manifest" ] && grep -q "^key $KEY$" "$OUT/manifest" && [ -f "$OUT/initramfs.cpio" ] && [ -f "$OUT/vmlinux" ]; then
        step "image: up to date ($OUT, key $KEY)"
        exit 0
    fi
    step "initramfs (no modules: the kernel's drivers are built in)"
    python3 guest/image/mkimage.py initramfs --agent "$AGENT" --out "$OUT/initramfs.cpio"
    cp "$KERNEL" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    echo "console=ttyS0 reboot=t panic=-1 quiet" > "$OUT/cmdline"
    printf 'key %s\nkernel custom %s\nagent %s\nmodules\n' "$KEY" "$KSUM" "$(sha256sum "$AGENT" | cut -d' ' -f1)" > "$OUT/manifest"
    step "image ready in $OUT (kernel $KERNEL)"
    exit 0
fi

if [ -z "$PKG" ]; then
    PKG=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    if [ -z "$PKG" ]; then
        step "apt-get update (no package lists)"
        apt-get update -q >/dev/null
        PKG=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
    fi
fi
VER=$(apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/{print $2}')
KDIR=$CACHE/kernel/${PKG}_${VER}
if [ ! -f "$KDIR/complete" ]; then
    step "kernel: fetching $PKG $VER (cached in $KDIR)"
    rm -rf "$KDIR"; mkdir -p "$KDIR/dl"
    (cd "$KDIR/dl" && apt-get download -q "$PKG" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true)
    DEB=$(ls "$KDIR"/dl/*.deb)
    dpkg-deb -x "$DEB" "$KDIR/pkg"
    python3 guest/image/mkimage.py vmlinux "$KDIR"/pkg/boot/vmlinuz-* "$KDIR/vmlinux"
    cp "$KDIR"/pkg/boot/config-* "$KDIR/config"
    rm -rf "$KDIR/dl"
    touch "$KDIR/complete"
else
    step "kernel: $PKG $VER from cache"
fi
KREL=${PKG#linux-image-}

mkdir -p "$OUT"
KEY=$( (sha256sum "$AGENT" guest/image/mkimage.py guest/image/build.sh; echo "$PKG $VER ${MODULES[*]}") | sha256sum | cut -c1-16)
if [ -f "$OUT/manifest" ] && grep -q "^key $KEY$" "$OUT/manifest" && [ -f "$OUT/initramfs.cpio" ] && [ -f "$OUT/vmlinux" ]; then
    step "image: up to date ($OUT, key $KEY)"
    exit 0
fi
step "initramfs"
python3 guest/image/mkimage.py initramfs --agent "$AGENT" --modules-dir "$KDIR/pkg/lib/modules/$KREL" \
    $(printf -- '--module %s ' "${MODULES[@]}") --out "$OUT/initramfs.cpio"
cp "$KDIR/vmlinux" "$OUT/vmlinux.tmp" && mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
echo "console=ttyS0 reboot=t panic=-1 quiet" > "$OUT/cmdline"
{
    echo "key $KEY"
    echo "kernel $PKG $VER"
    echo "agent $(sha256sum "$AGENT" | cut -d' ' -f1)"
    echo "modules ${MODULES[*]}"
    # Whether the kernel could also take virtio-mmio devices from its command line. For
    # information only: enclave-vmm describes them in ACPI, which every Linux guest needs on
    # its hardware-reduced platform (docs/vmm.md).
    if grep -q '^CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES=y' "$KDIR/config" 2>/dev/null; then
        echo "cmdline-devices"
    fi
} > "$OUT/manifest"
step "image ready in $OUT"
