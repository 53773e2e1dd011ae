//! The VM description: a JSON document given as a file (`--config`) or through the control
//! socket. Unknown fields are errors, and every error names the file, line and field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How the VMM enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode with paging, RSI = boot_params (Firecracker's way).
    #[default]
    Linux64,
    /// PVH: 32-bit protected mode, EBX = hvm_start_info (needs the kernel's PVH ELF note).
    Pvh,
}

/// How the guest kernel learns where its virtio-mmio devices are. Exactly one way, so a
/// kernel that could read both never probes a device twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceDiscovery {
    /// Devices in the ACPI DSDT (`LNRO0005`), as Firecracker and QEMU's microvm do: what
    /// distribution kernels (Debian's cloud kernel) read.
    #[default]
    Acpi,
    /// `virtio_mmio.device=4K@BASE:IRQ` on the command line, for the probe guest. The ACPI
    /// tables still describe the CPUs and a hardware-reduced platform, on which Linux maps
    /// an interrupt only for a device the DSDT describes: Linux guests need `Acpi`.
    Cmdline,
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// A file the console output is appended to; absent means standard output.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// The virtio-vsock device, with Firecracker's hybrid vsock on the host side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// Host Unix socket: connect and send `CONNECT <port>\n` to reach a guest port; guest
    /// connections to host port P arrive at `<uds_path>_P`.
    pub uds_path: PathBuf,
}

/// A vhost-user net device (served by enclave-netd or any vhost-user-net backend).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// The guest MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// A vhost-user fs device (virtiofsd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
    /// The mount tag the guest uses (`mount -t virtiofs TAG /mnt`), at most 36 bytes.
    pub tag: String,
}

/// A whole VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1 to 32.
    #[serde(default = "one")]
    pub vcpus: u8,
    /// Guest RAM in MiB (a multiple of 2, at least 16).
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    /// The kernel: an ELF vmlinux (or any ELF64 such as the probe guest) or a bzImage.
    pub kernel: PathBuf,
    /// An initrd loaded at the top of low memory.
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// The kernel command line; with `device_discovery = "cmdline"` the VMM appends its
    /// `virtio_mmio.device=` entries.
    #[serde(default)]
    pub cmdline: String,
    /// How the guest finds its virtio-mmio devices.
    #[serde(default)]
    pub device_discovery: DeviceDiscovery,
    /// Boot protocol.
    #[serde(default)]
    pub boot: BootProtocol,
    /// Serial console.
    #[serde(default)]
    pub serial: Option<SerialConfig>,
    /// The vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// vhost-user net devices.
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// vhost-user fs devices.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
}

fn one() -> u8 {
    1
}
fn default_memory() -> u32 {
    128
}

