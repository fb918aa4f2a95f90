//! The passthrough fast path (`server.http1_fast_path`): response framings the hyper-based fake
//! cannot produce (from a scripted raw upstream), pipelining, hand-over to the general path in the
//! middle of a connection, and heads it must leave alone.

use std::net::SocketAddr;
use std::sync::Arc;

use fhir_bulk_proxy::config::Splice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use testkit::get_anonymous;
use testkit::metrics;
use testkit::scripted::{Part, ScriptedUpstream, find};
use testkit::{FakeFhir, TestProxy, outcome, plain_client};

/// Held by every test here that sends large bodies: `bulk_proxy_spliced_bytes_total` counts for
/// the whole test process, so a test measuring it must not overlap another that splices.
static SPLICING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Asserts that `spliced` bytes are `bodies` large bodies' worth: all but what arrived with each
/// response head (read before the body's way is chosen, and copied; at most one 64 KiB read).
fn assert_spliced(spliced: u64, bodies: u64, what: &str) {
    let most = bodies * LARGE as u64;
    let least = most.saturating_sub(bodies * 64 * 1024);
    assert!(
        (least..=most).contains(&spliced),
        "{what}: {spliced} bytes spliced, not {bodies} large bodies' worth"
    );
}

/// The bytes moved with splice(2) so far, as `/metrics` reports them.
async fn spliced_bytes(proxy: &TestProxy) -> u64 {
    let text = metrics(proxy.addr).await;
    text.lines()
        .find_map(|line| line.strip_prefix("bulk_proxy_spliced_bytes_total "))
        .unwrap_or_else(|| panic!("no spliced bytes counter in\n{text}"))
        .parse::<f64>()
        .unwrap() as u64
}

/// The scripted upstream of these tests (answers by path) and a proxy (default configuration) in
/// front of it.
async fn behind_a_proxy() -> (ScriptedUpstream, TestProxy, Arc<Notify>) {
    behind_a_proxy_splicing(Splice::Auto).await
}

/// The same, with `server.splice` set as given. One lane (`server.worker_threads = 1`), so that
/// every client connection shares the same upstream pool and the tests can count the upstream
/// connections. The notify lets `/fhir/large-paused` send the second half of its body.
async fn behind_a_proxy_splicing(splice: Splice) -> (ScriptedUpstream, TestProxy, Arc<Notify>) {
    let (upstream, resume) = scripted().await;
    let mut config = TestProxy::config(&upstream.url());
    config.server.splice = splice;
    config.server.worker_threads = 1;
    let proxy = TestProxy::start(config).await;
    (upstream, proxy, resume)
}

async fn scripted() -> (ScriptedUpstream, Arc<Notify>) {
    let resume = Arc::new(Notify::new());
    let resumed = resume.clone();
    let upstream = ScriptedUpstream::start(move |request| answer(&request.path(), &resumed)).await;
    (upstream, resume)
}

/// The scripted answer to `path`.
fn answer(path: &str, resume: &Arc<Notify>) -> Vec<Part> {
    let large_head = format!("HTTP/1.1 200 OK\r\nContent-Length: {LARGE}\r\n\r\n");
    // 3 MiB: spliced, or copied by the fast path's two tasks. With a length; until the upstream
    // closes; cut short (a length, and a third of the body); or paused after the first half.
    match path {
        "/fhir/large" => return vec![Part::text(&large_head), Part::Bytes(large_body())],
        "/fhir/large-until-close" => {
            return vec![
                Part::text("HTTP/1.1 200 OK\r\n\r\n"),
                Part::Bytes(large_body()),
                Part::Close,
            ];
        }
        "/fhir/large-cut" => {
            return vec![
                Part::text(&large_head),
                Part::Bytes(large_body()[..LARGE / 3].to_vec()),
                Part::Close,
            ];
        }
        // Under the size the fast path splices or copies with two tasks: copied in line.
        "/fhir/medium" => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {MEDIUM}\r\n\r\n");
            return vec![
                Part::text(&head),
                Part::Bytes(large_body()[..MEDIUM].to_vec()),
            ];
        }
        "/fhir/large-paused" => {
            let body = large_body();
            return vec![
                Part::text(&large_head),
                Part::Bytes(body[..LARGE / 2].to_vec()),
                Part::Wait(resume.clone()),
                Part::Bytes(body[LARGE / 2..].to_vec()),
            ];
        }
        _ => {}
    }
    let (answer, close) = match path {
        "/fhir/chunked" => (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\
             Trailer: X-Checksum\r\n\r\n5;note=1\r\nhello\r\n6\r\n world\r\n0\r\n\
             X-Checksum: abc\r\n\r\n",
            false,
        ),
        "/fhir/until-close" => (
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the end",
            true,
        ),
        "/fhir/early-hints" => (
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal",
            false,
        ),
        "/fhir/head" => ("HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", false),
        "/fhir/no-content" => ("HTTP/1.1 204 No Content\r\nETag: W/\"2\"\r\n\r\n", false),
        "/fhir/reason" => (
            "HTTP/1.1 299 Quite Unusual\r\nContent-Length: 2\r\n\r\nok",
            false,
        ),
        "/fhir/gzip-coded" => (
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            true,
        ),
        "/fhir/two-lengths" => (
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            true,
        ),
        "/fhir/garbage" => ("HTTTP/9 what\r\n\r\n", true),
        "/fhir/short" => ("HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ncut", true),
        _ => ("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", false),
    };
    let mut parts = vec![Part::text(answer)];
    if close {
        parts.push(Part::Close);
    }
    parts
}

