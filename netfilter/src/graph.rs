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

/// The zones drawn inside the CDE boundary: those the policy marks `scope: cde`; for a
/// policy that marks none (or no policy), zones named `cde` or `cde-*`.
pub fn cde_zones(policy: Option<&crate::policy::Policy>, zones: &[String]) -> BTreeSet<String> {
    let marked: BTreeSet<String> = policy
        .map(|p| {
            p.zones
                .iter()
                .filter(|z| z.scope == Some(crate::policy::Scope::Cde))
                .map(|z| z.name.clone())
                .collect()
        })
        .unwrap_or_default();
    let scoped = policy.is_some_and(|p| p.zones.iter().any(|z| z.scope.is_some()));
    if scoped {
        return marked;
    }
    zones
        .iter()
        .filter(|z| *z == "cde" || z.starts_with("cde-"))
        .cloned()
        .collect()
}

/// An axis-aligned box, in SVG pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rect {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

impl Rect {
    /// True when the two boxes share any area.
    pub fn overlaps(&self, o: &Rect) -> bool {
        self.x < o.x + o.w && o.x < self.x + self.w && self.y < o.y + o.h && o.y < self.y + self.h
    }

    /// True when `o` lies wholly inside.
    pub fn contains(&self, o: &Rect) -> bool {
        o.x >= self.x
            && o.y >= self.y
            && o.x + o.w <= self.x + self.w
            && o.y + o.h <= self.y + self.h
    }

    fn center(&self) -> (f64, f64) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }

    /// Where the segment from the centre towards `(tx, ty)` leaves the box.
    fn border_towards(&self, tx: f64, ty: f64) -> (f64, f64) {
        let (cx, cy) = self.center();
        let (dx, dy) = (tx - cx, ty - cy);
        if dx == 0.0 && dy == 0.0 {
            return (cx, cy);
        }
        let sx = if dx == 0.0 {
            f64::INFINITY
        } else {
            (self.w / 2.0) / dx.abs()
        };
        let sy = if dy == 0.0 {
            f64::INFINITY
        } else {
            (self.h / 2.0) / dy.abs()
        };
        let s = sx.min(sy);
        (cx + dx * s, cy + dy * s)
    }
}

/// A zone as drawn.
#[derive(Debug, Clone)]
pub struct ZoneBox {
    /// Its name.
    pub zone: String,
    /// Where.
    pub rect: Rect,
    /// Inside the cardholder-data environment's boundary.
    pub cde: bool,
}

/// One drawn line: the flows of one zone pair, one direction, one outcome.
#[derive(Debug, Clone)]
pub struct Lane {
    /// Source zone.
    pub from: String,
    /// Destination zone.
    pub to: String,
    /// Denied (or would be, in monitor mode).
    pub denied: bool,
    /// Flows counted.
    pub count: usize,
    /// SVG path data.
    pub path: String,
}

/// The label of one zone pair and direction.
#[derive(Debug, Clone)]
pub struct Label {
    /// Source zone.
    pub from: String,
    /// Destination zone.
    pub to: String,
    /// What it says.
    pub text: String,
    /// Where.
    pub rect: Rect,
    /// Some flows were denied.
    pub denied: bool,
}

/// A picture of zones and flows, before it is written as SVG (tests read this).
#[derive(Debug, Clone)]
pub struct Drawing {
    /// Canvas width.
    pub width: f64,
    /// Canvas height.
    pub height: f64,
    /// The zones.
    pub zones: Vec<ZoneBox>,
    /// The lines.
    pub lanes: Vec<Lane>,
    /// The labels, one per zone pair and direction.
    pub labels: Vec<Label>,
    /// The CDE boundary, when any zone is in the CDE.
    pub boundary: Option<Rect>,
}

const NODE_H: f64 = 36.0;
const LAYER_GAP: f64 = 120.0;
const NODE_GAP: f64 = 70.0;
const GROUP_GAP: f64 = 110.0;
const PAD: f64 = 34.0;
const CHAR_W: f64 = 6.6;

fn node_width(name: &str) -> f64 {
    (name.chars().count() as f64 * 7.6 + 34.0).max(90.0)
}

