//! `enclave-jailer`: runs enclave-vmm in namespaces, a chroot, cgroups, as an unprivileged
//! user, with a clean environment and no inherited descriptors. See `enclave_vmm::jail`.

use std::path::PathBuf;
use std::process::ExitCode;

use enclave_vmm::jail::{run, JailSpec};

const HELP: &str = "\
enclave-jailer: run enclave-vmm jailed

USAGE:
    enclave-jailer --id ID --exec ENCLAVE_VMM --config VM.json --uid UID --gid GID
                   [--base DIR] [--netns PATH] [--cgroup CONTROLLER.FILE=VALUE]...
                   [--share DIR]
                   [--cleanup] [-- ENCLAVE_VMM_ARGS...]

OPTIONS:
    --id ID          the VM's id (letters, digits, '-'); the jail is BASE/ID/root
    --exec PATH      the enclave-vmm binary (copied into the jail)
    --config FILE    the VM config; kernel and initrd are hard-linked or bind-mounted (read
                     only) in, the vsock socket and the serial log go to BASE/ID/root/run/
                     (or stay in --share's directory), backend sockets are bind-mounted
    --uid, --gid     the unprivileged user the VMM runs as (not 0)
    --base DIR       where jails go (default /srv/enclave/jail)
    --netns PATH     join this network namespace (the pod's); `new`: an empty one of its
                     own (a VMM whose net devices are vhost-user needs no network)
    --cgroup K=V     a cgroup limit, e.g. memory.limit_in_bytes=600000000 (v1) or
                     memory.max=600000000 (v2); repeatable
    --share DIR      bind-mount DIR (writable by UID) at /run/share in the jail; the vsock
                     socket and serial log the config puts in DIR stay there, where the
                     VMM's supervisor finds them and listens for guest connections
    --cleanup        remove BASE/ID when the VMM exits
    -h, --help       this text

The jailer waits for the VMM and exits with its exit code (128+N when killed by signal N).
";

fn main() -> ExitCode {
    let mut spec = JailSpec {
        id: String::new(),
        exec: PathBuf::new(),
        config: PathBuf::new(),
        uid: 0,
        gid: 0,
        base: PathBuf::from("/srv/enclave/jail"),
        netns: None,
        cgroups: Vec::new(),
        vmm_args: Vec::new(),
        share: None,
    };
    let mut cleanup = false;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = parse(&args, &mut spec, &mut cleanup) {
        eprintln!("enclave-jailer: {e}\n\n{HELP}");
        return ExitCode::from(2);
    }
    if spec.id.is_empty() || spec.exec.as_os_str().is_empty() || spec.config.as_os_str().is_empty()
    {
        eprintln!("enclave-jailer: --id, --exec, --config, --uid and --gid are required\n\n{HELP}");
        return ExitCode::from(2);
    }
    match run(&spec, cleanup) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("enclave-jailer: {e}");
            ExitCode::from(71)
        }
    }
}

fn parse(args: &[String], spec: &mut JailSpec, cleanup: &mut bool) -> Result<(), String> {
    let mut i = 0;
    while i < args.len() {
        let a = args[i].as_str();
        let mut val = || {
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a {
            "-h" | "--help" => {
                print!("{HELP}");
                std::process::exit(0);
            }
            "--id" => spec.id = val()?,
            "--exec" => spec.exec = val()?.into(),
            "--config" => spec.config = val()?.into(),
            "--uid" => spec.uid = val()?.parse().map_err(|e| format!("--uid: {e}"))?,
            "--gid" => spec.gid = val()?.parse().map_err(|e| format!("--gid: {e}"))?,
            "--base" => spec.base = val()?.into(),
            "--netns" => spec.netns = Some(val()?.into()),
            "--cgroup" => {
                let v = val()?;
                let (k, x) = v
                    .split_once('=')
                    .ok_or(format!("--cgroup {v}: expected KEY=VALUE"))?;
                spec.cgroups.push((k.to_string(), x.to_string()));
            }
            "--share" => spec.share = Some(val()?.into()),
            "--cleanup" => *cleanup = true,
            "--" => {
                spec.vmm_args.extend(args[i + 1..].iter().cloned());
                return Ok(());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    Ok(())
}
