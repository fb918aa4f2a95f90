//! The Grafana dashboard (`deploy/grafana/fhir-bulk-proxy.json`) queries metrics the proxy
//! exports: a real proxy runs an export to completion and serves a passthrough request, and every
//! metric name (and every label an aggregation or matcher names) in every PromQL expression of
//! the dashboard must be in its `/metrics` scrape. Renaming a metric or a label without the
//! dashboard fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::jobs_cli::{Setup, start, status};
use testkit::eventually;
use testkit::get_with_token;
use testkit::metrics;

use testkit::process::Store;

const DASHBOARD: &str = include_str!("../../deploy/grafana/fhir-bulk-proxy.json");

/// Labels Prometheus adds when it scrapes (and `le`, which it reads from the histogram lines
/// under its own name): not in the proxy's output.
const TARGET_LABELS: [&str; 2] = ["job", "instance"];

/// PromQL words that are neither metrics nor functions.
const KEYWORDS: [&str; 11] = [
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "and",
    "or",
    "unless",
    "bool",
    "offset",
];

/// Aggregation operators: `sum by (x) (...)` names no metric `sum` though no `(` follows it.
const AGGREGATIONS: [&str; 14] = [
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// What a PromQL expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric names and label names in `expr`: selectors' names, `{label op "value"}` matchers,
/// `by|without|on|ignoring|group_left|group_right (labels)`; not function names (an identifier
/// before `(`), aggregation operators, keywords, string literals, `[ranges]`, numbers or `$variables`.
fn references(expr: &str) -> Refs {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    // Whether the next parenthesised list holds labels (after `by`, `on`...).
    let mut label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '[' {
            while i < chars.len() && chars[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c == '{' || (c == '(' && label_list) {
            // Label names up to the closing bracket, skipping quoted values.
            let close = if c == '{' { '}' } else { ')' };
            label_list = false;
            i += 1;
            while i < chars.len() && chars[i] != close {
                let d = chars[i];
                if d == '"' || d == '\'' || d == '`' {
                    i += 1;
                    while i < chars.len() && chars[i] != d {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                } else if is_ident_start(d) {
                    let start = i;
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                    refs.labels.insert(chars[start..i].iter().collect());
                } else {
                    i += 1;
                }
            }
            i += 1;
        } else if c == '$' {
            i += 1;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
        } else if c.is_ascii_digit() || c == '.' {
            // A number (0.99, 1e3, 5m...).
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(c) {
            let start = i;
            while i < chars.len() && is_ident(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let before_paren = chars.get(j) == Some(&'(');
            if KEYWORDS.contains(&word.as_str()) {
                label_list = before_paren
                    && matches!(
                        word.as_str(),
                        "by" | "without" | "on" | "ignoring" | "group_left" | "group_right"
                    );
            } else if !before_paren && !AGGREGATIONS.contains(&word.as_str()) {
                refs.metrics.insert(word);
            }
        } else {
            i += 1;
        }
    }
    refs
}

/// Every PromQL expression in the dashboard: panel targets (rows included) and query variables.
fn expressions(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for panel in list.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            panels(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for variable in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if variable["type"] == "query" {
            let query = variable["query"]["query"]
                .as_str()
                .or(variable["query"].as_str())
                .unwrap_or_default();
            // label_values(metric, label)
            let inner = query
                .strip_prefix("label_values(")
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or(query);
            let metric = inner.split(',').next().unwrap_or_default().trim();
            out.push((format!("variable {}", variable["name"]), metric.to_owned()));
        }
    }
    out
}

/// The scrape: every sample name with the label names seen on it, and every `# TYPE`.
struct Scrape {
    samples: BTreeMap<String, BTreeSet<String>>,
    types: BTreeMap<String, String>,
}

fn parse_scrape(text: &str) -> Scrape {
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut types = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let labels = samples.entry(line[..end].to_owned()).or_default();
        if line[end..].starts_with('{') {
            let refs = references(&line[end..line.find('}').unwrap_or(line.len()) + 1]);
            labels.extend(refs.labels);
        }
    }
    Scrape { samples, types }
}

impl Scrape {
    /// Whether `name` is exported; a histogram's `_bucket`, `_sum` and `_count` series need their
    /// family to be a histogram (or a summary, for `_sum` and `_count`).
    fn check(&self, name: &str) -> Result<(), String> {
        if !self.samples.contains_key(name) {
            return Err(format!("no series {name}"));
        }
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(family) = name.strip_suffix(suffix)
                && let Some(kind) = self.types.get(family)
            {
                let fits = kind == "histogram" || (kind == "summary" && suffix != "_bucket");
                return match fits {
                    true => Ok(()),
                    false => Err(format!("{name}: {family} is a {kind}")),
                };
            }
        }
        match self.types.contains_key(name) {
            true => Ok(()),
            false => Err(format!("{name} has no # TYPE")),
        }
    }
}

#[test]
fn the_promql_reader_finds_metrics_and_labels_only() {
    let refs = references(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(a_seconds_bucket{job=~"$job", status=~"5.."}[$__rate_interval]))) / on (route) group_left sum without (x) (b_total) * 60 > bool 0"#,
    );
    assert_eq!(
        refs.metrics,
        BTreeSet::from(["a_seconds_bucket".to_owned(), "b_total".to_owned()])
    );
    assert_eq!(
        refs.labels,
        ["le", "route", "job", "status", "x"]
            .map(String::from)
            .into()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_metrics_the_proxy_exports() {
    let dashboard: Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    assert_eq!(dashboard["uid"], "fhir-bulk-proxy");
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 15, "{exprs:?}");

    let setup = Setup::new(Store::Embedded).await;
    let proxy = setup.spawn();
    let token = setup.token(&proxy).await;
    let url = start(&proxy, &token, "/$export?_type=Patient,Observation").await;
    assert_eq!(status(&proxy, &token, &url).await, 200);
    let passthrough = get_with_token(format!("{}/Patient?_count=1", proxy.base()), &token).await;
    assert_eq!(passthrough.status(), 200);

    // The sweeper counts jobs by state every second.
    let text = eventually(
        "the sweeper to count the job",
        Duration::from_secs(10),
        || async {
            let text = metrics(proxy.addr).await;
            text.contains("bulk_proxy_jobs{state=\"completed\"} 1")
                .then_some(text)
        },
    )
    .await;
    let scrape = parse_scrape(&text);

    let mut problems = Vec::new();
    for (panel, expr) in &exprs {
        let refs = references(expr);
        if refs.metrics.is_empty() {
            problems.push(format!("{panel}: no metric in {expr}"));
        }
        let mut labels = BTreeSet::from(["le".to_owned()]);
        for metric in &refs.metrics {
            match scrape.check(metric) {
                Ok(()) => labels.extend(scrape.samples[metric].iter().cloned()),
                Err(e) => problems.push(format!("{panel}: {e}")),
            }
        }
        for label in &refs.labels {
            if !labels.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!("{panel}: no label {label} on {:?}", refs.metrics));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{}\n\nscrape:\n{text}",
        problems.join("\n")
    );
}
