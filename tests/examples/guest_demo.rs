//! The microVM part of the demo: boots the guest image under QEMU, talks to the agent over
//! vsock, runs a container from a busybox rootfs, execs into it, reads its stats, and
//! powers the VM off. `cargo run -p enclave-tests --example guest_demo`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use enclave_agent_protocol::messages::*;
use enclave_tests::{busybox_rootfs, spec, GuestVm, VmOptions};

fn read_all(c: &enclave_agent_protocol::Client, id: &str, exec: &str) -> String {
    String::from_utf8_lossy(&enclave_tests::read_to_end(c, id, exec, false).unwrap()).into_owned()
}

fn main() {
    let tools = enclave_tests::tools().unwrap_or_else(|e| {
        eprintln!("guest demo: {e}");
        std::process::exit(2)
    });
    let (accel, why) = enclave_tests::accel();
    println!("booting the guest image under QEMU, accelerator {accel} ({why})");
    let mut vm = GuestVm::boot(&tools, &VmOptions::default()).unwrap();
    let c = vm
        .connect(Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{e}"));
    let v = c.handshake().unwrap();
    println!(
        "agent {} ready {:.2} s after QEMU start (guest kernel {}, protocol {})",
        v.agent_version,
        vm.started.elapsed().as_secs_f64(),
        v.kernel,
        v.protocol
    );
    busybox_rootfs(&vm.shared_dir().join("web/rootfs")).unwrap();
    let t = Instant::now();
    c.call::<CreateContainer>(&CreateContainerRequest {
        container_id: "web".into(),
        oci_spec: serde_json::to_vec(&spec(
            &["sh", "-c", "echo hello from $(hostname), PID $$; sleep 600"],
            false,
        ))
        .unwrap(),
        rootfs: "web/rootfs".into(),
    })
    .unwrap();
    let pid = c
        .call::<StartContainer>(&ContainerRequest {
            container_id: "web".into(),
        })
        .unwrap()
        .pid;
    println!(
        "container web started in {:.0} ms (guest pid {pid})",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let first = c
        .call::<ReadStdout>(&ReadStreamRequest {
            container_id: "web".into(),
            exec_id: String::new(),
            max_len: 4096,
        })
        .unwrap();
    print!("  web says: {}", String::from_utf8_lossy(&first.data));
    let p = serde_json::json!({"args": ["sh", "-c", "echo processes seen from inside: $(ls /proc | grep -c '^[0-9]')"], "env": ["PATH=/bin"], "cwd": "/"});
    c.call::<ExecProcess>(&ExecProcessRequest {
        container_id: "web".into(),
        exec_id: "x".into(),
        process: serde_json::to_vec(&p).unwrap(),
    })
    .unwrap();
    print!("  exec: {}", read_all(&c, "web", "x"));
    let s = c
        .call::<StatsContainer>(&ContainerRequest {
            container_id: "web".into(),
        })
        .unwrap();
    println!(
        "  stats: memory {} KiB, cpu {:.1} ms, {} pids",
        s.memory_usage_bytes / 1024,
        s.cpu_usage_ns as f64 / 1e6,
        s.pids_current
    );
    c.call::<SignalProcess>(&SignalProcessRequest {
        container_id: "web".into(),
        exec_id: String::new(),
        signal: 15,
        all: true,
    })
    .unwrap();
    c.call::<SignalProcess>(&SignalProcessRequest {
        container_id: "web".into(),
        exec_id: String::new(),
        signal: 9,
        all: true,
    })
    .unwrap();
    let w = c
        .call::<WaitProcess>(&ProcessRequest {
            container_id: "web".into(),
            exec_id: String::new(),
        })
        .unwrap();
    println!(
        "  web exited with status {} (signal {})",
        w.exit_status, w.signal
    );
    c.call::<Shutdown>(&Empty {}).unwrap();
    match vm.wait_qemu(Duration::from_secs(60)) {
        Some(st) => println!("shutdown: VM powered off, QEMU exited ({st})"),
        None => {
            eprintln!("shutdown: QEMU still running after 60 s\n{}", vm.logs());
            std::process::exit(1)
        }
    }
}
