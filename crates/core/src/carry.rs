//! What a reload keeps of each limit's counted use: changing a quota does not
//! hand out a fresh one (the data API's "updating the limits for an app will
//! happen without downtime").
//!
//! A limit of the new configuration with the same name, algorithm, key, unit
//! of cost and windows as one of the old keeps what each key has used,
//! carried into its new shape: a window's count (against the new quota), each
//! tiered pool's use (pools matched by how often they refill; an added pool
//! starts full), requests in flight, and a bucket's debt (its units owed at
//! the new rate; see `algo::gcra::carried`). Use is never forgiven: a key
//! that used more than a lowered quota or capacity waits until its use is
//! back under it. Classes keep theirs by name, overrides by key; a key given
//! an override, or losing one, takes its use along.
//!
//! A limit whose algorithm, key, unit of cost or window length changed starts
//! fresh: its old counts would not mean the same thing. Both stores follow
//! `state_shape`: the memory store shares a limit's tables while it is the
//! same, the Redis store names its keys by it.

use crate::policy::{Cost, Limit, Params, Policy};
use crate::units::NANOS_PER_SEC;

/// What a reload did with one limit's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carry {
    /// Its definition did not change: its counters go on as they were.
    Unchanged,
    /// Its definition changed, its counted use was carried into the new one.
    Carried,
    /// It starts from fresh counters, for this reason.
    Fresh(String),
}

/// A limit a reload started from fresh counters, and why (what a reload
/// reports, in its log line and its answer).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FreshLimit {
    /// The limit's name.
    pub limit: String,
    /// Why its old counts could not be carried (`Carry::Fresh`).
    pub why: String,
}

impl std::fmt::Display for FreshLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.limit, self.why)
    }
}

/// What each limit of `new` does with the counters of `old`, in `new`'s order.
pub fn plan(old: &Policy, new: &Policy) -> Vec<(String, Carry)> {
    new.limits
        .iter()
        .map(|limit| (limit.name.clone(), carry(old, limit).0))
        .collect()
}

/// What `limit` (of a new policy) does with the counters of `old`, and the
/// index of the old limit it carries them from.
pub fn carry(old: &Policy, limit: &Limit) -> (Carry, Option<usize>) {
    let Some(i) = old.limits.iter().position(|l| l.name == limit.name) else {
        return (Carry::Fresh("a new limit".into()), None);
    };
    let was = &old.limits[i];
    if was.fingerprint == limit.fingerprint {
        return (Carry::Unchanged, Some(i));
    }
    match why_fresh(was, limit) {
        Some(why) => (Carry::Fresh(why), None),
        None => (Carry::Carried, Some(i)),
    }
}

/// The parts of a limit's definition that say what its counts mean: two
/// limits of the same name and shape count alike. Quotas, capacities, rates,
/// tiers' quotas, holds, matches, classes' scales and overrides are not in it.
pub fn state_shape(limit: &Limit) -> String {
    format!(
        "{}; key {:?}; {}; {}",
        limit.algorithm.name(),
        limit.key,
        cost_unit(limit),
        window_text(&limit.variants[0]),
    )
}

fn why_fresh(was: &Limit, now: &Limit) -> Option<String> {
    if was.algorithm != now.algorithm {
        return Some(format!(
            "its algorithm changed from {} to {}",
            was.algorithm.name(),
            now.algorithm.name()
        ));
    }
    if was.key != now.key {
        return Some("its key changed".into());
    }
    if cost_unit(was) != cost_unit(now) {
        return Some(format!(
            "its cost changed from {} to {}",
            cost_unit(was),
            cost_unit(now)
        ));
    }
    let (before, after) = (window_text(&was.variants[0]), window_text(&now.variants[0]));
    (before != after).then(|| format!("its window changed from {before} to {after}"))
}

fn cost_unit(limit: &Limit) -> &'static str {
    match limit.cost {
        Cost::Latency => "microseconds of latency",
        _ => "requests",
    }
}

/// The windows a limit counts in, as its counts depend on them (empty for
/// buckets, tiered pools and concurrency, whose use carries across any
/// change of rate or tiers).
fn window_text(params: &Params) -> String {
    match params {
        Params::FixedWindow(p) => p.calendar.identity(),
        Params::SlidingWindow(p) => format!(
            "{}s in {} segments",
            p.every as f64 / NANOS_PER_SEC as f64,
            p.segments
        ),
        Params::Gcra(_) | Params::Tiered(_) | Params::Concurrency(_) => String::new(),
    }
}

