//! Loading the kernel, initrd and command line, and writing what the Linux boot protocol
//! (boot_params with its e820 map) and PVH (hvm_start_info) expect to find.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::config::BootProtocol;
use crate::memory::*;

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;
/// "HdrS": the boot protocol header magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The 0xAA55 boot flag.
const BOOT_FLAG: u16 = 0xaa55;
/// PVH start info magic ("xEn3" with the top bit set).
const PVH_MAGIC: u32 = 0x336e_c578;
/// `type_of_loader` for "undefined" loaders.
const LOADER_UNDEFINED: u8 = 0xff;
/// Setup header flag: the kernel was loaded high.
const LOADED_HIGH: u8 = 0x01;

/// Where the vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// Guest physical address of the first instruction.
    pub addr: u64,
    /// The mode it expects.
    pub protocol: BootProtocol,
}

/// Errors loading the guest.
#[derive(Debug)]
pub enum BootError {
    /// Opening or reading a file.
    Io(String, std::io::Error),
    /// The kernel is neither an ELF64 nor a bzImage, or does not fit.
    Kernel(String),
    /// The initrd does not fit below the MMIO gap.
    InitrdTooBig(u64),
    /// The kernel has no PVH entry but PVH boot was asked for.
    NoPvhEntry,
    /// Writing a boot structure to guest memory.
    Write(&'static str),
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootError::Io(p, e) => write!(f, "{p}: {e}"),
            BootError::Kernel(e) => write!(f, "loading the kernel: {e}"),
            BootError::InitrdTooBig(n) => write!(
                f,
                "initrd of {n} bytes does not fit in guest memory below the kernel"
            ),
            BootError::NoPvhEntry => write!(
                f,
                "boot = \"pvh\" but the kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
            ),
            BootError::Write(what) => write!(f, "writing the {what} into guest memory"),
        }
    }
}

/// Loads the kernel (ELF64 first, then bzImage) and returns its entry point.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    protocol: BootProtocol,
) -> Result<
    (
        EntryPoint,
        Option<linux_loader::loader::bootparam::setup_header>,
    ),
    BootError,
> {
    let mut f = File::open(path).map_err(|e| BootError::Io(path.display().to_string(), e))?;
    let himem = Some(GuestAddress(HIMEM_START));
    match Elf::load(mem, None, &mut f, himem) {
        Ok(res) => {
            let entry = match (protocol, res.pvh_boot_cap) {
                (BootProtocol::Pvh, PvhBootCapability::PvhEntryPresent(a)) => EntryPoint {
                    addr: a.raw_value(),
                    protocol,
                },
                (BootProtocol::Pvh, _) => return Err(BootError::NoPvhEntry),
                (BootProtocol::Linux64, _) => EntryPoint {
                    addr: res.kernel_load.raw_value(),
                    protocol,
                },
            };
            Ok((entry, None))
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            if protocol == BootProtocol::Pvh {
                return Err(BootError::NoPvhEntry);
            }
            let res = BzImage::load(mem, None, &mut f, himem)
                .map_err(|e| BootError::Kernel(format!("not an ELF64, and as a bzImage: {e}")))?;
            // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
            let entry = EntryPoint {
                addr: res.kernel_load.raw_value() + 0x200,
                protocol,
            };
            Ok((entry, res.setup_header))
        }
        Err(e) => Err(BootError::Kernel(e.to_string())),
    }
}

/// Loads the initrd page-aligned at the top of low RAM; returns (address, size).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_ram_end: u64,
    kernel_end: u64,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|e| BootError::Io(path.display().to_string(), e))?;
    let size = data.len() as u64;
    let addr = low_ram_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|&a| a >= kernel_end)
        .ok_or(BootError::InitrdTooBig(size))?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|_| BootError::Write("initrd"))?;
    Ok((addr, size))
}

