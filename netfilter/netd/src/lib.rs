//! enclave-netd's reusable parts: opening the pod's tap (also used by the shim and tests),
//! the vhost-user relay that lets one backend serve both enclave-vmm and QEMU, and the
//! seccomp tables (read by the tests that check the filters netd installs).

pub mod filters;
pub mod proxy;
pub mod tap;
