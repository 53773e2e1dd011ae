//! The nested KVM box: real KVM with hardware-virtualization semantics on hosts whose own
//! `/dev/kvm` cannot run a Linux guest's kernel code (this project's PVM machines).
//!
//! QEMU's TCG emulates AMD SVM with nested paging, so a Linux "box" booted under TCG with
//! `-cpu max` loads `kvm_amd` and gets a `/dev/kvm` on which enclave-vmm boots Linux for
//! real (slowly: everything the box runs is emulated). The box sees this host's root file
//! system read-only through virtiofs (so the workspace's binaries, the guest image and the
//! host's libraries are where they are on the host), with its own `/run`, `/dev`, `/proc`
//! and `/sys`, a writable layer over the host's `/tmp` (CI's clone lives there), and one
//! writable output directory shared at the same path it has on the host. A scenario is a shell script run in that view; its output comes back on
//! the box's console and in the output directory.
//!
//! The box's initramfs (busybox, its `/init` from `tests/nestbox/init`, and the modules it
//! loads) is built from the kernel package `guest/image/build.sh` already caches, and is
//! cached itself under `~/.cache/enclave/nestbox/<key>/`, keyed by a hash of its inputs.
//! docs/nestbox.md tells how to use it by hand (`cargo run -p enclave-tests --example
//! nestbox -- SCRIPT`).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::workspace_root;

/// Set (to 1) in the environment of everything that runs inside a box.
pub const IN_BOX_ENV: &str = "ENCLAVE_IN_BOX";
/// The output directory's path, in the environment of a box's script.
pub const OUT_ENV: &str = "ENCLAVE_BOX_OUT";
/// Modules the box loads, with their dependencies: KVM, the devices it is built from, and
/// what the scenarios' own networking needs (taps, veth pairs, nftables).
pub const MODULES: &[&str] = &[
    "bridge",
    "br_netfilter",
    "kvm_amd",
    "virtio_mmio",
    "virtiofs",
    "tun",
    "veth",
    "nf_tables",
    "nft_ct",
    "nft_reject_inet",
    "nft_log",
    "nft_limit",
    "nfnetlink_log",
    "overlay",
];

/// Whether this process runs inside a box.
pub fn inside() -> bool {
    std::env::var(IN_BOX_ENV).is_ok_and(|v| v == "1")
}

/// A box ready to run scenarios: its kernel, its initramfs, and the host tools that run it.
#[derive(Debug, Clone)]
pub struct NestBox {
    /// The box kernel (Debian's cloud kernel, ELF vmlinux).
    pub kernel: PathBuf,
    /// The box initramfs.
    pub initrd: PathBuf,
    qemu: PathBuf,
    virtiofsd: PathBuf,
    /// Box memory in MiB.
    pub memory_mib: u32,
    /// Box vCPUs.
    pub vcpus: u8,
    /// How long the box's heartbeat may stay unchanged before the box counts as wedged
    /// ([`WEDGED_AFTER`] unless a caller changes it).
    pub wedged_after: Duration,
}

/// What a box run gave back.
#[derive(Debug)]
pub struct BoxRun {
    /// The script's exit status, or None when the box never reported one (timeout, crash).
    pub status: Option<i32>,
    /// Everything the box printed on its console (its kernel's messages and the script's
    /// output).
    pub console: String,
    /// The output directory (kept; the caller may read files the script wrote there).
    pub out: PathBuf,
    /// Wall time from starting QEMU to its exit.
    pub wall: Duration,
    /// The box itself stopped (its heartbeat did not change for `wedged_after`) and was
    /// killed: an emulation failure, not a verdict on the script.
    pub wedged: bool,
}

/// How long the box's heartbeat (its uptime, which `/init` rewrites every 5 s of box time
/// in the output directory) may stay unchanged before the box counts as wedged.
pub const WEDGED_AFTER: Duration = Duration::from_secs(120);

impl BoxRun {
    /// The last `n` lines of the console, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.console.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

fn cache_dir() -> PathBuf {
    match std::env::var_os("ENCLAVE_CACHE") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/enclave"),
    }
}

