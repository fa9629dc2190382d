//! The samples of one scrape, read back from the Prometheus text a face's
//! `/metrics` serves. History and alerts record exactly what `/metrics`
//! shows, so a chart and the metrics it draws can never disagree.

/// Whether a series only grows (and its increase is what counts) or is a
/// level read as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A `_total` counter, or a histogram's `_sum` and `_count`.
    Counter,
    Gauge,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }

    pub fn parse(text: &str) -> Option<Kind> {
        match text {
            "counter" => Some(Kind::Counter),
            "gauge" => Some(Kind::Gauge),
            _ => None,
        }
    }
}

/// One line of a scrape: `name{label="value",..} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
    pub kind: Kind,
}

impl Sample {
    /// The series this sample belongs to, as `/metrics` writes it.
    pub fn key(&self) -> String {
        series_key(&self.name, &self.labels)
    }
}

/// `name{a="1",b="2"}` (or `name` without labels), values escaped as the
/// text format escapes them.
pub fn series_key(name: &str, labels: &[(String, String)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let mut out = String::with_capacity(name.len() + 16 * labels.len());
    out.push_str(name);
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// A series key read back into its name and labels (`None` if it is not
/// one `series_key` wrote).
pub fn parse_key(key: &str) -> Option<(String, Vec<(String, String)>)> {
    let (name, labels, rest) = split_line(key)?;
    rest.trim().is_empty().then_some((name, labels))
}

/// The samples of a scrape in Prometheus' or OpenMetrics' text format.
/// Histogram buckets and `_created` lines are left out (history keeps a
/// histogram's `_sum` and `_count`); lines that do not read are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    let mut samples = Vec::new();
    // The family being read: (name, kind of its samples, is a histogram).
    let mut family: Option<(String, Option<Kind>, bool)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            let (Some(name), Some(kind)) = (words.next(), words.next()) else {
                continue;
            };
            let histogram = matches!(kind, "histogram" | "summary");
            let kind = match kind {
                "counter" => Some(Kind::Counter),
                "histogram" | "summary" => Some(Kind::Counter),
                "gauge" => Some(Kind::Gauge),
                _ => None,
            };
            family = Some((name.to_string(), kind, histogram));
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((name, labels, rest)) = split_line(line) else {
            continue;
        };
        if name.ends_with("_created") || name.ends_with("_bucket") {
            continue;
        }
        // (NaN and infinities have no place in a sum or a chart)
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let kind = match &family {
            Some((family, kind, histogram)) if name.starts_with(family.as_str()) => {
                let suffix = &name[family.len()..];
                if *histogram && !matches!(suffix, "_sum" | "_count") {
                    continue;
                }
                kind.unwrap_or(if suffix == "_total" {
                    Kind::Counter
                } else {
                    Kind::Gauge
                })
            }
            _ if name.ends_with("_total") => Kind::Counter,
            _ => Kind::Gauge,
        };
        samples.push(Sample {
            name,
            labels,
            value,
            kind,
        });
    }
    samples
}

/// A series' labels, in the order `/metrics` writes them.
pub type Labels = Vec<(String, String)>;

/// `name{labels} rest` into its name, labels and the rest of the line.
fn split_line(line: &str) -> Option<(String, Labels, &str)> {
    let end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices().peekable();
        loop {
            // label name up to '=', or the closing brace
            let mut key = String::new();
            let mut closed = None;
            for (i, c) in chars.by_ref() {
                match c {
                    '}' => {
                        closed = Some(i);
                        break;
                    }
                    '=' => break,
                    ',' if key.is_empty() => {}
                    c => key.push(c),
                }
            }
            if let Some(i) = closed {
                rest = &inner[i + 1..];
                break;
            }
            if chars.next().map(|(_, c)| c) != Some('"') {
                return None;
            }
            let mut value = String::new();
            let mut ended = false;
            while let Some((_, c)) = chars.next() {
                match c {
                    '\\' => match chars.next().map(|(_, c)| c) {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => return None,
                    },
                    '"' => {
                        ended = true;
                        break;
                    }
                    c => value.push(c),
                }
            }
            if !ended {
                return None;
            }
            labels.push((key.trim().to_string(), value));
        }
    }
    Some((name.to_string(), labels, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "# HELP tollgate_upstream_calls Calls.\n\
# TYPE tollgate_upstream_calls counter\n\
tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"} 5\n\
tollgate_upstream_calls_created{upstream=\"crm\",outcome=\"2xx\"} 1700000000.0\n\
# TYPE tollgate_jobs_pending gauge\n\
tollgate_jobs_pending{upstream=\"a \\\"b\\\"\"} 3\n\
# TYPE tollgate_job_seconds histogram\n\
tollgate_job_seconds_sum{upstream=\"crm\"} 1.5\n\
tollgate_job_seconds_count{upstream=\"crm\"} 2\n\
tollgate_job_seconds_bucket{le=\"0.01\",upstream=\"crm\"} 0\n\
# EOF\n";

    #[test]
    fn a_scrape_reads_as_counters_gauges_and_histogram_sums_and_counts() {
        let samples = parse(SCRAPE);
        let shown: Vec<(String, f64, Kind)> =
            samples.iter().map(|s| (s.key(), s.value, s.kind)).collect();
        assert_eq!(
            shown,
            vec![
                (
                    "tollgate_upstream_calls_total{upstream=\"crm\",outcome=\"2xx\"}".into(),
                    5.0,
                    Kind::Counter
                ),
                (
                    "tollgate_jobs_pending{upstream=\"a \\\"b\\\"\"}".into(),
                    3.0,
                    Kind::Gauge
                ),
                (
                    "tollgate_job_seconds_sum{upstream=\"crm\"}".into(),
                    1.5,
                    Kind::Counter
                ),
                (
                    "tollgate_job_seconds_count{upstream=\"crm\"}".into(),
                    2.0,
                    Kind::Counter
                ),
            ]
        );
        assert_eq!(
            samples[1].labels,
            vec![("upstream".into(), "a \"b\"".into())]
        );
    }

    #[test]
    fn a_key_reads_back_as_its_name_and_labels() {
        for s in parse(SCRAPE) {
            assert_eq!(
                parse_key(&s.key()),
                Some((s.name.clone(), s.labels.clone()))
            );
        }
        assert_eq!(parse_key("up"), Some(("up".into(), vec![])));
        assert_eq!(parse_key("up{a=\"1"), None);
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_without_panicking(text in "\\PC{0,200}") {
            let _ = parse(&text);
            let _ = parse_key(&text);
        }

        #[test]
        fn any_labels_round_trip(name in "[a-z_]{1,12}", labels in proptest::collection::vec(("[a-z_]{1,8}", "\\PC{0,12}"), 0..4)) {
            let labels: Vec<(String, String)> = labels;
            let key = series_key(&name, &labels);
            proptest::prop_assert_eq!(parse_key(&key), Some((name, labels)));
        }
    }
}
