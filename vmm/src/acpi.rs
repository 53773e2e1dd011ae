//! ACPI tables, built by the VMM and written into guest memory before the first vCPU runs:
//! RSDP → XSDT → FADT (hardware-reduced, with a DSDT) and MADT.
//!
//! What they tell Linux, and why each item is there:
//! - **MADT**: one local APIC per vCPU and the IOAPIC, so the kernel boots every vCPU
//!   without an MP table (no "Boot CPU not listed by BIOS").
//! - **FADT**: hardware-reduced ACPI (no PM timer, no SCI, no legacy fixed hardware), no
//!   VGA, no MSI, no ASPM, **no CMOS RTC and no i8042**, so the kernel neither probes the
//!   keyboard controller (1 s of timeouts) nor waits on an RTC (3 s). The VMM still
//!   answers the i8042 reset line for guests without ACPI.
//! - **DSDT**: one `LNRO0005` device per virtio-mmio window, with its MMIO range and its
//!   interrupt, which is how kernels without `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` (Debian's
//!   cloud kernel) find their devices. Firecracker does the same since v1.8.
//!
//! The tables live in the BIOS area (0xE0000..0x100000), which the e820 map reserves. The
//! VMM never reads them back: a guest that rewrites them hurts only itself.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{ACPI_END, ACPI_START, IOAPIC_ADDR, LAPIC_ADDR, VIRTIO_MMIO_SIZE};

const OEM_ID: [u8; 6] = *b"ENCLAV";
/// The serial console's ports and interrupt (as the VMM wires them).
const COM1_BASE: u16 = 0x3f8;
const COM1_IRQ: u32 = 4;
const OEM_REVISION: u32 = 1;
/// DSDT revision 2: integers are 64-bit.
const DSDT_REVISION: u8 = 2;
/// The hardware ID Linux's virtio-mmio driver matches in ACPI.
pub const VIRTIO_MMIO_HID: &str = "LNRO0005";

/// Device names are `V000` to `V999`.
const MAX_DEVICES: usize = 1000;

/// IA-PC boot architecture flags (ACPI 6.5, table 5.11).
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
const IAPC_PCIE_ASPM_CONTROLS: u16 = 1 << 4;
const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// One virtio-mmio window to describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    /// Guest physical base of the 4 KiB window.
    pub base: u64,
    /// Its IOAPIC pin (GSI).
    pub irq: u32,
}

/// The tables, each with the guest address it goes to; the RSDP first.
#[derive(Debug)]
pub struct Tables {
    /// (guest address, bytes), in the order written.
    pub blobs: Vec<(u64, Vec<u8>)>,
}

impl Tables {
    /// Where the RSDP is (for boot_params.acpi_rsdp_addr and PVH's rsdp_paddr).
    pub fn rsdp_addr(&self) -> u64 {
        ACPI_START
    }
}

/// The DSDT's AML body for the virtio-mmio devices: `\_SB_.Vnnn` with `_HID`, `_UID`,
/// `_CCA` and a `_CRS` of one Memory32Fixed window and one edge-triggered interrupt.
pub fn virtio_device_aml(index: usize, dev: &MmioDevice) -> Vec<u8> {
    let name = format!("V{index:03}");
    let hid = aml::Name::new("_HID".into(), &VIRTIO_MMIO_HID);
    let uid_value = index as u64;
    let uid = aml::Name::new("_UID".into(), &uid_value);
    let cca = aml::Name::new("_CCA".into(), &aml::ONE);
    let window = aml::Memory32Fixed::new(true, dev.base as u32, VIRTIO_MMIO_SIZE as u32);
    let irq = aml::Interrupt::new(true, true, false, false, dev.irq);
    let crs_template = aml::ResourceTemplate::new(vec![&window, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs_template);
    let device = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &cca, &crs]);
    let mut out = Vec::new();
    device.to_aml_bytes(&mut out);
    out
}

