//! A private containerd for tests and benchmarks, and a busybox image to import into it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test support: failing loudly is the point

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::procfs::processes;
use crate::{busybox_rootfs, workspace_root};

/// The image [`busybox_image`] builds.
pub const IMAGE: &str = "enclave.local/busybox:latest";

/// A private containerd (own root, state and sockets under `dir`), stopped on drop.
pub struct Containerd {
    child: Child,
    /// Starts containerd again with the same command, config and environment.
    launch: Box<dyn Fn() -> Child + Send + Sync>,
    /// Its directory.
    pub dir: PathBuf,
    /// The namespace `ctr` uses.
    pub ns: &'static str,
}

impl Containerd {
    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The gRPC socket.
    pub fn sock(&self) -> String {
        self.dir.join("containerd.sock").display().to_string()
    }

    /// Starts containerd (CRI off) with the shim binaries of `shim_dir` first on its PATH
    /// and the workspace's guest image.
    pub fn start(dir: &Path, ns: &'static str, shim_dir: &Path) -> Containerd {
        Self::start_with(
            dir,
            ns,
            shim_dir,
            "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
            None,
        )
    }

    /// Starts containerd with `extra` added to its config, inside network namespace
    /// `netns` when given (so CNI's bridge stays off the host's network).
    pub fn start_with(
        dir: &Path,
        ns: &'static str,
        shim_dir: &Path,
        extra: &str,
        netns: Option<&str>,
    ) -> Containerd {
        Self::start_with_env(dir, ns, shim_dir, extra, netns, &[])
    }

