//! Durations, rates and amounts as the policy language writes them.
//!
//! Time inside the engine is `u64` nanoseconds since the Unix epoch; latency
//! amounts are microseconds. Parsing is strict so a typo is an error, not a
//! silently different limit.

/// Nanoseconds since the Unix epoch (or a span of nanoseconds).
pub type Nanos = u64;

/// Nanoseconds in a microsecond.
pub const NANOS_PER_MICRO: u64 = 1_000;
/// Nanoseconds in a second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Spans in nanoseconds.
pub const MILLISECOND: Nanos = 1_000_000;
/// A second, in ns.
pub const SECOND: Nanos = NANOS_PER_SEC;
/// A minute, in ns.
pub const MINUTE: Nanos = 60 * SECOND;
/// An hour, in ns.
pub const HOUR: Nanos = 60 * MINUTE;
/// A day, in ns.
pub const DAY: Nanos = 24 * HOUR;

/// Parse a duration such as `2s`, `500ms`, `1m`, `1min`, `1h`, `1d`, `172.5s`, `30s`.
pub fn parse_duration(text: &str) -> Result<Nanos, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_nanos: u64 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => NANOS_PER_MICRO,
        "ms" => 1_000_000,
        "s" => NANOS_PER_SEC,
        "m" | "min" => 60 * NANOS_PER_SEC,
        "h" => 3_600 * NANOS_PER_SEC,
        "d" => 86_400 * NANOS_PER_SEC,
        _ => {
            return Err(format!(
                "'{text}' is not a duration; use e.g. 500ms, 2s, 1m, 1h, 1d"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration; use e.g. 500ms, 2s, 1m, 1h, 1d"))?;
    let nanos = value * unit_nanos as f64;
    if !(0.0..=1e18).contains(&nanos) {
        return Err(format!("'{text}' is out of range"));
    }
    Ok(nanos.round() as u64)
}

/// A rate `amount` per `per` nanoseconds, e.g. `300/s` or `100/30s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Units ...
    pub amount: u64,
    /// ... per this many ns.
    pub per: Nanos,
}

impl Rate {
    /// Parse `N/s`, `N/min`, `N/h`, `N/d` or `N/<duration>` such as `N/30s`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("'{text}' is not a rate; use N/s, N/min, N/h, N/d (or N/30s)");
        let (amount, period) = text.split_once('/').ok_or_else(bad)?;
        let amount: u64 = amount.trim().parse().map_err(|_| bad())?;
        let period = period.trim();
        let per = match period {
            "s" => NANOS_PER_SEC,
            "min" | "m" => 60 * NANOS_PER_SEC,
            "h" => 3_600 * NANOS_PER_SEC,
            "d" => 86_400 * NANOS_PER_SEC,
            other if other.starts_with(|c: char| c.is_ascii_digit()) => {
                parse_duration(other).map_err(|_| bad())?
            }
            _ => return Err(bad()),
        };
        if amount == 0 || per == 0 {
            return Err(format!("'{text}' is a zero rate; a limit must refill"));
        }
        Ok(Rate { amount, per })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(2 * NANOS_PER_SEC));
        assert_eq!(parse_duration("172.5s"), Ok(172_500_000_000));
        assert_eq!(parse_duration("1min"), Ok(60 * NANOS_PER_SEC));
        assert_eq!(parse_duration("1m"), Ok(60 * NANOS_PER_SEC));
        assert_eq!(parse_duration("24h"), Ok(86_400 * NANOS_PER_SEC));
        assert_eq!(parse_duration("500ms"), Ok(500_000_000));
        assert!(parse_duration("2 weeks").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(
            Rate::parse("300/s"),
            Ok(Rate {
                amount: 300,
                per: NANOS_PER_SEC
            })
        );
        assert_eq!(
            Rate::parse("100/30s").map(|r| r.per),
            Ok(30 * NANOS_PER_SEC)
        );
        assert_eq!(Rate::parse("1/min").map(|r| r.per), Ok(60 * NANOS_PER_SEC));
        let err = Rate::parse("10/sec").unwrap_err();
        assert!(
            err.contains("is not a rate; use N/s, N/min, N/h, N/d"),
            "{err}"
        );
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("ten/s").is_err());
    }
}