/// Size of the scripted upstream's `/fhir/large` answer.
const LARGE: usize = 3 * 1024 * 1024;
/// Size of `/fhir/medium`: below the 512 KiB above which bodies may be spliced.
const MEDIUM: usize = 256 * 1024;

/// The body of the large answers: no run of bytes repeats at a power-of-two distance, so a chunk
/// lost, repeated or reordered on the way shows.
fn large_body() -> Vec<u8> {
    (0..LARGE).map(|i| (i % 251) as u8).collect()
}

/// Sends `request` as is on a new connection and reads until the proxy closes it.
async fn exchange_raw(addr: SocketAddr, request: &[u8]) -> String {
    let response = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        exchange_raw_bytes(addr, request),
    )
    .await
    .expect("the proxy closes the connection");
    String::from_utf8_lossy(&response).into_owned()
}

/// [`exchange_raw`] without a time limit, and the bytes as they came.
async fn exchange_raw_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    response
}

/// Splits a stream of responses that all carry a Content-Length: (status, head, body) each.
fn split_responses(mut bytes: &[u8]) -> Vec<(u16, String, String)> {
    let mut responses = Vec::new();
    while !bytes.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = response.parse(bytes).unwrap() else {
            panic!(
                "incomplete response head: {:?}",
                String::from_utf8_lossy(bytes)
            );
        };
        let length: usize = testkit::scripted::content_length(response.headers);
        let head = String::from_utf8_lossy(&bytes[..head_len]).into_owned();
        let body = String::from_utf8_lossy(&bytes[head_len..head_len + length]).into_owned();
        responses.push((response.code.unwrap(), head, body));
        bytes = &bytes[head_len + length..];
    }
    responses
}

#[tokio::test]
async fn chunked_answers_are_forwarded_chunk_by_chunk_without_extensions_or_trailers() {
    let (upstream, proxy, _) = behind_a_proxy().await;
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/chunked HTTP/1.1\r\nHost: p\r\n\r\nGET /fhir/chunked HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    // Chunks of the proxy's own making, as hyper's server writes them: no extensions.
    let body = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    assert_eq!(raw.matches(body).count(), 2, "{raw}");
    assert_eq!(
        raw.matches("transfer-encoding: chunked\r\n").count(),
        2,
        "{raw}"
    );
    assert!(
        !raw.contains("X-Checksum"),
        "trailer fields are dropped: {raw}"
    );
    assert!(!raw.contains("Trailer:"), "{raw}");
    // reqwest decodes the same answer; the upstream connection went back to the pool each time.
    for _ in 0..3 {
        let response = get_anonymous(proxy.url("/chunked")).await;
        assert_eq!(response.text().await.unwrap(), "hello world");
    }
    assert_eq!(upstream.connections(), 1);
}

