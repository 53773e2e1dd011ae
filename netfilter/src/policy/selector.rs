//! Zone selectors: which pods a zone holds, written as Kubernetes users write them
//! (`matchLabels`, `matchExpressions`, a `namespaceSelector`), and whether two zones' selectors
//! can both hold one pod.

use super::model::WorkloadIdentity;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};

/// Chooses workloads by identity. All given criteria must match.
#[derive(Debug, Deserialize, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    /// The workload's namespace is one of these.
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// The workload's namespace has these labels (a Kubernetes label selector).
    #[serde(default, rename = "namespaceSelector")]
    pub namespace_selector: Option<LabelSelector>,
    /// Every label listed is present with this value (`labels` is the older spelling).
    #[serde(default, alias = "matchLabels")]
    pub labels: BTreeMap<String, String>,
    /// Every expression holds of the pod's labels.
    #[serde(default, rename = "matchExpressions")]
    pub match_expressions: Vec<LabelExpr>,
    /// Every annotation listed is present with this value.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A Kubernetes label selector: `matchLabels` and `matchExpressions`, all of which must hold.
#[derive(Debug, Deserialize, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LabelSelector {
    /// Every label listed is present with this value.
    #[serde(default, rename = "matchLabels")]
    pub match_labels: BTreeMap<String, String>,
    /// Every expression holds.
    #[serde(default, rename = "matchExpressions")]
    pub match_expressions: Vec<LabelExpr>,
}

/// One requirement on a label.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LabelExpr {
    /// The label key.
    pub key: String,
    /// How the label is tested.
    pub operator: Operator,
    /// The values (`In` and `NotIn` only).
    #[serde(default)]
    pub values: Vec<String>,
}

/// A label selector operator, as Kubernetes names them.
#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    /// The label is present with one of the values.
    In,
    /// The label is absent, or present with none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl LabelExpr {
    /// True when the expression holds of `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.operator {
            Operator::In => v.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => v.map_or(true, |v| !self.values.contains(v)),
            Operator::Exists => v.is_some(),
            Operator::DoesNotExist => v.is_none(),
        }
    }

    /// What is wrong with the expression as written (Kubernetes' own rules), if anything.
    pub fn problem(&self) -> Option<&'static str> {
        if self.key.is_empty() {
            return Some("`key` must not be empty");
        }
        match self.operator {
            Operator::In | Operator::NotIn if self.values.is_empty() => {
                Some("`In` and `NotIn` need at least one value in `values`")
            }
            Operator::Exists | Operator::DoesNotExist if !self.values.is_empty() => {
                Some("`Exists` and `DoesNotExist` take no `values`")
            }
            _ => None,
        }
    }
}

impl LabelSelector {
    /// True when every requirement holds of `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| e.matches(labels))
    }

    /// True when it states no requirement.
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

impl Selector {
    /// True when no criterion is given (which would select everything: refused).
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self
                .namespace_selector
                .as_ref()
                .map_or(true, |s| s.is_empty())
            && self.labels.is_empty()
            && self.match_expressions.is_empty()
            && self.annotations.is_empty()
    }

    /// True when `w` satisfies every criterion.
    pub fn matches(&self, w: &WorkloadIdentity) -> bool {
        (self.namespaces.is_empty() || self.namespaces.contains(&w.namespace))
            && self
                .namespace_selector
                .as_ref()
                .map_or(true, |s| s.matches(&w.namespace_labels))
            && self.labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|e| e.matches(&w.labels))
            && self
                .annotations
                .iter()
                .all(|(k, v)| w.annotations.get(k) == Some(v))
    }

    /// A workload both `self` and `other` select, if one can exist: the witness a policy
    /// check shows for two zones that overlap.
    pub fn common_witness(&self, other: &Selector) -> Option<WorkloadIdentity> {
        let namespace = match (self.namespaces.is_empty(), other.namespaces.is_empty()) {
            (true, true) => String::new(),
            (false, true) => self.namespaces[0].clone(),
            (true, false) => other.namespaces[0].clone(),
            (false, false) => self
                .namespaces
                .iter()
                .find(|n| other.namespaces.contains(n))?
                .clone(),
        };
        let ns_sel = |s: &Selector| s.namespace_selector.clone().unwrap_or_default();
        let (a, b) = (ns_sel(self), ns_sel(other));
        let namespace_labels = witness_labels(
            [&a.match_labels, &b.match_labels],
            [&a.match_expressions, &b.match_expressions],
        )?;
        let labels = witness_labels(
            [&self.labels, &other.labels],
            [&self.match_expressions, &other.match_expressions],
        )?;
        let mut annotations = self.annotations.clone();
        for (k, v) in &other.annotations {
            if annotations.get(k).is_some_and(|mine| mine != v) {
                return None;
            }
            annotations.insert(k.clone(), v.clone());
        }
        let w = WorkloadIdentity {
            name: "pod".into(),
            namespace,
            labels,
            annotations,
            namespace_labels,
        };
        (self.matches(&w) && other.matches(&w)).then_some(w)
    }
}

