//! One line of a trace: the request attributes of docs/config.md ("Trace format"),
//! borrowed from the line where possible so replay allocates little.
//!
//! A line is read by `TraceLine::parse`: the usual line (known fields, plain
//! strings, numbers, no `body`) by a scanner made for it, any other by
//! serde_json, which also words every error. The scanner takes a line only
//! where serde_json would read the same (a property test holds them equal);
//! it exists because serde_json took 37% of a replay's time.

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use smallvec::SmallVec;
use std::borrow::Cow;
use std::fmt;
use tollgate_core::request::query_param;
use tollgate_core::Request;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceLine<'a> {
    /// Seconds after the start of the simulation, as written (echoed back).
    #[serde(borrow, deserialize_with = "raw_text")]
    pub t: &'a str,
    #[serde(borrow, default)]
    pub method: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub path: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub host: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub ip: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub query: Option<Text<'a>>,
    #[serde(borrow, default)]
    pub headers: Headers<'a>,
    #[serde(borrow, default)]
    pub body: Option<&'a serde_json::value::RawValue>,
    /// An Envoy rate limit request's domain and one of its descriptors'
    /// entries (what `tollgate serve`'s RLS listener decides).
    #[serde(borrow, default)]
    pub domain: Option<Text<'a>>,
    /// (Boxed: few traces have one, and every line is moved about.)
    #[serde(borrow, default, deserialize_with = "boxed")]
    pub descriptor: Option<Box<Headers<'a>>>,
    /// Seconds the upstream took; charged (latency limits) and released
    /// (concurrency) at completion.
    #[serde(default)]
    pub latency: Option<f64>,
}

impl<'a> TraceLine<'a> {
    /// Read one line (without its newline).
    pub fn parse(line: &'a str) -> Result<TraceLine<'a>, serde_json::Error> {
        let mut parsed = TraceLine::default();
        TraceLine::parse_into(line, &mut parsed).map(|()| parsed)
    }

    /// `parse` into `parsed`, which starts empty: a line read where it is
    /// kept is not moved on its way there (two copies of its 300-odd bytes,
    /// about 120 instructions of a replay's line, when returned).
    pub fn parse_into(line: &'a str, parsed: &mut TraceLine<'a>) -> Result<(), serde_json::Error> {
        if scan_into(line, parsed).is_none() {
            *parsed = serde_json::from_str(line)?;
        }
        Ok(())
    }
}

/// A descriptor's entries, boxed (`null` refused, as for `headers`).
fn boxed<'de: 'a, 'a, D: Deserializer<'de>>(d: D) -> Result<Option<Box<Headers<'a>>>, D::Error> {
    Headers::deserialize(d).map(|entries| Some(Box::new(entries)))
}

/// Any JSON value, as written.
fn raw_text<'de, D: Deserializer<'de>>(d: D) -> Result<&'de str, D::Error> {
    <&serde_json::value::RawValue>::deserialize(d).map(serde_json::value::RawValue::get)
}

/// `line` read as serde_json would read it, if it is the usual kind: an
/// object of the known fields other than `body`, each once, strings without
/// escapes, no `null`. `None` for anything else (serde_json then reads it).
/// (Into `parsed`, which starts empty: a line is large to move.)
fn scan_into<'a>(line: &'a str, parsed: &mut TraceLine<'a>) -> Option<()> {
    let mut at = Cursor { text: line, at: 0 };
    let mut seen = 0u16;
    if !at.eat(b'{') {
        return None;
    }
    loop {
        let (bit, text) = match at.string()? {
            "t" => (0, None),
            "method" => (1, Some(&mut parsed.method)),
            "path" => (2, Some(&mut parsed.path)),
            "host" => (3, Some(&mut parsed.host)),
            "ip" => (4, Some(&mut parsed.ip)),
            "query" => (5, Some(&mut parsed.query)),
            "domain" => (6, Some(&mut parsed.domain)),
            "headers" => (7, None),
            "descriptor" => (8, None),
            "latency" => (9, None),
            _ => return None, // `body`, or a field serde_json refuses
        };
        if seen & (1 << bit) != 0 || !at.eat(b':') {
            return None; // twice, or no colon: serde_json refuses it
        }
        seen |= 1 << bit;
        match (bit, text) {
            (_, Some(text)) => *text = Some(Text(Cow::Borrowed(at.string()?))),
            (0, _) => parsed.t = at.number()?,
            (7, _) => parsed.headers = at.map()?,
            (8, _) => parsed.descriptor = Some(Box::new(at.map()?)),
            // (as serde_json reads it, to the last bit)
            _ => {
                let number = at.number()?;
                let read = exact_value(number).or_else(|| serde_json::from_str(number).ok());
                parsed.latency = Some(read?);
            }
        }
        if at.eat(b'}') {
            break;
        }
        if !at.eat(b',') {
            return None;
        }
    }
    at.skip_space();
    (seen & 1 != 0 && at.at == line.len()).then_some(())
}

