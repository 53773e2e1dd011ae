//! Counters the control API reports (`metrics`). Relaxed atomics: they are statistics.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// VMM counters.
        #[derive(Default, Debug)]
        pub struct Metrics { $($(#[$doc])* pub $name: AtomicU64,)* }

        /// A snapshot of [`Metrics`].
        #[derive(Default, Debug, Serialize, Clone, PartialEq, Eq)]
        #[allow(missing_docs)]
        pub struct MetricsSnapshot { $(pub $name: u64,)* }

        impl Metrics {
            /// Reads every counter.
            pub fn snapshot(&self) -> MetricsSnapshot {
                MetricsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Port I/O exits.
    pio_exits,
    /// MMIO exits.
    mmio_exits,
    /// Port accesses no device answered.
    unhandled_pio,
    /// MMIO accesses no device answered.
    unhandled_mmio,
    /// vCPU exits the VMM does not handle.
    unexpected_exits,
    /// Queue notifications (ioeventfd kicks) processed.
    queue_kicks,
    /// Descriptor chains rejected as malformed (bad address, length, direction, loop).
    bad_descriptors,
    /// Register accesses to virtio-mmio the spec does not allow (bad offset, size, state).
    bad_mmio_accesses,
    /// Interrupts raised to the guest.
    interrupts,
    /// vsock packets from the guest.
    vsock_tx_packets,
    /// vsock packets to the guest.
    vsock_rx_packets,
    /// vsock bytes from the guest.
    vsock_tx_bytes,
    /// vsock bytes to the guest.
    vsock_rx_bytes,
    /// vsock connections opened.
    vsock_connections,
    /// vsock connections refused because the VM has `MAX_CONNECTIONS` open.
    vsock_conn_refused,
    /// vsock control packets dropped because the guest left the control queue full.
    vsock_control_dropped,
    /// vsock packets dropped as malformed or for unknown connections.
    vsock_bad_packets,
}
