//! Jobs: one HTTP request each, read from a JSONL file or cut from records
//! by a bulk template. Bad lines are errors naming the line; nothing is sent
//! until every line is good.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::BufRead;
use tollgate_comply::settings::{Upstream, UpstreamsConfig, UrlParts, RECORDS_PLACEHOLDER};
pub use tollgate_comply::Priority;
use tollgate_core::hex::hex_after;
use url::Url;

/// Most bad lines reported at once.
const MAX_ERRORS: usize = 20;
pub use tollgate_comply::settings::callback_url;
pub use tollgate_comply::WORKFLOW_HEADER;

/// A job as stored: what is sent, and how it is scheduled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub method: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// The body as sent (JSON text when `json` is true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    #[serde(default)]
    pub json: bool,
    pub priority: Priority,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    pub idempotency_key: String,
    /// Where its result is POSTed when it is final (`callback`, or the
    /// intake's `Tollgate-Callback`); a coordinator (`tollgate proxy`)
    /// delivers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback: Option<String>,
    /// The proxy client that pushed it: only that client may ask for its
    /// status and result (None: pushed without client tokens, or a file's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
}

impl Job {
    /// A stand-in for a stored job that cannot be read: only its id is
    /// known, for its dead letter (which says why).
    pub fn unreadable(id: &str) -> Job {
        Job {
            id: id.to_string(),
            method: String::new(),
            url: String::new(),
            headers: Vec::new(),
            body: None,
            json: false,
            priority: Priority::Normal,
            workflow: None,
            idempotency_key: String::new(),
            callback: None,
            client: None,
        }
    }

    /// The job as a line of a jobs file: read back by `read_jobs`, it is
    /// this job again (how `tollgate run --submit` hands jobs, even ones cut
    /// by a bulk template, to a coordinator).
    pub fn to_line(&self) -> String {
        let mut line = serde_json::Map::new();
        let text = |s: &str| serde_json::Value::String(s.to_string());
        line.insert("id".into(), text(&self.id));
        line.insert("method".into(), text(&self.method));
        line.insert("url".into(), text(&self.url));
        if !self.headers.is_empty() {
            let headers = self
                .headers
                .iter()
                .map(|(n, v)| (n.clone(), text(v)))
                .collect();
            line.insert("headers".into(), serde_json::Value::Object(headers));
        }
        match (&self.body, self.json) {
            (Some(body), true) => {
                let value = serde_json::from_str(body).unwrap_or_else(|_| text(body));
                line.insert("body".into(), value);
            }
            (Some(body), false) => {
                line.insert("body_text".into(), text(body));
            }
            (None, _) => {}
        }
        let priority = match self.priority {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        };
        line.insert("priority".into(), text(priority));
        if let Some(w) = &self.workflow {
            line.insert("workflow".into(), text(w));
        }
        line.insert("idempotency_key".into(), text(&self.idempotency_key));
        if let Some(c) = &self.callback {
            line.insert("callback".into(), text(c));
        }
        serde_json::Value::Object(line).to_string()
    }
}

/// The upstream index of each job, next to it.
#[derive(Debug, Clone)]
pub struct Routed {
    pub upstream: usize,
    pub job: Job,
}

/// Bad input: the line (1-based) of the jobs or records file, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("{}", describe(.0))]
    Lines(Vec<LineError>),
    #[error("bulk '{name}' is not in the config; known: {known}")]
    UnknownBulk { name: String, known: String },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

fn describe(errors: &[LineError]) -> String {
    let mut text: Vec<String> = errors
        .iter()
        .map(|e| format!("line {}: {}", e.line, e.message))
        .collect();
    if errors.len() >= MAX_ERRORS {
        text.push(format!("(stopped after {MAX_ERRORS} bad lines)"));
    }
    format!(
        "{} bad line(s), nothing was queued:\n  {}",
        errors.len(),
        text.join("\n  ")
    )
}