fn label_size(text: &str) -> (f64, f64) {
    (text.chars().count() as f64 * CHAR_W + 10.0, 17.0)
}

/// Lays a group of zones out: rust-sugiyama ranks them in layers and orders each layer to
/// cut crossings; the pixels follow from the ranks and the order. Returns each zone's box,
/// with the group's top-left at (0, 0), and the group's size.
fn layout_group(zones: &[&str], edges: &[(usize, usize)]) -> (Vec<Rect>, f64, f64) {
    if zones.is_empty() {
        return (Vec::new(), 0.0, 0.0);
    }
    let vertices: Vec<(u32, (f64, f64))> = zones
        .iter()
        .enumerate()
        .map(|(i, z)| (i as u32, (node_width(z), NODE_H)))
        .collect();
    let es: Vec<(u32, u32)> = edges
        .iter()
        .filter(|(a, b)| a != b)
        .map(|(a, b)| (*a as u32, *b as u32))
        .collect();
    let cfg = rust_sugiyama::configure::Config {
        dummy_vertices: false,
        ..Default::default()
    };
    let parts = rust_sugiyama::from_vertices_and_edges(&vertices, &es, &cfg);
    // (component, layer y, order x) for every zone.
    let mut place: Vec<(usize, f64, f64)> = vec![(usize::MAX, 0.0, 0.0); zones.len()];
    for (c, (coords, _, _)) in parts.iter().enumerate() {
        for (v, (x, y)) in coords {
            if let Some(p) = place.get_mut(*v) {
                *p = (c, *y, *x);
            }
        }
    }
    // Any zone the crate left out gets a component of its own.
    let mut next = parts.len();
    for p in place.iter_mut().filter(|p| p.0 == usize::MAX) {
        *p = (next, 0.0, 0.0);
        next += 1;
    }
    let mut rects = vec![
        Rect {
            x: 0.0,
            y: 0.0,
            w: 0.0,
            h: NODE_H
        };
        zones.len()
    ];
    let (mut left, mut height) = (0.0f64, 0.0f64);
    for c in 0..next {
        let members: Vec<usize> = (0..zones.len()).filter(|i| place[*i].0 == c).collect();
        let mut ys: Vec<f64> = members.iter().map(|i| place[*i].1).collect();
        ys.sort_by(|a, b| a.total_cmp(b));
        ys.dedup();
        let mut rows: Vec<Vec<usize>> = vec![Vec::new(); ys.len()];
        for i in &members {
            let layer = ys.iter().position(|y| *y == place[*i].1).unwrap_or(0);
            rows[layer].push(*i);
        }
        let row_widths: Vec<f64> = rows
            .iter()
            .map(|r| {
                r.iter().map(|i| node_width(zones[*i])).sum::<f64>()
                    + NODE_GAP * r.len().saturating_sub(1) as f64
            })
            .collect();
        let comp_w = row_widths.iter().copied().fold(0.0, f64::max);
        for (layer, row) in rows.iter_mut().enumerate() {
            row.sort_by(|a, b| place[*a].2.total_cmp(&place[*b].2));
            let mut x = left + (comp_w - row_widths[layer]) / 2.0;
            for i in row.iter() {
                let w = node_width(zones[*i]);
                rects[*i] = Rect {
                    x,
                    y: layer as f64 * LAYER_GAP,
                    w,
                    h: NODE_H,
                };
                x += w + NODE_GAP;
            }
        }
        height = height.max(ys.len() as f64 * LAYER_GAP - (LAYER_GAP - NODE_H));
        left += comp_w + NODE_GAP;
    }
    (rects, (left - NODE_GAP).max(0.0), height)
}

