//! How every tallyman process authenticates to NATS: a credentials file
//! (JWT and NKey seed) and a CA bundle for the server's TLS certificate.
//! The operator gives its worker and gateway pods the same two flags, as
//! files mounted from Secrets of their own namespace.

use std::path::PathBuf;

use anyhow::{Context, bail};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct Auth {
    /// NATS credentials file (JWT and NKey seed).
    #[arg(long, env = "TALLYMAN_NATS_CREDS", value_name = "FILE")]
    pub nats_creds: Option<PathBuf>,
    /// PEM CA bundle to verify the NATS server's TLS certificate with; TLS
    /// becomes required.
    #[arg(long, env = "TALLYMAN_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
}

impl Auth {
    /// Connect options named `name` (shown by the server's `connz`), with
    /// these credentials and CA. A file that cannot be read is an error
    /// naming the flag, before any connection is tried.
    pub async fn options(&self, name: String) -> anyhow::Result<async_nats::ConnectOptions> {
        let mut options = async_nats::ConnectOptions::new().name(name);
        if let Some(creds) = &self.nats_creds {
            options = options.credentials_file(creds).await.with_context(|| {
                format!(
                    "--nats-creds: failed to read NATS credentials {}",
                    creds.display()
                )
            })?;
        }
        if let Some(ca) = &self.nats_ca {
            // Read here: the client only reads it while connecting, where a
            // missing file reads like a broken connection.
            let pem = std::fs::read(ca)
                .with_context(|| format!("--nats-ca: failed to read {}", ca.display()))?;
            if !pem
                .windows(b"-----BEGIN CERTIFICATE-----".len())
                .any(|w| w == b"-----BEGIN CERTIFICATE-----")
            {
                bail!("--nats-ca: {} holds no PEM certificate", ca.display());
            }
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        Ok(options)
    }

    /// One connection to `url` named `name`.
    pub async fn connect(&self, url: &str, name: String) -> anyhow::Result<async_nats::Client> {
        self.options(name)
            .await?
            .connect(url)
            .await
            .with_context(|| format!("failed to connect to NATS at {url}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreadable_files_are_named_by_their_flag() {
        let auth = Auth {
            nats_creds: Some("/nonexistent/nats.creds".into()),
            nats_ca: None,
        };
        let err = format!("{:#}", auth.options("t".into()).await.unwrap_err());
        assert!(err.starts_with("--nats-creds: "), "{err}");
        assert!(err.contains("/nonexistent/nats.creds"), "{err}");

        let auth = Auth {
            nats_creds: None,
            nats_ca: Some("/nonexistent/ca.crt".into()),
        };
        let err = format!("{:#}", auth.options("t".into()).await.unwrap_err());
        assert!(err.starts_with("--nats-ca: "), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.crt");
        std::fs::write(&not_pem, "not a certificate\n").unwrap();
        let auth = Auth {
            nats_creds: None,
            nats_ca: Some(not_pem),
        };
        let err = format!("{:#}", auth.options("t".into()).await.unwrap_err());
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }
}
