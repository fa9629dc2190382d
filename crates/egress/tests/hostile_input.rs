//! Hostile input at volume against the runner's job reader: valid job lines
//! damaged byte by byte. 0 panics; either every line is read, or the whole
//! file is refused with an error naming each bad line (nothing is queued).
//! `TOLLGATE_FUZZ_CASES` sets the cases (256 by default, in CI;
//! `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use tollgate_egress::{parse_config, read_bulk, read_jobs, JobsError};

const CONFIG: &str = "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/api\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n";

const LINES: &[&str] = &[
    r#"{"id": "a1", "method": "POST", "url": "http://127.0.0.1:9/api/v1/jobs", "body": {"n": 1}, "headers": {"x-trace": "t"}}"#,
    r#"{"id": 7, "url": "http://127.0.0.1:9/api/v1/sites?page=2", "priority": "high"}"#,
    r#"{"method": "PATCH", "url": "http://127.0.0.1:9/api/v1/sites/5", "body": "text", "workflow": "sync"}"#,
    r#"{"id": "c", "method": "GET", "url": "http://127.0.0.1:9/api/v1/x", "callback": "https://hooks.example/done?x=1"}"#,
];

/// A config with a bulk template (its body holds the placeholder once).
const BULK: &str = "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/api\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n[[upstream.bulk]]\nname = \"close\"\nmethod = \"POST\"\npath = \"/graphql\"\nmax_items = 3\nbody = { query = \"mutation($ids: [ID!]!) { close(ids: $ids) }\", variables = { ids = \"{{records}}\" } }\n";

const RECORDS: &[&str] = &[r#"{"id": "r1", "n": [1, 2]}"#, r#""r2""#, "3", "null"];

/// Chars this input's lexer cares about.
const SPECIAL: &[char] = &['"', '{', '}', ':', '/', '.', '%', '\\', '@'];

proptest! {
    #![proptest_config(hostile::cases())]

    #[test]
    fn damaged_job_lines_are_read_or_named(
        picks in proptest::collection::vec((0..LINES.len(), proptest::collection::vec(hostile::edit(SPECIAL), 0..4)), 1..8),
    ) {
        let upstreams = parse_config(CONFIG, &tollgate_core::NoProfiles, &|_| None).expect("config");
        let lines: Vec<String> = picks.iter().map(|(i, e)| hostile::damaged(LINES[*i], e)).collect();
        let text = lines.join("\n") + "\n";
        // (an edit may be a newline: count the lines the reader sees)
        let count = text.lines().count();
        match read_jobs(text.as_bytes(), &upstreams) {
            Ok(routed) => {
                prop_assert!(routed.len() <= count);
                // Nothing read goes anywhere but the configured upstream.
                for r in &routed {
                    prop_assert!(r.job.url.starts_with("http://127.0.0.1:9/api"), "{}", r.job.url);
                }
            }
            Err(JobsError::Lines(errors)) => {
                prop_assert!(!errors.is_empty());
                for e in &errors {
                    prop_assert!((1..=count).contains(&e.line), "line {}: {text:?}", e.line);
                    prop_assert!(!e.message.is_empty());
                }
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }

    #[test]
    fn a_damaged_bulk_template_is_read_or_named(edits in proptest::collection::vec(hostile::edit(SPECIAL), 1..5)) {
        let text = hostile::damaged(BULK, &edits);
        match parse_config(&text, &tollgate_core::NoProfiles, &|_| None) {
            Ok(config) => {
                // What parsed still sends records only under its upstream's
                // base URL (as the damaged text wrote it).
                if let Ok(routed) = read_bulk(&b"1\n2\n3\n4\n"[..], &config, "close") {
                    let base = config.upstreams[0].base_url.as_str().trim_end_matches('/');
                    for r in &routed {
                        prop_assert!(r.job.url.starts_with(base), "{} not under {base}", r.job.url);
                    }
                }
            }
            Err(e) => {
                prop_assert!(!e.message.is_empty(), "{text:?}");
                if let Some(line) = e.line {
                    prop_assert!((1..=text.lines().count() + 1).contains(&line), "line {line}: {e}");
                }
            }
        }
    }

    #[test]
    fn damaged_records_are_cut_into_calls_or_named(
        picks in proptest::collection::vec((0..RECORDS.len(), proptest::collection::vec(hostile::edit(SPECIAL), 0..3)), 1..10),
    ) {
        let config = parse_config(BULK, &tollgate_core::NoProfiles, &|_| None).expect("config");
        let text = picks.iter().map(|(i, e)| hostile::damaged(RECORDS[*i], e)).collect::<Vec<_>>().join("\n") + "\n";
        let count = text.lines().count();
        match read_bulk(text.as_bytes(), &config, "close") {
            Ok(calls) => prop_assert!(calls.len() <= count.div_ceil(3).max(1)),
            Err(JobsError::Lines(errors)) => {
                for e in &errors {
                    prop_assert!((1..=count).contains(&e.line), "line {}: {text:?}", e.line);
                    prop_assert!(!e.message.is_empty());
                }
            }
            Err(e) => prop_assert!(false, "{e}"),
        }
    }
}
