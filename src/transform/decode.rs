//! The pipeline's first step: a source decoded, reduced while it decodes where the format
//! allows (`shrink.rs`), into 8-bit pixels with its ICC profile. One file per format:
//! `decode/jpeg.rs` (MozJPEG, scanlines, DCT scaling), `decode/png.rs` (rows), `decode/gif.rs`
//! (frames composited row by row), `decode/webp.rs` (libwebp, incremental and scaled);
//! `decode/jpeg_scans.rs` counts a JPEG's scans as libjpeg reads them.
//! Animations are `animate.rs`'s.

pub(super) mod gif;
pub(super) mod jpeg;
mod jpeg_scans;
pub(super) mod png;
pub(super) mod webp;

use std::time::Instant;

use image::{DynamicImage, GrayAlphaImage, GrayImage, RgbImage, RgbaImage};

use super::TransformError;
use super::source::{ReadLimit, read_limit};

/// The largest ICC profile carried over to an output, in bytes: real profiles are a few
/// kilobytes (sRGB, Display P3) to a few hundred (printer profiles); a larger one is dropped,
/// never copied, so no source can make a small image's output megabytes long.
pub(crate) const ICC_PROFILE_MAX_BYTES: usize = 1 << 20;

/// Decoded pixels: `width` × `height`, `channels` 8-bit samples each (1 grey, 2 grey and
/// alpha, 3 RGB, 4 RGBA), rows top to bottom.
pub struct Pixels {
    pub data: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub channels: usize,
}

impl Pixels {
    /// As an `image` crate image.
    ///
    /// # Errors
    /// [`TransformError::Undecodable`] when the data does not fill the size (a decoder bug).
    pub fn into_image(self) -> Result<DynamicImage, TransformError> {
        let (w, h) = (self.width, self.height);
        let image = match self.channels {
            1 => GrayImage::from_raw(w, h, self.data).map(DynamicImage::ImageLuma8),
            2 => GrayAlphaImage::from_raw(w, h, self.data).map(DynamicImage::ImageLumaA8),
            3 => RgbImage::from_raw(w, h, self.data).map(DynamicImage::ImageRgb8),
            _ => RgbaImage::from_raw(w, h, self.data).map(DynamicImage::ImageRgba8),
        };
        image.ok_or_else(|| TransformError::Undecodable("decoded pixels of the wrong size".into()))
    }
}

/// A still image, decoded.
pub struct Still {
    pub pixels: Pixels,
    /// Its ICC profile, when it has one of at most [`ICC_PROFILE_MAX_BYTES`].
    pub icc_profile: Option<Vec<u8>>,
}

/// [`TransformError::TimedOut`] once `deadline` has passed.
pub(crate) fn check_deadline(deadline: Instant) -> Result<(), TransformError> {
    if Instant::now() >= deadline {
        Err(TransformError::TimedOut)
    } else {
        Ok(())
    }
}

/// A decoder's error as a [`TransformError`]: a read limit it hit (the deadline, the source's
/// size, the origin failing) as such, anything else as [`TransformError::Undecodable`].
pub(crate) fn undecodable(format: &str, e: impl std::error::Error + 'static) -> TransformError {
    match read_limit(&e) {
        Some(limit) => TransformError::from(limit),
        None => TransformError::Undecodable(format!("{format}: {e}")),
    }
}

impl From<ReadLimit> for TransformError {
    fn from(limit: ReadLimit) -> Self {
        match limit {
            ReadLimit::Deadline => TransformError::TimedOut,
            ReadLimit::TooLarge => TransformError::SourceTooLarge,
            ReadLimit::Failed => TransformError::SourceFailed,
        }
    }
}

