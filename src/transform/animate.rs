//! Animations: every frame of an animated GIF or WebP resized, with its timing and the loop
//! count, into an animated WebP (libwebp's animation encoder, each frame encoded as it is added)
//! or, for a GIF kept in its own format, an animated GIF. Frames are composited one at a time
//! (`decode/gif.rs`, libwebp's demuxer) and never held together; a GIF that turns out to have a
//! single frame is written as a still image.
//!
//! Bounded by `[transform] max_animation_frames` and `max_animation_pixels` (the pixels decoded
//! over all frames), checked before each frame is decoded: past either, 422 `image_too_large`.

use std::time::Instant;

use image::codecs::gif::{GifEncoder, Repeat};
use image::{DynamicImage, ImageFormat, RgbaImage};

use super::decode::gif::GifFrames;
use super::ffi::{AnimDecoder, AnimEncoder};
use super::pipeline::{Limits, check_output, resize_decoded};
use super::source::SourceReader;
use super::{DEFAULT_QUALITY, Output, Params, TransformError, encode, target_size};

/// Where frames go.
enum Sink {
    Webp(AnimEncoder),
    /// The GIF encoder writes into the shared buffer, taken once it is dropped (which writes
    /// the trailer).
    Gif(GifEncoder<SharedBuffer>, SharedBuffer),
}

/// A `Vec` written through a handle that can be taken back after the writer is gone.
#[derive(Clone, Default)]
struct SharedBuffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The frame budget: how many frames, and pixels over all of them, may still be decoded.
struct Budget {
    frames: u32,
    pixels: u64,
    max_frames: u32,
    max_pixels: u64,
}

impl Budget {
    fn new(limits: &Limits) -> Self {
        Budget {
            frames: 0,
            pixels: 0,
            max_frames: limits.max_animation_frames,
            max_pixels: limits.max_animation_pixels,
        }
    }