/// The cached kernel package the guest image was built from: (vmlinux, modules dir).
fn kernel_package() -> Result<(PathBuf, PathBuf), String> {
    let manifest_path = workspace_root().join("target/guest/manifest");
    let manifest = std::fs::read_to_string(&manifest_path).map_err(|e| {
        format!(
            "{}: {e} (build the guest image: guest/image/build.sh)",
            manifest_path.display()
        )
    })?;
    let line = manifest
        .lines()
        .find_map(|l| l.strip_prefix("kernel "))
        .ok_or_else(|| format!("{}: no kernel line", manifest_path.display()))?;
    let (pkg, ver) = line
        .split_once(' ')
        .ok_or_else(|| format!("{}: kernel line {line:?}", manifest_path.display()))?;
    let dir = cache_dir().join("kernel").join(format!("{pkg}_{ver}"));
    let release = pkg.trim_start_matches("linux-image-");
    let vmlinux = dir.join("vmlinux");
    let modules = dir.join("pkg/lib/modules").join(release);
    if !dir.join("complete").exists() || !vmlinux.exists() || !modules.is_dir() {
        return Err(format!(
            "the kernel package {pkg} {ver} is not cached in {} (guest/image/build.sh fetches it)",
            dir.display()
        ));
    }
    Ok((vmlinux, modules))
}

fn busybox() -> Result<PathBuf, String> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| "busybox not found (apt-get install busybox-static)".into())
}

fn hash_file(h: &mut Sha256, p: &Path) -> Result<(), String> {
    let data = std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?;
    h.update((data.len() as u64).to_le_bytes());
    h.update(&data);
    Ok(())
}