    /// As [`Containerd::start_with`], with environment variables for containerd and the
    /// shims it starts (e.g. `ENCLAVE_CONFIG`).
    pub fn start_with_env(
        dir: &Path,
        ns: &'static str,
        shim_dir: &Path,
        extra: &str,
        netns: Option<&str>,
        env: &[(&str, std::ffi::OsString)],
    ) -> Containerd {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).unwrap();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n{extra}\n[grpc]\n  address = \"{d}/containerd.sock\"\n[ttrpc]\n  address = \"{d}/containerd.sock.ttrpc\"\n",
            d = dir.display()
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let path = format!(
            "{}:{}",
            shim_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log_path = dir.join("containerd.log");
        let config_path = dir.join("config.toml");
        let netns = netns.map(str::to_string);
        let env: Vec<(String, std::ffi::OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let launch = move || {
            // Appends: a restarted containerd's log follows the first one's.
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .unwrap();
            let mut cmd = match &netns {
                Some(n) => {
                    let mut c = Command::new("ip");
                    c.args(["netns", "exec", n, "containerd"]);
                    c
                }
                None => Command::new("containerd"),
            };
            cmd.arg("--config")
                .arg(&config_path)
                .env("PATH", &path)
                .env(
                    "ENCLAVE_GUEST_IMAGE",
                    std::env::var_os("ENCLAVE_GUEST_IMAGE")
                        .map_or_else(|| workspace_root().join("target/guest"), PathBuf::from),
                )
                .envs(env.iter().map(|(k, v)| (k, v)))
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap()
        };
        let child = launch();
        let c = Containerd {
            child,
            launch: Box::new(launch),
            dir: dir.to_path_buf(),
            ns,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Path::new(&c.sock()).exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    /// Stops containerd (SIGTERM, as an operator's restart does; its shims go on running)
    /// and starts it again on the same root, state and sockets; returns once it serves.
    pub fn restart(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(self.sock());
        self.child = (self.launch)();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Path::new(&self.sock()).exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come back:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills containerd (SIGKILL, as a crash or an OOM kill would) and leaves it down; its
    /// shims go on running. [`Containerd::restart`] brings it back.
    pub fn crash(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs `ctr` against it.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .args(["--address", &self.sock(), "--namespace", self.ns])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `ctr`, killed after `secs` seconds (`timeout`): for calls that must not hang.
    pub fn ctr_within(&self, secs: u32, args: &[&str]) -> Output {
        Command::new("timeout")
            .args(["-s", "KILL", &secs.to_string(), "ctr"])
            .args(["--address", &self.sock(), "--namespace", self.ns])
            .args(args)
            .output()
            .unwrap()
    }

    /// Runs `ctr`, panicking with its output and containerd's log unless it succeeds.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?}: {}\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    /// `ctr run -d` of `id` running `cmd` in [`IMAGE`] with the enclave runtime, FIFOs
    /// under `fifo`, and `extra` ctr flags (annotations).
    pub fn run_detached(&self, fifo: &str, id: &str, extra: &[&str], cmd: &[&str]) -> String {
        let mut flags = vec!["-d"];
        flags.extend_from_slice(extra);
        self.ctr_ok(&run_args(fifo, id, &flags, cmd))
    }

    /// [`Containerd::run_detached`] of `sleep 1000`.
    pub fn run_sleeper(&self, fifo: &str, id: &str, extra: &[&str]) -> String {
        self.run_detached(fifo, id, extra, &["sleep", "1000"])
    }

    /// The end of containerd's log.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        log.lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .output();
        if std::env::var_os("ENCLAVE_KEEP_VM_DIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn sha256_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// Writes an OCI image layout tarball of a busybox root filesystem, named [`IMAGE`].
pub fn busybox_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("img-rootfs");
    busybox_rootfs(&rootfs).unwrap();
    image_from_rootfs(dir, &rootfs, IMAGE, &["sh"])
}

/// The image [`tools_image`] writes: busybox and real clients from this host's packages.
pub const TOOLS_IMAGE: &str = "enclave.local/tools:latest";

/// Writes an OCI image layout tarball of the busybox rootfs plus `bins` from this host
/// (host path, name under /bin), each with the shared libraries `ldd` names at the same
/// paths: real Debian clients (psql, redis-cli, curl) in a pod. Fails with the binary that
/// is missing.
pub fn tools_image(dir: &Path, bins: &[(&str, &str)]) -> Result<PathBuf, String> {
    let rootfs = dir.join("tools-rootfs");
    let _ = std::fs::remove_dir_all(&rootfs);
    busybox_rootfs(&rootfs)?;
    // busybox's own DNS client (a query the test's netd judges).
    let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin/nslookup"));
    let copy = |from: &Path, to: &Path| -> Result<(), String> {
        if let Some(d) = to.parent() {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        std::fs::copy(from, to).map_err(|e| format!("copying {}: {e}", from.display()))?;
        Ok(())
    };
    for (host, name) in bins {
        let host = Path::new(host);
        if !host.is_file() {
            return Err(format!(
                "{} not found (scripts/setup.sh installs it)",
                host.display()
            ));
        }
        copy(host, &rootfs.join("bin").join(name))?;
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .map_err(|e| format!("ldd: {e}"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // `libpq.so.5 => /lib/x86_64-linux-gnu/libpq.so.5 (0x...)` or the loader's
            // `/lib64/ld-linux-x86-64.so.2 (0x...)`.
            let lib = line
                .split("=>")
                .last()
                .and_then(|r| r.split_whitespace().next())
                .filter(|p| p.starts_with('/'));
            if let Some(lib) = lib {
                let target = rootfs.join(lib.trim_start_matches('/'));
                if !target.exists() {
                    // Copy what the link points to, under the link's own name.
                    copy(
                        &std::fs::canonicalize(lib).map_err(|e| format!("{lib}: {e}"))?,
                        &target,
                    )?;
                }
            }
        }
    }
    Ok(image_from_rootfs(dir, &rootfs, TOOLS_IMAGE, &["sh"]))
}

/// Writes an OCI image layout tarball named `name` of a static pause program (what CRI
/// runs as a pod's sandbox container), built with gcc.
pub fn pause_image(dir: &Path, name: &str) -> Result<PathBuf, String> {
    let rootfs = dir.join("pause-rootfs");
    std::fs::create_dir_all(&rootfs).map_err(|e| e.to_string())?;
    let src = dir.join("pause.c");
    std::fs::write(
        &src,
        "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n",
    )
    .map_err(|e| e.to_string())?;
    let out = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(rootfs.join("pause"))
        .arg(&src)
        .output()
        .map_err(|e| format!("gcc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "building pause: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(image_from_rootfs(dir, &rootfs, name, &["/pause"]))
}

/// Writes an OCI image layout tarball of `rootfs` (one uncompressed layer) named `name`.
pub fn image_from_rootfs(dir: &Path, rootfs: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let tag = sha256_hex(name.as_bytes())[..12].to_string();
    let layout = dir.join(format!("img-layout-{tag}"));
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let tar = |args: &[&str]| assert!(Command::new("tar").args(args).status().unwrap().success());
    let layer_path = dir.join(format!("layer-{tag}.tar"));
    tar(&[
        "--numeric-owner",
        "-C",
        rootfs.to_str().unwrap(),
        "-cf",
        layer_path.to_str().unwrap(),
        ".",
    ]);
    let layer = std::fs::read(&layer_path).unwrap();
    let put = |b: &[u8]| -> (String, usize) {
        let h = sha256_hex(b);
        std::fs::write(blobs.join(&h), b).unwrap();
        (format!("sha256:{h}"), b.len())
    };
    let (layer_digest, layer_size) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": cmd},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": "latest"}}],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let out = dir.join(format!("image-{tag}.oci.tar"));
    tar(&[
        "-C",
        layout.to_str().unwrap(),
        "-cf",
        out.to_str().unwrap(),
        ".",
    ]);
    out
}

/// `ctr run` of `id` running `cmd` in [`IMAGE`] with the enclave runtime, FIFOs under
/// `fifo`, and `extra` ctr flags.
pub fn run_args<'a>(
    fifo: &'a str,
    id: &'a str,
    extra: &[&'a str],
    cmd: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "run",
        "--fifo-dir",
        fifo,
        "--runtime",
        "io.containerd.enclave.v2",
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[IMAGE, id]);
    args.extend_from_slice(cmd);
    args
}

/// Command lines of VM and shim processes whose command line contains `marker`.
pub fn leftovers(marker: &str) -> Vec<String> {
    let ours = [
        "qemu",
        "virtiofsd",
        "vhost-device-vsock",
        "containerd-shim-enclave",
    ];
    processes()
        .into_iter()
        .map(|(_, cmd)| cmd)
        .filter(|cmd| cmd.contains(marker) && ours.iter().any(|o| cmd.contains(o)))
        .collect()
}

/// The pid of the process whose command line contains every one of `needle`.
pub fn pid_of(needle: &[&str]) -> Option<i32> {
    processes()
        .into_iter()
        .find(|(_, cmd)| needle.iter().all(|n| cmd.contains(n)))
        .map(|(pid, _)| pid)
}

/// Kills whatever a failed test left running under `marker` (shims and VM processes), so
/// the next run starts clean. Returns how many it killed.
pub fn kill_leftovers(marker: &str) -> usize {
    let victims: Vec<i32> = processes()
        .into_iter()
        .filter(|(_, cmd)| cmd.contains(marker) && !cmd.contains("cargo"))
        .map(|(pid, _)| pid)
        .collect();
    for pid in &victims {
        // SAFETY: SIGKILL to a process of a previous test run.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    victims.len()
}