/// One line of a jobs file. Only `method` and `url` are required.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JobLine {
    id: Option<IdText>,
    method: String,
    url: String,
    #[serde(default)]
    headers: HashMap<String, String>,
    body: Option<serde_json::Value>,
    body_text: Option<String>,
    priority: Option<String>,
    workflow: Option<String>,
    idempotency_key: Option<String>,
    callback: Option<String>,
    /// Written by `tollgate dlq export` (why it failed); ignored on input.
    #[serde(rename = "dead_letter")]
    _dead_letter: Option<serde_json::Value>,
}

enum IdText {
    Text(String),
    Number(u64),
}

impl<'de> Deserialize<'de> for IdText {
    /// A text or a whole number; anything else is named as what `id` takes
    /// (serde's untagged enums only say that "data did not match").
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Id;
        impl serde::de::Visitor<'_> for Id {
            type Value = IdText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("id: a text or a whole number of at least 0")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IdText, E> {
                Ok(IdText::Number(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IdText, E> {
                u64::try_from(v).map(IdText::Number).map_err(|_| {
                    E::custom(format!(
                        "{v} is negative; expected id: a text or a whole number"
                    ))
                })
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IdText, E> {
                Ok(IdText::Text(v.to_string()))
            }
        }
        d.deserialize_any(Id)
    }
}

/// The key of the JSON member whose value ends before `column` (1-based)
/// of `line`: where serde says a value of the wrong type is, the field it
/// belongs to (`"workflow": 1` names `workflow`).
fn json_key_before(line: &str, column: usize) -> Option<&str> {
    let before = line.get(..column.min(line.len()))?;
    let colon = before.rfind("\":")?;
    let start = before[..colon].rfind('"')?;
    Some(&before[start + 1..colon])
}

/// A line of a JSONL file as text (without its `\r\n` or `\n`, and a
/// byte-order mark at the start of the first skipped), or an error naming
/// the line and where its bytes stop being UTF-8: one such line is reported
/// with the others, not the end of the reading.
fn text_of(mut bytes: Vec<u8>, line_no: usize) -> Result<String, LineError> {
    if bytes.last() == Some(&b'\r') {
        bytes.pop();
    }
    if line_no == 1 && bytes.starts_with(b"\xEF\xBB\xBF") {
        bytes.drain(..3);
    }
    String::from_utf8(bytes).map_err(|e| LineError {
        line: line_no,
        message: format!(
            "the line is not UTF-8 text (from byte {})",
            e.utf8_error().valid_up_to() + 1
        ),
    })
}

/// Read a JSONL jobs file: every line a job, routed to its upstream.
pub fn read_jobs(input: impl BufRead, config: &UpstreamsConfig) -> Result<Vec<Routed>, JobsError> {
    let mut jobs = Vec::new();
    let mut errors = Vec::new();
    let mut ids: HashMap<String, usize> = HashMap::new();
    let mut seen_content: HashMap<String, u32> = HashMap::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line_no = i + 1;
        let line = line.map_err(|source| JobsError::Io {
            what: "the jobs file".into(),
            source,
        })?;
        let line = match text_of(line, line_no) {
            Ok(line) => line,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match job_from_line(&line, config, &mut seen_content) {
            Ok(routed) => match ids.insert(routed.job.id.clone(), line_no) {
                Some(first) => errors.push(LineError {
                    line: line_no,
                    message: format!(
                        "id '{}' is also on line {first}; ids must be unique",
                        routed.job.id
                    ),
                }),
                None => jobs.push(routed),
            },
            Err(message) => errors.push(LineError {
                line: line_no,
                message,
            }),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(JobsError::Lines(errors))
    }
}

fn job_from_line(
    line: &str,
    config: &UpstreamsConfig,
    seen_content: &mut HashMap<String, u32>,
) -> Result<Routed, String> {
    let raw: JobLine =
        serde_json::from_str(line).map_err(|e| match json_key_before(line, e.column()) {
            Some(key) if e.is_data() => format!("not a job: field {key}: {e}"),
            _ => format!("not a job: {e}"),
        })?;
    let method = raw.method.to_ascii_uppercase();
    if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
        return Err(format!("method '{}' is not an HTTP method", raw.method));
    }
    if let Some(why) = tollgate_comply::sendable::unsent_method(&method) {
        return Err(format!("method {method}: {why}"));
    }
    let url = Url::parse(&raw.url).map_err(|e| format!("url '{}': {e}", raw.url))?;
    let upstream = config.upstream_for(&url).ok_or_else(|| {
        let known: Vec<String> = config
            .upstreams
            .iter()
            .map(|u| format!("{} = {}", u.name, u.base_url))
            .collect();
        format!(
            "url '{}' is under no [[upstream]] base_url (known: {}); tollgate only sends to configured upstreams",
            raw.url,
            known.join(", ")
        )
    })?;
    let mut headers = Vec::with_capacity(raw.headers.len());
    for (name, value) in raw.headers {
        if http::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("header '{name}' is not a valid header name"));
        }
        if http::header::HeaderValue::from_str(&value).is_err() {
            return Err(format!(
                "header {name}: the value is not a valid header value"
            ));
        }
        let name = name.to_ascii_lowercase();
        if tollgate_comply::sendable::framing_header(&name) {
            return Err(format!(
                "header {name} is set by tollgate (from the body and the upstream's base_url); leave it out"
            ));
        }
        headers.push((name, value));
    }
    headers.sort();
    let (body, json) = match (raw.body, raw.body_text) {
        (Some(_), Some(_)) => return Err("give either body (JSON) or body_text, not both".into()),
        (Some(value), None) => (Some(value.to_string()), true),
        (None, Some(text)) => (Some(text), false),
        (None, None) => (None, false),
    };
    let priority = match raw.priority {
        Some(p) => Priority::parse(&p)?,
        None => Priority::Normal,
    };
    let content = digest(&[&method, url.as_str(), body.as_deref().unwrap_or("")]);
    let id = match raw.id {
        Some(IdText::Text(id)) if id.is_empty() => return Err("id must not be empty".into()),
        Some(IdText::Text(id)) => id,
        Some(IdText::Number(n)) => n.to_string(),
        None => {
            // Derived from the content (stable when lines are added or moved),
            // counted so identical lines stay distinct jobs.
            let n = seen_content.entry(content.clone()).or_insert(0);
            *n += 1;
            format!("{}.{}", &content[..16], n)
        }
    };
    let idempotency_key = match raw.idempotency_key {
        Some(key) if http::header::HeaderValue::from_str(&key).is_err() || key.is_empty() => {
            return Err("idempotency_key is not a valid header value".into())
        }
        Some(key) => key,
        None => format!("tollgate-{}", &digest(&[&id, &content])[..32]),
    };
    Ok(Routed {
        upstream,
        job: Job {
            id,
            method,
            url: url.to_string(),
            headers,
            body,
            json,
            priority,
            workflow: raw.workflow,
            idempotency_key,
            callback: match raw.callback {
                Some(url) => Some(callback_url(&url).map_err(|m| format!("callback {m}"))?),
                None => None,
            },
            client: None,
        },
    })
}

