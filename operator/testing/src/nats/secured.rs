//! A `nats-server` that, like a production install, requires TLS and NATS
//! credentials files: [`NatsServer::start_secured`].
//!
//! ```text
//! <temp dir>/              the server's own, see the parent module
//!   nats-server.conf       -c: tls {}, operator, resolver: MEMORY, preload
//!   ca.pem                 the test CA, for clients (--nats-ca)
//!   server-cert.pem        127.0.0.1 and localhost, issued by the CA
//!   server-key.pem
//!   user.creds             a user of the JetStream account (--nats-creds)
//!   stranger.creds         a user of an account the server does not know
//! ```
//!
//! Auth is decentralised (operator mode), the way `nsc` sets it up: an
//! operator signs a system account and an application account with
//! JetStream (no limits), the account signs a user, and the server trusts
//! the operator and has both account JWTs preloaded (`resolver: MEMORY`).
//! Every key, JWT and certificate is made fresh per server, so nothing
//! secret lives in the repository and nothing expires.
//!
//! The JWTs are encoded here (nats-io/jwt v2: header
//! `{"typ":"JWT","alg":"ed25519-nkey"}`, the issuer's ed25519 signature over
//! `header.claims`, base64url without padding) rather than pulled in from
//! a JWT crate: the format is small and the server checks it on connect.
//!
//! The server's INFO demands TLS, so a client upgrades on `nats://` (the
//! URL `url()` gives) as well as on `tls://`; the certificate names both
//! `127.0.0.1` and `localhost`.
//!
//! Two things in the server's log that are not failures: a
//! `TLS handshake error: EOF` per start (the readiness probe connects and
//! hangs up without TLS), and `System  : ""` under "Trusted Operators"
//! (that line shows the operator JWT's audience, not its system account).
//! The system account is not optional: the operator JWT names it, and the
//! server refuses to start ("error resolving system account") unless its
//! JWT is preloaded too.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyUsagePurpose,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha512_256};

use super::NatsServer;

const CONFIG_FILE: &str = "nats-server.conf";
const CA_FILE: &str = "ca.pem";
const CERT_FILE: &str = "server-cert.pem";
const KEY_FILE: &str = "server-key.pem";
const CREDS_FILE: &str = "user.creds";
const STRANGER_CREDS_FILE: &str = "stranger.creds";
/// The server's TLS handshake timeout (its default is 2 s): generous, as a
/// loaded 2-core CI machine runs many servers and clients at once.
const TLS_TIMEOUT_SECS: u32 = 5;

/// Where a secured server's client-side files are. They live in the
/// server's temp dir, so they are gone once its [`NatsServer`] is dropped.
#[derive(Debug, Clone)]
pub struct NatsSecrets {
    creds: PathBuf,
    ca: PathBuf,
    stranger_creds: PathBuf,
    account: String,
}

impl NatsSecrets {
    /// `user.creds`: the user JWT and its NKey seed, in the format `nsc`
    /// writes, for a user of the account that has JetStream.
    pub fn creds(&self) -> &Path {
        &self.creds
    }

    /// `ca.pem`: the CA that issued the server's certificate, PEM.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// A well-formed credentials file the server must refuse: its user is
    /// signed by an account key the operator never signed (an
    /// authorization violation, not a TLS or parse error).
    pub fn stranger_creds(&self) -> &Path {
        &self.stranger_creds
    }

    /// The public key (`A...`) of the account `creds()` belongs to.
    pub fn account(&self) -> &str {
        &self.account
    }
}

impl NatsServer {
    /// Starts a server as [`NatsServer::start`] does (JetStream, free
    /// loopback port, temp dir), that also requires TLS with a test CA and
    /// NATS credentials (operator mode). `restart()` keeps both: the config
    /// file is passed on every run.
    ///
    /// # Panics
    /// When the files cannot be written, no binary is found, or the server
    /// does not come up within 10 s.
    pub fn start_secured() -> (NatsServer, NatsSecrets) {
        let mut secrets = None;
        let server = NatsServer::start_with(|dir| {
            let (config, written) = write_setup(dir);
            secrets = Some(written);
            Some(config)
        });
        let secrets = secrets.expect("start_with runs the setup before the server");
        (server, secrets)
    }
}

