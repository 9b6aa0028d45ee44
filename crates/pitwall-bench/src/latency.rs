//! Latency histograms (HdrHistogram, microsecond resolution) and the percentiles reported.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies of one kind of request, recorded in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

/// Longest latency recorded exactly; longer ones are clamped to it. A request that takes a
/// minute on loopback is a failure in any of these benchmarks, and the bound keeps the
/// histogram small (3 significant digits over 1 µs..60 s is about 30 KiB).
const MAX_MICROS: u64 = 60_000_000;

impl Default for Latencies {
    fn default() -> Self {
        Latencies(
            Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("the bounds are constants and valid"),
        )
    }
}

impl Latencies {
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros.max(1));
    }

    pub fn add(&mut self, other: &Latencies) {
        // Same bounds on both sides, so adding cannot fail; saturate rather than panic anyway.
        if self.0.add(&other.0).is_err() {
            for value in other.0.iter_recorded() {
                self.0
                    .saturating_record_n(value.value_iterated_to(), value.count_at_value());
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn percentiles(&self) -> Percentiles {
        let ms = |micros: u64| micros as f64 / 1000.0;
        if self.0.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            p50: ms(self.0.value_at_quantile(0.50)),
            p90: ms(self.0.value_at_quantile(0.90)),
            p99: ms(self.0.value_at_quantile(0.99)),
            p999: ms(self.0.value_at_quantile(0.999)),
            max: ms(self.0.max()),
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_in_milliseconds() {
        let mut latencies = Latencies::default();
        for micros in 1..=1000 {
            latencies.record(Duration::from_micros(micros));
        }
        let p = latencies.percentiles();
        assert!((p.p50 - 0.5).abs() < 0.01, "{p:?}");
        assert!((p.max - 1.0).abs() < 0.01, "{p:?}");
    }

    #[test]
    fn adding_merges_counts() {
        let mut a = Latencies::default();
        let mut b = Latencies::default();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(2));
        a.add(&b);
        assert_eq!(a.count(), 2);
    }
}