    /// Counts one more frame of `width` × `height` decoded pixels.
    fn take(&mut self, width: u32, height: u32) -> Result<(), TransformError> {
        self.frames += 1;
        self.pixels += u64::from(width) * u64::from(height);
        if self.frames > self.max_frames {
            return Err(TransformError::TooManyFrames {
                max: self.max_frames,
            });
        }
        if self.pixels > self.max_pixels {
            return Err(TransformError::TooManyPixels {
                width,
                height,
                max: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// One canvas resized for the output.
fn resized_frame(
    rgba: &[u8],
    (width, height): (u32, u32),
    params: &Params,
    max_dimension: u32,
) -> Result<RgbaImage, TransformError> {
    let canvas = RgbaImage::from_raw(width, height, rgba.to_vec())
        .ok_or_else(|| TransformError::Undecodable("a frame of the wrong size".into()))?;
    let image = resize_decoded(
        DynamicImage::ImageRgba8(canvas),
        (width, height),
        params,
        max_dimension,
    )?;
    Ok(image.into_rgba8())
}

/// A GIF, every frame resized into `output` (WebP: animated WebP; GIF: animated GIF), or, when
/// it has one frame, that frame as a still in `still_format`.
///
/// # Errors
/// [`TransformError::TooManyFrames`], [`TransformError::TooManyPixels`] (one frame over
/// `max_source_pixels`, or all over `max_animation_pixels`), the decoder's and encoders' errors.
pub(super) fn gif(
    reader: SourceReader,
    params: &Params,
    limits: &Limits,
    output: ImageFormat,
    still_format: ImageFormat,
    deadline: Instant,
) -> Result<Output, TransformError> {
    let mut frames = GifFrames::new(reader, limits.max_source_pixels, deadline)?;
    let size = frames.size();
    let (out_w, out_h) = target_size(size.0, size.1, params, limits.max_dimension);
    let loop_count = frames.loop_count();
    let mut budget = Budget::new(limits);
    let quality = params.quality.unwrap_or(DEFAULT_QUALITY);
    let mut sink: Option<Sink> = None;
    let mut first: Option<(RgbaImage, u64)> = None;
    let (mut start_ms, mut count) = (0u64, 0u32);
    while let Some(frame) = frames.next_frame()? {
        budget.take(size.0, size.1)?;
        let delay_ms = frame.delay.as_millis() as u64;
        let resized = resized_frame(frame.rgba, size, params, limits.max_dimension)?;
        count += 1;
        if count == 1 {
            // held until a second frame says this is an animation
            first = Some((resized, delay_ms));
        } else {
            if sink.is_none() {
                let mut new = match output {
                    ImageFormat::WebP => Sink::Webp(
                        AnimEncoder::new(out_w, out_h, f32::from(quality), loop_count)
                            .map_err(|e| TransformError::Encode(e.to_string()))?,
                    ),
                    _ => {
                        let buffer = SharedBuffer::default();
                        let mut encoder = GifEncoder::new_with_speed(buffer.clone(), 10);
                        encoder
                            .set_repeat(if loop_count == 0 {
                                Repeat::Infinite
                            } else {
                                Repeat::Finite(loop_count.min(u32::from(u16::MAX)) as u16)
                            })
                            .map_err(|e| TransformError::Encode(e.to_string()))?;
                        Sink::Gif(encoder, buffer)
                    }
                };
                let (frame, delay) = first.take().expect("the first frame");
                add(&mut new, frame, 0, delay)?;
                sink = Some(new);
            }
            add(
                sink.as_mut().expect("made above"),
                resized,
                start_ms,
                delay_ms,
            )?;
        }
        start_ms += delay_ms;
    }
    match sink {
        None => {
            let (frame, _) =
                first.ok_or_else(|| TransformError::Undecodable("gif: no frame".into()))?;
            let output =
                encode::encode(DynamicImage::ImageRgba8(frame), still_format, params, None)?;
            check_output(&output, 4)?;
            Ok(output)
        }
        Some(sink) => finish(sink, out_w, out_h, count, start_ms),
    }
}

/// An animated WebP (whole, in memory: libwebp's demuxer needs all of it), every frame resized
/// into an animated WebP.
///
/// # Errors
/// As [`gif()`].
pub(super) fn webp(
    mut reader: SourceReader,
    params: &Params,
    limits: &Limits,
    deadline: Instant,
) -> Result<Output, TransformError> {
    let data = read_webp(&mut reader)?;
    let mut decoder = webp_decoder(&data, limits, Some(limits.max_animation_frames))?;
    let size = (decoder.canvas_width, decoder.canvas_height);
    let (out_w, out_h) = target_size(size.0, size.1, params, limits.max_dimension);
    let quality = params.quality.unwrap_or(DEFAULT_QUALITY);
    let mut sink = Sink::Webp(
        AnimEncoder::new(out_w, out_h, f32::from(quality), decoder.loop_count)
            .map_err(|e| TransformError::Encode(e.to_string()))?,
    );
    let mut budget = Budget::new(limits);
    let (mut start_ms, mut count) = (0u64, 0u32);
    loop {
        super::decode::check_deadline(deadline)?;
        let Some((rgba, end_ms)) = decoder
            .next_frame()
            .map_err(|e| TransformError::Undecodable(e.to_string()))?
        else {
            break;
        };
        budget.take(size.0, size.1)?;
        let end_ms = u64::try_from(end_ms).unwrap_or(start_ms).max(start_ms);
        let resized = resized_frame(rgba, size, params, limits.max_dimension)?;
        add(&mut sink, resized, start_ms, end_ms - start_ms)?;
        start_ms = end_ms;
        count += 1;
    }
    if count == 0 {
        return Err(TransformError::Undecodable("webp: no frame".into()));
    }
    finish(sink, out_w, out_h, count, start_ms)
}

/// An animated WebP's first frame, as a still (a still format asked for: JPEG, PNG).
///
/// # Errors
/// [`TransformError::Undecodable`] when libwebp cannot read it or it has no frame;
/// [`TransformError::TooManyPixels`] for a canvas over `max_source_pixels`; a read limit.
pub(super) fn webp_first_frame(
    mut reader: SourceReader,
    limits: &Limits,
) -> Result<super::decode::Pixels, TransformError> {
    let data = read_webp(&mut reader)?;
    let mut decoder = webp_decoder(&data, limits, None)?;
    let (width, height) = (decoder.canvas_width, decoder.canvas_height);
    let (rgba, _) = decoder
        .next_frame()
        .map_err(|e| TransformError::Undecodable(e.to_string()))?
        .ok_or_else(|| TransformError::Undecodable("webp: no frame".into()))?;
    Ok(super::decode::Pixels {
        data: rgba.to_vec(),
        width,
        height,
        channels: 4,
    })
}

/// An animated WebP whole (libwebp's demuxer reads nothing less).
fn read_webp(reader: &mut SourceReader) -> Result<Vec<u8>, TransformError> {
    reader
        .read_all()
        .map_err(|e| super::decode::undecodable("webp", e))
}

/// libwebp's animation decoder over `data`, refused when it has more than `max_frames` frames
/// (when given) or a canvas over `max_source_pixels`, in that order.
fn webp_decoder<'a>(
    data: &'a [u8],
    limits: &Limits,
    max_frames: Option<u32>,
) -> Result<AnimDecoder<'a>, TransformError> {
    let decoder = AnimDecoder::new(data).map_err(|e| TransformError::Undecodable(e.to_string()))?;
    if let Some(max) = max_frames
        && decoder.frame_count > max
    {
        return Err(TransformError::TooManyFrames { max });
    }
    let (width, height) = (decoder.canvas_width, decoder.canvas_height);
    if u64::from(width) * u64::from(height) > limits.max_source_pixels {
        return Err(TransformError::TooManyPixels {
            width,
            height,
            max: limits.max_source_pixels,
        });
    }
    Ok(decoder)
}

/// Adds a frame shown from `start_ms` for `delay_ms`.
fn add(
    sink: &mut Sink,
    frame: RgbaImage,
    start_ms: u64,
    delay_ms: u64,
) -> Result<(), TransformError> {
    let encode = |e: String| TransformError::Encode(e);
    match sink {
        Sink::Webp(encoder) => encoder
            .add(frame.as_raw(), i32::try_from(start_ms).unwrap_or(i32::MAX))
            .map_err(|e| encode(e.to_string())),
        Sink::Gif(encoder, _) => {
            let delay =
                image::Delay::from_numer_denom_ms(delay_ms.min(u64::from(u32::MAX)) as u32, 1);
            encoder
                .encode_frame(image::Frame::from_parts(frame, 0, 0, delay))
                .map_err(|e| encode(e.to_string()))
        }
    }
}

fn finish(
    sink: Sink,
    width: u32,
    height: u32,
    frames: u32,
    end_ms: u64,
) -> Result<Output, TransformError> {
    let (bytes, content_type) = match sink {
        Sink::Webp(encoder) => (
            encoder
                .finish(i32::try_from(end_ms).unwrap_or(i32::MAX))
                .map_err(|e| TransformError::Encode(e.to_string()))?,
            "image/webp",
        ),
        Sink::Gif(encoder, buffer) => {
            drop(encoder);
            let bytes = std::mem::take(&mut *buffer.0.lock().unwrap_or_else(|e| e.into_inner()));
            (bytes, "image/gif")
        }
    };
    let output = Output {
        bytes,
        content_type,
        width,
        height,
        frames,
    };
    check_output(&output, 4)?;
    Ok(output)
}
