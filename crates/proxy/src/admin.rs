//! The proxy's admin listener: `/healthz`, `/metrics`, `/v1/usage`,
//! `/v1/config` and `POST /v1/reload`, as `serve` has them, and `POST
//! /v1/cache/purge`, behind the admin token when one is set.

use crate::call::ResponseBody;
use crate::state::Proxy;
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use std::borrow::Cow;
use std::sync::Arc;
use tollgate_core::request::query_param;
use tollgate_core::units::NANOS_PER_SEC;
use tollgate_core::Clock;
use tollgate_http::admin::{self, json, problem, reply};
use tollgate_http::Refusal;

const PATHS: &str =
    "/, /healthz, /metrics, /v1/alerts, /v1/usage, /v1/config, /v1/reload, /v1/cache/purge, /v1/dlq/retry";
/// The most of an admin request's body read (a purge, a retry).
const MAX_ADMIN_BODY: usize = 64 * 1024;

impl Proxy {
    pub async fn admin(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let path = req.uri().path().to_string();
        if path != "/healthz" && !admin::admin_allowed(&req, self.admin_token.as_deref()) {
            return Ok(Refusal::Unauthorized
                .response(&tollgate_http::ResponseSettings::default(), "admin")
                .map(Into::into));
        }
        let listen = generation_listen(&self);
        let scraped = self.clone();
        let query = req.uri().query().unwrap_or("");
        if let Some(r) = tollgate_watch::admin::route(
            &self.watch,
            req.method(),
            &path,
            query,
            Arc::new(move || scraped.metrics_text()),
            Arc::new(move |_| tollgate_watch::dashboard::Extras {
                listen: listen.clone(),
                ..Default::default()
            }),
        )
        .await
        {
            return Ok(r);
        }
        Ok(match (req.method().clone(), path.as_str()) {
            (Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            (Method::GET, "/metrics") => {
                reply(StatusCode::OK, admin::OPENMETRICS, self.metrics_text())
            }
            (Method::GET, "/v1/usage") => self.usage(req.uri().query().unwrap_or("")),
            (Method::GET, "/v1/config") => {
                let generation = self.current();
                let mut r = reply(StatusCode::OK, "application/toml", shown(&generation.text));
                if let Ok(v) = HeaderValue::from_str(&generation.loaded_at.to_string()) {
                    r.headers_mut().insert("x-tollgate-loaded-at", v);
                }
                r
            }
            (Method::POST, "/v1/reload") => match self.reload().await {
                Ok(r) => json(
                    StatusCode::OK,
                    serde_json::json!({
                        "reloaded": true,
                        "upstreams": r.upstreams,
                        "kept": r.kept,
                        "carried": r.carried,
                        "fresh": r.fresh,
                    }),
                ),
                Err(e) => problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Config rejected; the previous config keeps serving",
                    e.to_string(),
                ),
            },
            (Method::POST, "/v1/cache/purge") => self.purge(req).await,
            (Method::POST, "/v1/dlq/retry") => self.retry_dead(req).await,
            (
                _,
                "/healthz" | "/metrics" | "/v1/usage" | "/v1/config" | "/v1/reload"
                | "/v1/cache/purge" | "/v1/dlq/retry",
            ) => problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                format!("{path} does not take this method"),
            ),
            _ => problem(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("{path} is not an admin path; see {PATHS}"),
            ),
        })
    }

    /// The text `/metrics` serves: the counters, and each line and the
    /// jobs as they are now.
    pub fn metrics_text(&self) -> String {
        let generation = self.current();
        let lines = generation
            .config
            .upstreams
            .iter()
            .zip(&generation.lines)
            .map(|(u, l)| {
                let now = l.line.clock().now();
                l.line.inspect(|s| crate::metrics::LineNow {
                    upstream: u.name.clone(),
                    waiting: s.queued(),
                    in_flight: s.in_flight(),
                    effective_rate: s.pacing_rate(now),
                    limits_rate: s.limits_rate(),
                    cache: (!l.cache.is_empty() && !l.cache.is_shared())
                        .then(|| l.cache.sizes().into_iter().sum()),
                    reserve_calls: s.counters().reserve_used,
                    remaining: u.limits_remaining(s.engine(), now),
                    key_remaining: u.key_limits_remaining(s.engine(), now),
                })
            });
        let jobs = self.jobs.now(self.clock.now());
        self.metrics.render(lines, &jobs)
    }

    /// `POST /v1/cache/purge {"upstream": NAME, "prefix": "/path"}`: the
    /// upstream's cached entries at or under the prefix go (`/`: all).
    /// `POST /v1/dlq/retry {"ids": [...]}`: the dead letters named (all
    /// when `ids` is empty or absent) are queued again with a fresh attempt
    /// count, as `tollgate dlq retry` does on a state no process holds.
    async fn retry_dead(self: &Arc<Self>, req: Request<Incoming>) -> Response<ResponseBody> {
        #[derive(serde::Deserialize, Default)]
        #[serde(deny_unknown_fields)]
        struct Retry {
            #[serde(default)]
            ids: Vec<String>,
        }
        let shape = "the body must be {\"ids\": [ID, ...]} (or empty: every dead letter)";
        let body = match read_body(req, shape).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let retry: Retry = match body.is_empty() {
            true => Retry::default(),
            false => match serde_json::from_slice(&body) {
                Ok(r) => r,
                Err(e) => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        format!("{shape}: {e}"),
                    )
                }
            },
        };
        match self.requeue_dead(retry.ids).await {
            Ok((requeued, unknown)) => json(
                StatusCode::OK,
                serde_json::json!({ "requeued": requeued, "not_dead_letters": unknown }),
            ),
            Err(e) => problem(StatusCode::NOT_FOUND, "No dead letters here", e),
        }
    }

    async fn purge(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Purge {
            upstream: String,
            prefix: String,
        }
        let shape = "the body must be {\"upstream\": NAME, \"prefix\": \"/path\"}";
        let body = match read_body(req, shape).await {
            Ok(body) => body,
            Err(refused) => return refused,
        };
        let purge: Purge = match serde_json::from_slice(&body) {
            Ok(p) => p,
            Err(e) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    "Bad request",
                    format!("{shape}: {e}"),
                )
            }
        };
        if !purge.prefix.starts_with('/') {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad request",
                format!("prefix '{}' must start with '/'", purge.prefix),
            );
        }
        let generation = self.current();
        let Some(index) = generation.upstream(&purge.upstream) else {
            return problem(
                StatusCode::NOT_FOUND,
                "No such upstream",
                format!("no upstream is named '{}'", purge.upstream),
            );
        };
        let cache = &generation.lines[index].cache;
        if cache.is_empty() {
            return problem(
                StatusCode::NOT_FOUND,
                "No cache",
                format!(
                    "upstream '{}' has no [[upstream.cache]] routes",
                    purge.upstream
                ),
            );
        }
        if let Err(e) = cache.purge(&purge.prefix).await {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "Purged here only",
                format!("the entries kept in this process went, but the fleet's shared cache was not purged: {e}"),
            );
        }
        json(
            StatusCode::OK,
            serde_json::json!({ "purged": true, "upstream": purge.upstream, "prefix": purge.prefix }),
        )
    }

    /// `GET /v1/usage[?upstream=NAME][&key=PART..]`: per upstream, its line
    /// (waiting, in flight, paused, breaker) and what is left of each limit
    /// under the key, or without one under the upstream's own credentials
    /// (a row per pooled key) for limits keyed by them.
    fn usage(&self, query: &str) -> Response<ResponseBody> {
        let generation = self.current();
        let only = query_param(query, "upstream");
        let parts: Vec<Cow<'_, str>> = query
            .split('&')
            .filter(|p| p.starts_with("key="))
            .filter_map(|p| query_param(p, "key"))
            .collect();
        let refs: Vec<&str> = parts.iter().map(|p| p.as_ref()).collect();
        let key = tollgate_core::request::encode_key(&refs);
        if let Some(name) = &only {
            if generation.upstream(name).is_none() {
                return problem(
                    StatusCode::NOT_FOUND,
                    "No such upstream",
                    format!("no upstream is named '{name}'"),
                );
            }
        }
        let now = self.clock.now();
        let secs = |ns: u64| ns as f64 / NANOS_PER_SEC as f64;
        // The pending jobs this process holds, per workflow.
        let jobs = self.jobs.now(now);
        let upstreams: Vec<serde_json::Value> = generation
            .config
            .upstreams
            .iter()
            .zip(&generation.lines)
            .filter(|(u, _)| only.as_deref().is_none_or(|n| n == u.name))
            .map(|(u, l)| {
                l.line.inspect(|s| {
                    let engine = s.engine();
                    // Without ?key=, each limit is shown under the upstream's
                    // own credentials (each pooled key's, or its headers'), as
                    // the limits see them.
                    let pool: Vec<(Option<&str>, Option<&str>)> = if u.keys.is_empty() {
                        vec![(None, None)]
                    } else {
                        u.keys
                            .iter()
                            .map(|k| (Some(k.label.as_str()), Some(k.stand_in.as_str())))
                            .collect()
                    };
                    let own = |limit: &tollgate_core::policy::Limit, pooled: Option<&str>| {
                        u.own_key(limit, pooled)
                    };
                    let mut limits: Vec<serde_json::Value> = Vec::new();
                    for (i, limit) in engine.policy().limits.iter().enumerate() {
                        for (label, pooled) in &pool {
                            let key = if parts.is_empty() {
                                match own(limit, *pooled) {
                                    Some(k) => k,
                                    None => continue,
                                }
                            } else if limit.key.len() == parts.len() {
                                key.clone()
                            } else {
                                continue;
                            };
                            let usage = tollgate_comply::settings::usage_of(engine, i, key, now);
                            let mut row = serde_json::json!({
                                "limit": limit.name,
                                "quota": limit.params(0).policy().0,
                                "remaining": usage.remaining,
                                "reset": secs(usage.reset),
                            });
                            if let (Some(label), true) = (label, parts.is_empty()) {
                                row["key"] = (*label).into();
                            }
                            limits.push(row);
                        }
                    }
                    let c = s.counters();
                    // Keys by how the config names them: never their values.
                    let keys: Vec<serde_json::Value> = u
                        .keys
                        .iter()
                        .zip(l.keys.status())
                        .map(|(k, status)| {
                            serde_json::json!({
                                "key": k.label,
                                "waiting": status.waiting,
                                "parked": status.parked,
                            })
                        })
                        .collect();
                    serde_json::json!({
                        "upstream": u.name,
                        "waiting": s.queued(),
                        "in_flight": s.in_flight(),
                        "paused_for": secs(s.paused_until().saturating_sub(now)),
                        "breaker_open_for": s.breaker_open_until().map(|t| secs(t.saturating_sub(now))),
                        "sent": c.sent,
                        "throttled": c.throttled,
                        "retried": c.retried,
                        "reserve_calls": c.reserve_used,
                        "borrowed": c.borrowed,
                        "limits": limits,
                        "keys": keys,
                        "jobs": jobs
                            .iter()
                            .filter(|j| j.upstream == u.name)
                            .map(|j| serde_json::json!({
                                "workflow": j.workflow,
                                "pending": j.pending,
                                "oldest_seconds": j.oldest_seconds,
                            }))
                            .collect::<Vec<_>>(),
                    })
                })
            })
            .collect();
        json(
            StatusCode::OK,
            serde_json::json!({ "upstreams": upstreams }),
        )
    }
}

