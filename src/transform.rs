//! Image transforms for Supabase's render route: its parameters, the pipeline (header check →
//! decode → EXIF orientation → resize → encode) and the bounded pool it runs on, off the async
//! runtime.
//!
//! The pipeline refuses a decode bomb from its header alone: the dimensions are read before any
//! pixel memory is allocated, and a source over `[transform] max_source_pixels` is
//! [`TransformError::TooManyPixels`].

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, Limits};
use percent_encoding::percent_decode_str;
use tokio::sync::Semaphore;

use crate::config::TransformConfig;
use crate::error::ProxyError;

#[cfg(feature = "avif")]
mod avif;
mod jpeg;
mod probe;
mod webp;

pub use probe::{ImageInfo, is_animated, probe};

/// The png crate's limit (`png::Limits::bytes`, here through the image crate's
/// `Limits::max_alloc`) on what it buffers besides the pixels: ancillary chunks, the ICC profile
/// it inflates (an `iCCP` chunk of a few kilobytes can claim gigabytes), text. The png crate's own
/// default, 64 MiB; profiles are kilobytes to a few megabytes.
const PNG_CHUNK_BYTES: u64 = 64 << 20;

/// Supabase's default `quality`.
pub const DEFAULT_QUALITY: u8 = 80;

/// How the image is fitted to a `width` × `height` box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Fill the box, keeping the aspect ratio, cropping what overflows (centred).
    Cover,
    /// Fit inside the box, keeping the aspect ratio: the output may be smaller on one side
    /// (Supabase's `contain`, `/image-proxy`'s `inside`).
    Inside,
    /// Exactly the box, stretched.
    Fill,
    /// Exactly the box: the image fitted inside it, centred, on a transparent background (black
    /// when the image has no alpha channel; `/image-proxy`'s `contain`, as sharp's).
    Pad,
}

impl Fit {
    fn as_str(self) -> &'static str {
        match self {
            Fit::Cover => "cover",
            Fit::Inside => "inside",
            Fit::Fill => "fill",
            Fit::Pad => "pad",
        }
    }
}

/// An output format: asked for explicitly (`format=`), or negotiated from `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    /// Only in a build with the `avif` cargo feature.
    #[cfg(feature = "avif")]
    Avif,
}

impl Format {
    /// Its name in parameters and canonical keys: `jpeg`, `png`, `webp`, `avif`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
            #[cfg(feature = "avif")]
            Format::Avif => "avif",
        }
    }
}

/// The parameters of one render request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Target width in pixels, 1–`max_dimension`.
    pub width: Option<u32>,
    /// Target height in pixels, 1–`max_dimension`.
    pub height: Option<u32>,
    pub fit: Fit,
    /// JPEG and WebP quality, 20–100; `None` when not given (then [`DEFAULT_QUALITY`]).
    pub quality: Option<u8>,
    /// `download`: serve as an attachment, with this file name when one was given.
    pub download: Option<String>,
    /// The output format; `None` keeps the source's.
    pub format: Option<Format>,
    /// No format was fixed by the request (Supabase's render route without `format`,
    /// `/image-proxy`'s `format=auto` or none): the server picks one from `Accept` and the
    /// response varies by it.
    pub negotiate: bool,
}

impl Default for Params {
    /// No size, `cover`, the default quality, the source's format, inline.
    fn default() -> Self {
        Params {
            width: None,
            height: None,
            fit: Fit::Cover,
            quality: None,
            download: None,
            format: None,
            negotiate: false,
        }
    }
}

