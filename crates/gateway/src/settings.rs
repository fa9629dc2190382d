//! The gateway's own tables of a config: `[gateway]` (listeners, upstreams,
//! bounds) and `[response]` (what a 429 looks like). The `[[limit]]` entries
//! are the core's; both are read from the same text.

use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;
use tollgate_core::config::{read_tables, socket_address, ConfigError};
use tollgate_core::policy::Matcher;
use tollgate_core::units::parse_duration;
pub use tollgate_http::{AccessLog, ErrorFormat, ResponseSettings};
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// Where requests go when no route matches; `None`: only routes (or the
    /// check API) are served.
    pub upstream: Option<Upstream>,
    pub routes: Vec<Route>,
    pub upstream_timeout: Duration,
    pub connect_timeout: Duration,
    /// Largest body read when a limit's cost needs the JSON body (413 past it).
    pub max_body_bytes: usize,
    /// Most requests held at once, in total and per key; past them a request
    /// that would be held is denied at once.
    pub max_held: usize,
    pub max_held_per_key: usize,
    pub access_log: AccessLog,
    pub shutdown_grace: Duration,
    /// Take the client address from the first `X-Forwarded-For` entry (only
    /// behind a proxy you trust).
    pub trust_forwarded_for: bool,
    /// Seconds between reads of the config file's modification time.
    pub watch_interval: Duration,
    /// Worker threads (one single-threaded runtime each); 0: one per CPU.
    pub workers: usize,
    pub response: ResponseSettings,
    /// `[rls] listen`: where Envoy's rate limit service (gRPC) is served;
    /// `None`: not served.
    pub rls_listen: Option<SocketAddr>,
    /// `[gateway] tls = { cert, key }`: the listener speaks TLS (HTTP/2 or
    /// HTTP/1.1 by ALPN); `None`: cleartext (HTTP/1.1, or HTTP/2 by prior
    /// knowledge). Relative paths are from the config file's directory.
    pub tls: Option<tollgate_http::tls::CertFiles>,
    /// `[gateway] upstream_ca_file`: certificates (PEM) trusted for `https`
    /// upstreams besides the system's roots.
    pub upstream_ca_file: Option<std::path::PathBuf>,
    /// `[gateway] upstream_client_cert = { cert, key }`: presented to
    /// `https` upstreams that ask for a client certificate.
    pub upstream_client_cert: Option<tollgate_http::tls::CertFiles>,
    /// `[history]`, `[alerts]` and `[[alert]]`: the admin listener's
    /// dashboard and alerts.
    pub watch: tollgate_watch::settings::WatchSettings,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `http` or `https`.
    pub scheme: hyper::http::uri::Scheme,
    /// `host:port` of the URL.
    pub authority: hyper::http::uri::Authority,
    /// Path prefix put before the request's path (from the URL, without a trailing '/').
    pub base_path: String,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub matcher: Matcher,
    pub upstream: Upstream,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9090))),
            admin_token_env: "TOLLGATE_ADMIN_TOKEN".into(),
            upstream: None,
            routes: Vec::new(),
            upstream_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            max_body_bytes: 1 << 20,
            max_held: 10_000,
            max_held_per_key: 100,
            access_log: AccessLog::Text,
            shutdown_grace: Duration::from_secs(10),
            trust_forwarded_for: false,
            watch_interval: Duration::from_secs(2),
            workers: 0,
            response: ResponseSettings::default(),
            rls_listen: None,
            tls: None,
            upstream_ca_file: None,
            upstream_client_cert: None,
            watch: Default::default(),
        }
    }
}

