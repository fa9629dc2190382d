//! What an upstream's response says about its limits: how long to wait
//! (`Retry-After`) and how much quota is really left (rate-limit headers), so
//! the runner corrects its local view when another client shares the quota.

use std::time::{Duration, SystemTime};

/// Which local limit a remaining count reported by the upstream is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A limit of this name (IETF `RateLimit` names its policy); if none is
    /// named so, the binding one.
    Named(String),
    /// The limit whose quota is this (`X-RateLimit-Limit`); if none, the
    /// binding one.
    Quota(u64),
    /// The limit with the shortest window (HubSpot's per-second counter).
    Shortest,
    /// The limit with the longest window (daily counters).
    Longest,
    /// The count limit with the least left locally (unnamed `X-RateLimit-*`).
    Binding,
}

/// The upstream says `remaining` units are left of `target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Correction {
    pub target: Target,
    pub remaining: u64,
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3); a date
/// in the past means now. None when absent or unreadable.
pub fn retry_after(value: Option<&str>, now: SystemTime) -> Option<Duration> {
    let value = value?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    if let Ok(secs) = value.parse::<f64>() {
        if secs.is_finite() && secs >= 0.0 {
            return Some(Duration::from_secs_f64(secs.min(86_400.0)));
        }
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(Duration::from_secs(86_400)),
    )
}

/// Every remaining count the headers report. `header` looks a header up by
/// its lower-case name.
pub fn corrections<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Vec<Correction> {
    let mut out = Vec::new();
    if let Some(value) = header("ratelimit") {
        out.extend(ietf_ratelimit(value));
    }
    let count = |name: &str| header(name).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(remaining) = count("x-ratelimit-remaining") {
        out.push(Correction {
            target: count("x-ratelimit-limit").map_or(Target::Binding, Target::Quota),
            remaining,
        });
    }
    if let Some(remaining) = count("x-hubspot-ratelimit-remaining") {
        out.push(Correction {
            target: Target::Shortest,
            remaining,
        });
    }
    if let Some(remaining) = count("x-hubspot-ratelimit-daily-remaining") {
        out.push(Correction {
            target: Target::Longest,
            remaining,
        });
    }
    // Salesforce: `Sforce-Limit-Info: api-usage=25/100000`.
    if let Some(usage) = header("sforce-limit-info").and_then(|v| {
        v.split(',')
            .find_map(|part| part.trim().strip_prefix("api-usage="))
    }) {
        if let Some((used, max)) = usage.split_once('/') {
            if let (Ok(used), Ok(max)) = (used.trim().parse::<u64>(), max.trim().parse::<u64>()) {
                out.push(Correction {
                    target: Target::Longest,
                    remaining: max.saturating_sub(used),
                });
            }
        }
    }
    out
}

/// Every remaining count a response's headers report. Most responses carry
/// none: one pass over the names comes first, instead of a lookup (a hash)
/// per header that could.
pub fn corrections_in(headers: &hyper::HeaderMap) -> Vec<Correction> {
    let may_report = headers.keys().any(|name| {
        let name = name.as_str();
        name.starts_with("ratelimit")
            || name.starts_with("x-ratelimit")
            || name.starts_with("x-hubspot-ratelimit")
            || name == "sforce-limit-info"
    });
    if !may_report {
        return Vec::new();
    }
    corrections(|name| headers.get(name).and_then(|v| v.to_str().ok()))
}