/// Large bodies go through splice(2) exactly when told to, every byte of them, and a body under
/// the threshold never does; either way the body arrives whole.
#[tokio::test]
async fn large_answers_are_spliced_only_when_told_and_small_ones_copied() {
    let _alone = SPLICING.lock().await;
    for (splice, spliced) in [(Splice::Always, 1), (Splice::Never, 0)] {
        let (_upstream, proxy, _) = behind_a_proxy_splicing(splice).await;
        let before = spliced_bytes(&proxy).await;
        let large = plain_client().get(proxy.url("/large")).send().await;
        let body = large.unwrap().bytes().await.unwrap();
        assert!(body == large_body(), "splice {splice:?}: the body differs");
        let after_large = spliced_bytes(&proxy).await;
        assert_spliced(
            after_large - before,
            spliced,
            &format!("splice {splice:?}: large"),
        );
        let medium = plain_client().get(proxy.url("/medium")).send().await;
        let body = medium.unwrap().bytes().await.unwrap();
        assert!(body == large_body()[..MEDIUM], "splice {splice:?}: medium");
        let after_medium = spliced_bytes(&proxy).await;
        assert_eq!(
            after_medium, after_large,
            "splice {splice:?}: medium spliced"
        );
    }
}

#[tokio::test]
async fn large_answers_arrive_whole_and_their_connection_is_reused() {
    let _alone = SPLICING.lock().await;
    for splice in [Splice::Always, Splice::Never] {
        let (upstream, proxy, _) = behind_a_proxy_splicing(splice).await;
        for _ in 0..3 {
            let response = get_anonymous(proxy.url("/large")).await;
            assert_eq!(response.headers()["content-length"], LARGE.to_string());
            let body = response.bytes().await.unwrap();
            assert!(body == large_body(), "splice {splice:?}: the body differs");
        }
        assert_eq!(upstream.connections(), 1, "splice {splice:?}");
    }
}

/// With `auto`, the answer that starts alone on the lane is copied and those that start while it
/// streams (paused upstream) are spliced (`splice::Policy`); all of them arrive whole.
#[tokio::test]
async fn large_answers_copied_and_spliced_side_by_side_arrive_whole() {
    let _alone = SPLICING.lock().await;
    let (_upstream, proxy, resume) = behind_a_proxy_splicing(Splice::Auto).await;
    let before = spliced_bytes(&proxy).await;
    let mut first = get_anonymous(proxy.url("/large-paused")).await;
    // Its body has begun: from here on the lane counts it as streaming.
    let mut copied = first.chunk().await.unwrap().unwrap().to_vec();
    let others: Vec<_> = (0..3)
        .map(|_| tokio::spawn(plain_client().get(proxy.url("/large")).send()))
        .collect();
    for other in others {
        let body = other.await.unwrap().unwrap().bytes().await.unwrap();
        assert!(body == large_body(), "a spliced body differs");
    }
    assert_spliced(
        spliced_bytes(&proxy).await - before,
        3,
        "the three side by side",
    );
    assert!(
        copied.len() <= LARGE / 2,
        "the first answer was still paused"
    );
    resume.notify_one();
    while let Some(chunk) = first.chunk().await.unwrap() {
        copied.extend_from_slice(&chunk);
    }
    assert!(copied == large_body(), "the copied body differs");
    assert_spliced(
        spliced_bytes(&proxy).await - before,
        3,
        "the first answer, alone when it began, was copied",
    );
}

/// Chunked for the client, as hyper's server sends a body of unknown length: the client's
/// connection goes on, the upstream's is not reused.
#[tokio::test]
async fn large_answers_delimited_by_close_arrive_whole_and_chunked() {
    let _alone = SPLICING.lock().await;
    for splice in [Splice::Always, Splice::Never] {
        let (upstream, proxy, _) = behind_a_proxy_splicing(splice).await;
        let client = plain_client();
        for _ in 0..2 {
            let response = client
                .get(proxy.url("/large-until-close"))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.headers()["transfer-encoding"],
                "chunked",
                "splice {splice:?}"
            );
            assert!(response.headers().get("connection").is_none());
            let body = response.bytes().await.unwrap();
            assert!(body == large_body(), "splice {splice:?}: the body differs");
        }
        assert_eq!(upstream.connections(), 2, "splice {splice:?}");
    }
}

