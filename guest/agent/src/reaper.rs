//! PID 1 reaps every process that exits in the guest. Exits of processes the agent tracks
//! are kept until collected; helpers and orphans are discarded.

use std::collections::{HashMap, HashSet};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: i32,
    /// Terminating signal, or 0.
    pub signal: u32,
}

impl Exit {
    fn from_wait(st: libc::c_int) -> Exit {
        if libc::WIFSIGNALED(st) {
            let s = libc::WTERMSIG(st);
            Exit {
                status: 128 + s,
                signal: s as u32,
            }
        } else {
            Exit {
                status: libc::WEXITSTATUS(st),
                signal: 0,
            }
        }
    }
}

/// Unclaimed exits kept at most (a flood of orphans must not grow memory).
const MAX_UNCLAIMED: usize = 4096;

#[derive(Default)]
struct State {
    exits: HashMap<libc::pid_t, Exit>,
    watched: HashSet<libc::pid_t>,
    ignored: HashSet<libc::pid_t>,
}

/// The exit table.
#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    cv: Condvar,
}

impl Reaper {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the exit of `pid` until [`Reaper::wait`] collects it.
    pub fn watch(&self, pid: libc::pid_t) {
        self.lock().watched.insert(pid);
    }

    /// Discards the exit of `pid` (a helper the agent does not wait for).
    pub fn ignore(&self, pid: libc::pid_t) {
        let mut s = self.lock();
        if s.exits.remove(&pid).is_none() {
            s.ignored.insert(pid);
        }
    }

    /// The exit of a watched pid if it has happened.
    pub fn peek(&self, pid: libc::pid_t) -> Option<Exit> {
        self.lock().exits.get(&pid).copied()
    }

    /// Blocks until `pid` exits (it stays recorded for other waiters).
    pub fn wait(&self, pid: libc::pid_t) -> Exit {
        let mut s = self.lock();
        loop {
            if let Some(e) = s.exits.get(&pid) {
                return *e;
            }
            s = self.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits up to `t` for `pid` to exit.
    pub fn wait_timeout(&self, pid: libc::pid_t, t: Duration) -> Option<Exit> {
        let deadline = std::time::Instant::now() + t;
        let mut s = self.lock();
        loop {
            if let Some(e) = s.exits.get(&pid) {
                return Some(*e);
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            s = self
                .cv
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Forgets a watched pid whose owner is gone.
    pub fn release(&self, pid: libc::pid_t) {
        let mut s = self.lock();
        s.watched.remove(&pid);
        s.exits.remove(&pid);
    }

    fn record(&self, pid: libc::pid_t, e: Exit) {
        let mut s = self.lock();
        if s.ignored.remove(&pid) {
            return;
        }
        if !s.watched.contains(&pid) && s.exits.len() >= MAX_UNCLAIMED {
            // An orphan nobody asked about; a tracked pid is watched before long, so
            // unclaimed entries beyond the cap are dropped.
            return;
        }
        s.exits.insert(pid, e);
        drop(s);
        self.cv.notify_all();
    }

    /// The reaping loop: runs forever on its own thread. SIGCHLD must be blocked in every
    /// thread (the agent blocks it before starting any).
    pub fn run(&self) {
        // SAFETY: building a one-signal set and opening a signalfd for it.
        let sfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGCHLD);
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
        };
        loop {
            loop {
                let mut st = 0;
                // SAFETY: st is a valid int to fill.
                let pid = unsafe { libc::waitpid(-1, &mut st, libc::WNOHANG) };
                if pid <= 0 {
                    break;
                }
                self.record(pid, Exit::from_wait(st));
            }
            if sfd < 0 {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
            // SAFETY: reading into a buffer of the size of one siginfo record.
            unsafe { libc::read(sfd, buf.as_mut_ptr().cast(), buf.len()) };
        }
    }
}

/// Blocks SIGCHLD in the calling thread (and every thread it starts afterwards).
pub fn block_sigchld() {
    // SAFETY: building a one-signal set and changing this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}
