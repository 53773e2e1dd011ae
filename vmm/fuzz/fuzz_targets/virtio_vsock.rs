#![no_main]
//! The vsock device behind the virtio-mmio transport, driven by a hostile guest: the first
//! 64 KiB of input become guest memory (rings, descriptors, packet headers), the rest a
//! sequence of register accesses and queue kicks. Nothing may panic, hang or touch memory
//! outside the guest's, and what the device keeps for the guest (connections, queued
//! control packets) stays within its limits.
use std::sync::{Arc, Mutex, OnceLock};

use enclave_vmm::bus::BusDevice;
use enclave_vmm::devices::virtio::mmio::MmioTransport;
use enclave_vmm::devices::virtio::vsock::{Vsock, MAX_CONNECTIONS, MAX_RX_CONTROL};
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

/// Queue i's rings: descriptors at 0x1000 + i * 0x3000, avail 0x1000 later, used after.
fn queue_base(i: u32) -> u64 {
    0x1000 + i as u64 * 0x3000
}

fuzz_target!(|data: &[u8]| {
    // Input: [flags][n_ops: u16][n_ops * 7 bytes of register ops][guest memory seed].
    // flags bit 0: bring the device up the way a driver does before the ops run.
    let r = rig();
    let Some((&flags, rest)) = data.split_first() else { return };
    let Some(n) = rest.get(..2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize) else { return };
    let rest = &rest[2..];
    let (ops, seed) = rest.split_at((n * 7).min(rest.len()));
    let seed = &seed[..seed.len().min(SEED)];
    let _ = r.mem.write_slice(&vec![0u8; SEED], GuestAddress(0));
    let _ = r.mem.write_slice(seed, GuestAddress(0));
    let mut t = r.transport.lock().unwrap_or_else(|p| p.into_inner());
    let w = |t: &mut MmioTransport, off: u64, v: u32| t.write(off, &v.to_le_bytes());
    w(&mut t, 0x70, 0); // reset
    if flags & 1 != 0 {
        w(&mut t, 0x70, 1);
        w(&mut t, 0x70, 3);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(&mut t, 0x70, 11);
        for q in 0..3u32 {
            let base = queue_base(q);
            w(&mut t, 0x30, q);
            w(&mut t, 0x38, 16);
            w(&mut t, 0x80, base as u32);
            w(&mut t, 0x90, (base + 0x1000) as u32);
            w(&mut t, 0xa0, (base + 0x2000) as u32);
            w(&mut t, 0x44, 1);
        }
        w(&mut t, 0x70, 15);
    }
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
    drop(t);
    // Always end with a tx and an rx kick, so memory-only inputs reach the device too.
    let _ = r.kicks[1].write(1);
    let _ = r.kicks[0].write(1);
    r.vsock.process();
    let (conns, pending, control) = r.vsock.backlog();
    assert!(conns + pending <= MAX_CONNECTIONS, "{conns} + {pending} connections");
    assert!(control <= MAX_RX_CONTROL, "{control} control packets queued");
});
