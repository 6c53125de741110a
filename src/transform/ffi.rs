//! libwebp's C API (through `libwebp-sys`), wrapped in safe types: the only `unsafe` code in
//! the library (the binary has one more: `mallopt` in `main.rs`). The `webp` crate covers simple encoding only; decoding scaled on decode and fed
//! incrementally, and animations in and out, need libwebp's own decoder, demux and mux API.
//!
//! Every pointer handed to libwebp points into memory this module owns for at least as long as
//! libwebp uses it (a boxed config, a `Vec` output buffer, data borrowed for the decoder's
//! lifetime), and every libwebp object is deleted exactly once, in `Drop`.
#![allow(unsafe_code)]

use std::marker::PhantomData;
use std::ptr;

use libwebp_sys as sys;

/// What a WebP file's header says ([`features`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub width: u32,
    pub height: u32,
    pub has_alpha: bool,
    pub animated: bool,
    /// `VP8L` (lossless) rather than `VP8 ` (lossy).
    pub lossless: bool,
}

/// Why libwebp refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum WebpError {
    /// More bytes are needed to say (the header is cut short).
    #[error("webp: not enough data")]
    NotEnoughData,
    #[error("webp: {0}")]
    Status(&'static str),
    #[error("webp: out of memory")]
    OutOfMemory,
}

fn status(code: sys::VP8StatusCode) -> Result<(), WebpError> {
    use sys::VP8StatusCode::*;
    match code {
        VP8_STATUS_OK => Ok(()),
        VP8_STATUS_NOT_ENOUGH_DATA | VP8_STATUS_SUSPENDED => Err(WebpError::NotEnoughData),
        VP8_STATUS_OUT_OF_MEMORY => Err(WebpError::OutOfMemory),
        VP8_STATUS_INVALID_PARAM => Err(WebpError::Status("invalid parameter")),
        VP8_STATUS_BITSTREAM_ERROR => Err(WebpError::Status("bitstream error")),
        VP8_STATUS_UNSUPPORTED_FEATURE => Err(WebpError::Status("unsupported feature")),
        VP8_STATUS_USER_ABORT => Err(WebpError::Status("aborted")),
    }
}

/// Reads the header of `data` (the first bytes of a WebP file; 30 or so are enough for a simple
/// file, an extended one may need more).
///
/// # Errors
/// [`WebpError::NotEnoughData`] when the header is cut short, a status for anything else.
pub(super) fn features(data: &[u8]) -> Result<Features, WebpError> {
    let mut f = sys::WebPBitstreamFeatures {
        width: 0,
        height: 0,
        has_alpha: 0,
        has_animation: 0,
        format: 0,
        pad: [0; 5],
    };
    // SAFETY: `data` is valid for `data.len()` bytes and `f` is a writable features struct;
    // libwebp reads at most `data.len()` bytes and writes only `f`.
    status(unsafe { sys::WebPGetFeatures(data.as_ptr(), data.len(), &mut f) })?;
    Ok(Features {
        width: u32::try_from(f.width).map_err(|_| WebpError::Status("bad width"))?,
        height: u32::try_from(f.height).map_err(|_| WebpError::Status("bad height"))?,
        has_alpha: f.has_alpha != 0,
        animated: f.has_animation != 0,
        lossless: f.format == 2,
    })
}

/// A still WebP decoded incrementally, as its bytes arrive, straight to a `width` × `height`
/// output (libwebp's own scaler when that is smaller than the image), RGB or RGBA, into a
/// buffer this decoder owns.
pub(super) struct ScaledDecoder {
    idec: *mut sys::WebPIDecoder,
    /// libwebp keeps a pointer to the config's output buffer description: boxed, so it never
    /// moves while `idec` lives.
    config: Box<sys::WebPDecoderConfig>,
    pixels: Vec<u8>,
    channels: usize,
}

// SAFETY: the decoder is used from one thread at a time (`&mut self` methods); libwebp's
// incremental decoder has no thread affinity.
unsafe impl Send for ScaledDecoder {}

