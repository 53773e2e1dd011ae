//! Containers and their processes, as the agent tracks them.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use enclave_agent_protocol::{Code, Status};

use crate::reaper::Reaper;
use crate::spawn::{START_FD, STATUS_FD};
use crate::spec::{ExecConfig, InitConfig, Process};
use crate::sys;

/// Where container cgroups live.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/enclave";

/// Largest chunk one `ReadStdout` returns.
pub const MAX_READ: usize = 64 * 1024;

/// A process in a container: the init or an exec.
pub struct Proc {
    /// Guest pid.
    pub pid: libc::pid_t,
    stdin: Mutex<Option<File>>,
    stdout: Mutex<Option<File>>,
    stderr: Mutex<Option<File>>,
    tty: Option<File>,
}

impl Proc {
    fn new(pid: libc::pid_t, io: ProcIo) -> Proc {
        Proc {
            pid,
            stdin: Mutex::new(io.stdin),
            stdout: Mutex::new(io.stdout),
            stderr: Mutex::new(io.stderr),
            tty: io.tty,
        }
    }

    /// Writes to stdin.
    pub fn write_stdin(&self, data: &[u8]) -> Result<usize, Status> {
        let mut g = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        let f = g
            .as_mut()
            .ok_or_else(|| Status::new(Code::FailedPrecondition, "stdin is closed"))?;
        f.write_all(data)
            .map_err(|e| Status::new(Code::FailedPrecondition, format!("stdin: {e}")))?;
        Ok(data.len())
    }

    /// Closes stdin (the process sees end of file). With a tty, sends the EOF character.
    pub fn close_stdin(&self) {
        let mut g = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if self.tty.is_some() {
            if let Some(f) = g.as_mut() {
                let _ = f.write_all(&[4]);
            }
        }
        *g = None;
    }

    /// Reads from stdout (`err == false`) or stderr; empty at end of stream.
    pub fn read(&self, err: bool, max: usize) -> Result<Vec<u8>, Status> {
        let m = if err { &self.stderr } else { &self.stdout };
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        let Some(f) = g.as_mut() else {
            return Ok(Vec::new());
        };
        let mut buf = vec![0u8; max.clamp(1, MAX_READ)];
        loop {
            match f.read(&mut buf) {
                Ok(n) => {
                    buf.truncate(n);
                    if n == 0 {
                        *g = None;
                    }
                    return Ok(buf);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // A pty master reads EIO once the slave side is closed: end of stream.
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    *g = None;
                    return Ok(Vec::new());
                }
                Err(e) => return Err(Status::new(Code::Internal, format!("read output: {e}"))),
            }
        }
    }

    /// Resizes the tty.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), Status> {
        let t = self
            .tty
            .as_ref()
            .ok_or_else(|| Status::new(Code::FailedPrecondition, "process has no tty"))?;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
        if unsafe { libc::ioctl(t.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(Status::new(Code::Internal, sys::os_err("resize tty")));
        }
        Ok(())
    }
}

struct Pending {
    start: File,
    status: BufReader<File>,
}

/// A container.
pub struct Container {
    /// Container id.
    pub id: String,
    /// Its init process.
    pub init: Arc<Proc>,
    /// Exec'd processes by exec id.
    pub execs: Mutex<HashMap<String, Arc<Proc>>>,
    /// Its cgroup directory.
    pub cgroup: PathBuf,
    pending: Mutex<Option<Pending>>,
}

/// The agent's ends of a process's stdio.
struct ProcIo {
    stdin: Option<File>,
    stdout: Option<File>,
    stderr: Option<File>,
    tty: Option<File>,
}