impl Params {
    /// Reads Supabase's render parameters from a query string: `width`, `height` (integers,
    /// clamped to 1–`max_dimension`), `resize` (`cover`, `contain`, `fill`), `quality` (20–100),
    /// `format` (`origin`, `webp`, and `avif` in a build with the `avif` feature; absent:
    /// negotiated from `Accept`) and `download` (present: attachment; a value other than `true`
    /// is the file name). Unknown parameters are ignored, as Supabase does.
    ///
    /// # Errors
    /// [`TransformError::BadParameter`] naming the parameter, for a value that is not an
    /// integer, a quality out of range, an unknown `resize` or `format`, or a parameter given
    /// twice.
    pub fn from_query(query: Option<&str>, max_dimension: u32) -> Result<Params, TransformError> {
        let mut params = Params {
            negotiate: true,
            ..Params::default()
        };
        let mut seen: Vec<String> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode_str(name).decode_utf8_lossy().into_owned();
            let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
            let known = matches!(
                name.as_str(),
                "width" | "height" | "resize" | "quality" | "format" | "download"
            );
            if known {
                first_time(&mut seen, &name)?;
            }
            let bad = |why: &str| TransformError::BadParameter(format!("{name}={value:?}: {why}"));
            match name.as_str() {
                "width" | "height" => {
                    let n = dimension(&value, max_dimension)
                        .ok_or_else(|| bad("want an integer number of pixels"))?;
                    if name == "width" {
                        params.width = Some(n);
                    } else {
                        params.height = Some(n);
                    }
                }
                "resize" => {
                    params.fit = match value.as_str() {
                        "cover" => Fit::Cover,
                        "contain" => Fit::Inside,
                        "fill" => Fit::Fill,
                        _ => return Err(bad("want cover, contain or fill")),
                    }
                }
                "quality" => {
                    params.quality =
                        Some(quality(&value).ok_or_else(|| bad("want an integer, 20-100"))?);
                }
                "format" => {
                    params.negotiate = false;
                    params.format = match value.as_str() {
                        "origin" => None,
                        "webp" => Some(Format::Webp),
                        #[cfg(feature = "avif")]
                        "avif" => Some(Format::Avif),
                        #[cfg(feature = "avif")]
                        _ => return Err(bad("want origin, webp or avif")),
                        #[cfg(not(feature = "avif"))]
                        _ => return Err(bad("want origin or webp (avif: not in this build)")),
                    };
                }
                "download" => {
                    params.download = Some(if value.is_empty() || value == "true" {
                        String::new()
                    } else {
                        value.clone()
                    });
                }
                _ => {}
            }
        }
        Ok(params)
    }

    /// Reads `/image-proxy`'s transform parameters: `w`, `h` (integers, clamped to
    /// 1–`max_dimension`), `fit` (`cover`, `contain`: padded to the box, `fill`, `inside`), `q`
    /// (20–100) and `format` (`auto` or absent: negotiated from `Accept`; `jpeg`, `png`,
    /// `webp`, and `avif` in a build with the `avif` feature). They may come before `url=`, or
    /// after an encoded one (a raw URL takes the rest of the query). `None` when there are
    /// none: the original is served.
    ///
    /// # Errors
    /// [`TransformError::BadParameter`] as [`Params::from_query`].
    pub fn from_image_proxy_query(
        query: Option<&str>,
        max_dimension: u32,
    ) -> Result<Option<Params>, TransformError> {
        let mut params = Params {
            negotiate: true,
            ..Params::default()
        };
        let mut any = false;
        let mut seen: Vec<String> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "url" {
                if crate::target::looks_raw(value) {
                    break;
                }
                continue;
            }
            if !matches!(name, "w" | "h" | "fit" | "q" | "format") {
                continue;
            }
            first_time(&mut seen, name)?;
            any = true;
            let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
            let bad = |why: &str| TransformError::BadParameter(format!("{name}={value:?}: {why}"));
            match name {
                "w" | "h" => {
                    let n = dimension(&value, max_dimension)
                        .ok_or_else(|| bad("want an integer number of pixels"))?;
                    if name == "w" {
                        params.width = Some(n);
                    } else {
                        params.height = Some(n);
                    }
                }
                "fit" => {
                    params.fit = match value.as_str() {
                        "cover" => Fit::Cover,
                        "contain" => Fit::Pad,
                        "fill" => Fit::Fill,
                        "inside" => Fit::Inside,
                        _ => return Err(bad("want cover, contain, fill or inside")),
                    }
                }
                "q" => {
                    params.quality =
                        Some(quality(&value).ok_or_else(|| bad("want an integer, 20-100"))?);
                }
                _ => {
                    (params.format, params.negotiate) = match value.as_str() {
                        "auto" => (None, true),
                        "jpeg" | "jpg" => (Some(Format::Jpeg), false),
                        "png" => (Some(Format::Png), false),
                        "webp" => (Some(Format::Webp), false),
                        #[cfg(feature = "avif")]
                        "avif" => (Some(Format::Avif), false),
                        #[cfg(feature = "avif")]
                        _ => return Err(bad("want auto, jpeg, png, webp or avif")),
                        #[cfg(not(feature = "avif"))]
                        _ => {
                            return Err(bad(
                                "want auto, jpeg, png or webp (avif: not in this build)",
                            ));
                        }
                    }
                }
            }
        }
        Ok(any.then_some(params))
    }

    /// Whether the output is the original, byte for byte: no size, quality or format asked for.
    pub fn is_original(&self) -> bool {
        self.width.is_none()
            && self.height.is_none()
            && self.quality.is_none()
            && self.format.is_none()
    }

    /// The parameters that shape the output, in one canonical spelling (for validators).
    pub fn canonical(&self) -> String {
        format!(
            "w={};h={};fit={};q={};f={}",
            self.width.map_or(0, |w| w),
            self.height.map_or(0, |h| h),
            self.fit.as_str(),
            self.quality.unwrap_or(DEFAULT_QUALITY),
            self.format.map_or("source", Format::as_str),
        )
    }
}

/// A `width` or `height` value: an integer, clamped to 1–`max_dimension`.
fn dimension(value: &str, max_dimension: u32) -> Option<u32> {
    let n: i64 = value.parse().ok()?;
    Some(n.clamp(1, i64::from(max_dimension.max(1))) as u32)
}

/// A quality value: an integer, 20–100.
fn quality(value: &str) -> Option<u8> {
    value.parse::<u8>().ok().filter(|q| (20..=100).contains(q))
}