impl ScaledDecoder {
    /// A decoder to `width` × `height` pixels of `channels` (3: RGB, 4: RGBA) bytes each,
    /// scaled from a `source_width` × `source_height` image.
    ///
    /// # Errors
    /// [`WebpError::OutOfMemory`] or a status when libwebp refuses the setup.
    pub(super) fn new(
        (source_width, source_height): (u32, u32),
        (width, height): (u32, u32),
        channels: usize,
    ) -> Result<Self, WebpError> {
        let mut config = Box::new(sys::WebPDecoderConfig::new().map_err(|()| {
            WebpError::Status("libwebp's decoder version does not match its headers")
        })?);
        let stride = width as usize * channels;
        let mut pixels = vec![0u8; stride * height as usize];
        config.output.colorspace = if channels == 4 {
            sys::WEBP_CSP_MODE::MODE_RGBA
        } else {
            sys::WEBP_CSP_MODE::MODE_RGB
        };
        config.output.is_external_memory = 1;
        config.output.width = width as i32;
        config.output.height = height as i32;
        config.output.u.RGBA = sys::WebPRGBABuffer {
            rgba: pixels.as_mut_ptr(),
            stride: stride as i32,
            size: pixels.len(),
        };
        if (width, height) != (source_width, source_height) {
            config.options.use_scaling = 1;
            config.options.scaled_width = width as i32;
            config.options.scaled_height = height as i32;
        }
        // SAFETY: `config` is initialised (WebPDecoderConfig::new) and boxed: its address is
        // stable for the decoder's life; its output buffer points at `pixels`, whose heap
        // storage never moves (the Vec is never resized) and outlives the decoder.
        let idec = unsafe { sys::WebPIDecode(ptr::null(), 0, config.as_mut()) };
        if idec.is_null() {
            return Err(WebpError::OutOfMemory);
        }
        Ok(ScaledDecoder {
            idec,
            config,
            pixels,
            channels,
        })
    }

