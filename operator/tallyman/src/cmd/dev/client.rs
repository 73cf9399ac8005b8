//! `tallyman cases`, `tallyman approve`, `tallyman reject`: the dev API
//! from a terminal. They talk to a running `tallyman dev` (`--url`, else
//! `$TALLYMAN_DEV_URL`, else `http://127.0.0.1:8080`).

use std::process::ExitCode;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tallyman_api::v1alpha1::Verdict;

#[derive(clap::Args)]
pub struct Target {
    /// The dev mode to talk to.
    #[arg(
        long,
        env = "TALLYMAN_DEV_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
}

#[derive(clap::Args)]
pub struct CasesArgs {
    #[command(flatten)]
    target: Target,
    /// Also list decided, escalated and expired cases.
    #[arg(long)]
    all: bool,
    /// Print the cases as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct DecideArgs {
    #[command(flatten)]
    target: Target,
    /// The case's name (`tallyman cases` lists them).
    case: String,
    /// Decide as this user (dev mode takes it on trust; in a cluster the API
    /// server knows who you are).
    #[arg(long = "as", value_name = "USER")]
    user: String,
    /// A group the user decides as (repeatable).
    #[arg(long = "group", value_name = "GROUP")]
    groups: Vec<String>,
    /// Why; required to reject.
    #[arg(long)]
    comment: Option<String>,
}

pub fn cases(args: CasesArgs) -> anyhow::Result<ExitCode> {
    let path = if args.all {
        "/dev/cases"
    } else {
        "/dev/cases?state=Open"
    };
    let (status, body) = super::super::block_on(request(&args.target.url, "GET", path, None))??;
    if status != 200 {
        bail!("{}", refusal(status, &body));
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(ExitCode::SUCCESS);
    }
    let cases = body.as_array().cloned().unwrap_or_default();
    if cases.is_empty() {
        println!("no {}cases", if args.all { "" } else { "open " });
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&cases));
    Ok(ExitCode::SUCCESS)
}

pub fn decide(args: DecideArgs, verdict: Verdict) -> anyhow::Result<ExitCode> {
    if verdict == Verdict::Reject && args.comment.as_deref().is_none_or(|c| c.trim().is_empty()) {
        bail!("a rejection needs --comment saying why");
    }
    let body = serde_json::json!({
        "decision": verdict,
        "approver": args.user,
        "groups": args.groups,
        "comment": args.comment,
    });
    let path = format!("/dev/cases/{}/decisions", args.case);
    let (status, answer) = super::super::block_on(request(
        &args.target.url,
        "POST",
        &path,
        Some(body.to_string()),
    ))??;
    if status != 200 {
        eprintln!("refused: {}", refusal(status, &answer));
        return Ok(ExitCode::from(1));
    }
    println!(
        "{} {} by {}: the case is now {} ({}/{} approvals)",
        args.case,
        match verdict {
            Verdict::Approve => "approved",
            Verdict::Reject => "rejected",
        },
        args.user,
        answer["state"].as_str().unwrap_or("?"),
        answer["approvals"],
        answer["required"]["count"],
    );
    Ok(ExitCode::SUCCESS)
}

fn refusal(status: u16, body: &Value) -> String {
    match body["detail"].as_str() {
        Some(detail) => format!("{detail} (HTTP {status})"),
        None => format!("HTTP {status}: {body}"),
    }
}

/// The open cases as an aligned table.
pub fn table(cases: &[Value]) -> String {
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    };
    let mut rows = vec![
        [
            "NAME",
            "NAMESPACE",
            "WORKFLOW",
            "KEY",
            "REASON",
            "AMOUNT",
            "APPROVALS",
            "STATE",
        ]
        .map(str::to_string),
    ];
    for c in cases {
        rows.push([
            text(&c["name"]),
            text(&c["namespace"]),
            text(&c["workflow"]),
            text(&c["key"]),
            text(&c["reason"]),
            text(&c["facts"]["amount"]),
            format!(
                "{}/{}",
                text(&c["approvals"]),
                text(&c["required"]["count"])
            ),
            text(&c["state"]),
        ]);
    }
    let rows: Vec<Vec<String>> = rows.into_iter().map(Vec::from).collect();
    crate::cmd::table::columns(&rows, 2)
}

/// One request to dev mode's plain-HTTP listener; the answer as JSON.
async fn request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, Value)> {
    let uri: hyper::Uri = format!("{}{path}", base.trim_end_matches('/'))
        .parse()
        .with_context(|| format!("{base} is not a URL"))?;
    if uri.scheme_str() != Some("http") {
        bail!("{base}: dev mode serves plain http://");
    }
    let authority = uri.authority().context("the URL has no host")?.clone();
    let stream = tokio::net::TcpStream::connect((
        authority.host().trim_matches(['[', ']']),
        authority.port_u16().unwrap_or(80),
    ))
    .await
    .with_context(|| format!("no dev mode answers at {base} (is `tallyman dev` running?)"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("failed to talk HTTP to dev mode")?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lines_up_and_shows_approvals_of_required() {
        let cases: Vec<Value> = serde_json::from_str(
            r#"[{"name": "case-1", "namespace": "finance", "workflow": "shipment-to-invoice",
                 "key": "4711", "reason": "QuantityMismatch", "facts": {"amount": "1990.00"},
                 "approvals": 0, "required": {"count": 1, "groups": ["finance-controllers"]},
                 "state": "Open"},
                {"name": "case-22", "namespace": "finance", "workflow": "returns-to-credit",
                 "key": "R-9", "reason": "HighValueReturn", "facts": {},
                 "approvals": 1, "required": {"count": 2}, "state": "Open"}]"#,
        )
        .unwrap();
        let out = table(&cases);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].starts_with("NAME     NAMESPACE  WORKFLOW"),
            "{out}"
        );
        assert!(
            lines[1].contains("1990.00") && lines[1].contains("0/1"),
            "{out}"
        );
        assert!(
            lines[2].contains("  -  ") && lines[2].contains("1/2"),
            "{out}"
        );
        // Columns line up: the KEY column starts at the same offset on every line.
        let at = lines[0].find("KEY").unwrap();
        assert_eq!(&lines[1][at..at + 4], "4711");
        assert_eq!(&lines[2][at..at + 3], "R-9");
    }
}