/// Powers of ten an f64 holds exactly.
const EXACT_POWERS_OF_TEN: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

/// A JSON number's value where one exact operation gives it: its digits as
/// an integer an f64 holds exactly (at most 2^53), times or over a power of
/// ten up to 10^22 (exact too), so the one multiplication or division rounds
/// once, to the nearest f64, as serde_json and `str::parse` both read it
/// (Clinger's fast path, which both parsers take first too). `None` for any
/// other number, and for text that is not a JSON number.
/// Most of a trace's numbers (`t`, `latency`) are of this kind, and reading
/// them here costs a fraction of what either parser does.
#[doc(hidden)] // public for the property test that holds it to both parsers
pub fn exact_decimal(text: &str) -> Option<f64> {
    let mut at = Cursor { text, at: 0 };
    match at.number() {
        Some(number) if at.at == text.len() => exact_value(number),
        _ => None,
    }
}

/// `exact_decimal` of a JSON value known to be well formed (the scanner's
/// numbers, serde_json's raw `t`): `None` at once for one that is not a
/// number, without checking the grammar of one that is.
pub(crate) fn exact_value(number: &str) -> Option<f64> {
    let (negative, unsigned) = match number.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, number),
    };
    let bytes = unsigned.as_bytes();
    // (a longer number is left to the parsers, and the exponent cannot overflow)
    if bytes.len() > 64 || !bytes.first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    // The digits before and after the point as one integer (a run too long
    // for 64 bits is left to the parsers), each digit after the point moving
    // the point one place left.
    let (mut mantissa, mut exponent, mut at) = (0u64, 0i32, 0);
    while let Some(digit) = digit_at(bytes, at) {
        mantissa = mantissa.checked_mul(10)?.checked_add(digit)?;
        at += 1;
    }
    if bytes.get(at) == Some(&b'.') {
        at += 1;
        while let Some(digit) = digit_at(bytes, at) {
            mantissa = mantissa.checked_mul(10)?.checked_add(digit)?;
            exponent -= 1;
            at += 1;
        }
    }
    match bytes.get(at) {
        None => {}
        Some(b'e' | b'E') => {
            let written: i32 = unsigned.get(at + 1..)?.parse().ok()?;
            exponent = exponent.checked_add(written)?;
        }
        Some(_) => return None,
    }
    if mantissa > 1 << 53 {
        return None;
    }
    let power = *EXACT_POWERS_OF_TEN.get(exponent.unsigned_abs() as usize)?;
    let value = match exponent >= 0 {
        true => mantissa as f64 * power,
        false => mantissa as f64 / power,
    };
    Some(if negative { -value } else { value })
}

/// The decimal digit at `bytes[at]`, if there is one.
#[inline]
fn digit_at(bytes: &[u8], at: usize) -> Option<u64> {
    let digit = bytes.get(at)?.wrapping_sub(b'0');
    (digit < 10).then_some(u64::from(digit))
}

/// `line` read by the scanner alone: `None` where it leaves the line to
/// serde_json.
#[doc(hidden)] // public for the property test that holds it to serde_json
pub fn scan(line: &str) -> Option<TraceLine<'_>> {
    let mut parsed = TraceLine::default();
    scan_into(line, &mut parsed).map(|()| parsed)
}

/// Bytes a string can hold as they are: not its closing quote, not an
/// escape, not a control character (which JSON forbids unescaped).
const IN_PLAIN_STRING: [bool; 256] = {
    let mut plain = [true; 256];
    let mut byte = 0;
    while byte < 0x20 {
        plain[byte] = false;
        byte += 1;
    }
    plain[b'"' as usize] = false;
    plain[b'\\' as usize] = false;
    plain
};

