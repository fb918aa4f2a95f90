//! Nobody holds a connection for free: slow request heads, idle keep-alive connections and stalled
//! request bodies are cut off on time while other clients are served as usual, and the connection
//! cap holds new connections back until one closes, on the fast path and on the general one.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fhir_bulk_proxy::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use testkit::fake_fhir::RunningFake;
use testkit::{FakeFhir, TestProxy, plain_client, raw_get};

/// The short timeouts of these tests, seconds.
const HEAD: u64 = 2;
const IDLE: u64 = 1;
const BODY: u64 = 1;

/// The fast path (`true`) and the general one.
const BOTH: [bool; 2] = [true, false];

/// A proxy with the short timeouts (and the fast path on or off) in front of a fresh fake.
async fn setup(fast: bool, edit: impl FnOnce(&mut Config)) -> (RunningFake, TestProxy) {
    let fake = FakeFhir::new().start().await;
    let mut config = TestProxy::config(&fake.url());
    config.server.http1_fast_path = fast;
    config.server.request_head_timeout_secs = HEAD;
    config.server.keep_alive_timeout_secs = IDLE;
    config.server.request_body_timeout_secs = BODY;
    edit(&mut config);
    let proxy = TestProxy::start(config).await;
    (fake, proxy)
}

/// Reads one response with a Content-Length from `stream` (whose earlier bytes are in `buffer`):
/// its status and body, or `None` if the connection ends first.
async fn read_response(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<(u16, String)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(buffer).unwrap() {
            let length: usize = testkit::scripted::content_length(response.headers);
            if buffer.len() >= head + length {
                let status = response.code.unwrap();
                let body = String::from_utf8_lossy(&buffer[head..head + length]).into_owned();
                buffer.drain(..head + length);
                return Some((status, body));
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Sends a GET on `stream` and reads its answer, within 5 s.
async fn get_on(stream: &mut TcpStream, buffer: &mut Vec<u8>, path: &str) -> Option<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: proxy\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    tokio::time::timeout(Duration::from_secs(5), read_response(stream, buffer))
        .await
        .expect("an answer within 5 s")
}

/// Waits (up to `limit`) until the proxy closes `stream`, and returns when that was, after
/// asserting that it sent nothing before closing.
async fn closed_after(stream: &mut TcpStream, limit: Duration) -> Instant {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(limit, stream.read_to_end(&mut rest)).await;
    let closed = Instant::now();
    assert!(read.is_ok(), "still open after {limit:?}");
    assert!(
        rest.is_empty(),
        "sent before closing: {:?}",
        String::from_utf8_lossy(&rest)
    );
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_heads_are_closed_on_time_while_others_are_served() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast, |_| {}).await;
        let addr = proxy.addr;
        // 150 slowloris clients, one header line every 700 ms, never the blank line; 10 that
        // connect and send nothing. Each reports how long its connection lasted.
        let mut slow = Vec::new();
        for i in 0..160 {
            slow.push(tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let opened = Instant::now();
                if i < 150 {
                    let line = format!("GET /fhir/Patient/slow{i} HTTP/1.1\r\nHost: proxy\r\n");
                    stream.write_all(line.as_bytes()).await.unwrap();
                }
                let mut byte = [0u8; 1];
                loop {
                    tokio::select! {
                        read = stream.read(&mut byte) => {
                            assert!(!matches!(read, Ok(1)), "an answer to an unfinished head");
                            return opened.elapsed();
                        }
                        () = tokio::time::sleep(Duration::from_millis(700)), if i < 150 => {
                            if stream.write_all(b"X-Slow: 1\r\n").await.is_err() {
                                return opened.elapsed();
                            }
                        }
                    }
                }
            }));
        }
        // Meanwhile, new connections and a keep-alive client are answered at once.
        let http = plain_client();
        let mut served = 0;
        let until = Instant::now() + Duration::from_millis(HEAD * 1000 - 300);
        while Instant::now() < until {
            let started = Instant::now();
            let status = raw_get(addr, "/fhir/Patient/fresh", &[]).await;
            assert_eq!(status, 200);
            let response = http.get(proxy.url("/Patient/kept")).send().await.unwrap();
            assert_eq!(response.status(), 200);
            let took = started.elapsed();
            assert!(took < Duration::from_millis(500), "fast={fast}: {took:?}");
            served += 2;
        }
        assert!(served >= 10, "fast={fast}: only {served} answered");
        for (i, task) in slow.into_iter().enumerate() {
            let lasted = tokio::time::timeout(Duration::from_secs(HEAD + 3), task)
                .await
                .unwrap_or_else(|_| panic!("fast={fast}: connection {i} is still open"))
                .unwrap();
            assert!(
                lasted >= Duration::from_millis(HEAD * 1000 - 100)
                    && lasted <= Duration::from_millis(HEAD * 1000 + 1500),
                "fast={fast}: connection {i} lasted {lasted:?}"
            );
        }
        assert!(
            !fake.received().iter().any(|r| r.uri.contains("slow")),
            "fast={fast}: an unfinished head reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keep_alive_timeout() {
    for fast in BOTH {
        let (_fake, proxy) = setup(fast, |_| {}).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let opened = Instant::now();
        let mut buffer = Vec::new();
        // Requests 600 ms apart keep it open past both the keep-alive and the head timeout:
        // each answer starts the keep-alive wait anew.
        for i in 0..5 {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(IDLE * 600)).await;
            }
            let answer = get_on(&mut stream, &mut buffer, "/fhir/Patient/1").await;
            assert_eq!(answer.map(|a| a.0), Some(200), "fast={fast}, request {i}");
        }
        assert!(opened.elapsed() > Duration::from_secs(HEAD));
        let answered = Instant::now();
        let closed = closed_after(&mut stream, Duration::from_secs(IDLE + 2)).await;
        let idle = closed - answered;
        assert!(
            idle >= Duration::from_millis(IDLE * 1000 - 100),
            "fast={fast}: closed after {idle:?} idle"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_gets_408_and_never_reaches_the_upstream_whole() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast, |_| {}).await;
        let head = "POST /fhir/Patient HTTP/1.1\r\nHost: proxy\r\n\
                    Content-Type: application/fhir+json\r\nContent-Length: 100\r\n\r\n";
        // The same request sent whole arrives whole: the check below can fail.
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&[b'x'; 100]).await.unwrap();
        let mut buffer = Vec::new();
        let answer = read_response(&mut stream, &mut buffer).await;
        assert_eq!(answer.map(|a| a.0), Some(200), "fast={fast}");
        assert!(fake.received().iter().any(|r| r.body.len() == 100));

        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(&[b'y'; 10]).await.unwrap();
        let sent = Instant::now();
        let mut response = Vec::new();
        tokio::time::timeout(
            Duration::from_secs(BODY + 3),
            stream.read_to_end(&mut response),
        )
        .await
        .expect("answered and closed")
        .unwrap();
        let waited = sent.elapsed();
        assert!(
            waited >= Duration::from_millis(BODY * 1000 - 100),
            "fast={fast}: {waited:?}"
        );
        let text = String::from_utf8_lossy(&response);
        assert!(text.starts_with("HTTP/1.1 408 "), "fast={fast}: {text}");
        let lower = text.to_ascii_lowercase();
        assert!(
            lower.contains("content-type: application/fhir+json"),
            "{text}"
        );
        assert!(lower.contains("connection: close"), "{text}");
        let body: serde_json::Value =
            serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
        assert_eq!(body["resourceType"], "OperationOutcome", "{text}");
        assert_eq!(body["issue"][0]["code"], "timeout", "{text}");
        assert!(
            fake.received()
                .iter()
                .all(|r| r.body.len() == 100 || !r.body.starts_with(b"y")),
            "fast={fast}: the stalled body reached the upstream"
        );
        assert_eq!(
            fake.received()
                .iter()
                .filter(|r| r.body.len() == 100)
                .count(),
            1,
            "fast={fast}: a second complete body reached the upstream"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_the_connection_cap_a_connection_waits_until_one_closes() {
    for fast in BOTH {
        let (_fake, proxy) = setup(fast, |config| {
            config.server.max_connections = 2;
            config.server.keep_alive_timeout_secs = 60;
            config.server.request_head_timeout_secs = 60;
        })
        .await;
        let addr = proxy.addr;
        let (mut first, mut first_buffer) = open_and_get(addr).await;
        let (mut second, mut second_buffer) = open_and_get(addr).await;

        // The third is held in the backlog: connected, not answered.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third
            .write_all(b"GET /fhir/Patient/3 HTTP/1.1\r\nHost: proxy\r\n\r\n")
            .await
            .unwrap();
        let mut third_buffer = Vec::new();
        let early = tokio::time::timeout(
            Duration::from_millis(500),
            read_response(&mut third, &mut third_buffer),
        )
        .await;
        assert!(early.is_err(), "fast={fast}: served beyond the cap");
        // The first two still work.
        for (stream, buffer) in [
            (&mut first, &mut first_buffer),
            (&mut second, &mut second_buffer),
        ] {
            let answer = get_on(stream, buffer, "/fhir/Patient/again").await;
            assert_eq!(answer.map(|a| a.0), Some(200), "fast={fast}");
        }
        // One closes: the third is served.
        drop(first);
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            read_response(&mut third, &mut third_buffer),
        )
        .await
        .expect("served once a place is free");
        assert_eq!(answer.map(|a| a.0), Some(200), "fast={fast}");
        let answer = get_on(&mut second, &mut second_buffer, "/fhir/Patient/last").await;
        assert_eq!(answer.map(|a| a.0), Some(200), "fast={fast}");
    }
}

/// A new keep-alive connection that has been answered once (so it holds its place).
async fn open_and_get(addr: SocketAddr) -> (TcpStream, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buffer = Vec::new();
    let answer = get_on(&mut stream, &mut buffer, "/fhir/Patient/1").await;
    assert_eq!(answer.map(|a| a.0), Some(200));
    (stream, buffer)
}
