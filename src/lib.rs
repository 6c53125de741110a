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
//! - [`tasks`]: the one owner of every task imgedge spawns.
//! - [`error`], [`body`], [`metrics`], [`rss`]: the error→status mapping, the response body, the
//!   metrics registry, the process RSS.

pub mod app;
pub mod body;
pub mod cache;
pub mod collapse;
pub mod config;
pub mod error;
pub mod freshness;
pub mod http;
pub mod metrics;
pub mod pressure;
pub mod proxy;
pub mod relief;
pub mod rss;
pub mod signing;
pub mod target;
pub mod tasks;
pub mod tee;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;

pub use app::App;
pub use config::Config;

/// How long a client may take to send a request head (HTTP/1.1).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-connection bound on response bytes queued in user space for a client that reads slower
/// than the origin sends: HTTP/1.1's write buffer and HTTP/2's per-stream send buffer. hyper's
/// defaults (about 400 KiB each) multiplied by thousands of slow clients would be the memory
/// growth this proxy exists to prevent; the kernel's socket buffers keep the pipe full.
const CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024;

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
/// stops accepting and gives open connections `[server] shutdown_grace` to finish. When it
/// returns, every task it started has ended.
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
    let (drain_delay, shutdown_grace) = (config.server.drain_delay, config.server.shutdown_grace);
    let app = App::build(config, rss).await?;
    let served = accept(listener, &app, drain_delay, shutdown_grace, shutdown).await;
    app.shutdown().await;
    served
}

/// The accept loop, then the drain and the grace period for open connections.
async fn accept(
    listener: TcpListener,
    app: &App,
    drain_delay: Duration,
    shutdown_grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let mut builder = auto::Builder::new(app.tasks().clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(CLIENT_SEND_BUFFER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_send_buf_size(CLIENT_SEND_BUFFER_BYTES);
    let graceful = GracefulShutdown::new();
    tracing::info!(addr = %listener.local_addr()?, "listening");
    tokio::pin!(shutdown);
    // Set once shutdown is signalled: serving goes on until then, not ready.
    let mut draining_until: Option<tokio::time::Instant> = None;
    loop {
        let stop = async {
            match draining_until {
                Some(deadline) => tokio::time::sleep_until(deadline).await,
                None => (&mut shutdown).await,
            }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning or exiting.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop => {
                app.start_draining();
                if draining_until.is_some() || drain_delay.is_zero() {
                    break;
                }
                tracing::info!(?drain_delay, "draining: not ready, still serving");
                draining_until = Some(tokio::time::Instant::now() + drain_delay);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = app.router().clone();
        let service = service_fn(move |req| {
            let router = router.clone();
            async move { Ok::<_, Infallible>(router.handle(req, peer).await) }
        });
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let connection = graceful.watch(connection);
        app.tasks().spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    tracing::info!("shutting down");
    drop(listener);
    if tokio::time::timeout(shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period: closing them");
    }
    Ok(())
}
