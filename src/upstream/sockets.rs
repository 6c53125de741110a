//! The bound on upstream sockets: a connector that holds one permit per open connection, busy or
//! idle in the pool, for the connection's life, and refuses to connect when none is left
//! ([`SocketsExhausted`]), so that client connections and upstream sockets together stay under
//! the descriptor limit (`descriptors.rs`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::{Connected, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::BoxError;

/// Every upstream socket allowed is open: the fetch is refused rather than risk `EMFILE`.
#[derive(Debug, thiserror::Error)]
#[error("every upstream socket allowed is open")]
pub(super) struct SocketsExhausted;

/// A connector that counts its connections against `sockets`.
#[derive(Clone)]
pub(super) struct Counted<C> {
    pub(super) inner: C,
    pub(super) sockets: Arc<Semaphore>,
}

impl<C> Service<Uri> for Counted<C>
where
    C: Service<Uri> + Send + 'static,
    C::Future: Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = CountedIo<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let permit = self.sockets.clone().try_acquire_owned();
        let connecting = self.inner.call(uri);
        Box::pin(async move {
            let permit = permit.map_err(|_| Box::new(SocketsExhausted) as BoxError)?;
            let io = connecting.await.map_err(Into::into)?;
            Ok(CountedIo {
                io,
                _permit: permit,
            })
        })
    }
}

/// A connection that gives its permit back when it is closed.
pub(super) struct CountedIo<T> {
    io: T,
    _permit: OwnedSemaphorePermit,
}

impl<T: Read + Unpin> Read for CountedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for CountedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

impl<T: Connection> Connection for CountedIo<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}