/// Cut records (one JSON value per line) into calls of `bulk.max_items`.
pub fn read_bulk(
    input: impl BufRead,
    config: &UpstreamsConfig,
    bulk_name: &str,
) -> Result<Vec<Routed>, JobsError> {
    let Some((upstream, bulk)) = config.bulk(bulk_name) else {
        let known: Vec<&str> = config
            .upstreams
            .iter()
            .flat_map(|u| u.bulk.iter().map(|b| b.name.as_str()))
            .collect();
        return Err(JobsError::UnknownBulk {
            name: bulk_name.into(),
            known: known.join(", "),
        });
    };
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(|source| JobsError::Io {
            what: "the records file".into(),
            source,
        })?;
        let line = match text_of(line, i + 1) {
            Ok(line) => line,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<serde_json::Value>(&line) {
            Ok(v) => records.push(v),
            Err(e) => errors.push(LineError {
                line: i + 1,
                message: format!(
                    "a record must be one JSON value (write text in quotes, e.g. \"0f8c-42\"): {e}"
                ),
            }),
        }
        if errors.len() >= MAX_ERRORS {
            break;
        }
    }
    if !errors.is_empty() {
        return Err(JobsError::Lines(errors));
    }
    let base = &config.upstreams[upstream].base_url;
    let url = format!("{}{}", base.as_str().trim_end_matches('/'), bulk.path);
    let priority = match &bulk.priority {
        Some(p) => Priority::parse(p).unwrap_or(Priority::Normal),
        None => Priority::Normal,
    };
    Ok(records
        .chunks(bulk.max_items)
        .enumerate()
        .map(|(n, chunk)| {
            let body = fill(&bulk.body, chunk).to_string();
            let content = digest(&[&bulk.method, &url, &body]);
            let id = format!("{}:{}:{}", bulk.name, n + 1, &content[..12]);
            Routed {
                upstream,
                job: Job {
                    idempotency_key: format!("tollgate-{}", &digest(&[&id, &content])[..32]),
                    callback: None,
                    client: None,
                    id,
                    method: bulk.method.clone(),
                    url: url.clone(),
                    headers: Vec::new(),
                    body: Some(body),
                    json: true,
                    priority,
                    workflow: bulk.workflow.clone(),
                },
            }
        })
        .collect())
}