/// Notes `name` as given, or refuses it as given twice.
fn first_time(seen: &mut Vec<String>, name: &str) -> Result<(), TransformError> {
    if seen.iter().any(|n| n == name) {
        return Err(TransformError::BadParameter(format!(
            "{name} is given more than once"
        )));
    }
    seen.push(name.to_owned());
    Ok(())
}

/// Why a transform failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransformError {
    #[error("{0}")]
    BadParameter(String),
    /// The source's header announces more pixels than `[transform] max_source_pixels`.
    #[error("the source is {width}x{height} pixels, over transform.max_source_pixels ({max})")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    /// Not an image this build decodes, or a corrupt one.
    #[error("the source cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the output could not be encoded: {0}")]
    Encode(String),
    /// The decoded pixels could not be reserved from the in-flight memory pool.
    #[error("no memory for {bytes} bytes of pixels now: try again shortly")]
    NoMemory { bytes: u64 },
}

/// An encoded output image.
#[derive(Debug)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// The output size for a `source_w` × `source_h` image: both given → by `fit`; one → the other
/// from the aspect ratio; none → the source's. A side computed from the aspect ratio is held to
/// 1–`max_dimension` too (a 1×5000 source at `width=2500` would otherwise be 2500×12 500 000).
pub fn target_size(
    source_w: u32,
    source_h: u32,
    params: &Params,
    max_dimension: u32,
) -> (u32, u32) {
    let (sw, sh) = (f64::from(source_w.max(1)), f64::from(source_h.max(1)));
    let scaled = |v: f64| (v.round().min(f64::from(max_dimension.max(1))) as u32).max(1);
    match (params.width, params.height) {
        (None, None) => (source_w, source_h),
        (Some(w), None) => (w, scaled(f64::from(w) * sh / sw)),
        (None, Some(h)) => (scaled(f64::from(h) * sw / sh), h),
        (Some(w), Some(h)) => match params.fit {
            Fit::Cover | Fit::Fill | Fit::Pad => (w, h),
            Fit::Inside => {
                let ratio = (f64::from(w) / sw).min(f64::from(h) / sh);
                (
                    scaled(sw * ratio).min(w).max(1),
                    scaled(sh * ratio).min(h).max(1),
                )
            }
        },
    }
}

/// Transforms `source` (a whole JPEG, PNG, WebP or GIF; a GIF's first frame) by `params`, into
/// the format asked for, else the source's: JPEG at `quality`; PNG; WebP lossy at `quality`
/// (a WebP source too, as Supabase and imgproxy re-encode it; alpha kept); a GIF as PNG. EXIF
/// orientation applied, with the source's ICC profile (copied, pixels not converted). A JPEG
/// is decoded at 1/2, 1/4 or 1/8 of its size when that leaves at least twice the output's
/// size (DCT-domain shrink-on-load, `transform/jpeg.rs`). Blocking and CPU-bound: run it on [`Pool::run`].
///
/// Before decoding, `reserve` is asked for the bytes the decoded source (at its shrink-on-load
/// size) and the resized output will hold (from the header: width × height × bytes per pixel,
/// both); what it returns is held until the output is encoded, and `None` refuses the transform.
///
/// # Errors
/// [`TransformError::TooManyPixels`] from the header alone, before pixel memory is allocated;
/// [`TransformError::NoMemory`] when `reserve` refuses; [`TransformError::Undecodable`],
/// [`TransformError::Encode`].
pub fn transform<R>(
    source: &[u8],
    params: &Params,
    max_source_pixels: u64,
    max_dimension: u32,
    reserve: impl FnOnce(u64) -> Option<R>,
) -> Result<Output, TransformError> {
    let (mut decoded, reservation) =
        decode(source, params, max_source_pixels, max_dimension, reserve)?;
    let format = output_format(decoded.format, params);
    let icc_profile = decoded.icc_profile.take();
    let image = resize_decoded(decoded, params, max_dimension)?;
    let output = encode(image, format, params, icc_profile);
    drop(reservation);
    output
}

/// A decoded source: what the pipeline's first stage hands to the resize.
#[doc(hidden)]
#[derive(Clone)]
pub struct Decoded {
    /// The pixels, EXIF orientation applied; smaller than the source when a JPEG was shrunk on
    /// load.
    pub image: DynamicImage,
    /// The source's size in pixels, orientation applied. Output sizes come from it, not from
    /// `image`'s, which a shrink-on-load rounds.
    pub source_width: u32,
    pub source_height: u32,
    /// The source's format.
    pub format: ImageFormat,
    /// The source's ICC profile, copied onto the output.
    pub icc_profile: Option<Vec<u8>>,
    /// The JPEG shrink-on-load denominator used: 1 (full size), 2, 4 or 8.
    pub shrink: u32,
}

