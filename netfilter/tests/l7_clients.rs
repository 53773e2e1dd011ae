#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! The application-protocol detectors against bytes captured from real programs
//! (`scripts/capture-l7-clients.py`; the files are in `tests/corpus/l7/`, named
//! `<app>-<program>.bin`): each capture is its own protocol, and no other detector claims
//! it (HTTP/1's detector accepts the HTTP/2 preface, by design).

use enclave_netfilter::l7::{detect, identify, Detection, Side, DETECT_BYTES};
use enclave_netfilter::policy::AppProto;
use std::path::Path;

fn app_of(file: &str) -> AppProto {
    let name = file.split('-').next().unwrap();
    let name = name.trim_end_matches('5'); // mqtt5
    AppProto::from_name(name).unwrap_or_else(|| panic!("{file}: no app `{name}`"))
}

#[test]
fn every_capture_is_detected_as_its_protocol_and_no_other() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/l7");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "bin"))
        .collect();
    files.sort();
    let mut seen = std::collections::BTreeSet::new();
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let app = app_of(&file);
        seen.insert(app);
        let bytes = std::fs::read(path).unwrap();
        let data = &bytes[..bytes.len().min(DETECT_BYTES)];
        let datagram = matches!(app, AppProto::Ntp | AppProto::Dhcp)
            || file.contains("-udp")
            || file.contains("rfc3164")
            || app == AppProto::Dns;
        let side = if matches!(app, AppProto::Nats | AppProto::Smtp | AppProto::Mysql) {
            Side::Server
        } else {
            Side::Client
        };
        assert_eq!(
            detect(app, side, data, datagram),
            Detection::Match,
            "{file} is not detected as {app}"
        );
        assert_eq!(
            identify(side, data, datagram),
            Some(app),
            "{file}: learn mode names another app"
        );
        for other in AppProto::ALL {
            if other == app
                || (other == AppProto::Http && matches!(app, AppProto::Http2 | AppProto::Grpc))
                || (other == AppProto::Http2 && app == AppProto::Grpc)
            {
                continue;
            }
            assert_ne!(
                detect(other, side, data, datagram),
                Detection::Match,
                "{file} ({app}) is also detected as {other}"
            );
        }
        // Every prefix is a valid beginning (or already decided), never a panic.
        for n in 0..data.len() {
            let _ = detect(app, side, &data[..n], false);
        }
    }
    println!(
        "{} captures of {} protocols: {:?}",
        files.len(),
        seen.len(),
        seen.iter().map(|a| a.as_str()).collect::<Vec<_>>()
    );
    assert!(
        seen.len() >= 20,
        "captures cover only {} protocols",
        seen.len()
    );
}
