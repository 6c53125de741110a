//! The transform pipeline, in order (imgproxy's `processing.go` lists its steps the same way):
//!
//! 1. [`plan`]: from the source's header alone (its first bytes): format, size, frames,
//!    orientation, the output size and format, and the bytes the whole transform will hold
//!    ([`Plan::reserve_bytes`]), which the caller reserves from the fill pool before anything is
//!    decoded. A source over `max_source_pixels` is refused here.
//! 2. decode (`decode/`), reduced while decoding where the format allows, from a
//!    [`SourceReader`] that streams the source from the origin;
//! 3. EXIF orientation;
//! 4. resize ([`resize_decoded`]: Lanczos3, SIMD; crop for `cover`, pad for `/image-proxy`'s
//!    `contain`);
//! 5. encode (`encode.rs`), and [`check_output`]: no rendition is larger than its pixels can
//!    need.
//!
//! Animations take steps 2–5 frame by frame (`animate.rs`). Every step checks the transform's
//! deadline (`[transform] timeout`).

use std::time::{Duration, Instant};

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, ImageFormat};

use super::decode::{self, Still, gif::GifFrames, jpeg, png, webp};
use super::ffi::Features;
use super::params::scaled_source_size;
use super::probe::{ImageInfo, ImageKind, probe};
use super::shrink::{self, Shrinker};
use super::source::SourceReader;
use super::{Fit, Format, Output, Params, TransformError, animate, encode, target_size};
use crate::config::TransformConfig;

/// What a transform answers to (`[transform]`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most pixels a source (an animation: each frame) may have.
    pub max_source_pixels: u64,
    /// The largest output side.
    pub max_dimension: u32,
    /// The most frames an animation may have.
    pub max_animation_frames: u32,
    /// The most pixels decoded over all of an animation's frames.
    pub max_animation_pixels: u64,
    /// The longest a transform may take, from its start (the source's first byte read) to its
    /// output.
    pub timeout: Duration,
}

impl Limits {
    pub fn new(config: &TransformConfig) -> Self {
        Limits {
            max_source_pixels: config.max_source_pixels,
            max_dimension: config.max_dimension,
            max_animation_frames: config.max_animation_frames,
            max_animation_pixels: config.max_animation_pixels,
            timeout: config.timeout,
        }
    }
}

/// Bytes reserved for a transform beyond what the plan counts: Huffman and colour tables, the
/// decoders' small buffers, the allocator's rounding.
pub(crate) const SLACK_BYTES: u64 = 4 << 20;

/// Header bytes the plan wants at least, when the source has that many: a JPEG's markers up to
/// its frame header (EXIF and ICC segments are usually within them), a PNG's up to `IDAT`, a
/// WebP's extended header with its ICC profile.
pub(crate) const HEADER_BYTES: usize = 64 << 10;

/// The most header bytes read before giving up on finding an image's size: a JPEG may carry an
/// ICC profile of [`decode::ICC_PROFILE_MAX_BYTES`] and EXIF before its frame header.
pub(crate) const MAX_HEADER_BYTES: usize = decode::ICC_PROFILE_MAX_BYTES + (256 << 10);

/// A transform, planned from the source's header.
#[derive(Debug, Clone)]
pub struct Plan {
    /// What the header says.
    pub info: ImageInfo,
    pub source_format: ImageFormat,
    /// The format of a still output.
    pub output: ImageFormat,
    /// The format an animation is written in when the source turns out to be one and the output
    /// keeps it (animated WebP, or GIF for a GIF kept in its format); `None`: a still of the
    /// first frame.
    pub animation: Option<ImageFormat>,
    /// The source's size with its orientation applied, and the output's.
    pub source_size: (u32, u32),
    pub output_size: (u32, u32),
    /// What the decoder should leave at least (twice) on each side, in the stored orientation.
    pub needed: (f64, f64),
    pub orientation: Orientation,
    /// A JPEG's or WebP's ICC profile, read from the header (a PNG's is read by its decoder).
    pub icc_profile: Option<Vec<u8>>,
    /// A WebP's header.
    pub webp: Option<Features>,
    /// Everything the transform will hold at once, to be reserved before it starts.
    pub reserve_bytes: u64,
}