#[tokio::test]
async fn a_large_answer_cut_short_upstream_is_cut_short_for_the_client() {
    let _alone = SPLICING.lock().await;
    for splice in [Splice::Always, Splice::Never] {
        let (_upstream, proxy, _) = behind_a_proxy_splicing(splice).await;
        let raw = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            exchange_raw_bytes(
                proxy.addr,
                b"GET /fhir/large-cut HTTP/1.1\r\nHost: p\r\n\r\n",
            ),
        )
        .await
        .expect("the proxy closes the client's connection");
        let head_end = find(&raw, b"\r\n\r\n").expect("a response head") + 4;
        assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"), "splice {splice:?}");
        assert_eq!(
            raw.len() - head_end,
            LARGE / 3,
            "splice {splice:?}: what was sent"
        );
        assert!(
            raw[head_end..] == large_body()[..LARGE / 3],
            "splice {splice:?}"
        );
        // The proxy carries on.
        let response = get_anonymous(proxy.url("/large")).await;
        assert_eq!(
            response.bytes().await.unwrap().len(),
            LARGE,
            "splice {splice:?}"
        );
    }
}

#[tokio::test]
async fn a_client_leaving_in_the_middle_of_a_large_answer_harms_nothing() {
    let _alone = SPLICING.lock().await;
    for splice in [Splice::Always, Splice::Never] {
        let (upstream, proxy, _) = behind_a_proxy_splicing(splice).await;
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET /fhir/large HTTP/1.1\r\nHost: p\r\n\r\n")
            .await
            .unwrap();
        let mut start = [0u8; 64 * 1024];
        stream.read_exact(&mut start).await.unwrap();
        drop(stream);
        for _ in 0..2 {
            let response = get_anonymous(proxy.url("/large")).await;
            let body = response.bytes().await.unwrap();
            assert!(body == large_body(), "splice {splice:?}: the body differs");
        }
        // Whether the abandoned answer's connection was reused depends on how much of the body
        // the sockets' buffers took before the client left: if it was, it had been read to the
        // end (the bodies above are whole, nothing of the first answer leaked into them).
        assert!(upstream.connections() <= 2, "splice {splice:?}");
    }
}

#[tokio::test]
async fn answers_delimited_by_close_reach_the_client_chunked() {
    let (upstream, proxy, _) = behind_a_proxy().await;
    // Two on one connection: the first answer did not end it.
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/until-close HTTP/1.1\r\nHost: p\r\n\r\n\
          GET /fhir/until-close HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 200 OK\r\n"), "{raw}");
    assert_eq!(
        raw.matches("transfer-encoding: chunked\r\n").count(),
        2,
        "{raw}"
    );
    assert_eq!(
        raw.matches("\r\n\r\n12\r\nread until the end\r\n0\r\n\r\n")
            .count(),
        2,
        "{raw}"
    );
    for _ in 0..2 {
        let response = get_anonymous(proxy.url("/until-close")).await;
        assert_eq!(response.text().await.unwrap(), "read until the end");
    }
    assert_eq!(
        upstream.connections(),
        4,
        "such an upstream connection is never reused"
    );
}