/// The config's text as `/v1/config` shows it: as written, except
/// - an upstream header whose value is written in the file shows its
///   stand-in (`sha256:...`): only what comes from the environment
///   (`${VAR}`, with at most a short word such as `Bearer` around it) is
///   shown as written, so a vendor key written there is never served;
/// - `[store] url` shows no password.
///
/// (Pool keys and client tokens come from the environment only.)
/// The admin listener's address, for the dashboard's title.
fn generation_listen(proxy: &Proxy) -> String {
    proxy
        .current()
        .settings
        .admin_listen
        .map(|a| a.to_string())
        .unwrap_or_default()
}

fn shown(text: &str) -> String {
    let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
        return "# the config in force cannot be shown\n".into();
    };
    let redact = |headers: &mut dyn toml_edit::TableLike| {
        for (_, value) in headers.iter_mut() {
            let secret = value.as_str().filter(|v| !from_environment(v));
            if let Some(secret) = secret {
                *value = toml_edit::value(tollgate_comply::settings::stand_in(secret));
            }
        }
    };
    match doc.get_mut("upstream") {
        // [[upstream]] tables
        Some(toml_edit::Item::ArrayOfTables(upstreams)) => {
            for upstream in upstreams.iter_mut() {
                if let Some(h) = upstream
                    .get_mut("headers")
                    .and_then(|h| h.as_table_like_mut())
                {
                    redact(h);
                }
            }
        }
        // upstream = [{ ... }, ...]
        Some(toml_edit::Item::Value(toml_edit::Value::Array(upstreams))) => {
            for upstream in upstreams.iter_mut() {
                let headers = upstream
                    .as_inline_table_mut()
                    .and_then(|u| u.get_mut("headers"))
                    .and_then(|h| h.as_inline_table_mut());
                if let Some(h) = headers {
                    redact(h);
                }
            }
        }
        _ => {}
    }
    tollgate_watch::settings::hide_secrets(&mut doc);
    doc.to_string()
}

