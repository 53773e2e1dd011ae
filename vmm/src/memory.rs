//! Guest physical memory: one memfd, mapped shared, so vhost-user backends can map the
//! same pages; the layout of everything the VMM places in it.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (left zero)
//! 0x0000_0500  GDT (4 entries)          0x0000_0520  IDT (empty)
//! 0x0000_6000  PVH start info           0x0000_6100  PVH memory map
//! 0x0000_7000  boot_params (zero page)  0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4  0x0000_a000 PDPT  0x0000_b000 PD (first GiB, 2 MiB pages)
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x0009_fc00  EBDA (reserved in e820) .. 0x0010_0000
//! 0x000e_0000  ACPI: RSDP, then DSDT, FADT, MADT, XSDT (in the reserved range)
//! 0x0010_0000  kernel (HIMEM_START)
//!     ...      initrd, page aligned, at the top of low RAM
//! 0xd000_0000  MMIO gap: virtio-mmio devices, 4 KiB each, then IOAPIC/LAPIC
//! 0x1_0000_0000 RAM above 4 GiB when the VM has more than the gap allows
//! ```

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// Start of the GDT the VMM writes for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// The Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory mapping the first GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the VMM accepts (bytes, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI tables: the RSDP here (where a BIOS would leave it), the rest after it.
pub const ACPI_START: u64 = 0xe_0000;
/// End of the room for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// The IOAPIC's MMIO base (KVM's in-kernel IOAPIC).
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Where high memory (and the kernel) starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ handed to virtio-mmio devices (0-4 are the PIT, keyboard, cascade,
/// serial ports).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Highest IRQ the in-kernel IOAPIC routes (24 pins).
pub const IRQ_MAX: u32 = 23;
/// Identity-mapped TSS region KVM needs on Intel hosts (just below the BIOS ROM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

/// Guest memory and the memfd behind it.
pub struct GuestRam {
    /// The mapped regions.
    pub mem: GuestMemoryMmap,
    /// The regions as (guest address, size), in order.
    pub ranges: Vec<(GuestAddress, usize)>,
    /// Bytes of RAM in all.
    pub size: u64,
}

/// Errors creating guest memory.
#[derive(Debug)]
pub enum MemoryError {
    /// memfd_create or ftruncate failed.
    Memfd(std::io::Error),
    /// Mapping the regions failed.
    Map(String),
    /// The size is zero, not page aligned, or too large.
    BadSize(u64),
}

impl std::fmt::Display for MemoryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MemoryError::Memfd(e) => write!(f, "creating the guest-memory memfd: {e}"),
            MemoryError::Map(e) => write!(f, "mapping guest memory: {e}"),
            MemoryError::BadSize(s) => {
                write!(f, "guest memory size {s} bytes is not a multiple of 2 MiB between 16 MiB and 64 GiB")
            }
        }
    }
}

/// The RAM ranges for a VM of `size` bytes: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (GuestAddress(MMIO_GAP_END), (size - MMIO_GAP_START) as usize),
        ]
    }
}

/// Creates guest memory of `size` bytes in one memfd (sealed against shrinking) and maps
/// every region of it shared.
pub fn create(size: u64) -> Result<GuestRam, MemoryError> {
    const MIB: u64 = 1 << 20;
    if !(16 * MIB..=64 * 1024 * MIB).contains(&size) || size % (2 * MIB) != 0 {
        return Err(MemoryError::BadSize(size));
    }
    // SAFETY: the name is a valid NUL-terminated string; the flags are constants.
    let fd = unsafe {
        libc::memfd_create(
            c"enclave-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    // Seal the size so nobody holding the fd (a vhost-user backend) can shrink it under
    // our mappings and turn guest accesses into SIGBUS.
    // SAFETY: fcntl on a valid fd with constant arguments.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    let file = std::sync::Arc::new(file);
    let ranges = ram_ranges(size);
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for &(addr, len) in &ranges {
        let fo = FileOffset::from_arc(file.clone(), offset);
        let region = GuestRegionMmap::from_range(addr, len, Some(fo))
            .map_err(|e| MemoryError::Map(e.to_string()))?;
        regions.push(region);
        offset += len as u64;
    }
    let mem =
        GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Map(e.to_string()))?;
    Ok(GuestRam { mem, ranges, size })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn small_vm_is_one_region_large_vm_skips_the_gap() {
        assert_eq!(ram_ranges(128 << 20).len(), 1);
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 as u64 + r[1].1 as u64, 4 << 30);
    }

    #[test]
    fn memory_is_one_shared_memfd() {
        let ram = create(32 << 20).unwrap();
        ram.mem
            .write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let v: u32 = ram.mem.read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0xdead_beef);
        let region = ram.mem.iter().next().unwrap();
        assert!(region.file_offset().is_some());
        assert!(create(3 << 20).is_err());
    }
}
