//! The runtime configuration: `/etc/enclave/config.toml` (or the file `ENCLAVE_CONFIG`
//! names), every key optional. Unknown keys are errors that name the file, line and key.
//! `configs/enclave-config.toml` documents every option.

use std::path::PathBuf;

use serde::Deserialize;

use crate::vm::Backend;

/// Default location of the config file.
pub const DEFAULT_PATH: &str = "/etc/enclave/config.toml";

/// `[vm]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VmSection {
    /// `auto`, `qemu` or `enclave-vmm`.
    pub backend: String,
    /// QEMU accelerator: `auto`, `kvm` or `tcg`.
    pub accel: String,
    /// vCPUs when the pod does not say.
    pub vcpus: u8,
    /// Guest memory (MiB) when the pod does not say.
    pub memory_mib: u32,
    /// Guest memory added to a pod's memory limit (the guest kernel and agent).
    pub overhead_mib: u32,
}

impl Default for VmSection {
    fn default() -> Self {
        VmSection {
            backend: "auto".into(),
            accel: "auto".into(),
            vcpus: 1,
            memory_mib: 256,
            overhead_mib: 128,
        }
    }
}

/// `[paths]`
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PathsSection {
    /// Guest image directory (vmlinux, initramfs.cpio, cmdline).
    pub guest_image: PathBuf,
    /// enclave-vmm binary.
    pub enclave_vmm: PathBuf,
    /// enclave-netd binary (the pod network's vhost-user backend); when it does not exist,
    /// the one next to the shim's own binary.
    pub enclave_netd: PathBuf,
}

impl Default for PathsSection {
    fn default() -> Self {
        PathsSection {
            guest_image: "/usr/share/enclave/guest".into(),
            enclave_vmm: "/usr/local/bin/enclave-vmm".into(),
            enclave_netd: "/usr/local/bin/enclave-netd".into(),
        }
    }
}

/// `[network]`: the pod network's enforcement (enclave-netd and nftables).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkSection {
    /// The node's policy directory (one `*.yaml` zone policy).
    pub policy_dir: PathBuf,
    /// The node's pod registry (peers' identities and zones).
    pub registry: PathBuf,
    /// The node's peer directory: the cluster's pods, as enclave-node publishes them.
    pub peer_dir: PathBuf,
    /// The node's audit log.
    pub audit_log: PathBuf,
    /// `always` or `never`: fdatasync every audit record.
    pub audit_sync: String,
    /// uid:gid enclave-netd drops to.
    pub netd_user: String,
    /// Where each pod's packet captures go (`NAMESPACE_POD.pcapng`); beside the audit log
    /// (`captures/`) when not given.
    pub capture_dir: Option<PathBuf>,
    /// Most bytes of captures one pod's file may hold, in MiB.
    pub capture_max_mib: u64,
}

impl NetworkSection {
    /// The capture directory in use.
    pub fn capture_dir(&self) -> PathBuf {
        self.capture_dir.clone().unwrap_or_else(|| {
            self.audit_log
                .parent()
                .unwrap_or(std::path::Path::new("/var/log/enclave"))
                .join("captures")
        })
    }
}