/// What a limit's variant stands for: the default class, a `[[class]]` (by
/// name) or a key's override (by key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant<'a> {
    /// Requests of no class.
    Default,
    /// A `[[class]]`, by name.
    Class(&'a str),
    /// An override, by key.
    Override(&'a str),
}

/// What variant `v` of `limit` (of `policy`) stands for.
pub fn variant<'a>(policy: &'a Policy, limit: &'a Limit, v: usize) -> Variant<'a> {
    let classes = limit.variants.len() - limit.overrides.len() - 1;
    match v {
        0 => Variant::Default,
        v if v <= classes => policy
            .classes
            .get(v - 1)
            .map_or(Variant::Default, |c| Variant::Class(&c.name)),
        v => limit
            .overrides
            .get(v - 1 - classes)
            .map_or(Variant::Default, |o| Variant::Override(&o.key)),
    }
}

/// The variant of `limit` (of `policy`) that stands for `wanted`, if any.
pub fn find_variant(policy: &Policy, limit: &Limit, wanted: Variant<'_>) -> Option<usize> {
    (0..limit.variants.len()).find(|&v| variant(policy, limit, v) == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{parse, NoProfiles};

    fn policy(toml: &str) -> Policy {
        parse(toml, &NoProfiles).expect("a valid policy")
    }

    fn hourly(quota: u64, extra: &str) -> String {
        format!(
            "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"fixed_window\"\nquota = {quota}\nevery = \"1h\"\n{extra}"
        )
    }

    #[test]
    fn a_changed_quota_carries_and_a_changed_meaning_starts_fresh() {
        let old = policy(&hourly(3, ""));
        let plan_to = |toml: &str| plan(&old, &policy(toml))[0].1.clone();
        assert_eq!(plan_to(&hourly(3, "")), Carry::Unchanged);
        assert_eq!(plan_to(&hourly(5, "")), Carry::Carried);
        assert_eq!(plan_to(&hourly(5, "hold = \"1s\"\n")), Carry::Carried);
        assert_eq!(
            plan_to(&hourly(5, "").replace("\"1h\"", "\"1m\"")),
            Carry::Fresh("its window changed from 3600s@+0 to 60s@+0".into())
        );
        assert_eq!(
            plan_to(&hourly(5, "").replace("header:x-tenant", "ip")),
            Carry::Fresh("its key changed".into())
        );
        assert_eq!(
            plan_to(&hourly(5, "cost = \"latency\"\n").replace("quota = 5", "quota = \"5s\"")),
            Carry::Fresh("its cost changed from requests to microseconds of latency".into())
        );
        assert_eq!(
            plan_to("[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 3\nrefill = \"3/h\"\n"),
            Carry::Fresh("its algorithm changed from fixed_window to token_bucket".into())
        );
        let renamed = policy(&hourly(3, "").replace("\"tenant\"", "\"per-tenant\""));
        assert_eq!(
            plan(&old, &renamed)[0].1,
            Carry::Fresh("a new limit".into())
        );
    }

    #[test]
    fn variants_are_matched_by_class_name_and_override_key() {
        let toml = |classes: &str, overrides: &str| {
            format!(
                "{classes}[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant\"]\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n{overrides}"
            )
        };
        let sandbox = "[[class]]\nname = \"sandbox\"\nmatch = { headers = { x-env = \"sandbox\" } }\nscale = 0.5\n\n";
        let batch = "[[class]]\nname = \"batch\"\nmatch = { headers = { x-env = \"batch\" } }\nscale = 0.2\n\n";
        let old = policy(&toml(
            sandbox,
            "overrides = [{ key = \"acme\", scale = 2.0 }]\n",
        ));
        let new = policy(&toml(
            &format!("{batch}{sandbox}"),
            "overrides = [{ key = \"acme\", scale = 3.0 }]\n",
        ));
        let (l_old, l_new) = (&old.limits[0], &new.limits[0]);
        let old_of = |v| find_variant(&old, l_old, variant(&new, l_new, v));
        assert_eq!(variant(&new, l_new, 2), Variant::Class("sandbox"));
        assert_eq!(old_of(0), Some(0));
        assert_eq!(old_of(1), None, "batch is a new class");
        assert_eq!(old_of(2), Some(1), "sandbox moved");
        assert_eq!(old_of(3), Some(2), "acme's override, by key");
        assert_eq!(carry(&old, l_new), (Carry::Carried, Some(0)));
    }
}
