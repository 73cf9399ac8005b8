//! `sim-erp`: the simulated ERP of `tallyman_testing::erp` as a process, for
//! demos and the end-to-end suites.
//!
//! ```text
//! sim-erp [--listen 127.0.0.1:8090] [--orders FILE] [--bearer TOKEN]
//! ```
//!
//! Prints its base URL (`http://ADDR`) as the first line on stdout once it
//! accepts connections, then serves until killed. `--orders` seeds orders
//! (and purchase orders) from a JSON file: a plain array of orders, or
//! `{"orders": [...], "purchaseOrders": [...]}`, with lines
//! `{"sku", "qty", "unitPrice"}` and prices as strings or numbers.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tallyman_testing::erp::{Seed, SimErp};

/// A simulated ERP for demos and end-to-end tests.
#[derive(Debug, Parser)]
#[command(name = "sim-erp")]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// JSON file of orders to seed.
    #[arg(long)]
    orders: Option<PathBuf>,
    /// Require `Authorization: Bearer TOKEN` on every request.
    #[arg(long)]
    bearer: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let seed = match &args.orders {
        None => Seed::default(),
        Some(path) => {
            match std::fs::read_to_string(path)
                .map_err(|e| e.to_string())
                .and_then(|text| Seed::from_json(&text))
            {
                Ok(seed) => seed,
                Err(e) => {
                    eprintln!("sim-erp: {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    };
    let sim = match SimErp::start_on(args.listen).await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("sim-erp: listening on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let (orders, purchase_orders) = (seed.orders.len(), seed.purchase_orders.len());
    sim.seed(seed);
    if let Some(token) = &args.bearer {
        sim.require_bearer(token);
    }

    let mut stdout = std::io::stdout().lock();
    // The URL alone on the first line, for scripts to read.
    if writeln!(stdout, "{}", sim.base_url())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    eprintln!(
        "sim-erp: serving {} with {orders} orders and {purchase_orders} purchase orders",
        sim.base_url()
    );
    std::future::pending::<()>().await;
    ExitCode::SUCCESS
}