/// Plans the transform of a source whose first bytes are `header` (all of it when it is
/// shorter than [`HEADER_BYTES`]) and whose length is `total_bytes` when known.
///
/// # Errors
/// [`TransformError::NotAnImage`] when `header` is not the start of a JPEG, PNG, GIF or WebP
/// (or is cut before its size); [`TransformError::TooManyPixels`] when the image, or any frame
/// the header shows, is over `max_source_pixels`.
pub fn plan(
    header: &[u8],
    total_bytes: Option<u64>,
    params: &Params,
    limits: &Limits,
) -> Result<Plan, TransformError> {
    let info = probe(header).map_err(|e| TransformError::NotAnImage(e.to_string()))?;
    let source_format = match info.format {
        ImageKind::Jpeg => ImageFormat::Jpeg,
        ImageKind::Png => ImageFormat::Png,
        ImageKind::Gif => ImageFormat::Gif,
        ImageKind::Webp => ImageFormat::WebP,
    };
    let (width, height) = (info.width, info.height);
    let (fw, fh) = info.largest_frame;
    for (w, h) in [(width, height), (fw, fh)] {
        if u64::from(w) * u64::from(h) > limits.max_source_pixels {
            return Err(TransformError::TooManyPixels {
                width: w,
                height: h,
                max: limits.max_source_pixels,
            });
        }
    }
    let webp = if source_format == ImageFormat::WebP {
        Some(super::ffi::features(header).map_err(|e| TransformError::NotAnImage(e.to_string()))?)
    } else {
        None
    };
    let orientation = Orientation::from_exif(info.orientation).unwrap_or(Orientation::NoTransforms);
    let turned = matches!(
        orientation,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    );
    let source_size = if turned {
        (height, width)
    } else {
        (width, height)
    };
    let output_size = target_size(source_size.0, source_size.1, params, limits.max_dimension);
    let scaled = scaled_source_size(source_size.0, source_size.1, params, limits.max_dimension);
    let needed = if turned { (scaled.1, scaled.0) } else { scaled };
    let output = output_format(source_format, params);
    let animated_source = source_format == ImageFormat::Gif || webp.is_some_and(|f| f.animated);
    let animation = match (animated_source, params.format) {
        (false, _) => None,
        (true, Some(Format::Webp)) => Some(ImageFormat::WebP),
        (true, None) if source_format == ImageFormat::Gif => Some(ImageFormat::Gif),
        (true, None) => Some(ImageFormat::WebP),
        (true, Some(_)) => None,
    };
    let icc_profile = match source_format {
        // a CMYK profile describes ink, not the RGB the decoder converts to by formula: dropped
        ImageFormat::Jpeg if info.components == 4 => None,
        ImageFormat::Jpeg => decode::jpeg_icc_profile(header),
        ImageFormat::WebP => decode::webp_icc_profile(header),
        _ => None,
    };
    let mut plan = Plan {
        info,
        source_format,
        output,
        animation,
        source_size,
        output_size,
        needed,
        orientation,
        icc_profile,
        webp,
        reserve_bytes: 0,
    };
    plan.reserve_bytes = plan.working_bytes(total_bytes.unwrap_or(header.len() as u64));
    Ok(plan)
}