/// A JPEG's ICC profile from its header bytes: the `APP2` `ICC_PROFILE` segments before the
/// first scan, put together in their order; `None` when there is none, a segment is missing,
/// or it is over [`ICC_PROFILE_MAX_BYTES`].
pub(super) fn jpeg_icc_profile(header: &[u8]) -> Option<Vec<u8>> {
    let mut chunks: Vec<(u8, &[u8])> = Vec::new();
    let mut count = 0u8;
    let mut at = 2;
    // every step moves forward: bounded by the header's length
    while at + 4 <= header.len() {
        if header[at] != 0xFF {
            return None;
        }
        let code = header[at + 1];
        if code == 0xFF {
            at += 1;
            continue;
        }
        if matches!(code, 0xD0..=0xD7 | 0x01) {
            at += 2;
            continue;
        }
        if code == 0xDA || code == 0xD9 {
            break;
        }
        let len = usize::from(u16::from_be_bytes([header[at + 2], header[at + 3]]));
        let segment = header.get(at + 4..at + 2 + len)?;
        if code == 0xE2 && segment.len() > 14 && segment.starts_with(b"ICC_PROFILE\0") {
            count = segment[13];
            chunks.push((segment[12], &segment[14..]));
            let total: usize = chunks.iter().map(|(_, c)| c.len()).sum();
            if total > ICC_PROFILE_MAX_BYTES {
                return None;
            }
        }
        at += 2 + len.max(2);
    }
    if chunks.is_empty() || chunks.len() != usize::from(count) {
        return None;
    }
    chunks.sort_by_key(|(seq, _)| *seq);
    if chunks
        .iter()
        .enumerate()
        .any(|(i, (seq, _))| usize::from(*seq) != i + 1)
    {
        return None;
    }
    Some(
        chunks
            .into_iter()
            .flat_map(|(_, c)| c.iter().copied())
            .collect(),
    )
}

/// A WebP's ICC profile from its header bytes: the `ICCP` chunk of an extended file, when it
/// is within them and at most [`ICC_PROFILE_MAX_BYTES`].
pub(super) fn webp_icc_profile(header: &[u8]) -> Option<Vec<u8>> {
    if header.get(12..16)? != b"VP8X" {
        return None;
    }
    let mut at = 12;
    // each chunk is at least 8 bytes: bounded by the header's length
    while at + 8 <= header.len() {
        let kind = &header[at..at + 4];
        let len = u32::from_le_bytes(header[at + 4..at + 8].try_into().ok()?) as usize;
        if kind == b"ICCP" {
            return (len <= ICC_PROFILE_MAX_BYTES)
                .then(|| header.get(at + 8..at + 8 + len).map(<[u8]>::to_vec))
                .flatten();
        }
        if matches!(kind, b"VP8 " | b"VP8L" | b"ANMF" | b"ALPH") {
            return None;
        }
        at = at.checked_add(8 + len + (len & 1))?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app2(seq: u8, count: u8, data: &[u8]) -> Vec<u8> {
        let mut seg = vec![0xFF, 0xE2];
        seg.extend_from_slice(&((data.len() + 16) as u16).to_be_bytes());
        seg.extend_from_slice(b"ICC_PROFILE\0");
        seg.extend_from_slice(&[seq, count]);
        seg.extend_from_slice(data);
        seg
    }

    #[test]
    fn a_jpeg_profile_is_put_together_in_order_or_not_at_all() {
        let mut jpeg = vec![0xFF, 0xD8];
        jpeg.extend(app2(2, 2, b"world"));
        jpeg.extend(app2(1, 2, b"hello "));
        jpeg.extend([0xFF, 0xDA, 0, 2]);
        assert_eq!(
            jpeg_icc_profile(&jpeg).as_deref(),
            Some(&b"hello world"[..])
        );
        let mut missing = vec![0xFF, 0xD8];
        missing.extend(app2(2, 2, b"world"));
        assert_eq!(jpeg_icc_profile(&missing), None);
        assert_eq!(jpeg_icc_profile(&[0xFF, 0xD8, 0xFF]), None);
    }
}
