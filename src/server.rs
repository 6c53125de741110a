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

use crate::config::ServerConfig;
use crate::connections::{Activity, ActivityGuard, Busy, ConnectionLimits, Slot};
use crate::http::{LoggedBody, Router};
use crate::tasks::Tasks;
use crate::upstream::UpstreamError;

/// Per-connection bound on response bytes queued in user space for a client that reads slower
/// than the origin sends: HTTP/1.1's write buffer and HTTP/2's per-stream send buffer. hyper's
/// defaults (about 400 KiB each) multiplied by thousands of slow clients would be the memory
/// growth this proxy exists to prevent; the kernel's socket buffers keep the pipe full.
const CLIENT_SEND_BUFFER_BYTES: usize = 64 * 1024;

/// How often an HTTP/2 client is pinged.
pub(crate) const H2_PING_INTERVAL: Duration = Duration::from_secs(20);
/// How long an HTTP/2 client has to answer a ping before its connection is closed.
pub(crate) const H2_PING_TIMEOUT: Duration = Duration::from_secs(20);

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
pub(crate) struct TrackedBody {
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

/// The future whose completion starts the shutdown (SIGTERM, a test's signal), boxed.
pub(crate) type Shutdown<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Accepts on `listener` until `shutdown` completes; then drains: `/health/ready` answers 503
/// while serving goes on for `drain_delay`, then the listener closes and open connections get
/// `shutdown_grace` to finish (what remains is cancelled with the app).
///
/// Returns when the grace period ends: what is left of it is the disk writes'.
///
/// Not generic over the shutdown future: the connection code it holds is compiled once, here,
/// rather than in every crate that starts a server (the binary, the tests).
///
/// # Errors
/// Only when the listener's address cannot be read; accept errors are logged and retried.
pub(crate) async fn run(
    listener: TcpListener,
    router: &Arc<Router>,
    tasks: &Tasks,
    config: &ServerConfig,
    mut shutdown: Shutdown<'_>,
) -> std::io::Result<Instant> {
    let mut builder = auto::Builder::new(tasks.clone());
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
    let connections = router.admin.connections.clone();
    // Connection tasks: counted here so that shutdown can wait for them, run by the app so
    // that what outlives the grace period is cancelled with everything else.
    let live = TaskTracker::new();
    let stop = CancellationToken::new();
    let limits = ConnectionLimits {
        header_read_timeout: config.header_read_timeout,
        idle_timeout: config.idle_timeout,
    };
    tracing::info!(addr = %listener.local_addr()?, max_connections = connections.max(), "listening");
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
                router.admin.start_draining();
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
            router.metrics.connections_refused.inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serve = serve_connection(
            stream,
            peer,
            builder.clone(),
            router.clone(),
            limits,
            stop.clone(),
            slot,
        );
        tasks.spawn(live.track_future(serve));
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

/// Serves one connection until it ends, closing it gracefully (nothing in flight is cut) when
/// it sends no request head within `header_read_timeout`, idles past `idle_timeout`, or the
/// server stops.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    builder: Arc<auto::Builder<Tasks>>,
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
            let busy = Busy::of(&activity);
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
                    if !activity.is_h2() && connection.as_mut().poll(cx).is_pending() {
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