/// Whether a header value is taken from the environment: `${VAR}`
/// references with at most a short word (`Bearer`, `Token`) around them.
fn from_environment(value: &str) -> bool {
    let mut rest = value;
    let mut literal = String::new();
    let mut references = 0;
    while let Some(at) = rest.find("${") {
        let Some(end) = rest[at..].find('}') else {
            return false;
        };
        literal.push_str(&rest[..at]);
        literal.push(' ');
        rest = &rest[at + end + 1..];
        references += 1;
    }
    literal.push_str(rest);
    references > 0
        && literal
            .split(|c: char| !c.is_ascii_alphanumeric())
            .all(|word| word.len() <= 12)
}

/// An admin request's body (at most `MAX_ADMIN_BODY`), or a 400 saying
/// what `shape` it must have.
async fn read_body(
    req: Request<Incoming>,
    shape: &str,
) -> Result<bytes::Bytes, Response<ResponseBody>> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY);
    match http_body_util::BodyExt::collect(limited).await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) => Err(problem(
            StatusCode::BAD_REQUEST,
            "Bad request",
            format!("{shape}; it could not be read: {e}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::shown;

    #[test]
    fn header_values_written_in_the_file_are_shown_by_their_stand_ins() {
        let text = "[proxy]\nmax_wait = \"5s\"\n\n[[upstream]]\nname = \"crm\"\nheaders = { authorization = \"Bearer sk-live-123\", x-version = \"${CRM_VERSION}\" }\n\n[[upstream]]\nname = \"erp\"\n[upstream.headers]\nx-api-key = \"k-456\"\n";
        let out = shown(text);
        assert!(
            !out.contains("sk-live-123") && !out.contains("k-456"),
            "{out}"
        );
        assert!(out.contains("sha256:"), "{out}");
        assert!(out.contains("x-version = \"${CRM_VERSION}\""), "{out}");
        assert!(
            out.starts_with("[proxy]\nmax_wait = \"5s\"\n"),
            "the rest as written: {out}"
        );
    }

    #[test]
    fn inline_upstreams_mixed_values_and_the_store_password_are_not_shown() {
        let text = "upstream = [{ name = \"crm\", headers = { authorization = \"Bearer sk-live-123\" } }]\n\n[store]\nkind = \"redis\"\nurl = \"redis://:hunter2-pass@127.0.0.1:6379\"\n";
        let out = shown(text);
        assert!(
            !out.contains("sk-live-123") && !out.contains("hunter2"),
            "{out}"
        );
        assert!(out.contains("redis://:***@127.0.0.1:6379"), "{out}");
        for (value, env) in [
            ("${TOKEN}", true),
            ("Bearer ${TOKEN}", true),
            ("Token token=${A}, user=${B}", true),
            ("Bearer sk-live-abcdefghijklmnop${SUFFIX}", false),
            ("Bearer ${UNCLOSED", false),
            ("Bearer sk-live-123", false),
        ] {
            assert_eq!(super::from_environment(value), env, "{value}");
        }
    }
}
