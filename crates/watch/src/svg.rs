//! Charts as inline SVG, drawn on the server: lines, stacked bars, stacked
//! areas and horizontal bars. Every drawn value carries its figures in
//! data attributes (`data-series`, `data-total`, `data-bucket`,
//! `data-value`), so a test (or a curious reader of the page's source) can
//! check what a chart shows against the metrics it was drawn from.

use std::fmt::Write;

/// Colors for series, in order (readable on white, distinct for the
/// common kinds of color blindness).
const PALETTE: [&str; 8] = [
    "#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442", "#000000",
];

const W: f64 = 600.0;
const H: f64 = 200.0;
const LEFT: f64 = 44.0;
const BOTTOM: f64 = 18.0;
const TOP: f64 = 8.0;

/// One named series over the chart's buckets (one value per bucket).
#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub values: Vec<f64>,
}

impl Line {
    pub fn total(&self) -> f64 {
        self.values.iter().sum()
    }
}

/// How a chart draws its series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Lines,
    StackedBars,
    StackedArea,
}

impl Style {
    fn name(self) -> &'static str {
        match self {
            Style::Lines => "lines",
            Style::StackedBars => "stacked-bars",
            Style::StackedArea => "stacked-area",
        }
    }
}

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number as charts print it: whole numbers plain, others to 2 places,
/// large ones with k/M.
pub fn number(v: f64) -> String {
    // (an empty sum is -0)
    let v = v + 0.0;
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// A value as data attributes carry it: exact, and short for whole numbers.
fn datum(v: f64) -> String {
    let v = v + 0.0;
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

/// A time-series chart: `buckets` (Unix seconds, one per value of each
/// line), labelled by `label(bucket)` on the axis.
pub fn time_chart(
    id: &str,
    title: &str,
    style: Style,
    buckets: &[i64],
    lines: &[Line],
    label: &dyn Fn(i64) -> String,
) -> String {
    let n = buckets.len().max(1);
    let stacked = style != Style::Lines;
    let mut top = 0.0f64;
    for i in 0..n {
        let column = lines
            .iter()
            .map(|l| l.values.get(i).copied().unwrap_or(0.0));
        let m = if stacked {
            column.sum()
        } else {
            column.fold(0.0, f64::max)
        };
        top = top.max(m);
    }
    let top = if top > 0.0 { nice(top) } else { 1.0 };
    let plot_w = W - LEFT - 4.0;
    let plot_h = H - BOTTOM - TOP;
    let step = plot_w / n as f64;
    let x = |i: usize| LEFT + step * (i as f64 + 0.5);
    let y = |v: f64| TOP + plot_h * (1.0 - v / top);
    let mut svg = String::with_capacity(4096 + lines.len() * n * 24);
    let _ = write!(
        svg,
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption>\
<svg viewBox=\"0 0 {W} {H}\" role=\"img\" aria-label=\"{}\" data-chart=\"{id}\" data-style=\"{}\" data-buckets=\"{}\" data-from=\"{}\" data-to=\"{}\">",
        escape(title),
        escape(title),
        style.name(),
        buckets.len(),
        buckets.first().copied().unwrap_or(0),
        buckets.last().copied().unwrap_or(0),
    );
    // Grid and axis labels.
    for k in 0..=4 {
        let v = top * k as f64 / 4.0;
        let gy = y(v);
        let _ = write!(
            svg,
            "<line class=\"grid\" x1=\"{LEFT}\" x2=\"{}\" y1=\"{gy:.1}\" y2=\"{gy:.1}\"/><text class=\"axis\" x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - 4.0,
            LEFT - 4.0,
            gy + 3.0,
            number(v)
        );
    }
    if let (Some(first), Some(last)) = (buckets.first(), buckets.last()) {
        let _ = write!(
            svg,
            "<text class=\"axis\" x=\"{LEFT}\" y=\"{}\">{}</text><text class=\"axis\" x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>",
            H - 4.0,
            escape(&label(*first)),
            W - 4.0,
            H - 4.0,
            escape(&label(*last))
        );
    }
    let mut base = vec![0.0f64; n];
    for (s, line) in lines.iter().enumerate() {
        let color = PALETTE[s % PALETTE.len()];
        let _ = write!(
            svg,
            "<g class=\"series\" data-series=\"{}\" data-total=\"{}\" fill=\"{color}\" stroke=\"{color}\">",
            escape(&line.name),
            datum(line.total())
        );
        match style {
            Style::Lines => {
                svg.push_str("<polyline fill=\"none\" stroke-width=\"1.5\" points=\"");
                for (i, v) in line.values.iter().enumerate() {
                    let _ = write!(svg, "{:.1},{:.1} ", x(i), y(*v));
                }
                data_values(&mut svg, buckets, &line.values);
            }
            Style::StackedBars => {
                for (i, v) in line.values.iter().enumerate() {
                    if *v <= 0.0 {
                        continue;
                    }
                    let y1 = y(base[i] + v);
                    let h = y(base[i]) - y1;
                    let _ = write!(
                        svg,
                        "<rect x=\"{:.1}\" y=\"{y1:.1}\" width=\"{:.1}\" height=\"{h:.1}\" data-bucket=\"{}\" data-value=\"{}\"><title>{} {}: {}</title></rect>",
                        x(i) - step * 0.4,
                        (step * 0.8).max(0.5),
                        buckets.get(i).copied().unwrap_or(0),
                        datum(*v),
                        escape(&line.name),
                        escape(&label(buckets.get(i).copied().unwrap_or(0))),
                        number(*v)
                    );
                    base[i] += v;
                }
            }
            Style::StackedArea => {
                svg.push_str("<polygon fill-opacity=\"0.5\" points=\"");
                for (i, v) in line.values.iter().enumerate() {
                    let _ = write!(svg, "{:.1},{:.1} ", x(i), y(base[i] + v));
                }
                for i in (0..line.values.len()).rev() {
                    let _ = write!(svg, "{:.1},{:.1} ", x(i), y(base[i]));
                }
                data_values(&mut svg, buckets, &line.values);
                for (b, v) in base.iter_mut().zip(&line.values) {
                    *b += v;
                }
            }
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");
    svg.push_str(&legend(lines));
    svg.push_str("</figure>");
    svg
}

/// Close a shape's points with its values, `bucket:value` each.
fn data_values(svg: &mut String, buckets: &[i64], values: &[f64]) {
    svg.push_str("\" data-values=\"");
    for (i, v) in values.iter().enumerate() {
        let _ = write!(
            svg,
            "{}:{} ",
            buckets.get(i).copied().unwrap_or(0),
            datum(*v)
        );
    }
    svg.push_str("\"/>");
}

fn legend(lines: &[Line]) -> String {
    if lines.is_empty() {
        return "<p class=\"empty\">nothing recorded in this period</p>".into();
    }
    let mut out = String::from("<ul class=\"legend\">");
    for (s, line) in lines.iter().enumerate() {
        let _ = write!(
            out,
            "<li><span class=\"swatch\" style=\"background:{}\"></span>{} <b>{}</b></li>",
            PALETTE[s % PALETTE.len()],
            escape(&line.name),
            number(line.total())
        );
    }
    out.push_str("</ul>");
    out
}

/// One bar of a horizontal bar chart: `used` of `of`.
#[derive(Debug, Clone)]
pub struct Bar {
    pub name: String,
    pub used: f64,
    pub of: f64,
}

/// Horizontal bars of how much of each quota is used, each with its
/// percentage; past 70 % amber, past 90 % red.
pub fn quota_bars(id: &str, title: &str, bars: &[Bar]) -> String {
    let row = 34.0;
    let h = (bars.len().max(1) as f64) * row + 4.0;
    let mut svg = format!(
        "<figure class=\"chart\" id=\"{id}\"><figcaption>{}</figcaption><svg viewBox=\"0 0 {W} {h}\" role=\"img\" aria-label=\"{}\" data-chart=\"{id}\" data-style=\"bars\">",
        escape(title),
        escape(title)
    );
    let label_w = 0.0;
    let bar_w = W - 70.0;
    for (i, bar) in bars.iter().enumerate() {
        let share = if bar.of > 0.0 {
            (bar.used / bar.of).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let color = if share > 0.9 {
            "#d55e00"
        } else if share > 0.7 {
            "#e69f00"
        } else {
            "#009e73"
        };
        let top = 2.0 + i as f64 * row;
        let _ = write!(
            svg,
            "<g class=\"bar\" data-series=\"{}\" data-used=\"{}\" data-of=\"{}\"><text class=\"label\" x=\"0\" y=\"{:.1}\">{} · {} of {}</text>\
<rect class=\"track\" x=\"{label_w}\" y=\"{:.1}\" width=\"{bar_w:.1}\" height=\"12\"/>\
<rect x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"12\" fill=\"{color}\"/>\
<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\">{:.0}%</text></g>",
            escape(&bar.name),
            datum(bar.used),
            datum(bar.of),
            top + 12.0,
            escape(&truncate(&bar.name, 60)),
            number(bar.used),
            number(bar.of),
            top + 17.0,
            top + 17.0,
            bar_w * share,
            label_w + bar_w + 6.0,
            top + 28.0,
            share * 100.0
        );
    }
    svg.push_str("</svg>");
    if bars.is_empty() {
        svg.push_str("<p class=\"empty\">no quota known yet</p>");
    }
    svg.push_str("</figure>");
    svg
}

fn truncate(text: &str, chars: usize) -> String {
    if text.chars().count() <= chars {
        return text.to_string();
    }
    let mut out: String = text.chars().take(chars - 1).collect();
    out.push('…');
    out
}

/// The smallest of 1, 2, 2.5, 5 times a power of ten at or above `v`.
fn nice(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_drawn_is_in_the_data_attributes() {
        let lines = vec![
            Line {
                name: "crm <429>".into(),
                values: vec![1.0, 0.0, 2.5],
            },
            Line {
                name: "erp".into(),
                values: vec![3.0, 4.0, 0.0],
            },
        ];
        let svg = time_chart(
            "c",
            "Calls",
            Style::StackedBars,
            &[60, 120, 180],
            &lines,
            &|b| b.to_string(),
        );
        assert!(svg.contains("data-series=\"crm &lt;429&gt;\" data-total=\"3.5\""));
        assert!(svg.contains("data-bucket=\"180\" data-value=\"2.5\""));
        assert_eq!(svg.matches("<rect").count(), 4, "zero values draw no bar");
        let svg = time_chart("c", "Calls", Style::Lines, &[60, 120, 180], &lines, &|b| {
            b.to_string()
        });
        assert!(svg.contains("data-values=\"60:3 120:4 180:0 \""));
    }

    #[test]
    fn the_scale_is_a_round_number_at_or_above_the_top() {
        assert_eq!(nice(7.0), 10.0);
        assert_eq!(nice(0.3), 0.5);
        assert_eq!(nice(2100.0), 2500.0);
        assert_eq!(nice(1000.0), 1000.0);
    }
}
