//! The subset of the OCI runtime spec a pod needs, validated before anything is spawned,
//! and the configurations handed to the helper processes.
//!
//! Unknown fields are ignored (containerd sends the whole spec; the VM boundary, not these
//! fields, is what isolates a pod from the node). Errors name the offending field.

use serde::{Deserialize, Serialize};

/// `config.json`, the fields the agent applies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Spec {
    /// The container's process.
    pub process: Option<Process>,
    /// Root filesystem.
    pub root: Option<Root>,
    /// UTS hostname.
    pub hostname: Option<String>,
    /// Mounts, in order.
    pub mounts: Vec<Mount>,
    /// Linux-specific fields.
    pub linux: Option<Linux>,
}

/// `root`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Root {
    /// Mount the root read-only.
    pub readonly: bool,
}

/// `linux`: the fields applied.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Linux {
    /// Paths hidden from the container.
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    pub readonly_paths: Vec<String>,
}

/// `process`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Process {
    /// Allocate a tty.
    pub terminal: bool,
    /// Credentials.
    pub user: User,
    /// argv.
    pub args: Vec<String>,
    /// `KEY=value` entries.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// Capability sets; absent means containerd's default set.
    pub capabilities: Option<Capabilities>,
    /// Resource limits.
    pub rlimits: Vec<Rlimit>,
    /// Set `no_new_privs`.
    pub no_new_privileges: bool,
}

/// `process.user`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct User {
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
}

/// `process.capabilities`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Capabilities {
    /// Bounding set.
    pub bounding: Vec<String>,
    /// Effective set.
    pub effective: Vec<String>,
    /// Inheritable set.
    pub inheritable: Vec<String>,
    /// Permitted set.
    pub permitted: Vec<String>,
    /// Ambient set.
    pub ambient: Vec<String>,
}

/// `process.rlimits[]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_NOFILE`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// `mounts[]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Mount {
    /// Where, inside the container.
    pub destination: String,
    /// Filesystem type (`proc`, `tmpfs`, `bind`, ...).
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Source (a guest path for bind mounts).
    pub source: Option<String>,
    /// Options (`nosuid`, `ro`, `rbind`, `mode=755`, ...).
    pub options: Vec<String>,
}

/// What `__container-init` needs.
#[derive(Debug, Serialize, Deserialize)]
pub struct InitConfig {
    /// Absolute guest path of the root filesystem.
    pub rootfs: String,
    /// Read-only root.
    pub readonly: bool,
    /// Hostname.
    pub hostname: Option<String>,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// Masked paths.
    pub masked_paths: Vec<String>,
    /// Read-only paths.
    pub readonly_paths: Vec<String>,
    /// cgroup directory to join.
    pub cgroup: String,
    /// The process.
    pub process: Process,
    /// Highest capability number of this kernel.
    pub cap_last_cap: u32,
}

/// What `__exec` needs.
#[derive(Debug, Serialize, Deserialize)]
pub struct ExecConfig {
    /// The container init's pid, whose namespaces to join.
    pub init_pid: i32,
    /// cgroup directory to join.
    pub cgroup: String,
    /// The process.
    pub process: Process,
    /// Highest capability number of this kernel.
    pub cap_last_cap: u32,
}

/// Capability names in number order (`CAP_` prefix optional on input).
pub const CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// containerd's default capability set, used when a spec gives none.
pub const DEFAULT_CAPS: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A capability number from its name.
pub fn cap_number(name: &str) -> Option<u32> {
    let n = name.strip_prefix("CAP_").unwrap_or(name);
    CAPS.iter().position(|c| *c == n).map(|i| i as u32)
}

/// The `RLIMIT_*` number from its name.
pub fn rlimit_number(name: &str) -> Option<libc::__rlimit_resource_t> {
    Some(match name {
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        _ => return None,
    })
}

fn no_nul(field: &str, s: &str) -> Result<(), String> {
    if s.contains('\0') {
        return Err(format!("{field}: contains a NUL byte"));
    }
    Ok(())
}

