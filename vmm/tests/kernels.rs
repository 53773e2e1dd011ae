//! The kernel loaders with real Linux kernels (the guest image's ELF vmlinux and the Debian
//! bzImage it came from), without running them: this host cannot run a Linux kernel on KVM
//! (docs/vmm.md), but what the VMM lays out for one can be checked.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;

use enclave_tests::skip_or_fail;
use enclave_vmm::boot::{self, BootInfo};
use enclave_vmm::config::BootProtocol;
use enclave_vmm::memory;
use vm_memory::{Bytes, GuestAddress};

fn bzimage() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let cache = PathBuf::from(home).join(".cache/enclave/kernel");
    for pkg in std::fs::read_dir(cache).ok()?.flatten() {
        for f in std::fs::read_dir(pkg.path().join("pkg/boot"))
            .ok()?
            .flatten()
        {
            if f.file_name().to_string_lossy().starts_with("vmlinuz-") {
                return Some(f.path());
            }
        }
    }
    None
}

#[test]
fn elf_vmlinux_loads_with_its_pvh_entry() {
    let vmlinux = enclave_tests::workspace_root().join("target/guest/vmlinux");
    if !vmlinux.exists() {
        return skip_or_fail(
            "elf_vmlinux_loads_with_its_pvh_entry",
            "no target/guest/vmlinux (guest/image/build.sh)",
        );
    }
    let ram = memory::create(256 << 20).unwrap();
    let (entry, hdr) = boot::load_kernel(&ram.mem, &vmlinux, BootProtocol::Linux64).unwrap();
    assert!(hdr.is_none());
    assert_eq!(
        entry.addr, 0x100_0000,
        "Debian's vmlinux starts at 16 MiB physical"
    );
    let (pvh, _) = boot::load_kernel(&ram.mem, &vmlinux, BootProtocol::Pvh).unwrap();
    assert_ne!(pvh.addr, entry.addr, "PVH entry comes from the ELF note");
    assert!(
        pvh.addr > 0x100_0000 && pvh.addr < 0x400_0000,
        "{:#x}",
        pvh.addr
    );
    // The kernel's first bytes are where its program header says.
    let mut b = [0u8; 4];
    ram.mem
        .read_slice(&mut b, GuestAddress(entry.addr))
        .unwrap();
    assert_ne!(b, [0; 4]);
}

#[test]
fn bzimage_loads_and_its_setup_header_reaches_boot_params() {
    let Some(bz) = bzimage() else {
        return skip_or_fail(
            "bzimage_loads_and_its_setup_header_reaches_boot_params",
            "no cached Debian kernel package (guest/image/build.sh)",
        );
    };
    let ram = memory::create(256 << 20).unwrap();
    let (entry, hdr) = boot::load_kernel(&ram.mem, &bz, BootProtocol::Linux64).unwrap();
    let hdr = hdr.expect("a bzImage has a setup header");
    assert_eq!(
        entry.addr,
        0x10_0000 + 0x200,
        "64-bit entry is 0x200 into the protected-mode kernel"
    );
    assert_eq!({ hdr.header }, boot::hdr_magic());
    assert!({ hdr.version } >= 0x020c, "boot protocol {:#x}", {
        hdr.version
    });
    assert!(
        boot::load_kernel(&ram.mem, &bz, BootProtocol::Pvh).is_err(),
        "a bzImage has no PVH note"
    );
    let info = BootInfo {
        ranges: &ram.ranges,
        cmdline: "console=ttyS0",
        initrd: None,
        setup_header: Some(hdr),
        rsdp: None,
    };
    boot::write_boot_structures(&ram.mem, &info).unwrap();
    let p = boot::read_boot_params(&ram.mem).unwrap();
    assert_eq!(
        { p.hdr.version },
        { hdr.version },
        "the kernel's own header is copied in"
    );
    assert_eq!({ p.hdr.type_of_loader }, 0xff);
    assert_eq!({ p.hdr.cmd_line_ptr }, memory::CMDLINE_START as u32);
}
