//! Where a decoder reads its source from: [`SourceReader`], a blocking `BufRead` over either a
//! whole body already in memory (a hit, a fill that was stored) or chunks arriving from the
//! origin as the decoder asks for them ([`SourceReader::streaming`]: the origin's pace, at most
//! [`CHANNEL_CHUNKS`] chunks held), so that a source that is not stored is never collected
//! whole. Every read checks the transform's deadline and the source's byte limit.

use std::io::{self, BufRead, Read};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

/// The most a single `fill_buf` hands a decoder: decoders that take all they are given (libjpeg's
/// source manager) then still come back, and the deadline is checked, every 64 KiB.
const MAX_SLICE_BYTES: usize = 64 * 1024;

/// Chunks held between the origin and the decoder: with 64 KiB chunks, at most 256 KiB of a
/// streamed source is in memory at once.
pub(super) const CHANNEL_CHUNKS: usize = 4;

/// Why a source read failed, as the pipeline reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadLimit {
    /// The transform's deadline passed.
    Deadline,
    /// More than the source's byte limit arrived.
    TooLarge,
    /// The origin's body failed (the feeding side knows why).
    Failed,
}

/// A marker error inside an [`io::Error`], for the pipeline to tell a limit from a decoder's
/// own complaint.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}")]
pub(super) struct LimitError(pub ReadLimit);

fn limit(kind: ReadLimit) -> io::Error {
    io::Error::other(LimitError(kind))
}

/// Which [`ReadLimit`] an error from a decoder came from, if any (searching its sources).
pub(super) fn read_limit(e: &(dyn std::error::Error + 'static)) -> Option<ReadLimit> {
    let mut source = Some(e);
    while let Some(err) = source {
        if let Some(LimitError(kind)) = err.downcast_ref::<LimitError>() {
            return Some(*kind);
        }
        if let Some(io) = err.downcast_ref::<io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(LimitError(kind)) = inner.downcast_ref::<LimitError>()
        {
            return Some(*kind);
        }
        source = err.source();
    }
    None
}

/// The first read limit a [`SourceReader`] hit, shared with whoever runs its decoder: a
/// decoder that turns every read failure into its own error (libjpeg) loses which it was.
#[derive(Clone, Default)]
pub struct Failure(Arc<AtomicU8>);

impl Failure {
    fn set(&self, limit: ReadLimit) {
        let code = match limit {
            ReadLimit::Deadline => 1,
            ReadLimit::TooLarge => 2,
            ReadLimit::Failed => 3,
        };
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The limit hit, if any.
    pub fn get(&self) -> Option<ReadLimit> {
        match self.0.load(Ordering::Acquire) {
            1 => Some(ReadLimit::Deadline),
            2 => Some(ReadLimit::TooLarge),
            3 => Some(ReadLimit::Failed),
            _ => None,
        }
    }
}

/// The sending half of a streamed source: chunks, then the end (dropping it), or a failure.
pub(crate) type SourceSender = mpsc::Sender<Result<Bytes, ()>>;

/// A source as a decoder reads it, blocking.
pub struct SourceReader {
    /// What has arrived and not been read yet.
    current: Bytes,
    /// More to come from the origin; `None` for a whole body.
    chunks: Option<mpsc::Receiver<Result<Bytes, ()>>>,
    deadline: Instant,
    max_bytes: u64,
    /// Bytes handed to the decoder so far.
    read_bytes: u64,
    /// A failure seen, repeated on every later read.
    failed: Option<ReadLimit>,
    failure: Failure,
}

impl SourceReader {
    /// A whole body in memory.
    pub fn whole(body: Bytes, deadline: Instant) -> Self {
        SourceReader {
            max_bytes: body.len() as u64,
            current: body,
            chunks: None,
            deadline,
            read_bytes: 0,
            failed: None,
            failure: Failure::default(),
        }
    }

    /// A body that arrives as chunks through the returned sender (at most `CHANNEL_CHUNKS`
    /// held), starting with `first` (what was read ahead to probe the header); more than
    /// `max_bytes` in all is [`ReadLimit::TooLarge`]. Read it on a blocking thread only.
    pub fn streaming(first: Bytes, max_bytes: u64, deadline: Instant) -> (Self, SourceSender) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let reader = SourceReader {
            current: first,
            chunks: Some(rx),
            deadline,
            max_bytes,
            read_bytes: 0,
            failed: None,
            failure: Failure::default(),
        };
        (reader, tx)
    }

    /// Where the first limit it hits is recorded.
    pub fn failure(&self) -> Failure {
        self.failure.clone()
    }

    fn fail(&mut self, limit: ReadLimit) -> io::Error {
        self.failed = Some(limit);
        self.failure.set(limit);
        self::limit(limit)
    }

    /// The deadline, for decoders that check it between rows or frames.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Reads everything left into one buffer (for decoders that need the whole source: an
    /// animated WebP), at most `max_bytes` in all.
    ///
    /// # Errors
    /// As any read.
    pub fn read_all(&mut self) -> io::Result<Vec<u8>> {
        let mut all = Vec::new();
        loop {
            let n = {
                let buf = self.fill_buf()?;
                if buf.is_empty() {
                    return Ok(all);
                }
                all.extend_from_slice(buf);
                buf.len()
            };
            self.consume(n);
        }
    }
}

impl BufRead for SourceReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if let Some(kind) = self.failed {
            return Err(limit(kind));
        }
        if Instant::now() >= self.deadline {
            return Err(self.fail(ReadLimit::Deadline));
        }
        while self.current.is_empty() {
            let Some(chunks) = &mut self.chunks else {
                return Ok(&[]);
            };
            match chunks.blocking_recv() {
                None => {
                    self.chunks = None;
                    return Ok(&[]);
                }
                Some(Err(())) => return Err(self.fail(ReadLimit::Failed)),
                Some(Ok(chunk)) => self.current = chunk,
            }
            if Instant::now() >= self.deadline {
                return Err(self.fail(ReadLimit::Deadline));
            }
        }
        if self.read_bytes + self.current.len() as u64 > self.max_bytes {
            return Err(self.fail(ReadLimit::TooLarge));
        }
        let n = self.current.len().min(MAX_SLICE_BYTES);
        Ok(&self.current[..n])
    }

    fn consume(&mut self, amount: usize) {
        let amount = amount.min(self.current.len());
        let _ = self.current.split_to(amount);
        self.read_bytes += amount as u64;
    }
}