#[derive(Deserialize)]
struct RawFile {
    gateway: Option<RawGateway>,
    response: Option<RawResponse>,
    rls: Option<RawRls>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRls {
    listen: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    listen: Option<Spanned<String>>,
    admin_listen: Option<Spanned<String>>,
    admin_token_env: Option<String>,
    upstream: Option<Spanned<String>>,
    #[serde(default)]
    route: Vec<RawRoute>,
    upstream_timeout: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    max_body_bytes: Option<Spanned<u64>>,
    max_held: Option<usize>,
    max_held_per_key: Option<usize>,
    access_log: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    trust_forwarded_for: Option<bool>,
    watch_interval: Option<Spanned<String>>,
    workers: Option<Spanned<usize>>,
    tls: Option<Spanned<RawTls>>,
    upstream_ca_file: Option<String>,
    upstream_client_cert: Option<Spanned<RawTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path_prefix: Option<String>,
    host: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    upstream: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawResponse {
    format: Option<Spanned<String>>,
    retry_after: Option<bool>,
    ratelimit_headers: Option<bool>,
    legacy_headers: Option<bool>,
    problem_type: Option<String>,
}

impl Settings {
    /// Read `[gateway]` and `[response]` from a config's text (the other
    /// tables are left to their readers). Errors name the line and field.
    pub fn parse(text: &str) -> Result<Settings, ConfigError> {
        Settings::default().parse_onto(text)
    }

    /// Like `parse`, with `self` as the defaults: a profile's `[response]`
    /// (a vendor's 429 shape) under the config's own tables.
    pub fn parse_onto(self, text: &str) -> Result<Settings, ConfigError> {
        let err = |offset: usize, message: String| ConfigError {
            line: Some(text[..offset.min(text.len())].matches('\n').count() + 1),
            message,
        };
        let raw: RawFile = read_tables(text)?;
        let mut s = self;
        let duration = |v: &Spanned<String>, field: &str| match parse_duration(v.get_ref()) {
            Ok(0) if field != "shutdown_grace" => Err(err(
                v.span().start,
                format!("gateway {field} must be above 0"),
            )),
            Ok(ns) => Ok(Duration::from_nanos(ns)),
            Err(m) => Err(err(v.span().start, format!("gateway {field}: {m}"))),
        };
        let address = |v: &Spanned<String>, field: &str| {
            socket_address(text, v, &format!("gateway {field}"), "127.0.0.1:8080")
        };
        let upstream = |v: &Spanned<String>, field: &str| {
            Upstream::parse(v.get_ref())
                .map_err(|m| err(v.span().start, format!("gateway {field}: {m}")))
        };
        if let Some(g) = raw.gateway {
            if let Some(v) = &g.listen {
                s.listen = address(v, "listen")?;
            }
            if let Some(v) = &g.admin_listen {
                s.admin_listen = match v.get_ref().as_str() {
                    "off" | "" => None,
                    _ => Some(address(v, "admin_listen")?),
                };
            }
            if let Some(v) = g.admin_token_env {
                s.admin_token_env = v;
            }
            if let Some(v) = &g.upstream {
                s.upstream = Some(upstream(v, "upstream")?);
            }
            for r in &g.route {
                s.routes.push(Route {
                    matcher: Matcher {
                        methods: r.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
                        path_prefix: r.path_prefix.clone(),
                        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                        ..Matcher::default()
                    },
                    upstream: upstream(&r.upstream, "route upstream")?,
                });
            }
            if let Some(v) = &g.upstream_timeout {
                s.upstream_timeout = duration(v, "upstream_timeout")?;
            }
            if let Some(v) = &g.connect_timeout {
                s.connect_timeout = duration(v, "connect_timeout")?;
            }
            if let Some(v) = &g.shutdown_grace {
                s.shutdown_grace = duration(v, "shutdown_grace")?;
            }
            if let Some(v) = &g.watch_interval {
                s.watch_interval = duration(v, "watch_interval")?;
            }
            if let Some(v) = &g.max_body_bytes {
                s.max_body_bytes = usize::try_from(*v.get_ref()).map_err(|_| {
                    err(v.span().start, "gateway max_body_bytes is too large".into())
                })?;
            }
            if let Some(v) = g.max_held {
                s.max_held = v;
            }
            if let Some(v) = g.max_held_per_key {
                s.max_held_per_key = v;
            }
            if let Some(v) = &g.access_log {
                s.access_log = AccessLog::parse(v.get_ref())
                    .map_err(|m| err(v.span().start, format!("gateway access_log {m}")))?;
            }
            if let Some(v) = &g.workers {
                if *v.get_ref() > crate::gateway::MAX_WORKERS {
                    return Err(err(
                        v.span().start,
                        format!(
                            "gateway workers must be at most {}",
                            crate::gateway::MAX_WORKERS
                        ),
                    ));
                }
                s.workers = *v.get_ref();
            }
            if let Some(v) = g.trust_forwarded_for {
                s.trust_forwarded_for = v;
            }
            let cert_files = |v: &Spanned<RawTls>, field: &str| {
                let t = v.get_ref();
                if t.cert.is_empty() || t.key.is_empty() {
                    return Err(err(
                        v.span().start,
                        format!(
                            "gateway {field} needs cert = \"PATH\" and key = \"PATH\" (PEM files)"
                        ),
                    ));
                }
                Ok(tollgate_http::tls::CertFiles {
                    cert: t.cert.clone().into(),
                    key: t.key.clone().into(),
                })
            };
            if let Some(v) = &g.tls {
                s.tls = Some(cert_files(v, "tls")?);
            }
            if let Some(v) = &g.upstream_client_cert {
                s.upstream_client_cert = Some(cert_files(v, "upstream_client_cert")?);
            }
            if let Some(v) = &g.upstream_ca_file {
                s.upstream_ca_file = Some(v.into());
            }
        }
        if let Some(rls) = &raw.rls {
            s.rls_listen = Some(socket_address(
                text,
                &rls.listen,
                "rls listen",
                "127.0.0.1:8081",
            )?);
        }
        if let Some(r) = raw.response {
            if let Some(v) = &r.format {
                s.response.format = match v.get_ref().as_str() {
                    "problem" => ErrorFormat::Problem,
                    "errors" => ErrorFormat::Errors,
                    other => {
                        return Err(err(
                            v.span().start,
                            format!("response format '{other}' is not known; use \"problem\" (RFC 9457) or \"errors\""),
                        ))
                    }
                };
            }
            if let Some(v) = r.retry_after {
                s.response.retry_after = v;
            }
            if let Some(v) = r.ratelimit_headers {
                s.response.ratelimit_headers = v;
            }
            if let Some(v) = r.legacy_headers {
                s.response.legacy_headers = v;
            }
            if let Some(v) = r.problem_type {
                s.response.problem_type = v;
            }
        }
        Ok(s)
    }

    /// The upstream for a request: the first route that matches, else the default.
    pub fn upstream_for(&self, req: &impl tollgate_core::Request) -> Option<&Upstream> {
        self.routes
            .iter()
            .find(|r| r.matcher.matches(req))
            .map(|r| &r.upstream)
            .or(self.upstream.as_ref())
    }
}

impl Upstream {
    /// `http://host:port[/base]` or `https://...` (TLS: the system's roots
    /// plus `[gateway] upstream_ca_file`).
    pub fn parse(url: &str) -> Result<Upstream, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| format!("'{url}' is not a URL; write e.g. \"http://127.0.0.1:9000\""))?;
        let scheme = match uri.scheme_str() {
            Some("http") => hyper::http::uri::Scheme::HTTP,
            Some("https") => hyper::http::uri::Scheme::HTTPS,
            _ => return Err(format!("'{url}' must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("'{url}' has no host"))?;
        if uri.query().is_some() {
            return Err(format!("'{url}' must not have a query"));
        }
        if authority.as_str().contains('@') {
            // (not echoed: it may hold a password)
            return Err(
                "the URL must not carry a user name or password: the gateway would not \
                 send it (clients send their own credentials)"
                    .into(),
            );
        }
        let port = authority.as_str().rsplit_once(':').map(|(_, p)| p);
        if port.is_some_and(|p| !p.ends_with(']')) && authority.port_u16().is_none() {
            return Err(format!(
                "'{url}' has a port that is not a number from 1 to 65535"
            ));
        }
        Ok(Upstream {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_fields() {
        let s = Settings::parse("[[limit]]\nname='x'\n").unwrap();
        assert_eq!(s.response.format, ErrorFormat::Problem);
        assert!(s.upstream.is_none());
        let s = Settings::parse(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:9000/api/\"\nhold_queue = 1\n",
        )
        .unwrap_err();
        assert_eq!(s.line, Some(4));
        assert!(s.message.contains("unknown field `hold_queue`"), "{s}");
        let s = Settings::parse(
            "[gateway]\nupstream = \"http://127.0.0.1:9000/api/\"\n[response]\nformat = \"errors\"\nretry_after = false\n",
        )
        .unwrap();
        let up = s.upstream.unwrap();
        assert_eq!(up.authority.as_str(), "127.0.0.1:9000");
        assert_eq!(up.base_path, "/api");
        assert_eq!(s.response.format, ErrorFormat::Errors);
        assert!(!s.response.retry_after);
    }

    #[test]
    fn rls_listens_where_asked() {
        assert_eq!(
            Settings::parse("[[limit]]\nname='x'\n").unwrap().rls_listen,
            None
        );
        let s = Settings::parse("[rls]\nlisten = \"127.0.0.1:8081\"\n").unwrap();
        assert_eq!(s.rls_listen, Some(SocketAddr::from(([127, 0, 0, 1], 8081))));
        let e = Settings::parse("[gateway]\n[rls]\nlisten = \"8081\"\n").unwrap_err();
        assert_eq!(e.line, Some(3));
        assert!(
            e.message.contains("rls listen '8081' is not an address"),
            "{e}"
        );
        let e = Settings::parse("[rls]\nport = 8081\n").unwrap_err();
        assert!(e.message.contains("unknown field `port`"), "{e}");
    }

    #[test]
    fn bad_values_name_line_and_field() {
        let e = Settings::parse("\n[gateway]\nupstream = \"ftp://x\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 3: gateway upstream: 'ftp://x' must start with http:// or https://"
        );
        // A value of the wrong type names its table and field, in plain words.
        let e = Settings::parse("[gateway]\nmax_held = -1\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: [gateway] max_held: invalid value: integer `-1`, expected a whole number, 0 or more"
        );
        let e = Settings::parse("[response]\nformat = 5\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: [response] format: invalid type: integer `5`, expected a string"
        );
        let e = Settings::parse("[gateway]\nupstream = \"http://x:notaport\"\n").unwrap_err();
        assert!(e.to_string().contains("port that is not a number"), "{e}");
        let e = Settings::parse("[gateway]\nupstream = \"http://u:s3cret@x:80\"\n").unwrap_err();
        assert!(
            e.to_string().contains("user name or password") && !e.to_string().contains("s3cret"),
            "{e}"
        );
        assert!(Settings::parse("[gateway]\nupstream = \"http://[::1]:8080/base\"\n").is_ok());
        assert!(Settings::parse("[gateway]\nupstream = \"http://[::1]/base\"\n").is_ok());
        let e = Settings::parse("[gateway]\nlisten = \"localhost\"\n").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("line 2: gateway listen 'localhost' is not an address"));
        let e = Settings::parse("[response]\nformat = \"xml\"\n").unwrap_err();
        assert!(e.to_string().starts_with("line 2: response format 'xml'"));
        let e = Settings::parse("[gateway]\nwatch_interval = \"0s\"\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: gateway watch_interval must be above 0"
        );
        let e = Settings::parse("[gateway]\nupstream_timeout = \"soon\"\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("line 2: gateway upstream_timeout:"),
            "{e}"
        );
    }

    #[test]
    fn tls_needs_both_files() {
        let s =
            Settings::parse("[gateway]\ntls = { cert = \"a.crt\", key = \"a.key\" }\n").unwrap();
        let files = s.tls.unwrap();
        assert_eq!(
            (files.cert.to_str(), files.key.to_str()),
            (Some("a.crt"), Some("a.key"))
        );
        let e = Settings::parse("[gateway]\ntls = { cert = \"\", key = \"a.key\" }\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "line 2: gateway tls needs cert = \"PATH\" and key = \"PATH\" (PEM files)"
        );
        let e = Settings::parse("[gateway]\ntls = { cert = \"a.crt\" }\n").unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
    }
}