/// COM1 (`PNP0501`, ports 0x3F8-0x3FF, IRQ 4). A hardware-reduced platform has no legacy
/// PIC, so Linux maps no ISA IRQ by itself: without this the 8250 driver cannot request
/// IRQ 4, opening `/dev/console` fails and every write of the guest's init gets EIO.
pub fn com1_aml() -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ONE);
    let ports = aml::IO::new(COM1_BASE, COM1_BASE, 1, 8);
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs_template = aml::ResourceTemplate::new(vec![&ports, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs_template);
    to_bytes(&aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]))
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Builds every table for `vcpus` vCPUs and the given virtio-mmio windows. Pure: no guest
/// memory involved, so tests can check the bytes.
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> Result<Tables, String> {
    if devices.len() > MAX_DEVICES {
        return Err(format!(
            "{} virtio-mmio devices: ACPI names allow at most {MAX_DEVICES}",
            devices.len()
        ));
    }
    let mut next = ACPI_START;
    let mut place = |len: usize| -> Result<u64, String> {
        let at = next;
        next = (at + len as u64 + 15) & !15;
        if next > ACPI_END {
            return Err(format!(
                "the ACPI tables need more than the {} bytes of the BIOS area",
                ACPI_END - ACPI_START
            ));
        }
        Ok(at)
    };
    let rsdp_at = place(Rsdp::len())?;

    // DSDT: the virtio-mmio devices in \_SB_.
    let device_aml: Vec<Vec<u8>> = devices
        .iter()
        .enumerate()
        .map(|(i, d)| virtio_device_aml(i, d))
        .collect();
    let mut sb_body = com1_aml();
    for d in &device_aml {
        sb_body.extend_from_slice(d);
    }
    let sb = RawAml(sb_body);
    let scope = aml::Scope::new("_SB_".into(), vec![&sb]);
    let mut dsdt = Sdt::new(
        *b"DSDT",
        36,
        DSDT_REVISION,
        OEM_ID,
        *b"ENCLDSDT",
        OEM_REVISION,
    );
    scope.to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    let dsdt_bytes = dsdt.as_slice().to_vec();
    let dsdt_at = place(dsdt_bytes.len())?;

    // FADT: hardware-reduced, pointing at the DSDT.
    let mut fadt = FADTBuilder::new(OEM_ID, *b"ENCLFADT", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_at);
    fadt.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT
        | IAPC_MSI_NOT_SUPPORTED
        | IAPC_PCIE_ASPM_CONTROLS
        | IAPC_CMOS_RTC_NOT_PRESENT)
        .into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"ENCLAVE\0").into();
    let fadt_bytes = to_bytes(&fadt.finalize());
    let fadt_at = place(fadt_bytes.len())?;

    // MADT: the IOAPIC and one enabled local APIC per vCPU (APIC id = vCPU index).
    let mut madt = MADT::new(
        OEM_ID,
        *b"ENCLMADT",
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR),
    );
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    let madt_bytes = to_bytes(&madt);
    let madt_at = place(madt_bytes.len())?;

    let mut xsdt = XSDT::new(OEM_ID, *b"ENCLXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    let xsdt_bytes = to_bytes(&xsdt);
    let xsdt_at = place(xsdt_bytes.len())?;

    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_at));
    Ok(Tables {
        blobs: vec![
            (rsdp_at, rsdp),
            (dsdt_at, dsdt_bytes),
            (fadt_at, fadt_bytes),
            (madt_at, madt_bytes),
            (xsdt_at, xsdt_bytes),
        ],
    })
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn write(mem: &GuestMemoryMmap, tables: &Tables) -> Result<u64, String> {
    for (addr, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|e| format!("writing ACPI tables at {addr:#x}: {e}"))?;
    }
    Ok(tables.rsdp_addr())
}

