//! A client's request body on its way upstream (uploads on routes): streamed chunk by chunk,
//! held to `[server] max_request_body_bytes`, and timed by its own rule, a longest pause
//! between two chunks (`[server] request_body_timeout`, as nginx's `client_body_timeout`), so a
//! slow upload that keeps moving is never failed by the upstream's `header_timeout`: that one
//! starts when the last byte has been sent. A small body may also be kept as it passes
//! ([`Captured`]), for what needs to read it after it was sent (the objects a Supabase move
//! names).
//!
//! A body nothing upstream wants any more (the origin's answer came and was sent before the
//! body was all read, or the upstream connection failed) is not left unread: the client would
//! see its connection reset while it is still sending, often before it has read the answer
//! (EPIPE). The rest is read and discarded instead, in a task of its own, within the body's
//! limits and at most [`LINGER_TIME`] (nginx's lingering close); then the connection goes on.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::{CONTENT_LENGTH, EXPECT};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::{BoxError, RequestBody};
use crate::tasks::Tasks;

/// The longest a client's body is read and discarded once nothing upstream wants it (nginx's
/// `lingering_time`).
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(30);

/// Why an upload did not reach the upstream whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// Announced by `Content-Length`, or grown while streaming, past the limit.
    #[error("request body over server.max_request_body_bytes ({max_bytes} bytes)")]
    TooLarge { max_bytes: u64 },
    /// The client sent nothing for `request_body_timeout` while the body was incomplete.
    #[error("request body stalled for {0:?} (server.request_body_timeout)")]
    Stalled(Duration),
    /// The client's connection failed mid-body.
    #[error("request body failed: {0}")]
    Failed(String),
}

/// Where an upload stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Sending,
    Sent,
    Failed(UploadError),
}

/// The limits every upload gets.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UploadLimits {
    /// Longest body, in bytes.
    pub max_bytes: u64,
    /// Longest pause between two chunks.
    pub idle_timeout: Duration,
}

/// A client's body ready to be sent upstream, and the handle that follows its progress.
pub(crate) struct Upload {
    pub body: RequestBody,
    pub progress: UploadProgress,
    /// The body as it passed, when asked for (see [`Upload::new`]).
    pub captured: Captured,
}

/// What reading the rest of a client's body needs once nothing upstream wants it.
pub(crate) struct Linger {
    /// Where the reading runs.
    pub tasks: Tasks,
    /// Held until the client's body has been read to its end or given up (dropped then): what
    /// keeps the client's connection counted busy with this request meanwhile (`server.rs`),
    /// so that its idle and head timers do not cut the reading short.
    pub hold: Option<Box<dyn Send>>,
}

impl Upload {
    /// Wraps the client's `body`, whose request carried `headers`. With `capture_bytes` above
    /// 0, a body of at most that many bytes is also kept as it passes ([`Captured`]). With
    /// `linger`, what nothing upstream wants of it is read and discarded (see the module's
    /// documentation); without, it is dropped (HTTP/2, where a stream is ended without harm).
    ///
    /// # Errors
    /// [`UploadError::TooLarge`] at once when `Content-Length` announces more than the limit:
    /// nothing is read and the upstream is not contacted.
    pub(crate) fn new<B>(
        body: B,
        headers: &HeaderMap,
        limits: UploadLimits,
        capture_bytes: usize,
        linger: Option<Linger>,
    ) -> Result<Upload, UploadError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let announced = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > limits.max_bytes) {
            return Err(UploadError::TooLarge {
                max_bytes: limits.max_bytes,
            });
        }
        let (state, watch) = watch::channel(State::Sending);
        let (tasks, hold) = linger.map_or((None, None), |l| (Some(l.tasks), l.hold));
        let shared = Arc::new(Shared {
            client: Mutex::new(Some(ClientBody {
                body: body.map_err(Into::into).boxed_unsync(),
                read_bytes: 0,
                expects_continue: headers
                    .get(EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
                _hold: hold,
            })),
            captured: Captured::new(capture_bytes),
            limits,
            tasks,
        });
        let guarded = Guarded {
            shared: shared.clone(),
            stall: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            waiting: false,
            state,
        };
        Ok(Upload {
            body: guarded.boxed_unsync(),
            captured: shared.captured.clone(),
            progress: UploadProgress {
                state: watch,
                shared,
            },
        })
    }
}

/// The client's side of an upload, shared by the body that sends it upstream and the progress
/// handle, which can take it back to discard the rest.
struct ClientBody {
    body: RequestBody,
    /// Bytes read of it so far (sent upstream, or discarded).
    read_bytes: u64,
    /// The request said `Expect: 100-continue`: while nothing is read, the client sends
    /// nothing, and a body that was never asked for is not asked for to be discarded.
    expects_continue: bool,
    _hold: Option<Box<dyn Send>>,
}

