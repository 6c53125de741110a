//! JPEG decoding with DCT-domain shrink-on-load: libjpeg-turbo (through the `turbojpeg` crate,
//! vendored, built with cmake and nasm) decodes at 1/2, 1/4 or 1/8 of the stored size when the
//! target leaves room, as libvips and imgproxy do. Why libjpeg-turbo and not `jpeg-decoder`'s
//! `scale` or the `image` crate's zune-jpeg: the measurements in docs/transforms.md.
//!
//! Only pixel decoding lives here: the header check, the EXIF orientation and the ICC profile
//! are read by the caller through the `image` crate's decoder, and CMYK/YCCK JPEGs (which
//! libjpeg-turbo will not turn into RGB) are left to that decoder at full size.

use image::{DynamicImage, GrayImage, RgbImage};
use turbojpeg::{Colorspace, Decompressor, Image, PixelFormat, ScalingFactor};

use super::TransformError;

/// How much larger than the size it is resized to a shrunk-on-load image stays, at least, on
/// each side. A DCT-domain reduction is a box filter: with no headroom left, the resize after it
/// has nothing to smooth and edges alias. libvips' thumbnailer leaves 2× (imgproxy up to none);
/// measured on the corpus (docs/transforms.md), 2× keeps the 800-px output within 50 dB PSNR of
/// a full decode where none left 36–44 dB, and costs no measurable time on progressive JPEGs,
/// whose entropy decoding dominates at every scale.
pub const SHRINK_HEADROOM: u32 = 2;

/// libjpeg-turbo's limit on progressive scans per image (`TJPARAM_SCANLIMIT`): a JPEG of
/// thousands of tiny scans costs seconds to decode for a few kilobytes sent. libjpeg-turbo's
/// documentation suggests 500; real encoders write about ten.
const SCAN_LIMIT: u32 = 500;

/// The warnings libjpeg-turbo reports as failures (its `jerror.h` `JWRN_*` messages) although
/// the image was decoded to the end: a few stray bytes before a marker, a truncated file. The
/// decoders before it (zune-jpeg) accepted such files too, as libvips does by default.
const WARNINGS: [&str; 7] = [
    "Corrupt JPEG data",
    "Premature end of JPEG file",
    "Warning: unknown JFIF revision",
    "Inconsistent progression sequence",
    "Invalid SOS parameters for sequential JPEG",
    "Unknown Adobe color transform code",
    "Application transferred too many scanlines",
];

/// What a JPEG's header says, read by libjpeg-turbo without decoding pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Stored size in pixels, before EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// Whether libjpeg-turbo decodes it here (YCbCr, RGB or grey, lossy): CMYK, YCCK and
    /// lossless JPEGs are not, and go to the `image` crate's decoder at full size.
    pub scalable: bool,
}

/// Reads `source`'s JPEG header.
///
/// # Errors
/// [`TransformError::Undecodable`] when libjpeg-turbo finds no valid header.
pub fn header(source: &[u8]) -> Result<Header, TransformError> {
    let header = Decompressor::new()
        .and_then(|mut d| d.read_header(source))
        .map_err(undecodable)?;
    let scalable = !header.is_lossless
        && matches!(
            header.colorspace,
            Colorspace::YCbCr | Colorspace::RGB | Colorspace::Gray
        );
    Ok(Header {
        width: u32::try_from(header.width).map_err(|_| too_wide())?,
        height: u32::try_from(header.height).map_err(|_| too_wide())?,
        scalable,
    })
}

fn too_wide() -> TransformError {
    TransformError::Undecodable("jpeg: dimensions out of range".into())
}

/// The shrink-on-load denominator for a `stored` (width, height) JPEG that will be resized to
/// `needed` (width, height, in the stored orientation, fractional): the largest of 8, 4 and 2
/// that leaves the decoded image at least [`SHRINK_HEADROOM`] × `needed` on both sides, else 1.
/// libjpeg-turbo rounds a scaled side up: a 1/`d` decode of `w` is `ceil(w / d)` wide.
pub fn shrink_denominator(stored: (u32, u32), needed: (f64, f64)) -> u32 {
    let headroom = f64::from(SHRINK_HEADROOM);
    [8, 4, 2]
        .into_iter()
        .find(|&d| {
            f64::from(stored.0.div_ceil(d)) >= headroom * needed.0
                && f64::from(stored.1.div_ceil(d)) >= headroom * needed.1
        })
        .unwrap_or(1)
}

/// The size of a 1/`denominator` decode of a `width` × `height` JPEG.
pub fn scaled_size(width: u32, height: u32, denominator: u32) -> (u32, u32) {
    (width.div_ceil(denominator), height.div_ceil(denominator))
}

