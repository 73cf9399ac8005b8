//! `kubectl tallyman`: exception cases for the people who decide them.
//!
//! The `tallyman` binary is this kubectl plugin when it runs under the name
//! `kubectl-tallyman` (a link or copy on `PATH`), and `tallyman kubectl …`
//! otherwise. An approver decides by appending one entry to the case's
//! `spec.decisions` under the name the API server authenticates (learned
//! with a SelfSubjectReview); the chart's ValidatingAdmissionPolicy judges
//! it, and its refusal is shown as the API server words it
//! (docs/approvals.md).

mod decision;
mod render;

use std::ffi::OsStr;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::KubeConfigOptions;
use kube::core::Status;
use kube::discovery::ApiResource;
use kube::{Client, Config};
use tallyman_api::v1alpha1::{ExceptionCase, Verdict};

use self::decision::Me;

/// The file name kubectl looks for on `PATH` to run `kubectl tallyman`.
pub const PLUGIN_NAME: &str = "kubectl-tallyman";

/// Field manager of the plugin's writes, so `managedFields` shows decisions
/// came through it.
const FIELD_MANAGER: &str = "kubectl-tallyman";

/// How often a decision is rebuilt when others decided in the meantime.
const ATTEMPTS: usize = 3;

/// The command line when the binary runs as `kubectl-tallyman`.
#[derive(clap::Parser)]
#[command(
    name = "kubectl tallyman",
    version,
    about = "Decide tallyman exception cases in the cluster, as yourself."
)]
struct Plugin {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// List the cases waiting for a decision (with --all, closed ones too).
    Cases(CasesArgs),
    /// Show a case: its facts, the approvals it needs, decisions, deadline and state.
    Describe(CaseArgs),
    /// Approve a case as yourself.
    Approve(ApproveArgs),
    /// Reject a case as yourself, saying why.
    Reject(RejectArgs),
}

/// Where to look, as kubectl's own flags say it.
#[derive(clap::Args)]
pub struct Target {
    /// The namespace (default: the current context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current one).
    #[arg(long)]
    context: Option<String>,
}

#[derive(clap::Args)]
pub struct CasesArgs {
    #[command(flatten)]
    target: Target,
    /// Cases in every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Closed cases too (approved, rejected, expired).
    #[arg(long)]
    all: bool,
}

#[derive(clap::Args)]
pub struct CaseArgs {
    /// The ExceptionCase's name.
    case: String,
    #[command(flatten)]
    target: Target,
}

#[derive(clap::Args)]
pub struct ApproveArgs {
    #[command(flatten)]
    case: CaseArgs,
    /// Why, recorded with the decision.
    #[arg(short = 'm', long)]
    comment: Option<String>,
}

#[derive(clap::Args)]
pub struct RejectArgs {
    #[command(flatten)]
    case: CaseArgs,
    /// Why; a rejection needs one.
    #[arg(short = 'm', long, required = true)]
    comment: String,
}

/// Whether the process was started under the plugin's name.
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .is_some_and(|a| is_plugin_name(&a))
}

fn is_plugin_name(argv0: &OsStr) -> bool {
    Path::new(argv0)
        .file_stem()
        .is_some_and(|stem| stem == PLUGIN_NAME)
}

/// `main` when running as `kubectl-tallyman`.
pub fn plugin_main() -> ExitCode {
    let plugin = <Plugin as clap::Parser>::parse();
    match run(plugin.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Run one plugin command. A refusal by the API server (the admission
/// policy, RBAC, a missing case) is printed as kubectl prints it, in the
/// server's words, and exits 1.
pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match super::block_on(dispatch(command))? {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(e) => match api_error(&e) {
            Some(status) => {
                eprintln!("Error from server ({}): {}", status.reason, status.message);
                Ok(ExitCode::from(1))
            }
            None => Err(e),
        },
    }
}

fn api_error(e: &anyhow::Error) -> Option<&Status> {
    match e.downcast_ref::<kube::Error>() {
        Some(kube::Error::Api(status)) => Some(status),
        _ => None,
    }
}

async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Cases(args) => cases(args).await,
        Command::Describe(args) => describe(args).await,
        Command::Approve(args) => {
            decide(args.case, Verdict::Approve, args.comment.as_deref()).await
        }
        Command::Reject(args) => decide(args.case, Verdict::Reject, Some(&args.comment)).await,
    }
}

async fn connect(target: &Target) -> anyhow::Result<(Client, String)> {
    let config = match &target.context {
        Some(context) => Config::from_kubeconfig(&KubeConfigOptions {
            context: Some(context.clone()),
            ..KubeConfigOptions::default()
        })
        .await
        .with_context(|| format!("failed to load the kubeconfig context {context:?}"))?,
        None => Config::infer()
            .await
            .context("failed to find a kubeconfig or an in-cluster configuration")?,
    };
    let client = Client::try_from(config).context("failed to build the Kubernetes client")?;
    let namespace = target
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    Ok((client, namespace))
}

