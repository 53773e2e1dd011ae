//! containerd-shim-enclave-v2: each container (and, with CRI, each pod sandbox) in a
//! microVM, driven through containerd's shim v2 Task API; and the VM backends it uses.

pub mod config;
pub mod confine;
pub mod enforce;
pub mod events;
pub mod inotify;
pub mod mount;
pub mod names;
pub mod podnet;
pub mod probe;
pub mod task;
pub mod vm;
