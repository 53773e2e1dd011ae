//! enclave-netd's reusable parts: opening the pod's tap (also used by the shim and tests),
//! and the vhost-user relay that lets one backend serve both enclave-vmm and QEMU.

pub mod proxy;
pub mod tap;
