pub mod audit;
pub mod crdgen;
pub mod dev;
pub mod gateway;
pub mod kubectl;
pub mod manifests;
pub mod nats;
pub mod operator;
pub mod table;
pub mod validate;
pub mod worker;

/// Run an async command to completion on a multi-threaded runtime.
pub fn block_on<F: std::future::Future>(future: F) -> anyhow::Result<F::Output> {
    use anyhow::Context;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("failed to start the async runtime")?;
    Ok(runtime.block_on(future))
}
