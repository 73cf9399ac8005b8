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
    /// Reconcile Workflows, Connectors and ApprovalPolicies in a cluster.
    Operator(Box<cmd::operator::Args>),
    /// Work with the audit trail.
    #[command(subcommand)]
    Audit(cmd::audit::Command),
    /// Decide exception cases in a cluster; the same as the kubectl plugin
    /// (this binary named `kubectl-tallyman`).
    #[command(subcommand)]
    Kubectl(cmd::kubectl::Command),
    /// Run manifests on this machine: gateway, workers, cases, without a cluster.
    Dev(Box<cmd::dev::Args>),
    /// List the exception cases of a running dev mode.
    Cases(cmd::dev::client::CasesArgs),
    /// Approve a case in a running dev mode.
    Approve(cmd::dev::client::DecideArgs),
    /// Reject a case in a running dev mode.
    Reject(cmd::dev::client::DecideArgs),
}

fn main() -> ExitCode {
    if cmd::kubectl::invoked_as_plugin() {
        return cmd::kubectl::plugin_main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Crdgen(args) => cmd::crdgen::run(args),
        Command::Validate(args) => cmd::validate::run(args),
        Command::Worker(args) => cmd::worker::run(*args),
        Command::Gateway(args) => cmd::gateway::run(*args),
        Command::Operator(args) => cmd::operator::run(*args),
        Command::Audit(command) => cmd::audit::run(command),
        Command::Kubectl(command) => cmd::kubectl::run(command),
        Command::Dev(args) => cmd::dev::run(*args),
        Command::Cases(args) => cmd::dev::client::cases(args),
        Command::Approve(args) => {
            cmd::dev::client::decide(args, tallyman_api::v1alpha1::Verdict::Approve)
        }
        Command::Reject(args) => {
            cmd::dev::client::decide(args, tallyman_api::v1alpha1::Verdict::Reject)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
