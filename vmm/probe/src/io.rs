//! Port I/O from CPL3 (IOPL 3): COM1 output, the i8042 reset, and the mem* functions the
//! compiler expects (there is no libc).

use core::arch::asm;

const COM1: u16 = 0x3f8;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: IOPL 3 lets CPL3 do port I/O; the ports used are COM1 and the i8042.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

/// Prints a string on COM1.
pub fn print(s: &str) {
    for b in s.bytes() {
        outb(COM1, b);
    }
}

/// Prints a string and a newline.
pub fn println(s: &str) {
    print(s);
    outb(COM1, b'\n');
}

/// Prints bytes (non-printable ones as '.').
pub fn print_bytes(s: &[u8]) {
    for &b in s {
        outb(COM1, if (0x20..0x7f).contains(&b) { b } else { b'.' });
    }
}

/// Prints `0x` and a number in hex.
pub fn print_hex(v: u64) {
    print("0x");
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xf) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            outb(COM1, if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

extern "C" {
    static mut exiting: u8;
}

/// Asks the VMM to stop: pulse the reset line through the i8042; then QEMU's isa-debug-exit
/// port (0xf4), for QEMU's microvm which has no i8042; failing both, fault on purpose so the
/// CPL0 handler triple-faults.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    outb(0xf4, 0);
    // SAFETY: `exiting` is a byte in the probe's own (user-accessible) data.
    unsafe { core::ptr::write_volatile(&raw mut exiting, 1) };
    for _ in 0..1_000_000 {
        core::hint::spin_loop();
    }
    // SAFETY: ud2 raises #UD, which the fault handler turns into a triple fault.
    unsafe { core::arch::asm!("ud2", options(noreturn)) }
}

/// Reads the time-stamp counter.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc is allowed at CPL3 unless CR4.TSD is set, which the probe never sets.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Spins until `f` returns true or roughly `secs` seconds pass (assuming a TSC of at least
/// 1 GHz; a faster one only shortens nothing, it lengthens the bound). Returns whether `f`
/// succeeded.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let deadline = rdtsc().wrapping_add(secs * 3_000_000_000);
    loop {
        if f() {
            return true;
        }
        if rdtsc() > deadline {
            return false;
        }
        core::hint::spin_loop();
    }
}

/// memcpy for the compiler (rep movsb; not a loop the optimizer could turn back into a call).
///
/// # Safety
/// As C's memcpy.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the ranges are valid and do not overlap.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack)) };
    dst
}

/// memmove for the compiler.
///
/// # Safety
/// As C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is correct when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy (std flag) for overlapping ranges with dst after src.
    unsafe {
        asm!("std", "rep movsb", "cld", inout("rcx") n => _, inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _, options(nostack));
    }
    dst
}

/// memset for the compiler.
///
/// # Safety
/// As C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range is valid.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack)) };
    dst
}

/// memcmp for the compiler.
///
/// # Safety
/// As C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges are valid for n bytes.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return x as i32 - y as i32;
        }
    }
    0
}

/// bcmp for the compiler.
///
/// # Safety
/// As C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