/// Pipes, or a pty with `terminal`: the child's three ends and the agent's.
fn make_stdio(terminal: bool) -> Result<([Stdio; 3], ProcIo), Status> {
    let internal = |e: std::io::Error| Status::new(Code::Internal, format!("create stdio: {e}"));
    if terminal {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two fds; the other pointers may be null.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        if rc != 0 {
            return Err(Status::new(Code::Internal, sys::os_err("openpty")));
        }
        sys::set_cloexec(master);
        sys::set_cloexec(slave);
        // SAFETY: both fds were just created and belong to us alone.
        let (master, slave) = unsafe { (File::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let s1 = slave.try_clone().map_err(internal)?;
        let s2 = slave.try_clone().map_err(internal)?;
        let io = ProcIo {
            stdin: Some(master.try_clone().map_err(internal)?),
            stdout: Some(master.try_clone().map_err(internal)?),
            stderr: None,
            tty: Some(master),
        };
        return Ok(([Stdio::from(slave), Stdio::from(s1), Stdio::from(s2)], io));
    }
    let (in_r, in_w) = sys::pipe().map_err(internal)?;
    let (out_r, out_w) = sys::pipe().map_err(internal)?;
    let (err_r, err_w) = sys::pipe().map_err(internal)?;
    let io = ProcIo {
        stdin: Some(in_w),
        stdout: Some(out_r),
        stderr: Some(err_r),
        tty: None,
    };
    Ok((
        [Stdio::from(in_r), Stdio::from(out_w), Stdio::from(err_w)],
        io,
    ))
}

/// Spawns a helper with `status` at fd 3 and optionally `start` at fd 4, after running
/// `unshare_flags` in the child. Returns the helper's pid.
fn spawn_helper(
    reaper: &Reaper,
    mode: &str,
    config: &str,
    stdio: [Stdio; 3],
    status: &File,
    start: Option<&File>,
    unshare_flags: libc::c_int,
) -> Result<(), Status> {
    let [i, o, e] = stdio;
    let (sfd, tfd) = (status.as_raw_fd(), start.map(|f| f.as_raw_fd()));
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("enclave-agent")
        .arg(mode)
        .arg(config)
        .stdin(i)
        .stdout(o)
        .stderr(e)
        .env_clear();
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (dup2, fcntl, unshare) on integers it captured by value.
    unsafe {
        cmd.pre_exec(move || {
            let mv = |from: libc::c_int, to: libc::c_int| {
                if from == to {
                    libc::fcntl(to, libc::F_SETFD, 0)
                } else {
                    libc::dup2(from, to)
                }
            };
            if mv(sfd, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(t) = tfd {
                if mv(t, START_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if unshare_flags != 0 && libc::unshare(unshare_flags) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| Status::new(Code::Internal, format!("spawn {mode} helper: {e}")))?;
    reaper.ignore(child.id() as libc::pid_t);
    Ok(())
}

/// Reads one status line: `Ok(None)` at end of stream.
fn status_line(r: &mut BufReader<File>) -> Result<Option<String>, Status> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(0) => Ok(None),
        Ok(_) => Ok(Some(line.trim_end().to_string())),
        Err(e) => Err(Status::new(
            Code::Internal,
            format!("read helper status: {e}"),
        )),
    }
}

fn expect_pid(r: &mut BufReader<File>, what: &str) -> Result<libc::pid_t, Status> {
    match status_line(r)? {
        Some(l) if l.starts_with("pid ") => l[4..]
            .parse()
            .map_err(|_| Status::new(Code::Internal, format!("{what}: helper sent {l:?}"))),
        Some(l) => Err(helper_error(what, &l)),
        None => Err(Status::new(
            Code::Internal,
            format!("{what}: helper exited without a pid"),
        )),
    }
}

fn helper_error(what: &str, line: &str) -> Status {
    let msg = line.strip_prefix("error: ").unwrap_or(line);
    Status::new(Code::FailedPrecondition, format!("{what}: {msg}"))
}

/// Waits for end of stream on the status pipe (the exec succeeded) or an error line.
fn expect_exec(r: &mut BufReader<File>, what: &str) -> Result<(), Status> {
    match status_line(r)? {
        None => Ok(()),
        Some(l) => Err(helper_error(what, &l)),
    }
}

/// The highest capability number of this kernel (read once: it cannot change).
fn cap_last_cap() -> u32 {
    static LAST: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *LAST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(40)
    })
}

impl Container {
    /// Creates a container: its cgroup, namespaces and root filesystem, with its process
    /// waiting to exec until [`Container::start`].
    pub fn create(
        reaper: &Reaper,
        id: &str,
        rootfs: &Path,
        spec: crate::spec::Spec,
    ) -> Result<Container, Status> {
        let invalid = |m: String| Status::new(Code::InvalidArgument, m);
        let mut process = spec
            .process
            .ok_or_else(|| invalid("process: missing".into()))?;
        process.validate("process").map_err(invalid)?;
        for (i, m) in spec.mounts.iter().enumerate() {
            crate::spec::check_container_path(&format!("mounts[{i}].destination"), &m.destination)
                .map_err(invalid)?;
        }
        if !rootfs.is_dir() {
            return Err(Status::new(
                Code::NotFound,
                format!("rootfs {} is not a directory", rootfs.display()),
            ));
        }
        let cgroup = Path::new(CGROUP_ROOT).join(id);
        std::fs::create_dir(&cgroup).map_err(|e| {
            Status::new(
                Code::Internal,
                format!("create cgroup {}: {e}", cgroup.display()),
            )
        })?;
        let linux = spec.linux.unwrap_or_default();
        let terminal = process.terminal;
        let cfg = InitConfig {
            rootfs: rootfs.to_string_lossy().into_owned(),
            readonly: spec.root.is_some_and(|r| r.readonly),
            hostname: spec.hostname,
            mounts: spec.mounts,
            masked_paths: linux.masked_paths,
            readonly_paths: linux.readonly_paths,
            cgroup: cgroup.to_string_lossy().into_owned(),
            process,
            cap_last_cap: cap_last_cap(),
        };
        let result = Self::spawn_init(reaper, &cfg, terminal);
        match result {
            Ok((init, pending)) => Ok(Container {
                id: id.to_string(),
                init: Arc::new(init),
                execs: Mutex::new(HashMap::new()),
                cgroup,
                pending: Mutex::new(Some(pending)),
            }),
            Err(e) => {
                kill_cgroup(&cgroup);
                let _ = std::fs::remove_dir(&cgroup);
                Err(e)
            }
        }
    }

    fn spawn_init(
        reaper: &Reaper,
        cfg: &InitConfig,
        terminal: bool,
    ) -> Result<(Proc, Pending), Status> {
        let json =
            serde_json::to_string(cfg).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let (child_stdio, io) = make_stdio(terminal)?;
        let internal = |e: std::io::Error| Status::new(Code::Internal, format!("pipe: {e}"));
        let (status_r, status_w) = sys::pipe().map_err(internal)?;
        let (start_r, start_w) = sys::pipe().map_err(internal)?;
        let flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | libc::CLONE_NEWPID;
        spawn_helper(
            reaper,
            "__container-init",
            &json,
            child_stdio,
            &status_w,
            Some(&start_r),
            flags,
        )?;
        drop((status_w, start_r));
        let mut status = BufReader::new(status_r);
        let pid = expect_pid(&mut status, "create container")?;
        reaper.watch(pid);
        let proc = Proc::new(pid, io);
        match status_line(&mut status)? {
            Some(l) if l == "ready" => Ok((
                proc,
                Pending {
                    start: start_w,
                    status,
                },
            )),
            Some(l) => Err(helper_error("create container", &l)),
            None => Err(Status::new(
                Code::Internal,
                "create container: process exited during setup",
            )),
        }
    }

    /// Lets the init exec; returns once it has (or with why it could not).
    pub fn start(&self) -> Result<libc::pid_t, Status> {
        let p = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(mut p) = p else {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!("container {} already started", self.id),
            ));
        };
        p.start
            .write_all(&[1])
            .map_err(|e| Status::new(Code::FailedPrecondition, format!("start container: {e}")))?;
        drop(p.start);
        expect_exec(&mut p.status, "start container")?;
        Ok(self.init.pid)
    }

    /// Starts another process in the running container.
    pub fn exec(
        &self,
        reaper: &Reaper,
        exec_id: &str,
        mut process: Process,
    ) -> Result<Arc<Proc>, Status> {
        process
            .validate("process")
            .map_err(|m| Status::new(Code::InvalidArgument, m))?;
        if reaper.peek(self.init.pid).is_some()
            || self
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
        {
            return Err(Status::new(
                Code::FailedPrecondition,
                format!("container {} is not running", self.id),
            ));
        }
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        if execs.contains_key(exec_id) {
            return Err(Status::new(
                Code::AlreadyExists,
                format!("exec {exec_id} exists already"),
            ));
        }
        let terminal = process.terminal;
        let cfg = ExecConfig {
            init_pid: self.init.pid,
            cgroup: self.cgroup.to_string_lossy().into_owned(),
            process,
            cap_last_cap: cap_last_cap(),
        };
        let json =
            serde_json::to_string(&cfg).map_err(|e| Status::new(Code::Internal, e.to_string()))?;
        let (child_stdio, io) = make_stdio(terminal)?;
        let (status_r, status_w) =
            sys::pipe().map_err(|e| Status::new(Code::Internal, format!("pipe: {e}")))?;
        spawn_helper(reaper, "__exec", &json, child_stdio, &status_w, None, 0)?;
        drop(status_w);
        let mut status = BufReader::new(status_r);
        let pid = expect_pid(&mut status, "exec")?;
        reaper.watch(pid);
        expect_exec(&mut status, "exec")?;
        let proc = Arc::new(Proc::new(pid, io));
        execs.insert(exec_id.to_string(), proc.clone());
        Ok(proc)
    }

    /// The init (empty exec id) or an exec'd process.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Proc>, Status> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                Status::new(
                    Code::NotFound,
                    format!("container {}: no exec {exec_id:?}", self.id),
                )
            })
    }

    /// Signals one process, or with `all` every process in the container's cgroup.
    pub fn signal(
        &self,
        reaper: &Reaper,
        exec_id: &str,
        sig: i32,
        all: bool,
    ) -> Result<(), Status> {
        let p = self.process(exec_id)?;
        if all {
            for pid in cgroup_pids(&self.cgroup) {
                let _ = sys::kill(pid, sig);
            }
            return Ok(());
        }
        if reaper.peek(p.pid).is_some() {
            return Err(Status::new(
                Code::NotFound,
                format!("process {} has exited", p.pid),
            ));
        }
        sys::kill(p.pid, sig)
            .map_err(|e| Status::new(Code::Internal, format!("kill {}: {e}", p.pid)))
    }

    /// Resource use from the container's cgroup.
    pub fn stats(&self) -> Result<enclave_agent_protocol::messages::StatsResponse, Status> {
        let read = |f: &str| std::fs::read_to_string(self.cgroup.join(f)).unwrap_or_default();
        let num = |f: &str| read(f).trim().parse::<u64>().unwrap_or(0);
        let cpu_usec = read("cpu.stat")
            .lines()
            .find_map(|l| {
                l.strip_prefix("usage_usec ")
                    .and_then(|v| v.trim().parse::<u64>().ok())
            })
            .unwrap_or(0);
        Ok(enclave_agent_protocol::messages::StatsResponse {
            cpu_usage_ns: cpu_usec * 1000,
            memory_usage_bytes: num("memory.current"),
            memory_limit_bytes: num("memory.max"),
            pids_current: num("pids.current"),
        })
    }

    /// Kills everything in the container and frees its cgroup.
    pub fn destroy(&self, reaper: &Reaper) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        kill_cgroup(&self.cgroup);
        let _ = sys::kill(self.init.pid, libc::SIGKILL);
        reaper.wait_timeout(self.init.pid, Duration::from_secs(5));
        for _ in 0..100 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            kill_cgroup(&self.cgroup);
            std::thread::sleep(Duration::from_millis(20));
        }
        reaper.release(self.init.pid);
        for p in self
            .execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            reaper.release(p.pid);
        }
    }
}

fn cgroup_pids(cg: &Path) -> Vec<libc::pid_t> {
    std::fs::read_to_string(cg.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill_cgroup(cg: &Path) {
    if std::fs::write(cg.join("cgroup.kill"), b"1").is_err() {
        for pid in cgroup_pids(cg) {
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
}
