//! vCPU setup (CPUID, MSRs, registers, long mode or PVH protected mode, LAPIC) and the
//! run loop each vCPU thread spends its life in.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, kvm_xcrs, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};

use crate::boot::EntryPoint;
use crate::bus::Bus;
use crate::config::BootProtocol;
use crate::memory::*;
use crate::metrics::Metrics;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Why the VM stopped; becomes the process exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest pulsed the i8042 reset line (Linux `reboot`, `poweroff` with `reboot=k`).
    GuestReset,
    /// The guest triple-faulted (Linux `reboot=t`, or a crash).
    GuestShutdown,
    /// A control-API shutdown.
    ApiShutdown,
    /// SIGTERM, SIGINT or SIGHUP.
    Signal(i32),
    /// KVM could not run the guest (emulation failure, entry failure).
    VcpuError(String),
    /// The VMM itself failed.
    VmmError(String),
}

impl StopReason {
    /// Exit code of the process: 0 when the guest or the operator stopped it, otherwise
    /// distinct codes an operator (or the shim) can tell apart.
    pub fn exit_code(&self) -> i32 {
        match self {
            StopReason::GuestReset | StopReason::ApiShutdown | StopReason::Signal(_) => 0,
            StopReason::GuestShutdown => 0,
            StopReason::VcpuError(_) => 3,
            StopReason::VmmError(_) => 4,
        }
    }
}

/// Shared run state: pause, stop, and who stopped first.
pub struct RunState {
    /// Set when every vCPU should leave its loop.
    pub stop: AtomicBool,
    paused: Mutex<bool>,
    resumed: Condvar,
    /// The first reason recorded wins.
    pub reason: Mutex<Option<StopReason>>,
    /// Written when `reason` is set, to wake the event loop.
    pub stop_evt: vmm_sys_util::eventfd::EventFd,
    /// vCPUs currently parked by a pause.
    pub parked: AtomicU64,
}

impl RunState {
    /// A running (not paused) state.
    pub fn new() -> std::io::Result<Self> {
        Ok(RunState {
            stop: AtomicBool::new(false),
            paused: Mutex::new(false),
            resumed: Condvar::new(),
            reason: Mutex::new(None),
            stop_evt: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?,
            parked: AtomicU64::new(0),
        })
    }

