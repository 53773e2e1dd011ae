//! Task events to containerd (create, start, exit, delete, exec added), forwarded over
//! containerd's ttrpc events service at `TTRPC_ADDRESS`. Sending happens on a thread of its
//! own so a slow containerd never blocks a Task call; a broken connection is made again
//! (containerd may have restarted) and the event retried once.

use std::sync::mpsc::{channel, Sender};

use containerd_shim_protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExit, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::context;
use containerd_shim_protos::{Client, EventsClient};

fn any<M: Message>(type_url: &str, m: &M) -> Any {
    Any {
        type_url: type_url.into(),
        value: m.write_to_bytes().unwrap_or_default(),
        ..Default::default()
    }
}

/// Sends events to containerd.
#[derive(Clone)]
pub struct Publisher {
    tx: Option<Sender<(String, Any)>>,
}

impl Publisher {
    /// A publisher for `namespace`, sending to the ttrpc socket `address` (none: events are
    /// dropped, e.g. in tests without containerd).
    pub fn new(namespace: String, address: Option<String>) -> Publisher {
        let Some(address) = address.filter(|a| !a.is_empty()) else {
            return Publisher { tx: None };
        };
        let (tx, rx) = channel::<(String, Any)>();
        std::thread::spawn(move || {
            let connect = || {
                Client::connect(&format!("unix://{}", address.trim_start_matches("unix://")))
                    .ok()
                    .map(EventsClient::new)
            };
            let mut client = connect();
            for (topic, event) in rx {
                let req = ForwardRequest {
                    envelope: MessageField::some(Envelope {
                        timestamp: MessageField::some(Timestamp::now()),
                        namespace: namespace.clone(),
                        topic: topic.clone(),
                        event: MessageField::some(event),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                for _ in 0..2 {
                    let sent = client
                        .as_ref()
                        .map(|c| {
                            c.forward(context::with_timeout(5_000_000_000), &req)
                                .is_ok()
                        })
                        .unwrap_or(false);
                    if sent {
                        break;
                    }
                    client = connect();
                }
            }
        });
        Publisher { tx: Some(tx) }
    }

    fn send(&self, topic: &str, event: Any) {
        if let Some(tx) = &self.tx {
            let _ = tx.send((topic.into(), event));
        }
    }

    /// A container was created.
    pub fn task_create(&self, id: &str, bundle: &str, pid: u32) {
        let e = TaskCreate {
            container_id: id.into(),
            bundle: bundle.into(),
            pid,
            ..Default::default()
        };
        self.send(
            topics::TASK_CREATE_EVENT_TOPIC,
            any("containerd.events.TaskCreate", &e),
        );
    }

    /// A process started (the init, or an exec).
    pub fn task_start(&self, id: &str, exec: &str, pid: u32) {
        if exec.is_empty() {
            let e = TaskStart {
                container_id: id.into(),
                pid,
                ..Default::default()
            };
            self.send(
                topics::TASK_START_EVENT_TOPIC,
                any("containerd.events.TaskStart", &e),
            );
        } else {
            let e = containerd_shim_protos::events::task::TaskExecStarted {
                container_id: id.into(),
                exec_id: exec.into(),
                pid,
                ..Default::default()
            };
            self.send(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                any("containerd.events.TaskExecStarted", &e),
            );
        }
    }

    /// A process exited.
    pub fn task_exit(&self, id: &str, exec: &str, pid: u32, status: u32, at: Timestamp) {
        let e = TaskExit {
            container_id: id.into(),
            id: if exec.is_empty() {
                id.into()
            } else {
                exec.into()
            },
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        };
        self.send(
            topics::TASK_EXIT_EVENT_TOPIC,
            any("containerd.events.TaskExit", &e),
        );
    }

    /// A container was deleted.
    pub fn task_delete(&self, id: &str, pid: u32, status: u32, at: Timestamp) {
        let e = TaskDelete {
            container_id: id.into(),
            id: id.into(),
            pid,
            exit_status: status,
            exited_at: MessageField::some(at),
            ..Default::default()
        };
        self.send(
            topics::TASK_DELETE_EVENT_TOPIC,
            any("containerd.events.TaskDelete", &e),
        );
    }

    /// An exec was added.
    pub fn exec_added(&self, id: &str, exec: &str) {
        let e = TaskExecAdded {
            container_id: id.into(),
            exec_id: exec.into(),
            ..Default::default()
        };
        self.send(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            any("containerd.events.TaskExecAdded", &e),
        );
    }
}

/// The guest's numbers for a container as containerd's cgroup v1 metrics (what
/// `ctr task metrics` decodes).
pub fn metrics_any(st: &enclave_agent_protocol::messages::StatsResponse) -> Any {
    let m = Metrics {
        cpu: MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: st.cpu_usage_ns,
                ..Default::default()
            }),
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: st.memory_usage_bytes,
                limit: st.memory_limit_bytes,
                ..Default::default()
            }),
            ..Default::default()
        }),
        pids: MessageField::some(PidsStat {
            current: st.pids_current,
            ..Default::default()
        }),
        ..Default::default()
    };
    any("io.containerd.cgroups.v1.Metrics", &m)
}
