//! AVIF output (only in a build with the `avif` cargo feature): ravif, which encodes with
//! rav1e, pure Rust with its SIMD assembled by nasm.
//!
//! ravif 0.13 has no API for an ICC profile (only EXIF), so AVIF output does not carry the
//! source's profile: pixels are written as they are, which is right for sRGB sources.

use image::DynamicImage;

use crate::transform::TransformError;

/// rav1e's speed, 1 (slowest, smallest) to 10: a proxy encodes while a client waits, and at
/// ravif's default (5) a 320 × 240 image took about half a second here.
const SPEED: u8 = 8;

/// Encodes `image` as AVIF at `quality` (1–100; ravif's scale, applied to the alpha channel
/// too), with an alpha channel when the image has one, 8 bits per channel in.
///
/// # Errors
/// [`TransformError::Encode`] when ravif refuses.
pub fn encode(image: &DynamicImage, quality: u8) -> Result<Vec<u8>, TransformError> {
    let quality = f32::from(quality.clamp(1, 100));
    let encoder = ravif::Encoder::new()
        .with_quality(quality)
        .with_alpha_quality(quality)
        .with_speed(SPEED);
    let (width, height) = (image.width() as usize, image.height() as usize);
    let encoded = if image.color().has_alpha() {
        let pixels: Vec<ravif::RGBA8> = image
            .to_rgba8()
            .pixels()
            .map(|p| ravif::RGBA8::new(p[0], p[1], p[2], p[3]))
            .collect();
        encoder.encode_rgba(ravif::Img::new(pixels.as_slice(), width, height))
    } else {
        let pixels: Vec<ravif::RGB8> = image
            .to_rgb8()
            .pixels()
            .map(|p| ravif::RGB8::new(p[0], p[1], p[2]))
            .collect();
        encoder.encode_rgb(ravif::Img::new(pixels.as_slice(), width, height))
    };
    encoded
        .map(|e| e.avif_file)
        .map_err(|e| TransformError::Encode(format!("avif: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage, Rgba, RgbaImage};

    #[test]
    fn output_is_an_avif_file_with_and_without_alpha() {
        let opaque = DynamicImage::ImageRgb8(RgbImage::from_fn(48, 32, |x, y| {
            Rgb([x as u8 * 5, y as u8 * 7, 60])
        }));
        let clear = DynamicImage::ImageRgba8(RgbaImage::from_fn(48, 32, |x, _| {
            Rgba([200, 30, 30, x as u8 * 5])
        }));
        for image in [opaque, clear] {
            let bytes = encode(&image, 60).unwrap();
            // an ISO BMFF file whose brand is avif
            assert_eq!(&bytes[4..12], b"ftypavif");
        }
    }
}
