//! Statistics over the runs of a workload and the JSON they are reported in: median and
//! range, throughput next to a raw limit, ratios of medians.

use serde_json::{Value as Json, json};

/// The median and range of one figure over the runs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stat {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

pub(crate) fn stat(values: &[f64]) -> Stat {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    }
}

/// `{"median", "min", "max"}` rounded to whole numbers.
pub(crate) fn stat_json(s: Stat) -> Json {
    json!({"median": s.median.round(), "min": s.min.round(), "max": s.max.round()})
}

/// `{"median", "min", "max"}` of `values` rounded to `1 / scale` (`scale` 1000: three
/// decimals).
pub(crate) fn stat_json_scaled(values: &[f64], scale: f64) -> Json {
    let s = stat(values);
    json!({"median": (s.median * scale).round() / scale, "min": (s.min * scale).round() / scale, "max": (s.max * scale).round() / scale})
}

/// The ratio of the medians of `a` and `b`, rounded to `1 / scale`.
pub(crate) fn median_ratio(a: &[f64], b: &[f64], scale: f64) -> f64 {
    (stat(a).median / stat(b).median * scale).round() / scale
}

/// Events/s of the bus over the runs and, where a raw limit was measured in the same runs,
/// the limit, the ratio of the medians and the per-run ratios.
pub(crate) fn throughput_json(bus: &[f64], limit: Option<&[f64]>) -> Json {
    let b = stat(bus);
    let mut out = json!({"events_per_sec": stat_json(b), "runs": bus.len()});
    if let Some(limit) = limit {
        let l = stat(limit);
        out["limit_events_per_sec"] = stat_json(l);
        out["ratio_to_limit"] = json!((b.median / l.median * 1000.0).round() / 1000.0);
        let ratios: Vec<f64> = bus.iter().zip(limit).map(|(b, l)| b / l).collect();
        out["ratio_per_run"] = stat_json_scaled(&ratios, 1000.0);
    }
    out
}
