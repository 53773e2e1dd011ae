//! A generic vhost-user frontend: the device's queues are served by another process (the
//! net device by enclave-netd, the fs device by virtiofsd). The VMM keeps the virtio-mmio
//! registers and config space; the backend gets the guest memory (our memfd), the rings,
//! the kick eventfds (KVM ioeventfds on QueueNotify) and the call eventfd (a KVM irqfd), so
//! the data path never passes through the VMM.

use std::path::{Path, PathBuf};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::QueueT;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{Activation, VirtioDevice, TYPE_FS, TYPE_NET, VIRTIO_F_VERSION_1};

/// VIRTIO_NET_F_MAC: the VMM provides the MAC in config space.
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Features the VMM lets a net backend offer the guest. No offloads: netd decides on whole
/// frames, so checksum/TSO offloads are not negotiated (docs/vmm.md says why).
const NET_FEATURES: u64 = VIRTIO_F_VERSION_1;
/// Features an fs backend may offer.
const FS_FEATURES: u64 = VIRTIO_F_VERSION_1;
/// VIRTIO_RING_F_EVENT_IDX and INDIRECT_DESC are fine for any backend to use.
const RING_FEATURES: u64 = (1 << 28) | (1 << 29);

/// What kind of device the backend serves.
#[derive(Debug, Clone)]
pub enum Kind {
    /// virtio-net with this MAC.
    Net([u8; 6]),
    /// virtio-fs with this tag.
    Fs(String),
}

/// A vhost-user device.
pub struct VhostUserDevice {
    kind: Kind,
    socket: PathBuf,
    frontend: Frontend,
    backend_features: u64,
    protocol: bool,
    queue_sizes: Vec<u16>,
    config: Vec<u8>,
    started: bool,
}

impl VhostUserDevice {
    /// Connects to the backend at `socket` and reads what it offers.
    pub fn connect(kind: Kind, socket: &Path) -> Result<Self, String> {
        let queue_sizes = match kind {
            Kind::Net(_) => vec![256, 256],
            Kind::Fs(_) => vec![128, 128],
        };
        let ctx = |what: &str| format!("vhost-user backend {} ({what})", socket.display());
        let mut frontend = Frontend::connect(socket, queue_sizes.len() as u64)
            .map_err(|e| format!("{}: {e}", ctx("connect")))?;
        frontend
            .set_owner()
            .map_err(|e| format!("{}: {e}", ctx("SET_OWNER")))?;
        let backend_features = frontend
            .get_features()
            .map_err(|e| format!("{}: {e}", ctx("GET_FEATURES")))?;
        let protocol = backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        if protocol {
            let offered = frontend
                .get_protocol_features()
                .map_err(|e| format!("{}: {e}", ctx("GET_PROTOCOL_FEATURES")))?;
            // Nothing optional is needed: config space stays in the VMM, one queue pair.
            let wanted = offered & VhostUserProtocolFeatures::MQ;
            frontend
                .set_protocol_features(wanted)
                .map_err(|e| format!("{}: {e}", ctx("SET_PROTOCOL_FEATURES")))?;
        }
        if backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(format!(
                "{}: backend does not offer VIRTIO_F_VERSION_1",
                ctx("features")
            ));
        }
        let config = match &kind {
            Kind::Net(mac) => {
                let mut c = mac.to_vec();
                c.extend_from_slice(&[0; 4]); // status, max_virtqueue_pairs (unused)
                c
            }
            Kind::Fs(tag) => {
                let mut c = vec![0u8; 36];
                c[..tag.len()].copy_from_slice(tag.as_bytes());
                c.extend_from_slice(&1u32.to_le_bytes()); // one request queue
                c
            }
        };
        Ok(VhostUserDevice {
            kind,
            socket: socket.to_path_buf(),
            frontend,
            backend_features,
            protocol,
            queue_sizes,
            config,
            started: false,
        })
    }

    fn ctx(&self, what: &str) -> String {
        format!("vhost-user backend {} ({what})", self.socket.display())
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        match self.kind {
            Kind::Net(_) => TYPE_NET,
            Kind::Fs(_) => TYPE_FS,
        }
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        self.queue_sizes.clone()
    }
    fn features(&self) -> u64 {
        match self.kind {
            Kind::Net(_) => {
                (self.backend_features & (NET_FEATURES | RING_FEATURES)) | VIRTIO_NET_F_MAC
            }
            Kind::Fs(_) => self.backend_features & (FS_FEATURES | RING_FEATURES),
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config, offset, data);
    }
    fn interrupt_status_is_implicit(&self) -> bool {
        true
    }

    fn activate(&mut self, a: Activation) -> Result<(), String> {
        // Our own feature bits (MAC) are not the backend's business.
        let mut features = a.acked_features & self.backend_features;
        if self.protocol {
            features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        }
        self.frontend
            .set_features(features)
            .map_err(|e| format!("{}: {e}", self.ctx("SET_FEATURES")))?;
        let regions = a
            .mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| format!("guest memory region for vhost-user: {e}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| format!("{}: {e}", self.ctx("SET_MEM_TABLE")))?;
        // Ring addresses are given in our virtual address space (the vhost-user convention);
        // the backend translates them through the memory table.
        let host = |gpa: u64| -> Result<u64, String> {
            let region = a
                .mem
                .find_region(GuestAddress(gpa))
                .ok_or_else(|| format!("ring address {gpa:#x} outside guest memory"))?;
            let off = gpa - region.start_addr().raw_value();
            region
                .get_host_address(vm_memory::MemoryRegionAddress(off))
                .map(|p| p as u64)
                .map_err(|e| e.to_string())
        };
        for (i, q) in a.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            let cfg = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: host(q.desc_table())?,
                used_ring_addr: host(q.used_ring())?,
                avail_ring_addr: host(q.avail_ring())?,
                log_addr: None,
            };
            let sock = self.socket.display().to_string();
            let e = |what: &str, err: vhost::Error| {
                format!("vhost-user backend {sock} ({what} {i}): {err}")
            };
            self.frontend
                .set_vring_num(i, q.size())
                .map_err(|x| e("SET_VRING_NUM", x))?;
            self.frontend
                .set_vring_addr(i, &cfg)
                .map_err(|x| e("SET_VRING_ADDR", x))?;
            self.frontend
                .set_vring_base(i, 0)
                .map_err(|x| e("SET_VRING_BASE", x))?;
            self.frontend
                .set_vring_call(i, &a.interrupt.irqfd)
                .map_err(|x| e("SET_VRING_CALL", x))?;
            let kick = a.kicks.get(i).ok_or("missing kick eventfd")?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(|x| e("SET_VRING_KICK", x))?;
            if self.protocol {
                self.frontend
                    .set_vring_enable(i, true)
                    .map_err(|x| e("SET_VRING_ENABLE", x))?;
            }
        }
        self.started = true;
        Ok(())
    }

    fn reset(&mut self) {
        if !self.started {
            return;
        }
        // GET_VRING_BASE stops a ring; a failing backend is gone anyway.
        for i in 0..self.queue_sizes.len() {
            let _ = self.frontend.get_vring_base(i);
        }
        self.started = false;
    }
}