/// What an upload's body and its progress handle share.
struct Shared {
    /// The client's body, until it is done with: `None` once it ended, failed or was given up.
    client: Mutex<Option<ClientBody>>,
    captured: Captured,
    limits: UploadLimits,
    /// Where the rest of a body nothing wants is read; `None`: it is dropped.
    tasks: Option<Tasks>,
}

impl Shared {
    fn take(&self) -> Option<ClientBody> {
        self.client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Reads and discards the rest of `client`'s body in a task of its own, within the body's
    /// limits and [`LINGER_TIME`]; drops it at once when it ended, is over the size limit
    /// already, was never asked for (`Expect: 100-continue`), or there is no task to run it.
    fn linger(&self, client: ClientBody) {
        let Some(tasks) = &self.tasks else {
            return;
        };
        let unasked = client.expects_continue && client.read_bytes == 0;
        if client.body.is_end_stream() || unasked || client.read_bytes >= self.limits.max_bytes {
            return;
        }
        tasks.spawn(discard(client, self.limits));
    }
}

/// Reads `client`'s body to its end and drops it, giving up at a pause longer than the limit,
/// past `max_bytes` in all, or after [`LINGER_TIME`].
async fn discard(mut client: ClientBody, limits: UploadLimits) {
    let give_up = Instant::now() + LINGER_TIME;
    let before = client.read_bytes;
    let outcome = loop {
        let pause_ends = (Instant::now() + limits.idle_timeout).min(give_up);
        match tokio::time::timeout_at(pause_ends, client.body.frame()).await {
            Ok(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, |d| d.len() as u64);
                client.read_bytes = client.read_bytes.saturating_add(n);
                if client.read_bytes > limits.max_bytes {
                    break "over server.max_request_body_bytes";
                }
            }
            Ok(None) => break "read to its end",
            Ok(Some(Err(_))) => break "failed",
            Err(_) if Instant::now() >= give_up => break "still sending after the linger time",
            Err(_) => break "stalled",
        }
    };
    tracing::debug!(
        discarded_bytes = client.read_bytes - before,
        outcome,
        "the rest of a request body nothing upstream wanted"
    );
}

/// An upload's body, kept as it passes when it is small: shared between the body (which fills
/// it) and whoever reads it once the upload ended.
#[derive(Debug, Clone)]
pub(crate) struct Captured(Option<Arc<Mutex<Capture>>>);

#[derive(Debug)]
enum Capture {
    /// Bytes so far, and how many may be kept.
    Keeping(BytesMut, usize),
    /// The whole body.
    Complete(Bytes),
    /// Larger than the limit, or it did not end well: nothing kept.
    Dropped,
}

impl Captured {
    /// Keeps up to `max_bytes`; 0 keeps nothing.
    fn new(max_bytes: usize) -> Self {
        Captured(
            (max_bytes > 0)
                .then(|| Arc::new(Mutex::new(Capture::Keeping(BytesMut::new(), max_bytes)))),
        )
    }

    /// The whole body, when it was sent to its end within the limit; `None` while it is still
    /// being sent, when it was larger, failed, or was never asked for.
    pub(crate) fn body(&self) -> Option<Bytes> {
        match &*self.0.as_ref()?.lock().ok()? {
            Capture::Complete(b) => Some(b.clone()),
            _ => None,
        }
    }

    fn update(&self, f: impl FnOnce(Capture) -> Capture) {
        if let Some(slot) = &self.0
            && let Ok(mut c) = slot.lock()
        {
            *c = f(std::mem::replace(&mut *c, Capture::Dropped));
        }
    }

    fn data(&self, data: &Bytes) {
        self.update(|c| match c {
            Capture::Keeping(mut kept, max) if kept.len() + data.len() <= max => {
                kept.extend_from_slice(data);
                Capture::Keeping(kept, max)
            }
            _ => Capture::Dropped,
        });
    }

    fn end(&self, complete: bool) {
        self.update(|c| match c {
            Capture::Keeping(kept, _) if complete => Capture::Complete(kept.freeze()),
            Capture::Complete(b) => Capture::Complete(b),
            _ => Capture::Dropped,
        });
    }
}

/// Follows an [`Upload`] from the fetch that sends it.
#[derive(Clone)]
pub(crate) struct UploadProgress {
    state: watch::Receiver<State>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for UploadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("UploadProgress")
            .field(&*self.state.borrow())
            .finish()
    }
}

