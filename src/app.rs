//! Building the process, in one place: configuration → memory budget → pressure monitor →
//! tiers → fill reservations and collapser → relief → upstream clients → proxy → router. And
//! ending it: every task started here (monitor, relief, tier writers, fills, refreshes,
//! connections) belongs to the app's [`Tasks`] and is gone when [`App::shutdown`] returns.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use crate::cache::disk::DiskBackend;
use crate::cache::shared::SharedBackend;
use crate::cache::{MemoryTier, Tier, TieredCache};
use crate::collapse::Collapser;
use crate::config::{Config, MemoryBudgetError};
use crate::connections::Connections;
use crate::descriptors::{self, DescriptorBudget};
use crate::http::access_log::RequestIds;
use crate::http::rate::{self, RateLimits};
use crate::http::{Admin, Admission, Router, Routes, TargetedIn};
use crate::metrics::Metrics;
use crate::pressure::{Monitor, ReservationPool, detect_budget_bytes};
use crate::proxy::content::ContentPolicy;
use crate::proxy::{Proxy, ProxyParts};
use crate::relief::{self, Relief};
use crate::render::Render;
use crate::rss::RssSource;
use crate::signing::Signer;
use crate::tasks::Tasks;
use crate::upstream::{self, Upstream};

/// Why the process could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot detect the memory budget: set [memory] budget_bytes")]
    NoBudget,
    #[error(transparent)]
    MemoryBudget(#[from] MemoryBudgetError),
    #[error("cannot read this process's RSS")]
    NoRss,
    #[error(transparent)]
    Upstream(#[from] upstream::SetupError),
}

/// A running imgedge, before and after its listener: the router and what it owns.
pub(crate) struct App {
    router: Arc<Router>,
    /// The tiers, closed at shutdown (once their writers have stopped).
    tier: TieredCache,
    tasks: Tasks,
}

impl App {
    /// Builds everything for `config`, reading RSS from `rss`, and starts the background tasks.
    ///
    /// # Errors
    /// [`SetupError`]: the memory budget cannot be detected or leaves the memory tier too little
    /// room, or the upstream clients cannot be built. Nothing is left running then. A disk tier
    /// that cannot be opened is logged and left out, never an error; so is a shared tier whose
    /// Redis cannot be reached (it is retried).
    pub(crate) async fn build(config: Config, rss: Arc<dyn RssSource>) -> Result<App, SetupError> {
        let tasks = Tasks::new();
        match Self::build_on(config, rss, &tasks).await {
            Ok((router, tier)) => Ok(App {
                router,
                tier,
                tasks,
            }),
            Err(e) => {
                tasks.shutdown().await;
                Err(e)
            }
        }
    }

    async fn build_on(
        config: Config,
        rss: Arc<dyn RssSource>,
        tasks: &Tasks,
    ) -> Result<(Arc<Router>, TieredCache), SetupError> {
        let metrics = Arc::new(Metrics::default());
        let budget_bytes = match config.memory.budget_bytes {
            0 => detect_budget_bytes().ok_or(SetupError::NoBudget)?,
            b => b,
        };
        config.check_memory_budget(budget_bytes)?;
        let (monitor, pressure) = Monitor::new(
            rss,
            budget_bytes,
            config.memory.thresholds,
            config.memory.sample_interval,
        );
        tasks.spawn(monitor.run());
        tracing::info!(budget_bytes, "memory budget");

        // Before the tiers: the shared tier's reads reserve their buffers here.
        let fills = ReservationPool::new(match config.memory.inflight_fill_bytes {
            0 => budget_bytes / 4,
            n => n,
        });
        let mut lower = Vec::new();
        if let Some(dir) = &config.cache.disk_dir {
            // A disk that cannot be opened costs the disk tier, never the service.
            match DiskBackend::open(dir, config.cache.disk_capacity_bytes).await {
                Ok(disk) => {
                    tracing::info!(dir = %dir.display(), capacity_bytes = config.cache.disk_capacity_bytes, "disk tier open");
                    lower.push(Tier::new("disk", disk, tasks));
                }
                Err(e) => {
                    tracing::error!(error = %e, "disk tier unavailable: serving from memory and upstream")
                }
            }
        }
        if config.cache.shared.is_on() {
            // Redis is connected to in the background: an absent one never holds up startup.
            match SharedBackend::open(
                &config.cache.shared,
                config.cache.stale_retention,
                fills.clone(),
                tasks,
            ) {
                Ok(shared) => {
                    tracing::info!(
                        nodes = config.cache.shared.urls.len(),
                        max_object_bytes = config.cache.shared.max_object_bytes,
                        "shared tier on"
                    );
                    lower.push(Tier::new("shared", shared, tasks));
                }
                Err(e) => {
                    tracing::error!(error = %e, "shared tier unavailable: serving without it")
                }
            }
        }
        let tier = TieredCache::new(
            MemoryTier::new(
                config.cache.memory_capacity_bytes,
                config.cache.stale_retention,
            ),
            lower,
        );
        let collapser = Arc::new(Collapser::new(tasks.clone()));
        tasks.spawn(relief::run(
            pressure.clone(),
            Relief {
                tier: tier.clone(),
                fills: fills.clone(),
                collapser: collapser.clone(),
                metrics: metrics.clone(),
                evict_to: config.memory.evict_to,
                fill_line: config.memory.thresholds.bypass,
            },
        ));
        let fd_limit = descriptors::raise_fd_limit();
        let budget = DescriptorBudget::new(
            fd_limit,
            config.server.max_connections,
            config.upstream.max_in_flight,
        );
        if budget.max_connections < config.server.max_connections {
            tracing::warn!(
                fd_limit,
                configured = config.server.max_connections,
                max_connections = budget.max_connections,
                "server.max_connections lowered: the descriptor limit leaves no room for more"
            );
        }
        tracing::info!(
            fd_limit,
            max_connections = budget.max_connections,
            max_in_flight = budget.max_in_flight,
            max_upstream_sockets = budget.max_upstream_sockets,
            "descriptor budget"
        );
        let upstream = Arc::new(Upstream::new(&config.upstream, &budget, tasks)?);
        let rate =
            RateLimits::new(config.limits.per_ip_per_second, config.limits.burst).map(Arc::new);
        if let Some(rate) = &rate {
            tasks.spawn(rate::retain_loop(rate.clone()));
        }
        let proxy = Arc::new(Proxy::new(ProxyParts {
            tier: tier.clone(),
            collapser,
            fills: fills.clone(),
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            cache: config.cache.clone(),
            pressure: pressure.clone(),
            tasks: tasks.clone(),
            content: ContentPolicy::new(&config.upstream),
        }));
        let render = Render::new(
            config.transform.clone(),
            fills.clone(),
            pressure.clone(),
            metrics.clone(),
        );
        let router = Router {
            routes: Routes::new(&config),
            admission: Admission {
                pressure: pressure.clone(),
                metrics: metrics.clone(),
                trusted_proxies: config.server.trusted_proxies.clone(),
                signer: Signer::new(config.signing.keys.clone()),
                rate: rate.clone(),
            },
            admin: Admin {
                tier: tier.clone(),
                fills,
                upstream,
                pressure,
                metrics: metrics.clone(),
                token: config.admin.token.clone(),
                draining: AtomicBool::new(false),
                started: Instant::now(),
                connections: Connections::new(budget.max_connections),
                descriptors: budget,
                transforms: render.pool.clone(),
            },
            render,
            proxy,
            metrics,
            request_ids: RequestIds::new(),
            access_log: config.log.access,
            targeted: TargetedIn {
                own_field: config.cache.targeted_field,
                forward_cdn_cache_control: config.cache.forward_cdn_cache_control,
            },
        };
        Ok((Arc::new(router), tier))
    }

    /// What answers requests.
    pub(crate) fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Where connection tasks are spawned, so that they end with the app.
    pub(crate) fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// Ends the app: first the writes queued for the lower tiers are written, until
    /// `flush_deadline` at most (what was stored before the signal is found after a restart);
    /// then every task is stopped (cancelling what still runs: fills no client reads,
    /// refreshes, connections past the grace period) and the tiers are closed (foyer writes out
    /// its buffers).
    pub(crate) async fn shutdown(self, flush_deadline: tokio::time::Instant) {
        self.tier.flush(flush_deadline).await;
        self.tasks.shutdown().await;
        self.tier.close().await;
    }
}
