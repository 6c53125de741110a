//! A client's request body on its way upstream (uploads on routes): streamed chunk by chunk,
//! held to `[server] max_request_body_bytes`, and timed by its own rule, a longest pause
//! between two chunks (`[server] request_body_timeout`, as nginx's `client_body_timeout`), so a
//! slow upload that keeps moving is never failed by the upstream's `header_timeout`: that one
//! starts when the last byte has been sent. A small body may also be kept as it passes
//! ([`Captured`]), for what needs to read it after it was sent (the objects a Supabase move
//! names).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http::header::CONTENT_LENGTH;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use super::{BoxError, RequestBody};

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
pub struct UploadLimits {
    /// Longest body, in bytes.
    pub max_bytes: u64,
    /// Longest pause between two chunks.
    pub idle_timeout: Duration,
}

/// A client's body ready to be sent upstream, and the handle that follows its progress.
pub struct Upload {
    pub body: RequestBody,
    pub progress: UploadProgress,
    /// The body as it passed, when asked for (see [`Upload::new`]).
    pub captured: Captured,
}

impl Upload {
    /// Wraps the client's `body`, whose request carried `headers`. With `capture_bytes` above
    /// 0, a body of at most that many bytes is also kept as it passes ([`Captured`]).
    ///
    /// # Errors
    /// [`UploadError::TooLarge`] at once when `Content-Length` announces more than the limit:
    /// nothing is read and the upstream is not contacted.
    pub fn new<B>(
        body: B,
        headers: &HeaderMap,
        limits: UploadLimits,
        capture_bytes: usize,
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
        let captured = Captured::new(capture_bytes);
        let guarded = Guarded {
            inner: body.map_err(Into::into).boxed_unsync(),
            limits,
            sent_bytes: 0,
            stall: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            waiting: false,
            state,
            captured: captured.clone(),
        };
        Ok(Upload {
            body: guarded.boxed_unsync(),
            progress: UploadProgress(watch),
            captured,
        })
    }
}

/// An upload's body, kept as it passes when it is small: shared between the body (which fills
/// it) and whoever reads it once the upload ended.
#[derive(Debug, Clone)]
pub struct Captured(Option<Arc<Mutex<Capture>>>);

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
    pub fn body(&self) -> Option<Bytes> {
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
#[derive(Debug, Clone)]
pub struct UploadProgress(watch::Receiver<State>);

impl UploadProgress {
    /// Waits until the whole body has been sent (`Ok`) or the upload failed.
    ///
    /// # Errors
    /// The [`UploadError`] that ended it.
    pub async fn sent(&mut self) -> Result<(), UploadError> {
        match self.0.wait_for(|s| *s != State::Sending).await {
            Ok(s) => match &*s {
                State::Failed(e) => Err(e.clone()),
                _ => Ok(()),
            },
            // The body was dropped unfinished: the request it belonged to ended.
            Err(_) => Ok(()),
        }
    }

    /// Why the upload failed, if it did.
    pub fn failure(&self) -> Option<UploadError> {
        match &*self.0.borrow() {
            State::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }
}

/// The client's body under the limits; it reports how it ends to [`UploadProgress`].
struct Guarded {
    inner: RequestBody,
    limits: UploadLimits,
    sent_bytes: u64,
    /// Fires `idle_timeout` after imgedge started waiting for the client's next chunk.
    stall: Pin<Box<Sleep>>,
    /// Whether the last poll of the client's body was pending (the stall timer is running).
    waiting: bool,
    state: watch::Sender<State>,
    captured: Captured,
}

impl Guarded {
    fn fail(&mut self, e: UploadError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.captured.end(false);
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
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                // The pause counts from when imgedge starts waiting for the client, not from
                // its last chunk: time the upstream took to accept that chunk is not the
                // client's.
                if !this.waiting {
                    this.waiting = true;
                    let deadline = Instant::now() + this.limits.idle_timeout;
                    this.stall.as_mut().reset(deadline);
                }
                ready!(this.stall.as_mut().poll(cx));
                return this.fail(UploadError::Stalled(this.limits.idle_timeout));
            }
            Poll::Ready(frame) => frame,
        };
        this.waiting = false;
        match frame {
            None => {
                this.captured.end(true);
                this.state.send_replace(State::Sent);
                Poll::Ready(None)
            }
            Some(Err(e)) => this.fail(UploadError::Failed(e.to_string())),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.sent_bytes = this.sent_bytes.saturating_add(data.len() as u64);
                    if this.sent_bytes > this.limits.max_bytes {
                        return this.fail(UploadError::TooLarge {
                            max_bytes: this.limits.max_bytes,
                        });
                    }
                    this.captured.data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // A sender may stop at the last data frame once the body says it is at its end,
        // without asking for the end itself.
        self.captured.end(self.inner.is_end_stream());
        // Dropped before its end: the fetch no longer waits for it.
        self.state.send_if_modified(|s| {
            let sending = *s == State::Sending;
            if sending {
                *s = State::Sent;
            }
            sending
        });
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
        let mut upload = Upload::new(body, &HeaderMap::new(), limits(100), 0).unwrap();
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
        );
        assert!(matches!(
            result,
            Err(UploadError::TooLarge { max_bytes: 5 })
        ));
    }

    #[tokio::test]
    async fn a_body_growing_past_the_limit_fails_and_says_why() {
        let body = ThenSilent(VecDeque::from([&b"abc"[..], b"def"]));
        let upload = Upload::new(body, &HeaderMap::new(), limits(5), 0).unwrap();
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
        let upload = Upload::new(body, &HeaderMap::new(), limits(100), 0).unwrap();
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
        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 6).unwrap();
        let captured = upload.captured.clone();
        let mut body = upload.body;
        body.frame().await.unwrap().unwrap();
        assert_eq!(captured.body(), None, "not while it is being sent");
        while body.frame().await.is_some() {}
        assert_eq!(captured.body().as_deref(), Some(&b"abcdef"[..]));

        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 5).unwrap();
        let captured = upload.captured.clone();
        upload.body.collect().await.unwrap();
        assert_eq!(captured.body(), None, "over the limit");

        let upload = Upload::new(chunks(), &HeaderMap::new(), limits(100), 6).unwrap();
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
