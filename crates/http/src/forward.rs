//! What a proxy of either face does to a request or response on its way
//! through: hop-by-hop headers removed (RFC 9110 7.6.1), the path
//! normalized before it is matched, and this hop added to X-Forwarded-For.

use crate::Refusal;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::net::SocketAddr;

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
static HOP_BY_HOP: [HeaderName; 7] = [
    HeaderName::from_static("connection"),
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("te"),
    HeaderName::from_static("trailer"),
    HeaderName::from_static("transfer-encoding"),
    HeaderName::from_static("upgrade"),
];
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names first, noting which hop-by-hop ones are
    // there: a lookup per hop-by-hop name would cost a hash each, and most
    // messages carry only `Connection` (a response's `keep-alive`).
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Headers `Connection` names are hop-by-hop too (`keep-alive` and
        // `close`, the usual values, name none beyond the list).
        let mut named: SmallVec<[HeaderName; 2]> = SmallVec::new();
        for value in headers.get_all(CONNECTION) {
            let value = value.as_bytes();
            if value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close") {
                continue;
            }
            let Ok(value) = std::str::from_utf8(value) else {
                continue;
            };
            named.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.eq_ignore_ascii_case("close"))
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
                    .filter(|n| hop_by_hop_index(n).is_none()),
            );
        }
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Where `name` is in `HOP_BY_HOP`, if it is there.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    // (names are lower case; a match on the text is a length check and a
    // compare, cheaper than comparing `HeaderName`s one by one)
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

/// The other end of a connection, formatted once per connection.
#[derive(Debug)]
pub struct Peer {
    pub ip: String,
    /// `ip` as a header value: this hop's part of X-Forwarded-For.
    ip_header: HeaderValue,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        let ip = addr.ip().to_string();
        let ip_header = HeaderValue::from_str(&ip).unwrap_or(HeaderValue::from_static("unknown"));
        Peer { ip, ip_header }
    }

    /// One X-Forwarded-For value: the client's chain, then this hop's peer.
    pub fn append_forwarded_for(&self, headers: &mut HeaderMap) {
        // (one lookup: the name is hashed once)
        match headers.entry(&X_FORWARDED_FOR) {
            hyper::header::Entry::Vacant(none) => {
                none.insert(self.ip_header.clone());
            }
            hyper::header::Entry::Occupied(mut given) => {
                let chain: Vec<&str> = given
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .chain([self.ip.as_str()])
                    .collect();
                if let Ok(v) = HeaderValue::from_str(&chain.join(", ")) {
                    given.insert(v);
                }
            }
        }
    }
}

/// An HTTP request as the limits read it (the gateway's and the tower
/// layer's): its head, its headers (which the gateway moves out of the head
/// to send on uncopied), the normalized path, the client's address, and the
/// JSON body when a limit's cost reads it.
#[derive(Debug)]
pub struct HttpRequest<'a> {
    pub parts: &'a hyper::http::request::Parts,
    pub headers: &'a HeaderMap,
    /// The path as matched, keyed and forwarded (see `normalize_path`).
    pub path: &'a str,
    pub ip: Option<&'a str>,
    pub body: Option<&'a serde_json::Value>,
}

impl tollgate_core::Request for HttpRequest<'_> {
    fn method(&self) -> &str {
        self.parts.method.as_str()
    }
    fn path(&self) -> &str {
        self.path
    }
    fn host(&self) -> Option<&str> {
        request_host(&self.parts.uri, self.headers)
    }
    fn ip(&self) -> Option<&str> {
        self.ip
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        tollgate_core::request::query_param(self.parts.uri.query()?, name)
    }
    fn query_repeated(&self, name: &str) -> bool {
        (self.parts.uri.query())
            .is_some_and(|q| tollgate_core::request::query_param_repeated(q, name))
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body
    }
}

/// A body read for a JSON cost: none when empty; a body that is not JSON
/// is refused, not charged as if it held no array (a body some readers
/// take as JSON, with a BOM or nested too deep for this one, would
/// otherwise cost 1 whatever its array's length). A leading UTF-8 BOM is
/// skipped, as RFC 8259 allows.
pub fn body_json(bytes: &[u8]) -> Result<Option<serde_json::Value>, Refusal> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        Refusal::BadRequest(format!(
            "the request body is not JSON ({e}), and a limit counts the array in it"
        ))
    })
}

/// The host a request is for: the URI's (absolute form), else its `Host`
/// header; without the port (an IPv6 literal keeps its brackets).
pub fn request_host<'a>(uri: &'a hyper::Uri, headers: &'a hyper::HeaderMap) -> Option<&'a str> {
    let host = match uri.host() {
        Some(h) => h,
        None => headers.get(hyper::header::HOST)?.to_str().ok()?,
    };
    Some(match host.rfind(':') {
        Some(i) if !host[i..].contains(']') => &host[..i],
        _ => host,
    })
}

