//! `[proxy]` of a config: where the proxy listens, how long a request may
//! wait for its slot, what it keeps for a retry, and who may use it
//! (`[[proxy.client]]`). The `[[upstream]]` tables are the comply engine's
//! (`tollgate_comply::settings`), read as `tollgate run` reads them.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Where `tollgate proxy ca init` puts the local CA unless told otherwise.
pub const DEFAULT_CA_DIR: &str = ".tollgate/proxy-ca";
/// The jobs' state unless `[proxy] state` says otherwise: `tollgate run`'s
/// default too, so `dlq` and `results` read it without being told.
pub const DEFAULT_STATE: &str = ".tollgate";
use std::time::Duration;
use tollgate_comply::Priority;
use tollgate_core::config::{line_of, read_tables, socket_address, ConfigError};
use tollgate_core::units::parse_duration;
use tollgate_http::AccessLog;
use toml::Spanned;

#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub admin_listen: Option<SocketAddr>,
    /// Name of the environment variable holding the admin bearer token.
    pub admin_token_env: String,
    /// How long a request may wait for its slot (and its retries), unless
    /// it says otherwise with `Tollgate-Max-Wait`.
    pub max_wait: Duration,
    /// A request body up to this size is kept so the request can be sent
    /// again; a larger one is streamed once and never retried.
    pub max_replay_bytes: usize,
    /// The most bytes of request bodies kept at once, over every request
    /// waiting or in flight; a request past it gets 503 (memory stays
    /// bounded however many wait).
    pub max_kept_bytes: usize,
    pub access_log: AccessLog,
    pub shutdown_grace: Duration,
    pub clients: Vec<Client>,
    /// Where the local CA for interception lives (`tollgate proxy ca init`).
    pub ca_dir: PathBuf,
    /// The durable state of the jobs pushed to `/_tollgate/jobs` (the same
    /// SQLite state `tollgate run --state` keeps).
    pub state: PathBuf,
    /// The environment variable holding the secret callbacks are signed
    /// with (HMAC-SHA256 in `Tollgate-Signature`).
    pub callback_secret_env: String,
    /// On a fleet config: the fleet's job queue in Redis pushed jobs go to,
    /// and the proxies of the fleet work (`tollgate run --queue NAME` works
    /// the same queue). Not `run`'s default queue, so proxies never take a
    /// runner's jobs unless told to.
    pub queue: String,
    /// `[history]`, `[alerts]` and `[[alert]]`: the admin listener's
    /// dashboard and alerts (read by `load`, beside `[proxy]`).
    pub watch: tollgate_watch::settings::WatchSettings,
}

/// A client allowed to use the proxy, known by its token.
#[derive(Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    /// The environment variable that holds its token (tokens stay out of
    /// the file).
    pub token_env: String,
    pub token: String,
    /// Its requests' workflow and priority unless they say otherwise.
    pub workflow: Option<String>,
    pub priority: Priority,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token is a secret: only the variable that holds it is shown.
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("token_env", &self.token_env)
            .field("workflow", &self.workflow)
            .field("priority", &self.priority)
            .finish_non_exhaustive()
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        ProxySettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            admin_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9091))),
            admin_token_env: "TOLLGATE_ADMIN_TOKEN".into(),
            max_wait: Duration::from_secs(30),
            max_replay_bytes: 1 << 20,
            max_kept_bytes: 256 << 20,
            access_log: AccessLog::Text,
            shutdown_grace: Duration::from_secs(10),
            clients: Vec::new(),
            ca_dir: PathBuf::from(DEFAULT_CA_DIR),
            state: PathBuf::from(DEFAULT_STATE),
            callback_secret_env: "TOLLGATE_CALLBACK_SECRET".into(),
            queue: "proxy".into(),
            watch: Default::default(),
        }
    }
}