#[tokio::test]
async fn informational_head_and_no_content_answers_are_framed_right() {
    let (upstream, proxy, _) = behind_a_proxy().await;
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/early-hints HTTP/1.1\r\nHost: p\r\n\r\n\
          HEAD /fhir/head HTTP/1.1\r\nHost: p\r\n\r\n\
          DELETE /fhir/no-content HTTP/1.1\r\nHost: p\r\n\r\n\
          GET /fhir/reason HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    let statuses: Vec<_> = raw
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &raw[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "204", "299"], "{raw}");
    assert!(!raw.contains("103"), "1xx answers are not forwarded: {raw}");
    assert!(
        raw.contains("content-length: 1234\r\n"),
        "HEAD keeps its length: {raw}"
    );
    assert!(raw.contains("HTTP/1.1 299 Quite Unusual\r\n"), "{raw}");
    assert!(raw.ends_with("\r\n\r\nok"), "{raw}");
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn broken_upstream_answers_are_502_or_a_closed_connection() {
    let (_upstream, proxy, _) = behind_a_proxy().await;
    for path in ["/gzip-coded", "/two-lengths", "/garbage"] {
        let response = get_anonymous(proxy.url(path)).await;
        let diagnostics = outcome(response, 502).await;
        assert!(!diagnostics.is_empty(), "{path}");
    }
    // The proxy's own error honours Accept on the fast path too.
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/garbage HTTP/1.1\r\nHost: p\r\nAccept: application/json\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    assert!(
        raw.to_ascii_lowercase()
            .contains("content-type: application/json\r\n")
            && raw.contains("OperationOutcome"),
        "{raw}"
    );
    // Cut short after the head was sent: the client sees its connection end early.
    let raw = exchange_raw(proxy.addr, b"GET /fhir/short HTTP/1.1\r\nHost: p\r\n\r\n").await;
    assert!(
        raw.starts_with("HTTP/1.1 200 OK\r\n") && raw.ends_with("\r\n\r\ncut"),
        "{raw}"
    );
    // And the proxy carries on.
    let response = get_anonymous(proxy.url("/chunked")).await;
    assert_eq!(response.text().await.unwrap(), "hello world");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_across_a_hand_over() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    // Two fast-path GETs, a POST with a body (the general path takes the connection over from
    // there), a GET, and the proxy's own metadata endpoint; all written at once.
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/Patient/1 HTTP/1.1\r\nHost: p\r\n\r\n\
          GET /fhir/Patient/2?x=1 HTTP/1.1\r\nHost: p\r\n\r\n\
          POST /fhir/Patient HTTP/1.1\r\nHost: p\r\nContent-Type: application/fhir+json\r\nContent-Length: 2\r\n\r\n{}\
          GET /fhir/Patient/3 HTTP/1.1\r\nHost: p\r\n\r\n\
          GET /fhir/metadata HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    let responses = split_responses(raw.as_bytes());
    let statuses: Vec<_> = responses.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 200, 200, 200, 200], "{raw}");
    assert!(responses[4].2.contains("CapabilityStatement"), "{raw}");
    let seen: Vec<_> = fake
        .received()
        .into_iter()
        .filter(|r| !r.uri.ends_with("/metadata"))
        .map(|r| {
            format!(
                "{} {} {}",
                r.method,
                r.uri,
                String::from_utf8_lossy(&r.body)
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            "GET /fhir/Patient/1 ",
            "GET /fhir/Patient/2?x=1 ",
            "POST /fhir/Patient {}",
            "GET /fhir/Patient/3 "
        ]
    );
    for (_, head, _) in &responses {
        assert!(
            head.to_ascii_lowercase().contains("x-request-id: "),
            "{head}"
        );
    }
}

#[tokio::test]
async fn heads_the_fast_path_does_not_take_are_answered_by_the_general_path() {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(TestProxy::config(&fake.url())).await;
    // Malformed: hyper's 400, not a 5xx and not a hang.
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/Patient HTTP/1.1\r\nNo colon here\r\n\r\n",
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    // HTTP/1.0, and a head of 40 KiB (over the fast path's 16 KiB): passed through all the same.
    let raw = exchange_raw(proxy.addr, b"GET /fhir/Patient/10 HTTP/1.0\r\n\r\n").await;
    assert!(
        raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"),
        "{raw}"
    );
    let big = format!(
        "GET /fhir/Patient/big HTTP/1.1\r\nHost: p\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    let raw = exchange_raw(proxy.addr, big.as_bytes()).await;
    assert!(
        raw.starts_with("HTTP/1.1 200"),
        "{}",
        &raw[..raw.len().min(200)]
    );
    // Targets with bytes outside the usual set, and absolute-form targets.
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/Patient?name=%22a%22&x={y} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(!raw.starts_with("HTTP/1.1 5"), "{raw}");
    let seen: Vec<_> = fake.received().into_iter().map(|r| r.uri).collect();
    assert!(seen.contains(&"/fhir/Patient/10".to_owned()), "{seen:?}");
    assert!(seen.contains(&"/fhir/Patient/big".to_owned()), "{seen:?}");
}

#[tokio::test]
async fn the_fast_path_can_be_turned_off() {
    let (upstream, _) = scripted().await;
    let mut config = TestProxy::config(&upstream.url());
    config.server.http1_fast_path = false;
    let proxy = TestProxy::start(config).await;
    let raw = exchange_raw(
        proxy.addr,
        b"GET /fhir/chunked HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
    )
    .await;
    // hyper decodes and re-encodes: the chunk extension does not survive, the body does.
    assert!(!raw.contains("note=1"), "{raw}");
    let response = get_anonymous(proxy.url("/chunked")).await;
    assert_eq!(response.text().await.unwrap(), "hello world");
}
