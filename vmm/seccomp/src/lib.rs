//! Seccomp filters from commented tables: every allowed syscall names the code that needs it,
//! and turning a table into BPF either succeeds exactly or fails loudly.
//!
//! Used by `enclave-vmm` (a filter per thread kind) and `enclave-netd` (datapath and control).
//! Two ways a hand-rolled table-to-BPF step goes wrong, both refused here:
//! - a condition or rule that fails to build and is dropped: in seccompiler an empty rule
//!   list means "allow unconditionally", so a dropped condition widens the filter;
//! - a syscall listed twice, where the second entry silently replaces the first.
//!
//! [`eval`] runs a compiled program on a syscall the way the kernel does, so tests can check
//! the very program a thread installs: every entry of its table allowed, everything else
//! (another syscall, another ioctl request) answered with the mismatch action.

use std::collections::BTreeMap;

pub use seccompiler::{BpfProgram, SeccompAction};
use seccompiler::{
    SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// One allowed syscall: with any arguments, or only when one argument equals one of a set.
#[derive(Debug, Clone, Copy)]
pub struct Syscall {
    /// The syscall number (`libc::SYS_*`).
    pub nr: i64,
    /// `None`: any arguments. `Some((index, values))`: argument `index` (its low 32 bits)
    /// equals one of `values`.
    pub when: Option<(u8, &'static [u64])>,
    /// Who calls it, and why.
    pub why: &'static str,
}

/// Allows `nr` with any arguments.
pub const fn any(nr: i64, why: &'static str) -> Syscall {
    Syscall {
        nr,
        when: None,
        why,
    }
}

/// Allows `nr` only when argument `index` equals one of `values` (compared as a 32-bit
/// word, which is how the kernel passes `int` and `unsigned int` arguments such as an
/// ioctl request or an fcntl command).
pub const fn when(nr: i64, index: u8, values: &'static [u64], why: &'static str) -> Syscall {
    Syscall {
        nr,
        when: Some((index, values)),
        why,
    }
}

/// Why a table did not become a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A syscall appears twice; one of the two would silently win.
    #[error("syscall {nr} is listed twice ({first:?}, {second:?}): merge the entries")]
    Duplicate {
        /// The syscall number.
        nr: i64,
        /// Why the first entry is there.
        first: &'static str,
        /// Why the second entry is there.
        second: &'static str,
    },
    /// An argument condition with no values, which seccompiler would read as "allow".
    #[error("syscall {nr}: an argument condition needs at least one value ({why:?})")]
    NoValues {
        /// The syscall number.
        nr: i64,
        /// Why the entry is there.
        why: &'static str,
    },
    /// seccompiler refused a condition, a rule or the filter.
    #[error("syscall table for seccompiler")]
    Build(#[source] seccompiler::BackendError),
    /// Installing the filter failed.
    #[error("installing the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Compiles the union of `tables` into a BPF program: listed syscalls are allowed, anything
/// else gets `mismatch`.
pub fn compile(tables: &[&[Syscall]], mismatch: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, (Vec<SeccompRule>, &'static str)> = BTreeMap::new();
    for s in tables.iter().flat_map(|t| t.iter()) {
        let built = match s.when {
            None => Vec::new(),
            Some((_, [])) => {
                return Err(SeccompError::NoValues {
                    nr: s.nr,
                    why: s.why,
                })
            }
            Some((index, values)) => values
                .iter()
                .map(|&v| {
                    let c =
                        SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)?;
                    SeccompRule::new(vec![c])
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(SeccompError::Build)?,
        };
        if let Some((_, first)) = rules.get(&s.nr) {
            return Err(SeccompError::Duplicate {
                nr: s.nr,
                first,
                second: s.why,
            });
        }
        rules.insert(s.nr, (built, s.why));
    }
    let rules = rules.into_iter().map(|(nr, (r, _))| (nr, r)).collect();
    SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .and_then(TryInto::try_into)
        .map_err(SeccompError::Build)
}

/// Installs `program` on the calling thread (setting no_new_privs); threads it makes later
/// inherit it.
pub fn install(program: &BpfProgram) -> Result<(), SeccompError> {
    seccompiler::apply_filter(program).map_err(SeccompError::Install)
}

/// The return value the kernel would take from `program` for syscall `nr` with `args` on
/// x86_64: `SECCOMP_RET_ALLOW` (0x7fff0000), `SECCOMP_RET_KILL_PROCESS` (0x80000000), ...
/// `None` for a program that is malformed (reads outside `seccomp_data`, jumps out, an
/// instruction seccompiler never emits, or falls off the end).
pub fn eval(program: &BpfProgram, nr: i64, args: [u64; 6]) -> Option<u32> {
    // struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
    let mut data = [0u8; 64];
    data[0..4].copy_from_slice(&(nr as i32).to_ne_bytes());
    data[4..8].copy_from_slice(&AUDIT_ARCH_X86_64.to_ne_bytes());
    for (i, a) in args.iter().enumerate() {
        data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
    }
    let mut acc: u32 = 0;
    let mut pc = 0usize;
    loop {
        let ins = program.get(pc)?;
        let k = ins.k;
        let jump = |taken: bool| pc + 1 + usize::from(if taken { ins.jt } else { ins.jf });
        pc = match ins.code {
            // BPF_LD | BPF_W | BPF_ABS
            0x20 => {
                let at = usize::try_from(k).ok()?;
                acc = u32::from_ne_bytes(data.get(at..at + 4)?.try_into().ok()?);
                pc + 1
            }
            // BPF_ALU | BPF_AND | BPF_K
            0x54 => {
                acc &= k;
                pc + 1
            }
            // BPF_JMP | BPF_JA
            0x05 => pc + 1 + usize::try_from(k).ok()?,
            // BPF_JMP | BPF_JEQ | BPF_K, JGT, JGE
            0x15 => jump(acc == k),
            0x25 => jump(acc > k),
            0x35 => jump(acc >= k),
            // BPF_RET | BPF_K
            0x06 => return Some(k),
            _ => return None,
        };
    }
}

/// `AUDIT_ARCH_X86_64`: what a filter checks first.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `SECCOMP_RET_ALLOW`.
pub const RET_ALLOW: u32 = 0x7fff_0000;
/// `SECCOMP_RET_KILL_PROCESS`.
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;

/// Checks `program` against the tables it was compiled from: every entry allowed (with each
/// listed argument value), every argument-restricted entry refused with a value it does
/// not list, and each of `forbidden` refused. Returns what does not hold, one line each.
pub fn verify(program: &BpfProgram, tables: &[&[Syscall]], forbidden: &[i64]) -> Vec<String> {
    let mut wrong = Vec::new();
    let mut check = |nr: i64, args: [u64; 6], want_allow: bool, what: &str| {
        let got = eval(program, nr, args);
        let ok = match got {
            Some(RET_ALLOW) => want_allow,
            Some(_) => !want_allow,
            None => false,
        };
        if !ok {
            wrong.push(format!(
                "syscall {nr} {what}: got {got:x?}, wanted {}",
                if want_allow { "allow" } else { "refuse" }
            ));
        }
    };
    for s in tables.iter().flat_map(|t| t.iter()) {
        match s.when {
            None => check(s.nr, [0; 6], true, "with any arguments"),
            Some((index, values)) => {
                let i = usize::from(index);
                for &v in values {
                    let mut args = [0u64; 6];
                    args[i] = v;
                    check(s.nr, args, true, &format!("with arg{i} = {v:#x}"));
                }
                let other = (0u64..).find(|x| !values.contains(x)).unwrap_or(u64::MAX);
                let mut args = [0u64; 6];
                args[i] = other;
                check(s.nr, args, false, &format!("with arg{i} = {other:#x}"));
            }
        }
    }
    for &nr in forbidden {
        check(nr, [0; 6], false, "(not listed)");
    }
    wrong
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const TABLE: &[Syscall] = &[
        any(libc::SYS_read, "test"),
        when(libc::SYS_ioctl, 1, &[0x5421, 0xae80], "test"),
    ];

    #[test]
    fn a_syscall_listed_twice_is_an_error_not_a_silent_replacement() {
        let twice: &[Syscall] = &[
            when(libc::SYS_fcntl, 1, &[1], "first"),
            any(libc::SYS_fcntl, "second"),
        ];
        let e = compile(&[twice], SeccompAction::KillProcess).unwrap_err();
        assert!(matches!(e, SeccompError::Duplicate { .. }), "{e}");
        // Across tables too.
        let e = compile(&[TABLE, &TABLE[..1]], SeccompAction::KillProcess).unwrap_err();
        assert!(e.to_string().contains("listed twice"), "{e}");
    }

    #[test]
    fn a_condition_with_no_values_is_an_error_not_allow_all() {
        let empty: &[Syscall] = &[when(libc::SYS_ioctl, 1, &[], "nothing")];
        let e = compile(&[empty], SeccompAction::KillProcess).unwrap_err();
        assert!(matches!(e, SeccompError::NoValues { .. }), "{e}");
    }

    #[test]
    fn a_bad_argument_index_is_an_error() {
        let bad: &[Syscall] = &[when(libc::SYS_ioctl, 9, &[1], "arg 9 does not exist")];
        assert!(matches!(
            compile(&[bad], SeccompAction::KillProcess),
            Err(SeccompError::Build(_))
        ));
    }

    #[test]
    fn the_program_allows_exactly_the_table() {
        let p = compile(&[TABLE], SeccompAction::KillProcess).unwrap();
        assert_eq!(eval(&p, libc::SYS_read, [9; 6]), Some(RET_ALLOW));
        assert_eq!(
            eval(&p, libc::SYS_ioctl, [3, 0xae80, 0, 0, 0, 0]),
            Some(RET_ALLOW)
        );
        assert_eq!(
            eval(&p, libc::SYS_ioctl, [3, 0xae81, 0, 0, 0, 0]),
            Some(RET_KILL_PROCESS)
        );
        assert_eq!(eval(&p, libc::SYS_socket, [0; 6]), Some(RET_KILL_PROCESS));
        assert!(verify(&p, &[TABLE], &[libc::SYS_socket, libc::SYS_openat]).is_empty());
        // verify notices a program that allows what it should refuse: any ioctl request,
        // and a syscall the table does not list.
        let wider: &[Syscall] = &[
            any(libc::SYS_read, "test"),
            any(libc::SYS_ioctl, "test"),
            any(libc::SYS_socket, "test"),
        ];
        let wide = compile(&[wider], SeccompAction::KillProcess).unwrap();
        assert_eq!(verify(&wide, &[TABLE], &[libc::SYS_socket]).len(), 2);
    }
}
