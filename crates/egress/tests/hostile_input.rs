//! Hostile input at volume against the runner's job reader: valid job lines
//! damaged byte by byte. 0 panics; either every line is read, or the whole
//! file is refused with an error naming each bad line (nothing is queued).
//! `TOLLGATE_FUZZ_CASES` sets the cases (256 by default, in CI;
//! `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use tollgate_egress::{parse_config, read_jobs, JobsError};

const CONFIG: &str = "[[upstream]]\nname = \"crm\"\nbase_url = \"http://127.0.0.1:9/api\"\n[[upstream.limit]]\nname = \"api\"\nalgorithm = \"token_bucket\"\ncapacity = 10\nrefill = \"10/s\"\n";

const LINES: &[&str] = &[
    r#"{"id": "a1", "method": "POST", "url": "http://127.0.0.1:9/api/v1/jobs", "body": {"n": 1}, "headers": {"x-trace": "t"}}"#,
    r#"{"id": 7, "url": "http://127.0.0.1:9/api/v1/sites?page=2", "priority": "high"}"#,
    r#"{"method": "PATCH", "url": "http://127.0.0.1:9/api/v1/sites/5", "body": "text", "workflow": "sync"}"#,
];

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
}
