//! The REST client's kept connections, against a raw HTTP/1.1 server that
//! counts the connections it accepts and closes them when told to.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::rest_spec;
use serde_json::json;
use tallyman_connectors::StaticSecrets;
use tallyman_connectors::rest::{CallRequest, RestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the raw server ends a connection.
#[derive(Clone, Copy)]
enum Close {
    /// Keeps it open for more requests.
    Never,
    /// Answers one request, then closes the socket without saying so.
    Silently,
    /// Answers one request with `Connection: close`, then closes.
    Announced,
}

struct RawServer {
    port: u16,
    accepted: Arc<AtomicUsize>,
    /// Every request's head, as received.
    heads: Arc<std::sync::Mutex<Vec<String>>>,
}

impl RawServer {
    async fn start(close: Close, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), heads.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(stream, close, delay, seen.clone()));
            }
        });
        Self {
            port,
            accepted,
            heads,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn client(&self) -> RestClient {
        let spec = rest_spec(json!({
            "baseUrl": format!("http://127.0.0.1:{}", self.port),
            "timeout": "2s",
            "retry": {"maxAttempts": 1},
            "actions": {"getOrder": {"method": "GET", "path": "/orders/{orderId}"}},
        }));
        RestClient::new("erp", &spec, &StaticSecrets::new()).unwrap()
    }
}

async fn serve(
    mut stream: TcpStream,
    close: Close,
    delay: Duration,
    heads: Arc<std::sync::Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    loop {
        // A GET has no body: the head is the request.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        heads
            .lock()
            .unwrap()
            .push(String::from_utf8_lossy(&head).into_owned());
        tokio::time::sleep(delay).await;
        let body = r#"{"id":"4711"}"#;
        let connection = match close {
            Close::Announced => "connection: close\r\n",
            _ => "",
        };
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{connection}\r\n{body}",
            body.len()
        );
        if stream.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
        if !matches!(close, Close::Never) {
            return;
        }
    }
}

async fn get(client: &RestClient, id: usize) -> u32 {
    let req = CallRequest::new("getOrder").param("orderId", id.to_string());
    let resp = client.call(&req, &|_, _| {}).await.unwrap();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, r#"{"id":"4711"}"#);
    resp.attempts
}

#[tokio::test]
async fn calls_in_turn_share_one_connection_and_name_the_host() {
    let server = RawServer::start(Close::Never, Duration::ZERO).await;
    let client = server.client();
    for i in 0..20 {
        assert_eq!(get(&client, i).await, 1);
    }
    assert_eq!(server.accepted(), 1);
    let heads = server.heads.lock().unwrap().clone();
    assert_eq!(heads.len(), 20);
    assert!(
        heads[0].starts_with("GET /orders/0 HTTP/1.1\r\n"),
        "{}",
        heads[0]
    );
    let host = format!("host: 127.0.0.1:{}\r\n", server.port);
    assert!(heads[0].to_lowercase().contains(&host), "{}", heads[0]);
}

#[tokio::test]
async fn concurrent_calls_open_a_connection_each_and_keep_them() {
    let server = RawServer::start(Close::Never, Duration::from_millis(100)).await;
    let client = server.client();
    let calls = (0..8).map(|i| get(&client, i));
    let attempts = futures_util::future::join_all(calls).await;
    assert_eq!(attempts, vec![1; 8]);
    assert_eq!(server.accepted(), 8);
    // The same eight again, concurrently and then in turn: no new ones.
    futures_util::future::join_all((0..8).map(|i| get(&client, i))).await;
    for i in 0..8 {
        get(&client, i).await;
    }
    assert_eq!(server.accepted(), 8);
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_not_used_again() {
    for close in [Close::Silently, Close::Announced] {
        let server = RawServer::start(close, Duration::ZERO).await;
        let client = server.client();
        for i in 0..5 {
            // One attempt each: a closed connection is found out before a
            // request goes to it, not by a failed call.
            assert_eq!(get(&client, i).await, 1);
            // Time for the server's close to reach the client.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(server.accepted(), 5);
    }
}
