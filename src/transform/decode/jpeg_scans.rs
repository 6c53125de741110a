//! A JPEG's scans, counted as libjpeg reads them: [`Scans`] wraps the source and cuts what it
//! hands libjpeg right after each scan's header, so that libjpeg comes back before decoding each
//! scan. A progressive JPEG's cost is its scans times its pixels, and a small file can hold
//! hundreds of scans that each walk every coefficient of a large image (libjpeg-turbo's "Two
//! Issues with the JPEG Standard"): with a read before each scan, the source's deadline is
//! checked once per scan, and a file with more than [`MAX_SCANS`] is refused before the scan
//! past the limit is decoded (libjpeg-turbo's scan limit, `TJPARAM_SCANLIMIT`, done outside
//! libjpeg because MozJPEG's API has no progress monitor to hook).
//!
//! The scans are found by walking the stream's structure (ITU T.81 §B.1.1: marker segments with
//! their lengths, and entropy-coded data in which `0xFF` is followed only by `0x00` or a restart
//! marker), so bytes inside an APPn segment (an EXIF thumbnail, an ICC profile) are not taken for
//! scan headers.

use std::cell::Cell;
use std::io::{self, BufRead, Read};
use std::rc::Rc;

use crate::transform::source::read_buffered;

/// The most scans a JPEG may have: far above what encoders write (libjpeg's and MozJPEG's
/// progressive scripts write about ten; a scan per coefficient band and refinement bit of each
/// component stays under 500 too).
pub(crate) const MAX_SCANS: u32 = 500;

/// Where the walk is in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    /// Between segments: a marker is next; `ff` when its `0xFF` has been read.
    Marker { ff: bool },
    /// A segment's two length bytes; `hi` the first, once read.
    Length { sos: bool, hi: Option<u8> },
    /// Inside a segment, `left` bytes of it to go.
    Segment { sos: bool, left: u16 },
    /// Entropy-coded data; `ff` when the last byte was `0xFF`.
    Entropy { ff: bool },
}

/// The walk over a JPEG stream: how far it is and how many scans it has passed.
#[derive(Debug, Clone, Copy)]
struct Walk {
    at: At,
    scans: u32,
}

impl Walk {
    fn new() -> Self {
        Walk {
            at: At::Marker { ff: false },
            scans: 0,
        }
    }

    /// Walks `bytes` up to the end of the next scan header (that scan counted) or to their end;
    /// returns how many bytes it walked.
    fn advance(&mut self, bytes: &[u8]) -> usize {
        let mut i = 0;
        while i < bytes.len() {
            match self.at {
                // most of a file: skipped to the next 0xFF
                At::Entropy { ff: false } => match memchr::memchr(0xFF, &bytes[i..]) {
                    Some(at) => {
                        i += at + 1;
                        self.at = At::Entropy { ff: true };
                    }
                    None => return bytes.len(),
                },
                At::Segment { sos, left } => {
                    let n = usize::from(left).min(bytes.len() - i);
                    i += n;
                    let left = left - n as u16;
                    if left > 0 {
                        self.at = At::Segment { sos, left };
                    } else if self.end_segment(sos) {
                        return i;
                    }
                }
                at => {
                    let b = bytes[i];
                    i += 1;
                    if self.step(at, b) {
                        return i;
                    }
                }
            }
        }
        i
    }

    /// Walks all of `bytes`, past any number of scan headers.
    fn advance_all(&mut self, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            done += self.advance(&bytes[done..]);
        }
    }

    /// One byte outside the two skipping states; true when a scan header ended with it.
    fn step(&mut self, at: At, b: u8) -> bool {
        self.at = match at {
            At::Marker { ff: false } => At::Marker { ff: b == 0xFF },
            At::Entropy { ff: true } => match b {
                // a stuffed zero, a restart marker: still the scan's data; 0xFF: fill
                0x00 | 0xD0..=0xD7 => At::Entropy { ff: false },
                0xFF => At::Entropy { ff: true },
                marker => Self::after_marker(marker),
            },
            At::Marker { ff: true } => match b {
                0xFF => At::Marker { ff: true },
                marker => Self::after_marker(marker),
            },
            At::Length { sos, hi: None } => At::Length { sos, hi: Some(b) },
            At::Length { sos, hi: Some(hi) } => match u16::from_be_bytes([hi, b]) {
                // a length that cannot be: libjpeg will refuse the file; walk on to a marker
                0 | 1 => At::Marker { ff: false },
                2 => return self.end_segment(sos),
                length => At::Segment {
                    sos,
                    left: length - 2,
                },
            },
            At::Entropy { ff: false } | At::Segment { .. } => unreachable!("skipped in advance"),
        };
        false
    }

    /// Where a marker byte leads: markers without a segment (SOI, EOI, RSTn, TEM, and a stray
    /// zero) to the next marker, the others to their length.
    fn after_marker(marker: u8) -> At {
        match marker {
            0x00 | 0x01 | 0xD0..=0xD9 => At::Marker { ff: false },
            _ => At::Length {
                sos: marker == 0xDA,
                hi: None,
            },
        }
    }

    /// A segment ended: after a scan header, its data (and the scan counted: true).
    fn end_segment(&mut self, sos: bool) -> bool {
        if sos {
            self.scans += 1;
            self.at = At::Entropy { ff: false };
        } else {
            self.at = At::Marker { ff: false };
        }
        sos
    }
}

