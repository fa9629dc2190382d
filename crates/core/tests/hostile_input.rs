//! Hostile input at volume against the policy language's parser: valid
//! configs damaged byte by byte, and key parts and durations of any text.
//! 0 panics; every error has a message, and a line within the text when it
//! names one. `TOLLGATE_FUZZ_CASES` sets the cases per property (256 by
//! default, in CI; `bench/fuzz.sh` runs many more).

#[path = "../../testkit/hostile_input.rs"]
mod hostile;

use proptest::prelude::*;
use tollgate_core::policy::KeyPart;
use tollgate_core::{parse, NoProfiles};

/// Configs that parse, one per algorithm and feature.
const VALID: &[&str] = &[
    "[[limit]]\nname = \"tenant\"\nkey = [\"header:x-tenant-id\", \"ip\"]\nalgorithm = \"token_bucket\"\ncapacity = 20\nrefill = \"10/s\"\nhold = \"250ms\"\n",
    "[[limit]]\nname = \"daily\"\nalgorithm = \"fixed_window\"\nevery = \"1d\"\nquota = 1000\ntimezone = \"Europe/Amsterdam\"\nmatch = { methods = [\"POST\"], path_prefix = \"/v1/\" }\n",
    "[[limit]]\nname = \"pool\"\nalgorithm = \"tiered\"\ntiers = [{ every = \"1m\", quota = 100 }, { every = \"1h\", quota = 2600 }]\ncost = { header = \"x-units\" }\n",
    "[[limit]]\nname = \"slide\"\nalgorithm = \"sliding_window\"\nevery = \"1m\"\nquota = 60\nsegments = 12\nmode = \"shadow\"\nmissing_key = \"reject\"\nkey = [\"query:account\"]\n",
    "[[limit]]\nname = \"busy\"\nalgorithm = \"concurrency\"\nmax = 4\n[[class]]\nname = \"sandbox\"\nmatch = { headers = { x-env = \"sandbox\" } }\nscale = 0.1\n",
    "[[limit]]\nname = \"rls\"\nkey = [\"descriptor:tenant\"]\nmatch = { domain = \"edge\", descriptors = { plan = \"free\" } }\nalgorithm = \"leaky_bucket\"\ncapacity = 5\nrefill = \"1/s\"\n[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\n",
];

/// Chars this input's lexer cares about.
const SPECIAL: &[char] = &['"', '=', '[', ']', '{', '\n', '#', '.', '-', '0', '9', '/'];

proptest! {
    #![proptest_config(hostile::cases())]

    #[test]
    fn a_damaged_config_parses_or_says_where(
        which in 0..VALID.len(),
        edits in proptest::collection::vec(hostile::edit(SPECIAL), 1..6),
    ) {
        let text = hostile::damaged(VALID[which], &edits);
        if let Err(e) = parse(&text, &NoProfiles) {
            prop_assert!(!e.message.is_empty(), "{text:?}");
            if let Some(line) = e.line {
                let lines = text.lines().count().max(1);
                prop_assert!((1..=lines + 1).contains(&line), "line {line} of {lines}: {text:?}: {e}");
            }
        }
    }

    #[test]
    fn values_of_any_text_parse_or_name_the_field(
        duration in "\\PC{0,16}",
        rate in "\\PC{0,16}",
        number in "-?[0-9]{0,30}(\\.[0-9]{0,5})?(e[0-9]{1,3})?",
    ) {
        let text = format!(
            "[[limit]]\nname = \"x\"\nalgorithm = \"token_bucket\"\ncapacity = {number}\nrefill = {rate:?}\nhold = {duration:?}\n"
        );
        if let Err(e) = parse(&text, &NoProfiles) {
            prop_assert!(!e.message.is_empty(), "{text:?}");
        }
        let window = format!(
            "[[limit]]\nname = \"x\"\nalgorithm = \"fixed_window\"\nevery = {duration:?}\nquota = 5\ntimezone = {rate:?}\n"
        );
        if let Err(e) = parse(&window, &NoProfiles) {
            prop_assert!(!e.message.is_empty(), "{window:?}");
        }
    }

    #[test]
    fn key_parts_of_any_text_parse_or_quote_it(text in "\\PC{0,24}") {
        if let Err(message) = KeyPart::parse(&text) {
            prop_assert!(message.contains(&text), "{message}");
        }
    }
}
