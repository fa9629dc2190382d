//! Hostile input at volume against `tollgate simulate`'s trace reader:
//! valid trace lines damaged byte by byte. 0 panics; a malformed line stops
//! the run with an error naming that line (the lines before it decided).
//! `TOLLGATE_FUZZ_CASES` sets the cases (256 by default, in CI;
//! `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use tollgate_core::{parse, NoProfiles};
use tollgate_sim::{simulate, Options, SimError};
use tollgate_store::Engine;

const POLICY: &str = "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\"]\nalgorithm = \"token_bucket\"\ncapacity = 5\nrefill = \"1/s\"\n[[limit]]\nname = \"rows\"\nalgorithm = \"fixed_window\"\nevery = \"1m\"\nquota = 100\ncost = { json_array = \"/rows\" }\n[[limit]]\nname = \"slow\"\nalgorithm = \"concurrency\"\nmax = 2\n";

const LINES: &[&str] = &[
    r#"{"t": 0, "method": "GET", "path": "/v1/jobs", "headers": {"x-tenant-id": "acme"}}"#,
    r#"{"t": 0.5, "path": "/v1/rows", "body": {"rows": [1, 2, 3]}, "latency": 0.25}"#,
    r#"{"t": 1e-3, "ip": "10.0.0.1", "query": "a=1&b=%20", "host": "api.example.com"}"#,
    r#"{"t": 2, "domain": "edge", "descriptor": {"tenant": "acme"}}"#,
];

/// Chars this input's lexer cares about.
const SPECIAL: &[char] = &['"', '{', '}', ':', ',', '-', 'e', '9', '\\'];

proptest! {
    #![proptest_config(hostile::cases())]

    #[test]
    fn a_damaged_trace_decides_or_names_its_line(
        picks in proptest::collection::vec((0..LINES.len(), proptest::collection::vec(hostile::edit(SPECIAL), 0..4)), 1..8),
    ) {
        let lines: Vec<String> = picks.iter().map(|(i, e)| hostile::damaged(LINES[*i], e)).collect();
        let trace = lines.join("\n") + "\n";
        // (an edit may be a newline: count the lines the reader sees)
        let count = trace.lines().count();
        let engine = Engine::new(parse(POLICY, &NoProfiles).expect("policy"));
        let options = Options { start: 1_767_225_600_000_000_000, decisions: true, per_key: true, timeline: true };
        let mut out = Vec::new();
        match simulate(&engine, options, trace.as_bytes(), &mut out) {
            Ok(summary) => prop_assert!(summary.requests as usize <= count),
            Err(SimError::Line { line, message }) => {
                prop_assert!((1..=count as u64).contains(&line), "line {line}: {trace:?}");
                prop_assert!(!message.is_empty());
                // The lines before it were decided and written.
                let written = String::from_utf8_lossy(&out).lines().count() as u64;
                prop_assert!(written < line, "{written} decisions before line {line}");
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}

fn run(trace: &[u8]) -> (Result<tollgate_sim::Summary, SimError>, String) {
    let engine = Engine::new(parse(POLICY, &NoProfiles).expect("policy"));
    let options = Options {
        start: 1_767_225_600_000_000_000,
        decisions: true,
        per_key: true,
        timeline: false,
    };
    let mut out = Vec::new();
    let result = simulate(&engine, options, trace, &mut out);
    (result, String::from_utf8_lossy(&out).into_owned())
}

#[test]
fn a_line_that_is_not_utf8_is_named_with_its_column() {
    let mut trace = LINES[0].as_bytes().to_vec();
    trace.extend_from_slice(b"\n{\"t\": 1, \"path\": \"/v1/\xff\"}\n");
    let (result, out) = run(&trace);
    match result {
        Err(SimError::Line { line, message }) => {
            assert_eq!(line, 2);
            assert_eq!(message, "the line is not UTF-8 (a bad byte at column 23)");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(out.lines().count(), 1, "the first line was decided: {out}");
}

#[test]
fn escaped_strings_are_read_as_their_text() {
    // Strings with escapes cannot be borrowed from the line; they decide the
    // same as the plain spelling.
    let plain = r#"{"t": 0, "headers": {"x-tenant-id": "acme"}}"#;
    let escaped = r#"{"t": 0, "headers": {"x-tenant\u002did": "\u0061cme"}}"#;
    let trace = [plain; 5].join("\n") + "\n" + escaped + "\n";
    let (result, out) = run(trace.as_bytes());
    assert_eq!(result.expect("trace").requests, 6);
    let last = out.lines().last().expect("decisions");
    // The 6th request of one tenant, against a bucket of 5.
    assert!(last.contains(r#""allowed":false"#), "{last}");
    assert!(last.contains(r#""limit":"tenant""#), "{last}");
}
