//! Guest start-up figures, printed as a table: QEMU start to agent ready, and container
//! create/start through the agent, each beside a baseline measured in the same run (a
//! warm agent round trip; a host fork+exec of the same program). Under TCG these are
//! emulation figures, not what a node with hardware virtualization would see.
//!
//! `cargo bench -p enclave-tests --bench guest_boot` (ENCLAVE_BENCH_BOOTS=N, default 5).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use enclave_agent_protocol::messages::*;
use enclave_tests::{busybox_rootfs, spec, GuestVm, VmOptions};

fn stats(name: &str, v: &mut [f64], note: &str) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = v[v.len() / 2];
    println!(
        "{name:<46}{med:>10.2} ms  (min {:.2}, max {:.2}, n={}) {note}",
        v[0],
        v[v.len() - 1],
        v.len()
    );
    med
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let tools = match enclave_tests::tools() {
        Ok(t) => t,
        Err(why) => {
            println!("SKIPPED guest_boot: {why}");
            return;
        }
    };
    let boots: usize = enclave_tests::bench_setting("ENCLAVE_BENCH_BOOTS", 5);
    let (accel, why) = enclave_tests::accel();
    println!("accelerator: {accel} ({why}); {boots} boots, 10 containers per boot");
    let (mut ready, mut guest_up, mut rtt) = (Vec::new(), Vec::new(), Vec::new());
    let (mut create, mut start, mut total, mut host) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for b in 0..boots {
        let vm = GuestVm::boot(&tools, &VmOptions::default()).unwrap();
        let c = vm.connect(Duration::from_secs(120)).unwrap();
        ready.push(ms(vm.started.elapsed()));
        let v = c.handshake().unwrap();
        guest_up.push(v.uptime_ms as f64);
        for _ in 0..20 {
            let t = Instant::now();
            c.handshake().unwrap();
            rtt.push(ms(t.elapsed()));
        }
        for i in 0..10 {
            let id = format!("b{b}-{i}");
            busybox_rootfs(&vm.shared_dir().join(&id).join("rootfs")).unwrap();
            let t0 = Instant::now();
            c.call::<CreateContainer>(&CreateContainerRequest {
                container_id: id.clone(),
                oci_spec: serde_json::to_vec(&spec(&["true"], false)).unwrap(),
                rootfs: format!("{id}/rootfs"),
            })
            .unwrap();
            let t1 = Instant::now();
            c.call::<StartContainer>(&ContainerRequest {
                container_id: id.clone(),
            })
            .unwrap();
            let t2 = Instant::now();
            create.push(ms(t1 - t0));
            start.push(ms(t2 - t1));
            total.push(ms(t2 - t0));
            c.call::<WaitProcess>(&ProcessRequest {
                container_id: id.clone(),
                exec_id: String::new(),
            })
            .unwrap();
            c.call::<RemoveContainer>(&ContainerRequest { container_id: id })
                .unwrap();
            // Baseline: the same program started directly on the host (spawn returns once
            // exec has succeeded).
            let t = Instant::now();
            let mut child = std::process::Command::new(
                vm.shared_dir().join(format!("b{b}-{i}/rootfs/bin/busybox")),
            )
            .arg("true")
            .spawn()
            .unwrap();
            host.push(ms(t.elapsed()));
            child.wait().unwrap();
        }
        drop(c);
        drop(vm);
    }
    println!();
    stats("QEMU start -> agent handshake answered", &mut ready, "");
    stats(
        "  of which guest kernel start -> handshake",
        &mut guest_up,
        "(guest CLOCK_BOOTTIME)",
    );
    let r = stats("agent round trip, warm (baseline)", &mut rtt, "");
    let s = stats("StartContainer: request -> process exec'd", &mut start, "");
    stats(
        "CreateContainer: namespaces, mounts, rootfs",
        &mut create,
        "",
    );
    let t = stats("create + start", &mut total, "");
    let h = stats(
        "host fork+exec of the same binary (baseline)",
        &mut host,
        "",
    );
    println!();
    println!(
        "start / warm round trip: {:.1}x; create+start / host fork+exec: {:.1}x",
        s / r,
        t / h
    );
}
