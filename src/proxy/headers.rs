//! Header rules for a reverse proxy: hop-by-hop headers are removed in both directions
//! (RFC 9110 §7.6.1, plus the headers named in `Connection`), `X-Forwarded-For/-Proto/-Host` are
//! added or extended, and absolute upstream URLs in `Location` / `Content-Location` are rewritten to
//! the proxy's public base. Both passthrough paths frame an upstream answer by the same rules
//! ([`ResponseFraming`], RFC 9112 §6.3) and refuse a request with two `Host` headers
//! ([`check_request_head`]).

use std::net::IpAddr;

use axum::http::header::Entry;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// Hop-by-hop headers: RFC 9110 §7.6.1 names `Connection`, `Proxy-Connection`, `Keep-Alive`, `TE`,
/// `Transfer-Encoding` and `Upgrade`; `Trailer` and the `Proxy-Auth*` pair are connection-scoped
/// too (RFC 7230 §6.1, RFC 9110 §11.7). Names in any case.
#[inline]
pub fn is_hop_by_hop(name: &str) -> bool {
    Name::of(name).is_hop_by_hop()
}

/// The header names the proxy treats specially, told apart by length first: every header of
/// every passthrough request and response goes through this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Name {
    /// Hop-by-hop ([`is_hop_by_hop`]) other than the three below.
    Hop,
    Connection,
    TransferEncoding,
    Upgrade,
    ContentLength,
    Expect,
    Host,
    Date,
    ForwardedFor,
    ForwardedProto,
    ForwardedHost,
    RequestId,
    /// `Location` or `Content-Location`.
    Location,
    Other,
}

impl Name {
    #[inline]
    pub fn of(name: &str) -> Self {
        let is = |candidate: &str| name.eq_ignore_ascii_case(candidate);
        match name.len() {
            2 if is("te") => Name::Hop,
            4 if is("host") => Name::Host,
            4 if is("date") => Name::Date,
            6 if is("expect") => Name::Expect,
            7 if is("upgrade") => Name::Upgrade,
            7 if is("trailer") => Name::Hop,
            8 if is("location") => Name::Location,
            10 if is("connection") => Name::Connection,
            10 if is("keep-alive") => Name::Hop,
            12 if is("x-request-id") => Name::RequestId,
            14 if is("content-length") => Name::ContentLength,
            15 if is("x-forwarded-for") => Name::ForwardedFor,
            16 if is("x-forwarded-host") => Name::ForwardedHost,
            16 if is("content-location") => Name::Location,
            16 if is("proxy-connection") => Name::Hop,
            17 if is("x-forwarded-proto") => Name::ForwardedProto,
            17 if is("transfer-encoding") => Name::TransferEncoding,
            18 if is("proxy-authenticate") => Name::Hop,
            19 if is("proxy-authorization") => Name::Hop,
            _ => Name::Other,
        }
    }

    #[inline]
    pub fn is_hop_by_hop(self) -> bool {
        matches!(
            self,
            Name::Hop | Name::Connection | Name::TransferEncoding | Name::Upgrade
        )
    }
}

/// A request head's fields that the proxy refuses whatever the path: more than one `Host`
/// (RFC 9112 §3.2: a server MUST answer 400). hyper accepts it, and the fast path leaves such a
/// request to hyper, so this check is the one for both paths.
pub fn check_request_head(headers: &HeaderMap) -> Result<(), &'static str> {
    if headers.get_all(header::HOST).iter().nth(1).is_some() {
        return Err("the request has more than one Host header");
    }
    Ok(())
}

/// How an upstream answer's body is delimited and what the client is told of its length: the
/// rules of hyper's client (RFC 9112 §6.3) with the proxy's own on top, applied alike by both
/// passthrough paths. Fed every header of the answer ([`Self::add`]), then [`Self::decide`]d.
#[derive(Debug, Default)]
pub struct ResponseFraming {
    /// A `Transfer-Encoding` header was seen.
    coded: bool,
    /// Its codings are exactly one `chunked` (in any case), over all the header lines.
    only_chunked: bool,
    /// `Content-Length` headers were seen.
    has_length: bool,
    /// Their one value, when they all parse and agree.
    length: Option<u64>,
}

