//! enclave-vmm: Enclave's KVM microVM monitor, on rust-vmm crates.
//!
//! One process per VM. The main thread builds the VM from a [`config::VmConfig`], then runs
//! the event loop (virtio queues, vsock sockets); each vCPU has a thread; the control API
//! has one. Every thread runs under its own seccomp filter ([`seccomp`]). See docs/vmm.md.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod jail;
pub mod memory;
pub mod metrics;
pub mod seccomp;
pub mod vmm;
