//! PNG: the `png` crate, row by row into a box [`Shrinker`] for a non-interlaced image (two rows
//! held at full size, the reduced image kept); an interlaced one (Adam7 rows arrive in seven
//! passes) is decoded whole, as the plan reserved. Palette, grey and 16-bit images come out as
//! 8-bit grey, grey + alpha, RGB or RGBA. Checksums are not verified, as libvips and imgproxy do
//! not refuse a PNG for a bad CRC or Adler-32 (the pixels are what is read either way); text
//! chunks are skipped, and what the decoder buffers besides pixels (the ICC profile it inflates,
//! `eXIf`, unknown chunks' data) is held to [`CHUNK_BYTES`]. An APNG is read as its default
//! image.

use std::time::Instant;

use super::{ICC_PROFILE_MAX_BYTES, Pixels, Still, check_deadline, undecodable};
use crate::transform::TransformError;
use crate::transform::shrink::{self, Shrinker};
use crate::transform::source::SourceReader;

/// What the png crate may buffer besides pixels: an ICC profile of up to
/// [`ICC_PROFILE_MAX_BYTES`] inflated, and as much again for everything else. An `iCCP` chunk
/// that inflates past it is ignored (the image decodes, without a profile); other chunks past it
/// fail the decode.
pub(crate) const CHUNK_BYTES: usize = 2 * ICC_PROFILE_MAX_BYTES;

/// Decodes the PNG `reader` holds, reduced for `needed` (stored orientation). Checks `deadline`
/// between rows.
///
/// # Errors
/// [`TransformError::Undecodable`] for what the png crate cannot decode, or whose ancillary
/// chunks pass [`CHUNK_BYTES`]; [`TransformError::TimedOut`] past `deadline`.
pub(crate) fn decode(
    reader: SourceReader,
    needed: (f64, f64),
    deadline: Instant,
) -> Result<Still, TransformError> {
    let mut decoder = png::Decoder::new_with_limits(reader, png::Limits { bytes: CHUNK_BYTES });
    decoder.set_transformations(png::Transformations::normalize_to_color8());
    decoder.ignore_checksums(true);
    decoder.set_ignore_text_chunk(true);
    let mut png = decoder.read_info().map_err(|e| undecodable("png", e))?;
    let info = png.info();
    let (width, height, interlaced) = (info.width, info.height, info.interlaced);
    let icc_profile = info
        .icc_profile
        .as_ref()
        .filter(|p| p.len() <= ICC_PROFILE_MAX_BYTES)
        .map(|p| p.to_vec());
    let channels = png.output_color_type().0.samples();
    let mut shrinker = Shrinker::new(
        width,
        height,
        channels,
        shrink::shrink_factor(width, needed.0),
        shrink::shrink_factor(height, needed.1),
    );
    if interlaced {
        let size = png
            .output_buffer_size()
            .ok_or_else(|| TransformError::Undecodable("png: too large".into()))?;
        let mut whole = vec![0u8; size];
        png.next_frame(&mut whole)
            .map_err(|e| undecodable("png", e))?;
        check_deadline(deadline)?;
        let stride = width as usize * channels;
        for row in whole.chunks_exact(stride) {
            shrinker.push_row(row);
        }
    } else {
        let mut rows = 0u32;
        while let Some(row) = png.next_row().map_err(|e| undecodable("png", e))? {
            shrinker.push_row(row.data());
            rows += 1;
            if rows.is_multiple_of(64) {
                check_deadline(deadline)?;
            }
        }
    }
    let (w, h) = shrinker.out_size();
    Ok(Still {
        pixels: Pixels {
            data: shrinker.finish(),
            width: w,
            height: h,
            channels,
        },
        icc_profile,
    })
}

/// The bytes the png crate holds while decoding a `width` × `height` PNG of up to 8 bytes per
/// pixel (16-bit RGBA) row by row: two rows at full depth and one converted, its inflater's
/// window and buffers, and [`CHUNK_BYTES`]; for an interlaced one, the whole image (8-bit
/// output) as well.
pub(crate) fn working_bytes(width: u32, height: u32, interlaced: bool) -> u64 {
    let row = u64::from(width) * 8 + 1;
    let inflate = 256 << 10;
    let whole = if interlaced {
        u64::from(width) * u64::from(height) * 4
    } else {
        0
    };
    3 * row + inflate + CHUNK_BYTES as u64 + whole
}
