//! containerd-shim-enclave-v2 and the VM backends it drives.

pub mod mount;
pub mod vm;