/// The pipeline's first stage, public for the benches (`benches/transform.rs`): the header check
/// against `max_source_pixels`, the reservation, the decode (a JPEG shrunk on load for
/// `params`), EXIF orientation. Returns the decoded source and what `reserve` returned.
///
/// # Errors
/// As [`transform`], but for [`TransformError::Encode`].
#[doc(hidden)]
pub fn decode<R>(
    source: &[u8],
    params: &Params,
    max_source_pixels: u64,
    max_dimension: u32,
    reserve: impl FnOnce(u64) -> Option<R>,
) -> Result<(Decoded, R), TransformError> {
    let undecodable = |e: image::ImageError| TransformError::Undecodable(e.to_string());
    let mut reader = ImageReader::new(Cursor::new(source))
        .with_guessed_format()
        .map_err(|e| TransformError::Undecodable(e.to_string()))?;
    let format = reader
        .format()
        .ok_or_else(|| TransformError::Undecodable("not a known image format".into()))?;
    // the header is read without limits on the dimensions, so that a source too large is
    // refused here, by its dimensions, with our error; the decoder gets those limits once they
    // are known to be acceptable. The png crate is the exception: the image crate hands it its
    // own limit (on the chunks it buffers: ICC profiles, text, other ancillary chunks) only
    // when its decoder is made, never later, so it is given one now
    let mut header_limits = Limits::no_limits();
    if format == ImageFormat::Png {
        header_limits.max_alloc = Some(PNG_CHUNK_BYTES);
    }
    reader.limits(header_limits);
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > max_source_pixels {
        return Err(TransformError::TooManyPixels {
            width,
            height,
            max: max_source_pixels,
        });
    }
    // read from the EXIF segment the header parse already holds: no pixels yet
    let orientation = decoder.orientation().map_err(undecodable)?;
    let turned = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let (source_width, source_height) = if turned {
        (height, width)
    } else {
        (width, height)
    };
    // libjpeg-turbo decodes the JPEGs it can scale and whose header it reads as the image crate
    // did; any other JPEG (CMYK, YCCK, lossless, one only zune-jpeg reads) is the image crate's,
    // at full size, as before
    let turbo = format == ImageFormat::Jpeg
        && jpeg::header(source).is_ok_and(|h| h.scalable && (h.width, h.height) == (width, height));
    let shrink = if turbo {
        let (w, h) = scaled_source_size(source_width, source_height, params, max_dimension);
        jpeg::shrink_denominator((width, height), if turned { (h, w) } else { (w, h) })
    } else {
        1
    };
    let (decoded_width, decoded_height) = jpeg::scaled_size(width, height, shrink);
    let bytes_per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    let (output_width, output_height) =
        target_size(source_width, source_height, params, max_dimension);
    let bytes = (u64::from(decoded_width) * u64::from(decoded_height)
        + u64::from(output_width) * u64::from(output_height))
        * bytes_per_pixel;
    let reservation = reserve(bytes).ok_or(TransformError::NoMemory { bytes })?;
    // the source's colour profile goes onto the output as it is (pixels are not converted)
    let icc_profile = decoder.icc_profile().ok().flatten();
    let mut image = if turbo {
        drop(decoder);
        jpeg::decode(source, shrink)?
    } else {
        let mut limits = Limits::default();
        limits.max_image_width = Some(width);
        limits.max_image_height = Some(height);
        // the decoded pixels (at most 16 bytes each) plus the decoder's own buffers
        limits.max_alloc = Some(
            max_source_pixels
                .saturating_mul(16)
                .saturating_add(64 << 20),
        );
        decoder.set_limits(limits).map_err(undecodable)?;
        DynamicImage::from_decoder(decoder).map_err(undecodable)?
    };
    image.apply_orientation(orientation);
    Ok((
        Decoded {
            image,
            source_width,
            source_height,
            format,
            icc_profile,
            shrink,
        },
        reservation,
    ))
}

/// The size, in pixels and unrounded, that the whole `width` × `height` source (orientation
/// applied) is scaled to before any crop or padding: for `cover` with both sides given, the
/// source covering the box; for the padded `contain`, the source inside it; otherwise the exact
/// [`target_size`] (held to `max_dimension` as it is).
fn scaled_source_size(width: u32, height: u32, params: &Params, max_dimension: u32) -> (f64, f64) {
    let (sw, sh) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let max = f64::from(max_dimension.max(1));
    let (w, h) = (params.width.map(f64::from), params.height.map(f64::from));
    match (w, h, params.fit) {
        (None, None, _) => (sw, sh),
        (Some(w), None, _) => (w, (sh * w / sw).min(max)),
        (None, Some(h), _) => ((sw * h / sh).min(max), h),
        (Some(w), Some(h), Fit::Fill) => (w, h),
        (Some(w), Some(h), Fit::Cover) => {
            let scale = (w / sw).max(h / sh);
            (sw * scale, sh * scale)
        }
        (Some(w), Some(h), Fit::Inside | Fit::Pad) => {
            let scale = (w / sw).min(h / sh);
            (sw * scale, sh * scale)
        }
    }
}

/// The format written for a `source` format and `params`: the one asked for, else the source's.
#[doc(hidden)]
pub fn output_format(source: ImageFormat, params: &Params) -> ImageFormat {
    match params.format {
        None => source,
        Some(Format::Jpeg) => ImageFormat::Jpeg,
        Some(Format::Png) => ImageFormat::Png,
        Some(Format::Webp) => ImageFormat::WebP,
        #[cfg(feature = "avif")]
        Some(Format::Avif) => ImageFormat::Avif,
    }
}

