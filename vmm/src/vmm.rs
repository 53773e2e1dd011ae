//! Builds a VM from its config and runs it: KVM VM and irqchip, memfd memory, kernel and
//! boot structures, devices on their buses, vCPU threads, the event loop.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;
use crate::boot::{self, BootInfo};
use crate::bus::Bus;
use crate::config::{DeviceDiscovery, VmConfig};
use crate::cpu::{self, RunState, StopReason, VcpuContext};
use crate::devices::legacy::{IrqTrigger, SerialConsole, I8042};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::vhost_user::{Kind, VhostUserDevice};
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};
use crate::memory::{self, GuestRam};
use crate::metrics::Metrics;
use crate::seccomp::{self, SeccompMode, ThreadKind};

/// Serial port base (COM1) and its IRQ.
const COM1: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
/// i8042 ports 0x60-0x64.
const I8042_BASE: u64 = 0x60;

const T_STOP: u64 = 0;
const T_RESET: u64 = 1;
const T_VSOCK: u64 = 2;
const T_SIGNAL: u64 = 3;

/// A failure building the VM, worded for an operator.
#[derive(Debug)]
pub struct BuildError(pub String);

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> BuildError + '_ {
    move |e| BuildError(format!("{what}: {e}"))
}

/// Information the control API reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmInfo {
    /// "running" or "paused".
    pub state: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// The command line the guest got.
    pub cmdline: String,
    /// virtio-mmio devices as (type, base, irq).
    pub devices: Vec<(String, u64, u32)>,
    /// Milliseconds from process start to the first vCPU entering the guest.
    pub boot_ms: f64,
}

/// A built VM, ready to run.
pub struct Vm {
    kvm: Kvm,
    vm: VmFd,
    /// Declared after `vm` so the VM fd closes before the memory is unmapped.
    _ram: GuestRam,
    cfg: VmConfig,
    cmdline: String,
    entry: boot::EntryPoint,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    state: Arc<RunState>,
    metrics: Arc<Metrics>,
    reset_evt: EventFd,
    vsock: Option<Vsock>,
    devices: Vec<(String, u64, u32)>,
}

