//! The access log: one line per request on stdout, written by its own thread
//! so a slow terminal or pipe never slows requests (lines past a bounded
//! backlog are dropped and counted).

use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};

const BACKLOG: usize = 1 << 16;

/// The access log's format (`access_log = "off" | "text" | "json"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Text,
    Json,
}

impl AccessLog {
    /// `off`, `text` or `json`; the error says which are known.
    pub fn parse(text: &str) -> Result<AccessLog, String> {
        match text {
            "off" => Ok(AccessLog::Off),
            "text" => Ok(AccessLog::Text),
            "json" => Ok(AccessLog::Json),
            other => Err(format!(
                "'{other}' is not known; use \"off\", \"text\" or \"json\""
            )),
        }
    }
}

/// One request as logged.
#[derive(Debug, Default, Clone)]
pub struct Entry<'a> {
    /// Whether this request is logged (else the costlier fields stay empty).
    pub enabled: bool,
    pub request_id: &'a str,
    pub ip: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// admitted | held | denied | error
    pub decision: &'static str,
    /// The denying limit, if any.
    pub limit: Option<&'a str>,
    /// The request's key for its first limit (parts shown with '|').
    pub key: Option<String>,
    /// `name=remaining` per limit.
    pub remaining: Vec<(&'a str, u64)>,
    pub hold_ms: f64,
    pub upstream_ms: Option<f64>,
    /// The proxy: the upstream it went to, and the calls it took.
    pub upstream: Option<&'a str>,
    pub attempts: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct AccessLogger {
    format: AccessLog,
    lines: Option<SyncSender<String>>,
}

impl AccessLogger {
    pub fn start(format: AccessLog) -> Self {
        if format == AccessLog::Off {
            return AccessLogger {
                format,
                lines: None,
            };
        }
        let (tx, rx) = sync_channel(BACKLOG);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(rx))
            .ok();
        AccessLogger {
            format,
            lines: Some(tx),
        }
    }

    pub fn enabled(&self) -> bool {
        self.lines.is_some()
    }

    /// Queue one line; false if it was dropped (the writer is behind).
    pub fn log(&self, entry: &Entry<'_>) -> bool {
        let Some(lines) = &self.lines else {
            return true;
        };
        let line = match self.format {
            AccessLog::Json => json_line(entry),
            _ => text_line(entry),
        };
        !matches!(lines.try_send(line), Err(TrySendError::Full(_)))
    }
}

fn write_lines(rx: Receiver<String>) {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(line.as_bytes());
        // Write what is queued, then flush before waiting again.
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(line.as_bytes());
        }
        let _ = out.flush();
    }
}

fn now_text() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Millisecond)
        .map_or_else(|_| String::new(), |t| t.to_string())
}

fn text_line(e: &Entry<'_>) -> String {
    use std::fmt::Write;
    let mut line = format!(
        "{} {} {} {} {} {} decision={}",
        now_text(),
        e.request_id,
        e.ip,
        e.method,
        e.path.escape_debug(),
        e.status,
        e.decision
    );
    if let Some(upstream) = e.upstream {
        let _ = write!(line, " upstream={upstream}");
    }
    if let Some(limit) = e.limit {
        let _ = write!(line, " limit={limit}");
    }
    if let Some(key) = &e.key {
        let _ = write!(line, " key={}", key.escape_debug());
    }
    if !e.remaining.is_empty() {
        line.push_str(" remaining=");
        for (i, (name, r)) in e.remaining.iter().enumerate() {
            let _ = write!(line, "{}{name}:{r}", if i > 0 { "," } else { "" });
        }
    }
    let _ = write!(line, " hold_ms={:.1}", e.hold_ms);
    if let Some(ms) = e.upstream_ms {
        let _ = write!(line, " upstream_ms={ms:.1}");
    }
    if let Some(n) = e.attempts {
        let _ = write!(line, " attempts={n}");
    }
    line.push('\n');
    line
}

fn json_line(e: &Entry<'_>) -> String {
    let remaining: serde_json::Map<String, serde_json::Value> = e
        .remaining
        .iter()
        .map(|(n, r)| ((*n).to_string(), (*r).into()))
        .collect();
    let mut line = serde_json::json!({
        "ts": now_text(),
        "request_id": e.request_id,
        "ip": e.ip,
        "method": e.method,
        "path": e.path,
        "status": e.status,
        "decision": e.decision,
        "limit": e.limit,
        "key": e.key,
        "remaining": remaining,
        "hold_ms": e.hold_ms,
        "upstream_ms": e.upstream_ms,
    });
    // The proxy's fields, only on its lines.
    if let Some(map) = line.as_object_mut() {
        if let Some(upstream) = e.upstream {
            map.insert("upstream".into(), upstream.into());
        }
        if let Some(n) = e.attempts {
            map.insert("attempts".into(), n.into());
        }
    }
    let mut line = line.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_key_decision_remaining_and_hold() {
        let e = Entry {
            enabled: true,
            request_id: "req_1",
            ip: "127.0.0.1",
            method: "GET",
            path: "/v1/x",
            status: 429,
            decision: "denied",
            limit: Some("tenant"),
            key: Some("acme".into()),
            remaining: vec![("tenant", 0), ("daily", 41)],
            hold_ms: 2000.0,
            upstream_ms: None,
            upstream: None,
            attempts: None,
        };
        let text = text_line(&e);
        assert!(text.ends_with(" req_1 127.0.0.1 GET /v1/x 429 decision=denied limit=tenant key=acme remaining=tenant:0,daily:41 hold_ms=2000.0\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&e)).unwrap();
        assert_eq!(json["remaining"]["daily"], 41);
        assert_eq!(json["key"], "acme");
        assert_eq!(json["hold_ms"], 2000.0);
        assert!(
            json.get("upstream").is_none(),
            "the proxy's fields only on its lines"
        );
    }

    #[test]
    fn proxy_lines_name_the_upstream_and_the_attempts() {
        let e = Entry {
            enabled: true,
            request_id: "req_2",
            ip: "127.0.0.1",
            method: "POST",
            path: "/crm/v1/x",
            status: 200,
            decision: "waited",
            upstream: Some("crm"),
            attempts: Some(2),
            hold_ms: 150.0,
            upstream_ms: Some(3.5),
            ..Entry::default()
        };
        let text = text_line(&e);
        assert!(text.ends_with(" req_2 127.0.0.1 POST /crm/v1/x 200 decision=waited upstream=crm hold_ms=150.0 upstream_ms=3.5 attempts=2\n"), "{text}");
        let json: serde_json::Value = serde_json::from_str(&json_line(&e)).unwrap();
        assert_eq!(
            (json["upstream"].as_str(), json["attempts"].as_u64()),
            (Some("crm"), Some(2))
        );
    }
}
