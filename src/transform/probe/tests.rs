use super::*;
use image::codecs::gif::GifEncoder;
use image::{DynamicImage, Frame, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use std::io::Cursor;
use std::time::{Duration, Instant};

fn encoded(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn rgb(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
        Rgb([x as u8, y as u8, 99])
    }))
}

fn rgba(width: u32, height: u32) -> DynamicImage {
    DynamicImage::ImageRgba8(RgbaImage::from_fn(width, height, |x, _| {
        Rgba([1, 2, 3, x as u8])
    }))
}

/// `info` with what the tests below do not look at set aside.
fn base(info: ImageInfo) -> ImageInfo {
    ImageInfo {
        duration_ms: None,
        progressive: false,
        components: 0,
        coefficient_blocks: 0,
        largest_frame: (0, 0),
        lossless: false,
        ..info
    }
}

fn info(
    format: &str,
    (width, height): (u32, u32),
    has_alpha: bool,
    frames: Option<u32>,
    animated: bool,
) -> ImageInfo {
    let format = match format {
        "jpeg" => ImageKind::Jpeg,
        "png" => ImageKind::Png,
        "gif" => ImageKind::Gif,
        _ => ImageKind::Webp,
    };
    ImageInfo {
        format,
        width,
        height,
        orientation: 1,
        has_alpha,
        frames,
        animated,
        duration_ms: None,
        progressive: false,
        components: 0,
        coefficient_blocks: 0,
        largest_frame: (0, 0),
        lossless: false,
    }
}

/// A TIFF (EXIF) structure whose IFD0 holds only `orientation`, little- or big-endian.
pub(in crate::transform) fn tiff(orientation: u16, little: bool) -> Vec<u8> {
    let u16b = |v: u16| {
        if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        }
    };
    let u32b = |v: u32| {
        if little {
            v.to_le_bytes()
        } else {
            v.to_be_bytes()
        }
    };
    let mut t = if little {
        b"II*\0".to_vec()
    } else {
        b"MM\0*".to_vec()
    };
    t.extend_from_slice(&u32b(8));
    t.extend_from_slice(&u16b(1));
    t.extend_from_slice(&u16b(0x0112));
    t.extend_from_slice(&u16b(3));
    t.extend_from_slice(&u32b(1));
    t.extend_from_slice(&u16b(orientation));
    t.extend_from_slice(&[0, 0]);
    t.extend_from_slice(&u32b(0));
    t
}

/// `jpeg` with an EXIF APP1 segment holding `tiff`, after SOI.
pub(in crate::transform) fn with_exif(jpeg: &[u8], tiff: &[u8]) -> Vec<u8> {
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

/// A PNG chunk: length, type, data, and a CRC the probe never checks.
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = (data.len() as u32).to_be_bytes().to_vec();
    c.extend_from_slice(kind);
    c.extend_from_slice(data);
    c.extend_from_slice(&[0; 4]);
    c
}

/// A RIFF chunk: type, little-endian length, data, a pad byte when odd.
fn riff_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut c = kind.to_vec();
    c.extend_from_slice(&(data.len() as u32).to_le_bytes());
    c.extend_from_slice(data);
    if data.len() % 2 == 1 {
        c.push(0);
    }
    c
}

fn riff(chunks: &[Vec<u8>]) -> Vec<u8> {
    let body: Vec<u8> = chunks.concat();
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32 + 4).to_le_bytes());
    out.extend_from_slice(b"WEBP");
    out.extend_from_slice(&body);
    out
}

#[test]
fn jpeg_size_and_orientation_from_a_prefix() {
    let jpeg = encoded(rgb(300, 200), ImageFormat::Jpeg);
    assert_eq!(
        base(probe(&jpeg).unwrap()),
        info("jpeg", (300, 200), false, Some(1), false)
    );
    for (orientation, little) in [(6, true), (8, false), (3, true)] {
        let source = with_exif(&jpeg, &tiff(orientation, little));
        // the header fits in the first few hundred bytes; the scan data is not needed
        let got = probe(&source[..700]).unwrap();
        assert_eq!(
            (got.width, got.height, got.orientation),
            (300, 200, orientation as u8)
        );
    }
    // out of range: 1
    assert_eq!(
        probe(&with_exif(&jpeg, &tiff(9, true)))
            .unwrap()
            .orientation,
        1
    );
    // ends before the frame header
    assert!(matches!(
        probe(&jpeg[..20]),
        Err(TransformError::Undecodable(_))
    ));
}

