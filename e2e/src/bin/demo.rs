//! The README's main job: `examples/shipment-to-invoice` end to end on this
//! machine. Starts the simulated ERP and `tallyman dev` (with its private
//! nats-server), sends a realistic batch as the shop and the WMS would
//! (signed), lets a finance controller approve the one exception after
//! the shipment's own confirmer is refused, and prints what happened.
//! Exits 0 only when every number is what the batch must produce.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tallyman_e2e::dev::{DevMode, DevOptions};
use tallyman_e2e::senders::Delivery;
use tallyman_e2e::shipment::{Batch, Shipment, amount};
use tallyman_e2e::{example, workspace};
use tallyman_testing::erp::SimErp;

const NS: &str = "finance";
const WORKFLOW: &str = "shipment-to-invoice";
const CONTROLLER: &str = "m.weber";

#[derive(Default)]
struct Tally {
    accepted: u64,
    duplicates: u64,
    ignored: u64,
}

impl Tally {
    fn add(&mut self, d: Delivery) {
        match d {
            Delivery::Accepted => self.accepted += 1,
            Delivery::Duplicate => self.duplicates += 1,
            Delivery::Ignored => self.ignored += 1,
        }
    }
}

fn step(text: &str) {
    println!("\n▸ {text}");
}

fn bar(done: u64, total: u64, label: &str) {
    let width = 30;
    let filled = (done.min(total) * width / total.max(1)) as usize;
    let line = format!(
        "  [{}{}] {done}/{total} {label}",
        "#".repeat(filled),
        ".".repeat(width as usize - filled)
    );
    if std::io::stdout().is_terminal() {
        print!("\r{line}");
        let _ = std::io::stdout().flush();
    } else if done >= total {
        println!("{line}");
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run() -> Result<bool, String> {
    let started = Instant::now();
    println!("tallyman demo: shipment-to-invoice, end to end on this machine");

    step("starting the simulated ERP and tallyman dev");
    let erp = SimErp::start().await;
    let manifests = example(WORKFLOW);
    // The ERP checks the bearer token the Connector sends from its Secret.
    erp.require_bearer("dummy-erp-bearer-token-change-me");
    let batch = Batch::new();
    for s in batch.all() {
        s.seed(&erp);
    }
    let state_dir = workspace().join("target/demo");
    let _ = std::fs::remove_dir_all(&state_dir);
    let mut dev = DevMode::start(DevOptions {
        manifests: manifests.clone(),
        state_dir: state_dir.clone(),
        connector_urls: vec![("erp".into(), erp.base_url())],
    });
    println!(
        "  ERP        {} ({} orders seeded)",
        erp.base_url(),
        batch.all().len()
    );
    println!(
        "  dev mode   {} (log: {})",
        dev.url(),
        state_dir.join("dev.log").display()
    );
    println!(
        "  NATS       {} (private, JetStream in {})",
        dev.nats_url(),
        state_dir.join("jetstream").display()
    );
    let (api, senders) = (dev.api(), dev.senders());
    let mut tally = Tally::default();

    step("sending webhooks: shop orders and WMS shipment confirmations (signed)");
    let in_order: Vec<&Shipment> = batch
        .matching
        .iter()
        .chain([&batch.tiny_variance, &batch.needs_approval])
        .collect();
    let total = in_order.len() as u64 + 1;
    for (i, s) in in_order.iter().enumerate() {
        tally.add(senders.send("shop", &s.order_created()).await);
        tally.add(senders.send("wms", &s.shipment_confirmed()).await);
        bar(i as u64 + 1, total, "orders sent");
    }
    // The WMS confirms before the shop's order arrives.
    tally.add(
        senders
            .send("wms", &batch.out_of_order.shipment_confirmed())
            .await,
    );
    tally.add(
        senders
            .send("shop", &batch.out_of_order.order_created())
            .await,
    );
    bar(total, total, "orders sent");
    println!(
        "  order {}: shipment confirmed before the order arrived (kept, not dropped)",
        batch.out_of_order.order_id
    );
    // The WMS retries a confirmation it already delivered.
    let again = &batch.matching[4];
    tally.add(senders.send("wms", &again.shipment_confirmed()).await);
    println!(
        "  order {}: the WMS sent its confirmation twice (the second is absorbed)",
        again.order_id
    );

    step("waiting for the instances");
    let expected_auto = (batch.matching.len() + 2) as u64;
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let counts = api.counts(NS, WORKFLOW).await;
        bar(counts.completed, expected_auto, "completed without anyone");
        if counts.completed >= expected_auto && counts.exceptions >= 1 {
            break;
        }
        if Instant::now() > deadline {
            println!();
            return Err(format!(
                "the instances did not finish within 90 s: {counts:?}\n{}",
                dev.tail()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  order {}: shipped 199 of 200 (variance 1.25 EUR, 0.5 %): approved by the policy's `tiny` rule",
        batch.tiny_variance.order_id
    );

    step("an exception needs a finance controller");
    let key = &batch.needs_approval.order_id;
    let case = api
        .wait_for_case(WORKFLOW, key, "Open", Duration::from_secs(30))
        .await;
    let name = case["name"].as_str().unwrap_or_default().to_string();
    println!(
        "  case {name}: {} on order {key}, variance {} EUR ({} %), {} of {} approvals needed from {}",
        case["reason"].as_str().unwrap_or_default(),
        case["facts"]["amount"].as_str().unwrap_or("?"),
        case["facts"]["variancePercent"].as_str().unwrap_or("?"),
        case["approvals"],
        case["required"]["count"],
        case["required"]["groups"]
    );
    let initiator = case["initiator"].as_str().unwrap_or_default().to_string();
    let (status, answer) = api
        .decide(
            &name,
            "Approve",
            &initiator,
            &["finance-controllers"],
            Some("looks fine to me"),
        )
        .await;
    println!(
        "  {initiator} (who confirmed the shipment) tries to approve: HTTP {status}, {}",
        answer["detail"].as_str().unwrap_or_default()
    );
    let self_approval_refused = status == 403;
    let (status, answer) = api
        .decide(
            &name,
            "Approve",
            CONTROLLER,
            &["finance-controllers"],
            Some("two units of D-400 were damaged in picking; invoice what shipped"),
        )
        .await;
    println!(
        "  {CONTROLLER} (finance-controllers) approves: HTTP {status}, case {}",
        answer["state"].as_str().unwrap_or_default()
    );
    let approved = status == 200 && answer["state"] == "Approved";

    step("waiting for the approved instance to invoice");
    let all = batch.all().len() as u64;
    let counts = {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let counts = api.counts(NS, WORKFLOW).await;
            bar(counts.completed, all, "completed");
            if counts.completed >= all {
                break counts;
            }
            if Instant::now() > deadline {
                println!();
                return Err(format!(
                    "not every instance completed within 60 s: {counts:?}\n{}",
                    dev.tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };

    step("checking the ERP's books and the audit trail");
    let invoices = erp.invoices();
    let mut wrong = Vec::new();
    for s in batch.all() {
        let mine: Vec<_> = invoices
            .iter()
            .filter(|d| d.str_field("orderId").as_deref() == Some(s.order_id.as_str()))
            .collect();
        let want = amount(s.shipped_cents());
        match mine.as_slice() {
            [one] if one.field("netAmount") == Some(want.as_str()) => {}
            other => wrong.push(format!(
                "order {}: expected one invoice of {want}, found {:?}",
                s.order_id,
                other
                    .iter()
                    .map(|d| d.field("netAmount"))
                    .collect::<Vec<_>>()
            )),
        }
    }
    let net: i64 = batch.all().iter().map(|s| s.shipped_cents()).sum();
    let (verified, audit) = dev.audit_verify(NS);
    dev.stop();

    let cases = 1;
    let ok = wrong.is_empty()
        && invoices.len() as u64 == all
        && counts.completed == all
        && counts.failed == 0
        && counts.exceptions == cases
        && tally.duplicates == 1
        && tally.accepted == 2 * all
        && self_approval_refused
        && approved
        && verified;

    println!("\n══════════════════════ summary ══════════════════════");
    println!(
        "  webhooks accepted        {:>4}  (events stored in JetStream)",
        tally.accepted
    );
    println!(
        "  duplicates absorbed      {:>4}  (same event id, answered 200, stored once)",
        tally.duplicates
    );
    println!(
        "  instances completed      {:>4}  of {all} (failed {}, rejected {})",
        counts.completed, counts.failed, counts.rejected
    );
    println!(
        "  invoices in the ERP      {:>4}  net {} EUR, exact to the cent",
        invoices.len(),
        amount(net)
    );
    println!(
        "  exceptions opened        {:>4}  approved by {CONTROLLER}; self-approval {}",
        counts.exceptions,
        if self_approval_refused {
            "refused"
        } else {
            "NOT refused"
        }
    );
    println!("  auto-approved variances  {:>4}  (policy rule `tiny`)", 1);
    println!(
        "  audit verify             {}",
        if verified { "intact" } else { "FAILED" }
    );
    for line in audit.lines().filter(|l| !l.trim().is_empty()).take(3) {
        println!("      {line}");
    }
    for w in &wrong {
        println!("  ✗ {w}");
    }
    println!("  took {:.1} s", started.elapsed().as_secs_f64());
    println!(
        "{}",
        if ok {
            "\nall as expected: one invoice per order, none twice, the exception approved by a second person."
        } else {
            "\nSOMETHING IS OFF: see the lines above and target/demo/dev.log."
        }
    );
    Ok(ok)
}
