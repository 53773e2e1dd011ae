#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)]
//! Policy files: the shipped templates load, and bad input is refused with an error that
//! names the file, line, column and field.

use enclave_netfilter::policy::{self, Diagnostic, Lookup, PolicyError, Severity, ZoneId};
use std::path::Path;

fn errors(src: &str) -> Vec<Diagnostic> {
    match policy::load_str(src, "p.yaml") {
        Ok(_) => panic!("policy unexpectedly loaded:\n{src}"),
        Err(PolicyError::Invalid { diagnostics }) => diagnostics,
        Err(e) => panic!("unexpected error {e}"),
    }
}

const HEAD: &str = "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata:\n  name: t\n  version: 1\nspec:\n  zones:\n    - name: a\n      selector: {namespaces: [a]}\n    - name: b\n      cidrs: [10.0.0.0/8]\n";

#[test]
fn shipped_templates_load_without_findings() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/policies");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("configs/policies exists") {
        let p = e.expect("dir entry").path();
        let l =
            policy::load_file(&p).unwrap_or_else(|e| panic!("{} does not load:\n{e}", p.display()));
        assert!(l.warnings.is_empty(), "{}: {:?}", p.display(), l.warnings);
        n += 1;
    }
    assert!(
        n >= 3,
        "expected the PCI, three-tier and env-separation templates"
    );
}

#[test]
fn unknown_field_is_located_and_names_expected_fields() {
    let src = format!("{HEAD}  rules:\n    - from: a\n      to: b\n      protcol: tcp\n");
    let d = errors(&src);
    assert_eq!(d.len(), 1);
    assert_eq!((d[0].pos.line, d[0].pos.col), (15, 7), "{}", d[0]);
    assert_eq!(d[0].field, "spec.rules[0].protcol");
    assert!(d[0].message.contains("unknown field `protcol`"), "{}", d[0]);
    assert!(
        d[0].message.contains("`protocol`"),
        "should list expected fields: {}",
        d[0]
    );
    assert!(
        d[0].to_string().starts_with("p.yaml:15:7: error: "),
        "{}",
        d[0]
    );
}

#[test]
fn unknown_zone_reference_suggests_the_closest_name() {
    let src =
        format!("{HEAD}  rules:\n    - from: a\n      to: [b, bb, zzzzz]\n      protocol: tcp\n");
    let d = errors(&src);
    let fields: Vec<&str> = d.iter().map(|d| d.field.as_str()).collect();
    assert_eq!(fields, ["spec.rules[0].to[1]", "spec.rules[0].to[2]"]);
    assert!(d[0].message.contains("did you mean `b`"), "{}", d[0]);
    assert_eq!(d[0].pos.line, 14);
    assert!(!d[1].message.contains("did you mean"), "{}", d[1]);
}

#[test]
fn bad_ports_say_what_was_expected() {
    let src = format!("{HEAD}  rules:\n    - from: a\n      to: b\n      protocol: tcp\n      ports: [0, \"90-80\", \"x\", 70000, 443]\n");
    let d = errors(&src);
    let msgs: Vec<String> = d
        .iter()
        .map(|d| format!("{}: {}", d.field, d.message))
        .collect();
    assert_eq!(d.len(), 4, "{msgs:#?}");
    assert!(msgs[0].starts_with("spec.rules[0].ports[0]: port 0 is out of range"));
    assert!(msgs[1].contains("backwards; write `80-90`"));
    assert!(msgs[2].contains("`x` is not a port"));
    assert!(msgs[3].contains("70000 is out of range"));
    assert!(d.iter().all(|x| x.pos.line == 16), "{msgs:#?}");
}

#[test]
fn cidr_with_host_bits_and_duplicate_networks_are_refused() {
    let src = HEAD.replace("[10.0.0.0/8]", "[10.1.2.3/8, 192.168.0.0/16]")
        + "    - name: c\n      cidrs: [192.168.0.0/16]\n";
    let d = errors(&src);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert!(
        d[0].message
            .contains("host bits set; the network is 10.0.0.0/8"),
        "{}",
        d[0]
    );
    assert_eq!(d[0].field, "spec.zones[1].cidrs[0]");
    assert!(d[1].message.contains("already in zone `b`"), "{}", d[1]);
    assert_eq!(d[1].pos.line, 13);
}