impl NestBox {
    /// Finds the tools and builds the box's initramfs if its cached copy is missing or its
    /// inputs changed. Errors say what is missing and how to get it.
    pub fn find() -> Result<NestBox, String> {
        let tools = crate::tools()?;
        let (kernel, modules) = kernel_package()?;
        let busybox = busybox()?;
        let root = workspace_root();
        let init = root.join("tests/nestbox/init");
        let mkimage = root.join("guest/image/mkimage.py");
        let mut h = Sha256::new();
        for p in [&init, &mkimage, &busybox, &kernel] {
            hash_file(&mut h, p)?;
        }
        h.update(MODULES.join(" ").as_bytes());
        let key: String = h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let dir = cache_dir().join("nestbox").join(&key);
        let initrd = dir.join("box.cpio");
        if !initrd.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mut cmd = Command::new("python3");
            cmd.arg(&mkimage)
                .arg("initramfs")
                .arg("--init")
                .arg(&init)
                .arg(format!("--file=bin/busybox={}", busybox.display()))
                .arg("--modules-dir")
                .arg(&modules)
                .arg("--out")
                .arg(&initrd);
            for m in MODULES {
                cmd.args(["--module", m]);
            }
            let out = cmd
                .output()
                .map_err(|e| format!("running python3 for the box image: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "building the box image failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
        Ok(NestBox {
            kernel,
            initrd,
            qemu: tools.qemu,
            virtiofsd: tools.virtiofsd,
            memory_mib: 2048,
            vcpus: 2,
            wedged_after: WEDGED_AFTER,
        })
    }

    /// Runs `script` (POSIX sh, in the box's view of this host's root) and waits for the
    /// box to power off, at most `timeout`. The script finds its output directory in
    /// `$ENCLAVE_BOX_OUT`; `ENCLAVE_IN_BOX=1` is set, and `TMPDIR=/run/tmp`, a plain tmpfs:
    /// `/tmp` is an overlay there, which cannot be the upper layer of another overlay
    /// (containerd's snapshots).
    pub fn run(&self, script: &str, timeout: Duration) -> Result<BoxRun, String> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("enclave-box-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let out = dir.join("out");
        std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
        std::fs::write(
            out.join("run.sh"),
            format!(
                "export {IN_BOX_ENV}=1 {OUT_ENV}={out} PATH={path} HOME=/root TMPDIR=/run/tmp\n\
                 mkdir -p -m 1777 /run/tmp\ncd /\n{script}\n",
                out = shell_quote(&out.to_string_lossy()),
                path = shell_quote(&path),
            ),
        )
        .map_err(|e| format!("writing the box script: {e}"))?;

        let mut daemons = Daemons(Vec::new());
        for (tag, shared, extra) in [
            (
                "host",
                Path::new("/"),
                &["--readonly", "--announce-submounts"][..],
            ),
            ("out", out.as_path(), &[][..]),
        ] {
            let sock = dir.join(format!("{tag}.sock"));
            let log = std::fs::File::create(dir.join(format!("virtiofsd-{tag}.log")))
                .map_err(|e| e.to_string())?;
            let child = Command::new(&self.virtiofsd)
                .arg("--shared-dir")
                .arg(shared)
                .arg("--socket-path")
                .arg(&sock)
                // The box is test equipment run by the test's own user; its daemons are
                // not part of a pod and are not confined.
                .args(["--sandbox", "none"])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .map_err(|e| format!("starting virtiofsd: {e}"))?;
            daemons.0.push(child);
            wait_for(&sock, Duration::from_secs(10))
                .map_err(|e| format!("virtiofsd for {tag}: {e}"))?;
        }

        let console = dir.join("console.log");
        let mut append = format!(
            "console=ttyS0 reboot=t panic=-1 quiet rdinit=/init enclave.box_out={}",
            out.display()
        );
        if let Some(khz) = crate::tsc_khz() {
            // Under TCG the PIT calibration of the TSC fails at random (environment.md).
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let mem = format!("{}M", self.memory_mib);
        let started = Instant::now();
        let mut qemu = Command::new(&self.qemu)
            .args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-smp", &self.vcpus.to_string(), "-m", &mem])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-M", "microvm,memory-backend=mem"])
            .args(["-display", "none", "-no-reboot", "-nodefaults"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args([
                "-chardev",
                &format!("socket,id=host,path={}", dir.join("host.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-device,chardev=host,tag=host"])
            .args([
                "-chardev",
                &format!("socket,id=out,path={}", dir.join("out.sock").display()),
            ])
            .args(["-device", "vhost-user-fs-device,chardev=out,tag=out"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .args(["-append", &append])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.qemu.display()))?;
        let deadline = started + timeout;
        let alive = out.join(".alive");
        let (mut beat, mut beat_at) = (String::new(), started);
        let mut wedged = false;
        let exited = loop {
            match qemu.try_wait() {
                Ok(Some(st)) => break Some(st),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
                Err(e) => return Err(format!("waiting for QEMU: {e}")),
            }
            let now = std::fs::read_to_string(&alive).unwrap_or_default();
            if now != beat {
                (beat, beat_at) = (now, Instant::now());
            } else if beat_at.elapsed() >= self.wedged_after {
                wedged = true;
                break None;
            }
        };
        if exited.is_none() {
            let _ = qemu.kill();
            let _ = qemu.wait();
        }
        let wall = started.elapsed();
        let mut qemu_err = String::new();
        if let Some(mut e) = qemu.stderr.take() {
            let _ = e.read_to_string(&mut qemu_err);
        }
        drop(daemons);
        let console_text =
            String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).replace('\r', "");
        let status = console_text
            .lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix("ENCLAVE-BOX-EXIT "))
            .and_then(|s| s.split_whitespace().next()?.parse().ok());
        let mut console_all = console_text;
        if wedged {
            console_all.push_str(&format!(
                "\n[the box wedged: its heartbeat (box uptime {}) did not change for {} s; killed]\n",
                if beat.trim().is_empty() { "never written" } else { beat.trim() },
                self.wedged_after.as_secs()
            ));
        } else if exited.is_none() {
            console_all.push_str(&format!(
                "\n[the box did not power off within {} s; killed]\n",
                timeout.as_secs()
            ));
        }
        if !qemu_err.trim().is_empty() {
            console_all.push_str(&format!("\n[QEMU: {}]\n", qemu_err.trim()));
        }
        Ok(BoxRun {
            status,
            console: console_all,
            out,
            wall,
            wedged,
        })
    }
}

/// Stops the box's virtiofsd processes (they also exit when QEMU disconnects).
struct Daemons(Vec<Child>);

impl Drop for Daemons {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_for(p: &Path, timeout: Duration) -> Result<(), String> {
    let end = Instant::now() + timeout;
    while !p.exists() {
        if Instant::now() > end {
            return Err(format!("{} did not appear", p.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Quotes a string for POSIX sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// For a test that needs a Linux guest on KVM with hardware virtualization: true when this
/// host (or the box the test already runs in) has it, and the caller goes on; otherwise
/// the caller is run inside a box ([`run_test_in_box`]) and false is returned (its result
/// already stands).
pub fn on_hardware_kvm_or_in_box(test: &str, timeout: Duration) -> bool {
    let (accel, why) = crate::accel();
    if accel == "kvm" {
        return true;
    }
    assert!(
        !inside(),
        "{test}: inside the nested box but no hardware KVM: {why}"
    );
    run_test_in_box(test, timeout);
    false
}

/// How many boxes [`run_test_in_box`] boots for one test when a box wedges.
pub const BOX_ATTEMPTS: u32 = 2;

/// Runs the calling test (`test`, by its exact name, from this test binary) inside a box,
/// and fails the caller if it does not pass there. Where a box cannot run here, the test
/// fails under CI (`ENCLAVE_REQUIRE_VM=1`) or as root, and skips with the reason
/// elsewhere. Inside the box `ENCLAVE_REQUIRE_VM=1` is set, so the test cannot skip there.
#[allow(clippy::panic)] // failing the calling test is the point
pub fn run_test_in_box(test: &str, timeout: Duration) {
    let nb = match NestBox::find() {
        Ok(nb) => nb,
        Err(why) => {
            let why = format!("no nested KVM box: {why}");
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                panic!("{test}: cannot run as root: {why}");
            }
            return crate::skip_or_fail(test, &why);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => panic!("{test}: the test binary's path: {e}"),
    };
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    // A guest image chosen for the run (the purpose-built kernel's, say) goes in too.
    let image = std::env::var("ENCLAVE_GUEST_IMAGE")
        .map(|i| format!("export ENCLAVE_GUEST_IMAGE={}\n", shell_quote(&i)))
        .unwrap_or_default();
    let script = format!(
        "cd {cwd}\nexport ENCLAVE_REQUIRE_VM=1 ENCLAVE_REQUIRE_PRIVILEGED=1 RUST_BACKTRACE=1\n\
         {image}{exe} --exact {test} --include-ignored --nocapture --test-threads 1\n",
        cwd = shell_quote(&cwd.to_string_lossy()),
        exe = shell_quote(&exe.to_string_lossy()),
        test = shell_quote(test),
    );
    eprintln!("{test}: running inside a nested KVM box (QEMU TCG, -cpu max, kvm_amd)");
    // A box that wedges (TCG emulating SVM stops now and then, more often on a loaded
    // host) is booted once more; a script that fails or hangs in a live box is not.
    let mut attempt = 1;
    let run = loop {
        let run = match nb.run(&script, timeout) {
            Ok(r) => r,
            Err(e) => panic!("{test}: the box did not run: {e}"),
        };
        if !run.wedged || attempt == BOX_ATTEMPTS {
            break run;
        }
        eprintln!(
            "{test}: the box wedged after {:.1} s (emulation, not the test); its console's end:\n{}\n{test}: booting a new box (attempt {} of {BOX_ATTEMPTS})",
            run.wall.as_secs_f64(),
            run.tail(8),
            attempt + 1
        );
        attempt += 1;
    };
    eprintln!(
        "{test}: box finished in {:.1} s with status {:?}",
        run.wall.as_secs_f64(),
        run.status
    );
    let passed = run.console.contains("test result: ok. 1 passed");
    if run.status != Some(0) || !passed {
        let kept = run.out.join("console.log");
        let _ = std::fs::write(&kept, &run.console);
        panic!(
            "{test} failed inside the box (status {:?}); the whole console is in {}; its end:\n{}",
            run.status,
            kept.display(),
            run.tail(80)
        );
    }
    for line in run.console.lines().filter(|l| l.contains("BOX-REPORT")) {
        eprintln!("{line}");
    }
    let _ = std::fs::remove_dir_all(run.out.parent().unwrap_or(&run.out));
}