/// Labels that satisfy both sides' equalities and expressions, if any can.
fn witness_labels(
    eq: [&BTreeMap<String, String>; 2],
    exprs: [&Vec<LabelExpr>; 2],
) -> Option<BTreeMap<String, String>> {
    #[derive(Default)]
    struct Need {
        allowed: Option<BTreeSet<String>>,
        banned: BTreeSet<String>,
        present: bool,
        absent: bool,
    }
    let mut needs: BTreeMap<&str, Need> = BTreeMap::new();
    let narrow = |n: &mut Need, vals: BTreeSet<String>| {
        n.allowed = Some(match n.allowed.take() {
            Some(a) => a.intersection(&vals).cloned().collect(),
            None => vals,
        });
        n.present = true;
    };
    for m in eq {
        for (k, v) in m {
            narrow(needs.entry(k).or_default(), [v.clone()].into());
        }
    }
    for list in exprs {
        for e in list {
            let n = needs.entry(&e.key).or_default();
            match e.operator {
                Operator::In => narrow(n, e.values.iter().cloned().collect()),
                Operator::NotIn => n.banned.extend(e.values.iter().cloned()),
                Operator::Exists => n.present = true,
                Operator::DoesNotExist => n.absent = true,
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, n) in needs {
        if n.present && n.absent {
            return None;
        }
        if n.absent {
            continue;
        }
        let value = match n.allowed {
            Some(a) => a.into_iter().find(|v| !n.banned.contains(v))?,
            // A value no `NotIn` names (absent would also do, unless `Exists`).
            None if n.present => (0..)
                .map(|i| format!("v{i}"))
                .find(|v| !n.banned.contains(v))?,
            None => continue,
        };
        out.insert(k.to_string(), value);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(yaml: &str) -> Selector {
        crate::yaml::from_str(yaml).unwrap_or_else(|e| panic!("{yaml}: {}", e.message))
    }

    fn pod(labels: &[(&str, &str)], ns: &str, ns_labels: &[(&str, &str)]) -> WorkloadIdentity {
        let m = |l: &[(&str, &str)]| {
            l.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        WorkloadIdentity {
            name: "p".into(),
            namespace: ns.into(),
            labels: m(labels),
            namespace_labels: m(ns_labels),
            ..Default::default()
        }
    }

    #[test]
    fn every_operator_matches_as_kubernetes_defines_it() {
        let s = sel("matchExpressions: [{key: tier, operator: In, values: [db, cache]}, {key: env, operator: NotIn, values: [dev]}, {key: app, operator: Exists}, {key: debug, operator: DoesNotExist}]");
        assert!(s.matches(&pod(&[("tier", "db"), ("app", "x")], "a", &[])));
        assert!(s.matches(&pod(
            &[("tier", "db"), ("app", "x"), ("env", "prod")],
            "a",
            &[]
        )));
        assert!(
            !s.matches(&pod(&[("tier", "web"), ("app", "x")], "a", &[])),
            "In"
        );
        assert!(
            !s.matches(&pod(
                &[("tier", "db"), ("app", "x"), ("env", "dev")],
                "a",
                &[]
            )),
            "NotIn"
        );
        assert!(!s.matches(&pod(&[("tier", "db")], "a", &[])), "Exists");
        assert!(
            !s.matches(&pod(
                &[("tier", "db"), ("app", "x"), ("debug", "1")],
                "a",
                &[]
            )),
            "DoesNotExist"
        );
    }

    #[test]
    fn namespaces_by_name_and_by_label() {
        let s = sel("{matchLabels: {app: db}, namespaceSelector: {matchLabels: {pci: cde}}}");
        assert!(s.matches(&pod(&[("app", "db")], "payments", &[("pci", "cde")])));
        assert!(!s.matches(&pod(&[("app", "db")], "payments", &[])));
        let s = sel("{namespaces: [payments], labels: {app: db}}");
        assert!(s.matches(&pod(&[("app", "db")], "payments", &[])));
        assert!(!s.matches(&pod(&[("app", "db")], "shop", &[])));
    }

    #[test]
    fn an_unknown_operator_is_an_error_naming_it() {
        let e = crate::yaml::from_str::<Selector>("matchExpressions: [{key: a, operator: Has}]")
            .err()
            .map(|e| format!("{}: {}", e.field, e.message))
            .unwrap_or_default();
        assert!(
            e.contains("matchExpressions[0].operator") && e.contains("Has"),
            "{e}"
        );
    }

    #[test]
    fn overlap_is_found_with_a_witness_and_disjoint_selectors_have_none() {
        let a = sel("{matchLabels: {app: db}}");
        let b = sel("{namespaces: [payments], matchExpressions: [{key: tier, operator: Exists}]}");
        let w = a.common_witness(&b).expect("they overlap");
        assert!(a.matches(&w) && b.matches(&w), "{w:?}");
        let c = sel("{matchExpressions: [{key: app, operator: NotIn, values: [db]}]}");
        assert_eq!(a.common_witness(&c), None);
        let d = sel("{matchExpressions: [{key: app, operator: DoesNotExist}]}");
        assert_eq!(a.common_witness(&d), None);
        let e = sel("{namespaces: [shop], matchLabels: {app: db}}");
        assert_eq!(b.common_witness(&e), None, "different namespaces");
        let f = sel("{matchExpressions: [{key: app, operator: In, values: [db, api]}, {key: app, operator: NotIn, values: [db]}]}");
        let w = a.common_witness(&sel(
            "{matchExpressions: [{key: app, operator: In, values: [api]}]}",
        ));
        assert_eq!(w, None, "db vs api");
        assert!(f
            .common_witness(&f)
            .is_some_and(|w| w.labels.get("app").map(String::as_str) == Some("api")));
    }
}
