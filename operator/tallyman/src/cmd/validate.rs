//! `tallyman validate PATH...`: exit 0 valid, 1 invalid, 2 unreadable.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use tallyman_core::validate;

#[derive(clap::Args)]
pub struct Args {
    /// Manifest files or directories (walked recursively for .yaml, .yml, .json).
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<PathBuf>,
    /// `text` for people, `json` for machines.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let report = validate::validate_paths(&args.paths);
    let code = if !report.read_errors.is_empty() {
        2
    } else if report.has_errors() {
        1
    } else {
        0
    };
    let mut out = std::io::stdout().lock();
    match args.output {
        Output::Json => {
            let mut value = serde_json::to_value(&report)?;
            value["valid"] = serde_json::Value::Bool(code == 0);
            serde_json::to_writer_pretty(&mut out, &value)?;
            writeln!(out)?;
        }
        Output::Text => {
            for e in &report.read_errors {
                writeln!(
                    out,
                    "{}: error: cannot read: {}",
                    e.path.display(),
                    e.message
                )?;
            }
            for d in &report.diagnostics {
                writeln!(out, "{d}")?;
            }
            let errors = report.errors().count();
            let warnings = report.warnings().count();
            writeln!(
                out,
                "{} documents, {} resources: {}",
                report.documents,
                report.resources,
                match (code, errors, warnings) {
                    (2, ..) => format!("{} paths could not be read", report.read_errors.len()),
                    (_, 0, 0) => "all valid".to_string(),
                    (_, 0, w) => format!("valid, {w} warnings"),
                    (_, e, w) => format!("{e} errors, {w} warnings"),
                }
            )?;
        }
    }
    Ok(ExitCode::from(code))
}
