//! The statistics the reports print. Percentiles are nearest-rank (the smallest sample with at
//! least `q` of the samples at or below it): every printed figure is a measured sample, never an
//! interpolation between two.

/// The nearest-rank quantile `q` (0 to 1) of `sorted`; `None` without samples.
pub fn nearest_rank<T: Copy>(sorted: &[T], q: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// [`nearest_rank`] of integer samples (nanoseconds, bytes); 0 without samples.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    nearest_rank(sorted, q).unwrap_or(0)
}

/// [`nearest_rank`] of real samples; NaN without samples, which the reports print as "—".
pub fn percentile_f64(sorted: &[f64], q: f64) -> f64 {
    nearest_rank(sorted, q).unwrap_or(f64::NAN)
}
