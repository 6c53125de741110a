//! The listening side: accepting connections (at most `[server] max_connections`; more are
//! closed at once), serving HTTP/1.1 and HTTP/2 on each with bounded buffers, closing the ones
//! that say nothing or idle too long, and draining at shutdown.
//!
//! Timeouts, per connection (nginx's `client_header_timeout` and `keepalive_timeout`): a new
//! connection has `header_read_timeout` to send its first request head, HTTP/1-vs-2 detection
//! included, so a socket that says nothing is closed; an HTTP/1.1 request head has as long from
//! its first byte; a connection with nothing in flight (an HTTP/1.1 keep-alive connection, an
//! HTTP/2 one with no open stream) is closed after `idle_timeout`; an HTTP/2 client must answer
//! a ping every [`H2_PING_INTERVAL`] within [`H2_PING_TIMEOUT`]. Closing is graceful: nothing
//! in flight is cut, and HTTP/2 clients get a GOAWAY.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;
use crate::config::ServerConfig;
use crate::http::{LoggedBody, Router};
use crate::upstream::UpstreamError;

/// Per-connection bound on response bytes queued in user space for a client that reads slower
/// than the origin sends: HTTP/1.1's write buffer and HTTP/2's per-stream send buffer. hyper's
/// defaults (about 400 KiB each) multiplied by thousands of slow clients would be the memory
/// growth this proxy exists to prevent; the kernel's socket buffers keep the pipe full.
const CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024;

/// How often an HTTP/2 client is pinged.
pub const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// How long an HTTP/2 client has to answer a ping before its connection is closed.
pub const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

/// The open connections: counted against `max_connections`, and read by `/health/ready`.
#[derive(Debug)]
pub struct Connections {
    open: AtomicUsize,
    max: usize,
}

impl Connections {
    /// Room for `max` connections.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Connections {
            open: AtomicUsize::new(0),
            max,
        })
    }

    /// `[server] max_connections`.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Whether no more are accepted.
    pub fn is_full(&self) -> bool {
        self.open() >= self.max
    }

    /// A slot for one more connection, or `None` at the limit.
    fn claim(self: &Arc<Self>) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(self.clone()))
    }
}