impl Plan {
    /// Everything the transform holds at its peak: the decoder's own memory and what it
    /// reduces the image to, the resize's output and scratch, the encoder's memory and the
    /// encoded output (at most [`max_output_bytes`]), and [`SLACK_BYTES`].
    fn working_bytes(&self, source_bytes: u64) -> u64 {
        let (w, h) = (self.info.width, self.info.height);
        let (nw, nh) = self.needed;
        let (ow, oh) = self.output_size;
        let out_px = u64::from(ow) * u64::from(oh);
        // what the decoder holds, and the image it hands over
        let (decoder, reduced) = match self.source_format {
            ImageFormat::Jpeg => {
                let n = jpeg::scale_numerator(w, h, self.needed);
                let (sw, sh) = jpeg::scaled_size(w, h, n);
                let (fx, fy) = (shrink::shrink_factor(sw, nw), shrink::shrink_factor(sh, nh));
                (
                    jpeg::working_bytes(
                        w,
                        h,
                        self.info.components,
                        (self.info.progressive, self.info.coefficient_blocks),
                        n,
                    ),
                    (
                        sw.div_ceil(fx),
                        sh.div_ceil(fy),
                        Shrinker::bytes(sw, sh, 3, fx, fy),
                    ),
                )
            }
            ImageFormat::Png => {
                let (fx, fy) = (shrink::shrink_factor(w, nw), shrink::shrink_factor(h, nh));
                (
                    png::working_bytes(w, h, self.info.progressive),
                    (
                        w.div_ceil(fx),
                        h.div_ceil(fy),
                        Shrinker::bytes(w, h, 4, fx, fy),
                    ),
                )
            }
            ImageFormat::Gif => {
                let canvas = u64::from(w) * u64::from(h) * 4;
                (
                    decode::gif::working_bytes(w, h, self.info.largest_frame.0) + canvas,
                    (w, h, canvas),
                )
            }
            _ if self.webp.is_some_and(|f| f.animated) => {
                // an animation, or its first frame as a still: the whole file, libwebp's
                // canvases (the frame, the previous one, the one handed over) and our copy of it
                let canvas = u64::from(w) * u64::from(h) * 4;
                (source_bytes + 4 * canvas + (1 << 20), (w, h, canvas))
            }
            _ => {
                let lossless = self.webp.is_some_and(|f| f.lossless);
                let (sw, sh) = webp::scaled_size(w, h, self.needed);
                (
                    webp::working_bytes(w, h, source_bytes, lossless),
                    (sw, sh, u64::from(sw) * u64::from(sh) * 4),
                )
            }
        };
        let (rw, rh, reduced_bytes) = reduced;
        // the resize: its output, and its scratch (the horizontal pass, output wide and input
        // high), at 4 bytes a pixel; the orientation's copy of the reduced image
        let resize = out_px * 4 + u64::from(ow.max(rw)) * u64::from(rh) * 4 + reduced_bytes;
        let output = match self.animation {
            // the encoder holds a few canvases of the output's size; the encoded frames it
            // collects are not counted: they are bounded by the animation limits and
            // `check_output` (docs/transforms.md, known limits)
            Some(_) => out_px * 4 * 6,
            None => encode::working_bytes(ow, oh, self.output) + max_output_bytes(ow, oh, 4, 1),
        };
        decoder + reduced_bytes + resize + output + SLACK_BYTES
    }
}

/// The format written for a `source` format and `params`: the one asked for, else the
/// source's; a GIF's first frame as PNG.
pub(crate) fn output_format(source: ImageFormat, params: &Params) -> ImageFormat {
    match params.format {
        None if source == ImageFormat::Gif => ImageFormat::Png,
        None => source,
        Some(Format::Jpeg) => ImageFormat::Jpeg,
        Some(Format::Png) => ImageFormat::Png,
        Some(Format::Webp) => ImageFormat::WebP,
        #[cfg(feature = "avif")]
        Some(Format::Avif) => ImageFormat::Avif,
    }
}

/// Runs the planned transform on the source `reader` streams, by `params`.
///
/// # Errors
/// [`TransformError`]: the decoders' (`Undecodable`, `TooManyScans`, `TooManyPixels` and `TooManyFrames` for
/// what the header did not show), a read limit (`TimedOut`, `SourceTooLarge`, `SourceFailed`),
/// `Encode`.
pub(crate) fn run(
    reader: SourceReader,
    plan: &Plan,
    params: &Params,
    limits: &Limits,
) -> Result<Output, TransformError> {
    let deadline = reader.deadline();
    let failure = reader.failure();
    let result = match (plan.source_format, plan.animation) {
        (ImageFormat::Gif, Some(format)) => {
            animate::gif(reader, params, limits, format, plan.output, deadline)
        }
        (ImageFormat::WebP, Some(_)) => animate::webp(reader, params, limits, deadline),
        _ => still(reader, plan, params, limits, deadline),
    };
    // a decoder that cannot say why its input ended (libjpeg) failed because of this
    match (result, failure.get()) {
        (Err(TransformError::Undecodable(_)), Some(limit)) => Err(limit.into()),
        (result, _) => result,
    }
}

