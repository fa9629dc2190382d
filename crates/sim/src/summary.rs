//! `--summary`: per limit and per key, how many requests were admitted at
//! once, held, and denied.

use compact_str::CompactString;
use std::collections::HashMap;
use std::fmt;
use tollgate_core::policy::{Mode, Policy};
use tollgate_core::units::{Nanos, NANOS_PER_SEC};
use tollgate_core::{Decision, Item, Verdict};

/// Keys listed individually per limit; the rest are summed as "(other keys)".
pub const MAX_SUMMARY_KEYS: usize = 10_000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub admitted: u64,
    pub held: u64,
    pub denied: u64,
}

#[derive(Debug, Clone)]
pub struct LimitSummary {
    pub name: String,
    /// Whether the limit has key parts (else it has one shared bucket).
    pub keyed: bool,
    pub shadow: bool,
    pub counts: Counts,
    /// Shadow limits: requests they would have denied.
    pub would_deny: u64,
    pub keys: HashMap<CompactString, Counts>,
    pub other_keys: Counts,
}

/// Buckets a timeline keeps at most: past them, neighbours merge and the
/// width doubles (a trace of any length stays a small picture).
pub const MAX_BUCKETS: usize = 240;

/// `--report`: per limit, what it admitted, held and denied over the
/// trace's time, and when it first denied.
#[derive(Debug, Clone)]
pub struct Timeline {
    /// The first request's instant; buckets start there.
    pub start: Option<Nanos>,
    /// Each bucket's width (1 s, doubled as the trace goes on).
    pub width: Nanos,
    /// Per limit, per bucket.
    pub limits: Vec<Vec<Counts>>,
    /// Per limit, its first denial (its quota running out).
    pub first_denied: Vec<Option<Nanos>>,
}

impl Timeline {
    fn new(limits: usize) -> Timeline {
        Timeline {
            start: None,
            width: NANOS_PER_SEC,
            limits: vec![Vec::new(); limits],
            first_denied: vec![None; limits],
        }
    }