/// A source is read once, front to back, and cannot seek: only asking where it is
/// (`SeekFrom::Current(0)`) works. (The png crate asks for `Seek` but does not seek.)
impl std::io::Seek for SourceReader {
    fn seek(&mut self, pos: io::SeekFrom) -> io::Result<u64> {
        match pos {
            io::SeekFrom::Current(0) => Ok(self.read_bytes),
            _ => Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a source is read once, front to back",
            )),
        }
    }
}

impl Read for SourceReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, out)
    }
}

/// `Read::read` for a reader whose `BufRead` half does the work: copies from what `fill_buf`
/// gives and consumes it.
pub(super) fn read_buffered(reader: &mut impl BufRead, out: &mut [u8]) -> io::Result<usize> {
    let n = {
        let buf = reader.fill_buf()?;
        let n = buf.len().min(out.len());
        out[..n].copy_from_slice(&buf[..n]);
        n
    };
    reader.consume(n);
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_streamed_source_reads_in_order_and_ends() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut reader, tx) = SourceReader::streaming(Bytes::from_static(b"ab"), 100, deadline);
        let feeder = std::thread::spawn(move || {
            for chunk in [&b"cd"[..], b"", b"efg"] {
                tx.blocking_send(Ok(Bytes::copy_from_slice(chunk))).unwrap();
            }
        });
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        feeder.join().unwrap();
        assert_eq!(all, b"abcdefg");
    }

    #[test]
    fn limits_are_errors_a_pipeline_can_tell_apart() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let (mut reader, tx) = SourceReader::streaming(Bytes::from_static(b"abcd"), 6, deadline);
        tx.blocking_send(Ok(Bytes::from_static(b"efgh"))).unwrap();
        drop(tx);
        let e = reader.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(read_limit(&e), Some(ReadLimit::TooLarge));

        let (mut reader, tx) = SourceReader::streaming(Bytes::new(), 6, deadline);
        tx.blocking_send(Err(())).unwrap();
        let e = reader.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(read_limit(&e), Some(ReadLimit::Failed));

        let mut past = SourceReader::whole(Bytes::from_static(b"abc"), Instant::now());
        let e = past.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(read_limit(&e), Some(ReadLimit::Deadline));
        assert!(read_limit(&io::Error::other("other")).is_none());
    }
}
