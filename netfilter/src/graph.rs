//! Pictures of zones and observed flows: Graphviz DOT, or SVG drawn here (no Graphviz
//! needed on the node).

use crate::learn::ObservedFlow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

#[derive(Default)]
struct Edge {
    allowed: usize,
    denied: usize,
    services: BTreeSet<String>,
}

fn edges(
    flows: &[ObservedFlow],
    zones: &[String],
) -> (Vec<String>, BTreeMap<(String, String), Edge>) {
    let mut nodes: BTreeSet<String> = zones.iter().cloned().collect();
    let mut map: BTreeMap<(String, String), Edge> = BTreeMap::new();
    for f in flows.iter().filter(|f| f.proto != "none") {
        nodes.insert(f.src_zone.clone());
        nodes.insert(f.dst_zone.clone());
        let e = map
            .entry((f.src_zone.clone(), f.dst_zone.clone()))
            .or_default();
        if f.outcome == "denied" || f.outcome == "would-deny" {
            e.denied += 1;
        } else {
            e.allowed += 1;
        }
        let svc = match (&f.app, f.dport) {
            (Some(a), p) if p != 0 => format!("{}/{p} {a}", f.proto),
            (None, p) if p != 0 => format!("{}/{p}", f.proto),
            _ => f.proto.clone(),
        };
        e.services.insert(svc);
    }
    (nodes.into_iter().collect(), map)
}

fn label(e: &Edge) -> String {
    let mut s: Vec<&str> = e.services.iter().map(String::as_str).take(3).collect();
    let more = e.services.len().saturating_sub(3);
    let extra = if more > 0 {
        format!(" +{more}")
    } else {
        String::new()
    };
    let counts = match (e.allowed, e.denied) {
        (a, 0) => format!("{a} allowed"),
        (0, d) => format!("{d} denied"),
        (a, d) => format!("{a} allowed, {d} denied"),
    };
    s.sort_unstable();
    format!("{}{extra} ({counts})", s.join(", "))
}

/// Graphviz DOT: zones as nodes, flows as edges; denied flows red and dashed.
pub fn dot(flows: &[ObservedFlow], zones: &[String]) -> String {
    let (nodes, map) = edges(flows, zones);
    let mut s =
        String::from("digraph flows {\n  rankdir=LR;\n  node [shape=box, style=rounded];\n");
    for n in &nodes {
        let _ = writeln!(s, "  \"{n}\";");
    }
    for ((a, b), e) in &map {
        let style = if e.denied > 0 {
            "color=red, fontcolor=red, style=dashed"
        } else {
            "color=darkgreen"
        };
        let _ = writeln!(
            s,
            "  \"{a}\" -> \"{b}\" [label=\"{}\", {style}];",
            label(e).replace('"', "'")
        );
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

/// A standalone SVG: zones on a circle, flows as arrows (red dashed where any was denied).
pub fn svg(flows: &[ObservedFlow], zones: &[String]) -> String {
    let (nodes, map) = edges(flows, zones);
    let n = nodes.len().max(1) as f64;
    let (w, h, r) = (900.0, 700.0, 260.0);
    let (cx, cy) = (w / 2.0, h / 2.0 + 10.0);
    let pos: BTreeMap<&str, (f64, f64)> = nodes
        .iter()
        .enumerate()
        .map(|(i, z)| {
            let a = std::f64::consts::TAU * i as f64 / n - std::f64::consts::FRAC_PI_2;
            (z.as_str(), (cx + r * a.cos(), cy + r * a.sin()))
        })
        .collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"##
    );
    s.push_str(r##"<defs><marker id="ok" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#2e7d32"/></marker><marker id="no" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#c62828"/></marker></defs>"##);
    s.push('\n');
    let _ = writeln!(
        s,
        r##"<rect width="100%" height="100%" fill="white"/><text x="20" y="28" font-size="16" font-weight="bold">Enclave: zones and observed flows</text><text x="20" y="48" fill="#555">green: allowed  ·  red dashed: denied (or would be, in monitor mode)</text>"##
    );
    for ((a, b), e) in &map {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (pos.get(a.as_str()), pos.get(b.as_str())) else {
            continue;
        };
        let denied = e.denied > 0;
        let (color, dash, marker) = if denied {
            ("#c62828", r##" stroke-dasharray="6,4""##, "no")
        } else {
            ("#2e7d32", "", "ok")
        };
        if a == b {
            let _ = writeln!(
                s,
                r##"<path d="M{:.0},{:.0} c-40,-70 40,-70 20,-18" fill="none" stroke="{color}" stroke-width="2"{dash} marker-end="url(#{marker})"/>"##,
                x1 - 10.0,
                y1 - 18.0
            );
            let _ = writeln!(
                s,
                r##"<text x="{:.0}" y="{:.0}" text-anchor="middle" fill="{color}">{}</text>"##,
                x1,
                y1 - 75.0,
                esc(&label(e))
            );
            continue;
        }
        // Shorten to the box edges, and offset opposite directions apart.
        let (dx, dy) = (x2 - x1, y2 - y1);
        let len = (dx * dx + dy * dy).sqrt().max(1.0);
        let (ux, uy) = (dx / len, dy / len);
        let (ox, oy) = (-uy * 6.0, ux * 6.0);
        let (sx, sy, ex, ey) = (
            x1 + ux * 55.0 + ox,
            y1 + uy * 22.0 + oy,
            x2 - ux * 55.0 + ox,
            y2 - uy * 22.0 + oy,
        );
        let _ = writeln!(
            s,
            r##"<line x1="{sx:.0}" y1="{sy:.0}" x2="{ex:.0}" y2="{ey:.0}" stroke="{color}" stroke-width="2"{dash} marker-end="url(#{marker})"/>"##
        );
        let (mx, my) = ((sx + ex) / 2.0 + ox * 2.0, (sy + ey) / 2.0 + oy * 2.0);
        let _ = writeln!(
            s,
            r##"<text x="{mx:.0}" y="{my:.0}" text-anchor="middle" fill="{color}">{}</text>"##,
            esc(&label(e))
        );
    }
    for (z, (x, y)) in &pos {
        let _ = writeln!(
            s,
            r##"<rect x="{:.0}" y="{:.0}" width="110" height="36" rx="8" fill="#e3f2fd" stroke="#1565c0"/><text x="{x:.0}" y="{:.0}" text-anchor="middle" font-weight="bold">{}</text>"##,
            x - 55.0,
            y - 18.0,
            y + 4.0,
            esc(z)
        );
    }
    s.push_str("</svg>\n");
    s
}