/// Where the body ends, as [`ResponseFraming::decide`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// HEAD, 204, 304: no body whatever the headers say.
    Empty,
    Length(u64),
    Chunked,
    /// When the upstream closes the connection.
    Close,
}

impl ResponseFraming {
    /// Takes one header into account.
    #[inline]
    pub fn add(&mut self, name: Name, value: &[u8]) {
        match name {
            Name::TransferEncoding => {
                for coding in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if coding.is_empty() {
                        continue;
                    }
                    // The first coding makes it "only chunked" if it is chunked; any other unmakes it.
                    self.only_chunked = !self.coded && coding.eq_ignore_ascii_case(b"chunked");
                    self.coded = true;
                }
                // A header line with no coding at all still counts as a coding header.
                self.coded = true;
            }
            Name::ContentLength => {
                // As hyper: comma-separated values, digits only, all equal.
                let mut agreed = self.length;
                let mut valid = !self.has_length || agreed.is_some();
                for part in value.split(|&b| b == b',') {
                    match parse_digits(part.trim_ascii()) {
                        Some(n) if agreed.is_none_or(|a| a == n) => agreed = Some(n),
                        _ => valid = false,
                    }
                }
                self.has_length = true;
                self.length = agreed.filter(|_| valid);
            }
            _ => {}
        }
    }

    /// Where the body of an answer with `status` (to a HEAD request if `head`; in HTTP/1.0 if
    /// `http10`) ends, and the `Content-Length` the client is given (`None`: none). An error is a
    /// 502: an answer the proxy cannot forward faithfully.
    ///
    /// - Transfer-Encoding and Content-Length: the coding frames the body and the length is
    ///   dropped (RFC 9112 §6.3: an intermediary MUST remove it). Dropped, not refused: hyper's
    ///   client reads the body by the coding, and some servers send both harmlessly.
    /// - A coding other than `chunked` alone is refused: hyper would read `gzip` until the close
    ///   and `gzip, chunked` de-chunked, and the proxy drops `Transfer-Encoding` (hop-by-hop), so
    ///   the client would get coded bytes with nothing to say so.
    /// - Content-Length values that disagree or are not digits are refused where they frame
    ///   the body (as hyper does) and dropped where they do not (HEAD, 204, 304).
    /// - 101 is refused: no passthrough request asks for a protocol switch (`Upgrade` is
    ///   hop-by-hop), and hyper's server would send the client a bare 101 and close.
    pub fn decide(
        &self,
        status: u16,
        head: bool,
        http10: bool,
    ) -> Result<(BodyEnd, Option<u64>), &'static str> {
        if status == 101 {
            return Err("an unasked protocol switch");
        }
        if !(100..=999).contains(&status) {
            return Err("a status code out of range");
        }
        let length = if self.coded { None } else { self.length };
        if status == 204 || status == 304 {
            // hyper's server sends no Content-Length with these.
            return Ok((BodyEnd::Empty, None));
        }
        if head {
            return Ok((BodyEnd::Empty, length));
        }
        if self.coded {
            if http10 {
                return Err("Transfer-Encoding in an HTTP/1.0 answer");
            }
            if !self.only_chunked {
                return Err("a transfer coding other than chunked");
            }
            return Ok((BodyEnd::Chunked, None));
        }
        match (self.has_length, self.length) {
            (true, Some(n)) => Ok((BodyEnd::Length(n), Some(n))),
            (true, None) => Err("an invalid Content-Length"),
            (false, _) => Ok((BodyEnd::Close, None)),
        }
    }

    /// [`Self::decide`] for a hyper response, whose `Content-Length` is made what it says (one
    /// value, or none).
    pub fn settle(
        status: u16,
        head: bool,
        version: axum::http::Version,
        headers: &mut HeaderMap,
    ) -> Result<(), &'static str> {
        let mut framing = Self::default();
        for value in headers.get_all(header::TRANSFER_ENCODING) {
            framing.add(Name::TransferEncoding, value.as_bytes());
        }
        for value in headers.get_all(header::CONTENT_LENGTH) {
            framing.add(Name::ContentLength, value.as_bytes());
        }
        let http10 = version == axum::http::Version::HTTP_10;
        let (_, length) = framing.decide(status, head, http10)?;
        if framing.has_length {
            let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
            let already = match (length, values.next(), values.next()) {
                (Some(n), Some(value), None) => is_canonical(value.as_bytes(), n),
                _ => false,
            };
            match length {
                _ if already => {}
                Some(n) => {
                    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                None => {
                    headers.remove(header::CONTENT_LENGTH);
                }
            }
        }
        Ok(())
    }
}

