//! Lossy WebP output: libwebp's encoder (through the `webp` crate, whose C is built with cc) at
//! a quality, with an alpha channel when the image has one, and the source's ICC profile added
//! to the container here, since the crate has no API for it.
//!
//! Only encoding of still images lives here; decoding is `decode/webp.rs` and `ffi.rs`.

use image::DynamicImage;

use crate::transform::TransformError;

/// The RIFF container's `VP8X` flag for an `ICCP` chunk (WebP container spec, "Extended File
/// Format").
const VP8X_ICC: u8 = 0x20;
/// The `VP8X` flag for an alpha channel.
const VP8X_ALPHA: u8 = 0x10;

/// Encodes `image` as a lossy WebP at `quality` (0–100, libwebp's scale), with the ICC profile
/// `icc_profile` when there is one.
///
/// An image with an alpha channel keeps it (libwebp writes an `ALPH` chunk, compressed
/// losslessly, and leaves it out when every pixel is opaque); other images are encoded as RGB.
/// Grey images become RGB and 16-bit channels are reduced to 8 bits, as WebP has neither.
///
/// # Errors
/// [`TransformError::Encode`] when libwebp refuses (a side over 16 383 pixels, WebP's limit).
pub(crate) fn encode_lossy(
    image: &DynamicImage,
    quality: u8,
    icc_profile: Option<&[u8]>,
) -> Result<Vec<u8>, TransformError> {
    let (width, height) = (image.width(), image.height());
    let rgb;
    let rgba;
    let encoder = if image.color().has_alpha() {
        rgba = match image {
            DynamicImage::ImageRgba8(pixels) => std::borrow::Cow::Borrowed(pixels),
            other => std::borrow::Cow::Owned(other.to_rgba8()),
        };
        ::webp::Encoder::from_rgba(rgba.as_raw(), width, height)
    } else {
        rgb = match image {
            DynamicImage::ImageRgb8(pixels) => std::borrow::Cow::Borrowed(pixels),
            other => std::borrow::Cow::Owned(other.to_rgb8()),
        };
        ::webp::Encoder::from_rgb(rgb.as_raw(), width, height)
    };
    let encoded = encoder
        .encode_simple(false, f32::from(quality))
        .map_err(|e| TransformError::Encode(format!("webp: {e:?}")))?;
    let bytes = encoded.to_vec();
    Ok(match icc_profile {
        Some(icc) if !icc.is_empty() => with_icc_profile(&bytes, icc, width, height)?,
        _ => bytes,
    })
}