/// A still transform: decode, orient, resize, encode.
fn still(
    reader: SourceReader,
    plan: &Plan,
    params: &Params,
    limits: &Limits,
    deadline: Instant,
) -> Result<Output, TransformError> {
    let Still {
        pixels,
        icc_profile,
    } = decode_still(reader, plan, limits, deadline)?;
    let channels = pixels.channels;
    let mut image = pixels.into_image()?;
    image.apply_orientation(plan.orientation);
    decode::check_deadline(deadline)?;
    let resized = resize_decoded(image, plan.source_size, params, limits.max_dimension)?;
    decode::check_deadline(deadline)?;
    let output = encode::encode(resized, plan.output, params, icc_profile)?;
    check_output(&output, channels)?;
    Ok(output)
}

/// The pipeline's first step for a still image, public for the benches: the source decoded and
/// reduced for the plan (no orientation applied).
///
/// # Errors
/// As [`run`].
#[doc(hidden)]
pub fn decode_still(
    reader: SourceReader,
    plan: &Plan,
    limits: &Limits,
    deadline: Instant,
) -> Result<Still, TransformError> {
    match plan.source_format {
        ImageFormat::Jpeg => jpeg::decode(reader, plan.needed, plan.icc_profile.clone(), deadline),
        ImageFormat::Png => png::decode(reader, plan.needed, deadline),
        ImageFormat::Gif => Ok(Still {
            pixels: GifFrames::new(reader, limits.max_source_pixels, deadline)?.first()?,
            icc_profile: None,
        }),
        // libwebp's still decoder reads no animation: the first frame, through its demuxer
        _ if plan.webp.is_some_and(|f| f.animated) => Ok(Still {
            pixels: animate::webp_first_frame(reader, limits)?,
            icc_profile: plan.icc_profile.clone(),
        }),
        _ => webp::decode(
            reader,
            plan.webp
                .ok_or_else(|| TransformError::NotAnImage("webp: no header".into()))?,
            plan.needed,
            plan.icc_profile.clone(),
            deadline,
        ),
    }
}

/// The pipeline's resize step, public for the benches: `image` (the source, orientation
/// applied, possibly reduced) resized (Lanczos3, SIMD) to the [`target_size`] of a source of
/// `source_size`, cropped for `cover` around the gravity, padded for `/image-proxy`'s
/// `contain`.
///
/// # Errors
/// [`TransformError::Encode`] when the resizer fails.
#[doc(hidden)]
pub fn resize_decoded(
    image: DynamicImage,
    (sw, sh): (u32, u32),
    params: &Params,
    max_dimension: u32,
) -> Result<DynamicImage, TransformError> {
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
        // crop the source to the box's aspect ratio, around the gravity, before scaling
        options = options.fit_into_destination(Some(params.gravity.centering()));
    }
    Resizer::new()
        .resize(source, &mut target, &options)
        .map_err(|e| TransformError::Encode(format!("resize: {e}")))?;
    Ok(target)
}

/// The most bytes an encoded `width` × `height` output of `channels` (and `frames` frames) can
/// need: its pixels uncompressed twice over (a tiny or noisy image compresses badly), and an
/// ICC profile of [`decode::ICC_PROFILE_MAX_BYTES`], and 64 KiB of container.
pub(super) fn max_output_bytes(width: u32, height: u32, channels: usize, frames: u32) -> u64 {
    u64::from(width) * u64::from(height) * channels as u64 * 2 * u64::from(frames.max(1))
        + decode::ICC_PROFILE_MAX_BYTES as u64
        + (64 << 10)
}

/// Refuses an output larger than [`max_output_bytes`]: a 4-pixel image is not 50 MB, whatever
/// its source carried.
///
/// # Errors
/// [`TransformError::Encode`].
pub(super) fn check_output(output: &Output, channels: usize) -> Result<(), TransformError> {
    let max = max_output_bytes(output.width, output.height, channels.max(3), output.frames);
    if output.bytes.len() as u64 > max {
        return Err(TransformError::Encode(format!(
            "the output is {} bytes, more than {max} for {}x{} pixels",
            output.bytes.len(),
            output.width,
            output.height
        )));
    }
    Ok(())
}
