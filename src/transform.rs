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
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageFormat, ImageReader, Limits};
use percent_encoding::percent_decode_str;
use tokio::sync::Semaphore;

use crate::config::TransformConfig;
use crate::error::ProxyError;

mod webp;

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
}

impl Format {
    /// Its name in parameters and canonical keys: `jpeg`, `png`, `webp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
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
    /// `format` (`origin`, `webp`; absent: negotiated from `Accept`) and `download` (present:
    /// attachment; a value other than `true` is the file name). Unknown parameters are ignored,
    /// as Supabase does.
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
                        _ => return Err(bad("want origin or webp")),
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
    /// `webp`). They may come
    /// before `url=`, or after an encoded one (a raw URL takes the rest of the query). `None`
    /// when there are none: the original is served.
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
                        _ => return Err(bad("want auto, jpeg, png or webp")),
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
/// orientation applied, with the source's ICC profile (copied, pixels not converted).
/// Blocking and CPU-bound: run it on [`Pool::run`].
///
/// Before decoding, `reserve` is asked for the bytes the decoded source and the resized output
/// will hold (from the header: width × height × bytes per pixel, both); what it returns is held
/// until the output is encoded, and `None` refuses the transform.
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
    let undecodable = |e: image::ImageError| TransformError::Undecodable(e.to_string());
    let mut reader = ImageReader::new(Cursor::new(source))
        .with_guessed_format()
        .map_err(|e| TransformError::Undecodable(e.to_string()))?;
    // the header is read without limits, so that a source too large is refused here, by its
    // dimensions, with our error; the decoder gets limits once they are known to be acceptable
    reader.no_limits();
    let format = reader
        .format()
        .ok_or_else(|| TransformError::Undecodable("not a known image format".into()))?;
    let mut decoder = reader.into_decoder().map_err(undecodable)?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > max_source_pixels {
        return Err(TransformError::TooManyPixels {
            width,
            height,
            max: max_source_pixels,
        });
    }
    // the orientation may swap the sides: reserve for the larger of the two outputs
    let bytes_per_pixel = u64::from(decoder.color_type().bytes_per_pixel());
    let output_pixels = [(width, height), (height, width)]
        .iter()
        .map(|&(w, h)| {
            let (tw, th) = target_size(w, h, params, max_dimension);
            u64::from(tw) * u64::from(th)
        })
        .max()
        .unwrap_or(0);
    let bytes = (u64::from(width) * u64::from(height) + output_pixels) * bytes_per_pixel;
    let _reservation = reserve(bytes).ok_or(TransformError::NoMemory { bytes })?;
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
    let orientation = decoder.orientation().map_err(undecodable)?;
    // the source's colour profile goes onto the output as it is (pixels are not converted)
    let icc_profile = decoder.icc_profile().ok().flatten();
    let mut image = DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    image.apply_orientation(orientation);

    let (w, h) = target_size(image.width(), image.height(), params, max_dimension);
    let image = if params.fit == Fit::Pad && params.width.is_some() && params.height.is_some() {
        // fitted inside the box, then centred on a canvas of the box's size
        let inside = Params {
            fit: Fit::Inside,
            ..params.clone()
        };
        let (iw, ih) = target_size(image.width(), image.height(), &inside, max_dimension);
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
    };
    let format = match params.format {
        None => format,
        Some(Format::Jpeg) => ImageFormat::Jpeg,
        Some(Format::Png) => ImageFormat::Png,
        Some(Format::Webp) => ImageFormat::WebP,
    };
    encode(image, format, params, icc_profile)
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

fn encode(
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