/// How many bytes `bytes` starts with that a string holds as they are.
/// (Not inlined: inlined into the scanner, this loop was compiled to carry
/// a dozen counters and took 13 instructions a byte instead of 5.)
#[inline(never)]
fn plain_len(bytes: &[u8]) -> usize {
    (bytes.iter())
        .position(|&byte| !IN_PLAIN_STRING[usize::from(byte)])
        .unwrap_or(bytes.len())
}

/// A place in a line being scanned.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.at += 1;
        }
    }

    /// Past `byte` (after any space), if it is next.
    fn eat(&mut self, byte: u8) -> bool {
        match self.peek() {
            Some(next) if next == byte => {
                self.at += 1;
                true
            }
            Some(b' ' | b'\t' | b'\n' | b'\r') => {
                self.skip_space();
                let next = self.peek() == Some(byte);
                self.at += usize::from(next);
                next
            }
            _ => false,
        }
    }

    /// A string without escapes or control characters, borrowed.
    fn string(&mut self) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        let rest = self.text.as_bytes().get(start..)?;
        let len = plain_len(rest);
        if rest.get(len) != Some(&b'"') {
            return None; // an escape or a control character
        }
        self.at = start + len + 1;
        // (the quotes are ASCII: the ends are char boundaries)
        self.text.get(start..start + len)
    }

    /// A number as JSON writes it, as written.
    fn number(&mut self) -> Option<&'a str> {
        self.skip_space();
        let start = self.at;
        if self.peek() == Some(b'-') {
            self.at += 1;
        }
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return None,
        }
        if self.peek() == Some(b'.') {
            self.at += 1;
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.at += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.at += 1;
            }
            self.some_digits()?;
        }
        self.text.get(start..self.at)
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.at;
        self.digits();
        (self.at > start).then_some(())
    }

    /// An object of plain strings (headers, a descriptor's entries).
    fn map(&mut self) -> Option<Headers<'a>> {
        if !self.eat(b'{') {
            return None;
        }
        let mut entries = SmallVec::new();
        if self.eat(b'}') {
            return Some(Headers(entries));
        }
        loop {
            let name = self.string()?;
            if !self.eat(b':') {
                return None;
            }
            let value = self.string()?;
            entries.push((Text(Cow::Borrowed(name)), Text(Cow::Borrowed(value))));
            if self.eat(b'}') {
                return Some(Headers(entries));
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }
}

/// A string of the line: borrowed from it unless it has escapes. (serde's own
/// `Cow<str>` is always owned unless it is a field marked `borrow`, so inside
/// an `Option` or a map every string would be copied to the heap.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Text<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Text<'a>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// Header names as given; looked up case-insensitively. Inline up to two,
/// so a typical line allocates nothing.
#[derive(Debug, Default)]
pub struct Headers<'a>(pub SmallVec<[(Text<'a>, Text<'a>); 2]>);

impl<'de: 'a, 'a> Deserialize<'de> for Headers<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Headers<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of header names to string values")
            }
            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Headers<'a>, M::Error> {
                let mut out = SmallVec::new();
                while let Some((k, v)) = map.next_entry::<Text<'a>, Text<'a>>()? {
                    out.push((k, v));
                }
                Ok(Headers(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A trace line as the engine sees it, with its body parsed on demand.
#[derive(Debug)]
pub struct TraceRequest<'l, 'a> {
    pub line: &'l TraceLine<'a>,
    pub body: Option<serde_json::Value>,
}

impl Request for TraceRequest<'_, '_> {
    fn method(&self) -> &str {
        self.line.method.as_deref().unwrap_or("GET")
    }
    fn path(&self) -> &str {
        self.line.path.as_deref().unwrap_or("/")
    }
    fn host(&self) -> Option<&str> {
        self.line.host.as_deref()
    }
    fn ip(&self) -> Option<&str> {
        self.line.ip.as_deref()
    }
    fn header(&self, name: &str) -> Option<&str> {
        self.line
            .headers
            .0
            .iter()
            // Names are mostly written as the policy spells them: compare
            // the bytes first.
            .find(|(n, _)| **n == *name || n.eq_ignore_ascii_case(name))
            .map(|(_, v)| &**v)
    }
    fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        query_param(self.line.query.as_deref()?, name)
    }
    fn json_body(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
    fn domain(&self) -> Option<&str> {
        self.line.domain.as_deref()
    }
    fn descriptor(&self, key: &str) -> Option<&str> {
        (self.line.descriptor.as_deref()?.0.iter())
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}
