//! The pipeline's last step: an image written in the output format. JPEG with MozJPEG as sharp
//! writes it by default (libjpeg-turbo's baseline settings, 4:2:0 chroma, optimised Huffman
//! tables); PNG with the `image` crate; lossy WebP with libwebp (`encode/webp.rs`); AVIF with
//! ravif in a build with the `avif` feature (`encode/avif.rs`). The source's ICC profile goes
//! onto the output as it is (pixels are not converted).

#[cfg(feature = "avif")]
mod avif;
pub(crate) mod webp;

use std::panic::{AssertUnwindSafe, catch_unwind};

use image::codecs::png::PngEncoder;
use image::{DynamicImage, ImageEncoder, ImageFormat};

use super::{DEFAULT_QUALITY, Output, Params, TransformError};

/// `image` written as `format` (JPEG and WebP at `params.quality`), with `icc_profile`.
///
/// # Errors
/// [`TransformError::Encode`].
pub(super) fn encode(
    image: DynamicImage,
    format: ImageFormat,
    params: &Params,
    icc_profile: Option<Vec<u8>>,
) -> Result<Output, TransformError> {
    let (width, height) = (image.width(), image.height());
    let quality = params.quality.unwrap_or(DEFAULT_QUALITY);
    let (bytes, content_type) = match format {
        ImageFormat::Jpeg => (jpeg(image, quality, icc_profile.as_deref())?, "image/jpeg"),
        #[cfg(feature = "avif")]
        ImageFormat::Avif => (avif::encode(&image, quality)?, "image/avif"),
        ImageFormat::WebP => (
            webp::encode_lossy(&image, quality, icc_profile.as_deref())?,
            "image/webp",
        ),
        _ => (png(&image, icc_profile)?, "image/png"),
    };
    Ok(Output {
        bytes,
        content_type,
        width,
        height,
        frames: 1,
    })
}

/// JPEG as libvips (and so sharp) writes it: MozJPEG reset to libjpeg-turbo's baseline
/// settings (its JCP_FASTEST profile: the standard quantisation tables, no trellis), 4:2:0
/// chroma subsampling, Huffman tables optimised for the image. Grey stays grey; alpha is
/// dropped (JPEG has none).
fn jpeg(
    image: DynamicImage,
    quality: u8,
    icc_profile: Option<&[u8]>,
) -> Result<Vec<u8>, TransformError> {
    let (width, height) = (image.width() as usize, image.height() as usize);
    let (pixels, space) = match image {
        DynamicImage::ImageLuma8(grey) => (grey.into_raw(), mozjpeg::ColorSpace::JCS_GRAYSCALE),
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => (
            image.to_luma8().into_raw(),
            mozjpeg::ColorSpace::JCS_GRAYSCALE,
        ),
        DynamicImage::ImageRgb8(rgb) => (rgb.into_raw(), mozjpeg::ColorSpace::JCS_RGB),
        other => (other.to_rgb8().into_raw(), mozjpeg::ColorSpace::JCS_RGB),
    };
    let written = catch_unwind(AssertUnwindSafe(|| -> std::io::Result<Vec<u8>> {
        let mut compress = mozjpeg::Compress::new(space);
        compress.set_fastest_defaults();
        compress.set_size(width, height);
        compress.set_quality(f32::from(quality));
        compress.set_optimize_coding(true);
        if space == mozjpeg::ColorSpace::JCS_RGB {
            compress.set_chroma_sampling_pixel_sizes((2, 2), (2, 2));
        }
        let mut started = compress.start_compress(Vec::with_capacity(pixels.len() / 8))?;
        if let Some(icc) = icc_profile.filter(|p| !p.is_empty()) {
            // APP2 "ICC_PROFILE" segments numbered from 1 (ICC.1 Annex B; the mozjpeg crate's
            // own writer numbers them from 0, which readers refuse)
            let chunks = icc.chunks(65_519);
            let count = chunks.len().min(255) as u8;
            for (i, chunk) in chunks.take(255).enumerate() {
                let mut segment = Vec::with_capacity(chunk.len() + 14);
                segment.extend_from_slice(b"ICC_PROFILE\0");
                segment.extend_from_slice(&[i as u8 + 1, count]);
                segment.extend_from_slice(chunk);
                started.write_marker(mozjpeg::Marker::APP(2), &segment);
            }
        }
        started.write_scanlines(&pixels)?;
        started.finish()
    }));
    match written {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => Err(TransformError::Encode(format!("jpeg: {e}"))),
        Err(_) => Err(TransformError::Encode("jpeg: libjpeg failed".into())),
    }
}

fn png(image: &DynamicImage, icc_profile: Option<Vec<u8>>) -> Result<Vec<u8>, TransformError> {
    let mut bytes = Vec::new();
    let mut encoder = PngEncoder::new(&mut bytes);
    if let Some(icc) = icc_profile {
        encoder
            .set_icc_profile(icc)
            .map_err(|e| TransformError::Encode(e.to_string()))?;
    }
    image
        .write_with_encoder(encoder)
        .map_err(|e| TransformError::Encode(e.to_string()))?;
    Ok(bytes)
}

/// The bytes encoding a `width` × `height` output as `format` holds besides the image: JPEG's
/// whole-image coefficients (optimised Huffman tables need them all before writing) and the
/// file; WebP's YUV picture, its analysis and the file; PNG's filtered rows and the file.
pub(super) fn working_bytes(width: u32, height: u32, format: ImageFormat) -> u64 {
    let pixels = u64::from(width) * u64::from(height);
    match format {
        ImageFormat::Jpeg => pixels * 3 + pixels * 3,
        ImageFormat::WebP => pixels * 12,
        _ => pixels * 10,
    }
}
