//! The agent's methods and their messages (protobuf, tags fixed here; this file is the
//! schema). Container and process specs travel as OCI runtime-spec JSON so that the shim
//! can forward what containerd gives it.

use prost::Message;

/// A method: its name on the wire and the types it carries.
pub trait Method {
    /// ttrpc method name.
    const NAME: &'static str;
    /// Request message.
    type Request: Message + Default;
    /// Response message.
    type Response: Message + Default;
}

macro_rules! methods {
    ($($(#[$doc:meta])* $name:ident: $req:ty => $resp:ty;)*) => {
        $(
            $(#[$doc])*
            pub struct $name;
            impl Method for $name {
                const NAME: &'static str = stringify!($name);
                type Request = $req;
                type Response = $resp;
            }
        )*
        /// Every method name the agent serves.
        pub const METHOD_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

methods! {
    /// Version handshake: the first call on a connection.
    Version: VersionRequest => VersionResponse;
    /// Sets up a container up to the point of exec; its process waits for `StartContainer`.
    CreateContainer: CreateContainerRequest => CreateContainerResponse;
    /// Lets a created container's process exec.
    StartContainer: ContainerRequest => StartResponse;
    /// Starts another process in a running container.
    ExecProcess: ExecProcessRequest => StartResponse;
    /// Sends a signal to a container's init or an exec'd process.
    SignalProcess: SignalProcessRequest => Empty;
    /// Waits for a process to exit.
    WaitProcess: ProcessRequest => WaitProcessResponse;
    /// Writes to a process's stdin (or tty).
    WriteStdin: WriteStdinRequest => WriteStdinResponse;
    /// Closes a process's stdin.
    CloseStdin: ProcessRequest => Empty;
    /// Reads what a process wrote to stdout (or its tty); empty data means end of stream.
    ReadStdout: ReadStreamRequest => ReadStreamResponse;
    /// Reads what a process wrote to stderr; empty data means end of stream.
    ReadStderr: ReadStreamRequest => ReadStreamResponse;
    /// Resizes a process's tty.
    ResizeTty: ResizeTtyRequest => Empty;
    /// CPU, memory and pids of a container, from its cgroup in the guest.
    StatsContainer: ContainerRequest => StatsResponse;
    /// Kills what is left of a container and frees its resources.
    RemoveContainer: ContainerRequest => Empty;
    /// Configures the guest network: interfaces, routes, DNS.
    ConfigureNetwork: ConfigureNetworkRequest => Empty;
    /// Stops every container and powers the VM off.
    Shutdown: Empty => Empty;
    /// Probes the network from inside the guest (segmentation tests): a TCP connect or a
    /// UDP datagram to each target, all at once, started at a bounded rate.
    Probe: ProbeRequest => ProbeResponse;
}

/// No fields.
#[derive(Clone, PartialEq, Message)]
pub struct Empty {}

/// Client side of the handshake.
#[derive(Clone, PartialEq, Message)]
pub struct VersionRequest {
    /// The client's protocol version.
    #[prost(uint32, tag = "1")]
    pub protocol: u32,
    /// The client's software version, for logs.
    #[prost(string, tag = "2")]
    pub client_version: String,
}

/// Agent side of the handshake.
#[derive(Clone, PartialEq, Message)]
pub struct VersionResponse {
    /// The agent's protocol version.
    #[prost(uint32, tag = "1")]
    pub protocol: u32,
    /// The agent's software version.
    #[prost(string, tag = "2")]
    pub agent_version: String,
    /// The guest kernel release (`uname -r`).
    #[prost(string, tag = "3")]
    pub kernel: String,
    /// Milliseconds since the guest kernel started (`CLOCK_BOOTTIME`).
    #[prost(uint64, tag = "4")]
    pub uptime_ms: u64,
}

/// Creates a container.
#[derive(Clone, PartialEq, Message)]
pub struct CreateContainerRequest {
    /// Container id: `[A-Za-z0-9_.-]`, 1–64 characters.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// The OCI runtime spec (`config.json`) as JSON.
    #[prost(bytes = "vec", tag = "2")]
    pub oci_spec: Vec<u8>,
    /// The root filesystem, relative to the shared filesystem mount in the guest (no `..`).
    #[prost(string, tag = "3")]
    pub rootfs: String,
}

/// Result of creating a container.
#[derive(Clone, PartialEq, Message)]
pub struct CreateContainerResponse {
    /// Guest pid of the container's init.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// Names a container.
#[derive(Clone, PartialEq, Message)]
pub struct ContainerRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
}

/// A process has started (exec succeeded).
#[derive(Clone, PartialEq, Message)]
pub struct StartResponse {
    /// Guest pid.
    #[prost(uint32, tag = "1")]
    pub pid: u32,
}

/// Starts a process in a running container.
#[derive(Clone, PartialEq, Message)]
pub struct ExecProcessRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id, unique in the container.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// The OCI `process` object as JSON.
    #[prost(bytes = "vec", tag = "3")]
    pub process: Vec<u8>,
}

/// Names a process: the container's init when `exec_id` is empty.
#[derive(Clone, PartialEq, Message)]
pub struct ProcessRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id; empty for the container's init.
    #[prost(string, tag = "2")]
    pub exec_id: String,
}

/// Sends a signal.
#[derive(Clone, PartialEq, Message)]
pub struct SignalProcessRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id; empty for the container's init.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// Signal number.
    #[prost(uint32, tag = "3")]
    pub signal: u32,
    /// Signal every process of the container (only for the init).
    #[prost(bool, tag = "4")]
    pub all: bool,
}

/// How a process ended.
#[derive(Clone, PartialEq, Message)]
pub struct WaitProcessResponse {
    /// Exit status as containerd reports it: the exit code, or 128 + signal.
    #[prost(int32, tag = "1")]
    pub exit_status: i32,
    /// The signal that killed it, or 0.
    #[prost(uint32, tag = "2")]
    pub signal: u32,
}

/// Data for stdin.
#[derive(Clone, PartialEq, Message)]
pub struct WriteStdinRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id; empty for the container's init.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// Bytes to write.
    #[prost(bytes = "vec", tag = "3")]
    pub data: Vec<u8>,
}

/// How much was written.
#[derive(Clone, PartialEq, Message)]
pub struct WriteStdinResponse {
    /// Bytes written.
    #[prost(uint32, tag = "1")]
    pub len: u32,
}

/// Reads an output stream.
#[derive(Clone, PartialEq, Message)]
pub struct ReadStreamRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id; empty for the container's init.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// Most bytes to return (capped by the agent).
    #[prost(uint32, tag = "3")]
    pub max_len: u32,
}

