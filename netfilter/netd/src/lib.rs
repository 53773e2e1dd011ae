//! enclave-netd's reusable parts: opening the pod's tap (also used by the shim, which hands
//! QEMU a tap where QEMU cannot use the vhost-user backend).

pub mod tap;
