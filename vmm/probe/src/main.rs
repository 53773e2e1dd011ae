//! The probe guest: a freestanding x86-64 program the VMM boots like a Linux kernel. After
//! a few CPL0 instructions (entry.S) it runs at CPL3 with IOPL 3, natively even where KVM
//! emulates kernel mode, and checks the VMM from the inside:
//! 1. the boot_params the Linux boot protocol promises (magic, e820, command line, initrd);
//! 2. virtio-mmio devices named on the command line (`virtio_mmio.device=4K@ADDR:IRQ`);
//! 3. vsock: a connection to a host port and one accepted from the host, with data;
//! 4. net: frames sent through the (vhost-user) net device and frames received;
//! 5. fs: FUSE requests answered by virtiofsd through the vhost-user frontend.
//!
//! Every result is a line on COM1: `CHECK <name> ok` or `CHECK <name> FAIL <why>`, then
//! `PROBE DONE <failures>`, then a reset through the i8042. Options come from the command
//! line: `probe.exit` (stop right after entry, for boot benchmarks), `probe.vsock_port=P`
//! (host port to connect to), `probe.vsock_listen=P` (guest port to accept on),
//! `probe.net_frames=N` (frames to send), `probe.net_batch=K` (frames per kick), `probe.net_udp=1`
//! (IPv4/UDP DNS queries 10.1.0.5 -> 10.96.0.10:53 instead of test frames), `probe.net_expect=N` (frames to wait for),
//! `probe.fs_file=NAME` (a file to read through virtio-fs), `probe.hostile` (misbehave first), `probe.initrd_sum=X` (expected FNV-1a of the
//! initrd, hex).
#![no_std]
#![no_main]

mod fs;
mod hostile;
mod io;
mod net;
mod virtio;
mod vsock;

use core::arch::global_asm;

use io::{print, print_hex, println, reset};

global_asm!(include_str!("entry.S"), options(att_syntax));

/// Offsets in `boot_params` (Documentation/arch/x86/zero-page.rst).
mod bp {
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER: usize = 0x202;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const E820_TABLE: usize = 0x2d0;
}

static mut FAILURES: u32 = 0;

/// Reports one check.
pub fn check(name: &str, ok: bool, why: &str) {
    print("CHECK ");
    print(name);
    if ok {
        println(" ok");
    } else {
        print(" FAIL ");
        println(why);
        // SAFETY: single-threaded guest; no other reference to FAILURES exists.
        unsafe { FAILURES += 1 };
    }
}

/// Reads a value of guest physical memory (identity mapped).
pub fn peek<T: Copy>(addr: usize) -> T {
    // SAFETY: the probe identity-maps the first 4 GiB; callers pass addresses the VMM
    // handed over (boot_params, command line, initrd) or device windows.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// A NUL-terminated string at `ptr` (at most 4 KiB).
fn c_string(ptr: usize) -> &'static [u8] {
    if ptr == 0 {
        return &[];
    }
    let mut len = 0;
    while len < 4096 && peek::<u8>(ptr + len) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes at `ptr` were just read one by one; memory is identity mapped.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
}

/// What either boot protocol handed over.
struct Boot {
    cmdline: &'static [u8],
    /// (address, size) of the initrd.
    initrd: Option<(usize, usize)>,
    /// e820-style memory map: (address, size, type) entries, at most 32.
    map: [(u64, u64, u32); 32],
    entries: usize,
}

/// Offsets in `hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h).
mod pvh {
    pub const MAGIC: u32 = 0x336e_c578;
    pub const NR_MODULES: usize = 12;
    pub const MODLIST: usize = 16;
    pub const CMDLINE: usize = 24;
    pub const MEMMAP: usize = 40;
    pub const MEMMAP_ENTRIES: usize = 48;
}

fn boot_linux(bp: usize) -> Boot {
    check("boot_params.magic", peek::<u32>(bp + bp::HEADER) == 0x5372_6448, "header is not HdrS");
    check("boot_params.boot_flag", peek::<u16>(bp + bp::BOOT_FLAG) == 0xaa55, "boot_flag is not 0xAA55");
    let mut b = Boot { cmdline: c_string(peek::<u32>(bp + bp::CMD_LINE_PTR) as usize), initrd: None, map: [(0, 0, 0); 32], entries: 0 };
    let image = peek::<u32>(bp + bp::RAMDISK_IMAGE) as usize;
    if image != 0 {
        b.initrd = Some((image, peek::<u32>(bp + bp::RAMDISK_SIZE) as usize));
    }
    b.entries = (peek::<u8>(bp + bp::E820_ENTRIES) as usize).min(32);
    for i in 0..b.entries {
        let e = bp + bp::E820_TABLE + i * 20;
        b.map[i] = (peek::<u64>(e), peek::<u64>(e + 8), peek::<u32>(e + 16));
    }
    b
}

