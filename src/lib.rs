//! imgedge: a streaming image proxy and CDN-style edge cache.
//!
//! `GET /image-proxy?url=...` and `GET /storage/v1/object/public/...` (a reverse proxy in front of
//! Supabase Storage) are answered from a memory tier of recent, small, fresh responses, a disk
//! tier behind it, or streamed from the origin chunk by chunk while small storable bodies are
//! teed into the tiers.
//!
//! # The library's surface
//!
//! imgedge is a server; its library exists for the binary (`src/main.rs`), the tests and the
//! benches, and exports only what they use. Everything else is crate-private (`pub(crate)`, kept
//! so by `#![warn(unreachable_pub)]` below), so the compiler finds dead code.
//! - [`serve`], [`serve_with_rss`], [`ServeError`]: run the server on a listener until a
//!   shutdown future completes; [`Config`] and the [`config`] module (its sections, `LogFormat`,
//!   `DEFAULT_TOML`): what it runs with.
//! - [`rss`]: `RssSource` and `SetRss`, for tests that drive memory pressure.
//! - [`signing`]: `Signer` and `image_proxy_target` (`imgedge sign`, and tests that sign URLs).
//! - [`target`]: `parse_image_url`, `is_global`, `HostPolicy`, `TargetError` (the `url=`
//!   parameter and the address guard; `imgedge sign` checks the URL it signs).
//! - [`freshness`]: RFC 9111's rules (`storable`, `usability`, the directives), and
//!   [`http::Routes`] (a route path's purge key), [`proxy::if_none_match_matches`] and
//!   [`proxy::single_byte_range`]: what tests/integration/properties.rs checks with proptest.
//! - [`transform`]: the transform and its steps (`transform`, `plan`, `decode_still`,
//!   `resize_decoded`, `Params`, `Limits`, `SourceReader`): tests/decode_bounds.rs and
//!   benches/transform.rs.
//!
//! # Modules, in reading order
//!
//! ARCHITECTURE.md has the code map and the layers each module belongs to.
//! - `config`: defaults + file + environment → a validated [`Config`].
//! - `app`: builds the process (tiers, monitor, relief, upstream, proxy, router) and ends it.
//! - `server`, `connections`: accepting connections, their limits and timeouts, draining.
//! - `http`: the router: routes, admission, `/health`, `/metrics`, purge, errors as JSON, the
//!   access log.
//! - `proxy`: one request: cache key → tiers → revalidation or upstream → streamed response.
//! - `render`, `transform`: images transformed on request, and the transform pipeline.
//! - `collapse`: collapsed forwarding: one fetch per key, shared while it fills.
//! - `tee`: the body of an unshared miss, teed into the tiers once complete.
//! - `cache`: cache key, stored object, the memory tier, the storage seam, the disk and shared
//!   tiers.
//! - `freshness`: RFC 9111 storability, freshness and age.
//! - `upstream`: hyper-util connection pools, the SSRF guard at connect time, timeouts, body
//!   limits; `descriptors`: the descriptor budget.
//! - `target`: the `url=` parameter, `allowed_hosts`, non-global addresses.
//! - `pressure`: RSS against the memory budget → a pressure level on a watch channel.
//! - `relief`: what the tiers and fills give up at each level (evict, clear, abort).
//! - `signing`: signed `/image-proxy` URLs (HMAC-SHA256).
//! - `tasks`: the one owner of every task imgedge spawns.
//! - `error`, `body`, `metrics`, `rss`: the error→status mapping, the response body, the
//!   metrics registry, the process RSS.

#![warn(unreachable_pub)]
// The crate's docs are its developers' (`cargo doc --document-private-items`, as the test command
// builds them): public items may link to the crate-private ones they are built on.
#![allow(rustdoc::private_intra_doc_links)]

mod app;
mod body;
mod cache;
mod collapse;
pub mod config;
mod connections;
mod descriptors;
mod error;
pub mod freshness;
pub mod http;
mod metrics;
mod pressure;
pub mod proxy;
mod relief;
mod render;
pub mod rss;
mod server;
pub mod signing;
pub mod target;
mod tasks;
mod tee;
pub mod transform;
mod upstream;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpListener;

use app::App;
pub use config::Config;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start: {0}")]
    Setup(#[from] app::SetupError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The future [`serve`] returns: boxed, so that the server is compiled once, in this crate. An
/// `async fn` here would have every crate that awaits it (the binary, each test crate) compile
/// its whole state machine, and everything it calls, again.
pub type Serving<'a> = Pin<Box<dyn Future<Output = Result<(), ServeError>> + Send + 'a>>;

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until `shutdown` completes. Then it
/// drains: `/health/ready` answers 503 while it keeps serving for `[server] drain_delay`; then it
/// stops accepting and gives open connections `[server] shutdown_grace` to finish; what is left of
/// it goes to writing out the disk writes still queued. When the returned future completes,
/// every task it started has ended.
///
/// # Errors
/// [`ServeError::Setup`] when the process cannot be set up (see [`app::SetupError`]); accept
/// errors are logged and retried, never returned.
pub fn serve<'a>(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'a,
) -> Serving<'a> {
    serving(listener, config, None, Box::pin(shutdown))
}

/// [`serve`] with the RSS reading taken from `rss` (tests drive memory pressure with it).
///
/// # Errors
/// As [`serve`].
pub fn serve_with_rss<'a>(
    listener: TcpListener,
    config: Config,
    rss: Arc<dyn rss::RssSource>,
    shutdown: impl Future<Output = ()> + Send + 'a,
) -> Serving<'a> {
    serving(listener, config, Some(rss), Box::pin(shutdown))
}

/// What [`serve`] and [`serve_with_rss`] return; not generic over the shutdown future. `rss`:
/// `None` reads this process's.
fn serving(
    listener: TcpListener,
    config: Config,
    rss: Option<Arc<dyn rss::RssSource>>,
    shutdown: server::Shutdown<'_>,
) -> Serving<'_> {
    Box::pin(async move {
        let rss = match rss {
            Some(rss) => rss,
            None => Arc::new(rss::ProcessRss::new().ok_or(app::SetupError::NoRss)?),
        };
        let server = config.server.clone();
        let app = App::build(config, rss).await?;
        let served = server::run(listener, app.router(), app.tasks(), &server, shutdown).await;
        // The grace period covers the connections and the disk writes they left queued; after
        // an error, writes get the whole period.
        let deadline = match served {
            Ok(deadline) => deadline,
            Err(_) => tokio::time::Instant::now() + server.shutdown_grace,
        };
        app.shutdown(deadline).await;
        served.map(drop).map_err(Into::into)
    })
}
