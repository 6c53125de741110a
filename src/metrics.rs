//! Every metric imgedge exports, in one place, and its OpenMetrics text encoding for `/metrics`.
//!
//! Counters are bumped on the request path (atomic adds); gauges that describe state (cache size,
//! RSS) are set when `/metrics` is scraped, not kept current on every request.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    /// `image-proxy`, `supabase`, `health`, `metrics` or `other`.
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct CacheLabels {
    /// `memory`.
    pub tier: &'static str,
    /// `hit` or `miss`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    /// `ok` (a response head arrived), `timeout`, `refused` (guard) or `error`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RouteLabels {
    pub route: &'static str,
}

/// The buckets of `imgedge_request_duration_seconds`: 0.5 ms to 16 s, doubling.
fn request_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TierLabels {
    pub tier: &'static str,
}

/// The process's metrics. Shared behind an `Arc`; every field is internally atomic.
pub(crate) struct Metrics {
    registry: Registry,
    /// `imgedge_requests_total{route,status}`: responses sent, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// `imgedge_cache_requests_total{tier,result}`: cache lookups.
    pub cache_requests: Family<CacheLabels, Counter>,
    /// `imgedge_upstream_requests_total{outcome}`: fetches sent to origins.
    pub upstream_requests: Family<OutcomeLabels, Counter>,
    /// `imgedge_upstream_duration_seconds`: time from sending a fetch to its response head.
    pub upstream_duration: Histogram,
    /// `imgedge_collapsed_total`: requests that followed another request's fill.
    pub collapsed: Counter,
    /// `imgedge_response_bytes_total{source}`: body bytes sent to clients, by where they came
    /// from: `memory`, `disk`, `shared` (tier hits), `origin` (misses, streamed or shared),
    /// `transform` (renditions made for the request), `local` (imgedge's own answers).
    pub response_bytes: Family<SourceLabels, Counter>,
    /// `imgedge_request_duration_seconds{route}`: from a request's arrival to the end of its
    /// response body.
    pub request_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    /// `imgedge_cache_bytes{tier}`: weighted size of each tier, set at scrape.
    pub cache_bytes: Family<TierLabels, Gauge>,
    /// `imgedge_cache_entries{tier}`: entries in each tier, set at scrape.
    pub cache_entries: Family<TierLabels, Gauge>,
    /// `imgedge_memory_rss_bytes`: resident set size of the process, set at scrape.
    pub rss_bytes: Gauge,
    /// `imgedge_inflight_upstream`: upstream fetches in flight, set at scrape.
    pub inflight_upstream: Gauge,
    /// `imgedge_memory_budget_bytes`: the RSS budget, set at scrape.
    pub budget_bytes: Gauge,
    /// `imgedge_memory_pressure_level`: 0 normal … 5 emergency, set at scrape.
    pub pressure_level: Gauge,
    /// `imgedge_memory_pressure_transitions_total{to}`: level changes, by the level entered.
    pub pressure_transitions: Family<LevelLabels, Counter>,
    /// `imgedge_shed_total{reason}`: requests refused to protect the process (`memory`), because
    /// their client is over `[limits]` (`rate`), or because `[upstream] max_in_flight` requests
    /// or every upstream socket allowed were taken (`busy`).
    pub shed: Family<ReasonLabels, Counter>,
    /// `imgedge_disk_events{event}`: the disk tier's `writes`, `write_drops` (queue full) and
    /// `errors` (damaged entries, failed reads, foyer panics) since start, set at scrape.
    pub disk_events: Family<TierEventLabels, Gauge>,
    /// `imgedge_shared_events{event}`: the shared tier's `hits`, `misses` (absent, damaged, or
    /// skipped while its breaker is open), `errors` (failed or timed-out Redis calls), `writes`
    /// and `write_drops` since start, set at scrape; all 0 when it is off.
    pub shared_events: Family<TierEventLabels, Gauge>,
    /// `imgedge_shared_breaker_state`: the shared tier's breaker, 0 closed, 1 half-open (probing),
    /// 2 open (skipping Redis), -1 off; set at scrape.
    pub shared_breaker_state: Gauge,
    /// `imgedge_memory_relief_total{action}`: what memory pressure made the tiers and fills
    /// give up: `evicted_entries` and `evicted_bytes` (least-recently-used memory-tier entries,
    /// at evicting), `cleared` (memory tier cleared, at critical), `aborted_fills` (fills no
    /// client was reading, at emergency).
    pub relief: Family<ActionLabels, Counter>,
    /// `imgedge_connections_open`: client connections open, set at scrape.
    pub connections_open: Gauge,
    /// `imgedge_connections_refused_total`: connections closed on accept because
    /// `[server] max_connections` were open.
    pub connections_refused: Counter,
    /// `imgedge_upstream_max_in_flight`: Upstream requests allowed in flight at once (upstream.max_in_flight, or derived from the descriptor limit); set at scrape.
    pub upstream_max_in_flight: Gauge,
    /// `imgedge_upstream_sockets`: Upstream sockets open, busy or idle in the pools; set at scrape.
    pub upstream_sockets: Gauge,
    /// `imgedge_upstream_max_sockets`: Upstream sockets allowed open at once; set at scrape.
    pub upstream_max_sockets: Gauge,
    /// `imgedge_open_fds`: File descriptors the process has open; set at scrape.
    pub open_fds: Gauge,
    /// `imgedge_max_fds`: The process's file-descriptor limit (RLIMIT_NOFILE, raised to its hard limit at start); set at scrape.
    pub max_fds: Gauge,
    /// `imgedge_connections_max`: Client connections allowed open at once (server.max_connections, lowered to fit the descriptor limit); set at scrape.
    pub connections_max: Gauge,
    /// `imgedge_fill_reserved_bytes`: Bytes reserved in the in-flight fill pool (fills, transforms, shared-tier reads); set at scrape.
    pub fill_reserved_bytes: Gauge,
    /// `imgedge_fill_limit_bytes`: What may be reserved until the next memory sample (the headroom below the bypass line); set at scrape.
    pub fill_limit_bytes: Gauge,
    /// `imgedge_fill_capacity_bytes`: The fill pool's capacity (memory.inflight_fill_bytes); set at scrape.
    pub fill_capacity_bytes: Gauge,
    /// `imgedge_transform_queue`: Transforms waiting for a turn of the pool; set at scrape.
    pub transform_queue: Gauge,
    /// `imgedge_transforms_running`: Transforms holding a turn (reading their source or running); set at scrape.
    pub transforms_running: Gauge,
    /// `imgedge_transform_turns`: Transforms that may run at once (transform.max_concurrent); set at scrape.
    pub transform_turns: Gauge,
    /// `imgedge_transforms_total{outcome}`: render-route transforms run (`ok`, `failed`), and
    /// requests that shared another request's transform of the same variant (`collapsed`).
    pub transforms: Family<OutcomeLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct LevelLabels {
    pub to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct TierEventLabels {
    pub event: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            cache_requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            collapsed: Counter::default(),
            transforms: Family::default(),
            response_bytes: Family::default(),
            request_duration: Family::new_with_constructor(request_duration_histogram),
            cache_bytes: Family::default(),
            cache_entries: Family::default(),
            shared_events: Family::default(),
            shared_breaker_state: Gauge::default(),
            rss_bytes: Gauge::default(),
            budget_bytes: Gauge::default(),
            inflight_upstream: Gauge::default(),
            pressure_level: Gauge::default(),
            pressure_transitions: Family::default(),
            shed: Family::default(),
            disk_events: Family::default(),
            relief: Family::default(),
            connections_open: Gauge::default(),
            connections_refused: Counter::default(),
            upstream_max_in_flight: Gauge::default(),
            upstream_sockets: Gauge::default(),
            upstream_max_sockets: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            connections_max: Gauge::default(),
            fill_reserved_bytes: Gauge::default(),
            fill_limit_bytes: Gauge::default(),
            fill_capacity_bytes: Gauge::default(),
            transform_queue: Gauge::default(),
            transforms_running: Gauge::default(),
            transform_turns: Gauge::default(),
            registry: Registry::default(),
        };
        // The text encoder appends `_total` to counters.
        registry.register(
            "imgedge_requests",
            "Responses sent, by route and status",
            m.requests.clone(),
        );
        registry.register(
            "imgedge_cache_requests",
            "Cache lookups, by tier and result",
            m.cache_requests.clone(),
        );
        registry.register(
            "imgedge_upstream_requests",
            "Fetches sent to origins, by outcome",
            m.upstream_requests.clone(),
        );
        registry.register(
            "imgedge_upstream_duration_seconds",
            "Time from sending a fetch to receiving its response head",
            m.upstream_duration.clone(),
        );
        registry.register(
            "imgedge_collapsed",
            "Requests that followed another request's fill (collapsed forwarding)",
            m.collapsed.clone(),
        );
        registry.register(
            "imgedge_transforms",
            "Render-route transforms run (ok, failed), and requests that shared one (collapsed)",
            m.transforms.clone(),
        );
        registry.register(
            "imgedge_response_bytes",
            "Body bytes sent to clients, by where they came from",
            m.response_bytes.clone(),
        );
        registry.register(
            "imgedge_request_duration_seconds",
            "Time from a request's arrival to the end of its response body, by route",
            m.request_duration.clone(),
        );
        registry.register(
            "imgedge_cache_bytes",
            "Weighted bytes held by each cache tier",
            m.cache_bytes.clone(),
        );
        registry.register(
            "imgedge_cache_entries",
            "Entries held by each cache tier",
            m.cache_entries.clone(),
        );
        registry.register(
            "imgedge_memory_rss_bytes",
            "Resident set size of the process",
            m.rss_bytes.clone(),
        );
        registry.register(
            "imgedge_inflight_upstream",
            "Upstream fetches in flight",
            m.inflight_upstream.clone(),
        );
        registry.register(
            "imgedge_memory_budget_bytes",
            "The RSS budget memory pressure is measured against",
            m.budget_bytes.clone(),
        );
        registry.register(
            "imgedge_memory_pressure_level",
            "Memory pressure: 0 normal, 1 evicting, 2 warning, 3 bypass, 4 critical, 5 emergency",
            m.pressure_level.clone(),
        );
        registry.register(
            "imgedge_memory_pressure_transitions",
            "Memory pressure level changes, by the level entered",
            m.pressure_transitions.clone(),
        );
        registry.register(
            "imgedge_shed",
            "Requests refused to protect the process, by reason",
            m.shed.clone(),
        );
        registry.register(
            "imgedge_disk_events",
            "Disk tier writes, dropped writes and errors since start",
            m.disk_events.clone(),
        );
        registry.register(
            "imgedge_shared_events",
            "Shared tier hits, misses, errors, writes and dropped writes since start",
            m.shared_events.clone(),
        );
        registry.register(
            "imgedge_shared_breaker_state",
            "Shared tier circuit breaker: 0 closed, 1 half-open, 2 open, -1 off",
            m.shared_breaker_state.clone(),
        );
        registry.register(
            "imgedge_memory_relief",
            "What memory pressure made the tiers and fills give up, by action",
            m.relief.clone(),
        );
        registry.register(
            "imgedge_connections_open",
            "Client connections open",
            m.connections_open.clone(),
        );
        registry.register(
            "imgedge_connections_refused",
            "Connections closed on accept because server.max_connections were open",
            m.connections_refused.clone(),
        );
        registry.register(
            "imgedge_upstream_max_in_flight",
            "Upstream requests allowed in flight at once (upstream.max_in_flight, or derived from the descriptor limit)",
            m.upstream_max_in_flight.clone(),
        );
        registry.register(
            "imgedge_upstream_sockets",
            "Upstream sockets open, busy or idle in the pools",
            m.upstream_sockets.clone(),
        );
        registry.register(
            "imgedge_upstream_max_sockets",
            "Upstream sockets allowed open at once",
            m.upstream_max_sockets.clone(),
        );
        registry.register(
            "imgedge_open_fds",
            "File descriptors the process has open",
            m.open_fds.clone(),
        );
        registry.register(
            "imgedge_max_fds",
            "The process's file-descriptor limit (RLIMIT_NOFILE, raised to its hard limit at start)",
            m.max_fds.clone(),
        );
        registry.register(
            "imgedge_connections_max",
            "Client connections allowed open at once (server.max_connections, lowered to fit the descriptor limit)",
            m.connections_max.clone(),
        );
        registry.register(
            "imgedge_fill_reserved_bytes",
            "Bytes reserved in the in-flight fill pool (fills, transforms, shared-tier reads)",
            m.fill_reserved_bytes.clone(),
        );
        registry.register(
            "imgedge_fill_limit_bytes",
            "What may be reserved until the next memory sample (the headroom below the bypass line)",
            m.fill_limit_bytes.clone(),
        );
        registry.register(
            "imgedge_fill_capacity_bytes",
            "The fill pool's capacity (memory.inflight_fill_bytes)",
            m.fill_capacity_bytes.clone(),
        );
        registry.register(
            "imgedge_transform_queue",
            "Transforms waiting for a turn of the pool",
            m.transform_queue.clone(),
        );
        registry.register(
            "imgedge_transforms_running",
            "Transforms holding a turn (reading their source or running)",
            m.transforms_running.clone(),
        );
        registry.register(
            "imgedge_transform_turns",
            "Transforms that may run at once (transform.max_concurrent)",
            m.transform_turns.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// Adds `n` to `imgedge_memory_relief_total{action}`.
    pub(crate) fn relieved(&self, action: &'static str, n: u64) {
        self.relief
            .get_or_create(&ActionLabels { action })
            .inc_by(n);
    }

    /// Counts one response.
    pub(crate) fn request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .inc();
    }

    /// Counts one cache lookup.
    pub(crate) fn cache_lookup(&self, tier: &'static str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.cache_requests
            .get_or_create(&CacheLabels { tier, result })
            .inc();
    }

    /// Counts one fetch and, when a head arrived, how long it took.
    pub(crate) fn upstream(&self, outcome: &'static str, head_seconds: Option<f64>) {
        self.upstream_requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
        if let Some(s) = head_seconds {
            self.upstream_duration.observe(s);
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub(crate) fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
