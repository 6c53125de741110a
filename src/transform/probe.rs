//! Header-only image metadata for `/image-info`: format, stored size, EXIF orientation, alpha,
//! frame count and animation, read by walking the container's structure.
//!
//! Works on a prefix of the file (the caller may fetch only the first bytes with a Range
//! request), decodes no pixels, and allocates nothing: every read is a bounds-checked look at
//! the bytes given, so a small file that claims 100 000 × 100 000 pixels probes as fast as any.
//! Decoding lives in the rest of `transform`.

use super::TransformError;

/// An image format [`probe`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageKind {
    Jpeg,
    Png,
    Gif,
    Webp,
}

impl ImageKind {
    /// Its name: `jpeg`, `png`, `gif`, `webp`.
    pub fn as_str(self) -> &'static str {
        match self {
            ImageKind::Jpeg => "jpeg",
            ImageKind::Png => "png",
            ImageKind::Gif => "gif",
            ImageKind::Webp => "webp",
        }
    }
}

/// What [`probe`] reads from an image's header: the one image-metadata type, served as JSON by
/// `/image-info` and stored in source records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageInfo {
    /// `"jpeg"`, `"png"`, `"gif"` or `"webp"`.
    pub format: ImageKind,
    /// Size in pixels as stored, before EXIF orientation (GIF: the logical screen; WebP: the
    /// canvas).
    pub width: u32,
    pub height: u32,
    /// EXIF orientation, 1–8 (1 when there is none, or it is not within the bytes given, or it
    /// is out of range).
    pub orientation: u8,
    /// Whether the image can be transparent: PNG with an alpha channel or a `tRNS` chunk, GIF
    /// with a transparent colour in a graphic control extension seen, WebP with its alpha flag
    /// or a lossless bitstream using alpha. JPEG never.
    pub has_alpha: bool,
    /// Frames in the file: 1 for JPEG and still images; an APNG's `acTL` count; a GIF's image
    /// descriptors or an animated WebP's `ANMF` chunks, counted to the end. `None` when the
    /// bytes given end before the count is known.
    pub frames: Option<u32>,
    /// Whether the image is animated, as far as the bytes given show: an APNG's `acTL` with more
    /// than one frame, a second GIF image descriptor, the WebP `VP8X` animation flag.
    pub animated: bool,
    /// An animation's total duration in milliseconds: the sum of its frames' delays (GIF
    /// graphic control extensions, APNG `fcTL`, WebP `ANMF`); `None` for a still image, or when
    /// the bytes given end before every frame is seen.
    #[serde(default)]
    pub duration_ms: Option<u64>,
    /// A progressive JPEG or an interlaced PNG: decoded whole, not row by row.
    #[serde(skip)]
    pub progressive: bool,
    /// A JPEG's colour components (1 grey, 3 YCbCr or RGB, 4 CMYK or YCCK).
    #[serde(skip)]
    pub components: u8,
    /// A JPEG's 8 × 8 blocks of coefficients over all its components, as libjpeg allocates them
    /// to decode a progressive image whole: each component's blocks at its own sampling (ITU
    /// T.81 §A.1.1; a 4:2:0 JPEG has half the blocks of a 4:4:4 one), rounded up to whole
    /// MCUs. 0 when unknown (not a JPEG, or sampling factors libjpeg refuses).
    #[serde(skip)]
    pub coefficient_blocks: u64,
    /// The largest frame seen (GIF image descriptors, APNG `fcTL`), which may be larger than
    /// the logical screen; the image's size otherwise.
    #[serde(skip)]
    pub largest_frame: (u32, u32),
    /// A lossless WebP (`VP8L`), which libwebp decodes whole.
    #[serde(skip)]
    pub lossless: bool,
}

/// Reads `bytes` (a whole image or its first bytes) as a JPEG, PNG, GIF or WebP header.
///
/// # Errors
/// [`TransformError::Undecodable`] when `bytes` is none of these formats, is malformed, or ends
/// before the image's size.
pub(crate) fn probe(bytes: &[u8]) -> Result<ImageInfo, TransformError> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        jpeg(bytes)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        png(bytes)
    } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        gif(bytes)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        webp(bytes)
    } else {
        Err(bad("not a JPEG, PNG, GIF or WebP header"))
    }
}

fn bad(why: &str) -> TransformError {
    TransformError::Undecodable(format!("image header: {why}"))
}

