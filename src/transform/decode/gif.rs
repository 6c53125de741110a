//! GIF: the `gif` crate, each frame read row by row straight onto a canvas of the logical
//! screen's size (RGBA), clipped to it, so a frame larger than the screen costs one row of its
//! width and never a buffer of its own size. [`GifFrames`] gives the composited canvas of each
//! frame with its delay, applying the frames' disposal (GIF89a §23); a still transform takes the
//! first one.
//!
//! Every frame's size is checked against `max_source_pixels` before its pixels are read, and the
//! decoder's own buffers (application extensions: ICC, XMP) are held to [`MEMORY_LIMIT_BYTES`].

use std::time::{Duration, Instant};

use gif::DisposalMethod;

use super::{Pixels, check_deadline, undecodable};
use crate::transform::TransformError;
use crate::transform::source::SourceReader;

/// What the gif crate may allocate for itself: extension data (ICC, XMP) and one row.
pub(crate) const MEMORY_LIMIT_BYTES: u64 = 2 << 20;

/// The frames of a GIF, composited.
pub(crate) struct GifFrames {
    decoder: gif::Decoder<SourceReader>,
    width: usize,
    height: usize,
    canvas: Vec<u8>,
    /// The canvas before the last frame, when that frame is to be disposed of by restoring it.
    previous: Option<Vec<u8>>,
    /// What the last frame asks to be done before the next is drawn.
    dispose: Option<(DisposalMethod, Rect)>,
    row: Vec<u8>,
    max_frame_pixels: u64,
    deadline: Instant,
    frames: u32,
}

#[derive(Clone, Copy)]
struct Rect {
    left: usize,
    top: usize,
    width: usize,
    height: usize,
}

/// One composited frame.
pub(crate) struct Frame<'a> {
    /// The canvas, RGBA, the screen's size.
    pub rgba: &'a [u8],
    pub delay: Duration,
}

impl GifFrames {
    /// Reads the GIF's header from `reader`.
    ///
    /// # Errors
    /// [`TransformError::Undecodable`] when it is not a GIF the gif crate reads.
    pub(crate) fn new(
        reader: SourceReader,
        max_frame_pixels: u64,
        deadline: Instant,
    ) -> Result<Self, TransformError> {
        let mut options = gif::DecodeOptions::new();
        options.set_color_output(gif::ColorOutput::RGBA);
        options.set_memory_limit(gif::MemoryLimit::Bytes(
            MEMORY_LIMIT_BYTES.try_into().expect("non-zero"),
        ));
        options.check_frame_consistency(false);
        options.allow_unknown_blocks(true);
        let decoder = options
            .read_info(reader)
            .map_err(|e| undecodable("gif", e))?;
        let (width, height) = (
            usize::from(decoder.width()).max(1),
            usize::from(decoder.height()).max(1),
        );
        Ok(GifFrames {
            decoder,
            width,
            height,
            canvas: vec![0; width * height * 4],
            previous: None,
            dispose: None,
            row: Vec::new(),
            max_frame_pixels,
            deadline,
            frames: 0,
        })
    }

    /// The logical screen's size.
    pub(crate) fn size(&self) -> (u32, u32) {
        (self.width as u32, self.height as u32)
    }

    /// How many times the animation repeats after its first run (0 forever), as its
    /// NETSCAPE2.0 extension says (read with the header).
    pub(crate) fn loop_count(&self) -> u32 {
        match self.decoder.repeat() {
            gif::Repeat::Infinite => 0,
            gif::Repeat::Finite(n) => u32::from(n),
        }
    }