#[test]
fn png_alpha_and_truncation() {
    let opaque = encoded(rgb(40, 30), ImageFormat::Png);
    assert_eq!(
        base(probe(&opaque).unwrap()),
        info("png", (40, 30), false, Some(1), false)
    );
    let clear = encoded(rgba(40, 30), ImageFormat::Png);
    assert_eq!(
        base(probe(&clear).unwrap()),
        info("png", (40, 30), true, Some(1), false)
    );
    // signature and IHDR only: the size, not yet whether it is animated
    assert_eq!(
        base(probe(&clear[..33]).unwrap()),
        info("png", (40, 30), true, None, false)
    );
    assert!(probe(&clear[..20]).is_err());
}

#[test]
fn a_small_png_claiming_100000_by_100000_probes_fast() {
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    bomb.extend_from_slice(&chunk(b"IHDR", &ihdr));
    bomb.extend_from_slice(&chunk(b"IDAT", &[0x78; 10_000]));
    bomb.extend_from_slice(&chunk(b"IEND", &[]));
    let started = Instant::now();
    let got = probe(&bomb).unwrap();
    assert!(started.elapsed() < Duration::from_millis(100));
    assert_eq!(
        base(got),
        info("png", (100_000, 100_000), false, Some(1), false)
    );
}

#[test]
fn apng_frames_come_from_actl() {
    let png = encoded(rgb(20, 10), ImageFormat::Png);
    let mut actl = 3u32.to_be_bytes().to_vec();
    actl.extend_from_slice(&0u32.to_be_bytes());
    // signature + IHDR (33 bytes), then acTL, then the rest
    let mut apng = png[..33].to_vec();
    apng.extend_from_slice(&chunk(b"acTL", &actl));
    apng.extend_from_slice(&png[33..]);
    assert_eq!(
        base(probe(&apng).unwrap()),
        info("png", (20, 10), false, Some(3), true)
    );
    assert!(is_animated(&apng[..60]));
    assert!(!is_animated(&png));
}

fn gif(frames: usize, transparent: bool) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut out);
        let frames = (0..frames).map(|i| {
            Frame::new(RgbaImage::from_fn(32, 16, |x, _| {
                let alpha = if transparent && x < 4 { 0 } else { 255 };
                Rgba([(x * 8) as u8, i as u8 * 60, 0, alpha])
            }))
        });
        encoder.encode_frames(frames).unwrap();
    }
    out
}

#[test]
fn gif_frames_are_counted_to_the_trailer() {
    let still = gif(1, false);
    assert_eq!(
        base(probe(&still).unwrap()),
        info("gif", (32, 16), false, Some(1), false)
    );
    let animated = gif(3, true);
    assert_eq!(
        base(probe(&animated).unwrap()),
        info("gif", (32, 16), true, Some(3), true)
    );
    // cut before the trailer: animated (two descriptors seen), the count unknown
    let cut = &animated[..animated.len() - 2];
    let got = probe(cut).unwrap();
    assert_eq!((got.frames, got.animated), (None, true));
    // the header alone
    assert_eq!(
        base(probe(&animated[..13]).unwrap()),
        info("gif", (32, 16), false, None, false)
    );
    assert!(probe(&animated[..8]).is_err());
}

#[test]
fn still_webps_lossy_lossless_and_extended() {
    let lossless = encoded(rgba(50, 40), ImageFormat::WebP);
    assert_eq!(&lossless[12..16], b"VP8L");
    assert_eq!(
        base(probe(&lossless).unwrap()),
        info("webp", (50, 40), true, Some(1), false)
    );
    let lossy = super::super::encode::webp::encode_lossy(&rgb(50, 40), 80, None).unwrap();
    assert_eq!(&lossy[12..16], b"VP8 ");
    assert_eq!(
        base(probe(&lossy).unwrap()),
        info("webp", (50, 40), false, Some(1), false)
    );
    let extended =
        super::super::encode::webp::encode_lossy(&rgba(50, 40), 80, Some(b"icc")).unwrap();
    assert_eq!(&extended[12..16], b"VP8X");
    assert_eq!(
        base(probe(&extended[..40]).unwrap()),
        info("webp", (50, 40), true, Some(1), false)
    );
}

