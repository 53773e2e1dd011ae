#!/usr/bin/env bash
# The fresh-machine check: runs a README command on a pristine Debian 12 root, so that a
# missing install step shows here instead of on a new user's machine.
set -euo pipefail
usage() {
    cat <<'HELP'
Usage: scripts/fresh-check.sh [--command CMD] [--keep] [--rebuild-base]

Builds (once) a pristine Debian 12 root with debootstrap (variant minbase: fewer packages
than any real install, so anything set-up forgets shows), starts every run from an
untouched copy of it, copies a clean clone of this repository's HEAD into it (committed
work only), makes this machine's Rust toolchain available read-only, and runs the README's
first command there as root:

    bash scripts/demo.sh          (default; --command 'bash scripts/test.sh' for the tests)

/dev, /sys and a fresh /proc are mounted in (KVM, taps, network namespaces, nftables and
cgroups work as on the host), inside a private mount namespace so nothing leaks out.
Prints what it ran, the log's tail and the closing lines of every demo; exits non-zero
when anything fails.

  --command CMD     what to run in the clone (default: bash scripts/demo.sh)
  --keep            keep the root afterwards (default: removed on success)
  --rebuild-base    build the Debian base tarball again

Needs root. Base tarball cached in ${ENCLAVE_CACHE:-~/.cache/enclave}/fresh/; the root and
the full log go to ${ENCLAVE_FRESH_DIR:-/var/tmp/enclave-fresh}/. Rust comes from this
machine (rustc --print sysroot), mounted read-only; crates, tools and the guest image are
fetched and built from nothing inside the root, as on a new machine.
HELP
}
CMD="bash scripts/demo.sh"
KEEP=0
REBUILD=0
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --command) CMD=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --rebuild-base) REBUILD=1; shift ;;
        *) echo "fresh-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "fresh-check: needs root (debootstrap, chroot, mounts)" >&2; exit 2; }
cd "$(dirname "$0")/.."
REPO=$PWD
SUITE=bookworm
MIRROR=${ENCLAVE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${ENCLAVE_CACHE:-$HOME/.cache/enclave}/fresh
WORK=${ENCLAVE_FRESH_DIR:-/var/tmp/enclave-fresh}
ROOT=$WORK/root
LOG=$WORK/run.log
BASE=$CACHE/debian12-$SUITE-minbase.tar.gz
step() { printf '\n==> fresh-check: %s\n' "$*"; }
start=$(date +%s)

# Anything still running from a previous run inside the root (a daemon a failed demo left).
kill_inside() {
    local p r
    for p in /proc/[0-9]*; do
        r=$(readlink "$p/root" 2>/dev/null) || continue
        case "$r" in "$ROOT"|"$ROOT"/*) kill -9 "${p#/proc/}" 2>/dev/null || true ;; esac
    done
}

if ! command -v debootstrap >/dev/null; then
    step "installing debootstrap (Debian package)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
fi

if [ ! -f "$BASE" ] || [ "$REBUILD" = 1 ]; then
    step "building the pristine base: debootstrap --variant=minbase $SUITE from $MIRROR (once)"
    mkdir -p "$CACHE"
    tmp=$(mktemp -d "$CACHE/base.XXXXXX")
    debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log"; echo "fresh-check: debootstrap failed" >&2; rm -rf "$tmp"; exit 1; }
    tar -C "$tmp" -czf "$BASE.tmp" . && mv "$BASE.tmp" "$BASE"
    rm -rf "$tmp"
fi

step "a fresh root from $BASE"
kill_inside
# A previous run's mounts live in a mount namespace that died with it; nothing to unmount.
rm -rf "$ROOT"
mkdir -p "$ROOT"
tar -C "$ROOT" -xzf "$BASE"
# tar gives / the mode of debootstrap's temporary directory (0700); a machine's / is 0755,
# and the pod's unprivileged helpers must traverse it.
chmod 0755 "$ROOT"
# What any machine here has to reach the package registries: name resolution and apt's
# own settings for this mirror.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
for f in /etc/apt/apt.conf.d/99artifact-registry; do
    if [ -f "$f" ]; then cp "$f" "$ROOT/etc/apt/apt.conf.d/"; fi
done
# The machine's own certificate authorities (a workplace's TLS proxy, say): a new machine
# of the same kind trusts them too. ca-certificates (installed by set-up) folds them into
# the bundle; until then the copied bundle serves.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    mkdir -p "$ROOT/usr/local/share/ca-certificates" "$ROOT/etc/ssl/certs"
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
fi

step "a clean clone of HEAD ($(git -C "$REPO" rev-parse --short HEAD))"
git clone -q --no-local "$REPO" "$ROOT/root/enclave"
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
    echo "note: the working tree has uncommitted changes; they are not part of this check"
fi

SYSROOT=$(rustc --print sysroot)
RUSTC_VERSION=$(rustc --version)
mkdir -p "$ROOT/opt/rust"

step "running as root in the fresh root: $CMD (log: $LOG)"
echo "     Rust: $RUSTC_VERSION (read-only from $SYSROOT)"
set +e
unshare --mount --propagation private -- bash -euc '
    ROOT=$1; SYSROOT=$2; CMD=$3
    # The root a mount point of its own, as / is on a machine (containerd makes / rslave).
    mount --bind "$ROOT" "$ROOT"
    mount --bind "$SYSROOT" "$ROOT/opt/rust"
    mount -o remount,bind,ro "$ROOT/opt/rust"
    mount -t proc proc "$ROOT/proc"
    mount --rbind /dev "$ROOT/dev"
    mount --rbind /sys "$ROOT/sys"
    mount -t tmpfs tmpfs "$ROOT/run"
    mount -t tmpfs tmpfs "$ROOT/tmp"
    exec chroot "$ROOT" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        /bin/bash -c "cd /root/enclave && $CMD"
' fresh-check "$ROOT" "$SYSROOT" "$CMD" >"$LOG" 2>&1
rc=$?
set -e
kill_inside

step "last lines of the log"
tail -25 "$LOG"
step "every demo's opening and closing line"
grep -nE '^==> demo|^(demo|pod demo|ok|tests:|all .*(passed|clean)|PASS)' "$LOG" | tail -40 || true
elapsed=$(( $(date +%s) - start ))
if [ "$rc" = 0 ]; then
    echo
    echo "fresh-check: PASSED: '$CMD' exited 0 on a pristine Debian 12 ($SUITE, minbase) root with $RUSTC_VERSION in ${elapsed}s"
    [ "$KEEP" = 1 ] || rm -rf "$ROOT"
    exit 0
fi
echo
echo "fresh-check: FAILED: '$CMD' exited $rc on a pristine Debian 12 ($SUITE, minbase) root after ${elapsed}s; the root is kept in $ROOT, the log in $LOG" >&2
exit 1