#[test]
fn ports_without_a_port_protocol_and_app_on_wrong_protocol_are_refused() {
    let src = format!("{HEAD}  rules:\n    - from: a\n      to: b\n      ports: [80]\n    - from: a\n      to: b\n      protocol: udp\n      app: redis\n");
    let d = errors(&src);
    assert!(
        d[0].message
            .contains("ports need protocol tcp or udp, not `any`"),
        "{}",
        d[0]
    );
    assert!(
        d[1].message
            .contains("app `redis` needs protocol tcp, not `udp`"),
        "{}",
        d[1]
    );
}

#[test]
fn allow_rule_overridden_by_a_deny_is_a_contradiction() {
    let src = format!("{HEAD}  rules:\n    - name: open\n      from: a\n      to: b\n      protocol: tcp\n      ports: [443]\n    - name: shut\n      action: deny\n      from: a\n      to: b\n");
    let d = errors(&src);
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].severity, Severity::Error);
    assert_eq!(d[0].field, "spec.rules[0]");
    assert!(d[0].message.contains("denied by rule `shut`"), "{}", d[0]);
}

#[test]
fn shadowed_rule_is_a_warning_and_the_policy_still_loads() {
    let src = format!("{HEAD}  rules:\n    - name: wide\n      from: a\n      to: b\n      protocol: tcp\n      ports: [\"1-1024\"]\n    - name: narrow\n      from: a\n      to: b\n      protocol: tcp\n      ports: [443]\n      app: tls\n");
    let l = policy::load_str(&src, "p.yaml").expect("loads");
    assert_eq!(l.warnings.len(), 1);
    assert!(
        l.warnings[0]
            .message
            .contains("`narrow` is unreachable: rule `wide`"),
        "{}",
        l.warnings[0]
    );
    assert_eq!(l.warnings[0].pos.line, 18);
}

#[test]
fn yaml_syntax_error_and_wrong_types_are_located() {
    let d = errors("apiVersion: enclave.io/v1alpha1\nkind: [a, b]\n");
    assert_eq!(
        (d[0].pos.line, d[0].pos.col, d[0].field.as_str()),
        (2, 7, "kind"),
        "{}",
        d[0]
    );
    assert!(d[0].message.contains("expected a string"), "{}", d[0]);
    let d = errors("apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: \"t\n");
    assert_eq!(d.len(), 1);
    assert!(
        d[0].pos.line >= 3,
        "syntax error located at the open quote or after: {}",
        d[0]
    );
    let d = errors(&HEAD.replace("version: 1", "version: [1]"));
    assert_eq!(d[0].field, "metadata.version");
    assert!(
        d[0].message.contains("expected a string or a number"),
        "{}",
        d[0]
    );
    let d = errors(&format!(
        "{HEAD}  rules:\n    - from: {{x: 1}}\n      to: b\n"
    ));
    assert!(
        d[0].message
            .contains("expected a zone name or a list of zone names"),
        "{}",
        d[0]
    );
}

#[test]
fn reserved_and_invalid_names_are_refused() {
    let src = HEAD
        .replace("- name: a", "- name: unknown")
        .replace("- name: b", "- name: B_2");
    let d = errors(&src);
    assert!(d
        .iter()
        .any(|x| x.message.contains("`unknown` is reserved")));
    assert!(d
        .iter()
        .any(|x| x.message.contains("`B_2` is not a valid name")));
}

#[test]
fn lookup_cost_structure_decides_by_port_and_app() {
    let src = format!("{HEAD}  rules:\n    - name: web\n      from: a\n      to: b\n      protocol: tcp\n      ports: [\"8000-8010\"]\n      app: http\n    - name: ssh\n      from: a\n      to: b\n      protocol: tcp\n      ports: [22]\n");
    let l = policy::load_str(&src, "p.yaml").expect("loads");
    let c = &l.compiled;
    let (a, b) = (ZoneId(1), ZoneId(2));
    assert_eq!(c.lookup(a, b, 6, 22), Lookup::Allowed(policy::RuleId(1)));
    assert!(
        matches!(c.lookup(a, b, 6, 8005), Lookup::NeedsApp(x) if x[policy::AppProto::Http.index()].is_some())
    );
    assert_eq!(c.lookup(a, b, 6, 8011), Lookup::NoRule);
    assert_eq!(
        c.lookup(b, a, 6, 22),
        Lookup::NoRule,
        "rules are directional"
    );
    assert_eq!(
        c.lookup(a, b, 17, 22),
        Lookup::NoRule,
        "tcp rules do not open udp"
    );
    assert_eq!(c.zone_of_ip("10.9.9.9".parse().expect("ip")), Some(b));
    assert_eq!(c.zone_of_ip("11.0.0.1".parse().expect("ip")), None);
}

