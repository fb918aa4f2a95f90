//! Test support: a fake FHIR upstream that reports exactly what it received, and a real proxy
//! started on `127.0.0.1:0` in front of it.

pub mod fake_fhir;
pub mod proxy;
pub mod redis;
pub mod smart;

pub use fake_fhir::FakeFhir;
pub use proxy::TestProxy;
pub use redis::RedisServer;

/// A reqwest client that neither follows redirects nor decompresses.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}
