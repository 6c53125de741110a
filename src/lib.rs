//! imgedge: a streaming image proxy and CDN-style edge cache.
//!
//! `GET /image-proxy?url=...` and `GET /storage/v1/object/public/...` (a reverse proxy in front of
//! Supabase Storage) are answered from a memory tier of recent, small, fresh responses, a disk
//! tier behind it, or streamed from the origin chunk by chunk while small storable bodies are
//! teed into the tiers.
//!
//! Modules, in reading order:
//! - [`config`]: defaults + file + environment → a validated [`Config`].
//! - [`app`]: builds the process (tiers, monitor, relief, upstream, proxy, router) and ends it.
//! - [`http`]: the router: routes, admission, `/health`, `/metrics`, purge, errors as JSON, the
//!   access log.
//! - [`proxy`]: one request: cache key → tiers → revalidation or upstream → streamed response.
//! - [`collapse`]: collapsed forwarding: one fetch per key, shared while it fills.
//! - [`tee`]: the body of an unshared miss, teed into the tiers once complete.
//! - [`cache`]: cache key, stored object, the memory tier, the storage seam and the disk tier.
//! - [`freshness`]: RFC 9111 storability, freshness and age.
//! - [`upstream`]: hyper-util connection pools, the SSRF guard at connect time, timeouts, body
//!   limits.
//! - [`target`]: the `url=` parameter, `allowed_hosts`, non-global addresses.
//! - [`pressure`]: RSS against the memory budget → a pressure level on a watch channel.
//! - [`relief`]: what the tiers and fills give up at each level (evict, clear, abort).
//! - [`signing`]: signed `/image-proxy` URLs (HMAC-SHA256).
//! - [`server`]: accepting connections, their limits and timeouts, draining.
//! - [`tasks`]: the one owner of every task imgedge spawns.
//! - [`error`], [`body`], [`metrics`], [`rss`]: the error→status mapping, the response body, the
//!   metrics registry, the process RSS.

pub mod app;
pub mod body;
pub mod cache;
pub mod collapse;
pub mod config;
pub mod connections;
pub mod descriptors;
pub mod error;
pub mod freshness;
pub mod http;
pub mod metrics;
pub mod pressure;
pub mod proxy;
pub mod relief;
pub mod render;
pub mod rss;
pub mod server;
pub mod signing;
pub mod target;
pub mod tasks;
pub mod tee;
pub mod transform;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use app::App;
pub use config::Config;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start: {0}")]
    Setup(#[from] app::SetupError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until `shutdown` completes. Then it
/// drains: `/health/ready` answers 503 while it keeps serving for `[server] drain_delay`; then it
/// stops accepting and gives open connections `[server] shutdown_grace` to finish; what is left of
/// it goes to writing out the disk writes still queued. When it returns, every task it started
/// has ended.
///
/// # Errors
/// [`ServeError::Setup`] when the process cannot be set up (see [`app::SetupError`]); accept
/// errors are logged and retried, never returned.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let rss = rss::ProcessRss::new().ok_or(app::SetupError::NoRss)?;
    serve_with_rss(listener, config, Arc::new(rss), shutdown).await
}

/// [`serve`] with the RSS reading taken from `rss` (tests drive memory pressure with it).
///
/// # Errors
/// As [`serve`].
pub async fn serve_with_rss(
    listener: TcpListener,
    config: Config,
    rss: Arc<dyn rss::RssSource>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let server = config.server.clone();
    let app = App::build(config, rss).await?;
    let served = server::run(listener, app.router(), app.tasks(), &server, shutdown).await;
    // The grace period covers the connections and the disk writes they left queued; after an
    // error, writes get the whole period.
    let deadline = match served {
        Ok(deadline) => deadline,
        Err(_) => tokio::time::Instant::now() + server.shutdown_grace,
    };
    app.shutdown(deadline).await;
    served.map(drop).map_err(Into::into)
}
