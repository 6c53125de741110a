//! A client's request body on its way upstream (uploads on routes): streamed chunk by chunk,
//! held to `[server] max_request_body_bytes`, and timed by its own rule, a longest pause
//! between two chunks (`[server] request_body_timeout`, as nginx's `client_body_timeout`), so a
//! slow upload that keeps moving is never failed by the upstream's `header_timeout`: that one
//! starts when the last byte has been sent.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
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
}

impl Upload {
    /// Wraps the client's `body`, whose request carried `headers`.
    ///
    /// # Errors
    /// [`UploadError::TooLarge`] at once when `Content-Length` announces more than the limit:
    /// nothing is read and the upstream is not contacted.
    pub fn new<B>(body: B, headers: &HeaderMap, limits: UploadLimits) -> Result<Upload, UploadError>
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
        let guarded = Guarded {
            inner: body.map_err(Into::into).boxed_unsync(),
            limits,
            sent_bytes: 0,
            stall: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            waiting: false,
            state,
        };
        Ok(Upload {
            body: guarded.boxed_unsync(),
            progress: UploadProgress(watch),
        })
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
}

impl Guarded {
    fn fail(&mut self, e: UploadError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
        let mut upload = Upload::new(body, &HeaderMap::new(), limits(100)).unwrap();
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
        );
        assert!(matches!(
            result,
            Err(UploadError::TooLarge { max_bytes: 5 })
        ));
    }

    #[tokio::test]
    async fn a_body_growing_past_the_limit_fails_and_says_why() {
        let body = ThenSilent(VecDeque::from([&b"abc"[..], b"def"]));
        let upload = Upload::new(body, &HeaderMap::new(), limits(5)).unwrap();
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
        let upload = Upload::new(body, &HeaderMap::new(), limits(100)).unwrap();
        let progress = upload.progress.clone();
        assert!(upload.body.collect().await.is_err());
        assert_eq!(
            progress.failure(),
            Some(UploadError::Stalled(Duration::from_millis(50)))
        );
    }
}
