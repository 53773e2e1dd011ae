//! The reassembler and the flow inspector driven by arbitrary segment sequences: each
//! record of the input is (side, sequence offset, ack, length) followed by the payload.
//! Beyond "no panic": the budget comes back to zero when the inspector is dropped, and
//! held bytes never exceed it.
#![no_main]

use enclave_netfilter::inspect::stream::Budget;
use enclave_netfilter::inspect::{FlowInspector, Step};
use enclave_netfilter::policy::{
    AppProto, GrpcDoc, HttpRequestsDoc, Inspect, OnFinding, PostgresDoc, RequestRules,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let budget = Budget::new(64 * 1024);
    {
        let cfg = Inspect {
            threats: Some(OnFinding::Deny),
            dlp: Some(OnFinding::Alert),
            ..Inspect::default()
        };
        let mut f = FlowInspector::new(cfg, true, [true, data.len() % 2 == 0], 5432, &budget);
        // The framers with the rule's request checks on: which one by the first byte.
        let app = match data.first().map(|b| b % 6) {
            Some(1) => Some(AppProto::Postgres),
            Some(2) => Some(AppProto::Redis),
            Some(3) => Some(AppProto::Http),
            Some(4) => Some(AppProto::Grpc),
            Some(5) => Some(AppProto::Tls),
            _ => None,
        };
        f.set_app(app);
        f.set_requests(std::sync::Arc::new(RequestRules {
            http: vec![HttpRequestsDoc {
                methods: vec!["GET".into()],
                paths: vec!["/v1/*".into()],
                hosts: vec!["*.example".into()],
                headers: vec![],
            }],
            redis: Some(vec!["GET".into(), "SET".into()]),
            postgres: Some(PostgresDoc {
                databases: vec!["cards".into()],
                users: vec![],
            }),
            grpc: vec![GrpcDoc {
                service: "payments.v1.Payments".into(),
                methods: vec!["Authorize".into()],
            }],
            dns: Some(vec!["*.psp.example".into()]),
            sni: Some(vec!["*.psp.example".into()]),
        }));
        f.syn(true, 1000);
        f.syn(false, 9000);
        let mut i = 1;
        while i + 6 <= data.len() {
            let side = data[i] & 1 == 0;
            let off = u32::from(u16::from_be_bytes([data[i + 1], data[i + 2]]));
            let ack = u32::from(data[i + 3]) * 64;
            let len = usize::from(u16::from_be_bytes([data[i + 4], data[i + 5]]) % 2048);
            i += 6;
            let end = (i + len).min(data.len());
            let base = if side { 1001u32 } else { 9001 };
            let other = if side { 9001u32 } else { 1001 };
            match f.segment(side, base.wrapping_add(off), Some(other.wrapping_add(ack)), &data[i..end]) {
                Step::Pass(found) => {
                    for d in found {
                        assert!(!d.detail.is_empty());
                    }
                }
                Step::Refused(_) => {}
            }
            assert!(budget.used() <= budget.limit());
            i = end;
        }
        let _ = f.datagram(true, data);
    }
    assert_eq!(budget.used(), 0, "every held byte is given back");
});
