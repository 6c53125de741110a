//! JPEG: MozJPEG's libjpeg API, scanline by scanline from the source as it arrives, scaled in
//! the DCT domain by n/8 (the smallest n that leaves [`shrink::HEADROOM`] × the output), then a
//! box [`Shrinker`] for the rest. A baseline JPEG holds one band of scanlines at a time; a
//! progressive one holds libjpeg's coefficients of the whole image (reserved by the plan), as
//! every progressive decoder must.
//!
//! libjpeg reports a fatal error by unwinding (the `mozjpeg` crate's error manager): caught here
//! and turned into [`TransformError::Undecodable`]. Its warnings (a truncated file, stray bytes
//! before a marker) are not errors, as with libvips: the image decodes to its end, the missing
//! part grey.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

use mozjpeg::{ColorSpace, Decompress};

use super::jpeg_scans::{MAX_SCANS, Scans};
use super::{Pixels, Still, check_deadline, undecodable};
use crate::transform::TransformError;
use crate::transform::shrink::{self, Shrinker};
use crate::transform::source::SourceReader;

/// Scanlines read per call: libjpeg produces at most one iMCU row (16 lines) at a time anyway.
const BAND_ROWS: usize = 16;

/// The n of the n/8 DCT scaling for a `width` × `height` JPEG resized to `needed` (stored
/// orientation): the smallest n (1–8) that leaves [`shrink::HEADROOM`] × `needed` on both sides.
/// libjpeg rounds a scaled side up: n/8 of `w` is `ceil(w × n / 8)`.
pub(crate) fn scale_numerator(width: u32, height: u32, needed: (f64, f64)) -> u8 {
    (1..=8u8)
        .find(|&n| {
            let (w, h) = scaled_size(width, height, n);
            f64::from(w) >= shrink::HEADROOM * needed.0
                && f64::from(h) >= shrink::HEADROOM * needed.1
        })
        .unwrap_or(8)
}

/// The size of an n/8 decode of a `width` × `height` JPEG.
pub(crate) fn scaled_size(width: u32, height: u32, n: u8) -> (u32, u32) {
    let scale = |v: u32| (u64::from(v) * u64::from(n)).div_ceil(8) as u32;
    (scale(width), scale(height))
}

/// Decodes the JPEG `reader` holds, reduced for `needed` (stored orientation), into 8-bit grey
/// or RGB (CMYK and YCCK converted, as Adobe writes them: inverted); `icc_profile` is the one
/// read from its header. Checks `deadline` between bands, and (through the reader) before each
/// scan of a progressive JPEG.
///
/// # Errors
/// [`TransformError::Undecodable`] for what libjpeg cannot decode, [`TransformError::TimedOut`]
/// past `deadline`, [`TransformError::TooManyScans`] for more than [`MAX_SCANS`] scans; a
/// source read that failed (its limit, the origin) is left to the caller to tell (the reader
/// records it).
pub(crate) fn decode(
    reader: SourceReader,
    needed: (f64, f64),
    icc_profile: Option<Vec<u8>>,
    deadline: Instant,
) -> Result<Still, TransformError> {
    let (reader, too_many_scans) = Scans::new(reader);
    let decoded = catch_unwind(AssertUnwindSafe(move || {
        decode_rows(reader, needed, deadline)
    }));
    if too_many_scans.get() {
        return Err(TransformError::TooManyScans { max: MAX_SCANS });
    }
    match decoded {
        Ok(Ok(pixels)) => Ok(Still {
            pixels,
            icc_profile,
        }),
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("libjpeg failed");
            Err(TransformError::Undecodable(format!("jpeg: {message}")))
        }
    }
}