/// `value` is `n` written as [`HeaderValue::from`] writes it.
fn is_canonical(value: &[u8], n: u64) -> bool {
    parse_digits(value) == Some(n) && (value.len() == 1 || value[0] != b'0')
}

/// Decimal digits as a number, as hyper reads a Content-Length: at least one digit, nothing
/// else, no overflow (and below hyper's own maximum, `u64::MAX - 2`).
pub fn parse_digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    let mut n: u64 = 0;
    for &b in value {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
    }
    (n < u64::MAX - 1).then_some(n)
}

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages have none, or only `Connection: keep-alive`: found in one pass over the names,
    // removed without allocating.
    let mut present: [Option<HeaderName>; 9] = Default::default();
    let mut count = 0;
    for name in headers.keys().filter(|name| is_hop_by_hop(name.as_str())) {
        if count < present.len() {
            present[count] = Some(name.clone());
            count += 1;
        }
    }
    if count == 0 {
        return;
    }
    // Other names listed in `Connection` (not `keep-alive` or `close`, the usual values).
    let named: Vec<HeaderName> = headers
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
    for name in named.into_iter().chain(present.into_iter().flatten()) {
        headers.remove(name);
    }
}

/// Adds the client to `X-Forwarded-For` (appending to a list an ingress already started) and sets
/// `X-Forwarded-Proto` / `X-Forwarded-Host` (from `host`, the request's `Host`) unless an ingress
/// in front already set them. Returns the values they have now, the proxy's public origin as the
/// client sees it (see [`public_base`]).
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: Option<IpAddr>,
    scheme: &str,
    host: Option<HeaderValue>,
) -> (HeaderValue, Option<HeaderValue>) {
    if let Some(ip) = client {
        match headers.entry(X_FORWARDED_FOR) {
            Entry::Occupied(mut chain) => {
                let appended = match chain.get().to_str() {
                    Ok(existing) if !existing.trim().is_empty() => {
                        HeaderValue::from_str(&format!("{existing}, {ip}")).ok()
                    }
                    _ => Some(ip_value(ip)),
                };
                if let Some(value) = appended {
                    chain.insert(value);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(ip_value(ip));
            }
        }
    }
    let proto = headers
        .entry(X_FORWARDED_PROTO)
        .or_insert_with(|| HeaderValue::from_static(scheme_value(scheme)))
        .clone();
    let host = match headers.entry(X_FORWARDED_HOST) {
        Entry::Occupied(set) => Some(set.get().clone()),
        Entry::Vacant(slot) => host.map(|host| slot.insert(host).clone()),
    };
    (proto, host)
}

/// The proxy's public FHIR base URL (no trailing slash): the configured one (`server.public_url`)
/// when set, otherwise derived from a request: the scheme from `X-Forwarded-Proto` (the first of a
/// chain) or the connection's, the host from `X-Forwarded-Host` or `Host`, then the base path.
pub fn public_base(
    configured: Option<&str>,
    forwarded_proto: Option<&str>,
    host: Option<&str>,
    scheme: &'static str,
    base_path: &str,
) -> String {
    if let Some(configured) = configured {
        return configured.to_owned();
    }
    let scheme = forwarded_proto
        .map(first_of_chain)
        .filter(|p| matches!(*p, "http" | "https"))
        .unwrap_or(scheme);
    let host = host
        .map(first_of_chain)
        .filter(|h| is_host(h))
        .unwrap_or("localhost");
    // Built for passthrough responses with a Location: pieces pushed, not formatted.
    let mut base = String::with_capacity(scheme.len() + 3 + host.len() + base_path.len());
    base.push_str(scheme);
    base.push_str("://");
    base.push_str(host);
    base.push_str(base_path);
    base
}

/// The first value of a comma-separated forwarding chain (the one the outermost proxy set).
fn first_of_chain(value: &str) -> &str {
    value.split(',').next().map(str::trim).unwrap_or_default()
}

/// A Host header value that is safe to put into URLs: host[:port], no path or user info.
fn is_host(value: &str) -> bool {
    !value.is_empty()
        && value.len() <= 255
        && value.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
        })
}

