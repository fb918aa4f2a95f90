//! Passthrough: methods, paths, bodies, headers, errors, streaming.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

use testkit::get_anonymous;
use testkit::{FakeFhir, TestProxy, outcome, plain_client};

/// A proxy in front of a fresh fake; `fast`: with the HTTP/1.1 fast path on (the default), or
/// with every request on the general path.
async fn setup(fast: bool) -> (testkit::fake_fhir::RunningFake, TestProxy) {
    let fake = FakeFhir::new().start().await;
    let proxy = TestProxy::start(config(&fake.url(), fast)).await;
    (fake, proxy)
}

fn config(upstream: &str, fast: bool) -> fhir_bulk_proxy::config::Config {
    let mut config = TestProxy::config(upstream);
    config.server.http1_fast_path = fast;
    config
}

/// Both ways bodiless GETs can be served: the fast path and the general one.
const BOTH: [bool; 2] = [true, false];

#[tokio::test]
async fn every_method_arrives_with_path_and_query_byte_for_byte() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast).await;
        let paths = [
            "/Patient/123/$everything?_count=2&_count=3",
            "/Observation/_history?_since=2020-01-01T00:00:00%2B01:00",
            "/Patient?name:exact=Ann%20Lee&identifier=http%3A%2F%2Fx%7C1&_sort=-date",
            "/Patient/$match",
            "/Group/7/$member-add?x=%E2%9C%93",
        ];
        let methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
        for (i, method) in methods.iter().enumerate() {
            let path = paths[i % paths.len()];
            let response = plain_client()
                .request(method.parse().unwrap(), proxy.url(path))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "{method} {path}");
            let seen = fake.received().pop().unwrap();
            assert_eq!(seen.method, *method);
            assert_eq!(seen.uri, format!("/fhir{path}"), "{method}");
        }
    }
}