/// `webp` (a simple or extended WebP file, as libwebp writes them) with an `ICCP` chunk holding
/// `icc`: a simple file (`VP8 ` or `VP8L` alone) gains a `VP8X` header for a `width` × `height`
/// canvas; an extended one gets its ICC flag set. The chunk order is the container spec's:
/// `VP8X`, `ICCP`, then the rest as they were (`ALPH`, the bitstream).
///
/// # Errors
/// [`TransformError::Encode`] when `webp` is not a RIFF WebP file.
fn with_icc_profile(
    webp: &[u8],
    icc: &[u8],
    width: u32,
    height: u32,
) -> Result<Vec<u8>, TransformError> {
    let not_webp = || TransformError::Encode("webp: libwebp wrote no RIFF WebP header".into());
    if webp.len() < 20 || &webp[0..4] != b"RIFF" || &webp[8..12] != b"WEBP" {
        return Err(not_webp());
    }
    let chunks = &webp[12..];
    let mut out = Vec::with_capacity(webp.len() + icc.len() + 32);
    out.extend_from_slice(b"RIFF\0\0\0\0WEBP");
    let rest = if &chunks[0..4] == b"VP8X" {
        let mut vp8x = chunks[..18.min(chunks.len())].to_vec();
        if vp8x.len() < 18 {
            return Err(not_webp());
        }
        vp8x[8] |= VP8X_ICC;
        out.extend_from_slice(&vp8x);
        &chunks[18..]
    } else {
        // a lossless bitstream says in its header whether it uses alpha (bit 28 after the
        // signature byte); libwebp's lossy output with alpha is always extended already
        let alpha = &chunks[0..4] == b"VP8L"
            && chunks.len() >= 13
            && chunks[8] == 0x2f
            && u32::from_le_bytes([chunks[9], chunks[10], chunks[11], chunks[12]]) & (1 << 28) != 0;
        out.extend_from_slice(b"VP8X");
        out.extend_from_slice(&10u32.to_le_bytes());
        out.push(VP8X_ICC | if alpha { VP8X_ALPHA } else { 0 });
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&(width.saturating_sub(1)).to_le_bytes()[..3]);
        out.extend_from_slice(&(height.saturating_sub(1)).to_le_bytes()[..3]);
        chunks
    };
    let icc_len = u32::try_from(icc.len())
        .map_err(|_| TransformError::Encode("webp: ICC profile over 4 GiB".into()))?;
    out.extend_from_slice(b"ICCP");
    out.extend_from_slice(&icc_len.to_le_bytes());
    out.extend_from_slice(icc);
    if icc.len() % 2 == 1 {
        out.push(0);
    }
    out.extend_from_slice(rest);
    let riff_len = u32::try_from(out.len() - 8)
        .map_err(|_| TransformError::Encode("webp: output over 4 GiB".into()))?;
    out[4..8].copy_from_slice(&riff_len.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageDecoder, Rgb, RgbImage, Rgba, RgbaImage};

    fn is_webp(bytes: &[u8]) -> bool {
        bytes.len() > 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP"
    }

    fn gradient(width: u32, height: u32) -> RgbImage {
        RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 7) as u8, (y * 5) as u8, 128])
        })
    }

    #[test]
    fn lossy_output_is_a_riff_webp_of_the_same_size_and_smaller_at_lower_quality() {
        let image = DynamicImage::ImageRgb8(gradient(300, 200));
        let high = encode_lossy(&image, 90, None).unwrap();
        let low = encode_lossy(&image, 30, None).unwrap();
        assert!(is_webp(&high) && is_webp(&low));
        // lossy: a `VP8 ` bitstream, not `VP8L`
        assert_eq!(&high[12..16], b"VP8 ");
        assert!(low.len() < high.len(), "{} vs {}", low.len(), high.len());
        let decoded = image::load_from_memory_with_format(&high, image::ImageFormat::WebP).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (300, 200));
        assert!(!decoded.color().has_alpha());
    }

    #[test]
    fn alpha_is_kept() {
        let image = DynamicImage::ImageRgba8(RgbaImage::from_fn(64, 48, |x, _| {
            Rgba([200, 10, 10, if x < 32 { 0 } else { 255 }])
        }));
        let bytes = encode_lossy(&image, 80, None).unwrap();
        assert!(is_webp(&bytes));
        let decoded = image::load_from_memory_with_format(&bytes, image::ImageFormat::WebP)
            .unwrap()
            .to_rgba8();
        assert_eq!(decoded.dimensions(), (64, 48));
        assert_eq!(decoded.get_pixel(5, 5)[3], 0);
        assert_eq!(decoded.get_pixel(60, 5)[3], 255);
    }

    #[test]
    fn grey_images_are_encoded_as_rgb() {
        let image = DynamicImage::ImageLuma8(image::GrayImage::from_fn(40, 30, |x, _| {
            image::Luma([x as u8 * 6])
        }));
        let bytes = encode_lossy(&image, 80, None).unwrap();
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (40, 30));
    }

    #[test]
    fn the_icc_profile_is_carried_with_and_without_alpha() {
        let icc = b"not really a profile, but odd-sized".to_vec();
        assert_eq!(icc.len() % 2, 1);
        let opaque = DynamicImage::ImageRgb8(gradient(33, 17));
        let clear = DynamicImage::ImageRgba8(RgbaImage::from_fn(33, 17, |x, _| {
            Rgba([1, 2, 3, x as u8 * 7])
        }));
        for image in [opaque, clear] {
            let bytes = encode_lossy(&image, 80, Some(&icc)).unwrap();
            assert!(is_webp(&bytes));
            assert_eq!(&bytes[12..16], b"VP8X");
            let riff_len = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(riff_len, bytes.len() - 8);
            let mut decoder =
                image::codecs::webp::WebPDecoder::new(std::io::Cursor::new(&bytes)).unwrap();
            assert_eq!(decoder.dimensions(), (33, 17));
            assert_eq!(decoder.icc_profile().unwrap(), Some(icc.clone()));
            let has_alpha = decoder.color_type().has_alpha();
            assert_eq!(has_alpha, image.color().has_alpha());
            let decoded = DynamicImage::from_decoder(decoder).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (33, 17));
        }
    }
}