    /// Records why the VM stops (first caller wins) and wakes everyone.
    pub fn request_stop(&self, reason: StopReason) {
        {
            let mut r = crate::bus::lock(&self.reason);
            if r.is_none() {
                *r = Some(reason);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.set_paused(false);
        let _ = self.stop_evt.write(1);
    }

    /// Pauses or resumes the vCPUs (the caller kicks them out of KVM_RUN).
    pub fn set_paused(&self, p: bool) {
        *crate::bus::lock(&self.paused) = p;
        if !p {
            self.resumed.notify_all();
        }
    }

    /// Whether a pause is requested.
    pub fn is_paused(&self) -> bool {
        *crate::bus::lock(&self.paused)
    }

    fn park_while_paused(&self) {
        let mut p = crate::bus::lock(&self.paused);
        if *p {
            self.parked.fetch_add(1, Ordering::SeqCst);
            while *p && !self.stop.load(Ordering::SeqCst) {
                p = self.resumed.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            self.parked.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Builds the CPUID table for vCPU `id`: what KVM supports, with the APIC ID set and the
/// hypervisor bit on.
pub fn cpuid_for(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | ((id as u32) << 24);
                e.ebx = (e.ebx & 0xff00_ffff) | ((count as u32) << 16);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb => e.edx = id as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}

/// XSAVE user state components a Linux guest enables (x87, SSE, AVX, AVX-512's three,
/// PKRU) when CPUID offers them.
const XCR0_USER: u64 = 0b10_1110_0111;

/// Sets XCR0 to the user state components CPUID leaf 0xD offers, as the guest kernel will
/// (`XSETBV`) when it enables XSAVE. KVM derives leaf 0xD's "size for the enabled
/// components" (EBX) from the XCR0 it knows; where it does not see the guest's XSETBV
/// (nested under TCG's SVM emulation) Linux found a size for x87/SSE only, warned "XSAVE
/// consistency problem" and disabled XSAVE. The value is inert until the guest sets
/// CR4.OSXSAVE.
fn set_xcr0(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), kvm_ioctls::Error> {
    let Some(leaf) = cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 0xd && e.index == 0)
    else {
        return Ok(());
    };
    let supported = (leaf.eax as u64 | (leaf.edx as u64) << 32) & XCR0_USER;
    if supported & 0b11 != 0b11 {
        return Ok(()); // no XSAVE worth setting up: x87 and SSE are the minimum
    }
    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = supported;
    vcpu.set_xcrs(&xcrs)
}

/// A flat segment as KVM wants it: `limit` is the byte limit (0xffff_ffff with g = 1), not the
/// 20-bit descriptor field.
fn segment(selector: u16, base: u64, limit: u32, type_: u8, l: u8, db: u8) -> kvm_segment {
    kvm_segment {
        base,
        limit,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: if type_ == 0xb && selector == 0x18 {
            0
        } else {
            1
        },
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Flat code (selector 0x08, `l`/`db` as given) and data (0x10) segments, and `tss`.
fn flat_segments(sregs: &mut kvm_sregs, l: u8, code_db: u8, tss: kvm_segment) {
    let data = segment(0x10, 0, 0xffff_ffff, 0x3, 0, 1);
    sregs.cs = segment(0x08, 0, 0xffff_ffff, 0xb, l, code_db);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Puts a vCPU in the state the entry protocol asks for. Only the boot vCPU (id 0) gets
/// registers; the others wait for INIT/SIPI from the guest.
pub fn setup_vcpu(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    count: u8,
    entry: EntryPoint,
) -> Result<(), kvm_ioctls::Error> {
    let cpuid = cpuid_for(kvm, id, count)?;
    vcpu.set_cpuid2(&cpuid)?;
    set_xcr0(vcpu, &cpuid)?;
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
    vcpu.set_msrs(&msrs)?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu)?;

    // LINT0 as ExtINT (the PIC), LINT1 as NMI, as firmware would leave them.
    let mut lapic = vcpu.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[reg + i] as u8);
        let v = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic)?;

    if id != 0 {
        return Ok(());
    }
    let mut sregs: kvm_sregs = vcpu.get_sregs()?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = 4 * 8 - 1;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let regs = match entry.protocol {
        BootProtocol::Linux64 => {
            // 64-bit code (L = 1), flat data, a TSS.
            let tss = kvm_segment {
                s: 0,
                ..segment(0x18, 0, 0xffff_ffff, 0xb, 0, 0)
            };
            flat_segments(&mut sregs, 1, 0, tss);
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
            kvm_regs {
                rflags: 0x2,
                rip: entry.addr,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START,
                ..Default::default()
            }
        }
        BootProtocol::Pvh => {
            // 32-bit code (D = 1), flat data, a 104-byte TSS.
            let tss = kvm_segment {
                s: 0,
                g: 0,
                ..segment(0x18, 0, 0x67, 0xb, 0, 0)
            };
            flat_segments(&mut sregs, 0, 1, tss);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            kvm_regs {
                rflags: 0x2,
                rip: entry.addr,
                rbx: PVH_INFO_START,
                ..Default::default()
            }
        }
    };
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&regs)?;
    Ok(())
}

/// What a vCPU thread needs.
pub struct VcpuContext {
    /// This vCPU's index.
    pub id: u8,
    /// Port I/O devices.
    pub pio: Arc<Bus>,
    /// MMIO devices.
    pub mmio: Arc<Bus>,
    /// Pause/stop state.
    pub state: Arc<RunState>,
    /// Counters.
    pub metrics: Arc<Metrics>,
}

/// Runs a vCPU until the VM stops. Returns when `state.stop` is set.
pub fn run_vcpu(mut vcpu: VcpuFd, ctx: VcpuContext) {
    let m = &ctx.metrics;
    loop {
        if ctx.state.stop.load(Ordering::SeqCst) {
            return;
        }
        ctx.state.park_while_paused();
        if ctx.state.stop.load(Ordering::SeqCst) {
            return;
        }
        let exit = vcpu.run();
        let stop = match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                m.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.write(port as u64, data) {
                    m.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                m.pio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.pio.read(port as u64, data) {
                    m.unhandled_pio.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                m.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.read(addr, data) {
                    m.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                m.mmio_exits.fetch_add(1, Ordering::Relaxed);
                if !ctx.mmio.write(addr, data) {
                    m.unhandled_mmio.fetch_add(1, Ordering::Relaxed);
                }
                None
            }
            Ok(VcpuExit::Shutdown) => Some(StopReason::GuestShutdown),
            Ok(VcpuExit::Hlt) => Some(StopReason::GuestShutdown),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => StopReason::GuestReset,
                _ => StopReason::GuestShutdown,
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: KVM wrote the `internal` member of the union for this exit reason.
                let sub = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                Some(StopReason::VcpuError(format!("vCPU {}: KVM internal error, suberror {sub} (1 = instruction emulation failed) at rip {rip:#x}", ctx.id)))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(StopReason::VcpuError(format!(
                "vCPU {}: VM entry failed, hardware reason {reason:#x} on host cpu {cpu}",
                ctx.id
            ))),
            Ok(VcpuExit::Intr) => None,
            Ok(other) => {
                m.unexpected_exits.fetch_add(1, Ordering::Relaxed);
                Some(StopReason::VcpuError(format!(
                    "vCPU {}: unexpected exit {other:?}",
                    ctx.id
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(StopReason::VcpuError(format!(
                "vCPU {}: KVM_RUN failed: {e}",
                ctx.id
            ))),
        };
        if let Some(reason) = stop {
            ctx.state.request_stop(reason);
            return;
        }
    }
}

/// The signal used to kick vCPUs out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

/// Installs the (empty) handler for the kick signal; KVM_RUN then returns EINTR.
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}