/// The e820 map: low RAM up to the EBDA, then RAM from 1 MiB, skipping the MMIO gap.
pub fn e820_map(ranges: &[(GuestAddress, usize)]) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for &(addr, len) in ranges {
        let start = addr.raw_value().max(HIMEM_START);
        let end = addr.raw_value() + len as u64;
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Everything the boot structures describe.
pub struct BootInfo<'a> {
    /// The RAM regions.
    pub ranges: &'a [(GuestAddress, usize)],
    /// Command line, without the NUL.
    pub cmdline: &'a str,
    /// (address, size) of the initrd.
    pub initrd: Option<(u64, u64)>,
    /// The bzImage's setup header, to copy into boot_params.
    pub setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    /// Where the ACPI RSDP is, so the kernel need not scan for it.
    pub rsdp: Option<u64>,
}

/// Writes the command line, boot_params (zero page) and the PVH start info.
pub fn write_boot_structures(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<(), BootError> {
    let mut line = info.cmdline.as_bytes().to_vec();
    line.push(0);
    if line.len() > CMDLINE_MAX_SIZE {
        return Err(BootError::Write("command line (too long)"));
    }
    mem.write_slice(&line, GuestAddress(CMDLINE_START))
        .map_err(|_| BootError::Write("command line"))?;

    let mut params = boot_params::default();
    if let Some(h) = info.setup_header {
        params.hdr = h;
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = line.len() as u32;
    params.hdr.kernel_alignment = 0x0100_0000;
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(info.ranges);
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = info.rsdp.unwrap_or(0);
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| BootError::Write("boot_params"))?;

    let mut start = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        rsdp_paddr: info.rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some((addr, size)) = info.initrd {
        // One module: the initrd, described by a hvm_modlist_entry placed after the map.
        let modlist =
            PVH_MEMMAP_START + (map.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        let entry: [u64; 4] = [addr, size, 0, 0];
        mem.write_obj(entry, GuestAddress(modlist))
            .map_err(|_| BootError::Write("PVH module list"))?;
        start.nr_modules = 1;
        start.modlist_paddr = modlist;
    }
    mem.write_obj(start, GuestAddress(PVH_INFO_START))
        .map_err(|_| BootError::Write("PVH start info"))?;
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at))
            .map_err(|_| BootError::Write("PVH memory map"))?;
    }
    Ok(())
}

/// GDT entry from flags, base and limit (the usual packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The 32-bit GDT for PVH entry: null, 32-bit code, data, TSS.
pub const PVH_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Writes the GDT, an empty IDT, and identity page tables for the first GiB.
pub fn write_gdt_and_page_tables(mem: &GuestMemoryMmap, gdt: &[u64; 4]) -> Result<(), BootError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|_| BootError::Write("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| BootError::Write("IDT"))?;
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(|_| BootError::Write("PML4"))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(|_| BootError::Write("PDPT"))?;
    let pd: Vec<u8> = (0..512u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect(); // present, writable, 2 MiB
    mem.write_slice(&pd, GuestAddress(PDE_START))
        .map_err(|_| BootError::Write("page directory"))?;
    Ok(())
}

/// Reads the pieces back, for tests: the boot_params the guest will see.
pub fn read_boot_params(mem: &GuestMemoryMmap) -> Option<boot_params> {
    mem.read_obj(GuestAddress(ZERO_PAGE_START)).ok()
}

/// Values a guest finds at entry, so the probe and tests agree on them.
pub fn hdr_magic() -> u32 {
    HDRS_MAGIC
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn e820_skips_the_ebda_and_the_gap() {
        let map = e820_map(&ram_ranges(4 << 30));
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(
            map[2],
            (HIMEM_START, MMIO_GAP_START - HIMEM_START, E820_RAM)
        );
        assert_eq!(map[3], (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START, E820_RAM));
    }

    #[test]
    fn boot_params_carry_magic_cmdline_initrd() {
        let ram = create(64 << 20).unwrap();
        let info = BootInfo {
            ranges: &ram.ranges,
            cmdline: "console=ttyS0",
            initrd: Some((0x300_0000, 1234)),
            setup_header: None,
            rsdp: Some(0xe_0000),
        };
        write_boot_structures(&ram.mem, &info).unwrap();
        let p = read_boot_params(&ram.mem).unwrap();
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        let mut line = [0u8; 14];
        ram.mem
            .read_slice(&mut line, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0\0");
    }

    #[test]
    fn gdt_entries_match_the_usual_values() {
        assert_eq!(BOOT_GDT[1], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[2], 0x00cf_9300_0000_ffff);
    }
}
