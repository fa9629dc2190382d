//! The admin listener: health, metrics, usage, config, reload, and the check
//! API for services that ask instead of proxying. With a token set (the
//! environment variable named by `admin_token_env`), every path but
//! `/healthz` needs `Authorization: Bearer TOKEN`.

use crate::gateway::{Gateway, PendingCheck, MAX_PENDING_CHECKS};
use crate::proxy::ResponseBody;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use tollgate_core::request::{encode_key, query_param};
use tollgate_core::units::{NANOS_PER_MICRO, NANOS_PER_SEC};
use tollgate_core::{Attrs, Clock, Item};
use tollgate_http::admin::{self, json, problem, reply};
use tollgate_http::Refusal;

/// The config in force as `/v1/config` shows it: as written, but for
/// webhook URLs and the store's password.
fn shown_config(text: &str) -> String {
    match text.parse::<toml_edit::DocumentMut>() {
        Ok(mut doc) => {
            tollgate_watch::settings::hide_secrets(&mut doc);
            doc.to_string()
        }
        Err(_) => "# the config in force cannot be shown\n".into(),
    }
}

/// A store key as the dashboard shows it: its parts separated by `|`, a
/// part taken from a credential header (a client's token or key) as a
/// digest, never as it is.
fn shown_part_by_part(parts: &[tollgate_core::policy::KeyPart], key: &str) -> String {
    use tollgate_core::policy::KeyPart;
    let credential = |name: &str| {
        matches!(name, "authorization" | "proxy-authorization" | "cookie")
            || ["token", "secret", "key", "auth", "session", "password"]
                .iter()
                .any(|w| name.contains(w))
    };
    tollgate_core::request::key_parts(key)
        .into_iter()
        .enumerate()
        .map(|(i, part)| match (part, parts.get(i)) {
            (None, _) => "-".to_string(),
            (Some(v), Some(KeyPart::Header(name))) if credential(name) => {
                tollgate_http::admin::stand_in(&v)
            }
            (Some(v), _) => v,
        })
        .collect::<Vec<_>>()
        .join("|")
}

/// Keys the dashboard lists as the busiest.
const BUSIEST_SHOWN: usize = 10;

/// What one key has left of one limit.
struct LimitLeft {
    name: String,
    algorithm: &'static str,
    remaining: u64,
    quota: u64,
    window: u64,
    reset_seconds: f64,
    unit: &'static str,
}

/// Largest admin request body (a check's attributes, a report).
const MAX_ADMIN_BODY: usize = 1 << 20;

/// `POST /v1/check`: the request attributes of a trace line (`t` is not needed).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckBody {
    #[serde(default)]
    t: Option<serde_json::Value>,
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    ip: Option<String>,
    query: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<serde_json::Value>,
}

/// `POST /v1/report`: a checked request completed after `latency` seconds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportBody {
    id: String,
    #[serde(default)]
    latency: f64,
}

