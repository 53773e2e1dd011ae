//! Zone policies: the model, loading with located errors, validation and compilation.
//!
//! A policy is YAML a security team writes and reviews. [`load_file`] turns it into a
//! [`CompiledPolicy`] or into diagnostics that name the file, line, column and field.

mod compile;
pub mod generate;
mod load;
mod model;
mod selector;
pub(crate) mod span;

pub use compile::{ClassKey, CompiledPolicy, Lookup, ProtoClass, Verdicts};
pub use load::{load_file, load_str, MAX_MESSAGE_CHARS, MAX_NESTING, MAX_POLICY_BYTES};
pub use model::*;
pub use selector::{LabelExpr, LabelSelector, Operator};
pub use span::{Pos, SpanIndex};

use std::fmt;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The policy is refused.
    Error,
    /// The policy loads; a reviewer should look.
    Warning,
    /// The policy loads as written; what one wall enforces alone (for the reviewer).
    Note,
}

/// One finding about a policy file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The file (as given).
    pub file: String,
    /// Where.
    pub pos: Pos,
    /// The field path, like `spec.rules[2].ports[0]`.
    pub field: String,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Note => "note",
        };
        write!(
            f,
            "{}:{}:{}: {sev}: {}: {}",
            self.file, self.pos.line, self.pos.col, self.field, self.message
        )
    }
}

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read policy file {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file has errors (warnings found alongside are included).
    #[error("{}", render(.diagnostics))]
    Invalid {
        /// Every finding, errors first.
        diagnostics: Vec<Diagnostic>,
    },
}

fn render(d: &[Diagnostic]) -> String {
    d.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// A policy that loaded, with the warnings found on the way.
#[derive(Debug)]
pub struct LoadedPolicy {
    /// The compiled policy (it owns the validated [`Policy`]).
    pub compiled: CompiledPolicy,
    /// Findings that do not refuse the policy.
    pub warnings: Vec<Diagnostic>,
    /// What one wall enforces alone (see [`crate::nft::limits`]); `policy check` shows them.
    pub notes: Vec<Diagnostic>,
}
