//! [`Shrinker`]: a box filter that reduces an image by whole factors as its rows arrive, so a
//! decoder that produces rows (PNG, baseline JPEG after DCT scaling, GIF) never holds more than
//! one of them at full size, and what it keeps is the reduced image (libvips' `shrink`, done
//! while decoding). The exact size is reached afterwards by the resize, with its Lanczos3
//! filter, from an image still at least twice the output (see [`shrink_factor`]).
//!
//! With an alpha channel, colour is averaged weighted by alpha (premultiplied), so transparent
//! pixels do not darken their neighbours' edges.

/// How much larger than the output a reduced image stays, at least, on each side: with no
/// headroom left, the resize after a box reduction has nothing to smooth and edges alias.
/// libvips' thumbnailer leaves 2× (docs/transforms.md measured the same for JPEG).
pub(super) const HEADROOM: f64 = 2.0;

/// The largest factor per side: sums of 255 × 255 over `MAX_FACTOR²` samples fit in a `u32`.
pub(super) const MAX_FACTOR: u32 = 256;

/// The whole factor by which a side of `from` pixels can be reduced and still leave
/// [`HEADROOM`] × `needed` pixels: 1 when there is no room, at most [`MAX_FACTOR`].
pub(super) fn shrink_factor(from: u32, needed: f64) -> u32 {
    let room = f64::from(from) / (HEADROOM * needed.max(1.0));
    (room.floor() as u32).clamp(1, MAX_FACTOR)
}

/// Reduces a `width` × `height` image of `channels` 8-bit samples per pixel (1 grey, 2 grey and
/// alpha, 3 RGB, 4 RGBA) by `fx` × `fy` as its rows are pushed, top to bottom.
pub(super) struct Shrinker {
    fx: usize,
    fy: usize,
    channels: usize,
    width: usize,
    height: usize,
    out_width: usize,
    out_height: usize,
    /// Per output sample of the output row being built: the sum (colour weighted by alpha when
    /// there is alpha), and per output pixel the alpha sum.
    sums: Vec<u32>,
    /// Rows pushed into `sums` since the last output row.
    rows: usize,
    /// Rows pushed in all.
    pushed: usize,
    out: Vec<u8>,
}

impl Shrinker {
    /// A shrinker for the image described, reducing by `fx` × `fy` (each 1–[`MAX_FACTOR`]).
    pub(super) fn new(width: u32, height: u32, channels: usize, fx: u32, fy: u32) -> Self {
        let (fx, fy) = (
            fx.clamp(1, MAX_FACTOR) as usize,
            fy.clamp(1, MAX_FACTOR) as usize,
        );
        let (width, height) = (width as usize, height as usize);
        let (out_width, out_height) = (width.div_ceil(fx), height.div_ceil(fy));
        Shrinker {
            fx,
            fy,
            channels,
            width,
            height,
            out_width,
            out_height,
            sums: vec![0; out_width * channels],
            rows: 0,
            pushed: 0,
            out: Vec::with_capacity(out_width * out_height * channels),
        }
    }

    /// The bytes a shrinker of this shape holds: the reduced image and one row of sums.
    pub(super) fn bytes(width: u32, height: u32, channels: usize, fx: u32, fy: u32) -> u64 {
        let (ow, oh) = (
            u64::from(width.div_ceil(fx.max(1))),
            u64::from(height.div_ceil(fy.max(1))),
        );
        ow * oh * channels as u64 + ow * channels as u64 * 4
    }

    /// The reduced size.
    pub(super) fn out_size(&self) -> (u32, u32) {
        (self.out_width as u32, self.out_height as u32)
    }