/// The one error a hostile input gets, refused before the YAML parsers run.
fn refused(src: &str) -> Diagnostic {
    let e = errors(src);
    assert_eq!(e.len(), 1, "{e:?}");
    e.into_iter().next().unwrap()
}

#[test]
fn deep_flow_nesting_is_refused_before_parsing_with_its_location() {
    // 50 MiB of `[` took serde_yaml minutes and gigabytes; refused at the 65th bracket.
    let d = refused(&"[".repeat(4 << 20));
    assert!(d.message.contains("nested deeper than 64"), "{d}");
    assert_eq!((d.pos.line, d.pos.col), (1, 65));
    // Brackets inside quotes and comments are text, not nesting.
    let mut ok = String::from("apiVersion: enclave.io/v1alpha1 # ");
    ok.push_str(&"[".repeat(100));
    ok.push_str(&format!("\nkind: \"{}\"\n", "{".repeat(100)));
    let e = errors(&ok);
    assert!(e.iter().all(|d| !d.message.contains("nested")), "{e:?}");
}

#[test]
fn deep_block_nesting_is_refused_before_parsing() {
    let indented: String = (0..200)
        .map(|i| format!("{}- a:\n", "  ".repeat(i)))
        .collect();
    let d = refused(&indented);
    assert!(d.message.contains("nested deeper"), "{d}");
    assert_eq!(d.pos.line, 65);
    let d = refused(&format!("{}x\n", "- ".repeat(100_000)));
    assert!(d.message.contains("nested deeper"), "{d}");
}

#[test]
fn an_oversized_policy_is_refused_without_being_read_whole() {
    let d = refused(&"a".repeat(policy::MAX_POLICY_BYTES + 1));
    assert!(d.message.contains("larger than 16 MiB"), "{d}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge.yaml");
    std::fs::write(&p, vec![b'#'; policy::MAX_POLICY_BYTES + 10]).unwrap();
    let Err(PolicyError::Invalid { diagnostics }) = policy::load_file(&p) else {
        panic!("a file over the limit loads")
    };
    assert!(
        diagnostics[0].message.contains("larger than"),
        "{diagnostics:?}"
    );
}

#[test]
fn binary_input_is_refused_with_the_byte_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("garbage.yaml");
    std::fs::write(&p, b"apiVersion: x\nkind: \xff\xfe garbage").unwrap();
    let Err(PolicyError::Invalid { diagnostics }) = policy::load_file(&p) else {
        panic!("binary input loads")
    };
    let d = &diagnostics[0];
    assert!(d.message.contains("byte offset 20"), "{d}");
    assert_eq!((d.pos.line, d.pos.col), (2, 7));
}

#[test]
fn an_echoed_value_is_cut_to_a_short_excerpt() {
    let src = format!(
        "apiVersion: {}\nkind: ZonePolicy\nmetadata: {{name: x, version: 1}}\nspec: {{zones: [{{name: a, cidrs: [10.0.0.0/8]}}], rules: []}}\n",
        "A".repeat(5_000_000)
    );
    let e = errors(&src);
    let d = e
        .iter()
        .find(|d| d.field == "apiVersion")
        .expect("apiVersion error");
    assert!(d.message.len() < 400, "{} bytes", d.message.len());
    assert!(d.message.contains("message cut"), "{d}");
}

#[test]
fn what_the_kernel_wall_cannot_express_is_reported_where_it_is_written() {
    let src = format!("{HEAD}    - name: mapped\n      cidrs: [\"::ffff:10.0.0.0/104\"]\n  rules:\n    - name: web\n      from: a\n      to: b\n      protocol: tcp\n      ports: [443, \"8000-8080\"]\n      app: tls\n    - name: plain\n      from: mapped\n      to: a\n      protocol: udp\n");
    let l = policy::load_str(&src, "p.yaml").expect("loads");
    // The app check is netd's alone: a note where `app` is written, naming the ports.
    assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
    let n = &l.notes[0];
    assert_eq!(n.severity, Severity::Note);
    assert_eq!(n.field, "spec.rules[0].app");
    assert_eq!((n.pos.line, n.pos.col), (20, 12), "{n}");
    assert!(n.message.contains("tcp/443,8000-8080"), "{n}");
    assert!(
        n.message.contains("`tls` is checked by enclave-netd alone"),
        "{n}"
    );
    // An IPv4-mapped CIDR gets nothing through the kernel wall: a warning at the CIDR.
    assert_eq!(l.warnings.len(), 1, "{:?}", l.warnings);
    let w = &l.warnings[0];
    assert_eq!(w.field, "spec.zones[2].cidrs[0]");
    assert_eq!(w.pos.line, 13, "{w}");
    assert!(w.message.contains("IPv4-mapped"), "{w}");
}

