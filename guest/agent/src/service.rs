//! The agent's methods.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use enclave_agent_protocol::messages::*;
use enclave_agent_protocol::server::{dispatch, Handler};
use enclave_agent_protocol::{Code, Status, PROTOCOL_VERSION};

use crate::container::Container;
use crate::reaper::Reaper;
use crate::{log, net, spec};

/// Where the shared filesystem (container root filesystems) is mounted.
pub const SHARED_DIR: &str = "/run/enclave/shared";

/// The agent's state.
pub struct Agent {
    /// The exit table.
    pub reaper: Arc<Reaper>,
    /// Containers by id; `None` while one is being created (its id is reserved).
    containers: Mutex<HashMap<String, Option<Arc<Container>>>>,
    debug: bool,
}

impl Agent {
    /// A new agent around a running reaper.
    pub fn new(reaper: Arc<Reaper>, debug: bool) -> Agent {
        Agent {
            reaper,
            containers: Mutex::new(HashMap::new()),
            debug,
        }
    }

    fn get(&self, id: &str) -> Result<Arc<Container>, Status> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| Status::new(Code::NotFound, format!("no container {id:?}")))?
            .ok_or_else(|| {
                Status::new(
                    Code::Unavailable,
                    format!("container {id:?} is being created"),
                )
            })
    }

    fn create(&self, r: CreateContainerRequest) -> Result<CreateContainerResponse, Status> {
        let invalid = |m: String| Status::new(Code::InvalidArgument, m);
        spec::check_id("container_id", &r.container_id).map_err(invalid)?;
        spec::check_rootfs(&r.rootfs).map_err(invalid)?;
        let spec: spec::Spec = parse_json("oci_spec", &r.oci_spec)?;
        {
            let mut map = self.containers.lock().unwrap_or_else(|p| p.into_inner());
            if map.contains_key(&r.container_id) {
                return Err(Status::new(
                    Code::AlreadyExists,
                    format!("container {:?} exists", r.container_id),
                ));
            }
            // Reserve the id while the container is set up, without holding the lock.
            map.insert(r.container_id.clone(), None);
        }
        let rootfs = PathBuf::from(SHARED_DIR).join(&r.rootfs);
        let made = Container::create(&self.reaper, &r.container_id, &rootfs, spec);
        let mut map = self.containers.lock().unwrap_or_else(|p| p.into_inner());
        match made {
            Ok(c) => {
                let pid = c.init.pid as u32;
                map.insert(r.container_id, Some(Arc::new(c)));
                Ok(CreateContainerResponse { pid })
            }
            Err(e) => {
                map.remove(&r.container_id);
                Err(e)
            }
        }
    }

    fn remove(&self, id: &str) -> Result<Empty, Status> {
        let c = self.get(id)?;
        c.destroy(&self.reaper);
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        Ok(Empty {})
    }

    /// Kills every container (before power-off).
    pub fn destroy_all(&self) {
        let all: Vec<_> = self
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
            .collect();
        for c in all.into_iter().filter_map(|(_, c)| c) {
            c.destroy(&self.reaper);
        }
    }
}

/// Parses a JSON field of a request; serde's message already says line and column.
fn parse_json<T: serde::de::DeserializeOwned>(field: &str, bytes: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(bytes)
        .map_err(|e| Status::new(Code::InvalidArgument, format!("{field}: {e}")))
}