/// AML bytes already encoded, to nest them in a scope.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn table(t: &Tables, addr: u64) -> &[u8] {
        &t.blobs.iter().find(|(a, _)| *a == addr).unwrap().1
    }

    const DEVS: [MmioDevice; 3] = [
        MmioDevice {
            base: 0xd000_0000,
            irq: 5,
        },
        MmioDevice {
            base: 0xd000_1000,
            irq: 6,
        },
        MmioDevice {
            base: 0xd000_2000,
            irq: 7,
        },
    ];

    #[test]
    fn every_table_has_a_valid_checksum_and_length_and_they_link_up() {
        let t = build(4, &DEVS).unwrap();
        let rsdp = &t.blobs[0].1;
        assert_eq!(t.blobs[0].0, ACPI_START);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(u32_at(rsdp, 20) as usize, rsdp.len());
        for (addr, b) in &t.blobs[1..] {
            assert_eq!(u32_at(b, 4) as usize, b.len(), "length of {addr:#x}");
            assert_eq!(
                sum(b),
                0,
                "checksum of {}",
                String::from_utf8_lossy(&b[..4])
            );
            assert!(*addr >= ACPI_START && addr + b.len() as u64 <= ACPI_END);
            assert_eq!(addr % 16, 0);
        }
        // RSDP -> XSDT -> FADT, MADT; FADT -> DSDT.
        let xsdt = table(&t, u64_at(rsdp, 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|i| u64_at(xsdt, i))
            .collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|&a| &table(&t, a)[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        let fadt = table(&t, entries[0]);
        let dsdt = table(&t, u64_at(fadt, 140)); // X_DSDT
        assert_eq!(&dsdt[..4], b"DSDT");
        // The tables do not overlap.
        let mut spans: Vec<(u64, u64)> = t
            .blobs
            .iter()
            .map(|(a, b)| (*a, a + b.len() as u64))
            .collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "{spans:x?}");
    }

    #[test]
    fn the_fadt_is_hardware_reduced_with_no_rtc_and_no_i8042() {
        let t = build(1, &DEVS).unwrap();
        let fadt = t
            .blobs
            .iter()
            .find(|(_, b)| &b[..4] == b"FACP")
            .unwrap()
            .1
            .clone();
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_arch & IAPC_CMOS_RTC_NOT_PRESENT, 0, "no CMOS RTC");
        assert_eq!(boot_arch & 0b10, 0, "no 8042 declared");
    }

    #[test]
    fn the_madt_lists_the_ioapic_and_one_local_apic_per_vcpu() {
        let t = build(3, &[]).unwrap();
        let madt = t
            .blobs
            .iter()
            .find(|(_, b)| &b[..4] == b"APIC")
            .unwrap()
            .1
            .clone();
        assert_eq!(u32_at(&madt, 36), LAPIC_ADDR);
        let mut i = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while i < madt.len() {
            let (kind, len) = (madt[i], madt[i + 1] as usize);
            match kind {
                0 => lapics.push((madt[i + 2], madt[i + 3], u32_at(&madt, i + 4))),
                1 => ioapics.push(u32_at(&madt, i + 4)),
                other => panic!("unexpected MADT entry {other}"),
            }
            i += len;
        }
        assert_eq!(i, madt.len());
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapics, [IOAPIC_ADDR]);
    }

    #[test]
    fn a_virtio_device_is_described_by_these_aml_bytes() {
        let b = virtio_device_aml(
            1,
            &MmioDevice {
                base: 0xd000_1000,
                irq: 6,
            },
        );
        // Device (V001) { Name (_HID, "LNRO0005") Name (_UID, One) Name (_CCA, One)
        //   Name (_CRS, ResourceTemplate () { Memory32Fixed (ReadWrite, 0xD0001000, 0x1000)
        //   Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { 6 } }) }
        #[rustfmt::skip]
        let want: Vec<u8> = [
            &[0x5b, 0x82][..], // DeviceOp
            &[0x41, 0x04],     // PkgLength, two bytes: 0x41 bytes follow, these included
            b"V001",
            &[0x08], b"_HID", &[0x0d], b"LNRO0005", &[0x00],
            &[0x08], b"_UID", &[0x01],
            &[0x08], b"_CCA", &[0x01],
            &[0x08], b"_CRS", &[0x11, 0x1a, 0x0a, 0x17], // Buffer, length 0x17
            &[0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00],
            &[0x89, 0x06, 0x00, 0x03, 0x01, 0x06, 0x00, 0x00, 0x00],
            &[0x79, 0x00], // EndTag
        ]
        .concat();
        assert_eq!(b, want, "{b:02x?}");
        // And the DSDT carries it, under \_SB_.
        let t = build(1, &DEVS).unwrap();
        let dsdt = t
            .blobs
            .iter()
            .find(|(_, b)| &b[..4] == b"DSDT")
            .unwrap()
            .1
            .clone();
        assert!(dsdt.windows(4).any(|w| w == b"_SB_"));
        for name in [b"V000", b"V001", b"V002"] {
            assert!(dsdt.windows(4).any(|w| w == name), "{name:?}");
        }
        assert!(dsdt.windows(want.len()).any(|w| w == want));
    }

    #[test]
    fn too_many_devices_is_an_error_not_an_overflow() {
        let many: Vec<MmioDevice> = (0..1001)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                irq: 5,
            })
            .collect();
        assert!(build(1, &many).unwrap_err().contains("at most 1000"));
        // Up to the IOAPIC's pins (what the VMM can wire) they fit easily.
        assert!(build(32, &many[..19]).is_ok());
    }
}