/// Decodes `source` (a JPEG whose [`header`] is `scalable`) at 1/`denominator` (1, 2, 4 or 8) of
/// its stored size, into 8-bit RGB, or grey for a grey JPEG; no orientation applied. The only
/// buffer that grows with the image besides libjpeg-turbo's own is the output, of exactly
/// [`scaled_size`] × 3 (grey: × 1) bytes.
///
/// # Errors
/// [`TransformError::Undecodable`] when libjpeg-turbo fails (a warning that still decoded the
/// whole image, such as a truncated file, is not a failure: see `WARNINGS`), or when `source` has
/// more than `SCAN_LIMIT` progressive scans.
pub fn decode(source: &[u8], denominator: u32) -> Result<DynamicImage, TransformError> {
    let mut decompressor = Decompressor::new().map_err(undecodable)?;
    let factor = ScalingFactor::new(1, denominator as usize);
    decompressor
        .set_scaling_factor(factor)
        .map_err(undecodable)?;
    decompressor
        .set_scan_limit(SCAN_LIMIT)
        .map_err(undecodable)?;
    let header = decompressor.read_header(source).map_err(undecodable)?;
    let grey = header.colorspace == Colorspace::Gray;
    let scaled = header.scaled(factor);
    let (format, channels) = if grey {
        (PixelFormat::GRAY, 1)
    } else {
        (PixelFormat::RGB, 3)
    };
    let len = scaled
        .width
        .checked_mul(scaled.height)
        .and_then(|n| n.checked_mul(channels))
        .ok_or_else(too_wide)?;
    let mut pixels = vec![0u8; len];
    let image = Image {
        pixels: pixels.as_mut_slice(),
        width: scaled.width,
        pitch: scaled.width * channels,
        height: scaled.height,
        format,
    };
    if let Err(e) = decompressor.decompress(source, image) {
        let message = e.to_string();
        let warning = message
            .strip_prefix("TurboJPEG error: ")
            .is_some_and(|m| WARNINGS.iter().any(|w| m.starts_with(w)));
        if !warning {
            return Err(undecodable(e));
        }
    }
    let (width, height) = (
        u32::try_from(scaled.width).map_err(|_| too_wide())?,
        u32::try_from(scaled.height).map_err(|_| too_wide())?,
    );
    let broken = || TransformError::Undecodable("jpeg: decoded buffer size mismatch".into());
    Ok(if grey {
        DynamicImage::ImageLuma8(GrayImage::from_raw(width, height, pixels).ok_or_else(broken)?)
    } else {
        DynamicImage::ImageRgb8(RgbImage::from_raw(width, height, pixels).ok_or_else(broken)?)
    })
}

fn undecodable(e: turbojpeg::Error) -> TransformError {
    TransformError::Undecodable(format!("jpeg: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Rgb};
    use std::io::Cursor;

    fn jpeg(image: DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    #[test]
    fn the_denominator_leaves_twice_the_target_on_both_sides() {
        // 5640 px to 800 px: 1/2 leaves 2820 (3.5x); 1/4 would leave 1410 (1.8x)
        assert_eq!(shrink_denominator((5640, 3172), (800.0, 450.0)), 2);
        assert_eq!(shrink_denominator((4000, 3000), (500.0, 375.0)), 4);
        assert_eq!(shrink_denominator((4000, 3000), (250.0, 187.5)), 8);
        assert_eq!(shrink_denominator((4000, 3000), (1000.0, 750.0)), 2);
        assert_eq!(shrink_denominator((4000, 3000), (1001.0, 750.0)), 1);
        // a stretched target: each side on its own
        assert_eq!(shrink_denominator((4000, 3000), (250.0, 1000.0)), 1);
        assert_eq!(shrink_denominator((4000, 3000), (250.0, 700.0)), 2);
        // larger than the source
        assert_eq!(shrink_denominator((100, 100), (300.0, 300.0)), 1);
        // rounding up: 1/8 of 801 is 101 wide
        assert_eq!(shrink_denominator((801, 801), (50.5, 50.5)), 8);
    }

    #[test]
    fn decodes_at_each_scale_to_the_rounded_up_size() {
        let rgb = RgbImage::from_fn(203, 101, |x, y| Rgb([x as u8, y as u8, 200]));
        let source = jpeg(DynamicImage::ImageRgb8(rgb));
        assert_eq!(
            header(&source).unwrap(),
            Header {
                width: 203,
                height: 101,
                scalable: true
            }
        );
        for (d, size) in [
            (1, (203, 101)),
            (2, (102, 51)),
            (4, (51, 26)),
            (8, (26, 13)),
        ] {
            let image = decode(&source, d).unwrap();
            assert_eq!((image.width(), image.height()), size, "1/{d}");
            assert_eq!(scaled_size(203, 101, d), size);
            assert!(matches!(image, DynamicImage::ImageRgb8(_)));
            // the colour survives: blue channel near 200 everywhere
            let p = image.to_rgb8().get_pixel(size.0 / 2, size.1 / 2).0;
            assert!((190..=210).contains(&p[2]), "1/{d}: {p:?}");
        }
    }

    #[test]
    fn grey_jpegs_decode_grey() {
        let grey = GrayImage::from_fn(64, 64, |x, _| image::Luma([x as u8 * 4]));
        let source = jpeg(DynamicImage::ImageLuma8(grey));
        assert!(header(&source).unwrap().scalable);
        let image = decode(&source, 4).unwrap();
        assert!(matches!(image, DynamicImage::ImageLuma8(_)));
        assert_eq!((image.width(), image.height()), (16, 16));
    }

    #[test]
    fn cmyk_jpegs_are_left_to_the_image_crate() {
        let cmyk = vec![30u8; 32 * 16 * 4];
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_subsamp(turbojpeg::Subsamp::None).unwrap();
        let source = compressor
            .compress_to_vec(Image {
                pixels: cmyk.as_slice(),
                width: 32,
                pitch: 32 * 4,
                height: 16,
                format: PixelFormat::CMYK,
            })
            .unwrap();
        let header = header(&source).unwrap();
        assert!(!header.scalable);
        assert_eq!((header.width, header.height), (32, 16));
        let decoded = image::load_from_memory_with_format(&source, ImageFormat::Jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (32, 16));
    }

    #[test]
    fn a_truncated_jpeg_still_decodes_as_the_image_crate_did() {
        let rgb = RgbImage::from_fn(64, 64, |x, y| Rgb([x as u8 * 3, y as u8 * 3, 7]));
        let source = jpeg(DynamicImage::ImageRgb8(rgb));
        let cut = &source[..source.len() * 2 / 3];
        let image = decode(cut, 2).unwrap();
        assert_eq!((image.width(), image.height()), (32, 32));
        assert!(decode(b"\xff\xd8\xff\xe0 not a jpeg", 1).is_err());
    }
}
