//! Prometheus metrics of one server instance, served as text format 0.0.4 on `/metrics`.
//!
//! `stream_api_sessions_total` keeps the reference's name (dashboards use it) although a gauge
//! ending in `_total` breaks OpenMetrics naming; this exporter writes names unchanged.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets from 50 µs to 5 s: a durable commit is a few fsyncs, a read microseconds.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Sessions known per data source, completed included (the reference's gauge).
    pub sessions_total: IntGaugeVec,
    /// Sessions per data source and state (`live`, `completed`).
    pub sessions: IntGaugeVec,
    pub rpc_requests: IntCounterVec,
    pub rpc_duration: HistogramVec,
    pub commit_duration: Histogram,
    pub commit_batch_size: Histogram,
    pub write_queue_depth: IntGauge,
    pub notification_streams: IntGaugeVec,
    pub notifications_sent: IntCounterVec,
    pub subscribers_cut_off: IntCounterVec,
    pub feed_events: IntCounter,
    pub feed_watchers: IntGauge,
    pub feed_watchers_cut_off: IntCounter,
    pub feed_first_kept: IntGauge,
    pub feed_head: IntGauge,
    pub sessions_auto_ended: IntCounterVec,
    pub sessions_purged: IntCounter,
    pub packet_commit_duration: Histogram,
    pub packets_removed: IntCounter,
    /// Open read connections per data source (the reference's gauge).
    pub connections: IntGaugeVec,
    pub data_packets_published: IntCounterVec,
    pub data_packets_routed: IntCounterVec,
    pub data_packets_routed_bytes: IntCounterVec,
    pub info_packets_published: IntCounterVec,
    pub packets_delivered: IntCounterVec,
    pub data_formats: IntGaugeVec,
    /// The (data source, stream) label pairs in use, so that their number stays bounded.
    stream_series: Arc<Mutex<HashSet<(String, String)>>>,
}