/// The pipeline's second stage, public for the benches: `decoded` resized (Lanczos3, SIMD) to
/// the [`target_size`] of its source, cropped for `cover`, padded for `/image-proxy`'s
/// `contain`.
///
/// # Errors
/// [`TransformError::Encode`] when the resizer fails.
#[doc(hidden)]
pub fn resize_decoded(
    decoded: Decoded,
    params: &Params,
    max_dimension: u32,
) -> Result<DynamicImage, TransformError> {
    let (sw, sh) = (decoded.source_width, decoded.source_height);
    let image = decoded.image;
    let (w, h) = target_size(sw, sh, params, max_dimension);
    Ok(
        if params.fit == Fit::Pad && params.width.is_some() && params.height.is_some() {
            // fitted inside the box, then centred on a canvas of the box's size
            let inside = Params {
                fit: Fit::Inside,
                ..params.clone()
            };
            let (iw, ih) = target_size(sw, sh, &inside, max_dimension);
            let fitted = if (iw, ih) == (image.width(), image.height()) {
                image
            } else {
                resize(&image, iw, ih, &inside)?
            };
            let mut canvas = DynamicImage::new(w, h, fitted.color());
            image::imageops::overlay(
                &mut canvas,
                &fitted,
                i64::from((w - iw) / 2),
                i64::from((h - ih) / 2),
            );
            canvas
        } else if (w, h) == (image.width(), image.height()) {
            image
        } else {
            resize(&image, w, h, params)?
        },
    )
}

fn resize(
    source: &DynamicImage,
    width: u32,
    height: u32,
    params: &Params,
) -> Result<DynamicImage, TransformError> {
    let mut target = DynamicImage::new(width, height, source.color());
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    if params.fit == Fit::Cover && params.width.is_some() && params.height.is_some() {
        // crop the source to the box's aspect ratio, centred, before scaling
        options = options.fit_into_destination(Some((0.5, 0.5)));
    }
    Resizer::new()
        .resize(source, &mut target, &options)
        .map_err(|e| TransformError::Encode(format!("resize: {e}")))?;
    Ok(target)
}

/// The pipeline's last stage, public for the benches: `image` written as `format` (JPEG and
/// WebP at `params.quality`), with `icc_profile`.
///
/// # Errors
/// [`TransformError::Encode`].
#[doc(hidden)]
pub fn encode(
    image: DynamicImage,
    format: ImageFormat,
    params: &Params,
    icc_profile: Option<Vec<u8>>,
) -> Result<Output, TransformError> {
    let (width, height) = (image.width(), image.height());
    let mut bytes = Vec::new();
    let encode_error = |e: image::ImageError| TransformError::Encode(e.to_string());
    let content_type = match format {
        ImageFormat::Jpeg => {
            // JPEG has no alpha and 8 bits per channel
            let rgb = match image {
                DynamicImage::ImageRgb8(_) | DynamicImage::ImageLuma8(_) => image,
                DynamicImage::ImageLumaA8(_) | DynamicImage::ImageLuma16(_) => {
                    DynamicImage::ImageLuma8(image.to_luma8())
                }
                other => DynamicImage::ImageRgb8(other.to_rgb8()),
            };
            let quality = params.quality.unwrap_or(DEFAULT_QUALITY);
            let mut encoder = JpegEncoder::new_with_quality(&mut bytes, quality);
            if let Some(icc) = icc_profile {
                encoder
                    .set_icc_profile(icc)
                    .map_err(|e| TransformError::Encode(e.to_string()))?;
            }
            rgb.write_with_encoder(encoder).map_err(encode_error)?;
            "image/jpeg"
        }
        #[cfg(feature = "avif")]
        ImageFormat::Avif => {
            bytes = avif::encode(&image, params.quality.unwrap_or(DEFAULT_QUALITY))?;
            "image/avif"
        }
        ImageFormat::WebP => {
            bytes = webp::encode_lossy(
                &image,
                params.quality.unwrap_or(DEFAULT_QUALITY),
                icc_profile.as_deref(),
            )?;
            "image/webp"
        }
        _ => {
            let mut encoder = PngEncoder::new(&mut bytes);
            if let Some(icc) = icc_profile {
                encoder
                    .set_icc_profile(icc)
                    .map_err(|e| TransformError::Encode(e.to_string()))?;
            }
            image.write_with_encoder(encoder).map_err(encode_error)?;
            "image/png"
        }
    };
    Ok(Output {
        bytes,
        content_type,
        width,
        height,
    })
}

/// Where transforms run: the blocking thread pool, at most `[transform] max_concurrent` at once;
/// a request that waits longer than `[transform] queue_timeout` for a turn is refused.
#[derive(Clone)]
pub struct Pool {
    turns: Arc<Semaphore>,
    queue_timeout: Duration,
}

