//! tallyman's local end-to-end suite and the README's demo: the examples'
//! manifests run through a real `tallyman dev` process (with a private,
//! real nats-server), fed by the simulated shop, WMS, AP inbox and ERP of
//! `tallyman_testing`, and checked on their financial outcome.
//!
//! ```text
//! Senders (sign like the real systems) ─POST─▶ tallyman dev ─REST─▶ SimErp (in this process)
//!                                   DevApi ─/dev/cases, /dev/status─┘
//! ```
//!
//! The simulated systems live here and in `tallyman_testing`, never in the
//! product.

pub mod api;
pub mod dev;
pub mod inventory;
pub mod money;
pub mod purchasing;
pub mod returns;
pub mod senders;
pub mod shipment;

pub use api::DevApi;
pub use dev::DevMode;
pub use senders::Senders;

use std::path::{Path, PathBuf};

use tallyman_testing::erp::SimErp;

/// The workspace root (the e2e crate sits one level below it).
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the workspace root")
        .to_path_buf()
}

/// An example in dev mode (state under `state`) against a fresh simulated
/// ERP that the example's `connector` is pointed at; `secure` first makes
/// the ERP ask for the credentials the example's Secret holds.
pub async fn start_example(
    workflow: &str,
    state: &Path,
    connector: &str,
    secure: impl FnOnce(&SimErp),
) -> (SimErp, DevMode, DevApi, Senders) {
    let erp = SimErp::start().await;
    secure(&erp);
    let dev = DevMode::start(dev::DevOptions::example(
        workflow,
        state,
        &[(connector, &erp.base_url())],
    ));
    let (api, senders) = (dev.api(), dev.senders());
    (erp, dev, api, senders)
}

/// An example's manifest directory, e.g. `example("shipment-to-invoice")`.
pub fn example(name: &str) -> PathBuf {
    workspace().join("examples").join(name)
}