#[tokio::test]
async fn request_bodies_arrive_whole_with_either_framing() {
    let (fake, proxy) = setup(true).await;
    let body = r#"{"resourceType":"Patient","name":[{"family":"Łódź"}]}"#;
    let response = plain_client()
        .post(proxy.url("/Patient"))
        .header("content-type", "application/fhir+json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = fake.received().pop().unwrap();
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(
        seen.header("content-length"),
        Some(body.len().to_string().as_str())
    );

    let chunks: Vec<Result<Bytes, std::io::Error>> = vec![
        Ok(Bytes::from_static(b"part one, ")),
        Ok(Bytes::from_static(b"part two")),
    ];
    let response = plain_client()
        .put(proxy.url("/Binary/1"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let seen = fake.received().pop().unwrap();
    assert_eq!(seen.body, &b"part one, part two"[..]);
    assert_eq!(seen.header("transfer-encoding"), Some("chunked"));
}

#[tokio::test]
async fn compressed_bodies_and_end_to_end_headers_are_untouched() {
    let (fake, proxy) = setup(true).await;
    let gzip_bytes: &[u8] = &[
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xff, 0x00,
    ];
    let response = plain_client()
        .post(proxy.url("/Binary"))
        .header("x-fake-mirror", "1")
        .header("content-encoding", "gzip")
        .header("accept-encoding", "gzip")
        .header("if-match", "W/\"3\"")
        .header("if-none-match", "W/\"4\"")
        .header("prefer", "return=representation")
        .header("authorization", "Bearer upstream-own-token")
        .header("x-fake-response-header", "Content-Encoding: gzip")
        .header("x-fake-response-header", "Set-Cookie: a=1; Path=/")
        .header("x-fake-response-header", "Set-Cookie: b=2; Path=/")
        .header("x-fake-response-header", "ETag: W/\"5\"")
        .header(
            "x-fake-response-header",
            "Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT",
        )
        .header("x-fake-status", "201")
        .body(gzip_bytes)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let headers = response.headers().clone();
    assert_eq!(headers["content-encoding"], "gzip");
    assert_eq!(headers.get_all("set-cookie").iter().count(), 2);
    assert_eq!(headers["etag"], "W/\"5\"");
    assert_eq!(headers["last-modified"], "Tue, 01 Dec 2026 10:00:00 GMT");
    assert_eq!(
        response.bytes().await.unwrap(),
        gzip_bytes,
        "compressed body untouched"
    );
    let seen = fake.received().pop().unwrap();
    assert_eq!(seen.body, gzip_bytes);
    for (name, value) in [
        ("content-encoding", "gzip"),
        ("accept-encoding", "gzip"),
        ("if-match", "W/\"3\""),
        ("if-none-match", "W/\"4\""),
        ("prefer", "return=representation"),
        ("authorization", "Bearer upstream-own-token"),
    ] {
        assert_eq!(seen.header(name), Some(value), "{name}");
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast).await;
        let response = plain_client()
            .get(proxy.url("/Patient"))
            .header("connection", "x-private-hop")
            .header("x-private-hop", "secret")
            .header("te", "trailers")
            .header("proxy-authorization", "Basic abc")
            .header("x-fake-response-header", "Connection: x-upstream-hop")
            .header("x-fake-response-header", "X-Upstream-Hop: 1")
            .header("x-fake-response-header", "Keep-Alive: timeout=5")
            .header("x-fake-response-header", "Proxy-Authenticate: Basic")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for name in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
            assert!(
                response.headers().get(name).is_none(),
                "{name} reached the client"
            );
        }
        let seen = fake.received().pop().unwrap();
        for name in ["x-private-hop", "te", "proxy-authorization"] {
            assert_eq!(seen.header(name), None, "{name} reached the upstream");
        }
        assert_ne!(seen.header("connection"), Some("x-private-hop"));

        // Without a `Connection` header that names others (the fast path takes such requests).
        let response = plain_client()
            .get(proxy.url("/Patient"))
            .header("te", "trailers")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic abc")
            .header("x-fake-response-header", "Connection: x-upstream-hop")
            .header("x-fake-response-header", "X-Upstream-Hop: 1")
            .header("x-fake-response-header", "Proxy-Authenticate: Basic")
            .header("x-fake-response-header", "Trailer: X-Sum")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for name in ["x-upstream-hop", "proxy-authenticate", "trailer"] {
            assert!(
                response.headers().get(name).is_none(),
                "{name} reached the client"
            );
        }
        let seen = fake.received().pop().unwrap();
        for name in ["te", "keep-alive", "proxy-authorization"] {
            assert_eq!(seen.header(name), None, "{name} reached the upstream");
        }
    }
}

#[tokio::test]
async fn forwarded_headers_are_added_and_extended() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast).await;
        get_anonymous(proxy.url("/Patient")).await;
        let seen = fake.received().pop().unwrap();
        assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
        assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
        assert_eq!(
            seen.header("x-forwarded-host"),
            Some(proxy.addr.to_string().as_str())
        );
        assert_eq!(
            seen.header("host"),
            Some(fake.addr.to_string().as_str()),
            "Host is the upstream's"
        );

        plain_client()
            .get(proxy.url("/Patient"))
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-proto", "https")
            .header("x-forwarded-host", "fhir.example.org")
            .send()
            .await
            .unwrap();
        let seen = fake.received().pop().unwrap();
        assert_eq!(
            seen.header("x-forwarded-for"),
            Some("203.0.113.7, 127.0.0.1")
        );
        assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
        assert_eq!(seen.header("x-forwarded-host"), Some("fhir.example.org"));
    }
}

#[tokio::test]
async fn upstream_locations_are_rewritten_to_the_public_base() {
    let (fake, proxy) = setup(true).await;
    let upstream_location = format!("{}/Patient/9/_history/1", fake.url());
    let response = plain_client()
        .post(proxy.url("/Patient"))
        .header("x-fake-status", "201")
        .header(
            "x-fake-response-header",
            format!("Location: {upstream_location}"),
        )
        .header(
            "x-fake-response-header",
            format!("Content-Location: {upstream_location}"),
        )
        .send()
        .await
        .unwrap();
    let expected = proxy.url("/Patient/9/_history/1");
    assert_eq!(response.headers()["location"], expected.as_str());
    assert_eq!(response.headers()["content-location"], expected.as_str());

    // Behind an ingress, the public base comes from X-Forwarded-*.
    let response = plain_client()
        .post(proxy.url("/Patient"))
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "fhir.example.org")
        .header(
            "x-fake-response-header",
            format!("Location: {upstream_location}"),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["location"],
        "https://fhir.example.org/fhir/Patient/9/_history/1"
    );
}

