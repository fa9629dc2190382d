//! `tollgate simulate`: replay a trace through the real engine on a virtual
//! clock and write one decision per request, in input order.
//!
//! Streaming: one line is read, decided and written at a time. Memory is the
//! engine's state (bounded by `max_keys`), the requests still in flight
//! (latency/concurrency completions), and the summary's per-key table, which
//! keeps at most `MAX_SUMMARY_KEYS` keys per limit and counts the rest together.

mod summary;
mod trace;

pub use summary::{Counts, LimitSummary, Summary, Timeline, MAX_BUCKETS, MAX_SUMMARY_KEYS};
pub use trace::{exact_decimal, scan as trace_scan, TraceLine, TraceRequest};

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, BufRead, Write};
use tollgate_core::policy::{Cost, Policy};
use tollgate_core::units::{Nanos, NANOS_PER_SEC};
use tollgate_core::{Item, Verdict};
use tollgate_store::{Engine, EngineError};

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("trace line {line}: {message}")]
    Line { line: u64, message: String },
    #[error("{0}")]
    Io(#[from] io::Error),
}

const OUT_CHUNK: usize = 1 << 16;
/// Bound on `t` and `latency` (about 31 years): keeps instants far from overflow.
const MAX_SECONDS: f64 = 1e9;

#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The instant `t = 0` stands for.
    pub start: Nanos,
    /// Write one decision line per request.
    pub decisions: bool,
    /// Count per key too (for `--summary`); totals per limit are always kept.
    pub per_key: bool,
    /// Keep what each limit did over time (for `--report`).
    pub timeline: bool,
}

/// A request still in flight: what to settle when it completes.
#[derive(Debug)]
struct Pending {
    at: Nanos,
    seq: u64,
    latency_us: u64,
    items: Vec<Item>,
}