    fn bucket(&mut self, at: Nanos) -> usize {
        let start = *self.start.get_or_insert(at);
        loop {
            let i = (at.saturating_sub(start) / self.width) as usize;
            if i < MAX_BUCKETS {
                return i;
            }
            // Merge neighbours: the same picture at half the detail.
            for buckets in &mut self.limits {
                let merged: Vec<Counts> = buckets
                    .chunks(2)
                    .map(|pair| {
                        pair.iter().fold(Counts::default(), |a, c| Counts {
                            admitted: a.admitted + c.admitted,
                            held: a.held + c.held,
                            denied: a.denied + c.denied,
                        })
                    })
                    .collect();
                *buckets = merged;
            }
            self.width *= 2;
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub requests: u64,
    pub admitted: u64,
    pub held: u64,
    pub denied: u64,
    /// Requests that could not be decided (bad request, never fits, store full).
    pub errors: u64,
    pub limits: Vec<LimitSummary>,
    /// Kept for `--report` only.
    pub timeline: Option<Timeline>,
}

impl Summary {
    /// A summary that also keeps the timeline `--report` draws.
    pub fn with_timeline(policy: &Policy) -> Self {
        Summary {
            timeline: Some(Timeline::new(policy.limits.len())),
            ..Summary::new(policy)
        }
    }

    pub fn new(policy: &Policy) -> Self {
        Summary {
            timeline: None,
            requests: 0,
            admitted: 0,
            held: 0,
            denied: 0,
            errors: 0,
            limits: policy
                .limits
                .iter()
                .map(|l| LimitSummary {
                    name: l.name.clone(),
                    keyed: !l.key.is_empty(),
                    shadow: l.mode == Mode::Shadow,
                    counts: Counts::default(),
                    would_deny: 0,
                    keys: HashMap::new(),
                    other_keys: Counts::default(),
                })
                .collect(),
        }
    }

    /// Count one decision, made at `at`.
    pub fn record(&mut self, at: Nanos, items: &[Item], decision: &Decision, per_key: bool) {
        self.requests += 1;
        let bump: fn(&mut Counts) = match decision.verdict {
            Verdict::Admit { delay: 0 } => {
                self.admitted += 1;
                |c| c.admitted += 1
            }
            Verdict::Admit { .. } => {
                self.held += 1;
                |c| c.held += 1
            }
            Verdict::Deny { .. } => {
                self.denied += 1;
                |c| c.denied += 1
            }
            Verdict::Never { .. } => {
                self.errors += 1;
                return;
            }
        };
        let denied_by = match decision.verdict {
            Verdict::Deny { limit, .. } => Some(limit),
            _ => None,
        };
        for (i, (item, outcome)) in items.iter().zip(&decision.outcomes).enumerate() {
            let limit = &mut self.limits[item.limit];
            if limit.shadow && !outcome.allowed {
                limit.would_deny += 1;
            }
            // A denial is counted against the limit that denied, not the others.
            if denied_by.is_some_and(|d| d != i) {
                continue;
            }
            bump(&mut limit.counts);
            if let Some(timeline) = &mut self.timeline {
                let b = timeline.bucket(at);
                let buckets = &mut timeline.limits[item.limit];
                if buckets.len() <= b {
                    buckets.resize(b + 1, Counts::default());
                }
                bump(&mut buckets[b]);
                if denied_by.is_some() && timeline.first_denied[item.limit].is_none() {
                    timeline.first_denied[item.limit] = Some(at);
                }
            }
            if !per_key || !limit.keyed {
                continue;
            }
            let tracked = limit.keys.len();
            match limit.keys.get_mut(item.key.as_str()) {
                Some(c) => bump(c),
                None if tracked < MAX_SUMMARY_KEYS => {
                    bump(limit.keys.entry(item.key.clone()).or_default())
                }
                None => bump(&mut limit.other_keys),
            }
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "requests {}: admitted {}, held {}, denied {}, errors {}",
            self.requests, self.admitted, self.held, self.denied, self.errors
        )?;
        writeln!(
            f,
            "{:<24} {:<28} {:>10} {:>10} {:>10}",
            "limit", "key", "admitted", "held", "denied"
        )?;
        for l in &self.limits {
            let name = if l.shadow {
                format!("{} (shadow)", l.name)
            } else {
                l.name.clone()
            };
            let c = l.counts;
            writeln!(
                f,
                "{:<24} {:<28} {:>10} {:>10} {:>10}",
                name, "(all keys)", c.admitted, c.held, c.denied
            )?;
            if l.shadow {
                writeln!(
                    f,
                    "{:<24} {:<28} {:>10}",
                    "", "would have denied", l.would_deny
                )?;
            }
            if !l.keyed {
                continue; // one shared bucket: the line above says it all
            }
            let mut keys: Vec<_> = l.keys.iter().collect();
            keys.sort_by(|a, b| {
                (b.1.admitted + b.1.held + b.1.denied)
                    .cmp(&(a.1.admitted + a.1.held + a.1.denied))
                    .then(a.0.cmp(b.0))
            });
            for (key, c) in keys.iter().take(20) {
                let shown = if key.is_empty() {
                    "(anonymous)".to_string()
                } else {
                    key.replace('\u{1f}', "|")
                };
                writeln!(
                    f,
                    "{:<24} {:<28} {:>10} {:>10} {:>10}",
                    "", shown, c.admitted, c.held, c.denied
                )?;
            }
            let hidden = keys.len().saturating_sub(20);
            let o = l.other_keys;
            if hidden > 0 || o != Counts::default() {
                writeln!(
                    f,
                    "{:<24} {:<28} {:>10} {:>10} {:>10}",
                    "",
                    format!(
                        "(+{} more keys)",
                        hidden + usize::from(o != Counts::default())
                    ),
                    "",
                    "",
                    ""
                )?;
            }
        }
        Ok(())
    }
}