    /// Feeds the next bytes of the file; `Ok(true)` once the image is complete.
    ///
    /// # Errors
    /// A status when the bitstream is broken.
    pub(super) fn append(&mut self, data: &[u8]) -> Result<bool, WebpError> {
        // SAFETY: `idec` is live; libwebp copies `data` (valid for its length) before returning.
        match status(unsafe { sys::WebPIAppend(self.idec, data.as_ptr(), data.len()) }) {
            Ok(()) => Ok(true),
            Err(WebpError::NotEnoughData) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The decoded pixels, row after row, `channels` bytes each (rows not yet decoded, of a
    /// file cut short, are zero).
    pub(super) fn into_pixels(mut self) -> (Vec<u8>, usize) {
        (std::mem::take(&mut self.pixels), self.channels)
    }
}

impl Drop for ScaledDecoder {
    fn drop(&mut self) {
        // SAFETY: `idec` came from WebPIDecode and is deleted once, here. WebPIDelete frees
        // libwebp's own memory, not the external output buffer (`pixels`), which is dropped
        // after it. The config's output buffer holds no libwebp memory (external memory).
        unsafe {
            sys::WebPIDelete(self.idec);
            sys::WebPFreeDecBuffer(&mut self.config.output);
        }
    }
}

/// The frames of an animated WebP, each composited onto the canvas (RGBA), one at a time.
pub(super) struct AnimDecoder<'a> {
    dec: *mut sys::WebPAnimDecoder,
    /// libwebp reads from this for the decoder's life.
    _data: PhantomData<&'a [u8]>,
    pub canvas_width: u32,
    pub canvas_height: u32,
    pub loop_count: u32,
    pub frame_count: u32,
}

impl<'a> AnimDecoder<'a> {
    /// A decoder over the whole file `data`.
    ///
    /// # Errors
    /// A status when libwebp cannot parse it.
    pub(super) fn new(data: &'a [u8]) -> Result<Self, WebpError> {
        let mut options = sys::WebPAnimDecoderOptions {
            color_mode: sys::WEBP_CSP_MODE::MODE_RGBA,
            use_threads: 0,
            padding: [0; 7],
        };
        // SAFETY: `options` is a writable options struct.
        if unsafe { sys::WebPAnimDecoderOptionsInit(&mut options) } == 0 {
            return Err(WebpError::Status("libwebp's demux version does not match"));
        }
        options.color_mode = sys::WEBP_CSP_MODE::MODE_RGBA;
        options.use_threads = 0;
        let webp_data = sys::WebPData {
            bytes: data.as_ptr(),
            size: data.len(),
        };
        // SAFETY: `webp_data` points at `data`, which outlives the decoder (`'a`); libwebp
        // reads it, never writes it.
        let dec = unsafe { sys::WebPAnimDecoderNew(&webp_data, &options) };
        if dec.is_null() {
            return Err(WebpError::Status("not an animation libwebp can read"));
        }
        let mut info = sys::WebPAnimInfo::default();
        // SAFETY: `dec` is live; `info` is writable.
        if unsafe { sys::WebPAnimDecoderGetInfo(dec, &mut info) } == 0 {
            // SAFETY: deleted once, here, as it is not returned.
            unsafe { sys::WebPAnimDecoderDelete(dec) };
            return Err(WebpError::Status("animation info"));
        }
        Ok(AnimDecoder {
            dec,
            _data: PhantomData,
            canvas_width: info.canvas_width,
            canvas_height: info.canvas_height,
            loop_count: info.loop_count,
            frame_count: info.frame_count,
        })
    }

    /// The next frame, composited: the canvas's RGBA bytes and the frame's end time in
    /// milliseconds from the start; `None` after the last one.
    ///
    /// # Errors
    /// A status when a frame fails to decode.
    pub(super) fn next_frame(&mut self) -> Result<Option<(&[u8], i32)>, WebpError> {
        // SAFETY: `dec` is live.
        if unsafe { sys::WebPAnimDecoderHasMoreFrames(self.dec) } == 0 {
            return Ok(None);
        }
        let mut buf: *mut u8 = ptr::null_mut();
        let mut timestamp = 0;
        // SAFETY: `dec` is live; on success `buf` points at canvas_width × canvas_height × 4
        // bytes owned by the decoder, valid until the next call or its deletion: the slice
        // returned borrows `self` mutably, so neither can happen while it is held.
        unsafe {
            if sys::WebPAnimDecoderGetNext(self.dec, &mut buf, &mut timestamp) == 0 || buf.is_null()
            {
                return Err(WebpError::Status(
                    "a frame of the animation does not decode",
                ));
            }
            let len = self.canvas_width as usize * self.canvas_height as usize * 4;
            Ok(Some((std::slice::from_raw_parts(buf, len), timestamp)))
        }
    }
}

impl Drop for AnimDecoder<'_> {
    fn drop(&mut self) {
        // SAFETY: created by WebPAnimDecoderNew, deleted once, here.
        unsafe { sys::WebPAnimDecoderDelete(self.dec) };
    }
}

/// An animated WebP written frame by frame: each frame is encoded (lossy, at a quality) as it
/// is added, so only the encoder's own canvases are held, not the frames.
pub(super) struct AnimEncoder {
    enc: *mut sys::WebPAnimEncoder,
    config: sys::WebPConfig,
    width: u32,
    height: u32,
}

// SAFETY: used from one thread at a time (`&mut self`); libwebp's encoder has no thread
// affinity.
unsafe impl Send for AnimEncoder {}

impl AnimEncoder {
    /// An encoder of `width` × `height` frames at `quality` (0–100), looping `loop_count`
    /// times (0: forever).
    ///
    /// # Errors
    /// A status when libwebp refuses the setup.
    pub(super) fn new(
        width: u32,
        height: u32,
        quality: f32,
        loop_count: u32,
    ) -> Result<Self, WebpError> {
        let mut options: sys::WebPAnimEncoderOptions =
            // SAFETY: a plain C struct of integers, made valid by the init call below.
            unsafe { std::mem::zeroed() };
        // SAFETY: `options` is writable.
        if unsafe {
            sys::WebPAnimEncoderOptionsInitInternal(&mut options, sys::WEBP_MUX_ABI_VERSION as i32)
        } == 0
        {
            return Err(WebpError::Status("libwebp's mux version does not match"));
        }
        options.anim_params.loop_count = i32::try_from(loop_count).unwrap_or(0);
        options.allow_mixed = 0;
        let mut config =
            sys::WebPConfig::new_with_preset(sys::WebPPreset::WEBP_PRESET_DEFAULT, quality)
                .map_err(|()| WebpError::Status("libwebp's encoder version does not match"))?;
        config.lossless = 0;
        config.quality = quality;
        // SAFETY: `options` is initialised; the encoder copies it.
        let enc = unsafe {
            sys::WebPAnimEncoderNewInternal(
                width as i32,
                height as i32,
                &options,
                sys::WEBP_MUX_ABI_VERSION as i32,
            )
        };
        if enc.is_null() {
            return Err(WebpError::OutOfMemory);
        }
        Ok(AnimEncoder {
            enc,
            config,
            width,
            height,
        })
    }

    /// Adds a frame of `rgba` (width × height × 4 bytes) shown from `timestamp_ms`.
    ///
    /// # Errors
    /// A status when libwebp fails to encode it.
    pub(super) fn add(&mut self, rgba: &[u8], timestamp_ms: i32) -> Result<(), WebpError> {
        let (w, h) = (self.width as usize, self.height as usize);
        if rgba.len() != w * h * 4 {
            return Err(WebpError::Status("frame size"));
        }
        let mut picture = sys::WebPPicture::new()
            .map_err(|()| WebpError::Status("libwebp's picture version does not match"))?;
        picture.use_argb = 1;
        picture.width = w as i32;
        picture.height = h as i32;
        // SAFETY: `picture` is initialised; WebPPictureImportRGBA allocates the picture's own
        // buffer and copies `rgba` (valid for w × h × 4 bytes, stride w × 4) into it. The
        // encoder copies what it needs from `picture` before returning, and the picture's
        // buffer is freed right after, once.
        unsafe {
            if sys::WebPPictureImportRGBA(&mut picture, rgba.as_ptr(), (w * 4) as i32) == 0 {
                sys::WebPPictureFree(&mut picture);
                return Err(WebpError::OutOfMemory);
            }
            let added = sys::WebPAnimEncoderAdd(self.enc, &mut picture, timestamp_ms, &self.config);
            sys::WebPPictureFree(&mut picture);
            if added == 0 {
                return Err(WebpError::Status("a frame could not be encoded"));
            }
        }
        Ok(())
    }