/// (data source, stream) label pairs the packet counters keep apart; beyond it, new pairs are
/// counted under `"(other)"`, so that a client writing to ever new streams cannot grow the
/// exposition without bound.
const MAX_STREAM_SERIES: usize = 1000;
/// The label of the pairs beyond [`MAX_STREAM_SERIES`].
const OTHER: &str = "(other)";

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let sessions_total = IntGaugeVec::new(
            Opts::new("stream_api_sessions_total", "Number of session available"),
            &["data_source"],
        )
        .expect("valid metric");
        let sessions = IntGaugeVec::new(
            Opts::new(
                "pitwall_sessions",
                "Sessions by data source and state (live, completed)",
            ),
            &["data_source", "state"],
        )
        .expect("valid metric");
        let rpc_requests = IntCounterVec::new(
            Opts::new(
                "pitwall_rpc_requests_total",
                "gRPC requests by method and outcome (success, a refusal class, or an error status)",
            ),
            &["method", "outcome"],
        )
        .expect("valid metric");
        let rpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "pitwall_rpc_duration_seconds",
                "gRPC request handling time by method and outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method", "outcome"],
        )
        .expect("valid metric");
        let commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pitwall_store_commit_duration_seconds",
                "Time to make one batch of writes durable",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let commit_batch_size = Histogram::with_opts(
            HistogramOpts::new(
                "pitwall_store_commit_batch_size",
                "Write requests answered by one durable commit",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let write_queue_depth = IntGauge::new(
            "pitwall_write_queue_depth",
            "Write requests waiting for the writer",
        )
        .expect("valid metric");
        let notification_streams = IntGaugeVec::new(
            Opts::new(
                "pitwall_notification_streams",
                "Open notification streams by kind (start, stop)",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let notifications_sent = IntCounterVec::new(
            Opts::new(
                "pitwall_notifications_sent_total",
                "Notifications queued to subscribers, by kind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let subscribers_cut_off = IntCounterVec::new(
            Opts::new(
                "pitwall_notification_subscribers_cut_off_total",
                "Notification streams ended because the subscriber fell too far behind",
            ),
            &["kind"],
        )
        .expect("valid metric");
        let feed_events = IntCounter::new(
            "pitwall_feed_events_total",
            "Session events published to the feed",
        )
        .expect("valid metric");
        let feed_watchers =
            IntGauge::new("pitwall_feed_watchers", "Open SessionFeed.Watch streams")
                .expect("valid metric");
        let feed_watchers_cut_off = IntCounter::new(
            "pitwall_feed_watchers_cut_off_total",
            "Watch streams ended because the watcher fell too far behind (it resumes from history)",
        )
        .expect("valid metric");
        let feed_first_kept = IntGauge::new(
            "pitwall_feed_first_sequence",
            "Oldest feed sequence still kept: watchers can resume from one before it",
        )
        .expect("valid metric");
        let feed_head = IntGauge::new("pitwall_feed_sequence", "Newest feed sequence published")
            .expect("valid metric");
        let sessions_auto_ended = IntCounterVec::new(
            Opts::new(
                "pitwall_sessions_auto_ended_total",
                "Sessions ended by auto-end, by reason (idle, max_duration)",
            ),
            &["reason"],
        )
        .expect("valid metric");
        let sessions_purged = IntCounter::new(
            "pitwall_sessions_purged_total",
            "Completed sessions removed by retention",
        )
        .expect("valid metric");
        let packet_commit_duration = Histogram::with_opts(
            HistogramOpts::new(
                "pitwall_packet_commit_duration_seconds",
                "Time to make one batch of packet writes durable (embedded store)",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let connections = IntGaugeVec::new(
            Opts::new(
                "stream_api_connections_total",
                "Read connections open, per data source",
            ),
            &["data_source"],
        )
        .expect("valid metric");
        let data_packets_published = IntCounterVec::new(
            Opts::new(
                "stream_api_data_packets_published_total",
                "Data packets received by PacketWriterService",
            ),
            &["data_source", "stream"],
        )
        .expect("valid metric");
        let data_packets_routed = IntCounterVec::new(
            Opts::new(
                "stream_api_data_packets_routed_total",
                "Data packets made durable in the packet log",
            ),
            &["data_source", "stream"],
        )
        .expect("valid metric");
        let data_packets_routed_bytes = IntCounterVec::new(
            Opts::new(
                "stream_api_data_packets_routed_bytes_total",
                "Bytes of data packets made durable in the packet log",
            ),
            &["data_source", "stream"],
        )
        .expect("valid metric");
        let info_packets_published = IntCounterVec::new(
            Opts::new(
                "stream_api_info_packets_published_total",
                "Info packets received by PacketWriterService",
            ),
            &["data_source"],
        )
        .expect("valid metric");
        let packets_delivered = IntCounterVec::new(
            Opts::new(
                "stream_api_router_messages_delivered_total",
                "Packets sent to readers (ReadPackets, ReadEssentials, ReadDataPackets)",
            ),
            &["data_source"],
        )
        .expect("valid metric");
        let data_formats = IntGaugeVec::new(
            Opts::new(
                "stream_api_data_formats_total",
                "Data formats known, per data source",
            ),
            &["data_source"],
        )
        .expect("valid metric");
        let packets_removed = IntCounter::new(
            "pitwall_packets_removed_total",
            "Packets removed by packet retention (bytes or age)",
        )
        .expect("valid metric");
        for collector in [
            Box::new(sessions_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(packet_commit_duration.clone()),
            Box::new(packets_removed.clone()),
            Box::new(connections.clone()),
            Box::new(data_packets_published.clone()),
            Box::new(data_packets_routed.clone()),
            Box::new(data_packets_routed_bytes.clone()),
            Box::new(info_packets_published.clone()),
            Box::new(packets_delivered.clone()),
            Box::new(data_formats.clone()),
            Box::new(sessions.clone()),
            Box::new(rpc_requests.clone()),
            Box::new(rpc_duration.clone()),
            Box::new(commit_duration.clone()),
            Box::new(commit_batch_size.clone()),
            Box::new(write_queue_depth.clone()),
            Box::new(notification_streams.clone()),
            Box::new(notifications_sent.clone()),
            Box::new(subscribers_cut_off.clone()),
            Box::new(feed_events.clone()),
            Box::new(feed_watchers.clone()),
            Box::new(feed_watchers_cut_off.clone()),
            Box::new(feed_first_kept.clone()),
            Box::new(feed_head.clone()),
            Box::new(sessions_auto_ended.clone()),
            Box::new(sessions_purged.clone()),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Metrics {
            registry,
            sessions_total,
            sessions,
            rpc_requests,
            rpc_duration,
            commit_duration,
            commit_batch_size,
            write_queue_depth,
            notification_streams,
            notifications_sent,
            subscribers_cut_off,
            feed_events,
            feed_watchers,
            feed_watchers_cut_off,
            feed_first_kept,
            feed_head,
            sessions_auto_ended,
            sessions_purged,
            packet_commit_duration,
            packets_removed,
            connections,
            data_packets_published,
            data_packets_routed,
            data_packets_routed_bytes,
            info_packets_published,
            packets_delivered,
            data_formats,
            stream_series: Arc::default(),
        }
    }

    pub fn observe_rpc(&self, method: &str, outcome: &str, elapsed: Duration) {
        self.rpc_requests
            .with_label_values(&[method, outcome])
            .inc();
        self.rpc_duration
            .with_label_values(&[method, outcome])
            .observe(elapsed.as_secs_f64());
    }

    /// The labels to count a packet of `data_source` and `stream` under: themselves, or
    /// `"(other)"` once [`MAX_STREAM_SERIES`] pairs are in use.
    pub fn stream_labels<'a>(&self, data_source: &'a str, stream: &'a str) -> [&'a str; 2] {
        let mut series = self.stream_series.lock().unwrap_or_else(|e| e.into_inner());
        let pair = (data_source.to_owned(), stream.to_owned());
        if series.contains(&pair) {
            return [data_source, stream];
        }
        if series.len() < MAX_STREAM_SERIES {
            series.insert(pair);
            return [data_source, stream];
        }
        [OTHER, OTHER]
    }

    /// Registers a gauge that only one kind of log has.
    pub fn register_gauge(&self, name: &str, help: &str) -> Result<IntGauge, prometheus::Error> {
        let gauge = IntGauge::new(name, help)?;
        self.registry.register(Box::new(gauge.clone()))?;
        Ok(gauge)
    }

    /// Sets the per-data-source session gauges.
    /// A data source without sessions (all purged) leaves the exposition.
    pub fn set_session_counts(&self, data_source: &str, total: usize, completed: usize) {
        if total == 0 {
            let _ = self.sessions_total.remove_label_values(&[data_source]);
            let _ = self.sessions.remove_label_values(&[data_source, "live"]);
            let _ = self
                .sessions
                .remove_label_values(&[data_source, "completed"]);
            return;
        }
        self.sessions_total
            .with_label_values(&[data_source])
            .set(total as i64);
        self.sessions
            .with_label_values(&[data_source, "live"])
            .set((total - completed) as i64);
        self.sessions
            .with_label_values(&[data_source, "completed"])
            .set(completed as i64);
    }

    /// The exposition in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