fn truncated() -> TransformError {
    bad("the bytes end before the image's size")
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le24(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at + 3)?;
    Some(u32::from(s[0]) | u32::from(s[1]) << 8 | u32::from(s[2]) << 16)
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// JPEG: markers from SOI to the first frame header (SOFn), reading an EXIF APP1 on the way.
fn jpeg(b: &[u8]) -> Result<ImageInfo, TransformError> {
    let mut orientation = 1;
    let mut at = 2;
    // every step moves at least two bytes forward: bounded by the input's length
    loop {
        // a marker: 0xFF, fill bytes of 0xFF, then its code
        if *b.get(at).ok_or_else(truncated)? != 0xFF {
            return Err(bad("jpeg: no marker where one was expected"));
        }
        while b.get(at) == Some(&0xFF) {
            at += 1;
        }
        let code = *b.get(at).ok_or_else(truncated)?;
        at += 1;
        match code {
            // standalone markers: RSTn, TEM
            0xD0..=0xD7 | 0x01 => continue,
            0xD8..=0xDA => return Err(bad("jpeg: no frame header before the scan")),
            _ => {}
        }
        let len = usize::from(be16(b, at).ok_or_else(truncated)?);
        if len < 2 {
            return Err(bad("jpeg: segment length under 2"));
        }
        let segment = &b[(at + 2).min(b.len())..(at + len).min(b.len())];
        match code {
            // SOF0-3, 5-7, 9-11, 13-15: precision, height, width
            0xC0..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF => {
                let height = be16(segment, 1).ok_or_else(truncated)?;
                let width = be16(segment, 3).ok_or_else(truncated)?;
                let components = *segment.get(5).ok_or_else(truncated)?;
                let coefficient_blocks =
                    coefficient_blocks(segment, width, height, components).unwrap_or(0);
                return Ok(ImageInfo {
                    format: ImageKind::Jpeg,
                    width: u32::from(width),
                    height: u32::from(height),
                    orientation,
                    has_alpha: false,
                    frames: Some(1),
                    animated: false,
                    duration_ms: None,
                    // SOF2, 6, 10, 14: progressive
                    progressive: matches!(code, 0xC2 | 0xC6 | 0xCA | 0xCE),
                    components,
                    coefficient_blocks,
                    largest_frame: (u32::from(width), u32::from(height)),
                    lossless: false,
                });
            }
            0xE1 if segment.starts_with(b"Exif\0\0") => {
                orientation = exif_orientation(&segment[6..]).unwrap_or(1);
            }
            _ => {}
        }
        at += len;
    }
}

/// The coefficient blocks libjpeg holds for a whole-image decode of the frame whose SOF
/// `segment` (after the length) gives `width` × `height` and `components`: per component
/// `ceil(width × h / (h_max × 8))` blocks across, rounded up to a multiple of `h`, times the same
/// down (libjpeg's `jdinput.c` and `jdcoefct.c`). `None` for a truncated segment or sampling
/// factors outside 1–4, which libjpeg refuses.
fn coefficient_blocks(segment: &[u8], width: u16, height: u16, components: u8) -> Option<u64> {
    let specs = segment.get(6..6 + 3 * usize::from(components))?;
    let factors: Vec<(u64, u64)> = specs
        .chunks_exact(3)
        .map(|c| (u64::from(c[1] >> 4), u64::from(c[1] & 0x0F)))
        .collect();
    if factors.is_empty()
        || factors
            .iter()
            .any(|&(h, v)| !(1..=4).contains(&h) || !(1..=4).contains(&v))
    {
        return None;
    }
    let h_max = factors.iter().map(|f| f.0).max()?;
    let v_max = factors.iter().map(|f| f.1).max()?;
    let (w, ht) = (u64::from(width), u64::from(height));
    Some(
        factors
            .iter()
            .map(|&(h, v)| {
                let across = (w * h).div_ceil(h_max * 8).next_multiple_of(h);
                let down = (ht * v).div_ceil(v_max * 8).next_multiple_of(v);
                across * down
            })
            .sum(),
    )
}

/// The orientation (tag 0x0112) in IFD0 of a TIFF structure (an EXIF payload), if it is there
/// and 1–8.
fn exif_orientation(tiff: &[u8]) -> Option<u8> {
    let little = match tiff.get(0..4)? {
        b"II*\0" => true,
        b"MM\0*" => false,
        _ => return None,
    };
    let u16_at = |at: usize| {
        if little {
            le16(tiff, at)
        } else {
            be16(tiff, at)
        }
    };
    let u32_at = |at: usize| {
        if little {
            le32(tiff, at)
        } else {
            be32(tiff, at)
        }
    };
    let ifd = usize::try_from(u32_at(4)?).ok()?;
    let entries = usize::from(u16_at(ifd)?);
    (0..entries)
        .map(|i| ifd + 2 + i * 12)
        .take_while(|&entry| entry + 12 <= tiff.len())
        .find(|&entry| u16_at(entry) == Some(0x0112))
        // a SHORT: the value is in the first two bytes of the value field
        .and_then(|entry| u16_at(entry + 8))
        .and_then(|v| u8::try_from(v).ok())
        .filter(|v| (1..=8).contains(v))
}

/// PNG: IHDR, then chunks up to the first IDAT (acTL and tRNS must come before it).
fn png(b: &[u8]) -> Result<ImageInfo, TransformError> {
    if b.get(12..16) != Some(b"IHDR") {
        return Err(if b.len() < 16 {
            truncated()
        } else {
            bad("png: IHDR is not the first chunk")
        });
    }
    let width = be32(b, 16).ok_or_else(truncated)?;
    let height = be32(b, 20).ok_or_else(truncated)?;
    let colour_type = *b.get(25).ok_or_else(truncated)?;
    let interlaced = *b.get(28).ok_or_else(truncated)? == 1;
    let mut info = ImageInfo {
        format: ImageKind::Png,
        width,
        height,
        orientation: 1,
        // grey + alpha, RGBA
        has_alpha: matches!(colour_type, 4 | 6),
        frames: None,
        animated: false,
        duration_ms: None,
        progressive: interlaced,
        components: 0,
        coefficient_blocks: 0,
        largest_frame: (width, height),
        lossless: true,
    };
    // an APNG's fcTL chunks: frame sizes and delays, counted to the end of the bytes given
    let mut duration_ms = 0u64;
    let mut complete = false;
    let mut at = 8;
    // each chunk is at least 12 bytes: bounded by the input's length
    while let (Some(len), Some(kind)) = (be32(b, at), b.get(at + 4..at + 8)) {
        let data = at + 8;
        match kind {
            b"IDAT" if !info.animated => {
                info.frames.get_or_insert(1);
                break;
            }
            b"fcTL" => {
                if let (Some(w), Some(h), Some(num), Some(den)) = (
                    be32(b, data + 4),
                    be32(b, data + 8),
                    be16(b, data + 20),
                    be16(b, data + 22),
                ) {
                    let largest = &mut info.largest_frame;
                    *largest = (largest.0.max(w), largest.1.max(h));
                    // a denominator of 0 means 1/100 s
                    let den = if den == 0 { 100 } else { u64::from(den) };
                    duration_ms += u64::from(num) * 1000 / den;
                }
            }
            b"acTL" => {
                let frames = be32(b, data).ok_or_else(truncated)?;
                info.frames = Some(frames);
                info.animated = frames > 1;
            }
            b"tRNS" => info.has_alpha = true,
            b"eXIf" => {
                let end = data.saturating_add(len as usize).min(b.len());
                if let Some(v) = exif_orientation(&b[data.min(end)..end]) {
                    info.orientation = v;
                }
            }
            b"IEND" => {
                complete = true;
                break;
            }
            _ => {}
        }
        at = data.saturating_add(len as usize).saturating_add(4);
    }
    if info.animated {
        info.duration_ms = complete.then_some(duration_ms);
    }
    Ok(info)
}

/// GIF: the logical screen, then every block to the trailer, skipping data sub-blocks.
fn gif(b: &[u8]) -> Result<ImageInfo, TransformError> {
    let width = le16(b, 6).ok_or_else(truncated)?;
    let height = le16(b, 8).ok_or_else(truncated)?;
    let flags = *b.get(10).ok_or_else(truncated)?;
    let mut info = ImageInfo {
        format: ImageKind::Gif,
        width: u32::from(width),
        height: u32::from(height),
        orientation: 1,
        has_alpha: false,
        frames: None,
        animated: false,
        duration_ms: None,
        progressive: false,
        components: 0,
        coefficient_blocks: 0,
        largest_frame: (u32::from(width), u32::from(height)),
        lossless: true,
    };
    let mut duration_ms = 0u64;
    let colour_table = |flags: u8| {
        if flags & 0x80 != 0 {
            3 << ((flags & 0x07) + 1)
        } else {
            0
        }
    };
    let mut at = 13 + colour_table(flags);
    let mut images = 0u32;
    // skips a run of data sub-blocks from `at`; None when the bytes end first. Each sub-block
    // is at least one byte: bounded by the input's length
    let sub_blocks = |mut at: usize| -> Option<usize> {
        loop {
            let size = usize::from(*b.get(at)?);
            at += 1 + size;
            if size == 0 {
                return Some(at);
            }
        }
    };
    loop {
        let Some(&block) = b.get(at) else {
            return Ok(info);
        };
        match block {
            // extension: label, then sub-blocks
            0x21 => {
                let Some(&label) = b.get(at + 1) else {
                    return Ok(info);
                };
                // graphic control extension: block size 4, packed fields (bit 0: transparent)
                if label == 0xF9
                    && b.get(at + 2) == Some(&4)
                    && let Some(packed) = b.get(at + 3)
                {
                    info.has_alpha |= packed & 0x01 != 0;
                    // the delay, in hundredths of a second
                    duration_ms += u64::from(le16(b, at + 4).unwrap_or(0)) * 10;
                }
                match sub_blocks(at + 2) {
                    Some(next) => at = next,
                    None => return Ok(info),
                }
            }
            // image descriptor: 9 bytes, a local colour table, the LZW code size, sub-blocks
            0x2C => {
                images += 1;
                info.animated = images > 1;
                if let (Some(w), Some(h)) = (le16(b, at + 5), le16(b, at + 7)) {
                    let largest = &mut info.largest_frame;
                    *largest = (largest.0.max(u32::from(w)), largest.1.max(u32::from(h)));
                }
                let Some(&local) = b.get(at + 9) else {
                    return Ok(info);
                };
                match sub_blocks(at + 10 + colour_table(local) + 1) {
                    Some(next) => at = next,
                    None => return Ok(info),
                }
            }
            0x3B => {
                info.frames = Some(images);
                if info.animated {
                    info.duration_ms = Some(duration_ms);
                }
                return Ok(info);
            }
            _ => return Err(bad("gif: unknown block")),
        }
    }
}

/// WebP: the first chunk (`VP8 `, `VP8L` or `VP8X`), then, for an extended file, every chunk to
/// count `ANMF` frames and find `EXIF`.
fn webp(b: &[u8]) -> Result<ImageInfo, TransformError> {
    let kind = b.get(12..16).ok_or_else(truncated)?;
    let data = 20;
    let mut info = ImageInfo {
        format: ImageKind::Webp,
        width: 0,
        height: 0,
        orientation: 1,
        has_alpha: false,
        frames: Some(1),
        animated: false,
        duration_ms: None,
        progressive: false,
        components: 0,
        coefficient_blocks: 0,
        largest_frame: (0, 0),
        lossless: false,
    };
    match kind {
        b"VP8 " => {
            // a 3-byte frame tag, the start code 9d 01 2a, then 14-bit sizes
            if b.get(data + 3..data + 6).ok_or_else(truncated)? != [0x9d, 0x01, 0x2a] {
                return Err(bad("webp: no VP8 start code"));
            }
            info.width = u32::from(le16(b, data + 6).ok_or_else(truncated)? & 0x3fff);
            info.height = u32::from(le16(b, data + 8).ok_or_else(truncated)? & 0x3fff);
        }
        b"VP8L" => {
            if b.get(data) != Some(&0x2f) {
                return Err(if b.len() <= data {
                    truncated()
                } else {
                    bad("webp: no VP8L signature")
                });
            }
            let bits = le32(b, data + 1).ok_or_else(truncated)?;
            info.width = (bits & 0x3fff) + 1;
            info.height = ((bits >> 14) & 0x3fff) + 1;
            info.has_alpha = bits & (1 << 28) != 0;
            info.lossless = true;
        }
        b"VP8X" => {
            let flags = *b.get(data).ok_or_else(truncated)?;
            info.width = le24(b, data + 4).ok_or_else(truncated)? + 1;
            info.height = le24(b, data + 7).ok_or_else(truncated)? + 1;
            info.has_alpha = flags & 0x10 != 0;
            info.animated = flags & 0x02 != 0;
            let riff_end = (le32(b, 4).unwrap_or(0) as usize).saturating_add(8);
            let mut frames = 0u32;
            let mut duration_ms = 0u64;
            let mut at = 12;
            // each chunk is at least 8 bytes: bounded by the input's length
            let complete = loop {
                if at >= riff_end {
                    break true;
                }
                let (Some(kind), Some(len)) = (b.get(at..at + 4), le32(b, at + 4)) else {
                    break false;
                };
                let len = len as usize;
                match kind {
                    b"ANMF" => {
                        frames += 1;
                        // the frame's duration: 24 bits after its offset and size
                        duration_ms += u64::from(le24(b, at + 8 + 12).unwrap_or(0));
                    }
                    b"VP8L" => info.lossless = true,
                    b"EXIF" => {
                        let end = (at + 8).saturating_add(len).min(b.len());
                        let exif = &b[(at + 8).min(end)..end];
                        // some writers keep JPEG's "Exif\0\0" prefix
                        let tiff = exif.strip_prefix(b"Exif\0\0").unwrap_or(exif);
                        if let Some(v) = exif_orientation(tiff) {
                            info.orientation = v;
                        }
                    }
                    _ => {}
                }
                at = (at + 8).saturating_add(len).saturating_add(len % 2);
            };
            if info.animated {
                info.frames = complete.then_some(frames);
                info.duration_ms = complete.then_some(duration_ms);
            }
        }
        _ => return Err(bad("webp: unknown first chunk")),
    }
    info.largest_frame = (info.width, info.height);
    Ok(info)
}

#[cfg(test)]
pub(super) mod tests;