async fn cases(args: CasesArgs) -> anyhow::Result<()> {
    let (client, namespace) = connect(&args.target).await?;
    let api: Api<ExceptionCase> = if args.all_namespaces {
        Api::all(client)
    } else {
        Api::namespaced(client, &namespace)
    };
    let list = api.list(&ListParams::default()).await?;
    let view = render::View {
        all: args.all,
        namespaces: args.all_namespaces,
    };
    match render::cases_table(&list.items, view, chrono::Utc::now()) {
        Some(table) => print!("{table}"),
        None => {
            let which = if args.all { "" } else { "open " };
            if args.all_namespaces {
                eprintln!("No {which}exception cases in any namespace.");
            } else {
                eprintln!("No {which}exception cases in namespace {namespace}.");
            }
        }
    }
    Ok(())
}

async fn describe(args: CaseArgs) -> anyhow::Result<()> {
    let (client, namespace) = connect(&args.target).await?;
    let api: Api<ExceptionCase> = Api::namespaced(client, &namespace);
    let case = api.get(&args.case).await?;
    print!("{}", render::describe(&case, chrono::Utc::now()));
    Ok(())
}

async fn decide(args: CaseArgs, verdict: Verdict, comment: Option<&str>) -> anyhow::Result<()> {
    let (client, namespace) = connect(&args.target).await?;
    let me = whoami(&client).await?;
    // Untyped, so the patch's `test` compares the decisions exactly as stored.
    let api: Api<DynamicObject> = Api::namespaced_with(
        client,
        &namespace,
        &ApiResource::erase::<ExceptionCase>(&()),
    );
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let mut attempt = 1;
    loop {
        let stored = serde_json::to_value(api.get(&args.case).await?)?;
        let case: ExceptionCase = serde_json::from_value(stored.clone())
            .with_context(|| format!("failed to read ExceptionCase {}", args.case))?;
        let d = decision::decision(&case, &me, verdict, comment);
        let patch = Patch::Json::<()>(decision::patch(&stored, &d));
        match api.patch(&args.case, &params, &patch).await {
            Ok(updated) => {
                let case: ExceptionCase = serde_json::from_value(serde_json::to_value(updated)?)?;
                println!("{}", decision::outcome(&case, &d));
                return Ok(());
            }
            // A failed `test` (someone decided in between) and a refusal by
            // the admission policy both answer 422; only a changed list is
            // worth another try, and the policy judges that try afresh.
            Err(kube::Error::Api(status))
                if matches!(status.code, 409 | 422) && attempt < ATTEMPTS =>
            {
                let now = serde_json::to_value(api.get(&args.case).await?)?;
                if !decision::lost_race(&stored, &now) {
                    return Err(kube::Error::Api(status).into());
                }
                attempt += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn whoami(client: &Client) -> anyhow::Result<Me> {
    let api: Api<SelfSubjectReview> = Api::all(client.clone());
    let review = api
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await?;
    Me::from_review(&review).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugin_is_recognised_by_its_file_name() {
        for argv0 in [
            "kubectl-tallyman",
            "/usr/local/bin/kubectl-tallyman",
            "C:\\tools\\kubectl-tallyman.exe",
            "./kubectl-tallyman",
        ] {
            let argv0 = argv0.replace('\\', std::path::MAIN_SEPARATOR_STR);
            assert!(is_plugin_name(OsStr::new(&argv0)), "{argv0}");
        }
        for argv0 in [
            "tallyman",
            "/usr/bin/tallyman",
            "kubectl-tallyman-dev",
            "kubectl",
        ] {
            assert!(!is_plugin_name(OsStr::new(argv0)), "{argv0}");
        }
    }

    #[test]
    fn a_rejection_needs_a_comment_on_the_command_line() {
        use clap::Parser;
        assert!(Plugin::try_parse_from(["kubectl tallyman", "reject", "case-1"]).is_err());
        assert!(
            Plugin::try_parse_from(["kubectl tallyman", "reject", "case-1", "-m", "why"]).is_ok()
        );
        assert!(Plugin::try_parse_from(["kubectl tallyman", "approve", "case-1"]).is_ok());
        let parsed = Plugin::try_parse_from(["kubectl tallyman", "cases", "-A", "--all"]).unwrap();
        assert!(matches!(
            parsed.command,
            Command::Cases(CasesArgs {
                all_namespaces: true,
                all: true,
                ..
            })
        ));
    }
}
