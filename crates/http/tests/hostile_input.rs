//! Hostile input at volume against the HTTP plumbing's parsers: paths
//! (normalization must never leave a dot segment, an empty segment or an
//! encoded one behind, so a `path_prefix` cannot be sidestepped), and the
//! vendor headers the comply face reads (`Retry-After`, `RateLimit`,
//! `X-RateLimit-*`). 0 panics. `TOLLGATE_FUZZ_CASES` sets the cases per
//! property (256 by default, in CI; `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use std::time::{Duration, SystemTime};
use tollgate_core::request::{match_view, path_has_prefix};
use tollgate_http::normalize_path;
use tollgate_http::ratelimit::{corrections, retry_after};

/// Path pieces an attacker would combine: dot segments plain and encoded,
/// doubled slashes, encoded slashes and backslashes, raw UTF-8, bare `%`.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_string()),
        Just(".".to_string()),
        Just("%2e%2e".to_string()),
        Just("%2E.".to_string()),
        Just(".%2e".to_string()),
        Just("%2e".to_string()),
        Just("".to_string()),
        Just("%2f".to_string()),
        Just("%5c".to_string()),
        Just("..%2f..".to_string()),
        Just("..%2F".to_string()),
        Just("%2f..".to_string()),
        Just("a%2fb".to_string()),
        Just("..%5c".to_string()),
        Just("..;".to_string()),
        Just("..;x=1".to_string()),
        Just(".;".to_string()),
        Just("\\..".to_string()),
        Just("%".to_string()),
        Just("%4".to_string()),
        Just("%76%31".to_string()),
        Just("admin".to_string()),
        Just("v1".to_string()),
        "[a-z0-9~_-]{1,6}",
        "\\PC{1,3}",
    ]
}

fn hostile_path() -> impl Strategy<Value = String> {
    proptest::collection::vec(piece(), 0..12).prop_map(|pieces| format!("/{}", pieces.join("/")))
}

/// A segment's pieces as an upstream that reads an encoded separator as one
/// would see them, each with its unreserved escapes decoded.
fn pieces_of(segment: &str) -> Vec<String> {
    let mut separated = segment.to_string();
    for encoded in ["%2F", "%2f", "%5C", "%5c"] {
        separated = separated.replace(encoded, "/");
    }
    separated.split('/').map(decoded).collect()
}

/// The first segment of `path` after a reference resolution, written apart
/// from `normalize_path`, as the most lenient upstream reads a path: escapes
/// decoded, an encoded separator taken as one, `;` parameters dropped; `.`
/// and empty segments dropped, `..` taking the one before it away.
fn first_segment(path: &str) -> Option<String> {
    let mut resolved: Vec<String> = Vec::new();
    for segment in path.split('/').flat_map(pieces_of) {
        match segment.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                resolved.pop();
            }
            _ => resolved.push(segment),
        }
    }
    resolved.into_iter().next()
}

/// `.` or `..`, with or without `;` parameters after it.
fn is_dot(piece: &str) -> bool {
    matches!(piece.split(';').next(), Some(".") | Some(".."))
}

/// A segment as an upstream would read it: unreserved escapes decoded.
fn decoded(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let b = (h * 16 + l) as u8;
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

proptest! {
    #![proptest_config(hostile::cases())]

    #[test]
    fn a_normalized_path_has_no_dot_or_empty_segment(path in hostile_path()) {
        let normalized = normalize_path(&path);
        prop_assert!(normalized.starts_with('/'), "{path:?} -> {normalized:?}");
        // (a trailing '/' is kept; any other empty segment is merged)
        let inner = normalized.trim_end_matches('/');
        for segment in inner.split('/').skip(1) {
            prop_assert!(!segment.is_empty(), "{path:?} -> {normalized:?}");
            // Not even where an upstream that reads an encoded separator as
            // one, or drops `;` parameters, would see one.
            for piece in pieces_of(segment) {
                prop_assert!(!is_dot(&piece), "{path:?} -> {normalized:?}");
            }
        }
        // Normalizing again changes nothing.
        let again = normalize_path(&normalized).into_owned();
        prop_assert_eq!(again, normalized.into_owned());
    }

    #[test]
    fn a_path_is_under_a_prefix_exactly_when_its_resolution_is(suffix in hostile_path()) {
        let path = format!("/v1{suffix}");
        let normalized = normalize_path(&path);
        // (as a limit's `path_prefix` matches it)
        let under = path_has_prefix(&normalized, "/v1/") || match_view(&normalized) == "/v1";
        // What goes upstream is what was checked, however leniently the
        // upstream reads it.
        let forwarded = first_segment(&normalized);
        prop_assert_eq!(under, forwarded.as_deref() == Some("v1"), "{:?} -> {:?}", path, normalized);
        // And without encoded separators or parameters (where upstreams
        // differ), it is where the path the client sent leads.
        let plain = !path.contains(';') && pieces_of(&path).len() == path.split('/').count();
        if plain {
            let sent = first_segment(&path);
            prop_assert_eq!(under, sent.as_deref() == Some("v1"), "{:?} -> {:?}", path, normalized);
        }
    }

    #[test]
    fn retry_after_reads_anything_and_waits_at_most_a_day(value in "\\PC{0,40}") {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600);
        if let Some(wait) = retry_after(Some(&value), now) {
            prop_assert!(wait <= Duration::from_secs(86_400), "{value:?}: {wait:?}");
        }
    }

    #[test]
    fn rate_limit_headers_read_anything(
        ietf in "\\PC{0,80}",
        structured in "(\"[a-z]{1,4}\";(r|t|q|w)=-?[0-9]{0,25}(;[a-z]=[0-9]{0,3})?, ){0,4}",
        legacy in "\\PC{0,24}",
        reset in "\\PC{0,24}",
    ) {
        for ratelimit in [&ietf, &structured] {
            let header = |name: &str| match name {
                "ratelimit" => Some(ratelimit.as_str()),
                "x-ratelimit-remaining" | "x-ratelimit-limit" => Some(legacy.as_str()),
                "x-ratelimit-reset" => Some(reset.as_str()),
                _ => None,
            };
            let _ = corrections(header);
        }
    }
}