impl UploadProgress {
    /// Gives the body up once the response it was sent for is over while it is still being
    /// sent (the origin answered before reading it all): nothing more goes upstream (the
    /// upstream connection is closed the next time it asks), and the rest is read and
    /// discarded ([`LINGER_TIME`]). Nothing once it was sent whole or failed.
    pub(crate) fn abandon(&self) {
        if *self.state.borrow() != State::Sending {
            return;
        }
        if let Some(client) = self.shared.take() {
            self.shared.captured.end(false);
            self.shared.linger(client);
        }
    }

    /// Waits until the whole body has been sent (`Ok`) or the upload failed.
    ///
    /// # Errors
    /// The [`UploadError`] that ended it.
    pub(crate) async fn sent(&mut self) -> Result<(), UploadError> {
        match self.state.wait_for(|s| *s != State::Sending).await {
            Ok(s) => match &*s {
                State::Failed(e) => Err(e.clone()),
                _ => Ok(()),
            },
            // The body was dropped unfinished: the request it belonged to ended.
            Err(_) => Ok(()),
        }
    }

    /// Why the upload failed, if it did.
    pub(crate) fn failure(&self) -> Option<UploadError> {
        match &*self.state.borrow() {
            State::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// The client's body under the limits; it reports how it ends to [`UploadProgress`].
struct Guarded {
    shared: Arc<Shared>,
    /// Fires `idle_timeout` after imgedge started waiting for the client's next chunk.
    stall: Pin<Box<Sleep>>,
    /// Whether the last poll of the client's body was pending (the stall timer is running).
    waiting: bool,
    state: watch::Sender<State>,
}

impl Guarded {
    fn fail(&mut self, e: UploadError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        drop(self.shared.take());
        self.shared.captured.end(false);
        self.state.send_replace(State::Failed(e.clone()));
        Poll::Ready(Some(Err(e.into())))
    }
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if *this.state.borrow() != State::Sending {
            return Poll::Ready(None);
        }
        let limits = this.shared.limits;
        let (polled, read_bytes) = {
            let mut slot = this
                .shared
                .client
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(client) = slot.as_mut() else {
                // Given up (the response is over): an error, so that the upstream connection,
                // whose request is incomplete, is closed rather than reused.
                return Poll::Ready(Some(Err(
                    "the request body was given up after the response".into(),
                )));
            };
            let polled = Pin::new(&mut client.body).poll_frame(cx);
            if let Poll::Ready(Some(Ok(frame))) = &polled
                && let Some(data) = frame.data_ref()
            {
                client.read_bytes = client.read_bytes.saturating_add(data.len() as u64);
            }
            (polled, client.read_bytes)
        };
        let frame = match polled {
            Poll::Pending => {
                // The pause counts from when imgedge starts waiting for the client, not from
                // its last chunk: time the upstream took to accept that chunk is not the
                // client's.
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + limits.idle_timeout;
                    this.stall.as_mut().reset(deadline);
                }
                ready!(this.stall.as_mut().poll(cx));
                return this.fail(UploadError::Stalled(limits.idle_timeout));
            }
            Poll::Ready(frame) => frame,
        };
        this.waiting = false;
        match frame {
            None => {
                this.shared.captured.end(true);
                this.state.send_replace(State::Sent);
                Poll::Ready(None)
            }
            Some(Err(e)) => this.fail(UploadError::Failed(e.to_string())),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if read_bytes > limits.max_bytes {
                        return this.fail(UploadError::TooLarge {
                            max_bytes: limits.max_bytes,
                        });
                    }
                    this.shared.captured.data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Given up or failed: not an end (a chunked upload would be ended cleanly, short); the
        // next poll says why.
        self.shared
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_some_and(|c| c.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.shared
            .client
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or_else(SizeHint::default, |c| c.body.size_hint())
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let client = self.shared.take();
        // A sender may stop at the last data frame once the body says it is at its end,
        // without asking for the end itself.
        let ended = client.as_ref().is_some_and(|c| c.body.is_end_stream());
        self.shared.captured.end(ended);
        // Dropped before its end: the fetch no longer waits for it.
        let sending = self.state.send_if_modified(|s| {
            let sending = *s == State::Sending;
            if sending {
                *s = State::Sent;
            }
            sending
        });
        // Dropped unfinished by the upstream side (its connection failed, or it was never
        // sent): what is left is read and discarded.
        if let Some(client) = client
            && sending
            && !ended
        {
            self.shared.linger(client);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::collections::VecDeque;

    fn limits(max_bytes: u64) -> UploadLimits {
        UploadLimits {
            max_bytes,
            idle_timeout: Duration::from_millis(50),
        }
    }

    /// Sends its chunks, then never ends.
    struct ThenSilent(VecDeque<&'static [u8]>);

    impl Body for ThenSilent {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            match self.get_mut().0.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(chunk))))),
                None => Poll::Pending,
            }
        }
    }