/// The template with the chunk in place of the placeholder.
fn fill(template: &serde_json::Value, chunk: &[serde_json::Value]) -> serde_json::Value {
    use serde_json::Value;
    match template {
        Value::String(s) if s == RECORDS_PLACEHOLDER => Value::Array(chunk.to_vec()),
        Value::Array(items) => Value::Array(items.iter().map(|v| fill(v, chunk)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), fill(v, chunk)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Hex SHA-256 of the parts, each followed by a NUL.
pub fn digest(parts: &[&str]) -> String {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex_after("", &hash.finalize())
}

/// Hex SHA-256 of bytes.
pub fn digest_bytes(bytes: &[u8]) -> String {
    hex_after("", &Sha256::digest(bytes))
}

/// A job as the policy sees it: method, path, host, query, headers (the
/// upstream's, the job's, and its workflow as `tollgate-workflow`) and body.
#[derive(Debug)]
pub struct JobRequest<'a> {
    job: &'a Job,
    url: JobUrl,
    defaults: &'a [(String, String)],
    body: Option<serde_json::Value>,
}

/// A job's URL as the runner reads it again: its path, host and query for
/// the policy, its origin for routing, the target it is sent to. A job's URL
/// was normalized by `url::Url` when the job was read, so `http::Uri`, which
/// only splits it (about a tenth of a full parse, and this is done for every
/// decision and attempt), finds the same parts.
#[derive(Debug)]
pub struct JobUrl(http::Uri);

impl JobUrl {
    /// `normalized`: a `Job`'s `url`.
    pub fn new(normalized: &str) -> Result<Self, String> {
        match normalized.parse::<http::Uri>() {
            Ok(uri) if uri.host().is_some() => Ok(JobUrl(uri)),
            Ok(_) => Err(format!("url '{normalized}' has no host")),
            Err(e) => Err(format!("url '{normalized}': {e}")),
        }
    }
    pub fn path(&self) -> &str {
        self.0.path()
    }
    /// The upstream `config` sends this URL to.
    pub fn upstream(&self, config: &UpstreamsConfig) -> Option<usize> {
        config.upstream_for_parts(&UrlParts::of_normalized(&self.0))
    }
    /// The target to send to.
    pub fn into_uri(self) -> http::Uri {
        self.0
    }
    fn host(&self) -> Option<&str> {
        self.0.host()
    }
    fn query(&self) -> Option<&str> {
        self.0.query()
    }
}

impl<'a> JobRequest<'a> {
    pub fn new(job: &'a Job, defaults: &'a [(String, String)]) -> Result<Self, String> {
        let url = JobUrl::new(&job.url)?;
        let body = match (&job.body, job.json) {
            (Some(text), true) => {
                Some(serde_json::from_str(text).map_err(|e| format!("body: {e}"))?)
            }
            _ => None,
        };
        Ok(JobRequest {
            job,
            url,
            defaults,
            body,
        })
    }
}

impl tollgate_core::Request for JobRequest<'_> {
    fn method(&self) -> &str {
        &self.job.method
    }
    fn path(&self) -> &str {
        self.url.path()
    }
    fn host(&self) -> Option<&str> {
        self.url.host()
    }
    fn ip(&self) -> Option<&str> {
        None
    }
    fn header(&self, name: &str) -> Option<&str> {
        if name == WORKFLOW_HEADER {
            return self.job.workflow.as_deref();
        }
        self.job
            .headers
            .iter()
            .chain(self.defaults)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        self.url
            .query()
            .and_then(|q| tollgate_core::request::query_param(q, name))
    }
    fn query_repeated(&self, name: &str) -> bool {
        (self.url.query()).is_some_and(|q| tollgate_core::request::query_param_repeated(q, name))
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
}

/// The limits a job touches, as its upstream's engine plans them.
pub fn items(upstream: &Upstream, job: &Job) -> Result<Vec<tollgate_core::Item>, String> {
    // (the upstream's own headers, vendor keys, as the limits see them)
    let req = JobRequest::new(job, &upstream.limit_headers)?;
    let mut items = Vec::new();
    upstream
        .policy
        .plan(&req, &mut items)
        .map_err(|e| e.to_string())?;
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_core::NoProfiles;

    proptest::proptest! {
        /// Split from its normalized text, a job's URL has the path, host,
        /// query and origin a full parse finds.
        #[test]
        fn a_normalized_url_splits_into_the_parts_a_full_parse_finds(
            scheme in proptest::sample::select(vec!["http", "https", "HTTP"]),
            user in proptest::option::of("[a-z:]{1,6}"),
            host in proptest::sample::select(vec!["api.example.com", "API.Example.com", "127.0.0.1", "[::1]", "[2001:DB8::1]", "xn--bcher-kva.example", "bücher.example", "0x7f.1"]),
            port in proptest::option::of(proptest::sample::select(vec![80u16, 443, 8080])),
            path in "(/[a-zA-Z0-9 %._~!$&'()*+,;=:@|^`{}\\\\\"<>\\[\\]é-]{0,8}){0,4}",
            query in proptest::option::of("[a-zA-Z0-9 %=&/?:@|^`{}\"<>é-]{0,12}"),
            fragment in proptest::option::of("[a-z #?]{0,6}"),
        ) {
            let mut text = format!("{scheme}://");
            if let Some(user) = user {
                text += &format!("{user}@");
            }
            text += host;
            if let Some(port) = port {
                text += &format!(":{port}");
            }
            text += &path;
            if let Some(query) = query {
                text += &format!("?{query}");
            }
            if let Some(fragment) = fragment {
                text += &format!("#{fragment}");
            }
            let Ok(full) = Url::parse(&text) else { return Ok(()) };
            // (every URL a job can have splits: the runner sends what it splits)
            let split = JobUrl::new(full.as_str());
            proptest::prop_assert!(split.is_ok(), "{}: {:?}", full, split);
            let split = split.expect("checked");
            proptest::prop_assert_eq!(split.path(), full.path(), "{}", full);
            proptest::prop_assert_eq!(split.host(), full.host_str(), "{}", full);
            proptest::prop_assert_eq!(split.query(), full.query(), "{}", full);
            // (what routing compares with each upstream's base_url)
            proptest::prop_assert_eq!(UrlParts::of_normalized(&split.0), UrlParts::of(&full), "{}", full);
        }
    }

    #[test]
    fn digests_are_lower_case_hex_sha256() {
        // FIPS 180-2's "abc" example.
        assert_eq!(
            digest_bytes(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // (the hex writer itself is tested where it lives, `tollgate_core::hex`)
    }

    fn config() -> UpstreamsConfig {
        tollgate_comply::settings::parse(
            "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\n[[upstream.bulk]]\nname = \"probability\"\nmethod = \"POST\"\npath = \"/graphql\"\nmax_items = 200\nbody = { query = \"mutation($ids: [UUID!]!) { updateOpportunities(data: {probability: 75}, filter: {id: {in: $ids}}) { affectedCount } }\", variables = { ids = \"{{records}}\" } }\n",
            &NoProfiles,
            &|_| None,
        )
        .unwrap()
    }

    #[test]
    fn an_id_of_another_shape_is_named() {
        for (id, says) in [
            ("-3", "-3 is negative; expected id"),
            ("1.5", "expected id: a text or a whole number"),
            ("[1]", "expected id: a text"),
        ] {
            let line =
                format!("{{\"id\":{id},\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\"}}\n");
            let err = match read_jobs(line.as_bytes(), &config()) {
                Ok(_) => panic!("id {id} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(err.contains("line 1") && err.contains(says), "{id}: {err}");
        }
    }

    #[test]
    fn a_job_line_needs_only_method_and_url() {
        let jobs = read_jobs(
            "{\"method\":\"patch\",\"url\":\"http://127.0.0.1:9/rest/1\",\"body\":{\"p\":75}}\n\n{\"id\":7,\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\",\"priority\":\"high\",\"idempotency_key\":\"k7\"}\n".as_bytes(),
            &config(),
        )
        .unwrap();
        assert_eq!(jobs.len(), 2);
        let first = &jobs[0].job;
        assert_eq!(first.method, "PATCH");
        assert_eq!(first.body.as_deref(), Some("{\"p\":75}"));
        assert!(first.json);
        assert_eq!(first.priority, Priority::Normal);
        assert!(first.idempotency_key.starts_with("tollgate-"));
        assert_eq!(jobs[1].job.id, "7");
        assert_eq!(jobs[1].job.idempotency_key, "k7");
        assert_eq!(jobs[1].job.priority, Priority::High);
    }

    #[test]
    fn identical_lines_are_distinct_jobs_with_stable_ids() {
        let line = "{\"method\":\"POST\",\"url\":\"http://127.0.0.1:9/x\",\"body_text\":\"hi\"}\n";
        let a = read_jobs(line.repeat(2).as_bytes(), &config()).unwrap();
        let b = read_jobs(
            format!(
                "{{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/y\"}}\n{}",
                line.repeat(2)
            )
            .as_bytes(),
            &config(),
        )
        .unwrap();
        assert_ne!(a[0].job.id, a[1].job.id);
        assert_eq!(a[0].job.id, b[1].job.id);
        assert_eq!(a[1].job.idempotency_key, b[2].job.idempotency_key);
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_field() {
        let text = "{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/ok\",\"workflow\":1}\n{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/ok\",\"headers\":{\"x-a\":1}}\n";
        let JobsError::Lines(errors) = read_jobs(text.as_bytes(), &config()).unwrap_err() else {
            panic!("expected line errors")
        };
        assert!(
            errors[0]
                .message
                .starts_with("not a job: field workflow: invalid type: integer `1`"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[1]
                .message
                .starts_with("not a job: field x-a: invalid type: integer `1`"),
            "{}",
            errors[1].message
        );
    }

    #[test]
    fn a_line_that_is_not_utf8_is_named_with_the_others() {
        let mut text =
            b"\xEF\xBB\xBF{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/ok\"}\r\n".to_vec();
        text.extend_from_slice(b"{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/\xff\"}\n");
        text.extend_from_slice(b"not json\n");
        let JobsError::Lines(errors) = read_jobs(&text[..], &config()).unwrap_err() else {
            panic!("expected line errors")
        };
        let said: Vec<(usize, &str)> = errors
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(
            said.len(),
            2,
            "the first line, BOM and CRLF aside, is a job: {said:?}"
        );
        assert_eq!(said[0], (2, "the line is not UTF-8 text (from byte 43)"));
        assert_eq!(said[1].0, 3);
    }

    #[test]
    fn a_job_cannot_send_what_is_never_sent() {
        let text = "{\"method\":\"TRACE\",\"url\":\"http://127.0.0.1:9/t\"}\n{\"method\":\"connect\",\"url\":\"http://127.0.0.1:9/c\"}\n{\"method\":\"POST\",\"url\":\"http://127.0.0.1:9/x\",\"headers\":{\"Content-Length\":\"0\"},\"body\":{\"a\":1}}\n{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\",\"headers\":{\"host\":\"evil.example\"}}\n{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/ok\",\"headers\":{\"x-trace\":\"1\"}}\n";
        let JobsError::Lines(errors) = read_jobs(text.as_bytes(), &config()).unwrap_err() else {
            panic!("expected line errors")
        };
        let said: Vec<(usize, &str)> = errors
            .iter()
            .map(|e| (e.line, e.message.as_str()))
            .collect();
        assert_eq!(said.len(), 4, "{said:?}");
        assert!(
            said[0].1.starts_with("method TRACE: it is echoed back"),
            "{said:?}"
        );
        assert!(
            said[1].1.starts_with("method CONNECT: it opens a tunnel"),
            "{said:?}"
        );
        assert_eq!(
            said[2],
            (3, "header content-length is set by tollgate (from the body and the upstream's base_url); leave it out")
        );
        assert!(
            said[3].1.starts_with("header host is set by tollgate"),
            "{said:?}"
        );
    }

    #[test]
    fn bad_lines_are_named_and_nothing_is_returned() {
        let text = "{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/ok\"}\n{\"method\":\"GET\"}\nnot json\n{\"method\":\"GET\",\"url\":\"http://evil.example/x\"}\n{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\",\"prority\":\"high\"}\n{\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\",\"priority\":\"urgent\"}\n{\"id\":\"a\",\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/x\"}\n{\"id\":\"a\",\"method\":\"GET\",\"url\":\"http://127.0.0.1:9/y\"}\n";
        let JobsError::Lines(errors) = read_jobs(text.as_bytes(), &config()).unwrap_err() else {
            panic!("expected line errors")
        };
        let lines: Vec<usize> = errors.iter().map(|e| e.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5, 6, 8]);
        assert!(
            errors[0].message.contains("missing field `url`"),
            "{}",
            errors[0].message
        );
        assert!(
            errors[2]
                .message
                .contains("under no [[upstream]] base_url (known: crm = http://127.0.0.1:9/)"),
            "{}",
            errors[2].message
        );
        assert!(
            errors[3].message.contains("unknown field `prority`"),
            "{}",
            errors[3].message
        );
        assert_eq!(
            errors[4].message,
            "priority 'urgent' is not known; use high, normal or low"
        );
        assert_eq!(
            errors[5].message,
            "id 'a' is also on line 7; ids must be unique"
        );
    }

    #[test]
    fn ten_thousand_ids_become_fifty_calls_of_two_hundred() {
        let records: String = (0..10_000).map(|i| format!("\"id-{i}\"\n")).collect();
        let jobs = read_bulk(records.as_bytes(), &config(), "probability").unwrap();
        assert_eq!(jobs.len(), 50);
        let body: serde_json::Value =
            serde_json::from_str(jobs[49].job.body.as_deref().unwrap()).unwrap();
        let ids = body["variables"]["ids"].as_array().unwrap();
        assert_eq!(ids.len(), 200);
        assert_eq!(ids[199], "id-9999");
        assert!(body["query"].as_str().unwrap().starts_with("mutation"));
        assert_eq!(jobs[0].job.url, "http://127.0.0.1:9/graphql");
        let e = read_bulk("\"a\"\nb-unquoted\n".as_bytes(), &config(), "probability").unwrap_err();
        assert!(
            e.to_string().starts_with(
                "1 bad line(s), nothing was queued:\n  line 2: a record must be one JSON value"
            ),
            "{e}"
        );
        let e = read_bulk("".as_bytes(), &config(), "nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "bulk 'nope' is not in the config; known: probability"
        );
    }

    #[test]
    fn a_job_written_as_a_line_reads_back_as_itself() {
        let config = config();
        let text = "{\"method\":\"patch\",\"url\":\"http://127.0.0.1:9/rest/1\",\"body\":{\"p\":75,\"a\":[1,2]},\"headers\":{\"X-Trace\":\"t1\"},\"workflow\":\"sync\",\"priority\":\"low\"}\n{\"id\":\"b\",\"method\":\"POST\",\"url\":\"http://127.0.0.1:9/x\",\"body_text\":\"a=1&b=2\",\"callback\":\"https://hooks.example/done\"}\n";
        let jobs = read_jobs(text.as_bytes(), &config).unwrap();
        let lines: String = jobs.iter().map(|r| r.job.to_line() + "\n").collect();
        let again = read_jobs(lines.as_bytes(), &config).unwrap();
        let (a, b): (Vec<_>, Vec<_>) = (
            jobs.iter().map(|r| &r.job).collect(),
            again.iter().map(|r| &r.job).collect(),
        );
        assert_eq!(a, b);
    }
}
