#![no_main]
//! The vsock device behind the virtio-mmio transport, driven by a hostile guest: the first
//! 64 KiB of input become guest memory (rings, descriptors, packet headers), the rest a
//! sequence of register accesses and queue kicks. Nothing may panic, hang or touch memory
//! outside the guest's.
use std::sync::{Arc, Mutex, OnceLock};

use enclave_vmm::bus::BusDevice;
use enclave_vmm::devices::virtio::mmio::MmioTransport;
use enclave_vmm::devices::virtio::vsock::Vsock;
use enclave_vmm::devices::virtio::Interrupt;
use enclave_vmm::metrics::Metrics;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const SEED: usize = 64 * 1024;

struct Rig {
    mem: GuestMemoryMmap,
    vsock: Vsock,
    transport: Mutex<MmioTransport>,
    kicks: Vec<EventFd>,
}

fn rig() -> &'static Rig {
    static RIG: OnceLock<Rig> = OnceLock::new();
    RIG.get_or_init(|| {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
        let metrics = Arc::new(Metrics::default());
        let path = std::env::temp_dir().join(format!("enclave-fuzz-vsock-{}.sock", std::process::id()));
        let vsock = Vsock::new(3, &path, metrics.clone()).expect("vsock");
        let handle = Vsock(vsock.0.clone());
        let kicks: Vec<EventFd> = (0..3).map(|_| EventFd::new(libc_nonblock()).expect("eventfd")).collect();
        vsock.register_kicks(&kicks).expect("kicks");
        let ours = kicks.iter().map(|k| k.try_clone().expect("clone")).collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(libc_nonblock()).expect("eventfd"), metrics.clone()));
        let transport = MmioTransport::new(Box::new(handle), mem.clone(), ours, irq, metrics).expect("transport");
        Rig { mem, vsock, transport: Mutex::new(transport), kicks }
    })
}

fn libc_nonblock() -> i32 {
    0o4000 // EFD_NONBLOCK
}

fuzz_target!(|data: &[u8]| {
    let r = rig();
    let (seed, ops) = data.split_at(data.len().min(SEED));
    let _ = r.mem.write_slice(&vec![0u8; SEED], GuestAddress(0));
    let _ = r.mem.write_slice(seed, GuestAddress(0));
    let mut t = r.transport.lock().unwrap_or_else(|p| p.into_inner());
    t.write(0x70, &0u32.to_le_bytes()); // start from reset
    for op in ops.chunks_exact(7) {
        let offset = u16::from_le_bytes([op[1], op[2]]) as u64 & 0x1ff;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 6 {
            0 => t.write(offset, &value),
            1 => {
                let mut b = [0u8; 4];
                t.read(offset, &mut b);
            }
            2 => t.write(offset, &value[..1]),
            3 | 4 => {
                let _ = r.kicks[(op[0] % 6 - 3) as usize].write(1);
                drop(t);
                r.vsock.process();
                t = r.transport.lock().unwrap_or_else(|p| p.into_inner());
            }
            _ => {
                // Rewrite a bit of guest memory between kicks: rings change under the device.
                let at = u16::from_le_bytes([op[1], op[2]]) as u64;
                let _ = r.mem.write_slice(&value, GuestAddress(at));
            }
        }
    }
});
