//! The transform pipeline's tests: parameters, sizes, each decoder through the whole pipeline
//! (whole and streamed sources), orientation, ICC profiles, limits, animations.

use std::io::Cursor;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::codecs::png::PngEncoder;
use image::{DynamicImage, ImageDecoder, ImageEncoder, ImageFormat};

use super::decode::ICC_PROFILE_MAX_BYTES;
use super::params::Gravity;
use super::*;

fn params(query: &str) -> Result<Params, TransformError> {
    Params::from_query(Some(query), 2500)
}

fn limits() -> Limits {
    Limits {
        max_source_pixels: 50_000_000,
        max_dimension: 2500,
        max_animation_frames: 100,
        max_animation_pixels: 100_000_000,
        timeout: Duration::from_secs(30),
    }
}

fn encoded(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

fn run(source: &[u8], params: &Params) -> Output {
    transform(Bytes::copy_from_slice(source), params, &limits(), |_| {
        Some(())
    })
    .unwrap()
}

/// `source` through the pipeline streamed in `chunk`-byte pieces after its first `header`
/// bytes, as the render route feeds it.
fn run_streamed(source: &[u8], params: &Params, header: usize, chunk: usize) -> Output {
    let limits = limits();
    let header = header.min(source.len());
    let plan = plan(
        &source[..header],
        Some(source.len() as u64),
        params,
        &limits,
    )
    .unwrap();
    let (reader, tx) = SourceReader::streaming(
        Bytes::copy_from_slice(&source[..header]),
        source.len() as u64,
        Instant::now() + limits.timeout,
    );
    let rest = source[header..].to_vec();
    let feeder = std::thread::spawn(move || {
        for piece in rest.chunks(chunk) {
            if tx.blocking_send(Ok(Bytes::copy_from_slice(piece))).is_err() {
                return;
            }
        }
    });
    let out = super::run(reader, &plan, params, &limits).unwrap();
    feeder.join().unwrap();
    out
}

#[test]
fn parameters_are_read_clamped_and_refused_as_supabase_does() {
    let p = params("width=300&height=99999&resize=contain&quality=75").unwrap();
    assert_eq!(p.width, Some(300));
    assert_eq!(p.height, Some(2500));
    assert_eq!(p.fit, Fit::Inside);
    assert_eq!(p.quality, Some(75));
    // 0 is "from the other side" (imgproxy's reading); negative is refused, as Storage's schema does
    assert_eq!(params("width=0").unwrap().width, None);
    assert!(params("").unwrap().is_original());
    assert!(params("download").unwrap().is_original());
    assert_eq!(
        params("download=cat.jpg").unwrap().download.as_deref(),
        Some("cat.jpg")
    );
    for bad in [
        "width=-1",
        "height=-5",
        "quality=19",
        "quality=101",
        "quality=x",
        "width=1.5",
        "width=",
        "width=abc",
        "resize=stretch",
        "format=avif-not-built",
        "format=jpeg",
        "width=1&width=2",
        "gravity=up",
        "gravity=fp",
        "gravity=fp&x_offset=0.5",
        "gravity=fp&x_offset=2&y_offset=0",
        "x_offset=abc",
    ] {
        match params(bad) {
            Err(TransformError::BadParameter(why)) => {
                let name = bad.split('=').next().unwrap();
                assert!(why.contains(name), "{bad}: {why}");
            }
            other => panic!("{bad}: {other:?}"),
        }
    }
    assert!(params("unknown=1&format=origin").is_ok());
    let fp = params("gravity=fp&x_offset=0&y_offset=1&width=10&height=10").unwrap();
    assert_eq!(fp.gravity, Gravity::FocalPoint(0.0, 1.0));
    assert!(fp.canonical().ends_with(";g=fp:0:1"), "{}", fp.canonical());
    assert_eq!(
        params("gravity=no").unwrap().gravity,
        Gravity::Edge(0.5, 0.0)
    );
    assert_eq!(params("gravity=sm").unwrap().gravity, Gravity::Centre);
    assert!(!params("gravity=ce").unwrap().canonical().contains(";g="));
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
fn jpegs_are_reduced_while_decoding_leaving_twice_the_output_and_the_output_size_is_exact() {
    let jpeg = quadrant_jpeg();
    // (query, output size)
    let cases = [
        ("width=1600", (1600, 1000)),
        ("width=800", (800, 500)),
        ("width=401", (401, 251)),
        ("width=400", (400, 250)),
        ("width=200", (200, 125)),
        ("width=199", (199, 124)),
        ("width=100", (100, 63)),
        ("width=7", (7, 4)),
        ("height=125", (200, 125)),
        ("width=100&height=100", (100, 100)),
        ("width=100&height=500&resize=fill", (100, 500)),
        ("width=100&height=250&resize=fill", (100, 250)),
        ("width=100&height=100&resize=contain", (100, 63)),
    ];
    for (query, output_size) in cases {
        let p = params(query).unwrap();
        let limits = limits();
        let plan = plan(&jpeg, Some(jpeg.len() as u64), &p, &limits).unwrap();
        let still = decode_still(
            SourceReader::whole(Bytes::from(jpeg.clone()), Instant::now() + limits.timeout),
            &plan,
            &limits,
            Instant::now() + limits.timeout,
        )
        .unwrap();
        // never below twice what the resize needs, never above the source
        let (dw, dh) = (still.pixels.width, still.pixels.height);
        let (nw, nh) = plan.needed;
        assert!(
            f64::from(dw) >= (2.0 * nw).min(1600.0) - 1.0,
            "{query}: {dw}x{dh}"
        );
        assert!(
            f64::from(dh) >= (2.0 * nh).min(1000.0) - 1.0,
            "{query}: {dw}x{dh}"
        );
        assert!(dw <= 1600 && dh <= 1000, "{query}");
        let out = run(&jpeg, &p);
        assert_eq!((out.width, out.height), output_size, "{query}");
        let image = image::load_from_memory(&out.bytes).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), output_size, "{query}");
        if !query.contains('&') {
            // the red quadrant is still top-left, and only there
            let (ow, oh) = output_size;
            let red = |x: u32, y: u32| image.get_pixel(x, y)[0] > 180;
            assert!(
                red(ow / 8, oh / 8) && !red(ow - 1 - ow / 8, oh - 1 - oh / 8),
                "{query}"
            );
        }
    }
}