impl Gateway {
    pub async fn admin(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, std::convert::Infallible> {
        let path = req.uri().path().to_string();
        if path != "/healthz" && !self.authorized(&req) {
            let generation = self.current();
            return Ok(Refusal::Unauthorized
                .response(&generation.settings.response, "admin")
                .map(Into::into));
        }
        let query = req.uri().query().unwrap_or("");
        let (scraped, searched) = (self.clone(), self.clone());
        if let Some(r) = tollgate_watch::admin::route(
            &self.watch,
            req.method(),
            &path,
            query,
            Arc::new(move || scraped.metrics_text()),
            Arc::new(move |key| searched.dashboard_extras(key)),
        )
        .await
        {
            return Ok(r);
        }
        let method = req.method().clone();
        Ok(match (method, path.as_str()) {
            (Method::GET, "/healthz") => reply(StatusCode::OK, "text/plain", "ok\n".into()),
            (Method::GET, "/metrics") => {
                reply(StatusCode::OK, admin::OPENMETRICS, self.metrics_text())
            }
            (Method::GET, "/v1/usage") => self.usage(req.uri().query().unwrap_or("")),
            (Method::GET, "/v1/config") => {
                let generation = self.current();
                let mut r = reply(
                    StatusCode::OK,
                    "application/toml",
                    shown_config(&generation.text),
                );
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
                        "limits": r.limits,
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
            (Method::POST, "/v1/check") => match read_json::<CheckBody>(req).await {
                Ok(body) => self.check(body).await,
                Err(e) => e,
            },
            (Method::POST, "/v1/report") => match read_json::<ReportBody>(req).await {
                Ok(body) => self.report(body).await,
                Err(e) => e,
            },
            (_, "/healthz" | "/metrics" | "/v1/usage" | "/v1/config" | "/v1/reload" | "/v1/check" | "/v1/report") => problem(
                StatusCode::METHOD_NOT_ALLOWED,
                "Method not allowed",
                format!("{path} does not take this method"),
            ),
            _ => problem(
                StatusCode::NOT_FOUND,
                "Not found",
                format!("{path} is not an admin path; see /healthz, /metrics, /v1/usage, /v1/config, /v1/reload, /v1/check, /v1/report"),
            ),
        })
    }

    /// The text `/metrics` serves, with the store's and holds' figures as
    /// they are now.
    pub fn metrics_text(&self) -> String {
        let generation = self.current();
        let stats = generation.engine.store().stats();
        self.metrics.held_now.set(self.holds.held() as i64);
        self.metrics
            .upstream_idle
            .set(self.idle_upstream_connections() as i64);
        if let Some(health) = generation.engine.health() {
            self.metrics.shared_store(health);
        }
        self.metrics.render(stats)
    }

    /// What the gateway's dashboard adds: its busiest keys, and what the
    /// key searched (parts separated by `|`) has left of each limit.
    fn dashboard_extras(&self, key: Option<&str>) -> tollgate_watch::dashboard::Extras {
        let generation = self.current();
        let policy = generation.engine.policy();
        let now = self.clock.now();
        let busiest = generation
            .engine
            .store()
            .busiest(policy, now, BUSIEST_SHOWN)
            .into_iter()
            .map(
                |(limit, key, remaining, quota)| tollgate_watch::dashboard::BusyKey {
                    limit: policy.limits[limit].name.clone(),
                    key: shown_part_by_part(&policy.limits[limit].key, &key),
                    used: (quota - remaining) as f64,
                    quota: quota as f64,
                },
            )
            .collect();
        let lookup = key.map(|key| {
            let parts: Vec<&str> = key.split('|').map(str::trim).collect();
            let left = self
                .limits_left(&parts, 0, None)
                .into_iter()
                .map(|l| tollgate_watch::dashboard::KeyLimit {
                    limit: l.name,
                    remaining: l.remaining as f64,
                    quota: l.quota as f64,
                    unit: l.unit.to_string(),
                })
                .collect();
            (key.to_string(), left)
        });
        tollgate_watch::dashboard::Extras {
            listen: generation
                .settings
                .admin_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
            busiest,
            lookup,
        }
    }

    /// What the key of `parts` has left of each limit keyed by that many
    /// parts (only `only` when given), in class `class` (0: the default).
    fn limits_left(&self, parts: &[&str], class: usize, only: Option<&str>) -> Vec<LimitLeft> {
        let generation = self.current();
        let policy = generation.engine.policy();
        let key = encode_key(parts);
        let now = self.clock.now();
        let mut out = Vec::new();
        for (index, limit) in policy.limits.iter().enumerate() {
            if limit.key.len() != parts.len() || only.is_some_and(|o| o != limit.name) {
                continue;
            }
            let item = Item {
                limit: index,
                class: limit.variant_for(&key, class),
                key: key.clone(),
                cost: 1,
                charge: 1,
            };
            let usage = generation.engine.usage(&item, now);
            let (quota, window) = limit.params(item.class).policy();
            out.push(LimitLeft {
                name: limit.name.clone(),
                algorithm: limit.algorithm.name(),
                remaining: usage.remaining,
                quota,
                window,
                reset_seconds: usage.reset as f64 / NANOS_PER_SEC as f64,
                unit: if limit.is_latency() {
                    "microseconds"
                } else {
                    "requests"
                },
            });
        }
        out
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        admin::admin_allowed(req, self.admin_token.as_deref())
    }

    /// `GET /v1/usage?key=PART[&key=PART..][&class=NAME][&limit=NAME]`: what
    /// one key has left of each limit keyed by that many parts.
    fn usage(&self, query: &str) -> Response<ResponseBody> {
        let parts: Vec<Cow<'_, str>> = query
            .split('&')
            .filter(|p| p.starts_with("key="))
            .filter_map(|p| query_param(p, "key"))
            .collect();
        if parts.is_empty() {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "give the key as ?key=VALUE (one key= per part of a multi-part key)".into(),
            );
        }
        let generation = self.current();
        let policy = generation.engine.policy();
        let class = match query_param(query, "class") {
            None => 0,
            Some(name) => match policy.classes.iter().position(|c| c.name == name) {
                Some(i) => i + 1,
                None => {
                    return problem(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        format!("class '{name}' is not in the config"),
                    )
                }
            },
        };
        let only = query_param(query, "limit");
        let refs: Vec<&str> = parts.iter().map(|p| p.as_ref()).collect();
        let mut limits = serde_json::Map::new();
        for l in self.limits_left(&refs, class, only.as_deref()) {
            limits.insert(
                l.name,
                serde_json::json!({
                    "algorithm": l.algorithm,
                    "remaining": l.remaining,
                    "quota": l.quota,
                    "window_seconds": l.window,
                    "reset_seconds": l.reset_seconds,
                    "unit": l.unit,
                }),
            );
        }
        json(
            StatusCode::OK,
            serde_json::json!({ "key": refs, "limits": limits }),
        )
    }

    /// `POST /v1/check`: decide (and commit) as if the request had come
    /// through the proxy. Holds are not applied: the answer is immediate, with
    /// `retry_after` for the caller to wait. A decision that owes a
    /// completion (latency or concurrency limits) carries an `id` for
    /// `/v1/report`.
    async fn check(&self, body: CheckBody) -> Response<ResponseBody> {
        let generation = self.current();
        let attrs = Attrs {
            method: body.method.unwrap_or_else(|| "GET".into()),
            path: body.path.unwrap_or_else(|| "/".into()),
            host: body.host,
            ip: body.ip,
            headers: body
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
            query: body.query,
            body: body.body,
        };
        let now = self.clock.now();
        let t = body
            .t
            .map_or_else(|| format!("{:.6}", now as f64 / 1e9), |t| t.to_string());
        let mut items = Vec::new();
        let engine = &generation.engine;
        let result = match engine.policy().plan(&attrs, &mut items) {
            Ok(()) => engine.decide_async(&items, now, false).await,
            Err(e) => Err(e.into()),
        };
        let mut out = Vec::new();
        let decision = match result {
            Err(e) => {
                tollgate_sim::write_error(&mut out, &t, &e);
                let status = match e {
                    tollgate_store::EngineError::Request(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                return reply(
                    status,
                    "application/json",
                    String::from_utf8_lossy(&out).into(),
                );
            }
            Ok(d) => d,
        };
        let (decision, local) = decision;
        tollgate_sim::write_decision(&mut out, &t, engine.policy(), &items, &decision);
        let mut text = String::from_utf8_lossy(&out).into_owned();
        let committed: Vec<Item> = tollgate_store::committed(&items, &decision)
            .filter(|i| engine.policy().limits[i.limit].settles_at_completion())
            .cloned()
            .collect();
        if !committed.is_empty() {
            let id = self.next_request_id().replacen("req_", "chk_", 1);
            // The lock is released before any await.
            let unplaced = {
                let mut pending = self.pending.lock();
                if pending.len() >= MAX_PENDING_CHECKS {
                    Some(committed)
                } else {
                    pending.insert(
                        id.clone(),
                        PendingCheck {
                            generation: generation.clone(),
                            items: committed,
                            created: tokio::time::Instant::now(),
                            local,
                        },
                    );
                    None
                }
            };
            if let Some(committed) = unplaced {
                // It could never be reported: release it now rather than leak the slot.
                engine.settle(&committed, now, 0, local).await;
                return problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Too many unreported checks",
                    format!(
                        "{MAX_PENDING_CHECKS} checks are waiting for /v1/report; report them first"
                    ),
                );
            }
            // Splice the id into the decision object.
            text.truncate(text.trim_end().len() - 1);
            text.push_str(&format!(",\"id\":\"{id}\"}}\n"));
        }
        reply(StatusCode::OK, "application/json", text)
    }

    /// `POST /v1/report`: debit the latency and release the concurrency of a check.
    async fn report(&self, body: ReportBody) -> Response<ResponseBody> {
        if !(body.latency.is_finite() && (0.0..=1e9).contains(&body.latency)) {
            return problem(
                StatusCode::BAD_REQUEST,
                "Bad request",
                format!(
                    "latency must be seconds between 0 and 1e9, got {}",
                    body.latency
                ),
            );
        }
        let Some(pending) = self.pending.lock().remove(&body.id) else {
            return problem(
                StatusCode::NOT_FOUND,
                "Unknown check",
                format!("no check '{}' is waiting for a report (already reported, expired, or never issued)", body.id),
            );
        };
        let now = self.clock.now();
        let latency_us = (body.latency * 1e6).round() as u64;
        pending
            .generation
            .engine
            .settle(&pending.items, now, latency_us, pending.local)
            .await;
        json(
            StatusCode::OK,
            serde_json::json!({ "reported": body.id, "latency_us": latency_us, "at_us": now / NANOS_PER_MICRO }),
        )
    }

    /// Settle checks never reported within `ttl`: release their concurrency
    /// slots (charging no latency). Returns how many.
    pub fn expire_checks(&self, ttl: std::time::Duration) -> usize {
        let now = self.clock.now();
        let expired: Vec<PendingCheck> = {
            let mut pending = self.pending.lock();
            let old: Vec<String> = pending
                .iter()
                .filter(|(_, p)| p.created.elapsed() >= ttl)
                .map(|(id, _)| id.clone())
                .collect();
            old.iter().filter_map(|id| pending.remove(id)).collect()
        };
        for p in &expired {
            p.generation.engine.finish_where(&p.items, now, 0, p.local);
        }
        expired.len()
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<ResponseBody>> {
    let bytes = Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|e| {
            problem(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Body not read",
                format!("the body could not be read (at most {MAX_ADMIN_BODY} bytes): {e}"),
            )
        })?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        problem(
            StatusCode::BAD_REQUEST,
            "Bad JSON",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}
