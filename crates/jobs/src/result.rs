//! A job's final outcome as `results.jsonl` gives it (one line per job),
//! written alike by `tollgate run` and by `tollgate proxy`'s job intake.

use crate::state::Record;

/// A response body up to this size is put in the result line; a larger
/// one is summarised by its SHA-256 and length.
pub const BODY_INLINE: usize = 2048;
/// The start of a dead job's last body kept with its dead letter.
pub const EXCERPT: usize = 512;

/// How a job ended.
#[derive(Debug, Clone)]
pub struct Outcome<'a> {
    pub id: &'a str,
    pub upstream: &'a str,
    pub dead: bool,
    /// Why it is dead (None when done).
    pub reason: Option<String>,
    pub status: Option<u16>,
    pub attempts: u32,
    /// From its first send to its final answer, and of its last attempt.
    pub elapsed_ms: Option<f64>,
    pub latency_ms: Option<f64>,
    pub body: Option<Seen<'a>>,
}

/// What was kept of a response body: the body whole, or (one longer than
/// was kept, read only to be digested) its SHA-256 in hex, its length and
/// its first bytes (at least `EXCERPT` of them, for a dead letter).
#[derive(Debug, Clone, Copy)]
pub enum Seen<'a> {
    Whole(&'a [u8]),
    Digest {
        sha256: &'a str,
        bytes: usize,
        start: &'a [u8],
    },
}

impl<'a> Seen<'a> {
    /// Its first bytes kept: all of a whole body.
    fn start(&self) -> &'a [u8] {
        match *self {
            Seen::Whole(b) => b,
            Seen::Digest { start, .. } => start,
        }
    }
}

/// One line of `results.jsonl`, fields in this order.
#[derive(serde::Serialize)]
struct ResultLine<'a> {
    id: &'a str,
    upstream: &'a str,
    outcome: &'static str,
    status: Option<u16>,
    attempts: u32,
    elapsed_ms: Option<f64>,
    latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_sha256: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body_bytes: Option<usize>,
}

impl<'a> Outcome<'a> {
    /// A job dead before any answer came (it cannot be sent, or is gone
    /// from the config): why, and the attempts made.
    pub fn dead_before_an_answer(
        id: &'a str,
        upstream: &'a str,
        reason: String,
        attempts: u32,
    ) -> Outcome<'a> {
        Outcome {
            id,
            upstream,
            dead: true,
            reason: Some(reason),
            status: None,
            attempts,
            elapsed_ms: None,
            latency_ms: None,
            body: None,
        }
    }

    /// Its line for `results.jsonl`.
    pub fn line(&self) -> String {
        let (body, body_sha256, body_bytes) = match self.body {
            Some(Seen::Digest { sha256, bytes, .. }) => {
                (None, Some(sha256.to_string()), Some(bytes))
            }
            Some(Seen::Whole(b)) if b.len() <= BODY_INLINE => (
                Some(
                    serde_json::from_slice(b)
                        .unwrap_or_else(|_| String::from_utf8_lossy(b).into_owned().into()),
                ),
                None,
                None,
            ),
            Some(Seen::Whole(b)) => (None, Some(crate::job::digest_bytes(b)), Some(b.len())),
            None => (None, None, None),
        };
        let line = ResultLine {
            id: self.id,
            upstream: self.upstream,
            outcome: if self.dead { "dead" } else { "done" },
            status: self.status,
            attempts: self.attempts,
            elapsed_ms: self.elapsed_ms,
            latency_ms: self.latency_ms,
            error: self.reason.as_deref(),
            body,
            body_sha256,
            body_bytes,
        };
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// The record that makes it final in the state (`seq`: its row;
    /// `sent_at`: when its last attempt went, ns since the epoch).
    pub fn record(self, seq: u64, sent_at: Option<u64>) -> Record {
        let line = self.line();
        Record::Final {
            seq,
            dead: self.dead,
            attempts: self.attempts,
            sent_at,
            status: self.status,
            excerpt: self
                .body
                .filter(|_| self.dead)
                .map(|b| b.start())
                .map(|b| String::from_utf8_lossy(&b[..b.len().min(EXCERPT)]).into_owned()),
            reason: self.reason,
            line,
            callback: None,
        }
    }
}