/// One open connection; freed when dropped.
struct Slot(Arc<Connections>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one connection is doing, for its timeouts: requests in flight, when it last went idle,
/// and whether an HTTP/1.1 client has started sending its next request head. Times are
/// milliseconds after `started`.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// When the last request in flight ended.
    idle_since_ms: AtomicU64,
    /// 1 + when the first byte of a request head arrived with nothing in flight; 0 when none is
    /// being read.
    head_since_ms: AtomicU64,
    /// Whether any request has started.
    used: AtomicBool,
    /// Whether the connection speaks HTTP/2 (a byte read then is a frame, not a head).
    h2: AtomicBool,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Activity {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            head_since_ms: AtomicU64::new(0),
            used: AtomicBool::new(false),
            h2: AtomicBool::new(false),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn begin(self: &Arc<Self>, version: http::Version) -> ActivityGuard {
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
            self.h2
                .store(version == http::Version::HTTP_2, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since_ms.store(0, Ordering::Relaxed);
        ActivityGuard(self.clone())
    }

    /// Bytes arrived from the client.
    fn read(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.used.load(Ordering::Relaxed)
            && !self.h2.load(Ordering::Relaxed)
            && self.head_since_ms.load(Ordering::Relaxed) == 0
        {
            self.head_since_ms
                .store(self.now_ms().saturating_add(1), Ordering::Relaxed);
        }
    }

    /// When the connection is to be closed if nothing changes: `None` while a request is in
    /// flight. Until the first request and while a request head arrives, `header_read_timeout`
    /// applies; otherwise, idle, `idle_timeout`.
    fn deadline(&self, limits: ConnectionLimits) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = Duration::from_millis;
        let (since, limit) = match self.head_since_ms.load(Ordering::Relaxed) {
            _ if !self.used.load(Ordering::Relaxed) => (Duration::ZERO, limits.header_read_timeout),
            0 => (
                ms(self.idle_since_ms.load(Ordering::Relaxed)),
                limits.idle_timeout,
            ),
            head => (ms(head - 1), limits.header_read_timeout),
        };
        Some(self.started + since + limit)
    }
}

/// A request's hold on its connection: while a guard from [`Busy::hold`] lives, the connection
/// counts as busy with a request, as while a response is being sent (no idle or head
/// timeout), whatever else has ended. For a request body still being read after its response
/// (upload.rs's lingering close).
#[derive(Clone)]
pub struct Busy(Arc<Activity>);

impl Busy {
    /// Keeps the connection busy until the guard is dropped.
    pub fn hold(&self) -> BusyGuard {
        self.0.in_flight.fetch_add(1, Ordering::AcqRel);
        BusyGuard(ActivityGuard(self.0.clone()))
    }
}

/// See [`Busy::hold`].
pub struct BusyGuard(#[allow(dead_code)] ActivityGuard);

/// One request in flight: ends with its response body (when hyper drops it).
struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.now_ms(), Ordering::Relaxed);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client's socket, telling its [`Activity`] when bytes arrive.
struct WatchedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.read();
        }
        polled
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// A response body that keeps its request counted as in flight until it ends.
pub struct TrackedBody {
    inner: LoggedBody,
    _activity: ActivityGuard,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, UpstreamError>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Accepts on `listener` until `shutdown` completes; then drains: `/health/ready` answers 503
/// while serving goes on for `drain_delay`, then the listener closes and open connections get
/// `shutdown_grace` to finish (what remains is cancelled with the app).
///
/// Returns when the grace period ends: what is left of it is the disk writes'.
///
/// # Errors
/// Only when the listener's address cannot be read; accept errors are logged and retried.
pub async fn run(
    listener: TcpListener,
    app: &App,
    config: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<Instant> {
    let mut builder = auto::Builder::new(app.tasks().clone());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(CLIENT_SEND_BUFFER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_send_buf_size(CLIENT_SEND_BUFFER_BYTES)
        .max_concurrent_streams(config.max_concurrent_streams)
        .keep_alive_interval(H2_PING_INTERVAL)
        .keep_alive_timeout(H2_PING_TIMEOUT);
    let builder = Arc::new(builder);
    let connections = app.router().admin.connections.clone();
    // Connection tasks: counted here so that shutdown can wait for them, run by the app so
    // that what outlives the grace period is cancelled with everything else.
    let live = TaskTracker::new();
    let stop = CancellationToken::new();
    let limits = ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
    };
    tracing::info!(addr = %listener.local_addr()?, max_connections = connections.max(), "listening");
    tokio::pin!(shutdown);
    // Set once shutdown is signalled: serving goes on until then, not ready.
    let mut draining_until: Option<Instant> = None;
    loop {
        let stop_accepting = async {
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
            () = stop_accepting => {
                app.start_draining();
                if draining_until.is_some() || config.drain_delay.is_zero() {
                    break;
                }
                tracing::info!(drain_delay = ?config.drain_delay, "draining: not ready, still serving");
                draining_until = Some(Instant::now() + config.drain_delay);
                continue;
            }
        };
        let Some(slot) = connections.claim() else {
            // Closed at once: the client sees a reset or an empty reply and can go elsewhere.
            app.router().metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serve = serve_connection(
            stream,
            peer,
            builder.clone(),
            app.router().clone(),
            limits,
            stop.clone(),
            slot,
        );
        app.tasks().spawn(live.track_future(serve));
    }
    tracing::info!("shutting down");
    drop(listener);
    let grace_ends = Instant::now() + config.shutdown_grace;
    stop.cancel();
    live.close();
    if tokio::time::timeout_at(grace_ends, live.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown grace period: closing them");
    }
    Ok(grace_ends)
}

#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

/// Serves one connection until it ends, closing it gracefully (nothing in flight is cut) when
/// it sends no request head within `header_read_timeout`, idles past `idle_timeout`, or the
/// server stops.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<crate::tasks::Tasks>>,
    router: Arc<Router>,
    limits: ConnectionLimits,
    stop: CancellationToken,
    _slot: Slot,
) {
    let activity = Activity::new();
    let service = service_fn({
        let activity = activity.clone();
        move |req: Request<Incoming>| {
            let (router, guard) = (router.clone(), activity.begin(req.version()));
            let busy = Busy(activity.clone());
            async move {
                let response = router.handle(req, peer, busy).await;
                Ok::<_, Infallible>(response.map(|inner| TrackedBody {
                    inner,
                    _activity: guard,
                }))
            }
        }
    });
    let io = WatchedIo {
        stream,
        activity: activity.clone(),
    };
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    // While requests are in flight there is no deadline; look again this often.
    let recheck = limits.header_read_timeout.min(limits.idle_timeout);
    let mut armed = activity
        .deadline(limits)
        .unwrap_or_else(|| Instant::now() + recheck);
    let timer = tokio::time::sleep_until(armed);
    tokio::pin!(timer);
    let mut closing = false;
    // One task drives the connection and its timer: what brings the deadline closer (a head's
    // first byte) happens while the connection is polled, so the timer is re-armed right after;
    // what moves it later (a request ending, here or in an HTTP/2 stream's task) is seen when
    // the timer fires.
    let ended = std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = connection.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            if closing {
                return Poll::Pending;
            }
            if stopped.as_mut().poll(cx).is_ready() {
                closing = true;
                connection.as_mut().graceful_shutdown();
                continue;
            }
            // Re-armed only when the deadline comes closer (a head starts arriving); one that
            // moves later, as every request's end moves it, is found when the timer fires.
            if let Some(deadline) = activity.deadline(limits)
                && deadline < armed
            {
                armed = deadline;
                timer.as_mut().reset(deadline);
            }
            if timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            match activity.deadline(limits) {
                Some(deadline) if deadline <= armed => {
                    tracing::debug!(%peer, "connection silent or idle past its limit: closing");
                    closing = true;
                    connection.as_mut().graceful_shutdown();
                    // HTTP/2 says GOAWAY and closes; HTTP/1.1 closes at once only between
                    // requests, so a connection still sending its first head is dropped:
                    // nothing is in flight, nothing is cut.
                    if !activity.h2.load(Ordering::Relaxed)
                        && connection.as_mut().poll(cx).is_pending()
                    {
                        return Poll::Ready(Ok(()));
                    }
                    continue;
                }
                Some(deadline) => armed = deadline,
                None => armed = Instant::now() + recheck,
            }
            timer.as_mut().reset(armed);
        }
    })
    .await;
    if let Err(e) = ended {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}