/// A configuration error, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or "api request").
    pub source: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field path, e.g. `net[0].mac`, when known.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.source)?;
        if let (Some(l), Some(c)) = (self.line, self.column) {
            write!(f, ":{l}:{c}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field `{field}`")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl VmConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: path.display().to_string(),
            line: None,
            column: None,
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates a JSON document; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<VmConfig, ConfigError> {
        let cfg: VmConfig = serde_json::from_str(text).map_err(|e| ConfigError {
            source: source.to_string(),
            line: Some(e.line()),
            column: Some(e.column()),
            field: None,
            message: e
                .to_string()
                .split(" at line ")
                .next()
                .unwrap_or_default()
                .to_string(),
        })?;
        cfg.validate().map_err(|(field, message)| {
            // Point at the field's key in the text when it is there.
            let key = field.rsplit('.').next().unwrap_or(&field);
            let key = key.split('[').next().unwrap_or(key);
            let (line, column) = locate(text, key);
            ConfigError {
                source: source.to_string(),
                line,
                column,
                field: Some(field),
                message,
            }
        })?;
        Ok(cfg)
    }

    /// Checks values serde cannot: ranges, formats, the files exist.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |f: &str, m: String| Err((f.to_string(), m));
        if self.vcpus == 0 || self.vcpus > 32 {
            return err("vcpus", format!("{} vCPUs: must be 1 to 32", self.vcpus));
        }
        if self.memory_mib < 16 || self.memory_mib % 2 != 0 || self.memory_mib > 65536 {
            return err(
                "memory_mib",
                format!(
                    "{} MiB: must be an even number from 16 to 65536",
                    self.memory_mib
                ),
            );
        }
        if !self.kernel.is_file() {
            return err("kernel", format!("{}: no such file", self.kernel.display()));
        }
        if let Some(initrd) = &self.initrd {
            if !initrd.is_file() {
                return err("initrd", format!("{}: no such file", initrd.display()));
            }
        }
        if self.cmdline.len() >= crate::memory::CMDLINE_MAX_SIZE - 512 {
            return err("cmdline", format!("{} bytes: too long", self.cmdline.len()));
        }
        if self.cmdline.bytes().any(|b| b == 0 || b == b'\n') {
            return err("cmdline", "contains a NUL or newline".to_string());
        }
        if let Some(v) = &self.vsock {
            if v.cid < 3 || v.cid > u32::MAX as u64 {
                return err(
                    "vsock.cid",
                    format!("{}: guest CIDs start at 3 and fit in 32 bits", v.cid),
                );
            }
            if v.uds_path.as_os_str().len() > 100 {
                return err(
                    "vsock.uds_path",
                    "longer than a Unix socket path may be (100 bytes, leaving room for _PORT)"
                        .into(),
                );
            }
        }
        for (i, n) in self.net.iter().enumerate() {
            if parse_mac(&n.mac).is_none() {
                return err(
                    &format!("net[{i}].mac"),
                    format!("{:?}: not a MAC address like 52:54:00:12:34:56", n.mac),
                );
            }
        }
        for (i, f) in self.fs.iter().enumerate() {
            if f.tag.is_empty() || f.tag.len() > 36 {
                return err(
                    &format!("fs[{i}].tag"),
                    format!("{:?}: must be 1 to 36 bytes", f.tag),
                );
            }
        }
        let devices = self.vsock.is_some() as usize + self.net.len() + self.fs.len();
        if devices as u32 > crate::memory::IRQ_MAX - crate::memory::VIRTIO_IRQ_BASE + 1 {
            return err(
                "net",
                format!("{devices} virtio devices: more than there are IRQs for"),
            );
        }
        Ok(())
    }
}

/// Line and column (1-based) of the first `"key"` in `text`.
fn locate(text: &str, key: &str) -> (Option<usize>, Option<usize>) {
    let needle = format!("\"{key}\"");
    for (i, line) in text.lines().enumerate() {
        if let Some(c) = line.find(&needle) {
            return (Some(i + 1), Some(c + 1));
        }
    }
    (None, None)
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn errors_name_line_and_field() {
        let e = VmConfig::parse(
            "{\n  \"kernel\": \"/bin/sh\",\n  \"vcpus\": 0\n}",
            "vm.json",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("vcpus"));
        assert_eq!(e.line, Some(3));
        assert!(
            e.to_string().starts_with("vm.json:3:3: field `vcpus`"),
            "{e}"
        );

        let e = VmConfig::parse("{\"kernel\": \"/bin/sh\", \"vcpu\": 1}", "vm.json").unwrap_err();
        assert!(e.message.contains("unknown field `vcpu`"), "{e}");

        let e = VmConfig::parse(
            "{\"kernel\": \"/bin/sh\",\n \"net\": [{\"socket\": \"/x\", \"mac\": \"52:54:00:zz:00:01\"}]}",
            "vm.json",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("net[0].mac"));
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn defaults_and_mac() {
        let c = VmConfig::parse("{\"kernel\": \"/bin/sh\"}", "x").unwrap();
        assert_eq!(
            (c.vcpus, c.memory_mib, c.boot),
            (1, 128, BootProtocol::Linux64)
        );
        assert_eq!(
            parse_mac("52:54:00:12:34:56"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0x56])
        );
        assert_eq!(parse_mac("52:54:00:12:34"), None);
        assert_eq!(parse_mac("52:54:00:12:34:56:78"), None);
    }
}