#[tokio::test]
async fn public_url_and_base_path_translate_paths() {
    for fast in BOTH {
        let fake = FakeFhir::new().base("/api/r4").start().await;
        let mut config = config(&fake.url(), fast);
        config.server.public_url = Some("https://fhir.example.org/fhir".into());
        let proxy = TestProxy::start(config).await;
        let response = plain_client()
            .get(format!("http://{}/fhir/Patient?_id=1", proxy.addr))
            .header(
                "x-fake-response-header",
                format!("Location: {}/Patient/1", fake.url()),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            response.headers()["location"],
            "https://fhir.example.org/fhir/Patient/1"
        );
        assert_eq!(fake.received().pop().unwrap().uri, "/api/r4/Patient?_id=1");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_with_operation_outcome() {
    for fast in BOTH {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let proxy = TestProxy::start(config(&format!("http://127.0.0.1:{port}/fhir"), fast)).await;
        let response = get_anonymous(proxy.url("/Patient")).await;
        assert!(outcome(response, 502).await.contains("unreachable"));
    }
}

#[tokio::test]
async fn silent_upstream_is_504_with_operation_outcome() {
    for fast in BOTH {
        let fake = FakeFhir::new().start().await;
        let mut config = config(&fake.url(), fast);
        config.upstream.request_timeout_ms = 300;
        let proxy = TestProxy::start(config).await;
        let started = std::time::Instant::now();
        let response = plain_client()
            .get(proxy.url("/Patient"))
            .header("x-fake-delay-ms", "3000")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 504);
        assert!(started.elapsed() < Duration::from_secs(2));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["issue"][0]["code"], "timeout");
    }
}

#[tokio::test]
async fn request_ids_are_kept_or_made_and_forwarded() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast).await;
        let response = plain_client()
            .get(proxy.url("/Patient"))
            .header("x-request-id", "req-42")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["x-request-id"], "req-42");
        assert_eq!(
            fake.received().pop().unwrap().header("x-request-id"),
            Some("req-42")
        );

        let response = get_anonymous(proxy.url("/Patient")).await;
        let made = response.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(made.len() >= 16, "{made}");
        assert_eq!(
            fake.received().pop().unwrap().header("x-request-id"),
            Some(made.as_str())
        );
        let again = get_anonymous(proxy.url("/Patient")).await;
        assert_ne!(
            again.headers()["x-request-id"].to_str().unwrap(),
            made,
            "ids are unique"
        );
    }
}

#[tokio::test]
async fn request_bodies_are_streamed_not_buffered() {
    let (fake, proxy) = setup(true).await;
    let fake = std::sync::Arc::new(fake);
    let gate = fake.clone();
    // The second chunk is only produced once the upstream has seen the first: a proxy that
    // buffered the whole body would wait forever.
    let body = futures_util::stream::unfold(0, move |step| {
        let gate = gate.clone();
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 1000])), 1)),
                1 => {
                    gate.upload_first_chunk_seen().await;
                    Some((Ok(Bytes::from(vec![b'y'; 500])), 2))
                }
                _ => None,
            }
        }
    });
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        plain_client()
            .post(proxy.url("/probe-upload"))
            .body(reqwest::Body::wrap_stream(body))
            .send(),
    )
    .await
    .expect("the upload was held back by the proxy")
    .unwrap();
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["received_bytes"], 1500);
}