// Completions are ordered by instant, then by arrival.
impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Pending {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

pub fn simulate(
    engine: &Engine,
    options: Options,
    input: impl BufRead,
    mut output: impl Write,
) -> Result<Summary, SimError> {
    let policy = engine.policy().clone();
    let wants_body = policy
        .limits
        .iter()
        .any(|l| matches!(l.cost, Cost::JsonArray(_)));
    let settles: Vec<bool> = policy
        .limits
        .iter()
        .map(|l| l.settles_at_completion())
        .collect();
    let mut summary = if options.timeline {
        Summary::with_timeline(&policy)
    } else {
        Summary::new(&policy)
    };
    let mut pending: BinaryHeap<Reverse<Pending>> = BinaryHeap::new();
    let mut items = Vec::with_capacity(policy.limits.len());
    // Decisions are written here and handed to `output` in large chunks.
    let mut out = Vec::with_capacity(OUT_CHUNK + 4096);
    let mut last_t = f64::NEG_INFINITY;
    let mut line_no = 0u64;
    let mut seq = 0u64;

    let mut input = input;
    let mut line = Vec::with_capacity(512);
    let mut spare: Vec<Vec<Item>> = Vec::new();
    // Run in a closure so that, whatever happens, the decisions made so far
    // are written before an error is reported.
    let result = (|| -> Result<(), SimError> {
        loop {
            // Parse the line where it lies in the read buffer; only a line cut
            // by the buffer's end is copied out first.
            let buf = loop {
                match input.fill_buf() {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if buf.is_empty() {
                break;
            }
            let (bytes, used): (&[u8], usize) = match memchr::memchr(b'\n', buf) {
                Some(end) => (&buf[..end], end + 1),
                None => {
                    line.clear();
                    line.extend_from_slice(buf);
                    let taken = buf.len();
                    input.consume(taken);
                    input.read_until(b'\n', &mut line)?;
                    // Parse it as a line found in the buffer would be: without its newline.
                    if line.last() == Some(&b'\n') {
                        line.pop();
                    }
                    (&line[..], 0)
                }
            };
            line_no += 1;
            let step = (|| -> Result<(), SimError> {
                if bytes.iter().all(u8::is_ascii_whitespace) {
                    return Ok(());
                }
                let fail = |message: String| SimError::Line {
                    line: line_no,
                    message,
                };
                // One UTF-8 check for the whole line, so the parser need not
                // check each string again.
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    fail(format!(
                        "the line is not UTF-8 (a bad byte at column {})",
                        e.valid_up_to() + 1
                    ))
                })?;
                let mut parsed = TraceLine::default();
                TraceLine::parse_into(text, &mut parsed)
                    .map_err(|e| fail(describe_json_error(&e)))?;
                let t_text = parsed.t;
                let t = trace::exact_value(t_text).map_or_else(|| t_text.parse(), Ok);
                let t: f64 = match t {
                    Ok(t) if t >= 0.0 && f64::is_finite(t) => t,
                    _ => {
                        return Err(fail(format!(
                            "t must be a number of seconds >= 0, got {t_text}"
                        )))
                    }
                };
                if t < last_t {
                    return Err(fail(format!(
                "t {t_text} is before the previous line's {last_t}; the trace must be sorted by t"
            )));
                }
                last_t = t;
                let latency = match parsed.latency {
                    Some(l) if !(0.0..=MAX_SECONDS).contains(&l) => {
                        return Err(fail(format!(
                            "latency must be seconds between 0 and {MAX_SECONDS}, got {l}"
                        )))
                    }
                    Some(l) => (l * 1e6).round() as u64,
                    None => 0,
                };
                let body = match (wants_body, parsed.body) {
                    (true, Some(raw)) => Some(
                        serde_json::from_str(raw.get()).map_err(|e| fail(format!("body: {e}")))?,
                    ),
                    _ => None,
                };
                let now = match options
                    .start
                    .checked_add((t * NANOS_PER_SEC as f64).round() as Nanos)
                {
                    Some(now) if t <= MAX_SECONDS => now,
                    _ => {
                        return Err(fail(format!(
                            "t {t_text} is too far after --start (at most {MAX_SECONDS} s)"
                        )))
                    }
                };

                // Settle everything that completed before this request arrives.
                while pending.peek().is_some_and(|p| p.0.at <= now) {
                    if let Some(Reverse(p)) = pending.pop() {
                        engine.finish_committed(&p.items, p.at, p.latency_us);
                        spare.push(p.items);
                    }
                }

                let request = TraceRequest {
                    line: &parsed,
                    body,
                };
                let result = engine.check_into(&request, now, &mut items);
                match &result {
                    Ok(decision) => {
                        summary.record(now, &items, decision, options.per_key);
                        if let Verdict::Admit { delay } = decision.verdict {
                            if items.iter().any(|i| settles[i.limit]) {
                                seq += 1;
                                let mut kept = spare.pop().unwrap_or_default();
                                kept.clear();
                                kept.extend(tollgate_store::committed(&items, decision).cloned());
                                pending.push(Reverse(Pending {
                                    at: now.saturating_add(delay).saturating_add(latency * 1_000),
                                    seq,
                                    latency_us: latency,
                                    items: kept,
                                }));
                            }
                        }
                        if options.decisions {
                            write_decision(&mut out, t_text, &policy, &items, decision);
                        }
                    }
                    Err(error) => {
                        summary.errors += 1;
                        summary.requests += 1;
                        if options.decisions {
                            write_error(&mut out, t_text, error);
                        }
                    }
                }
                if out.len() >= OUT_CHUNK {
                    output.write_all(&out)?;
                    out.clear();
                }
                Ok(())
            })();
            input.consume(used);
            step?;
        }
        Ok(())
    })();
    output.write_all(&out)?;
    output.flush()?;
    result.map(|()| summary)
}

fn describe_json_error(e: &serde_json::Error) -> String {
    let text = e.to_string();
    // serde_json appends " at line 1 column N"; the line is ours, keep the column.
    match text.rsplit_once(" at line ") {
        Some((what, pos)) => format!(
            "{what} (at {})",
            pos.split_once(' ').map_or(pos, |(_, c)| c)
        ),
        None => text,
    }
}

/// One decision as the JSON object of docs/config.md ("Trace format") (`t` echoed as written), newline-terminated.
pub fn write_decision(
    out: &mut Vec<u8>,
    t: &str,
    policy: &Policy,
    items: &[Item],
    d: &tollgate_core::Decision,
) {
    let (allowed, delay, limit, retry_after) = match d.verdict {
        Verdict::Admit { delay } => (true, delay, None, None),
        Verdict::Deny { limit, retry_after } => (false, 0, Some(limit), retry_after),
        Verdict::Never { limit, .. } => (false, 0, Some(limit), None),
    };
    // (few and whole pieces: each append is a call and a capacity check)
    out.extend_from_slice(b"{\"t\":");
    out.extend_from_slice(t.as_bytes());
    match (allowed, delay) {
        (false, _) => out.extend_from_slice(b",\"allowed\":false,\"delay\":0.0,\"limit\":"),
        (true, 0) => out.extend_from_slice(b",\"allowed\":true,\"delay\":0.0,\"limit\":"),
        (true, delay) => {
            out.extend_from_slice(b",\"allowed\":true,\"delay\":");
            push_f64(out, delay as f64 / NANOS_PER_SEC as f64);
            out.extend_from_slice(b",\"limit\":");
        }
    }
    match limit {
        Some(i) => push_name(out, &policy.limits[items[i].limit].name),
        None => out.extend_from_slice(b"null"),
    }
    match retry_after {
        Some(r) => {
            out.extend_from_slice(b",\"retry_after\":");
            push_f64(out, r as f64 / NANOS_PER_SEC as f64);
            out.extend_from_slice(b",\"remaining\":{");
        }
        None => out.extend_from_slice(b",\"retry_after\":null,\"remaining\":{"),
    }
    for (n, (item, outcome)) in items.iter().zip(&d.outcomes).enumerate() {
        if n > 0 {
            out.push(b',');
        }
        let limit = &policy.limits[item.limit];
        out.push(b'"');
        out.extend_from_slice(limit.name.as_bytes());
        out.extend_from_slice(b"\":");
        if limit.is_latency() {
            push_f64(out, outcome.remaining as f64 / 1e6);
        } else {
            out.extend_from_slice(itoa::Buffer::new().format(outcome.remaining).as_bytes());
        }
    }
    out.push(b'}');
    if let Verdict::Never { cost, capacity, .. } = d.verdict {
        let name = limit.map_or("", |i| policy.limits[items[i].limit].name.as_str());
        out.extend_from_slice(b",\"error\":");
        push_str(
            out,
            &format!(
                "limit '{name}': a cost of {cost} can never fit (the most it admits is {capacity})"
            ),
        );
    }
    out.extend_from_slice(b"}\n");
}

/// A request the engine could not decide (bad key, cost or store full), as a decision line.
pub fn write_error(out: &mut Vec<u8>, t: &str, error: &EngineError) {
    out.extend_from_slice(b"{\"t\":");
    out.extend_from_slice(t.as_bytes());
    out.extend_from_slice(b",\"allowed\":false,\"delay\":0.0,\"limit\":null,\"retry_after\":null,\"remaining\":{},\"error\":");
    push_str(out, &error.to_string());
    out.extend_from_slice(b"}\n");
}

fn push_f64(out: &mut Vec<u8>, v: f64) {
    if v == 0.0 {
        out.extend_from_slice(b"0.0");
        return;
    }
    out.extend_from_slice(ryu::Buffer::new().format(v).as_bytes());
}

/// A limit name: plain ASCII without quotes or backslashes (checked when the
/// config is loaded), so it needs no escaping.
fn push_name(out: &mut Vec<u8>, name: &str) {
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.push(b'"');
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes exactly as JSON needs; strings here are short.
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        out.extend_from_slice(b"\"?\"");
    }
}