/// Writes keys, JWTs, certificates and the config into `dir`, and returns
/// the config file and the client side.
fn write_setup(dir: &Path) -> (PathBuf, NatsSecrets) {
    let ca = dir.join(CA_FILE);
    let cert = dir.join(CERT_FILE);
    let key = dir.join(KEY_FILE);
    write_tls(&ca, &cert, &key);

    let operator = nkeys::KeyPair::new_operator();
    let system = nkeys::KeyPair::new_account();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();

    let operator_jwt = encode_jwt(
        &operator,
        &operator.public_key(),
        "tallyman-testing",
        json!({
            "type": "operator",
            "version": 2,
            "system_account": system.public_key(),
        }),
    );
    let system_jwt = encode_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2, "limits": account_limits(false)}),
    );
    let account_jwt = encode_jwt(
        &operator,
        &account.public_key(),
        "tallyman",
        json!({"type": "account", "version": 2, "limits": account_limits(true)}),
    );

    let creds = dir.join(CREDS_FILE);
    write_file(&creds, &creds_file(&account, &user, "tallyman"));
    // The same shape of file, from an account key nobody vouches for.
    let stranger_account = nkeys::KeyPair::new_account();
    let stranger_creds = dir.join(STRANGER_CREDS_FILE);
    write_file(
        &stranger_creds,
        &creds_file(&stranger_account, &nkeys::KeyPair::new_user(), "stranger"),
    );

    // Quoted as JSON strings, which the server's config parser reads too.
    let quote = |s: &str| Value::from(s).to_string();
    let config = format!(
        "# tallyman-testing: TLS with a test CA, operator-mode (JWT) auth.\n\
         # -js -sd -a -p come from the command line.\n\
         tls {{\n  cert_file: {cert}\n  key_file: {key}\n  timeout: {TLS_TIMEOUT_SECS}\n}}\n\
         operator: {operator_jwt}\n\
         system_account: {system_pub}\n\
         resolver: MEMORY\n\
         resolver_preload: {{\n  {system_pub}: {system_jwt}\n  {account_pub}: {account_jwt}\n}}\n",
        cert = quote(&path_str(&cert)),
        key = quote(&path_str(&key)),
        operator_jwt = quote(&operator_jwt),
        system_pub = system.public_key(),
        system_jwt = quote(&system_jwt),
        account_pub = account.public_key(),
        account_jwt = quote(&account_jwt),
    );
    let config_path = dir.join(CONFIG_FILE);
    write_file(&config_path, &config);

    let secrets = NatsSecrets {
        creds,
        ca,
        stranger_creds,
        account: account.public_key(),
    };
    (config_path, secrets)
}

/// An account's `limits` claim: no connection or data limits (-1), and
/// with `jetstream` unlimited memory and file storage, streams and
/// consumers. Without JetStream limits the account has no JetStream at all,
/// even on a server started with `-js`.
fn account_limits(jetstream: bool) -> Value {
    let mut limits = json!({
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": true,
        "conn": -1,
        "leaf": -1,
    });
    if jetstream {
        for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[field] = json!(-1);
        }
    }
    limits
}

/// A user of `account` signed by it, as a `.creds` file.
fn creds_file(account: &nkeys::KeyPair, user: &nkeys::KeyPair, name: &str) -> String {
    let jwt = encode_jwt(
        account,
        &user.public_key(),
        name,
        json!({
            "type": "user",
            "version": 2,
            "pub": {},
            "sub": {},
            "subs": -1,
            "data": -1,
            "payload": -1,
        }),
    );
    let seed = user
        .seed()
        .unwrap_or_else(|e| panic!("failed to get the seed of a fresh user key: {e}"));
    format!(
        "-----BEGIN NATS USER JWT-----\n\
         {jwt}\n\
         ------END NATS USER JWT------\n\
         \n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\
         \n\
         -----BEGIN USER NKEY SEED-----\n\
         {seed}\n\
         ------END USER NKEY SEED------\n\
         \n\
         *************************************************************\n"
    )
}

/// A nats-io/jwt v2 token: `subject` vouched for by `issuer`, with `nats`
/// as the type-specific claims.
fn encode_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let issued_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = json!({
        "iat": issued_at,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    // The ID nats-io/jwt gives a token: the hash of its claims, base32. The
    // server does not check it, but tools that list tokens key on it.
    let digest = Sha512_256::digest(claims.to_string().as_bytes());
    claims["jti"] = Value::from(data_encoding::BASE32_NOPAD.encode(&digest));
    let signed = format!("{header}.{}", URL_SAFE_NO_PAD.encode(claims.to_string()));
    let signature = issuer
        .sign(signed.as_bytes())
        .unwrap_or_else(|e| panic!("failed to sign the JWT for {subject}: {e}"));
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// A CA, and a server certificate and key it issued for `127.0.0.1` and
/// `localhost`, as PEM files.
fn write_tls(ca_path: &Path, cert_path: &Path, key_path: &Path) {
    let tls = |what: &str, e: rcgen::Error| -> ! {
        panic!("failed to make the test {what} for nats-server: {e}")
    };
    let mut ca_params =
        CertificateParams::new(Vec::<String>::new()).unwrap_or_else(|e| tls("CA", e));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "tallyman-testing CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = rcgen::KeyPair::generate().unwrap_or_else(|e| tls("CA key", e));
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).unwrap_or_else(|e| tls("CA", e));

    let mut params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap_or_else(|e| tls("server certificate", e));
    params
        .distinguished_name
        .push(DnType::CommonName, "nats-server");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = rcgen::KeyPair::generate().unwrap_or_else(|e| tls("server key", e));
    let cert = params
        .signed_by(&key, &ca)
        .unwrap_or_else(|e| tls("server certificate", e));

    write_file(ca_path, &ca.pem());
    write_file(cert_path, &cert.pem());
    write_file(key_path, &key.serialize_pem());
}

fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents)
        .unwrap_or_else(|e| panic!("failed to write {} for nats-server: {e}", path.display()));
}

fn path_str(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("the temp dir path is not UTF-8: {}", path.display()))
        .to_owned()
}