impl Vm {
    /// Creates the VM: memory, kernel, devices. No guest code runs yet.
    pub fn build(cfg: VmConfig) -> Result<Vm, BuildError> {
        let kvm = Kvm::new().map_err(err(
            "opening /dev/kvm (is KVM available and are you in the kvm group?)",
        ))?;
        let vm = kvm.create_vm().map_err(err("KVM_CREATE_VM"))?;
        let ram =
            memory::create(cfg.memory_mib as u64 * 1024 * 1024).map_err(err("guest memory"))?;
        for (slot, region) in ram.mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(err("guest memory host address"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which outlives the VM fd
            // (both live in `Vm`; the VM fd is dropped first, see Drop order of fields).
            unsafe { vm.set_user_memory_region(r) }.map_err(err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        vm.set_tss_address(memory::KVM_TSS_ADDRESS)
            .map_err(err("KVM_SET_TSS_ADDR"))?;
        vm.create_irq_chip().map_err(err("KVM_CREATE_IRQCHIP"))?;
        // No in-kernel PIT (as Cloud Hypervisor): the ACPI tables declare a hardware-reduced
        // platform, on which Linux never programs one (it uses the local APIC timer and
        // kvm-clock), and tearing KVM's PIT down (its worker thread) cost 13-19 ms of every
        // VM's exit here, a quarter of a start-stop cycle. Its ports read as unclaimed.

        let metrics = Arc::new(Metrics::default());
        let state = Arc::new(RunState::new().map_err(err("eventfd"))?);
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(err("eventfd"))?;

        // Legacy devices.
        let mut pio = Bus::default();
        let serial_out: Box<dyn Write + Send> =
            match cfg.serial.as_ref().and_then(|s| s.path.as_ref()) {
                Some(p) => Box::new(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(p)
                        .map_err(|e| BuildError(format!("serial log {}: {e}", p.display())))?,
                ),
                None => Box::new(std::io::stdout()),
            };
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(err("eventfd"))?;
        vm.register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(err("KVM_IRQFD for the serial port"))?;
        let serial = Serial::new(IrqTrigger(serial_irq), serial_out);
        pio.insert(COM1, 8, Arc::new(Mutex::new(SerialConsole(serial))))
            .map_err(|_| BuildError("serial port overlaps".into()))?;
        let i8042 = I8042 {
            reset: reset_evt.try_clone().map_err(err("eventfd"))?,
        };
        pio.insert(I8042_BASE, 5, Arc::new(Mutex::new(i8042)))
            .map_err(|_| BuildError("i8042 overlaps".into()))?;

        // virtio-mmio devices, each a 4 KiB window and an IRQ, declared in ACPI or on the
        // command line (config `device_discovery`).
        let mut mmio = Bus::default();
        let mut cmdline = cfg.cmdline.clone();
        let mut devices = Vec::new();
        let mut next = (memory::MMIO_GAP_START, memory::VIRTIO_IRQ_BASE);
        let mut add = |dev: Box<dyn VirtioDevice>,
                       name: &str,
                       kicks_out: Option<&mut Vec<EventFd>>|
         -> Result<(), BuildError> {
            let (base, irq) = next;
            next = (base + memory::VIRTIO_MMIO_SIZE, irq + 1);
            let nq = dev.queue_max_sizes().len();
            let mut kicks = Vec::new();
            for q in 0..nq {
                let k = EventFd::new(libc::EFD_NONBLOCK).map_err(err("eventfd"))?;
                vm.register_ioevent(&k, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                    .map_err(err("KVM_IOEVENTFD"))?;
                kicks.push(k);
            }
            if let Some(out) = kicks_out {
                for k in &kicks {
                    out.push(k.try_clone().map_err(err("eventfd"))?);
                }
            }
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(err("eventfd"))?;
            vm.register_irqfd(&irqfd, irq).map_err(err("KVM_IRQFD"))?;
            let interrupt = Arc::new(Interrupt::new(irqfd, metrics.clone()));
            let t = MmioTransport::new(dev, ram.mem.clone(), kicks, interrupt, metrics.clone())
                .map_err(BuildError)?;
            mmio.insert(base, memory::VIRTIO_MMIO_SIZE, Arc::new(Mutex::new(t)))
                .map_err(|_| BuildError("virtio-mmio windows overlap".into()))?;
            if cfg.device_discovery == DeviceDiscovery::Cmdline {
                cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
            }
            devices.push((name.to_string(), base, irq));
            Ok(())
        };
        let mut vsock = None;
        if let Some(v) = &cfg.vsock {
            let dev = Vsock::new(v.cid, &v.uds_path, metrics.clone())
                .map_err(|e| BuildError(format!("vsock socket {}: {e}", v.uds_path.display())))?;
            let handle = Vsock(dev.0.clone());
            let mut kicks = Vec::new();
            add(Box::new(handle), "vsock", Some(&mut kicks))?;
            dev.register_kicks(&kicks).map_err(err("epoll"))?;
            vsock = Some(dev);
        }
        for (i, n) in cfg.net.iter().enumerate() {
            let mac = crate::config::parse_mac(&n.mac)
                .ok_or_else(|| BuildError(format!("net[{i}].mac: not a MAC address")))?;
            let dev = VhostUserDevice::connect(Kind::Net(mac), &n.socket)
                .map_err(|e| BuildError(format!("net[{i}]: {e}")))?;
            add(Box::new(dev), "net", None)?;
        }
        for (i, f) in cfg.fs.iter().enumerate() {
            let dev = VhostUserDevice::connect(Kind::Fs(f.tag.clone()), &f.socket)
                .map_err(|e| BuildError(format!("fs[{i}]: {e}")))?;
            add(Box::new(dev), "fs", None)?;
        }
        let cmdline = cmdline.trim().to_string();

        // ACPI: the platform (CPUs, IOAPIC, no legacy devices) and, for `acpi` discovery,
        // the devices. Built from the VMM's own list, never read back from the guest.
        let in_acpi: Vec<acpi::MmioDevice> = match cfg.device_discovery {
            DeviceDiscovery::Acpi => devices
                .iter()
                .map(|(_, base, irq)| acpi::MmioDevice {
                    base: *base,
                    irq: *irq,
                })
                .collect(),
            DeviceDiscovery::Cmdline => Vec::new(),
        };
        let tables = acpi::build(cfg.vcpus, &in_acpi).map_err(BuildError)?;
        let rsdp = acpi::write(&ram.mem, &tables).map_err(BuildError)?;

        // Kernel, initrd, boot structures.
        let (entry, setup_header) =
            boot::load_kernel(&ram.mem, &cfg.kernel, cfg.boot).map_err(err("kernel"))?;
        let low_end = ram.ranges[0].0.raw_value() + ram.ranges[0].1 as u64;
        let initrd = match &cfg.initrd {
            Some(p) => Some(
                boot::load_initrd(&ram.mem, p, low_end, memory::HIMEM_START)
                    .map_err(err("initrd"))?,
            ),
            None => None,
        };
        let gdt = if cfg.boot == crate::config::BootProtocol::Pvh {
            boot::PVH_GDT
        } else {
            boot::BOOT_GDT
        };
        boot::write_gdt_and_page_tables(&ram.mem, &gdt).map_err(err("boot"))?;
        boot::write_boot_structures(
            &ram.mem,
            &BootInfo {
                ranges: &ram.ranges,
                cmdline: &cmdline,
                initrd,
                setup_header,
                rsdp: Some(rsdp),
            },
        )
        .map_err(err("boot"))?;

        Ok(Vm {
            kvm,
            vm,
            _ram: ram,
            cfg,
            cmdline,
            entry,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            state,
            metrics,
            reset_evt,
            vsock,
            devices,
        })
    }

    /// The command line the guest gets (with the VMM's device entries).
    pub fn cmdline(&self) -> &str {
        &self.cmdline
    }

    /// Runs the VM to its end. `started` is when the process started (for boot timing).
    pub fn run(
        self,
        mode: SeccompMode,
        api: Option<crate::api::ApiServer>,
        started: Instant,
    ) -> StopReason {
        match self.run_inner(mode, api, started) {
            Ok(r) => r,
            Err(e) => StopReason::VmmError(e.0),
        }
    }

    fn run_inner(
        self,
        mode: SeccompMode,
        api: Option<crate::api::ApiServer>,
        started: Instant,
    ) -> Result<StopReason, BuildError> {
        cpu::install_kick_handler().map_err(err("signal handler"))?;
        // SIGTERM, SIGINT and SIGHUP become a clean stop, read from a signalfd by the event
        // loop; they are blocked here, before any thread starts, so every thread inherits it.
        let signals = stop_signals().map_err(err("signalfd"))?;
        let n = self.cfg.vcpus;
        // Every thread installs its filter first; nobody enters the guest until all have.
        let barrier = Arc::new(Barrier::new(n as usize + 1));
        let boot_ns = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        for id in 0..n {
            let vcpu = self
                .vm
                .create_vcpu(id as u64)
                .map_err(err("KVM_CREATE_VCPU"))?;
            cpu::setup_vcpu(&self.kvm, &vcpu, id, n, self.entry).map_err(err("vCPU setup"))?;
            let ctx = VcpuContext {
                id,
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                state: self.state.clone(),
                metrics: self.metrics.clone(),
            };
            let barrier = barrier.clone();
            let boot_ns = boot_ns.clone();
            let t = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = seccomp::install(ThreadKind::Vcpu, mode) {
                        ctx.state.request_stop(StopReason::VmmError(format!(
                            "seccomp for vcpu{id}: {e}"
                        )));
                        barrier.wait();
                        return;
                    }
                    barrier.wait();
                    if id == 0 {
                        boot_ns.store(
                            started.elapsed().as_nanos() as u64,
                            std::sync::atomic::Ordering::SeqCst,
                        );
                    }
                    cpu::run_vcpu(vcpu, ctx);
                })
                .map_err(err("spawning a vCPU thread"))?;
            threads.push(t);
        }
        let info = {
            let cfg = self.cfg.clone();
            let cmdline = self.cmdline.clone();
            let devices = self.devices.clone();
            let state = self.state.clone();
            let boot_ns = boot_ns.clone();
            move || VmInfo {
                state: if state.is_paused() {
                    "paused".into()
                } else {
                    "running".into()
                },
                vcpus: cfg.vcpus,
                memory_mib: cfg.memory_mib,
                cmdline: cmdline.clone(),
                devices: devices.clone(),
                boot_ms: boot_ns.load(std::sync::atomic::Ordering::SeqCst) as f64 / 1e6,
            }
        };
        let api_thread = match api {
            Some(server) => {
                let ctl = crate::api::Control {
                    state: self.state.clone(),
                    metrics: self.metrics.clone(),
                    vcpu_threads: threads.iter().map(|t| t.as_pthread_t()).collect(),
                    info: Box::new(info),
                };
                Some(
                    server
                        .spawn(ctl, mode)
                        .map_err(err("spawning the API thread"))?,
                )
            }
            None => None,
        };
        let epoll = self.event_epoll(&signals)?;
        seccomp::install(ThreadKind::Vmm, mode).map_err(err("seccomp for the VMM thread"))?;
        barrier.wait();

        let reason = self.event_loop(&epoll, &signals, &threads);
        self.state.request_stop(reason.clone());
        for t in &threads {
            kick(t.as_pthread_t());
        }
        for t in threads {
            let _ = t.join();
        }
        if let Some(t) = api_thread {
            drop(t); // the API thread exits with the process
        }
        Ok(crate::bus::lock(&self.state.reason)
            .clone()
            .unwrap_or(reason))
    }

    /// The event loop's epoll, made before the VMM thread's seccomp filter goes in.
    fn event_epoll(&self, signals: &std::fs::File) -> Result<Epoll, BuildError> {
        let epoll = Epoll::new().map_err(err("epoll"))?;
        epoll
            .ctl(
                ControlOperation::Add,
                signals.as_raw_fd(),
                EpollEvent::new(EventSet::IN, T_SIGNAL),
            )
            .map_err(err("epoll"))?;
        let mut fds = vec![
            (self.state.stop_evt.as_raw_fd(), T_STOP),
            (self.reset_evt.as_raw_fd(), T_RESET),
        ];
        if let Some(v) = &self.vsock {
            fds.push((v.epoll_fd(), T_VSOCK));
        }
        for (fd, t) in fds {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, t))
                .map_err(err("epoll"))?;
        }
        Ok(epoll)
    }