/// An IP address as a header value; IPv4 (the usual case) without the formatting machinery.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let mut text = Vec::with_capacity(15);
    write_ip(&mut text, ip);
    HeaderValue::from_bytes(&text).expect("an IP address is a valid header")
}

/// Appends an IP address as text.
pub fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    let IpAddr::V4(v4) = ip else {
        out.extend_from_slice(ip.to_string().as_bytes());
        return;
    };
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        if octet >= 100 {
            out.push(b'0' + octet / 100);
        }
        if octet >= 10 {
            out.push(b'0' + octet / 10 % 10);
        }
        out.push(b'0' + octet % 10);
    }
}

/// What `HeaderValue::to_str` accepts: visible ASCII, space and tab.
#[inline]
pub fn is_visible_text(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (32..127).contains(&b))
}

/// Appends `name: value` and its line end to a message head being written.
#[inline]
pub fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends a `Date` header with the current time (RFC 9110 §6.6.1).
pub fn put_date(out: &mut Vec<u8>) {
    let now = httpdate::fmt_http_date(std::time::SystemTime::now());
    put_header(out, b"date", now.as_bytes());
}

fn scheme_value(scheme: &str) -> &'static str {
    if scheme == "https" { "https" } else { "http" }
}

/// The first value of a comma-separated forwarding header (the one the outermost proxy set).
pub fn first_forwarded<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(first_of_chain)
        .filter(|v| !v.is_empty())
}

