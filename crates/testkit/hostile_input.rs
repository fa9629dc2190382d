//! What the hostile-input harnesses share (`crates/*/tests/hostile_input.rs`
//! include this file with `#[path]`: the crates they test come before the
//! testkit, so they cannot depend on it): the case count, and byte edits
//! that damage a valid input.

#![allow(dead_code)]

use proptest::prelude::*;

/// `TOLLGATE_FUZZ_CASES` cases per property (256 by default, in CI;
/// `bench/fuzz.sh` runs many more).
pub fn cases() -> ProptestConfig {
    let cases = std::env::var("TOLLGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

/// One edit: delete (0), insert (1) or replace (2) a char at a position
/// given as a share of the text's length, with chars the input's lexer
/// cares about (`special`) or any char.
pub fn edit(special: &'static [char]) -> impl Strategy<Value = (u8, f64, char)> {
    let special = proptest::sample::select(special.to_vec());
    (0u8..3, 0.0f64..1.0, prop_oneof![special, any::<char>()])
}

/// `text` after `edits`, in order.
pub fn damaged(text: &str, edits: &[(u8, f64, char)]) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for &(kind, at, c) in edits {
        let i = ((chars.len() as f64) * at) as usize;
        match kind {
            0 if i < chars.len() => {
                chars.remove(i);
            }
            1 => chars.insert(i.min(chars.len()), c),
            _ if i < chars.len() => chars[i] = c,
            _ => chars.push(c),
        }
    }
    chars.into_iter().collect()
}