fn boot_pvh(si: usize) -> Boot {
    check("pvh.magic", peek::<u32>(si) == pvh::MAGIC, "hvm_start_info magic is wrong");
    let mut b = Boot { cmdline: c_string(peek::<u64>(si + pvh::CMDLINE) as usize), initrd: None, map: [(0, 0, 0); 32], entries: 0 };
    if peek::<u32>(si + pvh::NR_MODULES) > 0 {
        let m = peek::<u64>(si + pvh::MODLIST) as usize;
        b.initrd = Some((peek::<u64>(m) as usize, peek::<u64>(m + 8) as usize));
    }
    let map = peek::<u64>(si + pvh::MEMMAP) as usize;
    b.entries = (peek::<u32>(si + pvh::MEMMAP_ENTRIES) as usize).min(32);
    for i in 0..b.entries {
        let e = map + i * 24;
        b.map[i] = (peek::<u64>(e), peek::<u64>(e + 8), peek::<u32>(e + 16));
    }
    b
}

/// The value of `key=` on the command line.
pub fn param<'a>(line: &'a [u8], key: &str) -> Option<&'a [u8]> {
    line.split(|&b| b == b' ').find_map(|w| w.strip_prefix(key.as_bytes()).and_then(|r| r.strip_prefix(b"=")))
}

/// Whether a bare `word` is on the command line.
fn flag(line: &[u8], word: &str) -> bool {
    line.split(|&b| b == b' ').any(|w| w == word.as_bytes())
}

/// Parses decimal or 0x-hex.
pub fn parse_u64(s: &[u8]) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix(b"0x") {
        Some(h) => (h, 16),
        None => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    Some(v)
}

fn fnv1a(addr: usize, len: usize) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for i in 0..len {
        h ^= peek::<u8>(addr + i) as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn check_boot(b: &Boot) {
    // Sorted by address (QEMU's PVH map is not), entries must not overlap.
    let mut map = b.map;
    map[..b.entries].sort_unstable_by_key(|e| e.0);
    let mut ram_above_1m = 0u64;
    let mut sorted = true;
    let mut last_end = 0u64;
    for &(addr, size, kind) in &map[..b.entries] {
        if size == 0 {
            continue; // QEMU lists an empty entry
        }
        sorted &= addr >= last_end;
        last_end = addr.saturating_add(size);
        if kind == 1 && addr >= 0x10_0000 {
            ram_above_1m += size;
        }
    }
    print("INFO e820 entries=");
    print_hex(b.entries as u64);
    print(" ram_above_1m=");
    print_hex(ram_above_1m);
    println("");
    let ok = b.entries >= 2 && sorted && ram_above_1m >= 8 << 20;
    if !ok {
        for &(addr, size, kind) in &map[..b.entries] {
            print("INFO e820 ");
            print_hex(addr);
            print(" ");
            print_hex(size);
            print(" ");
            print_hex(kind as u64);
            println("");
        }
    }
    check("e820", ok, "fewer than 2 entries, overlapping, or under 8 MiB of RAM above 1 MiB");
    check("cmdline", !b.cmdline.is_empty() && param(b.cmdline, "console").is_some(), "no command line or no console= on it");
    if let Some(want) = param(b.cmdline, "probe.initrd_sum").and_then(parse_u64) {
        let ok = matches!(b.initrd, Some((image, size)) if image % 4096 == 0 && image >= 0x10_0000 && fnv1a(image, size) == want);
        check("initrd", ok, "initrd missing, misaligned, or its FNV-1a differs");
    }
}

fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    cs & 3
}

#[no_mangle]
extern "C" fn probe_main(info: usize, pvh: usize) -> ! {
    println(""); // after the '@' the entry code printed
    let boot = if pvh == 1 { boot_pvh(info) } else { boot_linux(info) };
    let line = boot.cmdline;
    if flag(line, "probe.exit") {
        reset();
    }
    println(if pvh == 1 { "enclave probe guest (PVH entry)" } else { "enclave probe guest (Linux 64-bit entry)" });
    check("cpl3", cpl() == 3, "not running in user mode");
    check_boot(&boot);
    if flag(line, "probe.idle") {
        // For memory measurements: stay up, natively, at CPL3.
        println("INFO idle");
        loop {
            core::hint::spin_loop();
        }
    }

    let devices = virtio::discover(line);
    print("INFO virtio devices=");
    print_hex(devices.iter().flatten().count() as u64);
    println("");
    for dev in devices.iter().flatten() {
        match dev.device_id() {
            19 => {
                if flag(line, "probe.hostile") {
                    hostile::run(dev);
                }
                vsock::run(dev, line)
            }
            1 => net::run(dev, line),
            26 => fs::run(dev, line),
            id => {
                print("INFO skipping device type ");
                print_hex(id as u64);
                println("");
            }
        }
    }
    // SAFETY: single-threaded guest.
    let failures = unsafe { FAILURES };
    print("PROBE DONE ");
    print_hex(failures as u64);
    println("");
    reset();
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    println("PROBE PANIC");
    reset();
}
