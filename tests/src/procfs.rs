//! What tests read from /proc: process command lines, fields of a status file, children.

use std::path::Path;

/// Every process as (pid, command line with NULs as spaces).
pub fn processes() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|p| {
            let pid = p.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(p.path().join("cmdline")).ok()?;
            Some((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")))
        })
        .collect()
}

/// The whitespace-separated values of `key` (e.g. `"Uid:"`) in a `/proc/.../status` file;
/// empty when the file or the key is missing.
pub fn status_field(status_file: &Path, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(status_file).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// `status_field` of process `pid`.
pub fn pid_status(pid: impl std::fmt::Display, key: &str) -> Vec<String> {
    status_field(Path::new(&format!("/proc/{pid}/status")), key)
}

/// The first child of `pid` (e.g. the VMM under its jailer).
pub fn first_child(pid: u32) -> Option<u32> {
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}
