//! A minimal HTTP/1.1 client for OpenAI-compatible servers over plain TCP (benchmarks run on
//! loopback or a trusted network: no TLS). One connection per request, like a fresh client
//! would open under load; hyper does the HTTP framing (chunked bodies, keep-alive headers).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use crate::error::{BenchError, Result};

/// Where the server lives: `http://host:port[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    host: String,
    port: u16,
    /// Path prefix without a trailing slash ("" or e.g. "/api").
    prefix: String,
}

impl BaseUrl {
    /// Parse `http://host[:port][/prefix]`; `https` is refused (no TLS in the benchmark client).
    pub fn parse(url: &str) -> Result<Self> {
        let bad = |why: &str| BenchError::InvalidArgument(format!("base URL {url:?}: {why}"));
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(bad("https is not supported; benchmark over plain http"));
        } else if url.contains("://") {
            return Err(bad("only http:// URLs are supported"));
        } else {
            url
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6.find(']').ok_or_else(|| bad("unclosed IPv6 bracket"))?;
            let port = v6[end + 1..].strip_prefix(':');
            (v6[..end].to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), Some(p)),
                None => (authority.to_owned(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().map_err(|_| bad("invalid port"))?,
            None => 80,
        };
        Ok(Self {
            host,
            port,
            prefix: path.trim_end_matches('/').to_owned(),
        })
    }

    /// `host:port` for the Host header and connecting.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// Full path of an API route (`/v1/models` under the prefix).
    pub fn path(&self, route: &str) -> String {
        format!("{}{}", self.prefix, route)
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority(), self.prefix)
    }
}

/// Sends requests to one server, adding the API key when there is one.
#[derive(Debug, Clone)]
pub struct HttpClient {
    base: BaseUrl,
    api_key: Option<String>,
}

impl HttpClient {
    /// A client for `base`, authenticating with `Authorization: Bearer <api_key>` if given.
    pub fn new(base: BaseUrl, api_key: Option<String>) -> Self {
        Self {
            base,
            api_key: api_key.filter(|k| !k.is_empty()),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &BaseUrl {
        &self.base
    }

    /// Open a connection and send one request; the response body is left to the caller to
    /// stream. Errors are strings because they end up in the per-request report.
    pub async fn send(
        &self,
        method: Method,
        route: &str,
        json_body: Option<Vec<u8>>,
    ) -> std::result::Result<Response<Incoming>, String> {
        let stream = TcpStream::connect(self.base.authority())
            .await
            .map_err(|e| format!("connect to {}: {e}", self.base))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        // Drives the connection; it ends when the response body is consumed or dropped.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut builder = Request::builder()
            .method(method)
            .uri(self.base.path(route))
            .header(header::HOST, self.base.authority())
            .header(
                header::USER_AGENT,
                concat!("spindle-bench/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(key) = &self.api_key {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let body = match json_body {
            Some(b) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let req = builder
            .body(body)
            .map_err(|e| format!("building the request: {e}"))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending the request: {e}"))
    }

    /// GET a route and return status and body text (bodies over `limit` bytes are cut).
    pub async fn get_text(&self, route: &str, timeout: Duration) -> Result<(u16, String)> {
        let fut = async {
            let resp = self
                .send(Method::GET, route, None)
                .await
                .map_err(BenchError::Server)?;
            let status = resp.status().as_u16();
            let body = read_body(resp.into_body(), 64 << 20)
                .await
                .map_err(BenchError::Server)?;
            Ok((status, body))
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| {
            BenchError::Server(format!(
                "GET {route}: no answer from {} within {timeout:?}",
                self.base
            ))
        })?
    }

    /// The first model id listed by `GET /v1/models`.
    pub async fn first_model(&self, timeout: Duration) -> Result<String> {
        let (status, body) = self.get_text("/v1/models", timeout).await?;
        if status != 200 {
            return Err(BenchError::Server(format!(
                "GET /v1/models returned HTTP {status}: {}",
                truncate(&body, 300)
            )));
        }
        let v: Value = serde_json::from_str(&body)?;
        v.get("data")
            .and_then(|d| d.get(0))
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| {
                BenchError::Server("GET /v1/models listed no model; pass --model".into())
            })
    }
}

/// Read a whole body as text, up to `limit` bytes.
pub async fn read_body(mut body: Incoming, limit: usize) -> std::result::Result<String, String> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("reading the body: {e}"))?;
        if let Some(data) = frame.data_ref() {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&data[..data.len().min(room)]);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// At most `max` characters of `s`, marking the cut.
pub fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_base_urls() {
        let u = BaseUrl::parse("http://127.0.0.1:8000").unwrap();
        assert_eq!(u.authority(), "127.0.0.1:8000");
        assert_eq!(u.path("/v1/models"), "/v1/models");
        let u = BaseUrl::parse("http://localhost:9000/api/").unwrap();
        assert_eq!(u.path("/v1/completions"), "/api/v1/completions");
        assert_eq!(u.to_string(), "http://localhost:9000/api");
        let u = BaseUrl::parse("example.org").unwrap();
        assert_eq!(u.authority(), "example.org:80");
        let u = BaseUrl::parse("http://[::1]:8080").unwrap();
        assert_eq!(u.authority(), "[::1]:8080");
        assert!(BaseUrl::parse("https://x:1").is_err());
        assert!(BaseUrl::parse("ftp://x").is_err());
        assert!(BaseUrl::parse("http://:80").is_err());
        assert!(BaseUrl::parse("http://x:notaport").is_err());
    }

    #[test]
    fn truncation() {
        assert_eq!(truncate("  abc  ", 5), "abc");
        assert_eq!(truncate("ééééé", 2), "éé…");
    }
}