/// Output bytes.
#[derive(Clone, PartialEq, Message)]
pub struct ReadStreamResponse {
    /// Bytes read; empty at end of stream.
    #[prost(bytes = "vec", tag = "1")]
    pub data: Vec<u8>,
}

/// Resizes a tty.
#[derive(Clone, PartialEq, Message)]
pub struct ResizeTtyRequest {
    /// Container id.
    #[prost(string, tag = "1")]
    pub container_id: String,
    /// Exec id; empty for the container's init.
    #[prost(string, tag = "2")]
    pub exec_id: String,
    /// Rows.
    #[prost(uint32, tag = "3")]
    pub rows: u32,
    /// Columns.
    #[prost(uint32, tag = "4")]
    pub cols: u32,
}

/// Container resource use.
#[derive(Clone, PartialEq, Message)]
pub struct StatsResponse {
    /// CPU time used, nanoseconds.
    #[prost(uint64, tag = "1")]
    pub cpu_usage_ns: u64,
    /// Memory in use, bytes.
    #[prost(uint64, tag = "2")]
    pub memory_usage_bytes: u64,
    /// Memory limit, bytes (0: none).
    #[prost(uint64, tag = "3")]
    pub memory_limit_bytes: u64,
    /// Processes and threads.
    #[prost(uint64, tag = "4")]
    pub pids_current: u64,
}