#[tokio::test]
async fn response_bodies_are_streamed_not_buffered() {
    for fast in BOTH {
        let (fake, proxy) = setup(fast).await;
        let mut response = get_anonymous(proxy.url("/probe-download")).await;
        let first = tokio::time::timeout(Duration::from_secs(10), response.chunk())
            .await
            .expect("the first chunk was held back by the proxy")
            .unwrap()
            .unwrap();
        assert_eq!(first, &b"first;"[..]);
        fake.release_download();
        let rest = response.bytes().await.unwrap();
        assert_eq!(rest, &b"second"[..]);
    }
}

#[tokio::test]
async fn large_responses_arrive_complete() {
    for fast in BOTH {
        let (_fake, proxy) = setup(fast).await;
        let size = 32 * 1024 * 1024 + 7;
        let response = plain_client()
            .get(proxy.url("/Binary/big"))
            .header("x-fake-body-bytes", size.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.bytes().await.unwrap().len(), size);
    }
}

#[tokio::test]
async fn lanes_serve_every_connection_each_lane_with_its_own_upstream_pool() {
    const LANES: usize = 3;
    let fake = FakeFhir::new().start().await;
    let mut config = config(&fake.url(), true);
    config.server.worker_threads = LANES;
    let proxy = TestProxy::start(config).await;
    // 12 client connections, one request at a time over all of them: whichever lane accepted a
    // connection serves it, and reuses that lane's one upstream connection.
    let clients: Vec<_> = (0..12).map(|_| plain_client()).collect();
    for round in 0..3 {
        for (i, client) in clients.iter().enumerate() {
            let response = client
                .get(proxy.url(&format!("/Patient/{round}-{i}")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let report: Value = response.json().await.unwrap();
            assert_eq!(report["uri"], format!("/fhir/Patient/{round}-{i}"));
        }
    }
    let received = fake.received();
    assert_eq!(received.len(), 36);
    let peers: std::collections::HashSet<_> = received.iter().map(|r| r.peer).collect();
    assert!(
        (1..=LANES).contains(&peers.len()),
        "sequential requests over {LANES} lanes used {} upstream connections",
        peers.len()
    );
}

#[tokio::test]
async fn upstream_connections_are_reused_and_closed_ones_replaced() {
    for fast in BOTH {
        let fake = FakeFhir::new().start().await;
        let mut config = config(&fake.url(), fast);
        // One lane: each lane keeps upstream connections of its own (see `lanes_...` below).
        config.server.worker_threads = 1;
        let proxy = TestProxy::start(config).await;
        // One client request at a time: every one goes on the same pooled upstream connection.
        for i in 0..20 {
            let response = get_anonymous(proxy.url(&format!("/Patient/{i}"))).await;
            assert_eq!(response.status(), 200);
            response.bytes().await.unwrap();
        }
        let peers: std::collections::HashSet<_> = fake.received().iter().map(|r| r.peer).collect();
        assert_eq!(peers.len(), 1, "20 sequential requests used {peers:?}");

        // An upstream that closes each connection after answering: no request fails on a dead one.
        for i in 0..5 {
            let response = plain_client()
                .get(proxy.url(&format!("/Patient/c{i}")))
                .header("x-fake-response-header", "Connection: close")
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                200,
                "request {i} after a closed connection"
            );
            assert!(response.headers().get("connection").is_none());
        }
        let closing: Vec<_> = fake.received().iter().skip(20).map(|r| r.peer).collect();
        let distinct: std::collections::HashSet<_> = closing.iter().collect();
        assert_eq!(
            distinct.len(),
            5,
            "each closed connection was replaced: {closing:?}"
        );

        // A response abandoned half-way does not leave a broken connection in the pool.
        let response = plain_client()
            .get(proxy.url("/Binary/big"))
            .header("x-fake-body-bytes", (8 * 1024 * 1024).to_string())
            .send()
            .await
            .unwrap();
        let mut stream = response.bytes_stream();
        futures_util::StreamExt::next(&mut stream)
            .await
            .unwrap()
            .unwrap();
        drop(stream);
        for i in 0..3 {
            let response = get_anonymous(proxy.url(&format!("/Patient/after{i}"))).await;
            assert_eq!(response.status(), 200);
            assert!(!response.bytes().await.unwrap().is_empty());
        }
    }
}
