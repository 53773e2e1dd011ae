//! `enclave-vmm`: runs one microVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use enclave_vmm::api::ApiServer;
use enclave_vmm::config::VmConfig;
use enclave_vmm::seccomp::SeccompMode;
use enclave_vmm::vmm::Vm;

const HELP: &str = "\
enclave-vmm: run one KVM microVM

USAGE:
    enclave-vmm --config VM.json [--api-sock PATH] [--seccomp kill|log|off]
    enclave-vmm --api-sock PATH [--seccomp ...]     (configure and start over the API)

OPTIONS:
    --config FILE      the VM, as JSON (see docs/vmm.md for every field)
    --api-sock PATH    control socket: JSON lines {\"action\": configure|start|pause|resume|
                       shutdown|info|metrics}
    --seccomp MODE     kill (default): a syscall outside a thread's list kills the VMM;
                       log: allow and audit-log it (finding a missing syscall);
                       off: no filter (debugging only)
    --print-cmdline    print the kernel command line the guest will get, then run
    -h, --help         this text
    -V, --version      the version

EXIT STATUS:
    0  the guest stopped itself (i8042 reset, triple fault), or `shutdown` was requested
       (control API, or SIGTERM/SIGINT/SIGHUP)
    1  the configuration is invalid (the message names the file, line and field)
    2  bad command-line usage
    3  KVM could not run the guest (the message says which vCPU and why)
    4  the VMM failed while running
    5  the VM could not be built (KVM, memory, kernel, devices)
";

fn main() -> ExitCode {
    let started = Instant::now();
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut api: Option<PathBuf> = None;
    let mut mode = SeccompMode::Kill;
    let mut print_cmdline = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                print!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("enclave-vmm {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "--config" => config = args.next().map(PathBuf::from),
            "--api-sock" => api = args.next().map(PathBuf::from),
            "--print-cmdline" => print_cmdline = true,
            "--seccomp" => {
                mode = match args.next().as_deref() {
                    Some("kill") => SeccompMode::Kill,
                    Some("log") => SeccompMode::Log,
                    Some("off") => SeccompMode::Off,
                    other => {
                        return usage(&format!("--seccomp takes kill, log or off, not {other:?}"))
                    }
                }
            }
            other => return usage(&format!("unknown argument {other:?}")),
        }
    }
    let server = match &api {
        Some(p) => match ApiServer::bind(p) {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("enclave-vmm: control socket {}: {e}", p.display());
                return ExitCode::from(5);
            }
        },
        None => None,
    };
    let cfg = match (&config, &server) {
        (Some(path), _) => match VmConfig::from_file(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("enclave-vmm: {e}");
                return ExitCode::from(1);
            }
        },
        (None, Some(s)) => match s.wait_for_start() {
            Ok(c) => c,
            Err(e) => {
                eprintln!("enclave-vmm: control socket {}: {e}", s.path().display());
                return ExitCode::from(5);
            }
        },
        (None, None) => return usage("give --config FILE or --api-sock PATH"),
    };
    let vm = match Vm::build(cfg) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("enclave-vmm: cannot build the VM: {e}");
            return ExitCode::from(5);
        }
    };
    if print_cmdline {
        println!("{}", vm.cmdline());
    }
    let reason = vm.run(mode, server, started);
    let code = reason.exit_code();
    match &reason {
        enclave_vmm::cpu::StopReason::GuestReset | enclave_vmm::cpu::StopReason::ApiShutdown => {}
        enclave_vmm::cpu::StopReason::Signal(n) => eprintln!("enclave-vmm: stopped by signal {n}"),
        enclave_vmm::cpu::StopReason::GuestShutdown => eprintln!(
            "enclave-vmm: the guest triple-faulted (a Linux `reboot=t` reboot, or a crash)"
        ),
        other => eprintln!("enclave-vmm: VM stopped: {other:?}"),
    }
    ExitCode::from(code as u8)
}

fn usage(msg: &str) -> ExitCode {
    eprintln!("enclave-vmm: {msg}\n\n{HELP}");
    ExitCode::from(2)
}
