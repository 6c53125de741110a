//! Image transforms for the render route and `/image-proxy`'s parameters: the parameters
//! (`params.rs`), the pipeline that plans, decodes, orients, resizes and encodes
//! (`pipeline.rs`, its steps listed in order there; `decode/`, `shrink.rs`, `encode/`,
//! `animate.rs` for animations), the source as a decoder reads it (`source.rs`), libwebp's C API
//! (`ffi.rs`, the library's only `unsafe` code) and the bounded pool transforms run on (`pool.rs`).
//!
//! A transform is bounded before it starts and while it runs: the plan refuses a source over
//! `[transform] max_source_pixels` from its header alone, and says every byte the transform
//! will hold, which the caller reserves from the fill pool first; decoders hold to their share
//! of it (their own limits are set from it), reduce images while decoding them, never hold a
//! source that is not stored whole, and stop at `[transform] timeout`.

mod animate;
mod decode;
mod encode;
mod ffi;
mod params;
mod pipeline;
mod pool;
pub(crate) mod probe;
mod shrink;
mod source;
#[cfg(test)]
mod tests;

use std::time::Instant;

use bytes::Bytes;

// What tests/decode_bounds.rs and benches/transform.rs use: the whole transform, and its steps.
pub use params::{Fit, Format, Params};
pub use pipeline::{Limits, Plan, decode_still, plan, resize_decoded};
pub use source::SourceReader;

pub(crate) use params::{DEFAULT_QUALITY, target_size};
pub(crate) use pipeline::{HEADER_BYTES, MAX_HEADER_BYTES, run};
pub(crate) use pool::{Pool, Turn};
pub(crate) use probe::{ImageInfo, probe};
pub(crate) use source::SourceSender;

/// Why a transform failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransformError {
    #[error("{0}")]
    BadParameter(String),
    /// The source's header is not a JPEG, PNG, GIF or WebP one.
    #[error("the source is not an image this server renders: {0}")]
    NotAnImage(String),
    /// The source (or one of its frames, or all of an animation's) has more pixels than
    /// allowed.
    #[error("the source is {width}x{height} pixels, over the limit of {max} pixels")]
    TooManyPixels { width: u32, height: u32, max: u64 },
    /// An animation with more frames than `[transform] max_animation_frames`.
    #[error("the animation has more than {max} frames (transform.max_animation_frames)")]
    TooManyFrames { max: u32 },
    /// A JPEG with more scans than a decoder should walk (each one passes over every
    /// coefficient: a CPU bomb), `decode/jpeg_scans.rs`'s limit.
    #[error("the JPEG has more than {max} scans")]
    TooManyScans { max: u32 },
    /// Not an image this build decodes, or a corrupt one.
    #[error("the source cannot be decoded: {0}")]
    Undecodable(String),
    #[error("the output could not be encoded: {0}")]
    Encode(String),
    /// What the transform holds could not be reserved from the in-flight memory pool.
    #[error("no memory for {bytes} bytes of pixels now: try again shortly")]
    NoMemory { bytes: u64 },
    /// The transform ran past `[transform] timeout`.
    #[error("the transform did not finish within transform.timeout")]
    TimedOut,
    /// The source grew past `[transform] max_source_bytes` while it was read.
    #[error("the source is larger than transform.max_source_bytes")]
    SourceTooLarge,
    /// The source's body failed while it was read (the origin's failure says why).
    #[error("the source could not be read to its end")]
    SourceFailed,
}

/// An encoded output image.
#[derive(Debug)]
pub struct Output {
    pub bytes: Vec<u8>,
    pub content_type: &'static str,
    pub width: u32,
    pub height: u32,
    /// 1 for a still image.
    pub frames: u32,
}

/// Transforms a whole `source` in memory (shared, not copied) by `params` within `limits`: plans it, asks `reserve`
/// for the plan's bytes (`None` refuses: [`TransformError::NoMemory`]) and holds what it returns
/// until the output is encoded, runs it. Blocking and CPU-bound: on [`Pool::run`] in the server;
/// for tests and benches as it is.
///
/// # Errors
/// As [`plan`] and [`run`]; [`TransformError::NoMemory`].
pub fn transform<R>(
    source: Bytes,
    params: &Params,
    limits: &Limits,
    reserve: impl FnOnce(u64) -> Option<R>,
) -> Result<Output, TransformError> {
    let plan = plan(&source, Some(source.len() as u64), params, limits)?;
    let reservation = reserve(plan.reserve_bytes).ok_or(TransformError::NoMemory {
        bytes: plan.reserve_bytes,
    })?;
    let reader = SourceReader::whole(source, Instant::now() + limits.timeout);
    let output = run(reader, &plan, params, limits);
    drop(reservation);
    output
}