/// `RateLimit` in the structured form (`"tenant";r=12;t=3, "daily";r=900;t=40`)
/// or the older `limit=100, remaining=12, reset=3`.
fn ietf_ratelimit(value: &str) -> Vec<Correction> {
    let mut out = Vec::new();
    let mut unnamed = None;
    let mut limit = None;
    for item in value.split(',') {
        let item = item.trim();
        if let Some(r) = item.strip_prefix("remaining=") {
            unnamed = r.trim().parse().ok();
            continue;
        }
        if let Some(l) = item.strip_prefix("limit=") {
            limit = l.trim().parse().ok();
            continue;
        }
        let mut params = item.split(';');
        let name = params.next().unwrap_or("").trim().trim_matches('"');
        let remaining = params.find_map(|p| p.trim().strip_prefix("r=")?.parse::<u64>().ok());
        if let (false, Some(remaining)) = (name.is_empty(), remaining) {
            out.push(Correction {
                target: Target::Named(name.to_string()),
                remaining,
            });
        }
    }
    if let Some(remaining) = unnamed {
        out.push(Correction {
            target: limit.map_or(Target::Binding, Target::Quota),
            remaining,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(headers: &[(&'static str, &'static str)]) -> Vec<Correction> {
        corrections(|name| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| *v))
    }

    #[test]
    fn corrections_in_a_header_map_are_those_of_its_names() {
        let mut headers = hyper::HeaderMap::new();
        headers.insert("content-type", "text/plain".parse().unwrap());
        assert!(corrections_in(&headers).is_empty());
        headers.insert("x-hubspot-ratelimit-remaining", "7".parse().unwrap());
        headers.insert("sforce-limit-info", "api-usage=25/100".parse().unwrap());
        assert_eq!(
            corrections_in(&headers),
            [
                Correction {
                    target: Target::Shortest,
                    remaining: 7
                },
                Correction {
                    target: Target::Longest,
                    remaining: 75
                }
            ]
        );
    }

    #[test]
    fn retry_after_takes_seconds_or_a_date() {
        let now = httpdate::parse_http_date("Mon, 23 Nov 2026 10:00:00 GMT").unwrap();
        assert_eq!(retry_after(Some("2"), now), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(Some(" 0 "), now), Some(Duration::ZERO));
        assert_eq!(
            retry_after(Some("1.5"), now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            retry_after(Some("Mon, 23 Nov 2026 10:00:07 GMT"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(Some("Mon, 23 Nov 2026 09:59:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(Some("soon"), now), None);
        assert_eq!(retry_after(Some("-3"), now), None);
        assert_eq!(retry_after(None, now), None);
    }

    #[test]
    fn every_vendor_header_becomes_a_correction() {
        assert_eq!(
            from(&[("ratelimit", "\"account\";r=12;t=3, \"daily\";r=900;t=40")]),
            vec![
                Correction {
                    target: Target::Named("account".into()),
                    remaining: 12
                },
                Correction {
                    target: Target::Named("daily".into()),
                    remaining: 900
                },
            ]
        );
        assert_eq!(
            from(&[("ratelimit", "limit=100, remaining=7, reset=3")]),
            vec![Correction {
                target: Target::Quota(100),
                remaining: 7
            }]
        );
        assert_eq!(
            from(&[("x-ratelimit-remaining", "42"), ("x-ratelimit-reset", "9")]),
            vec![Correction {
                target: Target::Binding,
                remaining: 42
            }]
        );
        assert_eq!(
            from(&[
                ("x-hubspot-ratelimit-remaining", "150"),
                ("x-hubspot-ratelimit-daily-remaining", "499000")
            ]),
            vec![
                Correction {
                    target: Target::Shortest,
                    remaining: 150
                },
                Correction {
                    target: Target::Longest,
                    remaining: 499_000
                },
            ]
        );
        assert_eq!(
            from(&[("sforce-limit-info", "api-usage=25/100000")]),
            vec![Correction {
                target: Target::Longest,
                remaining: 99_975
            }]
        );
        assert_eq!(
            from(&[
                ("x-ratelimit-remaining", "42"),
                ("x-ratelimit-limit", "600")
            ]),
            vec![Correction {
                target: Target::Quota(600),
                remaining: 42
            }]
        );
        assert_eq!(from(&[("x-ratelimit-remaining", "lots")]), vec![]);
    }
}
