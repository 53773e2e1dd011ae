//! Runs a shell script inside the nested KVM box (docs/nestbox.md).
//!
//! ```text
//! cargo run -p enclave-tests --example nestbox -- [--timeout SECONDS] [--memory MIB] \
//!     (-c 'COMMANDS' | SCRIPT)
//! ```
//! Prints the box's console and exits with the script's status (125 when the box could
//! not run it, 124 when it timed out). The script sees this host's root read-only, with
//! its own /run, a writable layer over /tmp, and a writable directory in `$ENCLAVE_BOX_OUT` that is kept.

use std::time::Duration;

use enclave_tests::nestbox::NestBox;

const HELP: &str = "usage: nestbox [--timeout SECONDS] [--memory MIB] (-c 'COMMANDS' | SCRIPT)

Boots the nested KVM box (QEMU TCG, -cpu max, kvm_amd: real KVM with hardware
virtualization semantics), runs COMMANDS or the file SCRIPT with /bin/sh in the box's
view of this host's root (read-only; fresh /run, /dev, /proc, /sys; /dev/kvm; /tmp writable over the host's),
prints the box's console and exits with the script's status. Files the script writes to
$ENCLAVE_BOX_OUT are kept; the directory is printed at the end.
  --timeout SECONDS   give up after this long (default 600)
  --memory MIB        box memory (default 2048)";

fn main() {
    let mut args = std::env::args().skip(1);
    let mut timeout = 600;
    let mut memory = 2048;
    let mut script = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                return;
            }
            "--timeout" => timeout = number(args.next(), "--timeout"),
            "--memory" => memory = number(args.next(), "--memory") as u32,
            "-c" => script = args.next(),
            file if !file.starts_with('-') => match std::fs::read_to_string(file) {
                Ok(s) => script = Some(s),
                Err(e) => fail(&format!("{file}: {e}")),
            },
            other => fail(&format!("unknown argument {other} (see --help)")),
        }
    }
    let Some(script) = script else {
        fail("no script: give -c 'COMMANDS' or a file (see --help)");
    };
    let mut nb = NestBox::find().unwrap_or_else(|e| fail(&e));
    nb.memory_mib = memory;
    eprintln!(
        "nestbox: booting the box ({} MiB, {} vCPUs)...",
        nb.memory_mib, nb.vcpus
    );
    let run = nb
        .run(&script, Duration::from_secs(timeout))
        .unwrap_or_else(|e| fail(&e));
    print!("{}", run.console);
    eprintln!(
        "nestbox: {:.1} s wall, status {:?}, output directory {}",
        run.wall.as_secs_f64(),
        run.status,
        run.out.display()
    );
    std::process::exit(run.status.unwrap_or(124));
}

fn number(v: Option<String>, flag: &str) -> u64 {
    v.and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fail(&format!("{flag} needs a number")))
}

fn fail(msg: &str) -> ! {
    eprintln!("nestbox: {msg}");
    std::process::exit(125);
}