/// Zones and observed flows laid out: the CDE zones (`cde`) inside a boundary on the left,
/// the others beside it; one lane per zone pair, direction and outcome (never drawn over
/// one another: each direction keeps to its own side, and allowed and denied have lanes of
/// their own); one label per zone pair and direction, placed where it overlaps no other
/// label and no zone.
pub fn layout(flows: &[ObservedFlow], zones: &[String], cde: &BTreeSet<String>) -> Drawing {
    let (nodes, map) = edges(flows, zones);
    let index: BTreeMap<&str, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, z)| (z.as_str(), i))
        .collect();
    let groups: [Vec<usize>; 2] = [
        (0..nodes.len())
            .filter(|i| cde.contains(&nodes[*i]))
            .collect(),
        (0..nodes.len())
            .filter(|i| !cde.contains(&nodes[*i]))
            .collect(),
    ];
    let mut rects = vec![
        Rect {
            x: 0.0,
            y: 0.0,
            w: 0.0,
            h: 0.0
        };
        nodes.len()
    ];
    let top = 70.0 + PAD;
    let mut left = PAD;
    let mut boundary = None;
    for (g, members) in groups.iter().enumerate() {
        if members.is_empty() {
            continue;
        }
        let names: Vec<&str> = members.iter().map(|i| nodes[*i].as_str()).collect();
        let local: BTreeMap<usize, usize> =
            members.iter().enumerate().map(|(l, i)| (*i, l)).collect();
        let es: Vec<(usize, usize)> = map
            .keys()
            .filter_map(|(a, b, _)| {
                Some((
                    *local.get(index.get(a.as_str())?)?,
                    *local.get(index.get(b.as_str())?)?,
                ))
            })
            .collect();
        let (rs, w, h) = layout_group(&names, &es);
        let inset = if g == 0 { PAD } else { 0.0 };
        for (l, i) in members.iter().enumerate() {
            rects[*i] = Rect {
                x: rs[l].x + left + inset,
                y: rs[l].y + top + inset,
                ..rs[l]
            };
        }
        if g == 0 {
            boundary = Some(Rect {
                x: left,
                y: top - 10.0,
                w: w + 2.0 * PAD,
                h: h + 2.0 * PAD + 10.0,
            });
        }
        left += w + 2.0 * inset + GROUP_GAP;
    }
    let zone_boxes: Vec<ZoneBox> = nodes
        .iter()
        .zip(&rects)
        .map(|(z, r)| ZoneBox {
            zone: z.clone(),
            rect: *r,
            cde: cde.contains(z),
        })
        .collect();

    // Lanes, then labels (one per pair and direction) where nothing else is.
    let mut lanes = Vec::new();
    let mut taken: Vec<Rect> = rects.clone();
    let mut labels = Vec::new();
    let mut pairs: BTreeMap<(&str, &str), Vec<(bool, &Edge)>> = BTreeMap::new();
    for ((a, b, denied), e) in &map {
        pairs
            .entry((a.as_str(), b.as_str()))
            .or_default()
            .push((*denied, e));
    }
    for ((a, b), outcomes) in &pairs {
        let (Some(&ia), Some(&ib)) = (index.get(a), index.get(b)) else {
            continue;
        };
        let (ra, rb) = (rects[ia], rects[ib]);
        let mut anchor = Vec::new();
        for (denied, e) in outcomes {
            let lane = if *denied { 13.0 } else { 5.0 };
            let path = if ia == ib {
                // A loop over the zone's top right corner; denied loops wider.
                let (x, y) = (ra.x + ra.w - 18.0, ra.y);
                let r = if *denied { 26.0 } else { 16.0 };
                anchor.push((x + 6.0, y - 2.0 * r - 12.0, 0.0, -1.0));
                format!(
                    "M{:.1},{:.1} c{:.1},{:.1} {:.1},{:.1} {:.1},0",
                    x - r * 0.4,
                    y,
                    -r * 0.6,
                    -2.2 * r,
                    r * 1.6,
                    -2.2 * r,
                    r
                )
            } else {
                let (ca, cb) = (ra.center(), rb.center());
                let (dx, dy) = (cb.0 - ca.0, cb.1 - ca.1);
                let len = (dx * dx + dy * dy).sqrt().max(1.0);
                let (ox, oy) = (-dy / len * lane, dx / len * lane);
                let s = ra.border_towards(cb.0, cb.1);
                let t = rb.border_towards(ca.0, ca.1);
                let (sx, sy, tx, ty) = (s.0 + ox, s.1 + oy, t.0 + ox, t.1 + oy);
                anchor.push(((sx + tx) / 2.0, (sy + ty) / 2.0, dx / len, dy / len));
                format!("M{sx:.1},{sy:.1} L{tx:.1},{ty:.1}")
            };
            lanes.push(Lane {
                from: a.to_string(),
                to: b.to_string(),
                denied: *denied,
                count: e.count,
                path,
            });
        }
        let text = outcomes
            .iter()
            .map(|(d, e)| label(e, *d))
            .collect::<Vec<_>>()
            .join(" · ");
        let (w, h) = label_size(&text);
        let (mx, my, ux, uy) = anchor.iter().fold((0.0, 0.0, 0.0, 0.0), |acc, a| {
            (acc.0 + a.0, acc.1 + a.1, a.2, a.3)
        });
        let n = anchor.len().max(1) as f64;
        let (mx, my) = (mx / n, my / n);
        // Candidates: along the line, then out to its side, farther and farther.
        let (px, py) = if ia == ib { (1.0, 0.0) } else { (-uy, ux) };
        let mut chosen = None;
        'search: for step in 0..60 {
            let side = if step % 2 == 0 { 1.0 } else { -1.0 };
            let out = (step / 2) as f64 * 11.0 * side;
            for along in [0.0, -0.18, 0.18, -0.32, 0.32] {
                let seg = if ia == ib { 0.0 } else { along * 120.0 };
                let cx = mx + ux * seg + px * (out + if ia == ib { 0.0 } else { 12.0 * side });
                let cy = my + uy * seg + py * (out + if ia == ib { 0.0 } else { 12.0 * side });
                let r = Rect {
                    x: cx - w / 2.0,
                    y: cy - h / 2.0,
                    w,
                    h,
                };
                if r.x >= 2.0 && r.y >= 60.0 && !taken.iter().any(|t| t.overlaps(&r)) {
                    chosen = Some(r);
                    break 'search;
                }
            }
        }
        let rect = chosen.unwrap_or_else(|| {
            // Nowhere near: below everything drawn so far.
            let bottom = taken.iter().map(|t| t.y + t.h).fold(0.0, f64::max);
            Rect {
                x: PAD,
                y: bottom + 8.0,
                w,
                h,
            }
        });
        taken.push(rect);
        labels.push(Label {
            from: a.to_string(),
            to: b.to_string(),
            text,
            rect,
            denied: outcomes.iter().any(|(d, _)| *d),
        });
    }
    let all = taken.iter().chain(boundary.iter());
    let width = all.clone().map(|r| r.x + r.w).fold(640.0, f64::max) + PAD;
    let height = all.map(|r| r.y + r.h).fold(200.0, f64::max) + PAD;
    Drawing {
        width,
        height,
        zones: zone_boxes,
        lanes,
        labels,
        boundary,
    }
}