impl Default for NetworkSection {
    fn default() -> Self {
        NetworkSection {
            policy_dir: enclave_netfilter::node::POLICY_DIR.into(),
            registry: enclave_netfilter::node::REGISTRY_DIR.into(),
            peer_dir: enclave_netfilter::node::PEER_DIR.into(),
            audit_log: enclave_netfilter::node::AUDIT_LOG.into(),
            audit_sync: "never".into(),
            netd_user: "65534:65534".into(),
            capture_dir: None,
            capture_max_mib: 256,
        }
    }
}

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[vm]`
    pub vm: VmSection,
    /// `[paths]`
    pub paths: PathsSection,
    /// `[network]`
    pub network: NetworkSection,
}

impl Config {
    /// Parses `text`; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<Config, String> {
        let c: Config = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            format!("{source}:{line}:{col}: {}", e.message())
        })?;
        c.validate()
            .map_err(|(key, msg)| format!("{source}: `{key}`: {msg}"))?;
        Ok(c)
    }

    /// The config in effect: `ENCLAVE_CONFIG`, else /etc/enclave/config.toml when it exists,
    /// else the defaults; `ENCLAVE_GUEST_IMAGE` overrides the image directory.
    pub fn load() -> Result<Config, String> {
        Self::load_from(None)
    }

    /// As [`Config::load`], but `path` (the runtime options' `ConfigPath` from containerd)
    /// comes first.
    pub fn load_from(path: Option<PathBuf>) -> Result<Config, String> {
        let path = path
            .or_else(|| std::env::var_os("ENCLAVE_CONFIG").map(PathBuf::from))
            .unwrap_or_else(|| DEFAULT_PATH.into());
        let mut c = if path.exists() {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            Config::parse(&text, &path.display().to_string())?
        } else {
            Config::default()
        };
        if let Some(img) = std::env::var_os("ENCLAVE_GUEST_IMAGE") {
            c.paths.guest_image = img.into();
        }
        Ok(c)
    }

    /// The enclave-netd binary to run.
    pub fn netd(&self) -> PathBuf {
        if self.paths.enclave_netd.exists() {
            return self.paths.enclave_netd.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("enclave-netd")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| self.paths.enclave_netd.clone())
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !matches!(self.network.audit_sync.as_str(), "always" | "never") {
            return Err((
                "network.audit_sync",
                format!("{:?}: use always or never", self.network.audit_sync),
            ));
        }
        let ids = self.network.netd_user.split_once(':');
        if !ids.is_some_and(|(u, g)| u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok()) {
            return Err((
                "network.netd_user",
                format!("{:?}: use UID:GID, numeric", self.network.netd_user),
            ));
        }
        if !matches!(self.vm.backend.as_str(), "auto" | "qemu" | "enclave-vmm") {
            return Err((
                "vm.backend",
                format!("{:?}: use auto, qemu or enclave-vmm", self.vm.backend),
            ));
        }
        if !matches!(self.vm.accel.as_str(), "auto" | "kvm" | "tcg") {
            return Err((
                "vm.accel",
                format!("{:?}: use auto, kvm or tcg", self.vm.accel),
            ));
        }
        if self.vm.vcpus == 0 || self.vm.vcpus > 32 {
            return Err(("vm.vcpus", format!("{}: 1 to 32", self.vm.vcpus)));
        }
        if self.vm.memory_mib < 64 || self.vm.memory_mib % 2 != 0 {
            return Err((
                "vm.memory_mib",
                format!("{}: an even number, at least 64", self.vm.memory_mib),
            ));
        }
        Ok(())
    }

    /// The backend `auto` stands for on this host: enclave-vmm where KVM runs Linux guests
    /// with hardware virtualization (the image's kernel finds its devices through the
    /// VMM's ACPI tables, or on its command line); QEMU otherwise (this PVM host, or no
    /// enclave-vmm binary).
    pub fn backend(&self) -> Backend {
        let qemu_accel = match self.vm.accel.as_str() {
            "kvm" => Some("kvm"),
            "tcg" => Some("tcg"),
            _ => None,
        };
        match self.vm.backend.as_str() {
            "qemu" => Backend::Qemu { accel: qemu_accel },
            "enclave-vmm" => Backend::EnclaveVmm {
                binary: self.paths.enclave_vmm.clone(),
            },
            _ => {
                if crate::vm::accel().0 == "kvm" && self.paths.enclave_vmm.exists() {
                    Backend::EnclaveVmm {
                        binary: self.paths.enclave_vmm.clone(),
                    }
                } else {
                    Backend::Qemu { accel: qemu_accel }
                }
            }
        }
    }
}

/// The config file containerd names in a runtime's options: for runtimes other than runc,
/// CRI passes `[...runtimes.enclave.options] ConfigPath = "..."` as
/// `runtimeoptions.v1.Options { type_url = 1, config_path = 2 }`.
pub fn options_config_path(
    options: Option<&containerd_shim_protos::protobuf::well_known_types::any::Any>,
) -> Option<PathBuf> {
    let any = options?;
    if !any.type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    // Two length-delimited string fields; read field 2.
    let b = &any.value;
    let mut i = 0;
    while i < b.len() {
        let key = b[i];
        i += 1;
        let mut len = 0usize;
        let mut shift = 0;
        loop {
            let byte = *b.get(i)?;
            i += 1;
            len |= ((byte & 0x7f) as usize) << shift;
            shift += 7;
            if byte & 0x80 == 0 || shift > 28 {
                break;
            }
        }
        if key & 7 != 2 {
            return None;
        }
        let value = b.get(i..i.checked_add(len)?)?;
        i += len;
        if key >> 3 == 2 {
            return std::str::from_utf8(value)
                .ok()
                .filter(|p| !p.is_empty())
                .map(PathBuf::from);
        }
    }
    None
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

/// Guest memory for a container's spec: the `enclave.io/memory-mib` annotation, else the
/// memory limit plus the guest overhead, else the default; vCPUs from `enclave.io/vcpus`,
/// else the CPU quota (rounded up), else the default.
pub fn resources(cfg: &Config, spec: &serde_json::Value) -> (u8, u32) {
    let ann = |k: &str| {
        spec["annotations"][k]
            .as_str()
            .and_then(|v| v.parse::<u64>().ok())
    };
    let limit_mib = spec["linux"]["resources"]["memory"]["limit"]
        .as_i64()
        .filter(|&l| l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20));
    let memory = ann("enclave.io/memory-mib")
        .or(limit_mib.map(|m| m + cfg.vm.overhead_mib as u64))
        .unwrap_or(cfg.vm.memory_mib as u64);
    let memory = (memory.clamp(64, 65536) as u32 + 1) & !1;
    let quota = spec["linux"]["resources"]["cpu"]["quota"]
        .as_i64()
        .filter(|&q| q > 0);
    let period = spec["linux"]["resources"]["cpu"]["period"]
        .as_i64()
        .filter(|&p| p > 0)
        .unwrap_or(100_000);
    let cpus = ann("enclave.io/vcpus")
        .or(quota.map(|q| (q as u64).div_ceil(period as u64)))
        .unwrap_or(cfg.vm.vcpus as u64);
    (cpus.clamp(1, 32) as u8, memory)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_name_file_line_and_key() {
        let e = Config::parse("[vm]\nbackend = \"qemu\"\nmemory = 3\n", "config.toml").unwrap_err();
        assert!(
            e.starts_with("config.toml:3:1:") && e.contains("unknown field `memory`"),
            "{e}"
        );
        let e = Config::parse("[vm]\nbackend = \"xen\"\n", "c.toml").unwrap_err();
        assert!(e.contains("`vm.backend`"), "{e}");
        let c = Config::parse("[vm]\nbackend = \"qemu\"\naccel = \"tcg\"\n", "c").unwrap();
        assert_eq!(c.backend(), Backend::Qemu { accel: Some("tcg") });
        assert_eq!(Config::parse("", "c").unwrap(), Config::default());
    }

    #[test]
    fn the_shipped_config_file_parses_to_the_defaults() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../configs/enclave-config.toml"
        );
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(Config::parse(&text, path).unwrap(), Config::default());
    }

    #[test]
    fn config_path_from_containerd_runtime_options() {
        use containerd_shim_protos::protobuf::well_known_types::any::Any;
        // runtimeoptions.v1.Options { type_url: "x", config_path: "/etc/enclave/pci.toml" }
        let mut value = vec![0x0a, 1, b'x', 0x12, 21];
        value.extend_from_slice(b"/etc/enclave/pci.toml");
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        assert_eq!(
            options_config_path(Some(&any)),
            Some(PathBuf::from("/etc/enclave/pci.toml"))
        );
        let other = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0x12, 1, b'a'],
            ..Default::default()
        };
        assert_eq!(options_config_path(Some(&other)), None);
        let broken = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value: vec![0x12, 200],
            ..Default::default()
        };
        assert_eq!(options_config_path(Some(&broken)), None);
    }

    #[test]
    fn resources_from_annotations_and_limits() {
        let c = Config::default();
        assert_eq!(resources(&c, &serde_json::json!({})), (1, 256));
        let s = serde_json::json!({"linux": {"resources": {"memory": {"limit": 512u64 << 20}, "cpu": {"quota": 150000, "period": 100000}}}});
        assert_eq!(resources(&c, &s), (2, 640));
        let s = serde_json::json!({"annotations": {"enclave.io/memory-mib": "1024", "enclave.io/vcpus": "4"}});
        assert_eq!(resources(&c, &s), (4, 1024));
    }
}
