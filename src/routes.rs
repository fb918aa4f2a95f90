//! The route table: the one description of what the proxy answers itself (DESIGN "One gate").
//!
//! Each [`Route`] names a path pattern and the methods the proxy serves on it. From this table
//! come the router (`http::router` mounts a handler per route and method), the passthrough fast
//! path's choice ([`RouteTable::owns`]: a request for an owned path is never forwarded as bytes),
//! the request metrics' route label, and the tests that send every method to every route with and
//! without a token. A path the table owns is never forwarded to the upstream: other methods get
//! 405 with an OperationOutcome. Everything else is passthrough, and every passthrough request
//! goes through one gate (`http::gate`, which applies `auth.passthrough`).
//!
//! Patterns are matched on the raw (still percent-encoded) path, segment by segment, as the
//! router (matchit) matches them: `{id}` is one non-empty segment, everything else is literal.

use axum::http::Method;
use percent_encoding::percent_decode_str;

/// What a route is for: the router maps each to its handlers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Healthz,
    Readyz,
    Metrics,
    Metadata,
    SystemExport,
    PatientExport,
    GroupExport,
    Status,
    File,
    Token,
    SmartConfiguration,
    Authorize,
}

/// Where a route's pattern is rooted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Root {
    /// The server's root (`/healthz`): outside the FHIR base.
    Server,
    /// Below the FHIR base (`{base}/metadata`).
    Base,
}

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (discovery, the token endpoint itself, health).
    Public,
    /// A valid access token of the proxy's (when `auth.enabled`).
    Token,
}

/// One route the proxy answers itself.
#[derive(Debug)]
pub struct Route {
    pub endpoint: Endpoint,
    pub root: Root,
    /// Path pattern under `root`: literal segments and `{name}` for one segment. The token
    /// endpoint's is `auth.token_path`, so it is written [`TOKEN_PATTERN`] here.
    pub pattern: &'static str,
    /// The methods the proxy serves (`HEAD` wherever `GET` is); others get 405.
    pub methods: &'static [Method],
    pub access: Access,
    /// Only mounted when the proxy is the authorization server (`auth.enabled`); otherwise the
    /// path is ordinary passthrough.
    pub needs_auth_enabled: bool,
    /// The `route` label of the request metrics.
    pub class: &'static str,
}

/// Stands for `auth.token_path` in [`ROUTES`].
pub const TOKEN_PATTERN: &str = "{token_path}";

const GET: &[Method] = &[Method::GET, Method::HEAD];
const GET_POST: &[Method] = &[Method::GET, Method::HEAD, Method::POST];

/// Every route of the proxy's own.
pub const ROUTES: &[Route] = &[
    Route {
        endpoint: Endpoint::Healthz,
        root: Root::Server,
        pattern: "/healthz",
        methods: GET,
        access: Access::Public,
        needs_auth_enabled: false,
        class: "ops",
    },
    Route {
        endpoint: Endpoint::Readyz,
        root: Root::Server,
        pattern: "/readyz",
        methods: GET,
        access: Access::Public,
        needs_auth_enabled: false,
        class: "ops",
    },
    Route {
        endpoint: Endpoint::Metrics,
        root: Root::Server,
        pattern: "/metrics",
        methods: GET,
        access: Access::Public,
        needs_auth_enabled: false,
        class: "ops",
    },
    Route {
        endpoint: Endpoint::Metadata,
        root: Root::Base,
        pattern: "/metadata",
        methods: GET,
        access: Access::Public,
        needs_auth_enabled: false,
        class: "metadata",
    },
    Route {
        endpoint: Endpoint::SystemExport,
        root: Root::Base,
        pattern: "/$export",
        methods: GET_POST,
        access: Access::Token,
        needs_auth_enabled: false,
        class: "export",
    },
    Route {
        endpoint: Endpoint::PatientExport,
        root: Root::Base,
        pattern: "/Patient/$export",
        methods: GET_POST,
        access: Access::Token,
        needs_auth_enabled: false,
        class: "export",
    },
    Route {
        endpoint: Endpoint::GroupExport,
        root: Root::Base,
        pattern: "/Group/{id}/$export",
        methods: GET_POST,
        access: Access::Token,
        needs_auth_enabled: false,
        class: "export",
    },
    Route {
        endpoint: Endpoint::Status,
        root: Root::Base,
        pattern: "/$export-status/{id}",
        methods: &[Method::GET, Method::HEAD, Method::DELETE],
        access: Access::Token,
        needs_auth_enabled: false,
        class: "status",
    },
    Route {
        endpoint: Endpoint::File,
        root: Root::Base,
        pattern: "/$export-file/{id}/{name}",
        methods: GET,
        access: Access::Token,
        needs_auth_enabled: false,
        class: "file",
    },
    Route {
        endpoint: Endpoint::Token,
        root: Root::Base,
        pattern: TOKEN_PATTERN,
        methods: &[Method::POST],
        access: Access::Public,
        needs_auth_enabled: true,
        class: "token",
    },
    Route {
        endpoint: Endpoint::SmartConfiguration,
        root: Root::Base,
        pattern: "/.well-known/smart-configuration",
        methods: GET,
        access: Access::Public,
        needs_auth_enabled: true,
        class: "smart",
    },
    Route {
        endpoint: Endpoint::Authorize,
        root: Root::Base,
        pattern: "/authorize",
        methods: GET_POST,
        access: Access::Public,
        needs_auth_enabled: true,
        class: "smart",
    },
];