/// The path with percent-encoded unreserved characters decoded, `//`
/// merged and dot segments removed (RFC 3986 6.2.2), so that `/v1/x`,
/// `//v1/x`, `/%76%31/x` and `/a/../v1/x` all match, key and reach the
/// upstream as `/v1/x`: a path prefix cannot be sidestepped by spelling.
///
/// Dot segments are also found where some upstreams see them: behind an
/// encoded separator (`..%2F..%2Fadmin`: nginx decodes `%2F`, IIS reads
/// `%5C` as one too) and with path parameters (`..;/`: Tomcat and Spring
/// drop `;...` from a segment). Such a path is resolved as those upstreams
/// would, so no limit and no base path is climbed out of. An encoded
/// separator hiding no dot segment is kept as written (GitLab's
/// `/projects/group%2Fproject` names one project).
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    // One pass over the bytes (a `contains` of a two-byte pattern sets up a
    // substring search each time): no escape, no empty or dot segment.
    let bytes = path.as_bytes();
    let plain = !bytes.contains(&b'%')
        && !bytes
            .windows(2)
            .any(|w| w[0] == b'/' && (w[1] == b'/' || w[1] == b'.'));
    if plain {
        return Cow::Borrowed(path);
    }
    // Bytes, not chars: a raw UTF-8 path keeps its bytes (only ASCII escapes
    // are decoded, so the result is UTF-8 again).
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.extend_from_slice(path[i + 1..i + 3].to_ascii_uppercase().as_bytes());
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    let mut decoded = String::from_utf8(decoded)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    // (escapes are upper case by now)
    let encoded_separator = |s: &str| s.contains("%2F") || s.contains("%5C");
    let hides_dot = |segment: &str| {
        encoded_separator(segment)
            && (segment.split("%2F"))
                .flat_map(|s| s.split("%5C"))
                .any(|s| dot_segment(s).is_some())
    };
    if encoded_separator(&decoded) && decoded.split('/').any(hides_dot) {
        decoded = decoded.replace("%2F", "/").replace("%5C", "/");
    }
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match dot_segment(segment) {
            _ if segment.is_empty() => {}
            Some(Dot::Here) => {}
            Some(Dot::Up) => {
                segments.pop();
            }
            None => segments.push(segment),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    let trailing = decoded.ends_with('/')
        || decoded
            .rsplit('/')
            .next()
            .is_some_and(|last| dot_segment(last).is_some());
    if out.is_empty() || (trailing && !segments.is_empty()) {
        out.push('/');
    }
    Cow::Owned(out)
}

/// A dot segment, as an upstream may read one.
enum Dot {
    /// `.`
    Here,
    /// `..`
    Up,
}

/// Whether `segment` is a dot segment: `.` or `..`, alone or with path
/// parameters after them (`..;jsessionid=x`, read as `..` by servers that
/// drop parameters before resolving; `;x` alone, read as an empty segment,
/// goes as `.` does).
fn dot_segment(segment: &str) -> Option<Dot> {
    match segment.split(';').next() {
        Some(".") => Some(Dot::Here),
        Some("") if segment.starts_with(';') => Some(Dot::Here),
        Some("..") => Some(Dot::Up),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{hop_by_hop_index, normalize_path, strip_hop_by_hop, HOP_BY_HOP};
    use hyper::header::{HeaderMap, HeaderName, HeaderValue};

    #[test]
    fn the_hop_by_hop_index_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(i), "{name}");
        }
        for other in ["accept", "x-trace", "host", "content-length"] {
            assert_eq!(hop_by_hop_index(&HeaderName::from_static(other)), None);
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, X-Trace"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("accept", "*/*"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        strip_hop_by_hop(&mut headers);
        let left: Vec<&str> = headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(left, ["accept"]);

        let mut plain = HeaderMap::new();
        plain.insert("accept", HeaderValue::from_static("*/*"));
        plain.insert("x-trace", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2, "nothing hop-by-hop: nothing removed");
    }

    #[test]
    fn a_body_read_for_its_json_is_json_or_refused() {
        use super::body_json;
        assert_eq!(body_json(b"").unwrap(), None);
        assert_eq!(body_json(b" \n").unwrap(), None);
        assert_eq!(
            body_json(b"{\"ids\":[1,2]}").unwrap(),
            Some(serde_json::json!({"ids": [1, 2]}))
        );
        assert_eq!(
            body_json(b"\xEF\xBB\xBF[1]").unwrap(),
            Some(serde_json::json!([1]))
        );
        for bad in [&b"{\"ids\":[NaN]}"[..], b"[1e999]", b"not json"] {
            let e = body_json(bad).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.detail().contains("not JSON"), "{}", e.detail());
        }
    }

    #[test]
    fn paths_are_normalized_before_matching() {
        for (raw, normal) in [
            ("/v1/jobs", "/v1/jobs"),
            ("//v1/jobs", "/v1/jobs"),
            ("/%76%31/jobs", "/v1/jobs"),
            ("/x/../v1/jobs", "/v1/jobs"),
            ("/v1/./jobs/", "/v1/jobs/"),
            ("/../../etc", "/etc"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2", "/a%2"),
            ("/%", "/%"),
            ("/", "/"),
            ("/v1/..", "/"),
            ("/crm//café", "/crm/café"),
            // A dot segment behind an encoded separator, or with path
            // parameters, is resolved as the upstreams that see one do.
            ("/api/v1/..%2F..%2Fadmin/x", "/admin/x"),
            ("/api/v1/..%2f..%2fadmin/x", "/admin/x"),
            ("/api/v1/..%5C..%5Cadmin", "/admin"),
            ("/api/v1/x%2F..", "/api/v1/"),
            ("/crm/..;/x", "/x"),
            ("/crm/..;jsessionid=1/x", "/x"),
            ("/crm/.;/x", "/crm/x"),
            ("/crm/;x/../y", "/y"),
            // An encoded separator hiding none is kept: one segment.
            (
                "/projects/group%2Fproject/issues",
                "/projects/group%2Fproject/issues",
            ),
            (
                "/projects/group%2fproject/./issues",
                "/projects/group%2Fproject/issues",
            ),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
    }
}