#[test]
fn animated_webp_frames_are_anmf_chunks() {
    // VP8X: animation and alpha flags, a 64 x 48 canvas
    let mut vp8x = vec![0x12, 0, 0, 0];
    vp8x.extend_from_slice(&63u32.to_le_bytes()[..3]);
    vp8x.extend_from_slice(&47u32.to_le_bytes()[..3]);
    let anim = riff_chunk(b"ANIM", &[0; 6]);
    // frame payloads are never decoded: a header and some bytes
    let frame = riff_chunk(b"ANMF", &[0; 41]);
    let exif = riff_chunk(b"EXIF", &tiff(6, true));
    let file = riff(&[
        riff_chunk(b"VP8X", &vp8x),
        anim,
        frame.clone(),
        frame.clone(),
        frame,
        exif,
    ]);
    let mut expected = info("webp", (64, 48), true, Some(3), true);
    expected.orientation = 6;
    assert_eq!(base(probe(&file).unwrap()), expected);
    // a prefix: animated from the header, the count unknown
    let got = probe(&file[..60]).unwrap();
    assert_eq!((got.frames, got.animated, got.width), (None, true, 64));
    assert!(is_animated(&file[..30]));
}

#[test]
fn other_bytes_are_undecodable() {
    for bytes in [&b""[..], b"hello", b"RIFF\0\0\0\0WAVEfmt ", b"\xff\xd8"] {
        assert!(
            matches!(probe(bytes), Err(TransformError::Undecodable(_))),
            "{bytes:?}"
        );
        assert!(!is_animated(bytes));
    }
}

/// Whether `bytes` is an animation, as far as its first bytes show.
fn is_animated(bytes: &[u8]) -> bool {
    probe(bytes).is_ok_and(|info| info.animated)
}

/// A JPEG that stops after its frame header: `width` × `height`, one (id, sampling) per component.
fn frame_header(width: u16, height: u16, components: &[u8]) -> Vec<u8> {
    let mut sof = vec![8];
    sof.extend(height.to_be_bytes());
    sof.extend(width.to_be_bytes());
    sof.push(components.len() as u8);
    for (i, sampling) in components.iter().enumerate() {
        sof.extend([i as u8 + 1, *sampling, 0]);
    }
    let mut out = vec![0xFF, 0xD8, 0xFF, 0xC2];
    out.extend((sof.len() as u16 + 2).to_be_bytes());
    out.extend(sof);
    out
}

#[test]
fn a_jpeg_s_coefficient_blocks_follow_its_sampling() {
    let blocks = |width, height, components: &[u8]| {
        probe(&frame_header(width, height, components))
            .unwrap()
            .coefficient_blocks
    };
    // 4:2:0: Y 13 -> 14 blocks across (whole MCUs of 2), 10 down; Cb and Cr 7 x 5 each
    assert_eq!(blocks(100, 75, &[0x22, 0x11, 0x11]), 14 * 10 + 2 * 35);
    // 4:4:4 and grey: a block per 8 x 8 pixels of each component
    assert_eq!(blocks(100, 75, &[0x11, 0x11, 0x11]), 3 * 13 * 10);
    assert_eq!(blocks(100, 75, &[0x11]), 13 * 10);
    // 4:2:2 (Y 2 x 1): Y 14 x 10, chroma 7 x 10
    assert_eq!(blocks(100, 75, &[0x21, 0x11, 0x11]), 14 * 10 + 2 * 70);
    // sampling libjpeg refuses, or a frame header cut short: unknown
    assert_eq!(blocks(100, 75, &[0x05, 0x11, 0x11]), 0);
    assert_eq!(blocks(100, 75, &[0x51, 0x11, 0x11]), 0);
    let mut cut = frame_header(100, 75, &[0x22, 0x11, 0x11]);
    cut.truncate(cut.len() - 3);
    let len = (cut.len() - 4) as u16;
    cut[4..6].copy_from_slice(&len.to_be_bytes());
    assert_eq!(probe(&cut).unwrap().coefficient_blocks, 0);
}