/// Rewrites `Location` and `Content-Location` values that point into the upstream base; the
/// public base is only worked out when there is one.
pub fn rewrite_locations(
    headers: &mut HeaderMap,
    upstream_base: &str,
    public_base: impl FnOnce() -> String,
) {
    let mut public_base = Some(public_base);
    let mut base = String::new();
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        if let Some(make) = public_base.take() {
            base = make();
        }
        if let Some(rewritten) = rebase(value, upstream_base, &base)
            && let Ok(value) = HeaderValue::from_str(&rewritten)
        {
            headers.insert(name, value);
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

    /// RFC 9110 §7.6.1 and the connection-scoped `Trailer` and `Proxy-Auth*`.
    const HOP_BY_HOP: [&str; 9] = [
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    ];

    #[test]
    fn hop_by_hop_names_are_told_apart_in_any_case() {
        let names = [
            "Connection",
            "proxy-connection",
            "Keep-Alive",
            "TE",
            "trailer",
            "Transfer-Encoding",
            "upgrade",
            "Proxy-Authenticate",
            "proxy-authorization",
            "content-length",
            "Host",
            "date",
            "expect",
            "x-forwarded-for",
            "X-Forwarded-Host",
            "x-forwarded-proto",
            "X-Request-Id",
            "Location",
            "content-location",
            "etag",
            "set-cookie",
            "te-x",
            "x-te",
            "upgrade-insecure-requests",
            "content-type",
            "accept",
            "authorization",
            "connection-x",
            "trailers",
            "prefer",
            "if-none-match",
            "",
        ];
        for name in names {
            assert_eq!(
                is_hop_by_hop(name),
                HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name)),
                "{name}"
            );
        }
        assert_eq!(Name::of("CONTENT-LOCATION"), Name::Location);
        assert_eq!(Name::of("x-forwarded-hosts"), Name::Other);
    }

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
        let host = map.get("host").cloned();
        let (proto, host) =
            add_forwarded(&mut map, Some("127.0.0.1".parse().unwrap()), "http", host);
        assert_eq!(proto, "https");
        assert_eq!(host.unwrap(), "proxy:8080");
        assert_eq!(map["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(map["x-forwarded-proto"], "https", "kept from the ingress");
        assert_eq!(map["x-forwarded-host"], "proxy:8080");
    }

    #[test]
    fn host_values_with_url_syntax_are_refused() {
        assert!(is_host("proxy.example.org:8443"));
        assert!(is_host("[::1]:8080"));
        assert!(!is_host("evil.example/path"));
        assert!(!is_host("user@host"));
        assert!(!is_host(""));
    }

    #[test]
    fn public_base_takes_the_first_forwarded_values() {
        let base = |proto, host| public_base(None, proto, host, "http", "/fhir");
        assert_eq!(base(None, Some("p:8080")), "http://p:8080/fhir");
        assert_eq!(
            base(Some("https, http"), Some("a.org, b")),
            "https://a.org/fhir"
        );
        assert_eq!(
            base(Some("gopher"), Some("evil/x")),
            "http://localhost/fhir"
        );
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

    #[test]
    fn content_lengths_are_digits_only() {
        assert_eq!(parse_digits(b"0"), Some(0));
        assert_eq!(parse_digits(b"1234"), Some(1234));
        assert_eq!(parse_digits(b"007"), Some(7));
        for bad in [
            &b""[..],
            b"-1",
            b"+1",
            b"1 2",
            b"0x10",
            b"99999999999999999999",
            b"18446744073709551615",
        ] {
            assert_eq!(parse_digits(bad), None, "{bad:?}");
        }
    }

    fn framing(
        status: u16,
        head: bool,
        pairs: &[(&str, &str)],
    ) -> Result<(BodyEnd, Option<u64>), &'static str> {
        let mut framing = ResponseFraming::default();
        for (name, value) in pairs {
            framing.add(Name::of(name), value.as_bytes());
        }
        framing.decide(status, head, false)
    }

    #[test]
    fn transfer_encoding_frames_the_body_and_drops_the_length() {
        let te_cl = [("transfer-encoding", "chunked"), ("content-length", "3")];
        assert_eq!(framing(200, false, &te_cl), Ok((BodyEnd::Chunked, None)));
        assert_eq!(framing(200, true, &te_cl), Ok((BodyEnd::Empty, None)));
        for codings in [
            &["gzip"][..],
            &["gzip, chunked"],
            &["chunked, gzip"],
            &["chunked", "chunked"],
            &["chunked, chunked"],
            &[""],
        ] {
            let pairs: Vec<_> = codings.iter().map(|c| ("Transfer-Encoding", *c)).collect();
            assert!(framing(200, false, &pairs).is_err(), "{codings:?}");
        }
        assert_eq!(
            framing(200, false, &[("transfer-encoding", " Chunked ")]),
            Ok((BodyEnd::Chunked, None))
        );
    }

    #[test]
    fn lengths_must_agree_where_they_frame_the_body() {
        let two = [("content-length", "2"), ("content-length", "2, 2")];
        assert_eq!(framing(200, false, &two), Ok((BodyEnd::Length(2), Some(2))));
        let differ = [("content-length", "2"), ("content-length", "3")];
        assert!(framing(200, false, &differ).is_err());
        assert!(framing(200, false, &[("content-length", "2x")]).is_err());
        // Where they do not frame it, they are dropped instead.
        assert_eq!(framing(200, true, &differ), Ok((BodyEnd::Empty, None)));
        assert_eq!(framing(200, true, &two), Ok((BodyEnd::Empty, Some(2))));
        assert_eq!(
            framing(304, false, &[("content-length", "9")]),
            Ok((BodyEnd::Empty, None))
        );
        assert_eq!(framing(200, false, &[]), Ok((BodyEnd::Close, None)));
        assert!(framing(101, false, &[]).is_err());
    }

    #[test]
    fn settled_lengths_are_one_number() {
        let mut map = headers(&[("content-length", "02"), ("content-length", "2")]);
        ResponseFraming::settle(200, false, axum::http::Version::HTTP_11, &mut map).unwrap();
        assert_eq!(
            map.get_all("content-length").iter().collect::<Vec<_>>(),
            ["2"]
        );
        let mut map = headers(&[("transfer-encoding", "chunked"), ("content-length", "2")]);
        ResponseFraming::settle(200, false, axum::http::Version::HTTP_11, &mut map).unwrap();
        assert!(map.get("content-length").is_none());
    }

    #[test]
    fn a_second_host_is_refused() {
        assert!(check_request_head(&headers(&[("host", "a")])).is_ok());
        assert!(check_request_head(&headers(&[("host", "a"), ("host", "a")])).is_err());
    }
}