#[derive(Deserialize)]
struct RawFile {
    proxy: Option<Spanned<RawProxy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProxy {
    listen: Option<Spanned<String>>,
    admin_listen: Option<Spanned<String>>,
    admin_token_env: Option<String>,
    max_wait: Option<Spanned<String>>,
    max_replay_bytes: Option<Spanned<u64>>,
    max_kept_bytes: Option<Spanned<u64>>,
    access_log: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    ca_dir: Option<String>,
    state: Option<String>,
    callback_secret_env: Option<String>,
    queue: Option<Spanned<String>>,
    #[serde(default)]
    client: Vec<Spanned<RawClient>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: Spanned<String>,
    token_env: Spanned<String>,
    workflow: Option<String>,
    priority: Option<Spanned<String>>,
}

impl ProxySettings {
    /// Read `[proxy]` from a config's text. `env` resolves the clients'
    /// tokens. Errors name the line and field. Listening anywhere but
    /// loopback needs client tokens: an open relay with the vendor's keys
    /// is refused here.
    pub fn parse(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<ProxySettings, ConfigError> {
        let err = |offset: usize, message: String| ConfigError {
            line: Some(line_of(text, offset)),
            message,
        };
        let raw: RawFile = read_tables(text)?;
        let mut s = ProxySettings::default();
        let Some(raw) = raw.proxy else {
            return Ok(s);
        };
        let table_at = raw.span().start;
        let p = raw.into_inner();
        let address = |v: &Spanned<String>, field: &str| {
            socket_address(text, v, &format!("proxy {field}"), "127.0.0.1:7070")
        };
        let duration = |v: &Spanned<String>, field: &str| {
            parse_duration(v.get_ref())
                .map(Duration::from_nanos)
                .map_err(|m| err(v.span().start, format!("proxy {field}: {m}")))
        };
        if let Some(v) = &p.listen {
            s.listen = address(v, "listen")?;
        }
        if let Some(v) = &p.admin_listen {
            s.admin_listen = Some(address(v, "admin_listen")?);
        }
        if let Some(v) = p.admin_token_env {
            s.admin_token_env = v;
        }
        if let Some(v) = p.ca_dir {
            s.ca_dir = PathBuf::from(v);
        }
        if let Some(v) = p.state {
            s.state = PathBuf::from(v);
        }
        if let Some(v) = p.callback_secret_env {
            s.callback_secret_env = v;
        }
        if let Some(v) = &p.queue {
            let name = v.get_ref();
            // (part of Redis key names, as `run --queue`'s)
            let fits = !name.is_empty()
                && name.len() <= 100
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !fits {
                return Err(err(
                    v.span().start,
                    format!(
                        "proxy queue '{name}' must be 1 to 100 letters, digits, '-', '_' or '.'"
                    ),
                ));
            }
            s.queue = name.clone();
        }
        if let Some(v) = &p.max_wait {
            s.max_wait = duration(v, "max_wait")?;
        }
        if let Some(v) = &p.shutdown_grace {
            s.shutdown_grace = duration(v, "shutdown_grace")?;
        }
        if let Some(v) = &p.max_replay_bytes {
            s.max_replay_bytes = usize::try_from(*v.get_ref())
                .ok()
                .filter(|n| *n <= 1 << 30)
                .ok_or_else(|| {
                    err(
                        v.span().start,
                        "proxy max_replay_bytes must be at most 1073741824 (1 GiB)".into(),
                    )
                })?;
        }
        if let Some(v) = &p.max_kept_bytes {
            s.max_kept_bytes = usize::try_from(*v.get_ref()).unwrap_or(usize::MAX);
        }
        if s.max_kept_bytes < s.max_replay_bytes {
            let at = (p.max_kept_bytes.as_ref())
                .or(p.max_replay_bytes.as_ref())
                .map_or(table_at, |v| v.span().start);
            return Err(err(
                at,
                format!(
                    "proxy max_kept_bytes ({}) must be at least max_replay_bytes ({}), or a body could never be kept",
                    s.max_kept_bytes, s.max_replay_bytes
                ),
            ));
        }
        if let Some(v) = &p.access_log {
            s.access_log = AccessLog::parse(v.get_ref())
                .map_err(|m| err(v.span().start, format!("proxy access_log {m}")))?;
        }
        for raw_client in &p.client {
            let c = raw_client.get_ref();
            let name = c.name.get_ref().clone();
            let at = |offset: usize, m: String| err(offset, format!("proxy client '{name}': {m}"));
            if s.clients.iter().any(|k| k.name == name) {
                return Err(at(c.name.span().start, "is defined twice".into()));
            }
            let token_env = c.token_env.get_ref().clone();
            let token = env(&token_env).filter(|t| !t.is_empty()).ok_or_else(|| {
                at(
                    c.token_env.span().start,
                    format!("environment variable {token_env} (its token) is not set"),
                )
            })?;
            if s.clients.iter().any(|k| k.token == token) {
                return Err(at(
                    c.token_env.span().start,
                    format!("its token ({token_env}) is another client's too; each client needs its own"),
                ));
            }
            let priority = match &c.priority {
                Some(p) => Priority::parse(p.get_ref()).map_err(|m| at(p.span().start, m))?,
                None => Priority::Normal,
            };
            s.clients.push(Client {
                name,
                token_env,
                token,
                workflow: c.workflow.clone(),
                priority,
            });
        }
        s.check_exposure(env).map_err(|m| err(table_at, m))?;
        Ok(s)
    }

    /// Off loopback, the proxy needs client tokens (an open relay would
    /// spend the vendor's quota with its keys) and the admin listener its
    /// token. Checked again after command-line overrides.
    pub fn check_exposure(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), String> {
        if !self.listen.ip().is_loopback() && self.clients.is_empty() {
            return Err(format!(
                "proxy listen {} is not a loopback address: add [[proxy.client]] entries (name, token_env) so only your clients can spend the vendor's quota",
                self.listen
            ));
        }
        if let Some(admin) = self.admin_listen {
            // (the token is read only where it is needed: off loopback)
            let token = || env(&self.admin_token_env).filter(|t| !t.is_empty());
            if !admin.ip().is_loopback() && token().is_none() {
                return Err(format!(
                    "proxy admin_listen {admin} is not a loopback address: set {} to an admin token first",
                    self.admin_token_env
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "A_TOKEN" => Some("secret-a".into()),
            "B_TOKEN" => Some("secret-b".into()),
            _ => None,
        }
    }

    fn err(text: &str) -> String {
        ProxySettings::parse(text, &env).unwrap_err().to_string()
    }

    #[test]
    fn defaults_without_a_proxy_table() {
        let s = ProxySettings::parse("", &env).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:7070");
        assert_eq!(s.admin_listen.unwrap().to_string(), "127.0.0.1:9091");
        assert_eq!(s.max_wait, Duration::from_secs(30));
        assert!(s.clients.is_empty());
    }

    #[test]
    fn clients_carry_their_token_workflow_and_priority() {
        let s = ProxySettings::parse(
            "[proxy]\nlisten = \"0.0.0.0:7070\"\nmax_wait = \"5s\"\n[[proxy.client]]\nname = \"sync\"\ntoken_env = \"A_TOKEN\"\nworkflow = \"crm-sync\"\npriority = \"low\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(s.max_wait, Duration::from_secs(5));
        assert_eq!(s.clients[0].token, "secret-a");
        assert_eq!(s.clients[0].workflow.as_deref(), Some("crm-sync"));
        assert_eq!(s.clients[0].priority, Priority::Low);
        assert!(
            !format!("{s:?}").contains("secret-a"),
            "a token is never printed"
        );
    }

    #[test]
    fn errors_name_the_line_and_the_field() {
        assert_eq!(
            err("[proxy]\nlisten = \"0.0.0.0:7070\"\n"),
            "line 1: proxy listen 0.0.0.0:7070 is not a loopback address: add [[proxy.client]] entries (name, token_env) so only your clients can spend the vendor's quota"
        );
        assert_eq!(
            err("[proxy]\nmax_wait = \"soon\"\n"),
            format!(
                "line 2: proxy max_wait: {}",
                parse_duration("soon").unwrap_err()
            )
        );
        assert_eq!(
            err("[proxy]\n[[proxy.client]]\nname = \"x\"\ntoken_env = \"NOPE\"\n"),
            "line 4: proxy client 'x': environment variable NOPE (its token) is not set"
        );
        assert_eq!(
            err("[proxy]\n[[proxy.client]]\nname = \"x\"\ntoken_env = \"A_TOKEN\"\n[[proxy.client]]\nname = \"y\"\ntoken_env = \"A_TOKEN\"\n"),
            "line 7: proxy client 'y': its token (A_TOKEN) is another client's too; each client needs its own"
        );
        assert!(err("[proxy]\nlisten = \"here\"\n")
            .starts_with("line 2: proxy listen 'here' is not an address"));
        assert!(err("[proxy]\nlisen = \"x\"\n").contains("unknown field `lisen`"));
        assert_eq!(
            err("[proxy]\nmax_replay_bytes = 2000\nmax_kept_bytes = 1000\n"),
            "line 3: proxy max_kept_bytes (1000) must be at least max_replay_bytes (2000), or a body could never be kept"
        );
    }
}
