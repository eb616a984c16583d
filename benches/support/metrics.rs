//! One scrape of the daemon's `/metrics` (Prometheus text), as `series → value`. The series is
//! the whole name with its labels as printed (`name{label="v"}`), so a bench looks series up
//! by the text it would grep for.

use std::collections::{BTreeMap, HashMap};

#[derive(Default, Clone, Debug)]
pub struct Metrics(pub HashMap<String, f64>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        Metrics(
            text.lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.rsplit_once(' '))
                .filter_map(|(k, v)| Some((k.to_owned(), v.trim().parse().ok()?)))
                .collect(),
        )
    }

    /// The series' value; 0 when the scrape lacks it (a counter not yet incremented).
    pub fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    /// `series → self − before` for every series starting with `prefix` that changed
    /// (histogram buckets left out).
    pub fn delta(&self, before: &Metrics, prefix: &str) -> BTreeMap<String, f64> {
        self.0
            .iter()
            .filter(|(k, _)| k.starts_with(prefix) && !k.contains("_bucket"))
            .map(|(k, v)| (k.clone(), v - before.get(k)))
            .filter(|(_, d)| *d != 0.0)
            .collect()
    }

    /// The cumulative buckets of histogram `name` (unlabelled) as `(le, count)`, by `le`.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        let mut b: Vec<(f64, f64)> = self
            .0
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&prefix)?.strip_suffix("\"}")?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((le, *v))
            })
            .collect();
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
        b
    }
}
