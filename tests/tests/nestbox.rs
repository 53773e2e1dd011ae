//! The nested KVM box's own watchdog: a box whose heartbeat stops is reported wedged (and
//! `run_test_in_box` boots another), while a script that merely hangs in a live box runs
//! into its timeout and is not retried. Both boot a real box (QEMU TCG).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use enclave_tests::nestbox::NestBox;

#[test]
fn a_stopped_heartbeat_is_a_wedged_box_and_a_hanging_script_is_not() {
    let test = "a_stopped_heartbeat_is_a_wedged_box_and_a_hanging_script_is_not";
    let mut nb = match NestBox::find() {
        Ok(nb) => nb,
        Err(why) => return enclave_tests::skip_or_fail(test, &format!("no nested box: {why}")),
    };
    nb.wedged_after = Duration::from_secs(15);

    // Stop the heartbeat (a fork of the box's /init; pid 1 itself stays) as a wedged
    // emulator would, then wait far longer than the watchdog.
    let freeze = r#"
        for p in /proc/[0-9]*; do
            pid=${p#/proc/}
            [ "$pid" = 1 ] && continue
            tr '\0' ' ' < $p/cmdline 2>/dev/null | grep -q ' /init' && kill -STOP $pid
        done
        echo heartbeat-frozen
        sleep 600
    "#;
    let run = nb.run(freeze, Duration::from_secs(300)).unwrap();
    assert!(run.console.contains("heartbeat-frozen"), "{}", run.tail(30));
    assert!(run.wedged, "not reported wedged:\n{}", run.tail(30));
    assert_eq!(run.status, None);
    assert!(
        run.wall < Duration::from_secs(200),
        "the watchdog took {:?}",
        run.wall
    );
    assert!(run.console.contains("[the box wedged"), "{}", run.tail(5));
    assert!(
        !run.console.contains("never written"),
        "the heartbeat never ran:\n{}",
        run.tail(30)
    );

    // A live box whose script hangs: the heartbeat goes on, so only the timeout ends it.
    let run = nb
        .run("echo hanging; sleep 600", Duration::from_secs(45))
        .unwrap();
    assert!(run.console.contains("hanging"), "{}", run.tail(30));
    assert!(
        !run.wedged,
        "a live box was called wedged:\n{}",
        run.tail(30)
    );
    assert_eq!(run.status, None);
    assert!(
        run.console.contains("did not power off within 45 s"),
        "{}",
        run.tail(5)
    );
}