/// A route of [`ROUTES`] placed at this server's paths.
#[derive(Debug)]
pub struct Mounted {
    pub route: &'static Route,
    /// The whole path pattern, as the router takes it (`/fhir/Group/{id}/$export`).
    pub path: String,
    /// Its segments after the leading `/`; `None` stands for a `{name}` segment.
    segments: Vec<Option<String>>,
    /// How many of `segments` come before the first `{name}` (all of them when there is none);
    /// `path` up to there is a literal prefix every match starts with.
    literal_segments: usize,
    /// The bytes of that prefix in `path`, its `/` included when a `{name}` follows.
    literal_len: usize,
}

impl Mounted {
    /// A concrete path this route answers, with `value` in every `{name}` segment.
    pub fn example(&self, value: &str) -> String {
        let mut path = String::new();
        for segment in &self.segments {
            path.push('/');
            path.push_str(segment.as_deref().unwrap_or(value));
        }
        path
    }

    /// Whether `path` (as written) is this route's. Called for every passthrough request on the
    /// fast path, so it compares bytes first: an all-literal pattern is one comparison, any other
    /// starts with its literal prefix.
    fn matches_raw(&self, path: &str) -> bool {
        if self.literal_segments == self.segments.len() {
            return path == self.path;
        }
        match path.strip_prefix(&self.path[..self.literal_len]) {
            Some(rest) => matches_segments(&self.segments[self.literal_segments..], rest, false),
            None => false,
        }
    }
}

/// Whether the `/`-separated `segments` match `pattern`; `decode` compares percent-decoded
/// literal segments.
fn matches_segments(pattern: &[Option<String>], segments: &str, decode: bool) -> bool {
    let mut segments = segments.split('/');
    for expected in pattern {
        match (segments.next(), expected) {
            (Some(got), Some(literal)) if got == literal => {}
            (Some(got), Some(literal)) if decode => {
                if percent_decode_str(got).ne(literal.bytes()) {
                    return false;
                }
            }
            (Some(got), None) if !got.is_empty() => {}
            _ => return false,
        }
    }
    segments.next().is_none()
}

/// The routes this server mounts, for its base path and authorization settings.
#[derive(Debug)]
pub struct RouteTable {
    mounted: Vec<Mounted>,
}

impl RouteTable {
    /// `base_path` is `""` or `/fhir`-like; `token_path` is `auth.token_path` (`/token`).
    pub fn new(base_path: &str, auth_enabled: bool, token_path: &str) -> Self {
        let mounted: Vec<Mounted> = ROUTES
            .iter()
            .filter(|route| auth_enabled || !route.needs_auth_enabled)
            .map(|route| {
                let pattern = match route.pattern {
                    TOKEN_PATTERN => token_path,
                    pattern => pattern,
                };
                let path = match route.root {
                    Root::Server => pattern.to_owned(),
                    Root::Base => format!("{base_path}{pattern}"),
                };
                let segments: Vec<Option<String>> = path
                    .split('/')
                    .skip(1)
                    .map(|s| (!(s.starts_with('{') && s.ends_with('}'))).then(|| s.to_owned()))
                    .collect();
                let literal_segments = segments.iter().take_while(|s| s.is_some()).count();
                let literal_len = path.find('{').unwrap_or(path.len());
                Mounted {
                    route,
                    path,
                    segments,
                    literal_segments,
                    literal_len,
                }
            })
            .collect();
        Self { mounted }
    }