impl Handler for Agent {
    fn handle(&self, method: &str, payload: &[u8]) -> Result<Vec<u8>, Status> {
        if self.debug {
            log!("request {method} ({} bytes)", payload.len());
        }
        match method {
            Version::NAME => dispatch::<Version>(payload, |_| {
                Ok(VersionResponse {
                    protocol: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").into(),
                    kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                        .unwrap_or_default()
                        .trim()
                        .into(),
                    uptime_ms: crate::sys::uptime_ms(),
                })
            }),
            CreateContainer::NAME => dispatch::<CreateContainer>(payload, |r| self.create(r)),
            StartContainer::NAME => dispatch::<StartContainer>(payload, |r| {
                let pid = self.get(&r.container_id)?.start()?;
                Ok(StartResponse { pid: pid as u32 })
            }),
            ExecProcess::NAME => dispatch::<ExecProcess>(payload, |r| {
                spec::check_id("exec_id", &r.exec_id)
                    .map_err(|m| Status::new(Code::InvalidArgument, m))?;
                let p: spec::Process = parse_json("process", &r.process)?;
                let proc = self
                    .get(&r.container_id)?
                    .exec(&self.reaper, &r.exec_id, p)?;
                Ok(StartResponse {
                    pid: proc.pid as u32,
                })
            }),
            SignalProcess::NAME => dispatch::<SignalProcess>(payload, |r| {
                let sig = i32::try_from(r.signal)
                    .ok()
                    .filter(|s| (1..=64).contains(s))
                    .ok_or_else(|| {
                        Status::new(
                            Code::InvalidArgument,
                            format!("signal: {} is not 1-64", r.signal),
                        )
                    })?;
                self.get(&r.container_id)?
                    .signal(&self.reaper, &r.exec_id, sig, r.all)?;
                Ok(Empty {})
            }),
            WaitProcess::NAME => dispatch::<WaitProcess>(payload, |r| {
                let p = self.get(&r.container_id)?.process(&r.exec_id)?;
                let e = self.reaper.wait(p.pid);
                Ok(WaitProcessResponse {
                    exit_status: e.status,
                    signal: e.signal,
                })
            }),
            WriteStdin::NAME => dispatch::<WriteStdin>(payload, |r| {
                let p = self.get(&r.container_id)?.process(&r.exec_id)?;
                Ok(WriteStdinResponse {
                    len: p.write_stdin(&r.data)? as u32,
                })
            }),
            CloseStdin::NAME => dispatch::<CloseStdin>(payload, |r| {
                self.get(&r.container_id)?
                    .process(&r.exec_id)?
                    .close_stdin();
                Ok(Empty {})
            }),
            ReadStdout::NAME => dispatch::<ReadStdout>(payload, |r| {
                let p = self.get(&r.container_id)?.process(&r.exec_id)?;
                Ok(ReadStreamResponse {
                    data: p.read(false, r.max_len as usize)?,
                })
            }),
            ReadStderr::NAME => dispatch::<ReadStderr>(payload, |r| {
                let p = self.get(&r.container_id)?.process(&r.exec_id)?;
                Ok(ReadStreamResponse {
                    data: p.read(true, r.max_len as usize)?,
                })
            }),
            ResizeTty::NAME => dispatch::<ResizeTty>(payload, |r| {
                let clamp = |v: u32| v.min(u16::MAX as u32) as u16;
                self.get(&r.container_id)?
                    .process(&r.exec_id)?
                    .resize(clamp(r.rows), clamp(r.cols))?;
                Ok(Empty {})
            }),
            StatsContainer::NAME => {
                dispatch::<StatsContainer>(payload, |r| self.get(&r.container_id)?.stats())
            }
            RemoveContainer::NAME => {
                dispatch::<RemoveContainer>(payload, |r| self.remove(&r.container_id))
            }
            ConfigureNetwork::NAME => dispatch::<ConfigureNetwork>(payload, |r| {
                net::configure(&r).map_err(|m| Status::new(Code::InvalidArgument, m))?;
                Ok(Empty {})
            }),
            Shutdown::NAME => dispatch::<Shutdown>(payload, |_| {
                log!("shutdown requested");
                self.destroy_all();
                // Answer first; power off a moment later.
                std::thread::spawn(|| {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    crate::init::power_off();
                });
                Ok(Empty {})
            }),
            Probe::NAME => dispatch::<Probe>(payload, |r| {
                crate::probe::run(&r).map_err(|m| Status::new(Code::InvalidArgument, m))
            }),
            m => Err(Status::new(Code::Unimplemented, format!("no method {m:?}"))),
        }
    }
}