/// A path inside the container: absolute, no `..`, no NUL.
pub fn check_container_path(field: &str, p: &str) -> Result<(), String> {
    no_nul(field, p)?;
    if !p.starts_with('/') {
        return Err(format!("{field}: {p:?} is not an absolute path"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(format!("{field}: {p:?} contains '..'"));
    }
    Ok(())
}

impl Process {
    /// Checks the fields before anything is spawned, naming the first bad one.
    pub fn validate(&mut self, prefix: &str) -> Result<(), String> {
        if self.args.is_empty() {
            return Err(format!(
                "{prefix}.args: empty; the process needs a program to run"
            ));
        }
        for (i, a) in self.args.iter().enumerate() {
            no_nul(&format!("{prefix}.args[{i}]"), a)?;
        }
        for (i, e) in self.env.iter().enumerate() {
            no_nul(&format!("{prefix}.env[{i}]"), e)?;
            if !e.contains('=') {
                return Err(format!("{prefix}.env[{i}]: {e:?} is not KEY=value"));
            }
        }
        if self.cwd.is_empty() {
            self.cwd = "/".into();
        }
        check_container_path(&format!("{prefix}.cwd"), &self.cwd)?;
        if let Some(c) = &self.capabilities {
            for (set, names) in [
                ("bounding", &c.bounding),
                ("effective", &c.effective),
                ("inheritable", &c.inheritable),
                ("permitted", &c.permitted),
                ("ambient", &c.ambient),
            ] {
                for n in names {
                    if cap_number(n).is_none() {
                        return Err(format!(
                            "{prefix}.capabilities.{set}: unknown capability {n:?}"
                        ));
                    }
                }
            }
        } else {
            let all: Vec<String> = DEFAULT_CAPS.iter().map(|c| format!("CAP_{c}")).collect();
            self.capabilities = Some(Capabilities {
                bounding: all.clone(),
                effective: all.clone(),
                permitted: all,
                ..Default::default()
            });
        }
        for (i, r) in self.rlimits.iter().enumerate() {
            if rlimit_number(&r.kind).is_none() {
                return Err(format!(
                    "{prefix}.rlimits[{i}].type: unknown limit {:?}",
                    r.kind
                ));
            }
            if r.soft > r.hard {
                return Err(format!(
                    "{prefix}.rlimits[{i}]: soft {} above hard {}",
                    r.soft, r.hard
                ));
            }
        }
        Ok(())
    }
}

/// A container id: 1–64 of `[A-Za-z0-9_.-]`, not starting with `.`.
pub fn check_id(field: &str, id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok {
        return Err(format!(
            "{field}: {id:?} must be 1-64 characters of [A-Za-z0-9_.-]"
        ));
    }
    Ok(())
}

/// A rootfs path relative to the shared mount: no `..`, not absolute, not empty.
pub fn check_rootfs(p: &str) -> Result<(), String> {
    no_nul("rootfs", p)?;
    if p.is_empty() || p.starts_with('/') || p.split('/').any(|c| c == "..") {
        return Err(format!(
            "rootfs: {p:?} must be a relative path under the shared filesystem, without '..'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_json(j: &str) -> Process {
        serde_json::from_str(j).unwrap()
    }

    #[test]
    fn validation_names_the_field() {
        let mut p = proc_json(r#"{"args":[],"cwd":"/"}"#);
        assert!(p
            .validate("process")
            .unwrap_err()
            .starts_with("process.args"));
        let mut p = proc_json(r#"{"args":["sh"],"env":["PATH=/bin","oops"]}"#);
        assert_eq!(
            p.validate("process").unwrap_err(),
            "process.env[1]: \"oops\" is not KEY=value"
        );
        let mut p = proc_json(r#"{"args":["sh"],"cwd":"/a/../b"}"#);
        assert!(p
            .validate("process")
            .unwrap_err()
            .starts_with("process.cwd"));
        let mut p = proc_json(r#"{"args":["sh"],"capabilities":{"bounding":["CAP_FLY"]}}"#);
        assert!(p
            .validate("process")
            .unwrap_err()
            .contains("capabilities.bounding"));
        let mut p =
            proc_json(r#"{"args":["sh"],"rlimits":[{"type":"RLIMIT_NOFILE","hard":1,"soft":2}]}"#);
        assert!(p.validate("process").unwrap_err().contains("rlimits[0]"));
    }

    #[test]
    fn defaults_fill_in() {
        let mut p = proc_json(r#"{"args":["sh"]}"#);
        p.validate("process").unwrap();
        assert_eq!(p.cwd, "/");
        assert!(p
            .capabilities
            .unwrap()
            .bounding
            .contains(&"CAP_KILL".to_string()));
    }

    #[test]
    fn ids_and_rootfs_paths() {
        assert!(check_id("id", "web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_id("id", bad).is_err(), "{bad}");
        }
        assert!(check_rootfs("c1/rootfs").is_ok());
        for bad in ["", "/etc", "../x", "a/../../b"] {
            assert!(check_rootfs(bad).is_err(), "{bad}");
        }
        assert_eq!(cap_number("CAP_SYS_ADMIN"), Some(21));
        assert_eq!(cap_number("CHECKPOINT_RESTORE"), Some(40));
    }
}