/// A standalone SVG of [`layout`]: allowed flows as green lines, denied ones (or would-be
/// denied, in monitor mode) as red dashed lines, each zone pair and direction labelled once
/// with its services and counts; the CDE inside a drawn boundary.
pub fn svg(flows: &[ObservedFlow], zones: &[String], cde: &BTreeSet<String>) -> String {
    render(&layout(flows, zones, cde))
}

/// The SVG of a drawing.
pub fn render(d: &Drawing) -> String {
    let mut s = String::new();
    let (w, h) = (d.width.ceil(), d.height.ceil());
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    s.push_str(r##"<defs><marker id="ok" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#2e7d32"/></marker><marker id="no" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" orient="auto"><path d="M0,0L10,5L0,10z" fill="#c62828"/></marker></defs>"##);
    s.push('\n');
    s.push_str(r##"<rect width="100%" height="100%" fill="white"/><text x="20" y="28" font-size="16" font-weight="bold">Enclave: zones and observed flows</text><text x="20" y="48" fill="#555" font-size="12">green: allowed  ·  red dashed: denied (or would be, in monitor mode)  ·  each flow counted once</text>"##);
    s.push('\n');
    if let Some(b) = &d.boundary {
        let _ = writeln!(
            s,
            r##"<rect class="cde-boundary" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="14" fill="#fff8e1" stroke="#e65100" stroke-width="2" stroke-dasharray="10,5"/><text x="{:.1}" y="{:.1}" fill="#e65100" font-weight="bold" font-size="12">CDE (PCI DSS scope)</text>"##,
            b.x,
            b.y,
            b.w,
            b.h,
            b.x + 12.0,
            b.y + 16.0
        );
    }
    for l in &d.lanes {
        let (color, dash, marker) = if l.denied {
            ("#c62828", r#" stroke-dasharray="6,4""#, "no")
        } else {
            ("#2e7d32", "", "ok")
        };
        let _ = writeln!(
            s,
            r#"<path class="lane" data-from="{}" data-to="{}" d="{}" fill="none" stroke="{color}" stroke-width="2"{dash} marker-end="url(#{marker})"/>"#,
            esc(&l.from),
            esc(&l.to),
            l.path
        );
    }
    for z in &d.zones {
        let (fill, stroke) = if z.cde {
            ("#ffe0b2", "#e65100")
        } else {
            ("#e3f2fd", "#1565c0")
        };
        let (cx, cy) = z.rect.center();
        let _ = writeln!(
            s,
            r#"<rect class="zone" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="8" fill="{fill}" stroke="{stroke}"/><text x="{cx:.1}" y="{:.1}" text-anchor="middle" font-weight="bold" font-size="12">{}</text>"#,
            z.rect.x,
            z.rect.y,
            z.rect.w,
            z.rect.h,
            cy + 4.0,
            esc(&z.zone)
        );
    }
    for l in &d.labels {
        let color = if l.denied { "#c62828" } else { "#2e7d32" };
        let (cx, cy) = l.rect.center();
        let _ = writeln!(
            s,
            r#"<rect class="label" x="{:.1}" y="{:.1}" width="{:.1}" height="{:.1}" rx="3" fill="white" fill-opacity="0.95" stroke="{color}" stroke-width="0.6"/><text x="{cx:.1}" y="{:.1}" text-anchor="middle" fill="{color}">{}</text>"#,
            l.rect.x,
            l.rect.y,
            l.rect.w,
            l.rect.h,
            cy + 4.0,
            esc(&l.text)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn flow(a: &str, b: &str, port: u16, outcome: &str) -> ObservedFlow {
        ObservedFlow {
            src_zone: a.into(),
            dst_zone: b.into(),
            src_ip: None,
            dst_ip: None,
            proto: "tcp".into(),
            sport: 40000,
            dport: port,
            app: None,
            outcome: outcome.into(),
            rule: None,
            denied_by: None,
            dst_name: None,
        }
    }

    /// The PCI picture, and a dense one: every zone to every other both ways, allowed and
    /// denied on each pair, self flows too.
    fn cases() -> Vec<(Vec<ObservedFlow>, Vec<String>)> {
        let pci: Vec<String> = [
            "web",
            "cde-api",
            "cde-db",
            "cde-cache",
            "corp",
            "acquirer",
            "unknown",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut f = vec![
            flow("web", "cde-api", 8080, "allowed"),
            flow("web", "cde-api", 8080, "allowed"),
            flow("cde-api", "cde-db", 5432, "allowed"),
            flow("cde-api", "cde-cache", 6379, "allowed"),
            flow("cde-api", "acquirer", 443, "allowed"),
            flow("web", "cde-db", 5432, "denied"),
            flow("cde-db", "web", 22, "denied"),
            flow("corp", "cde-db", 5432, "denied"),
            flow("cde-api", "cde-db", 6000, "denied"),
            flow("unknown", "web", 443, "allowed"),
        ];
        let dense: Vec<String> = (0..9)
            .map(|i| {
                if i < 4 {
                    format!("cde-z{i}")
                } else {
                    format!("zone-{i}")
                }
            })
            .collect();
        let mut d = Vec::new();
        for a in &dense {
            for b in &dense {
                d.push(flow(a, b, 80, "allowed"));
                d.push(flow(a, b, 81, "denied"));
            }
        }
        f.push(flow("cde-db", "cde-db", 5432, "allowed"));
        vec![(f, pci), (d, dense)]
    }

    #[test]
    fn labels_never_overlap_each_other_or_a_zone_and_the_cde_is_inside_its_boundary() {
        for (flows, zones) in cases() {
            let cde = cde_zones(None, &zones);
            let d = layout(&flows, &zones, &cde);
            for (i, l) in d.labels.iter().enumerate() {
                for m in &d.labels[i + 1..] {
                    assert!(
                        !l.rect.overlaps(&m.rect),
                        "labels overlap: {:?} and {:?}",
                        l.text,
                        m.text
                    );
                }
                for z in &d.zones {
                    assert!(
                        !l.rect.overlaps(&z.rect),
                        "label {:?} over zone {}",
                        l.text,
                        z.zone
                    );
                }
                assert!(
                    l.rect.x >= 0.0
                        && l.rect.x + l.rect.w <= d.width
                        && l.rect.y + l.rect.h <= d.height
                );
            }
            for (i, a) in d.zones.iter().enumerate() {
                for b in &d.zones[i + 1..] {
                    assert!(
                        !a.rect.overlaps(&b.rect),
                        "zones {} and {} overlap",
                        a.zone,
                        b.zone
                    );
                }
            }
            let b = d.boundary.unwrap();
            for z in &d.zones {
                assert_eq!(
                    b.contains(&z.rect),
                    cde.contains(&z.zone),
                    "{} and the CDE boundary",
                    z.zone
                );
                assert_eq!(z.cde, cde.contains(&z.zone));
            }
        }
    }

    #[test]
    fn one_label_per_pair_and_direction_and_one_lane_per_outcome() {
        let (flows, zones) = cases().remove(0);
        let d = layout(&flows, &zones, &cde_zones(None, &zones));
        let pairs: BTreeSet<(&str, &str)> = d
            .labels
            .iter()
            .map(|l| (l.from.as_str(), l.to.as_str()))
            .collect();
        assert_eq!(
            pairs.len(),
            d.labels.len(),
            "one label per pair and direction"
        );
        let api_db = d
            .labels
            .iter()
            .find(|l| l.from == "cde-api" && l.to == "cde-db")
            .unwrap();
        assert!(
            api_db.text.contains("1 allowed") && api_db.text.contains("1 denied") && api_db.denied,
            "{}",
            api_db.text
        );
        let lanes: Vec<&Lane> = d
            .lanes
            .iter()
            .filter(|l| l.from == "cde-api" && l.to == "cde-db")
            .collect();
        assert_eq!(lanes.len(), 2);
        assert_ne!(
            lanes[0].path, lanes[1].path,
            "allowed and denied are not drawn over each other"
        );
        // Both directions of web <-> cde-db keep apart too.
        let there = d
            .lanes
            .iter()
            .find(|l| l.from == "web" && l.to == "cde-db")
            .unwrap();
        let back = d
            .lanes
            .iter()
            .find(|l| l.from == "cde-db" && l.to == "web")
            .unwrap();
        assert_ne!(there.path, back.path);
        let web_api = d
            .labels
            .iter()
            .find(|l| l.from == "web" && l.to == "cde-api")
            .unwrap();
        assert!(
            web_api.text.contains("(2 allowed)") && !web_api.denied,
            "{}",
            web_api.text
        );
        let svg = render(&d);
        assert!(
            svg.contains("CDE (PCI DSS scope)")
                && svg.matches("class=\"zone\"").count() == zones.len()
        );
    }

    #[test]
    fn the_policy_scope_decides_what_is_in_the_cde() {
        let src = "apiVersion: enclave.io/v1alpha1\nkind: ZonePolicy\nmetadata: {name: t, version: 1}\nspec:\n  zones:\n    - {name: payments, scope: cde, selector: {namespaces: [pay]}}\n    - {name: cde-lookalike, scope: out-of-scope, selector: {namespaces: [x]}}\n  rules: []\n";
        let p = crate::policy::load_str(src, "p.yaml").unwrap().compiled;
        let zones = vec!["payments".to_string(), "cde-lookalike".to_string()];
        let c = cde_zones(Some(p.policy()), &zones);
        assert_eq!(c.into_iter().collect::<Vec<_>>(), ["payments"]);
        assert_eq!(
            cde_zones(None, &zones).into_iter().collect::<Vec<_>>(),
            ["cde-lookalike"],
            "by name without a policy"
        );
    }
}