    /// Every mounted route.
    pub fn iter(&self) -> impl Iterator<Item = &Mounted> {
        self.mounted.iter()
    }

    /// The route whose path is `path` (no query) as written, if any: the router answers it.
    pub fn find(&self, path: &str) -> Option<&Mounted> {
        self.lookup(path, false)
    }

    /// Whether `path` belongs to one of the proxy's own routes, as written or percent-encoded
    /// (`/fhir/%24export`): such a request is the proxy's, whatever its method, and is never
    /// forwarded. The router answers the paths as written; the gate refuses the encoded ones.
    pub fn owns(&self, path: &str) -> bool {
        self.lookup(path, path.contains('%')).is_some()
    }

    /// Whether `path` is one of the proxy's own routes only once percent-decoded (`/fhir/%24export`):
    /// the router does not answer it, and it must not be forwarded either. No lookup at all for
    /// the usual path without `%`.
    pub fn owns_only_encoded(&self, path: &str) -> bool {
        path.contains('%') && self.find(path).is_none() && self.lookup(path, true).is_some()
    }

    fn lookup(&self, path: &str, decode: bool) -> Option<&Mounted> {
        if !decode {
            return self.mounted.iter().find(|m| m.matches_raw(path));
        }
        // Percent-encoded (rare): segment by segment, each decoded.
        let rest = path.strip_prefix('/')?;
        self.mounted
            .iter()
            .find(|m| matches_segments(&m.segments, rest, true))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        RouteTable::new("/fhir", true, "/token")
    }

    #[test]
    fn every_route_owns_its_examples_and_nothing_next_to_them() {
        let table = table();
        for mounted in table.iter() {
            let path = mounted.example("x1");
            assert_eq!(
                table.find(&path).map(|m| m.route.endpoint),
                Some(mounted.route.endpoint),
                "{path}"
            );
            let ends_in_a_variable = mounted.path.ends_with('}');
            for near in [
                format!("{path}/"),
                format!("{path}/x"),
                format!("{path}x"),
                path.to_uppercase(),
            ] {
                if near != path && !(ends_in_a_variable && near == format!("{path}x")) {
                    assert!(!table.owns(&near), "{near}");
                }
            }
            // Percent-encoded, the path is still the proxy's (never forwarded), but not the
            // router's.
            for encoded in [path.replace('$', "%24"), path.replacen('e', "%65", 1)] {
                if encoded != path {
                    assert!(table.owns(&encoded), "{encoded}");
                    assert!(table.find(&encoded).is_none(), "{encoded}");
                    assert!(table.owns_only_encoded(&encoded), "{encoded}");
                }
            }
            assert!(!table.owns_only_encoded(&path), "{path}");
        }
    }

    #[test]
    fn passthrough_paths_are_not_owned() {
        let table = table();
        for path in [
            "/fhir/Patient/1",
            "/fhir/Patient",
            "/fhir/Group/7",
            "/fhir/Group//$export",
            "/fhir",
            "/fhir/",
            "/",
            "",
            "/metadata",
            "/fhir/metadata/",
            "/fhir/$export-status",
            "/fhir/$export-file/x",
            "/healthz/x",
            "/other/$export",
        ] {
            assert!(!table.owns(path), "{path}");
        }
    }

    #[test]
    fn auth_routes_exist_only_when_the_proxy_is_the_authorization_server() {
        let off = RouteTable::new("/fhir", false, "/token");
        for path in [
            "/fhir/token",
            "/fhir/.well-known/smart-configuration",
            "/fhir/authorize",
        ] {
            assert!(table().owns(path), "{path}");
            assert!(!off.owns(path), "{path}");
        }
        assert!(RouteTable::new("", true, "/auth/token").owns("/auth/token"));
        assert!(RouteTable::new("", true, "/token").owns("/metadata"));
    }

    #[test]
    fn every_route_serves_head_where_it_serves_get() {
        for route in ROUTES {
            if route.methods.contains(&Method::GET) {
                assert!(route.methods.contains(&Method::HEAD), "{route:?}");
            }
        }
    }
}