    /// The next frame composited onto the canvas; `None` after the last.
    ///
    /// # Errors
    /// [`TransformError::TooManyPixels`] for a frame over `max_frame_pixels` (before its pixels
    /// are read), [`TransformError::Undecodable`], [`TransformError::TimedOut`].
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame<'_>>, TransformError> {
        check_deadline(self.deadline)?;
        let Some(info) = self
            .decoder
            .next_frame_info()
            .map_err(|e| undecodable("gif", e))?
        else {
            return Ok(None);
        };
        let (fw, fh) = (usize::from(info.width), usize::from(info.height));
        if (fw * fh) as u64 > self.max_frame_pixels {
            return Err(TransformError::TooManyPixels {
                width: fw as u32,
                height: fh as u32,
                max: self.max_frame_pixels,
            });
        }
        let rect = Rect {
            left: usize::from(info.left),
            top: usize::from(info.top),
            width: fw,
            height: fh,
        };
        let (dispose, interlaced, delay) = (info.dispose, info.interlaced, info.delay);
        // the previous frame's disposal, before this one is drawn
        match self.dispose.take() {
            Some((DisposalMethod::Background, r)) => self.clear(r),
            Some((DisposalMethod::Previous, _)) => {
                if let Some(previous) = self.previous.take() {
                    self.canvas = previous;
                }
            }
            _ => {}
        }
        if dispose == DisposalMethod::Previous {
            self.previous = Some(self.canvas.clone());
        }
        self.row.resize(fw * 4, 0);
        for i in 0..fh {
            if i % 16 == 0 {
                check_deadline(self.deadline)?;
            }
            if !self
                .decoder
                .fill_buffer(&mut self.row)
                .map_err(|e| undecodable("gif", e))?
            {
                // the frame's data ended early: what was drawn stays
                break;
            }
            let y = rect.top + if interlaced { interlaced_row(i, fh) } else { i };
            if y >= self.height || rect.left >= self.width {
                continue;
            }
            let visible = fw.min(self.width - rect.left);
            let start = (y * self.width + rect.left) * 4;
            let dest = &mut self.canvas[start..start + visible * 4];
            for (d, s) in dest.chunks_exact_mut(4).zip(self.row.chunks_exact(4)) {
                // a transparent pixel leaves what is beneath
                if s[3] != 0 {
                    d.copy_from_slice(s);
                }
            }
        }
        self.dispose = Some((dispose, rect));
        self.frames += 1;
        Ok(Some(Frame {
            rgba: &self.canvas,
            delay: Duration::from_millis(u64::from(delay) * 10),
        }))
    }

    /// Clears `r` (clipped to the screen) to transparent.
    fn clear(&mut self, r: Rect) {
        for y in r.top..(r.top + r.height).min(self.height) {
            if r.left >= self.width {
                break;
            }
            let end = (r.left + r.width).min(self.width);
            self.canvas[(y * self.width + r.left) * 4..(y * self.width + end) * 4].fill(0);
        }
    }

    /// The first frame, composited, as a still image.
    ///
    /// # Errors
    /// As [`GifFrames::next_frame`]; [`TransformError::Undecodable`] for a GIF without frames.
    pub(crate) fn first(mut self) -> Result<Pixels, TransformError> {
        self.next_frame()?
            .ok_or_else(|| TransformError::Undecodable("gif: no frame".into()))?;
        Ok(Pixels {
            data: self.canvas,
            width: self.width as u32,
            height: self.height as u32,
            channels: 4,
        })
    }
}

/// The row of an interlaced frame of `height` rows that its `i`-th stored row is: rows 0, 8,
/// 16, ... then 4, 12, ... then 2, 6, ... then 1, 3, ... (GIF89a Appendix E).
fn interlaced_row(i: usize, height: usize) -> usize {
    let passes = [(0, 8), (4, 8), (2, 4), (1, 2)];
    let mut i = i;
    for (start, step) in passes {
        let in_pass = height.saturating_sub(start).div_ceil(step);
        if i < in_pass {
            return start + i * step;
        }
        i -= in_pass;
    }
    height.saturating_sub(1)
}

/// The bytes a GIF of a `width` × `height` screen holds while its frames are composited: the
/// canvas, a copy of it for frames disposed of by restoring, one row of the widest frame the
/// plan allows, and the decoder's [`MEMORY_LIMIT_BYTES`].
pub(crate) fn working_bytes(width: u32, height: u32, widest_frame: u32) -> u64 {
    let canvas = u64::from(width.max(1)) * u64::from(height.max(1)) * 4;
    2 * canvas + u64::from(widest_frame) * 4 * 2 + MEMORY_LIMIT_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interlaced_rows_land_where_they_belong() {
        let rows: Vec<usize> = (0..10).map(|i| interlaced_row(i, 10)).collect();
        assert_eq!(rows, [0, 8, 4, 2, 6, 1, 3, 5, 7, 9]);
    }
}
