//! Running `enclave-vmm` with the probe guest (vmm/probe): build the probe, start a VM in a
//! directory of its own, read its serial log and talk to its control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::workspace_root;

/// Builds the probe guest (cargo caches it) and returns the ELF's path.
pub fn probe_guest() -> Result<PathBuf, String> {
    let dir = workspace_root().join("vmm/probe");
    // The probe has its own flags in vmm/probe/.cargo/config.toml, found from the cwd.
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&dir)
        .args(["build", "--release", "-q"])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .map_err(|e| format!("running cargo for the probe guest: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building the probe guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(dir.join("target/x86_64-unknown-linux-gnu/release/enclave-probe-guest"))
}

/// FNV-1a, 64-bit: what the probe computes over the initrd.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Whether /dev/kvm can be opened.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}

/// One enclave-vmm process and its files.
pub struct VmmRun {
    /// The process.
    pub child: Child,
    /// Its directory (serial log, sockets, config).
    pub dir: PathBuf,
    started: Instant,
}

impl VmmRun {
    /// A fresh directory for a VM named `name`.
    pub fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("enclave-vmm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::create_dir_all(&dir);
        dir
    }

    /// Starts `vmm` with `config` (written to `dir/vm.json`) and any extra arguments.
    pub fn start(
        vmm: &Path,
        dir: &Path,
        config: &serde_json::Value,
        extra: &[&str],
    ) -> Result<VmmRun, String> {
        let cfg_path = dir.join("vm.json");
        std::fs::write(
            &cfg_path,
            serde_json::to_vec_pretty(config).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let child = Command::new(vmm)
            .arg("--config")
            .arg(&cfg_path)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
        Ok(VmmRun {
            child,
            dir: dir.to_path_buf(),
            started,
        })
    }

    /// Path of a file in the VM's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The serial log so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.path("serial.log")).unwrap_or_default()
    }

    /// Waits for the process to exit; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return Err(format!(
                    "enclave-vmm still running after {timeout:?}; serial:\n{}",
                    self.serial()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The process's standard error (after it exited).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }

    /// Milliseconds since start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Waits until the serial log contains `needle`.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.serial().contains(needle) {
                return Ok(());
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!(
                    "enclave-vmm exited ({st}) before {needle:?}; serial:\n{}\nstderr: {}",
                    self.serial(),
                    self.stderr()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Err(format!(
            "no {needle:?} on the serial console in {timeout:?}; serial:\n{}",
            self.serial()
        ))
    }

    /// Sends one control-API request and returns the response.
    pub fn api(&self, request: &str) -> Result<serde_json::Value, String> {
        let mut s =
            UnixStream::connect(self.path("api.sock")).map_err(|e| format!("api socket: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        writeln!(s, "{request}").map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("api response {line:?}: {e}"))
    }
}

impl Drop for VmmRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::env::var_os("ENCLAVE_KEEP_VM_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The probe's `CHECK <name> ok|FAIL <why>` lines.
pub fn checks(serial: &str) -> Vec<(String, bool, String)> {
    serial
        .lines()
        .filter_map(|l| l.strip_prefix("CHECK "))
        .map(|l| {
            let mut it = l.splitn(3, ' ');
            let name = it.next().unwrap_or_default().to_string();
            let ok = it.next() == Some("ok");
            (name, ok, it.next().unwrap_or_default().to_string())
        })
        .collect()
}

/// Asserts the probe ran: every check in `wanted` passed, no check failed, and it finished.
#[allow(clippy::panic)] // failing the calling test is the point
pub fn assert_checks(serial: &str, wanted: &[&str]) {
    let results = checks(serial);
    for want in wanted {
        if !results.iter().any(|(n, ok, _)| n == want && *ok) {
            panic!("probe check {want} missing or failed; serial:\n{serial}");
        }
    }
    if results.iter().any(|(_, ok, _)| !ok) || !serial.contains("PROBE DONE 0x0") {
        panic!("a probe check failed or the probe did not finish; serial:\n{serial}");
    }
}

/// Runs a VM to its end (30 s at most) and returns its serial log; panics unless it exits 0.
#[allow(clippy::panic)]
pub fn run_to_end(vmm: &Path, dir: &Path, config: &serde_json::Value) -> String {
    let mut vm = VmmRun::start(vmm, dir, config, &[]).unwrap_or_else(|e| panic!("{e}"));
    let st = vm
        .wait(Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    let serial = vm.serial();
    if !st.success() {
        panic!("enclave-vmm exited {st}: {}\n{serial}", vm.stderr());
    }
    serial
}

/// Pseudo-random bytes (a fixed multiplicative sequence), for initrds the probe hashes.
pub fn test_bytes(len: u32, seed: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(seed) >> 13) as u8)
        .collect()
}

/// Whether a test that needs KVM and root can run; reports the skip (or fails under CI).
pub fn kvm_and_root(test: &str, why_root: &str) -> bool {
    if let Err(e) = kvm_usable() {
        crate::skip_or_fail(test, &e);
        return false;
    }
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        crate::skip_or_fail(test, why_root);
        return false;
    }
    true
}

/// Connects to a VM's hybrid vsock socket and opens guest port `port` (`CONNECT`/`OK`),
/// retrying for up to 4 s while the guest is not listening yet.
#[allow(clippy::panic)]
pub fn hybrid_connect(sock: &Path, port: u32) -> UnixStream {
    let mut last = String::new();
    for _ in 0..200 {
        match UnixStream::connect(sock) {
            Ok(mut s) => {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                if writeln!(s, "CONNECT {port}").is_err() {
                    continue;
                }
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while std::io::Read::read(&mut s, &mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
                    line.push(b[0]);
                }
                let line = String::from_utf8_lossy(&line).to_string();
                if line.starts_with("OK ") {
                    return s;
                }
                last = line;
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!(
        "hybrid vsock CONNECT {port} on {} failed: {last}",
        sock.display()
    );
}
