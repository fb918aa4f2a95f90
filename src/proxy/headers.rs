//! Header rules for a reverse proxy: hop-by-hop headers are removed in both directions
//! (RFC 9110 §7.6.1, plus the headers named in `Connection`), `X-Forwarded-For/-Proto/-Host` are
//! added or extended, and absolute upstream URLs in `Location` / `Content-Location` are rewritten to
//! the proxy's public base.

use std::net::IpAddr;

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// Hop-by-hop headers: RFC 9110 §7.6.1 names `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`,
/// `Transfer-Encoding` and `Upgrade`; `Trailer` and the `Proxy-Auth*` pair are connection-scoped
/// too (RFC 7230 §6.1, RFC 9110 §11.7).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authenticate"
            | "proxy-authorization"
    )
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none: one pass over the names, nothing removed.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Names listed in `Connection` (`keep-alive` and `close`, usually, which need no parsing).
    let mut drop: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|name| {
            !name.eq_ignore_ascii_case("close") && !name.eq_ignore_ascii_case("keep-alive")
        })
        .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
        .collect();
    drop.extend(headers.keys().filter(|name| is_hop_by_hop(name)).cloned());
    for name in drop {
        headers.remove(name);
    }
}

/// Adds the client to `X-Forwarded-For` (appending to a list an ingress already started) and sets
/// `X-Forwarded-Proto` / `X-Forwarded-Host` unless an ingress in front already set them.
pub fn add_forwarded(headers: &mut HeaderMap, client: Option<IpAddr>, scheme: &str) {
    if let Some(ip) = client {
        let value = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(existing) if !existing.trim().is_empty() => {
                HeaderValue::from_str(&format!("{existing}, {ip}")).ok()
            }
            _ => Some(ip_value(ip)),
        };
        if let Some(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    if !headers.contains_key(&X_FORWARDED_PROTO) {
        headers.insert(
            X_FORWARDED_PROTO,
            HeaderValue::from_static(scheme_value(scheme)),
        );
    }
    if !headers.contains_key(&X_FORWARDED_HOST) {
        if let Some(host) = headers.get(header::HOST).cloned() {
            headers.insert(X_FORWARDED_HOST, host);
        }
    }
}

/// An IP address as a header value; IPv4 (the usual case) without the formatting machinery.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        let digits = [octet / 100, octet / 10 % 10, octet % 10];
        let skip = if octet >= 100 {
            0
        } else if octet >= 10 {
            1
        } else {
            2
        };
        for digit in &digits[skip..] {
            text[len] = b'0' + digit;
            len += 1;
        }
    }
    HeaderValue::from_bytes(&text[..len]).expect("digits and dots are a valid header")
}

fn scheme_value(scheme: &str) -> &'static str {
    if scheme == "https" { "https" } else { "http" }
}

/// The first value of a comma-separated forwarding header (the one the outermost proxy set).
pub fn first_forwarded<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

/// Rewrites `Location` and `Content-Location` values that point into the upstream base.
pub fn rewrite_locations(headers: &mut HeaderMap, upstream_base: &str, public_base: &str) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(rewritten) = rebase(value, upstream_base, public_base) {
            if let Ok(value) = HeaderValue::from_str(&rewritten) {
                headers.insert(name, value);
            }
        }
    }
}

/// `url` moved from under `from` to under `to`, when it is under `from` (on a path boundary).
pub fn rebase(url: &str, from: &str, to: &str) -> Option<String> {
    let rest = url.strip_prefix(from)?;
    if rest.is_empty() || rest.starts_with(['/', '?', '#']) {
        Some(format!("{to}{rest}"))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        map
    }

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut map = headers(&[
            ("connection", "close, X-Custom-Hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("etag", "W/\"1\""),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        strip_hop_by_hop(&mut map);
        let names: Vec<_> = map.keys().map(|k| k.as_str().to_owned()).collect();
        assert_eq!(names, ["etag", "set-cookie"]);
        assert_eq!(map.get_all("set-cookie").iter().count(), 2);
    }

    #[test]
    fn forwarded_headers_extend_an_ingress_chain() {
        let mut map = headers(&[
            ("host", "proxy:8080"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        add_forwarded(&mut map, Some("127.0.0.1".parse().unwrap()), "http");
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "https", "kept from the ingress");
        assert_eq!(map["x-forwarded-host"], "proxy:8080");
    }

    #[test]
    fn ip_values_match_display() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.255",
            "9.99.100.1",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
    }

    #[test]
    fn rebase_respects_path_boundaries() {
        let from = "http://up:9/fhir";
        assert_eq!(
            rebase(
                "http://up:9/fhir/Patient/1/_history/2",
                from,
                "https://p/fhir"
            )
            .unwrap(),
            "https://p/fhir/Patient/1/_history/2"
        );
        assert_eq!(
            rebase("http://up:9/fhir", from, "https://p").unwrap(),
            "https://p"
        );
        assert_eq!(rebase("http://up:9/fhirx/Patient", from, "https://p"), None);
        assert_eq!(
            rebase("http://elsewhere/fhir/Patient", from, "https://p"),
            None
        );
    }
}