    /// Ends the animation at `end_ms` (the last frame's end) and returns the file.
    ///
    /// # Errors
    /// A status when libwebp fails to assemble it.
    pub(super) fn finish(self, end_ms: i32) -> Result<Vec<u8>, WebpError> {
        let mut data = sys::WebPData::default();
        // SAFETY: `enc` is live; a null frame marks the end; WebPAnimEncoderAssemble fills
        // `data` with a buffer libwebp allocated, copied out and freed once with WebPDataClear.
        unsafe {
            if sys::WebPAnimEncoderAdd(self.enc, ptr::null_mut(), end_ms, ptr::null()) == 0 {
                return Err(WebpError::Status("the animation could not be ended"));
            }
            if sys::WebPAnimEncoderAssemble(self.enc, &mut data) == 0 {
                return Err(WebpError::Status("the animation could not be assembled"));
            }
            let out = std::slice::from_raw_parts(data.bytes, data.size).to_vec();
            sys::WebPDataClear(&mut data);
            Ok(out)
        }
    }
}

impl Drop for AnimEncoder {
    fn drop(&mut self) {
        // SAFETY: created by WebPAnimEncoderNewInternal, deleted once, here.
        unsafe { sys::WebPAnimEncoderDelete(self.enc) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lossy WebP of `w` × `h` from libwebp itself, a gradient.
    fn lossy(w: u32, h: u32) -> Vec<u8> {
        let rgb: Vec<u8> = (0..w * h)
            .flat_map(|i| [((i % w) * 255 / (w - 1)) as u8, 0, 128])
            .collect();
        ::webp::Encoder::from_rgb(&rgb, w, h).encode(80.0).to_vec()
    }

    #[test]
    fn a_still_webp_decodes_scaled_as_its_bytes_arrive() {
        let file = lossy(400, 200);
        let f = features(&file).unwrap();
        assert_eq!(
            (f.width, f.height, f.animated, f.lossless),
            (400, 200, false, false)
        );
        let mut dec = ScaledDecoder::new((400, 200), (100, 50), 3).unwrap();
        let mut done = false;
        for chunk in file.chunks(97) {
            done = dec.append(chunk).unwrap();
        }
        assert!(done);
        let (pixels, channels) = dec.into_pixels();
        assert_eq!((pixels.len(), channels), (100 * 50 * 3, 3));
        // the gradient's left edge is dark red, its right bright
        assert!(pixels[0] < 20 && pixels[(100 * 25 + 99) * 3] > 200);
        assert!(features(&file[..10]).is_err());
        let mut broken = ScaledDecoder::new((400, 200), (100, 50), 3).unwrap();
        assert!(
            broken
                .append(b"RIFF\x10\x00\x00\x00WEBPVP8 garbage!")
                .is_err()
                || !broken.append(&[]).unwrap()
        );
    }

    #[test]
    fn an_animation_round_trips_with_its_timing() {
        let (w, h) = (32u32, 16u32);
        let mut enc = AnimEncoder::new(w, h, 80.0, 3).unwrap();
        for (i, t) in [0, 100, 250].into_iter().enumerate() {
            let frame: Vec<u8> = (0..w * h)
                .flat_map(|_| [i as u8 * 100, 0, 0, 255])
                .collect();
            enc.add(&frame, t).unwrap();
        }
        let file = enc.finish(400).unwrap();
        let f = features(&file).unwrap();
        assert!(f.animated);
        let mut dec = AnimDecoder::new(&file).unwrap();
        assert_eq!(
            (
                dec.canvas_width,
                dec.canvas_height,
                dec.loop_count,
                dec.frame_count
            ),
            (w, h, 3, 3)
        );
        let mut ends = Vec::new();
        while let Some((canvas, t)) = dec.next_frame().unwrap() {
            assert_eq!(canvas.len(), (w * h * 4) as usize);
            ends.push(t);
        }
        assert_eq!(ends, [100, 250, 400]);
    }
}