#[test]
fn a_type_error_through_an_alias_is_located_where_the_alias_is_used() {
    let src = format!("{HEAD}  rules:\n    - {{name: r1, from: a, to: b, protocol: tcp, ports: &p [80]}}\n    - name: r2\n      from: *p\n      to: b\n");
    let d = errors(&src);
    assert_eq!(d.len(), 1, "{d:?}");
    // Line 15 is the use (`from: *p`), line 13 the anchor.
    assert_eq!((d[0].pos.line, d[0].pos.col), (15, 13), "{}", d[0]);
    assert!(d[0].field.starts_with("spec.rules[1].from"), "{}", d[0]);
}

const SELECTORS: &str = r#"apiVersion: enclave.io/v1alpha1
kind: ZonePolicy
metadata: {name: sel, version: "1"}
spec:
  zones:
    - name: cde-db
      selector:
        namespaceSelector: {matchLabels: {pci: cde}}
        matchLabels: {app: db}
    - name: databases
      selector:
        matchExpressions: [{key: app, operator: In, values: [db, cache]}]
    - name: web
      selector:
        matchExpressions: [{key: app, operator: NotIn, values: [db, cache]}, {key: app, operator: Exists}]
  rules:
    - {name: web-to-db, from: web, to: databases, protocol: tcp, ports: [5432]}
"#;

#[test]
fn label_selected_zones_decide_by_namespace_labels_and_expressions() {
    let l = policy::load_str(SELECTORS, "p.yaml").expect("loads");
    let p = l.compiled.policy();
    let w = |labels: &[(&str, &str)], ns_labels: &[(&str, &str)]| policy::WorkloadIdentity {
        name: "p".into(),
        namespace: "payments".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        namespace_labels: ns_labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    let zone = |x: &policy::WorkloadIdentity| p.zone_name(p.zone_of_workload(x)).to_string();
    assert_eq!(zone(&w(&[("app", "db")], &[("pci", "cde")])), "cde-db");
    assert_eq!(zone(&w(&[("app", "db")], &[])), "databases");
    assert_eq!(zone(&w(&[("app", "api")], &[])), "web");
    assert_eq!(zone(&w(&[], &[])), "unknown");
    // The label override, and the annotation over the label.
    let mut o = w(
        &[("app", "db"), ("enclave.io/zone", "web")],
        &[("pci", "cde")],
    );
    assert_eq!(zone(&o), "web");
    o.annotations
        .insert("enclave.io/zone".into(), "databases".into());
    assert_eq!(zone(&o), "databases");
    // Overlap: cde-db and databases can both hold a pod; web and databases cannot.
    let notes: Vec<String> = l.notes.iter().map(|d| d.to_string()).collect();
    let overlap: Vec<&String> = notes.iter().filter(|n| n.contains("both select")).collect();
    assert_eq!(overlap.len(), 1, "{notes:#?}");
    assert!(
        overlap[0].starts_with("p.yaml:12:")
            && overlap[0].contains("zones `cde-db` and `databases`")
            && overlap[0].contains("pci=cde")
            && overlap[0].contains("it is in `cde-db`"),
        "{}",
        overlap[0]
    );
}

#[test]
fn a_bad_selector_expression_is_located() {
    let bad_op = SELECTORS.replace("operator: In,", "operator: Within,");
    let d = errors(&bad_op);
    assert!(
        d[0].to_string().starts_with("p.yaml:12:")
            && d[0].message.contains("Within")
            && d[0].message.contains("In, NotIn, Exists, DoesNotExist")
            || d[0].message.contains("`In`"),
        "{d:#?}"
    );
    let no_values = SELECTORS.replace("operator: In, values: [db, cache]", "operator: In");
    let d = errors(&no_values);
    assert_eq!(
        d[0].field, "spec.zones[1].selector.matchExpressions[0]",
        "{d:#?}"
    );
    assert!(d[0].message.contains("at least one value"), "{d:#?}");
    let values_on_exists = SELECTORS.replace("operator: Exists}", "operator: Exists, values: [x]}");
    let d = errors(&values_on_exists);
    assert!(d[0].message.contains("take no `values`"), "{d:#?}");
}
