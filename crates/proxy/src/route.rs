//! Which upstream a request is for, and the URL it goes to. Two ways in:
//! an alias (`/<upstream>/<path>` on the proxy's own address: the client
//! changes only its base URL) and a forward proxy for `http://` URLs
//! (absolute-form, as `HTTP_PROXY` sends them). A request for a host no
//! upstream names is refused: tollgate never relays anywhere else.

use crate::state::Generation;
use hyper::http::request::Parts;
use tollgate_http::{normalize_path, Refusal};
use url::Url;

#[derive(Debug)]
pub struct Routed {
    pub upstream: usize,
    /// Where the request goes.
    pub url: Url,
}

/// Whether a request of this head is an absolute-form (forward proxy) or
/// CONNECT request: a refusal then is a 407, not a 401.
pub fn is_forward(parts: &Parts) -> bool {
    parts.method == hyper::Method::CONNECT || parts.uri.scheme().is_some()
}

pub fn route(generation: &Generation, parts: &Parts) -> Result<Routed, Refusal> {
    let uri = &parts.uri;
    if let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) {
        let host = authority.host().to_string();
        let path = normalize_path(uri.path());
        let text = match uri.query() {
            Some(q) => format!("{scheme}://{authority}{path}?{q}"),
            None => format!("{scheme}://{authority}{path}"),
        };
        let url = Url::parse(&text).map_err(|e| {
            Refusal::BadRequest(format!("the request URL {text} is not valid: {e}"))
        })?;
        let upstream = generation
            .config
            .upstream_for(&url)
            .ok_or(Refusal::HostNotConfigured { host })?;
        return Ok(Routed { upstream, url });
    }
    // The alias: normalized first, so `..` cannot climb out of the base path.
    let path = normalize_path(uri.path());
    let rest = path.trim_start_matches('/');
    let (name, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let upstream = generation
        .upstream(name)
        .ok_or_else(|| Refusal::UnknownUpstream {
            name: name.to_string(),
            known: generation
                .config
                .upstreams
                .iter()
                .map(|u| u.name.clone())
                .collect(),
        })?;
    let base = &generation.config.upstreams[upstream].base_url;
    let mut url = base.clone();
    // (joined by hand: `format!` costs more than the path, per request)
    let base_path = base.path().trim_end_matches('/');
    let mut joined = String::with_capacity(base_path.len() + 1 + rest.len());
    joined.push_str(base_path);
    joined.push('/');
    joined.push_str(rest);
    url.set_path(&joined);
    url.set_query(uri.query());
    // The URL parser reads more than '/' as a separator ('\\' in http URLs):
    // what it made must still be under the upstream's base.
    if !tollgate_comply::settings::under(&url, base) {
        return Err(Refusal::BadRequest(format!(
            "the path {} leaves upstream '{name}''s base URL",
            uri.path()
        )));
    }
    Ok(Routed { upstream, url })
}
