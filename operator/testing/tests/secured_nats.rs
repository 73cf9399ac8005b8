//! The secured harness against the real binary and the real client: TLS
//! with the test CA and an operator-mode credentials file, the way
//! `tallyman worker --nats-creds FILE --nats-ca FILE` connects. Every
//! refused connection is bounded, so a regression fails instead of hanging.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectError, ConnectErrorKind, ConnectOptions};
use tallyman_testing::nats::NatsServer;

/// The client's own bound on one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The test's bound on `connect()` as a whole, in case it retries.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);

#[tokio::test]
async fn creds_and_ca_give_a_jetstream_round_trip() {
    let (server, secrets) = NatsServer::start_secured();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let info = raw_info(&server);
    for demanded in [r#""tls_required":true"#, r#""auth_required":true"#] {
        assert!(info.contains(demanded), "INFO lacks {demanded}: {info}");
    }

    let client = connect(&server, Some(secrets.creds()), Some(secrets.ca()))
        .await
        .unwrap_or_else(|e| panic!("failed to connect with the creds and CA: {e}"));
    let js = jetstream::new(client);

    let mut orders = js
        .create_stream(stream::Config {
            name: "ORDERS".to_owned(),
            subjects: vec!["orders.>".to_owned()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create a file stream in the account");
    let ack = js
        .publish("orders.created", "order 1".into())
        .await
        .expect("publish")
        .await
        .expect("a JetStream ack");
    assert_eq!((ack.stream.as_str(), ack.sequence), ("ORDERS", 1));
    let stored = orders
        .get_raw_message(1)
        .await
        .expect("read the message back");
    assert_eq!(stored.subject.as_str(), "orders.created");
    assert_eq!(stored.payload.as_ref(), b"order 1");
    assert_eq!(orders.info().await.expect("stream info").state.messages, 1);

    let bucket = js
        .create_key_value(kv::Config {
            bucket: "settings".to_owned(),
            ..Default::default()
        })
        .await
        .expect("create a KV bucket in the account");
    bucket.put("mode", "live".into()).await.expect("KV put");
    let value = bucket.get("mode").await.expect("KV get");
    assert_eq!(value.as_deref(), Some(b"live".as_slice()));
}

#[tokio::test]
async fn no_creds_is_an_authorization_violation() {
    let (server, secrets) = NatsServer::start_secured();
    let err = connect(&server, None, Some(secrets.ca()))
        .await
        .expect_err("connected without credentials");
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
}

#[tokio::test]
async fn stranger_creds_are_an_authorization_violation() {
    let (server, secrets) = NatsServer::start_secured();
    let err = connect(&server, Some(secrets.stranger_creds()), Some(secrets.ca()))
        .await
        .expect_err("connected with a user of an unknown account");
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );
}

#[tokio::test]
async fn without_the_ca_the_server_is_not_trusted() {
    let (server, secrets) = NatsServer::start_secured();
    let err = connect(&server, Some(secrets.creds()), None)
        .await
        .expect_err("trusted a certificate from the test CA without it");
    // async-nats files a failed handshake under Io (Tls is for its own
    // setup, e.g. an unreadable CA file): the message says why.
    assert!(
        err.to_string()
            .contains("invalid peer certificate: UnknownIssuer"),
        "{:?}: {err}",
        err.kind()
    );
}

#[tokio::test]
async fn restart_keeps_tls_auth_and_the_store() {
    let (mut server, secrets) = NatsServer::start_secured();
    let config = server.config_path().expect("a config file").to_owned();
    let client = connect(&server, Some(secrets.creds()), Some(secrets.ca()))
        .await
        .expect("connect before the restart");
    jetstream::new(client)
        .create_key_value(kv::Config {
            bucket: "settings".to_owned(),
            ..Default::default()
        })
        .await
        .expect("create a KV bucket")
        .put("mode", "live".into())
        .await
        .expect("KV put");

    server.kill();
    server.restart();
    assert_eq!(server.config_path(), Some(config.as_path()));

    let err = connect(&server, None, Some(secrets.ca()))
        .await
        .expect_err("connected without credentials after the restart");
    assert_eq!(
        err.kind(),
        ConnectErrorKind::AuthorizationViolation,
        "{err}"
    );

    server.restart();
    let client = connect(&server, Some(secrets.creds()), Some(secrets.ca()))
        .await
        .expect("connect after the restarts");
    let bucket = jetstream::new(client)
        .get_key_value("settings")
        .await
        .expect("the bucket survived");
    let value = bucket.get("mode").await.expect("KV get");
    assert_eq!(value.as_deref(), Some(b"live".as_slice()));
}

#[test]
fn secrets_are_files_in_the_server_dir() {
    let (server, secrets) = NatsServer::start_secured();
    let dir = server
        .store_dir()
        .parent()
        .expect("the temp dir")
        .to_owned();
    let files: [(&Path, &str); 3] = [
        (secrets.creds(), "-----BEGIN NATS USER JWT-----\n"),
        (secrets.stranger_creds(), "-----BEGIN NATS USER JWT-----\n"),
        (secrets.ca(), "-----BEGIN CERTIFICATE-----"),
    ];
    for (path, start) in files {
        assert_eq!(path.parent(), Some(dir.as_path()));
        let text = std::fs::read_to_string(path).expect("read a secrets file");
        assert!(text.starts_with(start), "{}: {text}", path.display());
    }
    assert!(secrets.account().starts_with('A'), "{}", secrets.account());
    assert!(NatsServer::start().config_path().is_none());

    drop(server);
    assert!(!secrets.creds().exists(), "the creds outlived the server");
}

/// Connects as a worker would: TLS required, the creds file and the CA if
/// given, one attempt, all bounded.
async fn connect(
    server: &NatsServer,
    creds: Option<&Path>,
    ca: Option<&Path>,
) -> Result<Client, ConnectError> {
    let mut options = ConnectOptions::new()
        .require_tls(true)
        .connection_timeout(CONNECT_TIMEOUT);
    if let Some(creds) = creds {
        options = options
            .credentials_file(creds)
            .await
            .unwrap_or_else(|e| panic!("failed to load {}: {e}", creds.display()));
    }
    if let Some(ca) = ca {
        options = options.add_root_certificates(ca.to_owned());
    }
    tokio::time::timeout(CONNECT_DEADLINE, options.connect(server.url()))
        .await
        .unwrap_or_else(|_| panic!("connect to {} hung for {CONNECT_DEADLINE:?}", server.url()))
}

/// The server's INFO line, read before any TLS: what it demands of clients.
fn raw_info(server: &NatsServer) -> String {
    let stream = TcpStream::connect(server.addr())
        .unwrap_or_else(|e| panic!("failed to connect to {}: {e}", server.url()));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    let mut info = String::new();
    BufReader::new(stream)
        .read_line(&mut info)
        .expect("read INFO");
    assert!(info.starts_with("INFO "), "{info}");
    info
}
