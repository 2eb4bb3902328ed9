//! How requests and responses are adapted on their way through a console
//! listener: the `Host` and URI the node expects, hop-by-hop headers kept on
//! their hop, redirects to the node pointed back at the listener, and
//! `Secure` taken off cookies for browsers on plain HTTP. Pure functions of
//! the messages' heads.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response};

use super::Body;

/// `host:port` as a `Host` header names it.
pub(super) fn authority(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The URL prefixes under which a node may name itself in a redirect.
pub(super) fn node_bases(host: &str, port: u16) -> Vec<String> {
    let mut bases = vec![format!("https://{}", authority(host, port))];
    if port == 443 {
        let bare = if host.contains(':') {
            format!("https://[{host}]")
        } else {
            format!("https://{host}")
        };
        bases.push(bare);
    }
    bases
}

/// Headers that belong to one hop (RFC 9110, section 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter(|s| !s.is_empty())
        .collect();
    for name in named {
        headers.remove(name.as_str());
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// The client's request as the node gets it: origin-form URI, `Host` = node.
pub(super) fn to_node(req: Request<Incoming>, node_authority: &str) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", hyper::http::uri::PathAndQuery::as_str)
        .to_owned();
    if let Ok(uri) = path.parse() {
        parts.uri = uri;
    }
    strip_hop_by_hop(&mut parts.headers);
    if let Ok(host) = HeaderValue::from_str(node_authority) {
        parts.headers.insert(header::HOST, host);
    }
    Request::from_parts(parts, body)
}

/// How a node's response is adapted for the client.
pub(super) struct Rewrite {
    pub node_bases: Vec<String>,
    pub local_base: String,
    pub strip_secure: bool,
}

pub(super) fn to_client(response: Response<Incoming>, rewrite: &Rewrite) -> Response<Body> {
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(location) = parts
        .headers
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| rewrite_location(l, &rewrite.node_bases, &rewrite.local_base))
        .and_then(|l| HeaderValue::from_str(&l).ok())
    {
        parts.headers.insert(header::LOCATION, location);
    }
    if rewrite.strip_secure {
        let cookies: Vec<HeaderValue> = parts
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .map(|c| {
                c.to_str()
                    .ok()
                    .map(without_secure)
                    .and_then(|c| HeaderValue::from_str(&c).ok())
                    .unwrap_or_else(|| c.clone())
            })
            .collect();
        if !cookies.is_empty() {
            parts.headers.remove(header::SET_COOKIE);
            for c in cookies {
                parts.headers.append(header::SET_COOKIE, c);
            }
        }
    }
    Response::from_parts(parts, body.boxed())
}

/// `location` with a node base replaced by `local_base`, when it has one.
fn rewrite_location(location: &str, node_bases: &[String], local_base: &str) -> Option<String> {
    node_bases.iter().find_map(|base| {
        let rest = location.get(base.len()..)?;
        let matches = location
            .get(..base.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(base))
            && (rest.is_empty() || rest.starts_with(['/', '?', '#']));
        matches.then(|| format!("{local_base}{rest}"))
    })
}

/// A `Set-Cookie` value without its `Secure` attribute.
fn without_secure(cookie: &str) -> String {
    cookie
        .split(';')
        .filter(|attr| !attr.trim().eq_ignore_ascii_case("secure"))
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_redirects_that_point_at_the_node() {
        let bases = node_bases("node1.example.com", 8080);
        let local = "http://127.0.0.1:9000";
        let cases = [
            (
                "https://node1.example.com:8080/#/overview",
                Some("http://127.0.0.1:9000/#/overview"),
            ),
            (
                "https://NODE1.example.com:8080",
                Some("http://127.0.0.1:9000"),
            ),
            (
                "https://node1.example.com:8080?x=1",
                Some("http://127.0.0.1:9000?x=1"),
            ),
            ("https://node1.example.com:80800/", None),
            ("https://other.example.com:8080/", None),
            ("/relative/path", None),
        ];
        assert!(!cases.is_empty());
        for (location, want) in cases {
            assert_eq!(
                rewrite_location(location, &bases, local).as_deref(),
                want,
                "{location}"
            );
        }
        let bases = node_bases("node1", 443);
        assert_eq!(
            rewrite_location("https://node1/login", &bases, local).as_deref(),
            Some("http://127.0.0.1:9000/login")
        );
    }

    #[test]
    fn drops_only_the_secure_attribute() {
        assert_eq!(
            without_secure("session=abc; Path=/; Secure; HttpOnly"),
            "session=abc; Path=/; HttpOnly"
        );
        assert_eq!(without_secure("secure=1; Path=/"), "secure=1; Path=/");
    }

    #[test]
    fn strips_hop_by_hop_headers_and_those_connection_names() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }
}