    /// Adds the next row (`width` × `channels` bytes; a longer one is cut, a shorter one is
    /// ignored). Rows past `height` are ignored.
    pub(super) fn push_row(&mut self, row: &[u8]) {
        let len = self.width * self.channels;
        if row.len() < len || self.pushed >= self.height {
            return;
        }
        let row = &row[..len];
        if self.fx == 1 && self.fy == 1 {
            self.out.extend_from_slice(row);
        } else {
            match self.channels {
                1 => self.add::<1>(row),
                2 => self.add::<2>(row),
                3 => self.add::<3>(row),
                _ => self.add::<4>(row),
            }
            self.rows += 1;
            if self.rows == self.fy || self.pushed + 1 == self.height {
                self.emit();
            }
        }
        self.pushed += 1;
    }

    fn add<const C: usize>(&mut self, row: &[u8]) {
        let alpha = C == 2 || C == 4;
        for (group, sums) in row.chunks(self.fx * C).zip(self.sums.chunks_exact_mut(C)) {
            for px in group.chunks_exact(C) {
                if alpha {
                    let a = u32::from(px[C - 1]);
                    for c in 0..C - 1 {
                        sums[c] += u32::from(px[c]) * a;
                    }
                    sums[C - 1] += a;
                } else {
                    for c in 0..C {
                        sums[c] += u32::from(px[c]);
                    }
                }
            }
        }
    }

    /// Writes the output row the sums hold and clears them.
    fn emit(&mut self) {
        let c = self.channels;
        let alpha = c == 2 || c == 4;
        for (x, sums) in self.sums.chunks_exact_mut(c).enumerate() {
            let columns = (self.width - x * self.fx).min(self.fx) as u32;
            let count = columns * self.rows as u32;
            if alpha {
                let a = sums[c - 1];
                for &s in &sums[..c - 1] {
                    self.out
                        .push((s + a / 2).checked_div(a).map_or(0, |v| v as u8));
                }
                self.out.push(((a + count / 2) / count) as u8);
            } else {
                for &s in sums.iter() {
                    self.out.push(((s + count / 2) / count) as u8);
                }
            }
            sums.fill(0);
        }
        self.rows = 0;
    }

    /// The reduced image, `out_size()` pixels of `channels` bytes; rows never pushed (a source
    /// cut short) are zero.
    pub(super) fn finish(mut self) -> Vec<u8> {
        if self.rows > 0 {
            self.emit();
        }
        self.out
            .resize(self.out_width * self.out_height * self.channels, 0);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factors_leave_twice_the_output() {
        assert_eq!(shrink_factor(5120, 800.0), 3);
        assert_eq!(shrink_factor(1600, 800.0), 1);
        assert_eq!(shrink_factor(100, 800.0), 1);
        assert_eq!(shrink_factor(60_000, 1.0), MAX_FACTOR);
    }

    #[test]
    fn grey_is_averaged_including_the_ragged_edges() {
        // 5 × 3 grey, reduced by 2 × 2: output 3 × 2
        let rows: [[u8; 5]; 3] = [
            [0, 10, 20, 30, 40],
            [10, 20, 30, 40, 50],
            [100, 100, 100, 100, 200],
        ];
        let mut s = Shrinker::new(5, 3, 1, 2, 2);
        for r in &rows {
            s.push_row(r);
        }
        assert_eq!(s.out_size(), (3, 2));
        assert_eq!(s.finish(), [10, 30, 45, 100, 100, 200]);
    }

    #[test]
    fn colour_is_weighted_by_alpha() {
        // a red opaque pixel beside a transparent black one: the average is red, half opaque
        let mut s = Shrinker::new(2, 1, 4, 2, 1);
        s.push_row(&[255, 0, 0, 255, 0, 0, 0, 0]);
        assert_eq!(s.finish(), [255, 0, 0, 128]);
    }

    #[test]
    fn factor_one_copies_and_a_short_source_leaves_zeros() {
        let mut s = Shrinker::new(2, 2, 3, 1, 1);
        s.push_row(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(s.finish(), [1, 2, 3, 4, 5, 6, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            Shrinker::bytes(5120, 2880, 4, 3, 3),
            1707 * 960 * 4 + 1707 * 16
        );
    }
}