    /// Its one chunk becomes available at a set time.
    struct Later(Option<Pin<Box<Sleep>>>);

    impl Body for Later {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            let Some(at) = self.get_mut().0.as_mut() else {
                return Poll::Ready(None);
            };
            ready!(at.as_mut().poll(cx));
            Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"late")))))
        }
    }

    #[tokio::test]
    async fn time_not_spent_waiting_for_the_client_is_not_a_pause() {
        // The chunk comes 80 ms in; the pause limit is 50 ms; but nothing asks for it until
        // 60 ms in (the upstream was slow to take the previous one): it waited 20 ms.
        let started = Instant::now();
        let body = Later(Some(Box::pin(tokio::time::sleep_until(
            started + Duration::from_millis(80),
        ))));
        let mut upload = Upload::new(body, &HeaderMap::new(), limits(100), 0, None).unwrap();
        tokio::time::sleep_until(started + Duration::from_millis(60)).await;
        let frame = upload.body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"late"));
    }

    #[tokio::test]
    async fn a_body_within_the_limit_passes_whole_and_reports_sent() {
        let upload = Upload::new(
            Full::new(Bytes::from_static(b"hello")),
            &HeaderMap::new(),
            limits(5),
            0,
            None,
        )
        .unwrap();
        let mut progress = upload.progress.clone();
        let bytes = upload.body.collect().await.unwrap().to_bytes();
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(progress.sent().await, Ok(()));
    }

    #[tokio::test]
    async fn an_announced_length_over_the_limit_is_refused_before_reading() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_LENGTH, "6".parse().unwrap());
        let result = Upload::new(
            Full::new(Bytes::from_static(b"hello!")),
            &headers,
            limits(5),
            0,
            None,
        );
        assert!(matches!(
            result,
            Err(UploadError::TooLarge { max_bytes: 5 })
        ));
    }

    #[tokio::test]
    async fn a_body_growing_past_the_limit_fails_and_says_why() {
        let body = ThenSilent(VecDeque::from([&b"abc"[..], b"def"]));
        let upload = Upload::new(body, &HeaderMap::new(), limits(5), 0, None).unwrap();
        let mut progress = upload.progress.clone();
        assert!(upload.body.collect().await.is_err());
        assert_eq!(
            progress.sent().await,
            Err(UploadError::TooLarge { max_bytes: 5 })
        );
    }

    #[tokio::test]
    async fn a_stalled_body_fails_after_the_pause_limit_however_much_came_before() {
        let body = ThenSilent(VecDeque::from([&b"abc"[..]]));
        let upload = Upload::new(body, &HeaderMap::new(), limits(100), 0, None).unwrap();
        let progress = upload.progress.clone();
        assert!(upload.body.collect().await.is_err());
        assert_eq!(
            progress.failure(),
            Some(UploadError::Stalled(Duration::from_millis(50)))
        );
    }

    #[tokio::test]
    async fn a_small_body_is_kept_whole_once_sent_and_a_larger_one_not_at_all() {
        let chunks = || ThenEnd(VecDeque::from([&b"abc"[..], b"def"]));
        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 6, None).unwrap();
        let captured = upload.captured.clone();
        let mut body = upload.body;
        body.frame().await.unwrap().unwrap();
        assert_eq!(captured.body(), None, "not while it is being sent");
        while body.frame().await.is_some() {}
        assert_eq!(captured.body().as_deref(), Some(&b"abcdef"[..]));

        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 5, None).unwrap();
        let captured = upload.captured.clone();
        upload.body.collect().await.unwrap();
        assert_eq!(captured.body(), None, "over the limit");

        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 6, None).unwrap();
        let captured = upload.captured.clone();
        let mut body = upload.body;
        body.frame().await.unwrap().unwrap();
        drop(body);
        assert_eq!(captured.body(), None, "dropped before its end");

        // A sender that stops at the last data frame of a body that says it has ended.
        let upload = Upload::new(
            Full::new(Bytes::from_static(b"whole")),
            &HeaderMap::new(),
            limits(100),
            6,
            None,
        )
        .unwrap();
        let captured = upload.captured.clone();
        let mut body = upload.body;
        body.frame().await.unwrap().unwrap();
        assert!(body.is_end_stream());
        drop(body);
        assert_eq!(captured.body().as_deref(), Some(&b"whole"[..]));
    }

    /// Sends its chunks, then ends.
    struct ThenEnd(VecDeque<&'static [u8]>);

    impl Body for ThenEnd {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(
                self.get_mut()
                    .0
                    .pop_front()
                    .map(|chunk| Ok(Frame::data(Bytes::from_static(chunk)))),
            )
        }
    }
}
