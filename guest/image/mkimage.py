#!/usr/bin/env python3
"""Guest image pieces that need byte-level work: the ELF vmlinux inside a bzImage, module
dependency order from each module's .modinfo, and the initramfs (cpio newc) itself.
Called by guest/image/build.sh; run with --help for the subcommands."""
import argparse, hashlib, os, stat, struct, subprocess, sys


def die(msg):
    print(f"mkimage: {msg}", file=sys.stderr)
    sys.exit(1)


def vmlinux(args):
    data = open(args.bzimage, "rb").read()
    if data[0x202:0x206] != b"HdrS":
        die(f"{args.bzimage}: no Linux boot header (HdrS) at 0x202")
    setup_sects = data[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    off, length = struct.unpack_from("<II", data, 0x248)
    payload = data[pm_start + off : pm_start + off + length]
    if payload[:4] != b"\x02\x21\x4c\x18":
        die(f"{args.bzimage}: payload is not LZ4 legacy (magic {payload[:4].hex()})")
    # The kernel appends the uncompressed size after the LZ4 stream; lz4 -d stops cleanly
    # at the end of the last block and reports the trailer as garbage, hence no check=.
    r = subprocess.run(["lz4", "-dc"], input=payload, capture_output=True)
    out = r.stdout
    if out[:4] != b"\x7fELF":
        die(f"lz4 did not produce an ELF image: {r.stderr.decode(errors='replace')}")
    with open(args.out + ".tmp", "wb") as f:
        f.write(out)
    os.replace(args.out + ".tmp", args.out)
    print(f"vmlinux: {len(out) // 1024} KiB ELF from {os.path.basename(args.bzimage)}")


def modinfo(path):
    """key=value strings of a module's .modinfo section."""
    d = open(path, "rb").read()
    if d[:4] != b"\x7fELF" or d[4] != 2:
        die(f"{path}: not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", d, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", d, 0x3A)
    def sh(i):
        return struct.unpack_from("<IIQQQQIIQQ", d, shoff + i * shentsize)
    stroff = sh(shstrndx)[4]
    for i in range(shnum):
        name_off, _, _, _, off, size, *_ = sh(i)
        end = d.index(b"\0", stroff + name_off)
        if d[stroff + name_off : end] == b".modinfo":
            return dict(
                kv.split("=", 1) for kv in d[off : off + size].decode(errors="replace").split("\0") if "=" in kv
            )
    return {}


def module_order(moddir, wanted):
    index = {}
    for root, _, files in os.walk(moddir):
        for f in files:
            if f.endswith(".ko"):
                index[f[:-3].replace("-", "_")] = os.path.join(root, f)
    order, seen = [], set()
    def visit(name, chain):
        name = name.replace("-", "_")
        if name in seen:
            return
        if name not in index:
            die(f"module {name} (needed by {' <- '.join(chain) or 'the image'}) is not in {moddir}")
        deps = [x for x in modinfo(index[name]).get("depends", "").split(",") if x]
        for dep in deps:
            visit(dep, [name] + chain)
        seen.add(name)
        order.append((name, index[name]))
    for w in wanted:
        visit(w, [])
    return order


def cpio_entry(out, name, mode, data=b"", rdev=(0, 0), ino=[1]):
    ino[0] += 1
    hdr = "070701" + "".join(
        f"{v:08x}"
        for v in (ino[0], mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0)
    )
    out.write(hdr.encode() + name.encode() + b"\0")
    out.write(b"\0" * ((4 - (110 + len(name) + 1) % 4) % 4))
    out.write(data)
    out.write(b"\0" * ((4 - len(data) % 4) % 4))


def initramfs(args):
    if args.module and not args.modules_dir:
        die("--module needs --modules-dir")
    order = module_order(args.modules_dir, args.module) if args.modules_dir else []
    init = open(args.init, "rb").read()
    if not (init[:4] == b"\x7fELF" or init[:2] == b"#!"):
        die(f"{args.init}: neither an ELF binary nor a script")
    extra = []
    for spec in args.file:
        dest, sep, src = spec.partition("=")
        if not sep or not dest or dest.startswith("/"):
            die(f"--file {spec}: expected DEST=SOURCE with DEST relative to the image root")
        try:
            data = open(src, "rb").read()
        except OSError as e:
            die(f"--file {spec}: {e}")
        extra.append((dest, os.stat(src).st_mode & 0o777, data))
    tmp = args.out + ".tmp"
    with open(tmp, "wb") as out:
        dirs = ["dev", "proc", "sys", "run", "tmp", "etc", "etc/enclave", "lib", "lib/modules"]
        for dest, _, _ in extra:
            parts = dest.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.append(d)
        for d in dirs:
            cpio_entry(out, d, stat.S_IFDIR | 0o755)
        cpio_entry(out, "dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
        cpio_entry(out, "init", stat.S_IFREG | 0o755, init)
        for dest, mode, data in extra:
            cpio_entry(out, dest, stat.S_IFREG | mode, data)
        lines = []
        for name, path in order:
            cpio_entry(out, f"lib/modules/{name}.ko", stat.S_IFREG | 0o644, open(path, "rb").read())
            lines.append(f"/lib/modules/{name}.ko")
        cpio_entry(out, "etc/enclave/modules", stat.S_IFREG | 0o644, ("\n".join(lines) + "\n").encode())
        cpio_entry(out, "TRAILER!!!", 0)
    os.replace(tmp, args.out)
    print(f"initramfs: {os.path.getsize(args.out) // 1024} KiB, init {len(init) // 1024} KiB, "
          f"{len(extra)} more files, {len(order)} modules: {' '.join(n for n, _ in order)}")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    sub = p.add_subparsers(required=True)
    v = sub.add_parser("vmlinux", help="extract the ELF vmlinux from a bzImage with an LZ4 payload")
    v.add_argument("bzimage")
    v.add_argument("out")
    v.set_defaults(func=vmlinux)
    i = sub.add_parser("initramfs", help="write an initramfs: /init, more files, modules in load order "
                       "(listed in /etc/enclave/modules)")
    i.add_argument("--init", "--agent", dest="init", required=True,
                   help="what runs as /init: the static enclave-agent, or a script")
    i.add_argument("--file", action="append", default=[], metavar="DEST=SOURCE",
                   help="another file, at DEST (relative to the root), with SOURCE's permissions")
    i.add_argument("--modules-dir", help="lib/modules/<version> of the kernel package (none: a kernel with its drivers built in)")
    i.add_argument("--module", action="append", default=[], help="module to include (with its dependencies)")
    i.add_argument("--out", required=True)
    i.set_defaults(func=initramfs)
    a = p.parse_args()
    a.func(a)


if __name__ == "__main__":
    main()
