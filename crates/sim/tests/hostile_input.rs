//! Hostile input at volume against `tollgate simulate`'s trace reader:
//! valid trace lines damaged byte by byte. 0 panics; a malformed line stops
//! the run with an error naming that line (the lines before it decided).
//! `TOLLGATE_FUZZ_CASES` sets the cases (256 by default, in CI;
//! `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use tollgate_core::{parse, NoProfiles};
use tollgate_sim::{simulate, Options, SimError, TraceLine};
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

/// How serde_json reads `line`, as text to compare (a line or an error).
fn serde_reads(line: &str) -> Result<String, ()> {
    serde_json::from_str::<TraceLine<'_>>(line)
        .map(|read| format!("{read:?}"))
        .map_err(|_| ())
}

/// A field of a line, written out: `clean` if the scanner should take it
/// (a known field, a plain string, a number as JSON writes it).
fn field() -> impl Strategy<Value = (String, bool)> {
    let names = ["method", "path", "host", "ip", "query", "domain"];
    let plain = "[ -!#-\\[\\]-~\u{7f}é€😀]{0,10}"; // no quote, backslash or control char
    let any_text = "\\PC{0,6}|[\"\\\\\u{0}-\u{1f}a]{0,4}";
    let string = prop_oneof![
        plain.prop_map(|s| (format!("\"{s}\""), true)),
        // Escaped, written by serde_json or by hand: for serde_json.
        any_text.prop_map(|s| (serde_json::to_string(&s).expect("string"), false)),
        Just(("\"\\u0061b\"".to_string(), false)),
        // A control character as it is, which JSON forbids in a string.
        "[\u{0}-\u{1f}]".prop_map(|c| (format!("\"a{c}b\""), false)),
        Just(("null".to_string(), false)),
        Just(("7".to_string(), false)),
    ];
    let number = number();
    // (spaced inside as well: JSON's four kinds of space, or none)
    let space = prop::sample::select(vec!["", "", " ", "\t", "\r\n"]);
    let entries = (
        prop::collection::vec((string.clone(), string.clone()), 0..3),
        space.clone(),
        space,
    )
        .prop_map(|(entries, a, b)| {
            let clean = entries.iter().all(|((_, k), (_, v))| *k && *v);
            let written: Vec<String> = entries
                .into_iter()
                .map(|((k, _), (v, _))| format!("{a}{k}{b}:{a}{v}{b}"))
                .collect();
            (format!("{{{b}{}}}", written.join(",")), clean)
        });
    prop_oneof![
        4 => (prop::sample::select(names.to_vec()), string).prop_map(|(n, (v, c))| (format!("\"{n}\":{v}"), c)),
        2 => (prop::sample::select(vec!["headers", "descriptor"]), entries).prop_map(|(n, (v, c))| (format!("\"{n}\":{v}"), c)),
        2 => number.prop_map(|(v, c)| (format!("\"latency\":{v}"), c)),
        1 => Just((r#""body":{"rows":[1,2]}"#.to_string(), false)),
        1 => Just((r#""other":1"#.to_string(), false)),
    ]
}

/// A number as a trace might write one, `clean` if it is JSON's.
fn number() -> impl Strategy<Value = (String, bool)> {
    prop_oneof![
        (0u64..2_000_000, 0u32..1_000_000).prop_map(|(a, b)| (format!("{a}.{b:06}"), true)),
        any::<i32>().prop_map(|n| (n.to_string(), true)),
        (1u32..99, -30i32..30).prop_map(|(m, e)| (format!("{m}e{e}"), true)),
        (1u32..99, 0u32..9).prop_map(|(m, e)| (format!("-0.{m}E+{e}"), true)),
        "-?[1-9][0-9]{14,20}(\\.[0-9]{1,4})?".prop_map(|n| (n, true)),
        prop::sample::select(vec![
            "-0",
            "0",
            "-0.0",
            "1e007",
            "0.1e-0",
            "12345678901234567890123.000000000000000000001"
        ])
        .prop_map(|n| (n.to_string(), true)),
        // Not JSON, or not a number: for serde_json (which refuses them).
        prop::sample::select(vec![
            "01", "1.", ".5", "+1", "-", "1e", "1e+", "0x10", "1e999", "\"3\"", "NaN", "1.2.3",
            "1..5", "-01"
        ])
        .prop_map(|n| (n.to_string(), false)),
    ]
}

proptest! {
    #![proptest_config(hostile::cases())]

    /// Whatever the line, `TraceLine::parse` reads it as serde_json does
    /// (the same fields, or an error), and a clean line is read by the
    /// scanner, not handed to serde_json.
    #[test]
    fn a_line_is_read_as_serde_json_reads_it(
        t in prop_oneof![4 => number(), 1 => Just(("\"x\"".to_string(), false))],
        // (`t` once as a rule; left out, or given twice, for serde_json to refuse)
        ts in prop::sample::select(vec![1usize, 1, 1, 1, 1, 0, 2]),
        t_at in 0usize..8,
        fields in prop::collection::vec(field(), 0..7),
        spaces in prop_oneof![
            prop::collection::vec(prop::sample::select(vec!["", "", " "]), 24),
            prop::collection::vec(prop::sample::select(vec!["", " ", "\t", "\r\n"]), 24),
            // spaces JSON does not know (a form feed, a no-break space)
            prop::collection::vec(prop::sample::select(vec!["", " ", "\u{c}", "\u{a0}"]), 24),
        ],
        edits in prop::collection::vec(hostile::edit(SPECIAL), 0..2),
    ) {
        let mut parts: Vec<(String, bool)> = fields;
        for _ in 0..ts {
            parts.insert(t_at.min(parts.len()), (format!("\"t\":{}", t.0), t.1));
        }
        let mut seen = std::collections::HashSet::new();
        let unique = parts.iter().all(|(p, _)| seen.insert(p.split(':').next().unwrap_or("").to_string()));
        let foreign_space = spaces.iter().any(|s| s.contains(['\u{c}', '\u{a0}']));
        let clean = ts == 1 && unique && !foreign_space && parts.iter().all(|(_, c)| *c);
        // Space before and after each token the scanner skips over.
        let mut line = format!("{}{{", spaces[0]);
        for (i, (part, _)) in parts.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let spaced = part.replacen(':', &format!("{}:{}", spaces[(2 * i + 1) % 24], spaces[(2 * i + 2) % 24]), 1);
            line.push_str(&format!("{sep}{}{spaced}{}", spaces[(3 * i) % 24], spaces[(3 * i + 5) % 24]));
        }
        line.push_str(&format!("}}{}", spaces[23]));
        let read = TraceLine::parse(&line).map(|read| format!("{read:?}")).map_err(|_| ());
        prop_assert_eq!(&read, &serde_reads(&line), "{}", line);
        if clean {
            prop_assert!(tollgate_sim::trace_scan(&line).is_some(), "not scanned: {}", line);
        }
        // The same line damaged: still read as serde_json reads it.
        let damaged = hostile::damaged(&line, &edits);
        let read = TraceLine::parse(&damaged).map(|read| format!("{read:?}")).map_err(|_| ());
        prop_assert_eq!(read, serde_reads(&damaged), "{}", damaged);
    }
}

proptest! {
    #![proptest_config(hostile::cases())]

    /// A number read by the shortcut is the f64 serde_json and std read,
    /// to the bit; the usual numbers of a trace take the shortcut.
    #[test]
    fn a_number_is_read_as_serde_json_and_std_read_it(
        negative in any::<bool>(),
        whole in prop_oneof!["0", "[1-9][0-9]{0,20}"],
        fraction in prop::option::of("[0-9]{1,20}"),
        exponent in prop::option::of("[eE][+-]?[0-9]{1,3}|e-2147483648|E\\+2147483647"),
    ) {
        let number = format!("{}{whole}{}{}", if negative { "-" } else { "" },
            fraction.as_ref().map_or(String::new(), |f| format!(".{f}")), exponent.unwrap_or_default());
        let by_std: f64 = number.parse().expect("a number");
        if let Some(read) = tollgate_sim::exact_decimal(&number) {
            prop_assert_eq!(read.to_bits(), by_std.to_bits(), "{}", number);
            let by_serde: f64 = serde_json::from_str(&number).expect("a number");
            prop_assert_eq!(read.to_bits(), by_serde.to_bits(), "{}", number);
        }
    }

    /// Number-like text of any kind: read by the shortcut only where
    /// serde_json reads the same number.
    #[test]
    fn number_like_text_is_read_as_serde_json_reads_it(text in "-?[0-9.eE+-]{0,10}") {
        if let Some(read) = tollgate_sim::exact_decimal(&text) {
            let by_serde: Result<f64, _> = serde_json::from_str(&text);
            prop_assert_eq!(Some(read.to_bits()), by_serde.ok().map(f64::to_bits), "{}", text);
        }
    }

    #[test]
    fn a_trace_s_usual_numbers_take_the_shortcut(seconds in 0u64..1_000_000_000, micros in 0u32..1_000_000) {
        for number in [format!("{seconds}.{micros:06}"), seconds.to_string(), format!("{}.{:03}", seconds % 1000, micros % 1000)] {
            let read = tollgate_sim::exact_decimal(&number);
            prop_assert_eq!(read.map(f64::to_bits), Some(number.parse::<f64>().expect("a number").to_bits()), "{}", number);
        }
    }
}

/// The shortcut takes digits up to 2^53 as one integer (what an f64 holds
/// exactly) and leaves a longer run to the parsers, wherever the point is.
#[test]
fn the_shortcut_takes_digits_up_to_two_to_the_53() {
    for taken in [
        "9007199254740992",
        "900719925474099.2",
        "0.9007199254740992",
        "-9007199254740992e-22",
    ] {
        let read = tollgate_sim::exact_decimal(taken).map(f64::to_bits);
        assert_eq!(
            read,
            Some(taken.parse::<f64>().expect("a number").to_bits()),
            "{taken}"
        );
    }
    for left in [
        "9007199254740993",
        "900719925474099.3",
        "18446744073709551616",
        "1.00000000000000000000",
    ] {
        assert_eq!(tollgate_sim::exact_decimal(left), None, "{left}");
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