#[test]
fn jpegs_keep_their_exif_orientation() {
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
        let turned = orientation >= 5;
        let size = if turned { (100, 160) } else { (100, 63) };
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
fn grey_jpegs_stay_grey_and_the_icc_profile_is_kept() {
    let grey = image::GrayImage::from_fn(800, 600, |x, _| image::Luma([(x % 256) as u8]));
    let profile: Vec<u8> = (0..300u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut jpeg = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
    encoder.set_icc_profile(profile.clone()).unwrap();
    encoder
        .write_image(grey.as_raw(), 800, 600, image::ExtendedColorType::L8)
        .unwrap();
    assert_eq!(
        decode::jpeg_icc_profile(&jpeg).as_deref(),
        Some(profile.as_slice())
    );
    let out = run(&jpeg, &params("width=100").unwrap());
    assert_eq!((out.width, out.height), (100, 75));
    let mut decoder = image::codecs::jpeg::JpegDecoder::new(Cursor::new(&out.bytes)).unwrap();
    assert_eq!(decoder.icc_profile().unwrap(), Some(profile));
    assert_eq!(decoder.color_type(), image::ColorType::L8);
}

#[test]
fn cmyk_jpegs_are_decoded_to_rgb() {
    // Adobe's inverted CMYK: C = 255 - cyan ink, ... a red-ish left half
    let cmyk: Vec<u8> = (0..400 * 200)
        .flat_map(|i| {
            if i % 400 < 200 {
                [255, 40, 40, 255]
            } else {
                [40, 40, 255, 255]
            }
        })
        .collect();
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_CMYK);
    compress.set_size(400, 200);
    compress.set_quality(90.0);
    let mut started = compress.start_compress(Vec::new()).unwrap();
    started.write_scanlines(&cmyk).unwrap();
    let jpeg = started.finish().unwrap();
    let out = run(&jpeg, &params("width=50").unwrap());
    assert_eq!((out.width, out.height), (50, 25));
    let image = image::load_from_memory(&out.bytes).unwrap();
    assert_eq!(image.color(), image::ColorType::Rgb8);
    let rgb = image.to_rgb8();
    assert!(
        rgb.get_pixel(5, 12)[0] > 180 && rgb.get_pixel(5, 12)[2] < 90,
        "{:?}",
        rgb.get_pixel(5, 12)
    );
}

#[test]
fn a_header_over_max_source_pixels_is_refused_before_reserving() {
    let jpeg = quadrant_jpeg();
    let tight = Limits {
        max_source_pixels: 1_000_000,
        ..limits()
    };
    let got = transform(
        Bytes::from(jpeg),
        &params("width=100").unwrap(),
        &tight,
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

/// A PNG of 16 × 16 with an ICC profile of `len` bytes (compressed in its `iCCP` chunk).
fn png_with_icc(len: usize) -> Vec<u8> {
    let rgb = image::RgbImage::from_pixel(16, 16, image::Rgb([1, 2, 3]));
    let mut png = Vec::new();
    let mut encoder = PngEncoder::new(&mut png);
    encoder.set_icc_profile(vec![7; len]).unwrap();
    encoder
        .write_image(rgb.as_raw(), 16, 16, image::ExtendedColorType::Rgb8)
        .unwrap();
    png
}

#[test]
fn an_icc_profile_over_the_limit_is_dropped_not_copied() {
    let output_icc = |png: &[u8], format: &str| {
        let out = run(png, &params(&format!("width=8&format={format}")).unwrap());
        assert_eq!(out.width, 8);
        assert!(
            out.bytes.len() < 2 * ICC_PROFILE_MAX_BYTES,
            "{} bytes",
            out.bytes.len()
        );
        out
    };
    // an iCCP chunk of some kilobytes that inflates to 48 MiB: not inflated past the limit,
    // dropped; the output is a few hundred bytes, not 50 MB
    let bomb = png_with_icc(48 << 20);
    assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
    let out = output_icc(&bomb, "webp");
    assert!(out.bytes.len() < 10_000, "{} bytes", out.bytes.len());
    let png = run(&bomb, &params("width=8").unwrap());
    let decoder = image::codecs::png::PngDecoder::new(Cursor::new(png.bytes)).unwrap();
    let mut decoder = decoder;
    assert_eq!(decoder.icc_profile().unwrap(), None);
    // just over the limit: dropped too; a profile of ordinary size is kept
    let over = run(
        &png_with_icc(ICC_PROFILE_MAX_BYTES + 1),
        &params("width=8").unwrap(),
    );
    let mut decoder = image::codecs::png::PngDecoder::new(Cursor::new(over.bytes)).unwrap();
    assert_eq!(decoder.icc_profile().unwrap(), None);
    let kept = run(&png_with_icc(600 << 10), &params("width=8").unwrap());
    let mut decoder = image::codecs::png::PngDecoder::new(Cursor::new(kept.bytes)).unwrap();
    assert_eq!(
        decoder.icc_profile().unwrap().map(|p| p.len()),
        Some(600 << 10)
    );
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
fn webp_sources_are_decoded_scaled_and_reencoded_lossy() {
    let rgb = image::RgbImage::from_fn(300, 300, |x, y| {
        image::Rgb([
            (x * 3 % 256) as u8,
            (y * 5 % 256) as u8,
            ((x ^ y) % 256) as u8,
        ])
    });
    // the image crate writes lossless WebP: the source is VP8L
    let lossless = encoded(&DynamicImage::ImageRgb8(rgb.clone()), ImageFormat::WebP);
    assert_eq!(&lossless[12..16], b"VP8L");
    let lossy = ::webp::Encoder::from_rgb(rgb.as_raw(), 300, 300)
        .encode(80.0)
        .to_vec();
    for source in [lossless, lossy] {
        let out = run(&source, &params("width=150&quality=50").unwrap());
        assert_eq!(out.content_type, "image/webp");
        assert_eq!(&out.bytes[12..16], b"VP8 ");
        assert_eq!((out.width, out.height), (150, 150));
        // streamed in small pieces, the same
        let streamed = run_streamed(&source, &params("width=150&quality=50").unwrap(), 64, 999);
        assert_eq!(streamed.bytes, out.bytes);
    }
}

#[test]
fn a_streamed_source_gives_what_the_whole_one_gives() {
    let rgb = image::RgbImage::from_fn(1200, 900, |x, y| {
        image::Rgb([(x % 251) as u8, (y % 241) as u8, ((x + y) % 239) as u8])
    });
    for format in [ImageFormat::Png, ImageFormat::Jpeg] {
        let source = encoded(&DynamicImage::ImageRgb8(rgb.clone()), format);
        let p = params("width=300").unwrap();
        let whole = run(&source, &p);
        let streamed = run_streamed(&source, &p, 4096, 3000);
        assert_eq!(whole.bytes, streamed.bytes, "{format:?}");
    }
}

#[test]
fn a_png_with_bad_checksums_renders_as_libvips_renders_it() {
    // Supabase's acceptance suite's 1 x 1 PNG: its IDAT CRC is wrong
    let png = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAQAAAC1HAwCAAAAC0lEQVR42mP8/x8AAwMCAO+/p94AAAAASUVORK5CYII=",
    )
    .unwrap();
    let out = run(&png, &params("width=1&height=1").unwrap());
    assert_eq!((out.width, out.height), (1, 1));
    let webp = run(&png, &params("width=1&height=1&format=webp").unwrap());
    assert_eq!(webp.content_type, "image/webp");
}

#[test]
fn past_the_deadline_a_transform_stops() {
    let png = encoded(
        &DynamicImage::ImageRgb8(image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))),
        ImageFormat::Png,
    );
    let p = params("width=10").unwrap();
    let limits = limits();
    let plan = plan(&png, Some(png.len() as u64), &p, &limits).unwrap();
    let reader = SourceReader::whole(Bytes::from(png), Instant::now());
    assert!(matches!(
        super::run(reader, &plan, &p, &limits),
        Err(TransformError::TimedOut)
    ));
}

#[test]
fn non_images_are_refused_from_their_first_bytes() {
    let got = transform(
        Bytes::from_static(b"not an image"),
        &params("width=1").unwrap(),
        &limits(),
        |_| Some(()),
    );
    assert!(matches!(got, Err(TransformError::NotAnImage(_))), "{got:?}");
}
