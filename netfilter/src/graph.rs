//! Pictures of zones and observed flows: Graphviz DOT, or SVG drawn here (no Graphviz
//! needed on the node).

use crate::learn::ObservedFlow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

/// Flows of one zone pair with one outcome (allowed, or denied / would be denied).
#[derive(Default)]
struct Edge {
    count: usize,
    services: BTreeSet<String>,
}

type EdgeKey = (String, String, bool);

fn edges(flows: &[ObservedFlow], zones: &[String]) -> (Vec<String>, BTreeMap<EdgeKey, Edge>) {
    let mut nodes: Vec<String> = zones.to_vec();
    let mut map: BTreeMap<EdgeKey, Edge> = BTreeMap::new();
    for f in flows.iter().filter(|f| f.proto != "none") {
        for z in [&f.src_zone, &f.dst_zone] {
            if !nodes.contains(z) {
                nodes.push(z.clone());
            }
        }
        let denied = f.outcome == "denied" || f.outcome == "would-deny";
        let e = map
            .entry((f.src_zone.clone(), f.dst_zone.clone(), denied))
            .or_default();
        e.count += 1;
        let svc = match (&f.app, f.dport) {
            (Some(a), p) if p != 0 => format!("{}/{p} {a}", f.proto),
            (None, p) if p != 0 => format!("{}/{p}", f.proto),
            _ => f.proto.clone(),
        };
        e.services.insert(svc);
    }
    (nodes, map)
}

fn label(e: &Edge, denied: bool) -> String {
    let s: Vec<&str> = e.services.iter().map(String::as_str).take(2).collect();
    let more = e.services.len().saturating_sub(2);
    let extra = if more > 0 {
        format!(" +{more}")
    } else {
        String::new()
    };
    format!(
        "{}{extra} ({} {})",
        s.join(", "),
        e.count,
        if denied { "denied" } else { "allowed" }
    )
}

/// Graphviz DOT: zones as nodes, flows as edges; denied flows red and dashed.
pub fn dot(flows: &[ObservedFlow], zones: &[String]) -> String {
    let (nodes, map) = edges(flows, zones);
    let mut s =
        String::from("digraph flows {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for n in &nodes {
        let _ = writeln!(s, "  \"{n}\";");
    }
    for ((a, b, denied), e) in &map {
        let style = if *denied {
            "color=red, fontcolor=red, style=dashed"
        } else {
            "color=darkgreen"
        };
        let label = label(e, *denied).replace('"', "'");
        let _ = writeln!(s, "  \"{a}\" -> \"{b}\" [label=\"{label}\", {style}];");
    }
    s.push_str("}\n");
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A standalone SVG: zones on a circle, allowed flows as green arrows and denied ones (or
/// would-be denied, in monitor mode) as red dashed arrows, each labelled with its services.
pub fn svg(flows: &[ObservedFlow], zones: &[String]) -> String {
    let (nodes, map) = edges(flows, zones);
    let n = nodes.len().max(1) as f64;
    let (w, h, r) = (1000.0, 760.0, 290.0);
    let (cx, cy) = (w / 2.0, h / 2.0 + 20.0);
    let pos: BTreeMap<&str, (f64, f64)> = nodes
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (z.as_str(), (cx + r * a.cos(), cy + r * a.sin()))
        })
        .collect();
    let mut lines = String::new();
    let mut labels = String::new();
    for ((a, b, denied), e) in &map {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(a.as_str()), pos.get(b.as_str())) else {
            continue;
        };
        let (color, dash, marker) = if *denied {
            ("#c62828", r#" stroke-dasharray="6,4""#, "no")
        } else {
            ("#2e7d32", "", "ok")
        };
        let text = esc(&label(e, *denied));
        let (lx, ly) = if a == b {
            let _ = writeln!(
                lines,
                r#"<path d="M{:.0},{:.0} c-45,-75 45,-75 20,-20" fill="none" stroke="{color}" stroke-width="2"{dash} marker-end="url(#{marker})"/>"#,
                x1 - 10.0,
                y1 - 18.0
            );
            (x1, y1 - 78.0)
        } else {
            // Offset each (direction, outcome) to its own lane so that edges do not overlap.
            let (dx, dy) = (x2 - x1, y2 - y1);
            let len = (dx * dx + dy * dy).sqrt().max(1.0);
            let (ux, uy) = (dx / len, dy / len);
            let lane = if *denied { 14.0 } else { 5.0 };
            let (ox, oy) = (-uy * lane, ux * lane);
            let (sx, sy) = (x1 + ux * 60.0 + ox, y1 + uy * 24.0 + oy);
            let (ex, ey) = (x2 - ux * 60.0 + ox, y2 - uy * 24.0 + oy);
            let _ = writeln!(
                lines,
                r#"<line x1="{sx:.0}" y1="{sy:.0}" x2="{ex:.0}" y2="{ey:.0}" stroke="{color}" stroke-width="2"{dash} marker-end="url(#{marker})"/>"#
            );
            // Labels sit a third of the way from the source, where edges fan out.
            (
                sx + (ex - sx) * 0.33 + ox * 1.5,
                sy + (ey - sy) * 0.33 + oy * 1.5,
            )
        };
        let tw = text.chars().count() as f64 * 6.3 + 8.0;
        let _ = writeln!(
            labels,
            r#"<rect x="{:.0}" y="{:.0}" width="{tw:.0}" height="16" rx="3" fill="white" fill-opacity="0.9" stroke="{color}" stroke-width="0.6"/><text x="{lx:.0}" y="{:.0}" text-anchor="middle" fill="{color}">{text}</text>"#,
            lx - tw / 2.0,
            ly - 12.0,
            ly
        );
    }
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    s.push_str(r##"<defs><marker id="ok" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#2e7d32"/></marker><marker id="no" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#c62828"/></marker></defs>"##);
    s.push('\n');
    s.push_str(r##"<rect width="100%" height="100%" fill="white"/><text x="20" y="28" font-size="16" font-weight="bold">Enclave: zones and observed flows</text><text x="20" y="48" fill="#555" font-size="12">green: allowed  ·  red dashed: denied (or would be, in monitor mode)  ·  each flow counted once</text>"##);
    s.push('\n');
    s.push_str(&lines);
    for (z, (x, y)) in &pos {
        let _ = writeln!(
            s,
            r##"<rect x="{:.0}" y="{:.0}" width="130" height="36" rx="8" fill="#e3f2fd" stroke="#1565c0"/><text x="{x:.0}" y="{:.0}" text-anchor="middle" font-weight="bold" font-size="12">{}</text>"##,
            x - 65.0,
            y - 18.0,
            y + 4.0,
            esc(z)
        );
    }
    s.push_str(&labels);
    s.push_str("</svg>\n");
    s
}
