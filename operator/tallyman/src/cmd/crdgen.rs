//! `tallyman crdgen`: the CRDs from the Rust types, as `crds/` holds them.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args)]
pub struct Args {
    /// Write one file per CRD, named `<plural>.<group>.yaml`, into DIR
    /// instead of printing a multi-document stream; repeat it for more
    /// copies (`--dir crds --dir charts/tallyman/crds`).
    #[arg(long, value_name = "DIR")]
    dir: Vec<PathBuf>,
    /// Print the field reference as Markdown instead (docs/reference/crds.md).
    #[arg(long, conflicts_with = "dir")]
    reference: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.reference {
        print!(
            "{}",
            tallyman_core::reference::markdown(&tallyman_api::all_crds())
        );
        return Ok(ExitCode::SUCCESS);
    }
    if args.dir.is_empty() {
        print!("{}", tallyman_core::crdgen::stream()?);
        return Ok(ExitCode::SUCCESS);
    }
    let files = tallyman_core::crdgen::files()?;
    for dir in &args.dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        for (file, yaml) in &files {
            let path = dir.join(file);
            std::fs::write(&path, yaml)
                .with_context(|| format!("failed to write {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}