fn decode_rows(
    reader: Scans<SourceReader>,
    needed: (f64, f64),
    deadline: Instant,
) -> Result<Pixels, TransformError> {
    let mut decompress = Decompress::builder()
        .from_reader(reader)
        .map_err(|e| undecodable("jpeg", e))?;
    let (width, height) = (decompress.width() as u32, decompress.height() as u32);
    decompress.scale(scale_numerator(width, height, needed));
    let jpeg_colour = decompress.color_space();
    let (out_space, channels_in, channels) = match jpeg_colour {
        ColorSpace::JCS_GRAYSCALE => (ColorSpace::JCS_GRAYSCALE, 1, 1),
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => (ColorSpace::JCS_CMYK, 4, 3),
        _ => (ColorSpace::JCS_RGB, 3, 3),
    };
    let mut started = decompress
        .to_colorspace(out_space)
        .map_err(|e| undecodable("jpeg", e))?;
    let (scaled_width, scaled_height) = (started.width() as u32, started.height() as u32);
    let mut shrinker = Shrinker::new(
        scaled_width,
        scaled_height,
        channels,
        shrink::shrink_factor(scaled_width, needed.0),
        shrink::shrink_factor(scaled_height, needed.1),
    );
    let stride = scaled_width as usize * channels_in;
    let mut band = vec![0u8; stride * BAND_ROWS];
    let mut rgb = if channels_in == 4 {
        vec![0u8; scaled_width as usize * 3]
    } else {
        Vec::new()
    };
    let mut row = 0usize;
    while row < scaled_height as usize {
        check_deadline(deadline)?;
        let rows = BAND_ROWS.min(scaled_height as usize - row);
        let read = started
            .read_scanlines_into::<u8>(&mut band[..rows * stride])
            .map_err(|e| undecodable("jpeg", e))?;
        for line in read.chunks_exact(stride) {
            if channels_in == 4 {
                cmyk_to_rgb(line, &mut rgb);
                shrinker.push_row(&rgb);
            } else {
                shrinker.push_row(line);
            }
        }
        row += rows;
    }
    // what follows the last scanline (the end marker) need not be read: a truncated file that
    // decoded is kept as it is
    drop(started);
    let (w, h) = shrinker.out_size();
    Ok(Pixels {
        data: shrinker.finish(),
        width: w,
        height: h,
        channels,
    })
}

/// Adobe's CMYK (and YCCK, which libjpeg turns into it), stored inverted: R = C × K / 255.
fn cmyk_to_rgb(cmyk: &[u8], rgb: &mut [u8]) {
    for (px, out) in cmyk.chunks_exact(4).zip(rgb.chunks_exact_mut(3)) {
        let k = u32::from(px[3]);
        for c in 0..3 {
            out[c] = ((u32::from(px[c]) * k + 127) / 255) as u8;
        }
    }
}

/// The bytes libjpeg holds while decoding a `width` × `height` JPEG of `components` at n/8
/// (`n`): one band of output scanlines, and its own buffers (two iMCU rows of samples per
/// component at full width, Huffman tables); for a progressive JPEG also the coefficients of the
/// whole image, 64 two-byte coefficients per block: `blocks` of them (the probe's
/// `coefficient_blocks`), or when 0 a block per 8 × 8 pixels of every component.
pub(crate) fn working_bytes(
    width: u32,
    height: u32,
    components: u8,
    (progressive, blocks): (bool, u64),
    n: u8,
) -> u64 {
    let (w, h) = (u64::from(width), u64::from(height));
    let components = u64::from(components.max(1));
    let (sw, _) = scaled_size(width, height, n);
    let band = u64::from(sw) * 4 * BAND_ROWS as u64;
    let own = w * components * 2 * 16 + (64 << 10);
    let coefficients = match (progressive, blocks) {
        (false, _) => 0,
        (true, 0) => w.div_ceil(8) * 8 * h.div_ceil(8) * 8 * components * 2,
        (true, blocks) => blocks * 64 * 2,
    };
    band + own + coefficients
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scale_leaves_twice_the_output() {
        assert_eq!(scale_numerator(5120, 2880, (800.0, 450.0)), 3);
        assert_eq!(scaled_size(5120, 2880, 3), (1920, 1080));
        assert_eq!(scale_numerator(1600, 1000, (800.0, 500.0)), 8);
        assert_eq!(scale_numerator(1600, 1000, (100.0, 62.5)), 1);
        assert_eq!(scaled_size(1601, 1000, 1), (201, 125));
    }

    #[test]
    fn cmyk_is_inverted_adobe_cmyk() {
        let mut rgb = [0u8; 6];
        cmyk_to_rgb(&[255, 0, 255, 255, 0, 0, 0, 0], &mut rgb);
        assert_eq!(rgb, [255, 0, 255, 0, 0, 0]);
    }
}