/// One guest interface, found by MAC address.
#[derive(Clone, PartialEq, Message)]
pub struct Interface {
    /// MAC address `aa:bb:cc:dd:ee:ff` of the virtio-net device.
    #[prost(string, tag = "1")]
    pub mac: String,
    /// Name to give it (optional; kept when empty).
    #[prost(string, tag = "2")]
    pub name: String,
    /// MTU (0: leave as it is).
    #[prost(uint32, tag = "3")]
    pub mtu: u32,
    /// Addresses in CIDR form (`10.1.0.5/24`, `fd00::5/64`).
    #[prost(string, repeated, tag = "4")]
    pub addresses: Vec<String>,
}

/// One route.
#[derive(Clone, PartialEq, Message)]
pub struct Route {
    /// Destination in CIDR form; `default` or `0.0.0.0/0`, `::/0` for the default route.
    #[prost(string, tag = "1")]
    pub destination: String,
    /// Gateway address (empty for a link route).
    #[prost(string, tag = "2")]
    pub gateway: String,
    /// Interface MAC address the route goes through.
    #[prost(string, tag = "3")]
    pub device_mac: String,
}

/// DNS settings written to the guest's resolv.conf.
#[derive(Clone, PartialEq, Message)]
pub struct Dns {
    /// Name servers.
    #[prost(string, repeated, tag = "1")]
    pub nameservers: Vec<String>,
    /// Search domains.
    #[prost(string, repeated, tag = "2")]
    pub searches: Vec<String>,
    /// Options (`ndots:5`).
    #[prost(string, repeated, tag = "3")]
    pub options: Vec<String>,
}

/// The guest network as the shim wants it.
#[derive(Clone, PartialEq, Message)]
pub struct ConfigureNetworkRequest {
    /// Interfaces.
    #[prost(message, repeated, tag = "1")]
    pub interfaces: Vec<Interface>,
    /// Routes, added after the interfaces are up.
    #[prost(message, repeated, tag = "2")]
    pub routes: Vec<Route>,
    /// DNS.
    #[prost(message, optional, tag = "3")]
    pub dns: Option<Dns>,
}

/// Where a probe goes.
#[derive(Clone, PartialEq, Message)]
pub struct ProbeTarget {
    /// `tcp` or `udp`.
    #[prost(string, tag = "1")]
    pub proto: String,
    /// IPv4 or IPv6 address.
    #[prost(string, tag = "2")]
    pub addr: String,
    /// Destination port, 1–65535.
    #[prost(uint32, tag = "3")]
    pub port: u32,
    /// IP TTL / hop limit, 1–255; 0 leaves the default. A probe with TTL 1 to an address
    /// off the pod network dies at the node's first routing hop: it shows whether the walls
    /// let it out without it ever leaving the node.
    #[prost(uint32, tag = "4")]
    pub ttl: u32,
}

/// Probes to run.
#[derive(Clone, PartialEq, Message)]
pub struct ProbeRequest {
    /// Targets: at most 256.
    #[prost(message, repeated, tag = "1")]
    pub targets: Vec<ProbeTarget>,
    /// How long each probe waits for an answer, 1–10,000 ms.
    #[prost(uint32, tag = "2")]
    pub timeout_ms: u32,
    /// Probes started per second (1–1,000).
    #[prost(uint32, tag = "3")]
    pub rate: u32,
}

/// What one probe saw.
#[derive(Clone, PartialEq, Message)]
pub struct ProbeResult {
    /// `connected` (TCP handshake done), `answered` (a UDP reply), `refused` (a reset or
    /// port unreachable: the target's host got it), `unreachable` (an ICMP error from a
    /// router: it left the pod), `timeout` (nothing came back), or `error`.
    #[prost(string, tag = "1")]
    pub outcome: String,
    /// The guest's source port (to find the flow's records).
    #[prost(uint32, tag = "2")]
    pub local_port: u32,
    /// Milliseconds from start to outcome.
    #[prost(uint32, tag = "3")]
    pub ms: u32,
    /// The error, for `error` (and the errno for others).
    #[prost(string, tag = "4")]
    pub detail: String,
}

/// One result per target, in order.
#[derive(Clone, PartialEq, Message)]
pub struct ProbeResponse {
    /// Results.
    #[prost(message, repeated, tag = "1")]
    pub results: Vec<ProbeResult>,
}
