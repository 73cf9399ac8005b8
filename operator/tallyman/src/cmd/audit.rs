//! `tallyman audit verify`: read the audit stream and check every instance's
//! hash chain.

use std::process::ExitCode;

use tallyman_core::audit::{self, Problem, ProblemKind};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Verify the hash chains of the audit stream: exit 0 when intact, 1 when
    /// a record was modified, removed or reordered.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
pub struct VerifyArgs {
    #[arg(
        long,
        env = "TALLYMAN_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    #[command(flatten)]
    nats_auth: super::nats::Auth,
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Only this Workflow's records.
    #[arg(long)]
    workflow: Option<String>,
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

pub fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    let Command::Verify(args) = cmd;
    super::block_on(async {
        let client = args
            .nats_auth
            .connect(&args.nats, "tallyman-audit".into())
            .await?;
        let trail =
            tallyman_worker::audit::read(client, &args.namespace, args.workflow.as_deref()).await?;
        let mut report = audit::verify_retained(&trail.records, trail.retained_from.is_some());
        report.retained_from = trail.retained_from;
        for gone in &trail.removed {
            let (first, last) = (*gone.start(), *gone.end());
            report.problems.push(Problem {
                namespace: args.namespace.clone(),
                workflow: args.workflow.clone().unwrap_or_default(),
                key: String::new(),
                seq: first,
                kind: ProblemKind::Missing,
                message: if first == last {
                    format!(
                        "stream message {first} was removed from the audit stream: the records it held are gone, whole trails of instances among them"
                    )
                } else {
                    format!(
                        "stream messages {first} to {last} were removed from the audit stream: the records they held are gone, whole trails of instances among them"
                    )
                },
            });
        }
        if let Some((first, now)) = trail.recreated {
            let at = |nanos: i128| {
                chrono::DateTime::from_timestamp_nanos(nanos as i64)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            };
            report.problems.push(Problem {
                namespace: args.namespace.clone(),
                workflow: args.workflow.clone().unwrap_or_default(),
                key: String::new(),
                seq: 0,
                kind: ProblemKind::Missing,
                message: format!(
                    "the audit stream was created at {}, but this namespace's audit stream was first created at {}: it was deleted and made again, and every record stored before is gone",
                    at(now),
                    at(first)
                ),
            });
        }
        for (seq, why) in trail.unreadable {
            report.problems.push(Problem {
                namespace: args.namespace.clone(),
                workflow: args.workflow.clone().unwrap_or_default(),
                key: String::new(),
                seq,
                kind: ProblemKind::Modified,
                message: format!("stream message {seq} is not an audit record: {why}"),
            });
        }
        match args.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            Output::Text => {
                for p in &report.problems {
                    println!("{p}");
                }
                if let Some(first) = trail.retained_from {
                    println!(
                        "the audit stream's limits removed its messages before {first}: {} instances' chains begin after records that left with them (retention cannot be told from removal there)",
                        report.begin_after_retention
                    );
                }
                let repeated = match report.repeated {
                    0 => String::new(),
                    n => format!(
                        " ({n} of them stored again, identical: an outbox published once more)"
                    ),
                };
                println!(
                    "{} records of {} instances{repeated}: {}",
                    report.records,
                    report.instances,
                    if report.is_ok() {
                        "every chain verifies".to_string()
                    } else {
                        match report.problems.len() {
                            1 => "1 problem".to_string(),
                            n => format!("{n} problems"),
                        }
                    }
                );
            }
        }
        Ok(if report.is_ok() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    })?
}
