//! `tallyman`: one binary, one subcommand per part.

mod cmd;

// The worker allocates many small, short-lived values per message (CEL
// values, JSON); mimalloc measured faster than the system allocator here
// (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// tallyman keeps warehouse events and financial records in step.
#[derive(Parser)]
#[command(name = "tallyman", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the CustomResourceDefinitions (or write one file per CRD).
    Crdgen(cmd::crdgen::Args),
    /// Check manifests as the API server and tallyman would, before anything runs.
    Validate(cmd::validate::Args),
    /// Run one Workflow against NATS JetStream.
    Worker(Box<cmd::worker::Args>),
    /// Serve a namespace's webhook Connectors, publishing events to JetStream.
    Gateway(Box<cmd::gateway::Args>),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(cmd::audit::Command),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crdgen(args) => cmd::crdgen::run(args),
        Command::Validate(args) => cmd::validate::run(args),
        Command::Worker(args) => cmd::worker::run(*args),
        Command::Gateway(args) => cmd::gateway::run(*args),
        Command::Audit(command) => cmd::audit::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
