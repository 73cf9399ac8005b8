//! The harness against the real binary: it starts, dies, and comes back on
//! the same port with its JetStream store.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tallyman_testing::nats::NatsServer;

#[test]
fn start_serves_nats_with_jetstream_on_loopback() {
    let server = NatsServer::start();

    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    let client = RawClient::connect(&server);
    assert!(
        client.info.contains(r#""jetstream":true"#),
        "JetStream is not enabled: {}",
        client.info
    );
    assert!(server.store_dir().join("jetstream").is_dir());
}

#[test]
fn kill_refuses_connections_and_restart_serves_on_the_same_port() {
    let mut server = NatsServer::start();
    let url = server.url();

    server.kill();
    assert!(!server.is_running());
    let refused = TcpStream::connect(server.addr()).expect_err("connected to a killed server");
    assert_eq!(refused.kind(), ErrorKind::ConnectionRefused);

    server.restart();
    assert!(server.is_running());
    assert_eq!(server.url(), url);
    RawClient::connect(&server);
}

#[test]
fn stop_then_restart_keeps_file_storage() {
    let mut server = NatsServer::start();
    let mut client = RawClient::connect(&server);
    create_stream_with_one_message(&mut client);
    drop(client);

    server.stop();
    assert!(!server.is_running());
    server.restart();

    let info = RawClient::connect(&server).request("$JS.API.STREAM.INFO.ORDERS", "");
    assert!(info.contains(r#""messages":1,"#), "{info}");
}

#[test]
fn kill_then_restart_recovers_acknowledged_messages() {
    let mut server = NatsServer::start();
    let mut client = RawClient::connect(&server);
    create_stream_with_one_message(&mut client);

    server.kill();
    server.restart();

    let info = RawClient::connect(&server).request("$JS.API.STREAM.INFO.ORDERS", "");
    assert!(info.contains(r#""messages":1,"#), "{info}");
}

#[test]
fn restart_of_a_running_server_stops_it_first() {
    let mut server = NatsServer::start();
    server.restart();
    RawClient::connect(&server);
}

fn create_stream_with_one_message(client: &mut RawClient) {
    let created = client.request(
        "$JS.API.STREAM.CREATE.ORDERS",
        r#"{"name":"ORDERS","subjects":["orders.>"],"storage":"file"}"#,
    );
    assert!(!created.contains(r#""error""#), "{created}");
    let ack = client.request("orders.created", "order 1");
    assert!(ack.contains(r#""seq":1"#), "{ack}");
}

/// Just enough of the NATS client protocol to ask JetStream's API a question
/// without a client library: the library stays free of async-nats.
struct RawClient {
    info: String,
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    next_sid: u32,
}

impl RawClient {
    fn connect(server: &NatsServer) -> RawClient {
        let stream = TcpStream::connect(server.addr())
            .unwrap_or_else(|e| panic!("failed to connect to {}: {e}", server.url()));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set a read timeout");
        let mut client = RawClient {
            info: String::new(),
            reader: BufReader::new(stream.try_clone().expect("clone the socket")),
            writer: stream,
            next_sid: 1,
        };
        client.info = client.read_line();
        assert!(client.info.starts_with("INFO "), "{}", client.info);
        client.send(r#"CONNECT {"verbose":false,"pedantic":false}"#);
        client
    }

    /// Publishes `payload` to `subject` and returns the first reply.
    fn request(&mut self, subject: &str, payload: &str) -> String {
        let sid = self.next_sid;
        self.next_sid += 1;
        let inbox = format!("_INBOX.raw.{sid}");
        self.send(&format!("SUB {inbox} {sid}"));
        self.send(&format!("UNSUB {sid} 1"));
        self.send(&format!(
            "PUB {subject} {inbox} {}\r\n{payload}",
            payload.len()
        ));
        loop {
            let line = self.read_line();
            match line.split(' ').next() {
                Some("PING") => self.send("PONG"),
                Some("MSG") => {
                    let len: usize = line
                        .rsplit(' ')
                        .next()
                        .and_then(|n| n.parse().ok())
                        .unwrap_or_else(|| panic!("bad MSG line: {line}"));
                    let mut body = vec![0; len + 2];
                    self.reader.read_exact(&mut body).expect("read a MSG body");
                    body.truncate(len);
                    return String::from_utf8(body).expect("a UTF-8 reply");
                }
                _ => panic!("unexpected from the server while waiting on {subject}: {line}"),
            }
        }
    }

    fn send(&mut self, op: &str) {
        self.writer
            .write_all(format!("{op}\r\n").as_bytes())
            .expect("write to the server");
    }

    fn read_line(&mut self) -> String {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .expect("read from the server");
        line.trim_end().to_owned()
    }
}
