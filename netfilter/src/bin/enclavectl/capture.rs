//! `enclavectl capture list|get`: the pcapng sections netd appended to the pods' capture
//! files, each named by the uid its audit record carries.

use crate::{fail, Fail};
use enclave_netfilter::capture::{sections, Section};
use std::path::{Path, PathBuf};

#[derive(clap::Subcommand)]
pub enum CaptureCmd {
    /// Lists every capture: its uid, the pod's file, frames, and what it is about.
    List {
        /// The node's capture directory.
        #[arg(long, default_value = enclave_netfilter::node::CAPTURE_DIR)]
        dir: PathBuf,
        /// Only this pod's (NAMESPACE/NAME).
        #[arg(long)]
        pod: Option<String>,
    },
    /// Writes one capture (by the uid from its audit record) as a pcapng file of its own.
    Get {
        /// The capture's uid (`unmapped.enclave.capture.uid` in the record).
        uid: String,
        /// Where to write it (`-` for standard output).
        #[arg(short, long)]
        output: PathBuf,
        /// The node's capture directory.
        #[arg(long, default_value = enclave_netfilter::node::CAPTURE_DIR)]
        dir: PathBuf,
    },
}

/// A capture file: its path, bytes and sections.
type CaptureFile = (PathBuf, Vec<u8>, Vec<Section>);

/// Every capture file in `dir` (optionally one pod's), with its sections.
fn files(dir: &Path, pod: Option<&str>) -> Result<Vec<CaptureFile>, Fail> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(fail(format!("{}: {e}", dir.display()))),
    };
    let want = pod.map(|p| format!("{}.pcapng", p.replacen('/', "_", 1)));
    let mut paths: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "pcapng"))
        .filter(|p| {
            want.as_deref()
                .map_or(true, |w| p.file_name().is_some_and(|n| n == w))
        })
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
        let (secs, err) = sections(&bytes);
        if let Some(e) = err {
            eprintln!(
                "warning: {}: {e} (the sections before it are listed)",
                p.display()
            );
        }
        out.push((p, bytes, secs));
    }
    Ok(out)
}

pub fn run(c: CaptureCmd) -> Result<u8, Fail> {
    match c {
        CaptureCmd::List { dir, pod } => {
            let files = files(&dir, pod.as_deref())?;
            let n: usize = files.iter().map(|f| f.2.len()).sum();
            if n == 0 {
                println!(
                    "no captures in {}{} (netd writes one for each denial and inspection finding it records)",
                    dir.display(),
                    pod.map(|p| format!(" for pod {p}")).unwrap_or_default()
                );
                return Ok(0);
            }
            println!("UID\tFILE\tFRAMES\tABOUT");
            for (p, _, secs) in &files {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                for s in secs {
                    let about = s
                        .comment
                        .split("; ")
                        .filter(|kv| !kv.starts_with("enclave capture uid="))
                        .collect::<Vec<_>>()
                        .join("; ");
                    println!(
                        "{}\t{name}\t{}\t{about}",
                        s.uid.as_deref().unwrap_or("-"),
                        s.frames
                    );
                }
            }
            println!("{n} capture(s) in {} file(s)", files.len());
            Ok(0)
        }
        CaptureCmd::Get { uid, output, dir } => {
            for (p, bytes, secs) in files(&dir, None)? {
                if let Some(s) = secs.iter().find(|s| s.uid.as_deref() == Some(uid.as_str())) {
                    let b = &bytes[s.offset..s.offset + s.len];
                    if output == Path::new("-") {
                        use std::io::Write as _;
                        std::io::stdout()
                            .write_all(b)
                            .map_err(|e| fail(format!("stdout: {e}")))?;
                    } else {
                        std::fs::write(&output, b)
                            .map_err(|e| fail(format!("{}: {e}", output.display())))?;
                        eprintln!(
                            "wrote capture {uid} ({} frames, {} bytes, from {}) to {}",
                            s.frames,
                            b.len(),
                            p.display(),
                            output.display()
                        );
                    }
                    return Ok(0);
                }
            }
            Err(Fail(
                format!(
                    "no capture {uid} in {} (enclavectl capture list)",
                    dir.display()
                ),
                1,
            ))
        }
    }
}