/// The source as libjpeg reads it: each `fill_buf` ends at the end of the next scan header,
/// so that libjpeg reads again (and the inner reader checks its deadline) before each scan.
/// Past [`MAX_SCANS`] it fails, and says so through the shared flag.
pub(crate) struct Scans<R> {
    inner: R,
    /// The walk over what libjpeg has consumed.
    walk: Walk,
    /// What the last `fill_buf` offered: its length and the walk at its end.
    offered: Option<(usize, Walk)>,
    too_many: Rc<Cell<bool>>,
}

impl<R: BufRead> Scans<R> {
    /// `inner` counted; the returned flag is set when it had more than [`MAX_SCANS`] scans.
    pub(crate) fn new(inner: R) -> (Self, Rc<Cell<bool>>) {
        let too_many = Rc::new(Cell::new(false));
        let scans = Scans {
            inner,
            walk: Walk::new(),
            offered: None,
            too_many: too_many.clone(),
        };
        (scans, too_many)
    }
}

impl<R: BufRead> BufRead for Scans<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.walk.scans > MAX_SCANS {
            self.too_many.set(true);
            return Err(io::Error::other(format!(
                "more than {MAX_SCANS} scans in the JPEG"
            )));
        }
        let buf = self.inner.fill_buf()?;
        let mut walk = self.walk;
        let len = walk.advance(buf);
        self.offered = Some((len, walk));
        Ok(&buf[..len])
    }

    fn consume(&mut self, amount: usize) {
        match self.offered.take() {
            Some((len, walk)) if amount == len => self.walk = walk,
            // less than was offered (libjpeg takes all it is given): walk what was taken
            _ => {
                if let Ok(buf) = self.inner.fill_buf() {
                    self.walk.advance_all(&buf[..amount.min(buf.len())]);
                }
            }
        }
        self.inner.consume(amount);
    }
}

impl<R: BufRead> Read for Scans<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        read_buffered(self, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment: marker, length, payload.
    fn segment(marker: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![0xFF, marker];
        out.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// SOI, an APP1 full of bytes that look like scan headers, a frame header, then `scans`
    /// scans whose data holds stuffed zeros, restart markers and fill bytes.
    fn stream(scans: usize) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        out.extend(segment(
            0xE1,
            &[0xFF, 0xDA, 0x00, 0x08, 0xFF, 0xDA].repeat(50),
        ));
        out.extend(segment(0xC2, &[8, 0, 16, 0, 16, 1, 1, 0x11, 0]));
        for _ in 0..scans {
            out.extend(segment(0xC4, &[0x00; 17]));
            out.extend(segment(0xDA, &[1, 1, 0, 0, 63, 0]));
            out.extend([0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56, 0xFF, 0xFF, 0x00]);
        }
        out.extend([0xFF, 0xD9]);
        out
    }

    fn walked(bytes: &[u8], piece: usize) -> u32 {
        let mut walk = Walk::new();
        for chunk in bytes.chunks(piece) {
            walk.advance_all(chunk);
        }
        walk.scans
    }

    #[test]
    fn scans_are_counted_by_the_stream_s_structure_in_any_pieces() {
        let bytes = stream(7);
        for piece in [1, 2, 3, 5, 64, bytes.len()] {
            assert_eq!(walked(&bytes, piece), 7, "in pieces of {piece}");
        }
        assert_eq!(walked(&stream(0), 1), 0);
    }

    #[test]
    fn each_read_ends_at_a_scan_header_and_too_many_scans_fail() {
        let bytes = stream(MAX_SCANS as usize + 1);
        let (mut scans, too_many) = Scans::new(io::Cursor::new(bytes.clone()));
        let mut reads = 0;
        let mut seen = Vec::new();
        let error = loop {
            match scans.fill_buf() {
                Ok([]) => panic!("read to the end"),
                Ok(buf) => {
                    // every piece but the first ends right after a scan header
                    let n = buf.len();
                    seen.extend_from_slice(buf);
                    scans.consume(n);
                    reads += 1;
                }
                Err(e) => break e,
            }
        };
        assert!(error.to_string().contains("more than 500 scans"), "{error}");
        assert!(too_many.get());
        assert_eq!(reads, MAX_SCANS as usize + 1);
        assert_eq!(seen, bytes[..seen.len()]);
        // a file at the limit reads to its end
        let (mut scans, too_many) = Scans::new(io::Cursor::new(stream(MAX_SCANS as usize)));
        let mut all = Vec::new();
        scans.read_to_end(&mut all).unwrap();
        assert_eq!(all, stream(MAX_SCANS as usize));
        assert!(!too_many.get());
    }

    #[test]
    fn a_partial_consume_is_walked_too() {
        let bytes = stream(3);
        let (mut scans, _) = Scans::new(io::Cursor::new(bytes));
        let mut total = 0;
        loop {
            let n = scans.fill_buf().unwrap().len();
            if n == 0 {
                break;
            }
            // take one byte at a time
            scans.consume(1);
            total += 1;
        }
        assert_eq!(scans.walk.scans, 3);
        assert_eq!(total, stream(3).len());
    }
}