impl Pool {
    /// A pool of `config.max_concurrent` turns (0: the number of cores).
    pub fn new(config: &TransformConfig) -> Self {
        let turns = if config.max_concurrent == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.max_concurrent
        };
        Pool {
            turns: Arc::new(Semaphore::new(turns)),
            queue_timeout: config.queue_timeout,
        }
    }

    /// Runs `work` on a blocking thread once a turn is free.
    ///
    /// # Errors
    /// [`ProxyError::Overloaded`] when no turn came within `queue_timeout`.
    pub async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ProxyError> {
        let turn = tokio::time::timeout(self.queue_timeout, self.turns.clone().acquire_owned())
            .await
            .map_err(|_| ProxyError::Overloaded)?
            .map_err(|_| ProxyError::Overloaded)?;
        let done = tokio::task::spawn_blocking(move || {
            let _turn = turn;
            work()
        })
        .await;
        done.map_err(|e| ProxyError::Upstream(format!("transform task failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(query: &str) -> Result<Params, TransformError> {
        Params::from_query(Some(query), 2500)
    }

    #[test]
    fn parameters_are_read_clamped_and_refused_as_supabase_does() {
        let p = params("width=300&height=99999&resize=contain&quality=75").unwrap();
        assert_eq!(p.width, Some(300));
        assert_eq!(p.height, Some(2500));
        assert_eq!(p.fit, Fit::Inside);
        assert_eq!(p.quality, Some(75));
        assert_eq!(params("width=0").unwrap().width, Some(1));
        assert_eq!(params("width=-5").unwrap().width, Some(1));
        assert!(params("").unwrap().is_original());
        assert!(params("download").unwrap().is_original());
        assert_eq!(
            params("download=cat.jpg").unwrap().download.as_deref(),
            Some("cat.jpg")
        );
        for bad in [
            "quality=19",
            "quality=101",
            "quality=x",
            "width=1.5",
            "width=",
            "resize=stretch",
            "format=avif-not-built",
            "format=jpeg",
            "width=1&width=2",
        ] {
            assert!(
                matches!(params(bad), Err(TransformError::BadParameter(_))),
                "{bad}"
            );
        }
        assert!(params("unknown=1&format=origin").is_ok());
    }

    #[cfg(not(feature = "avif"))]
    #[test]
    fn avif_is_refused_without_the_feature() {
        assert!(matches!(
            params("format=avif"),
            Err(TransformError::BadParameter(_))
        ));
        assert!(matches!(
            Params::from_image_proxy_query(Some("format=avif&url=x"), 2500),
            Err(TransformError::BadParameter(_))
        ));
    }

    #[cfg(feature = "avif")]
    #[test]
    fn avif_is_read_and_written_with_the_feature() {
        let p = params("format=avif&width=40&quality=50").unwrap();
        assert_eq!(p.format, Some(Format::Avif));
        assert!(p.canonical().ends_with("f=avif"));
        let proxy = Params::from_image_proxy_query(Some("format=avif&url=x"), 2500).unwrap();
        assert_eq!(proxy.unwrap().format, Some(Format::Avif));
        let png = encoded(
            &DynamicImage::ImageRgb8(image::RgbImage::from_pixel(
                80,
                60,
                image::Rgb([9, 99, 199]),
            )),
            ImageFormat::Png,
        );
        let out = run(&png, &p);
        assert_eq!(out.content_type, "image/avif");
        assert_eq!((out.width, out.height), (40, 30));
        assert_eq!(&out.bytes[4..12], b"ftypavif");
    }

    #[test]
    fn target_sizes_follow_the_fit() {
        let p = |q: &str| params(q).unwrap();
        assert_eq!(target_size(4000, 2000, &p("width=400"), 2500), (400, 200));
        assert_eq!(target_size(4000, 2000, &p("height=100"), 2500), (200, 100));
        assert_eq!(
            target_size(4000, 2000, &p("width=300&height=300"), 2500),
            (300, 300)
        );
        assert_eq!(
            target_size(4000, 2000, &p("width=300&height=300&resize=fill"), 2500),
            (300, 300)
        );
        assert_eq!(
            target_size(4000, 2000, &p("width=300&height=300&resize=contain"), 2500),
            (300, 150)
        );
        assert_eq!(target_size(1, 5000, &p("width=10"), 2500), (10, 2500));
        assert_eq!(target_size(5000, 1, &p("width=10"), 2500), (10, 1));
    }

    fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        bytes
    }

    fn run(source: &[u8], params: &Params) -> Output {
        transform(source, params, 50_000_000, 2500, |_| Some(())).unwrap()
    }

    /// `jpeg` with an EXIF APP1 segment holding only `orientation` (1-8), after SOI.
    fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
        probe::tests::with_exif(jpeg, &probe::tests::tiff(orientation, true))
    }

    /// A 1600 x 1000 JPEG, its top-left 800 x 500 quadrant red, the rest blue.
    fn quadrant_jpeg() -> Vec<u8> {
        let rgb = image::RgbImage::from_fn(1600, 1000, |x, y| {
            if x < 800 && y < 500 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        encoded(&DynamicImage::ImageRgb8(rgb), ImageFormat::Jpeg)
    }

    #[test]
    fn jpegs_are_shrunk_on_load_leaving_twice_the_output_and_the_output_size_is_exact() {
        let jpeg = quadrant_jpeg();
        // (query, shrink, decoded size, output size)
        let cases = [
            ("width=1600", 1, (1600, 1000), (1600, 1000)),
            ("width=800", 1, (1600, 1000), (800, 500)),
            ("width=401", 1, (1600, 1000), (401, 251)),
            ("width=400", 2, (800, 500), (400, 250)),
            ("width=200", 4, (400, 250), (200, 125)),
            ("width=199", 4, (400, 250), (199, 124)),
            ("width=100", 8, (200, 125), (100, 63)),
            ("width=7", 8, (200, 125), (7, 4)),
            ("height=125", 4, (400, 250), (200, 125)),
            // cover: the source covering a 100 x 100 box is 160 x 100
            ("width=100&height=100", 4, (400, 250), (100, 100)),
            // stretched: each side on its own
            (
                "width=100&height=500&resize=fill",
                1,
                (1600, 1000),
                (100, 500),
            ),
            (
                "width=100&height=250&resize=fill",
                2,
                (800, 500),
                (100, 250),
            ),
            (
                "width=100&height=100&resize=contain",
                8,
                (200, 125),
                (100, 63),
            ),
        ];
        for (query, shrink, decoded_size, output_size) in cases {
            let p = params(query).unwrap();
            let mut reserved = 0;
            let (decoded, ()) = decode(&jpeg, &p, 50_000_000, 2500, |n| {
                reserved = n;
                Some(())
            })
            .unwrap();
            assert_eq!(decoded.shrink, shrink, "{query}");
            let size = (decoded.image.width(), decoded.image.height());
            assert_eq!(size, decoded_size, "{query}");
            assert_eq!((decoded.source_width, decoded.source_height), (1600, 1000));
            let (dw, dh) = decoded_size;
            let (ow, oh) = output_size;
            assert_eq!(reserved, (dw * dh + ow * oh) as u64 * 3, "{query}");
            let out = run(&jpeg, &p);
            assert_eq!((out.width, out.height), output_size, "{query}");
            let image = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
            assert_eq!(image.dimensions(), output_size, "{query}");
            if !query.contains('&') {
                // the red quadrant is still top-left, and only there
                let red = |x: u32, y: u32| image.get_pixel(x, y)[0] > 180;
                assert!(
                    red(ow / 8, oh / 8) && !red(ow - 1 - ow / 8, oh - 1 - oh / 8),
                    "{query}"
                );
            }
        }
    }

    #[test]
    fn shrunk_jpegs_keep_their_exif_orientation() {
        let jpeg = quadrant_jpeg();
        // (orientation, where the red quadrant lands in the 100-px-wide output)
        let cases = [
            (1, "top-left"),
            (2, "top-right"),
            (3, "bottom-right"),
            (4, "bottom-left"),
            (5, "top-left"),
            (6, "top-right"),
            (7, "bottom-right"),
            (8, "bottom-left"),
        ];
        for (orientation, corner) in cases {
            let source = with_exif_orientation(&jpeg, orientation);
            let p = params("width=100").unwrap();
            let (decoded, ()) = decode(&source, &p, 50_000_000, 2500, |_| Some(())).unwrap();
            let turned = orientation >= 5;
            let size = if turned { (100, 160) } else { (100, 63) };
            // 1/8 would leave 125 px where a turned output needs 2 x 100
            assert_eq!(decoded.shrink, if turned { 4 } else { 8 }, "{orientation}");
            let out = run(&source, &p);
            assert_eq!((out.width, out.height), size, "{orientation}");
            let image = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
            let (w, h) = size;
            let (x, y) = match corner {
                "top-left" => (w / 8, h / 8),
                "top-right" => (w - 1 - w / 8, h / 8),
                "bottom-right" => (w - 1 - w / 8, h - 1 - h / 8),
                _ => (w / 8, h - 1 - h / 8),
            };
            let red = |x: u32, y: u32| image.get_pixel(x, y)[0] > 180;
            assert!(
                red(x, y),
                "orientation {orientation}: no red at the {corner}"
            );
            assert!(!red(w - 1 - x, h - 1 - y), "orientation {orientation}");
        }
    }

    #[test]
    fn grey_jpegs_are_shrunk_and_stay_grey_and_the_icc_profile_is_kept() {
        use image::ImageEncoder;
        let grey = image::GrayImage::from_fn(800, 600, |x, _| image::Luma([(x % 256) as u8]));
        let profile: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut jpeg = Vec::new();
        let mut encoder = JpegEncoder::new_with_quality(&mut jpeg, 90);
        encoder.set_icc_profile(profile.clone()).unwrap();
        encoder
            .write_image(grey.as_raw(), 800, 600, image::ExtendedColorType::L8)
            .unwrap();
        let p = params("width=100").unwrap();
        let (decoded, ()) = decode(&jpeg, &p, 50_000_000, 2500, |_| Some(())).unwrap();
        assert_eq!(decoded.shrink, 4);
        assert!(matches!(decoded.image, DynamicImage::ImageLuma8(_)));
        assert_eq!(decoded.icc_profile.as_deref(), Some(profile.as_slice()));
        let out = run(&jpeg, &p);
        assert_eq!((out.width, out.height), (100, 75));
        let mut decoder = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&out.bytes)).unwrap();
        assert_eq!(decoder.icc_profile().unwrap(), Some(profile));
        assert_eq!(decoder.color_type(), image::ColorType::L8);
    }

    #[test]
    fn cmyk_jpegs_are_decoded_by_the_image_crate_at_full_size() {
        let cmyk: Vec<u8> = (0..400 * 200)
            .flat_map(|i| [(i % 200) as u8, 40, 40, 0])
            .collect();
        let mut compressor = turbojpeg::Compressor::new().unwrap();
        compressor.set_subsamp(turbojpeg::Subsamp::None).unwrap();
        let jpeg = compressor
            .compress_to_vec(turbojpeg::Image {
                pixels: cmyk.as_slice(),
                width: 400,
                pitch: 400 * 4,
                height: 200,
                format: turbojpeg::PixelFormat::CMYK,
            })
            .unwrap();
        let p = params("width=50").unwrap();
        let mut reserved = 0;
        let (decoded, ()) = decode(&jpeg, &p, 50_000_000, 2500, |n| {
            reserved = n;
            Some(())
        })
        .unwrap();
        assert_eq!(decoded.shrink, 1);
        assert_eq!((decoded.image.width(), decoded.image.height()), (400, 200));
        assert_eq!(reserved, (400 * 200 + 50 * 25) * 3);
        let out = run(&jpeg, &p);
        assert_eq!((out.width, out.height), (50, 25));
        assert_eq!(
            image::load_from_memory(&out.bytes).unwrap().color(),
            image::ColorType::Rgb8
        );
    }

    #[test]
    fn a_header_over_max_source_pixels_is_refused_before_reserving() {
        let jpeg = quadrant_jpeg();
        let got = transform(
            &jpeg,
            &params("width=100").unwrap(),
            1_000_000,
            2500,
            |_| -> Option<()> { panic!("reserved for a refused source") },
        );
        assert!(matches!(
            got,
            Err(TransformError::TooManyPixels {
                width: 1600,
                height: 1000,
                ..
            })
        ));
    }

    #[test]
    fn a_png_icc_profile_that_inflates_past_the_png_crates_limit_is_dropped_not_inflated() {
        use image::ImageEncoder;
        let rgb = image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]));
        let with_icc = |len: usize| {
            let mut png = Vec::new();
            let mut encoder = PngEncoder::new(&mut png);
            encoder.set_icc_profile(vec![7; len]).unwrap();
            encoder
                .write_image(rgb.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
                .unwrap();
            png
        };
        let output_icc = |png: &[u8]| {
            let out = run(png, &params("width=8").unwrap());
            assert_eq!(out.width, 8);
            image::codecs::png::PngDecoder::new(Cursor::new(out.bytes))
                .unwrap()
                .icc_profile()
                .unwrap()
                .map(|icc| icc.len())
        };
        // an iCCP chunk of 66 KB that inflates to 65 MiB: the png crate stops at its
        // limit and ignores the chunk (it would have inflated it, and the output carried it)
        let bomb = with_icc((PNG_CHUNK_BYTES + (1 << 20)) as usize);
        assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
        assert_eq!(output_icc(&bomb), None);
        // a profile of ordinary size is kept
        assert_eq!(output_icc(&with_icc(600 << 10)), Some(600 << 10));
    }

    #[test]
    fn webp_output_is_lossy_at_the_quality_asked_and_keeps_alpha() {
        let rgba = image::RgbaImage::from_fn(400, 200, |x, y| {
            image::Rgba([
                (x % 256) as u8,
                (y % 256) as u8,
                90,
                if x < 200 { 255 } else { 40 },
            ])
        });
        let png = encoded(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png);
        let webp = run(&png, &params("width=200&format=webp&quality=60").unwrap());
        assert_eq!(webp.content_type, "image/webp");
        assert_eq!(&webp.bytes[0..4], b"RIFF");
        assert_eq!(&webp.bytes[8..12], b"WEBP");
        let decoded = image::load_from_memory(&webp.bytes).unwrap().to_rgba8();
        assert_eq!(decoded.dimensions(), (200, 100));
        assert!(decoded.get_pixel(20, 50)[3] == 255 && decoded.get_pixel(180, 50)[3] < 60);
    }

    #[test]
    fn a_webp_source_without_a_format_is_reencoded_lossy_at_the_quality() {
        let rgb = image::RgbImage::from_fn(300, 300, |x, y| {
            image::Rgb([
                (x * 3 % 256) as u8,
                (y * 5 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        // the image crate writes lossless WebP: the source is VP8L
        let source = encoded(&DynamicImage::ImageRgb8(rgb), ImageFormat::WebP);
        assert_eq!(&source[12..16], b"VP8L");
        let out = run(&source, &params("width=150&quality=50").unwrap());
        assert_eq!(out.content_type, "image/webp");
        assert_eq!(&out.bytes[12..16], b"VP8 ");
        assert_eq!((out.width, out.height), (150, 150));
    }
}