    fn event_loop(
        &self,
        epoll: &Epoll,
        signals: &std::fs::File,
        threads: &[JoinHandle<()>],
    ) -> StopReason {
        let mut events = [EpollEvent::default(); 16];
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return StopReason::VmmError(format!("epoll_wait: {e}")),
            };
            for ev in &events[..n] {
                match ev.data() {
                    T_STOP => {
                        let _ = self.state.stop_evt.read();
                        if self.state.stop.load(std::sync::atomic::Ordering::SeqCst) {
                            return crate::bus::lock(&self.state.reason)
                                .clone()
                                .unwrap_or(StopReason::ApiShutdown);
                        }
                        // A pause/resume nudge: kick the vCPUs so they notice.
                        for t in threads {
                            kick(t.as_pthread_t());
                        }
                    }
                    T_SIGNAL => {
                        let mut info = [0u8; 128]; // struct signalfd_siginfo
                        let n = std::io::Read::read(&mut &*signals, &mut info).unwrap_or(0);
                        let signo = if n >= 4 {
                            u32::from_le_bytes([info[0], info[1], info[2], info[3]])
                        } else {
                            0
                        };
                        return StopReason::Signal(signo as i32);
                    }
                    T_RESET => {
                        let _ = self.reset_evt.read();
                        return StopReason::GuestReset;
                    }
                    T_VSOCK => {
                        if let Some(v) = &self.vsock {
                            v.process();
                        }
                    }
                    _ => {}
                }
            }
        }
    }
}

/// Blocks the stop signals and returns a signalfd for them.
fn stop_signals() -> std::io::Result<std::fs::File> {
    use std::os::fd::FromRawFd;
    // SAFETY: sigset operations on a local set; pthread_sigmask on the calling thread;
    // signalfd returns a new fd we take ownership of.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(std::fs::File::from_raw_fd(fd))
    }
}

/// Interrupts a vCPU thread's KVM_RUN with the kick signal.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: pthread_kill with a thread id from a live JoinHandle and a signal whose handler
    // is installed (a no-op); at worst it fails with ESRCH for a thread that already left.
    unsafe {
        libc::pthread_kill(thread, cpu::kick_signal());
    }
}

trait PthreadId {
    fn as_pthread_t(&self) -> libc::pthread_t;
}

impl PthreadId for JoinHandle<()> {
    fn as_pthread_t(&self) -> libc::pthread_t {
        use std::os::unix::thread::JoinHandleExt;
        JoinHandleExt::as_pthread_t(self)
    }
}
