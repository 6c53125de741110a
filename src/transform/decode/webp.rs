//! Still WebP: libwebp's incremental decoder, fed the source as it arrives, scaled on decode by
//! libwebp's own scaler to [`shrink::HEADROOM`] × the output (libvips does the same through
//! `WebPDecode`'s `use_scaling`). A lossy image holds a few rows of macroblocks and its alpha
//! plane; a lossless one libwebp decodes whole before it scales (reserved by the plan). The ICC
//! profile is read from the header bytes the plan probed.

use std::io::BufRead;
use std::time::Instant;

use super::{Pixels, Still, check_deadline};
use crate::transform::TransformError;
use crate::transform::ffi::{Features, ScaledDecoder};
use crate::transform::shrink;
use crate::transform::source::SourceReader;

/// The size libwebp scales a `width` × `height` image to for `needed`: [`shrink::HEADROOM`] ×
/// `needed` on each side, never larger than the image.
pub(crate) fn scaled_size(width: u32, height: u32, needed: (f64, f64)) -> (u32, u32) {
    let side =
        |full: u32, need: f64| ((need * shrink::HEADROOM).ceil() as u32).clamp(1, full.max(1));
    (side(width, needed.0), side(height, needed.1))
}

/// Decodes the still WebP `reader` holds (its header says `features`), scaled for `needed`.
///
/// # Errors
/// [`TransformError::Undecodable`] for a broken or truncated bitstream,
/// [`TransformError::TimedOut`] past `deadline`.
pub(crate) fn decode(
    mut reader: SourceReader,
    features: Features,
    needed: (f64, f64),
    icc_profile: Option<Vec<u8>>,
    deadline: Instant,
) -> Result<Still, TransformError> {
    let (width, height) = scaled_size(features.width, features.height, needed);
    let channels = if features.has_alpha { 4 } else { 3 };
    let mut decoder =
        ScaledDecoder::new((features.width, features.height), (width, height), channels)
            .map_err(|e| TransformError::Undecodable(e.to_string()))?;
    let mut done = false;
    while !done {
        check_deadline(deadline)?;
        let n = {
            let chunk = reader
                .fill_buf()
                .map_err(|e| super::undecodable("webp", e))?;
            if chunk.is_empty() {
                break;
            }
            done = decoder
                .append(chunk)
                .map_err(|e| TransformError::Undecodable(e.to_string()))?;
            chunk.len()
        };
        reader.consume(n);
    }
    if !done {
        return Err(TransformError::Undecodable(
            "webp: the file ends before the image does".into(),
        ));
    }
    let (data, channels) = decoder.into_pixels();
    Ok(Still {
        pixels: Pixels {
            data,
            width,
            height,
            channels,
        },
        icc_profile,
    })
}

/// The bytes libwebp holds while decoding a `width` × `height` WebP of `source_bytes` to a
/// scaled output: the compressed data it keeps (at most all of it), its row caches and scaler,
/// the alpha plane, and for a lossless bitstream the whole image as 32-bit pixels (libwebp's
/// VP8L decoder works on all of it), twice for its transforms' scratch.
pub(crate) fn working_bytes(width: u32, height: u32, source_bytes: u64, lossless: bool) -> u64 {
    let (w, h) = (u64::from(width), u64::from(height));
    let rows = w * 4 * 48 + (1 << 20);
    let alpha = w * h;
    let whole = if lossless { w * h * 4 * 2 } else { 0 };
    source_bytes + rows + alpha + whole
}
