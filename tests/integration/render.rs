//! Supabase's render route served by imgedge through real sockets: geometry of each fit, the
//! source's format out, parameters refused as Supabase refuses them (without contacting the
//! origin), the original byte for byte without parameters, a decode bomb refused from its
//! header, variant validators and 304s, HEAD, a missing source.

use std::io::Cursor;
use std::time::{Duration, Instant};

use crate::support::*;
use image::{DynamicImage, ImageFormat, RgbImage, RgbaImage};
use reqwest::Method;

const OBJECT: &str = "/storage/v1/object/public/photos/a/cat.png";
const RENDER: &str = "/storage/v1/render/image/public/photos/a/cat.png";
const JPEG_OBJECT: &str = "/storage/v1/object/public/photos/dog.jpg";
const JPEG_RENDER: &str = "/storage/v1/render/image/public/photos/dog.jpg";

/// A `width` × `height` image with a gradient (so that resizing has something to do).
fn picture(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let rgba = RgbaImage::from_fn(width, height, |x, y| {
        image::Rgba([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8, 255])
    });
    let image = match format {
        ImageFormat::Jpeg => DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(rgba).to_rgb8()),
        _ => DynamicImage::ImageRgba8(rgba),
    };
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn decoded(got: &Got) -> DynamicImage {
    image::load_from_memory(&got.body)
        .unwrap_or_else(|e| panic!("output does not decode: {e}; status {}", got.status))
}

async fn render_proxy() -> (TestOrigin, TestProxy) {
    let origin = render_origin().await;
    let proxy = TestProxy::for_origin(&origin, "").await;
    (origin, proxy)
}

/// An origin serving `OBJECT` (a 200 × 100 PNG) and `JPEG_OBJECT` (300 × 200), cacheable.
async fn render_origin() -> TestOrigin {
    let origin = TestOrigin::start().await;
    origin.route(
        OBJECT,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("etag", "\"v1\"")
            .header("cache-control", "public, max-age=60"),
    );
    origin.route(
        JPEG_OBJECT,
        Reply::ok(picture(300, 200, ImageFormat::Jpeg))
            .header("content-type", "image/jpeg")
            .header("cache-control", "public, max-age=60")
            .header("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
    );
    origin
}

#[tokio::test]
async fn each_fit_gives_the_size_it_promises_in_the_source_format() {
    let (origin, proxy) = render_proxy().await;
    const MISS: &str = "imgedge; fwd=uri-miss; stored; detail=transform";
    const HIT: &str = "imgedge; hit; detail=memory";
    for (query, want, cache_status) in [
        ("width=40", (40, 20), MISS),
        ("height=50", (100, 50), MISS),
        ("width=50&height=50", (50, 50), MISS),
        // cover is the default: the same rendition, stored by the request before
        ("width=50&height=50&resize=cover", (50, 50), HIT),
        ("width=50&height=50&resize=contain", (50, 25), MISS),
        ("width=50&height=50&resize=fill", (50, 50), MISS),
        ("width=99999", (2500, 1250), MISS),
        ("width=40", (40, 20), HIT),
    ] {
        let got = proxy.get(&format!("{RENDER}?{query}")).await;
        assert_eq!(got.status, 200, "{query}: {}", got.text());
        assert_eq!(got.header("content-type"), "image/png", "{query}");
        assert!(got.body.starts_with(b"\x89PNG\r\n\x1a\n"), "{query}");
        assert_eq!(
            got.header("content-length"),
            got.body.len().to_string(),
            "{query}"
        );
        let image = decoded(&got);
        assert_eq!((image.width(), image.height()), want, "{query}");
        assert_eq!(got.header("x-content-type-options"), "nosniff");
        assert_eq!(got.cache_status(), cache_status, "{query}");
    }
    // each of the 6 new renditions read the source from the origin: the memory tier keeps
    // renditions, not their sources (transform.sources_in_memory), and there is no tier below
    assert_eq!(origin.hits(OBJECT), 6);

    let got = proxy
        .get(&format!("{JPEG_RENDER}?width=150&quality=60"))
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), "image/jpeg");
    assert!(got.body.starts_with(&[0xFF, 0xD8, 0xFF]));
    let image = decoded(&got);
    assert_eq!((image.width(), image.height()), (150, 100));
}

#[tokio::test]
async fn cover_crops_and_fill_stretches() {
    // left half red, right half blue: a centred square crop of a 2:1 image keeps both halves
    // equally; a stretch keeps them too, but contain keeps the aspect
    let origin = TestOrigin::start().await;
    let halves = RgbImage::from_fn(200, 100, |x, _| {
        if x < 100 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let mut png = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(halves)
        .write_to(&mut png, ImageFormat::Png)
        .unwrap();
    origin.route(
        OBJECT,
        Reply::ok(png.into_inner()).header("content-type", "image/png"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let got = proxy
        .get(&format!("{RENDER}?width=20&height=20&resize=cover"))
        .await;
    let image = decoded(&got).to_rgb8();
    // a crop of the middle 100x100: red at the far left, blue at the far right
    assert!(
        image.get_pixel(1, 10)[0] > 200,
        "{:?}",
        image.get_pixel(1, 10)
    );
    assert!(
        image.get_pixel(18, 10)[2] > 200,
        "{:?}",
        image.get_pixel(18, 10)
    );
}

#[tokio::test]
async fn bad_parameters_are_400_and_contact_nothing() {
    let (origin, proxy) = render_proxy().await;
    let mut bad = vec![
        "quality=10",
        "quality=101",
        "width=abc",
        "width=1.5",
        "resize=stretch",
        "format=gif",
        "width=10&width=20",
    ];
    // AVIF output exists only in a build with the feature
    if cfg!(not(feature = "avif")) {
        bad.push("format=avif");
    }
    for query in bad {
        let got = proxy.get(&format!("{RENDER}?{query}")).await;
        assert_eq!(got.status, 400, "{query}");
        assert_eq!(got.error_code(), "bad_parameter", "{query}");
    }
    assert_eq!(origin.total_hits(), 0);
    let got = proxy.send(Method::POST, RENDER, &[]).await;
    assert_eq!(got.status, 405);
}

#[tokio::test]
async fn without_parameters_the_original_is_served_byte_for_byte() {
    let (origin, proxy) = render_proxy().await;
    let original = picture(200, 100, ImageFormat::Png);
    let first = proxy.get(RENDER).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body.as_ref(), original.as_slice());
    assert_eq!(first.header("etag"), "\"v1\"");
    // the object route's cache entry: the render path and the object path share it
    let second = proxy.get(OBJECT).await;
    assert_eq!(second.body.as_ref(), original.as_slice());
    assert!(
        second.cache_status().contains("hit"),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.hits(OBJECT), 1);
}

#[tokio::test]
async fn a_decode_bomb_is_refused_from_its_header() {
    let origin = TestOrigin::start().await;
    origin.route(
        OBJECT,
        Reply::ok(png_claiming(100_000, 100_000)).header("content-type", "image/png"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let start = Instant::now();
    let got = proxy.get(&format!("{RENDER}?width=100")).await;
    let took = start.elapsed();
    assert_eq!(got.status, 422, "{}", got.text());
    assert_eq!(got.error_code(), "image_too_large");
    assert!(got.text().contains("100000x100000"), "{}", got.text());
    // a loopback round trip and a header read; nothing decoded (a debug build, generous bound)
    assert!(took < Duration::from_secs(2), "{took:?}");

    // not an image at all
    origin.route(
        OBJECT,
        Reply::ok("<html>hello</html>").header("content-type", "image/png"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let got = proxy.get(&format!("{RENDER}?width=100")).await;
    // 400, as Supabase answers a render of what it cannot render
    assert_eq!(got.status, 400, "{}", got.text());
    assert_eq!(got.error_code(), "invalid_source");
}

#[tokio::test]
async fn sources_over_max_source_bytes_are_413() {
    let (_origin, proxy) = {
        let origin = TestOrigin::start().await;
        origin.route(
            OBJECT,
            Reply::ok(picture(200, 100, ImageFormat::Png)).header("content-type", "image/png"),
        );
        let proxy = TestProxy::for_origin(&origin, "[transform]\nmax_source_bytes = 100\n").await;
        (origin, proxy)
    };
    let got = proxy.get(&format!("{RENDER}?width=10")).await;
    assert_eq!(got.status, 413, "{}", got.text());
    assert_eq!(got.error_code(), "too_large");
}

#[tokio::test]
async fn variants_have_their_own_validators_and_answer_304() {
    let (_origin, proxy) = render_proxy().await;
    let a = proxy.get(&format!("{RENDER}?width=40")).await;
    let b = proxy.get(&format!("{RENDER}?width=41")).await;
    let c = proxy.get(&format!("{RENDER}?width=40&resize=cover")).await;
    let (ea, eb, ec) = (a.header("etag"), b.header("etag"), c.header("etag"));
    assert!(ea.starts_with("\"r-"), "{ea}");
    assert_ne!(ea, eb);
    assert_ne!(ea, "\"v1\"");
    // the default fit spelled out is the same variant
    assert_eq!(ea, ec);
    assert_eq!(a.header("cache-control"), "public, max-age=60");
    let not_modified = proxy
        .send(
            Method::GET,
            &format!("{RENDER}?width=40"),
            &[("if-none-match", &ea)],
        )
        .await;
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), ea);
    // a variant of a source without an ETag: derived from Last-Modified
    let j = proxy.get(&format!("{JPEG_RENDER}?width=40")).await;
    assert!(j.header("etag").starts_with("\"r-"), "{}", j.header("etag"));
}

#[tokio::test]
async fn head_download_and_missing_sources() {
    let (_origin, proxy) = render_proxy().await;
    let get = proxy.get(&format!("{RENDER}?width=40&download")).await;
    assert_eq!(get.header("content-disposition"), "attachment");
    let head = proxy
        .send(Method::HEAD, &format!("{RENDER}?width=40"), &[])
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), get.body.len().to_string());
    let named = proxy
        .get(&format!("{RENDER}?width=40&download=my%22cat.png"))
        .await;
    assert_eq!(
        named.header("content-disposition"),
        "attachment; filename=\"my_cat.png\""
    );
    let missing = proxy
        .get("/storage/v1/render/image/public/photos/nope.png?width=40")
        .await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    assert_eq!(missing.error_code(), "not_found");
}

/// A PNG whose header claims `width` × `height` RGBA pixels, with a token IDAT: a decode bomb
/// of a few dozen bytes.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 6, 0, 0, 0]);
    chunk(&mut png, b"IHDR", &ihdr);
    chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut png, b"IEND", &[]);
    png
}

/// A progressive JPEG of `width` x `height`, noisy (so that the file is large: a slow origin can
/// hold it part way) or of one colour (small).
fn progressive_jpeg(width: usize, height: usize, noisy: bool) -> Vec<u8> {
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_size(width, height);
    compress.set_progressive_mode();
    let mut started = compress.start_compress(Vec::new()).unwrap();
    let mut seed = 0x9e37_79b9_u32;
    let pixels: Vec<u8> = (0..width * height * 3)
        .map(|_| {
            if noisy {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            } else {
                90
            }
        })
        .collect();
    started.write_scanlines(&pixels).unwrap();
    started.finish().unwrap()
}

#[tokio::test]
async fn a_transform_the_fill_pool_could_never_hold_is_refused_for_good() {
    let origin = TestOrigin::start().await;
    // a progressive JPEG holds every coefficient while it decodes: 3000 x 2000 x 3 x 2 bytes,
    // more than the whole pool, although the file itself (one colour) is small
    let jpeg = progressive_jpeg(3000, 2000, false);
    assert!(jpeg.len() < 1 << 20, "{}", jpeg.len());
    origin.route(
        OBJECT,
        Reply::ok(jpeg.clone()).header("content-type", "image/jpeg"),
    );
    let proxy = TestProxy::for_origin(&origin, "[memory]\ninflight_fill_bytes = 16000000\n").await;
    assert_eq!(proxy.get(OBJECT).await.status, 200);
    let got = proxy.get(&format!("{RENDER}?width=20")).await;
    assert_eq!(got.status, 422, "{}", got.text());
    assert_eq!(got.error_code(), "image_too_large");
    assert!(got.text().contains("inflight_fill_bytes"), "{}", got.text());
    // the original is still served, and the pool is whole again: a small source transforms
    origin.route(
        "/storage/v1/object/public/photos/small.png",
        Reply::ok(picture(50, 50, ImageFormat::Png)).header("content-type", "image/png"),
    );
    let got = proxy
        .get("/storage/v1/render/image/public/photos/small.png?width=10")
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(proxy.get(OBJECT).await.body.as_ref(), jpeg.as_slice());
}

#[tokio::test]
async fn a_transform_waits_for_room_in_the_fill_pool_as_long_as_its_queue_timeout() {
    let origin = TestOrigin::start().await;
    // two large progressive JPEGs: the pool holds one transform's plan, not two
    let jpeg = progressive_jpeg(1600, 1200, true);
    assert!(jpeg.len() > 500_000, "{}", jpeg.len());
    let plan = imgedge::transform::plan(
        &jpeg,
        Some(jpeg.len() as u64),
        &imgedge::transform::Params::from_query(Some("width=20"), 2500).unwrap(),
        &imgedge::transform::Limits {
            max_source_pixels: 71_000_000,
            max_dimension: 2500,
            max_animation_frames: 500,
            max_animation_pixels: 500_000_000,
            timeout: Duration::from_secs(10),
        },
    )
    .unwrap();
    // one plan and both sources' fills, not two plans
    let pool = plan.reserve_bytes + 3 * jpeg.len() as u64;
    assert!(pool < 2 * plan.reserve_bytes, "{pool}");
    let gate = std::sync::Arc::new(tokio::sync::Notify::new());
    // the first source stops after its header until the gate opens (within the upstream's
    // idle_timeout): its transform holds its reservation meanwhile
    for name in ["held", "other", "third"] {
        origin.route(
            &format!("/storage/v1/object/public/photos/{name}.jpg"),
            Reply::ok(jpeg.clone())
                .header("content-type", "image/jpeg")
                .fault(if name == "held" {
                    Fault::GateAfter(200_000, gate.clone())
                } else {
                    Fault::None
                }),
        );
    }
    let proxy = std::sync::Arc::new(
        TestProxy::for_origin(
            &origin,
            &format!(
                "[memory]\ninflight_fill_bytes = {pool}\n[transform]\nqueue_timeout = \"1s\"\n\
                 [upstream]\nidle_timeout = \"10s\"\n"
            ),
        )
        .await,
    );
    let render = |name: &'static str| {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy
                .get(&format!(
                    "/storage/v1/render/image/public/photos/{name}.jpg?width=20"
                ))
                .await
        })
    };
    let first = render("held");
    // the first has reserved once its source is held at the gate
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&proxy, "imgedge_fill_reserved_bytes").await < plan.reserve_bytes as f64 {
        assert!(
            Instant::now() < deadline,
            "the first transform never reserved"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // no room comes: the second waits its queue_timeout, then "try later"
    let waited = Instant::now();
    let second = render("other").await.unwrap();
    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(second.error_code(), "overloaded");
    assert_eq!(second.header("retry-after"), "1");
    assert!(
        waited.elapsed() >= Duration::from_millis(900),
        "{:?}",
        waited.elapsed()
    );
    // room comes while the third waits: it is made, not refused
    let third = render("third");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished());
    gate.notify_one();
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.text());
    let third = third.await.unwrap();
    assert_eq!(third.status, 200, "{}", third.text());
    // and the one refused is made now that the pool is whole again
    let again = proxy
        .get("/storage/v1/render/image/public/photos/other.jpg?width=20")
        .await;
    assert_eq!(again.status, 200, "{}", again.text());
}

/// A progressive JPEG of `width` x `height` grey pixels that is all scans: a DC scan, then
/// `ac_scans` AC scans of one 15-bit code each (an end-of-band run over every block), as in the
/// CPU bomb of libjpeg-turbo's "Two Issues with the JPEG Standard": each scan costs the decoder a
/// pass over every block, and a few bytes of file.
fn many_scans_jpeg(width: u16, height: u16, ac_scans: usize) -> Vec<u8> {
    fn segment(out: &mut Vec<u8>, marker: u8, payload: &[u8]) {
        out.extend([0xFF, marker]);
        out.extend((payload.len() as u16 + 2).to_be_bytes());
        out.extend_from_slice(payload);
    }
    let mut out = vec![0xFF, 0xD8];
    segment(&mut out, 0xDB, &[[0u8].as_slice(), &[1; 64]].concat());
    let [h1, h0] = height.to_be_bytes();
    let [w1, w0] = width.to_be_bytes();
    segment(&mut out, 0xC2, &[8, h1, h0, w1, w0, 1, 1, 0x11, 0]);
    // DC table 0 and AC table 0: a single one-bit code each (DC: no difference; AC: a run of
    // 2^14 end-of-bands plus 14 bits)
    let one_code = |class: u8, symbol: u8| {
        let mut t = vec![class, 1];
        t.extend([0; 15]);
        t.push(symbol);
        t
    };
    segment(&mut out, 0xC4, &one_code(0x00, 0x00));
    segment(&mut out, 0xC4, &one_code(0x10, 0xE0));
    segment(&mut out, 0xDA, &[1, 1, 0x00, 0, 0, 0x00]);
    let blocks = usize::from(width.div_ceil(8)) * usize::from(height.div_ceil(8));
    assert!(blocks <= 32_767, "one run covers at most 32 767 blocks");
    out.extend(vec![0u8; blocks / 8]);
    if blocks % 8 != 0 {
        out.push(0xFF >> (blocks % 8));
        if out.last() == Some(&0xFF) {
            out.push(0);
        }
    }
    for _ in 0..ac_scans {
        segment(&mut out, 0xDA, &[1, 1, 0x00, 1, 63, 0x00]);
        // 0, then fourteen 1s, then a padding 1: 0x7F 0xFF, the 0xFF stuffed
        out.extend([0x7F, 0xFF, 0x00]);
    }
    out.extend([0xFF, 0xD9]);
    out
}

#[tokio::test]
async fn a_jpeg_with_more_scans_than_the_limit_is_refused_before_decoding_them() {
    let origin = TestOrigin::start().await;
    // within the limit the crafted file is a JPEG that decodes (grey, as it says)
    let fine = "/storage/v1/object/public/photos/scans-400.jpg";
    let bomb = "/storage/v1/object/public/photos/scans-5000.jpg";
    origin.route(fine, Reply::ok(many_scans_jpeg(1024, 1024, 400)));
    origin.route(bomb, Reply::ok(many_scans_jpeg(1024, 1024, 5_000)));
    let proxy = TestProxy::for_origin(&origin, "").await;
    let got = proxy
        .get("/storage/v1/render/image/public/photos/scans-400.jpg?width=100")
        .await;
    assert_eq!(got.status, 200, "{}", got.text());
    let decoded = image::load_from_memory(&got.body).unwrap();
    assert_eq!((decoded.width(), decoded.height()), (100, 100));
    // past it: refused for good, as an image too large to render, not as a broken one
    let got = proxy
        .get("/storage/v1/render/image/public/photos/scans-5000.jpg?width=100")
        .await;
    assert_eq!(got.status, 422, "{}", got.text());
    assert_eq!(got.error_code(), "image_too_large");
    assert!(got.text().contains("more than 500 scans"), "{}", got.text());
    // the original itself is served as it is
    assert_eq!(proxy.get(bomb).await.status, 200);
}

#[tokio::test]
async fn exif_orientations_1_to_8_are_applied() {
    // 40 x 20, the top-left 20 x 10 quadrant red, the rest blue
    let source = RgbImage::from_fn(40, 20, |x, y| {
        if x < 20 && y < 10 {
            image::Rgb([255, 0, 0])
        } else {
            image::Rgb([0, 0, 255])
        }
    });
    let mut jpeg = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(source)
        .write_to(&mut jpeg, ImageFormat::Jpeg)
        .unwrap();
    let jpeg = jpeg.into_inner();
    let origin = TestOrigin::start().await;
    // (orientation, output size, where the red quadrant lands)
    let cases = [
        (1, (40, 20), "top-left"),
        (2, (40, 20), "top-right"),
        (3, (40, 20), "bottom-right"),
        (4, (40, 20), "bottom-left"),
        (5, (20, 40), "top-left"),
        (6, (20, 40), "top-right"),
        (7, (20, 40), "bottom-right"),
        (8, (20, 40), "bottom-left"),
    ];
    for (orientation, _, _) in cases {
        origin.route(
            &format!("/storage/v1/object/public/photos/o{orientation}.jpg"),
            Reply::ok(with_exif_orientation(&jpeg, orientation))
                .header("content-type", "image/jpeg"),
        );
    }
    let proxy = TestProxy::for_origin(&origin, "").await;
    for (orientation, size, corner) in cases {
        // quality alone makes it a transform at the source's size
        let got = proxy
            .get(&format!(
                "/storage/v1/render/image/public/photos/o{orientation}.jpg?quality=95"
            ))
            .await;
        assert_eq!(got.status, 200, "{orientation}: {}", got.text());
        let image = decoded(&got).to_rgb8();
        assert_eq!(image.dimensions(), size, "orientation {orientation}");
        let (w, h) = size;
        let (x, y) = match corner {
            "top-left" => (2, 2),
            "top-right" => (w - 3, 2),
            "bottom-right" => (w - 3, h - 3),
            _ => (2, h - 3),
        };
        let red = |x: u32, y: u32| {
            let p = image.get_pixel(x, y);
            p[0] > 180 && p[2] < 80
        };
        assert!(
            red(x, y),
            "orientation {orientation}: no red at the {corner}"
        );
        // and the opposite corner is not red
        assert!(!red(w - 1 - x, h - 1 - y), "orientation {orientation}");
    }
}

#[tokio::test]
async fn the_source_icc_profile_is_kept() {
    use image::{ImageDecoder, ImageEncoder};
    // an arbitrary profile: the bytes are carried, not interpreted
    let profile: Vec<u8> = (0..600u32).map(|i| (i * 7 % 251) as u8).collect();
    let rgb = RgbImage::from_fn(60, 40, |x, y| image::Rgb([x as u8 * 4, y as u8 * 6, 90]));
    let mut png = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut png);
    encoder.set_icc_profile(profile.clone()).unwrap();
    encoder
        .write_image(rgb.as_raw(), 60, 40, image::ExtendedColorType::Rgb8)
        .unwrap();
    let mut jpeg = Vec::new();
    let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90);
    encoder.set_icc_profile(profile.clone()).unwrap();
    encoder
        .write_image(rgb.as_raw(), 60, 40, image::ExtendedColorType::Rgb8)
        .unwrap();
    let origin = TestOrigin::start().await;
    origin.route(OBJECT, Reply::ok(png).header("content-type", "image/png"));
    origin.route(
        JPEG_OBJECT,
        Reply::ok(jpeg).header("content-type", "image/jpeg"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;

    let got = proxy.get(&format!("{RENDER}?width=30")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let mut decoder = image::codecs::png::PngDecoder::new(Cursor::new(got.body.to_vec())).unwrap();
    assert_eq!(decoder.icc_profile().unwrap(), Some(profile.clone()));

    let got = proxy.get(&format!("{JPEG_RENDER}?width=30")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let mut decoder =
        image::codecs::jpeg::JpegDecoder::new(Cursor::new(got.body.to_vec())).unwrap();
    assert_eq!(decoder.icc_profile().unwrap(), Some(profile));
}

#[tokio::test]
async fn allowed_widths_refuse_the_others_before_fetching() {
    let origin = TestOrigin::start().await;
    origin.route(
        OBJECT,
        Reply::ok(picture(200, 100, ImageFormat::Png)).header("content-type", "image/png"),
    );
    let proxy = TestProxy::for_origin(&origin, "[transform]\nallowed_widths = [40, 80]\n").await;
    let got = proxy.get(&format!("{RENDER}?width=41")).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.error_code(), "bad_parameter");
    assert_eq!(origin.total_hits(), 0);
    let got = proxy.get(&format!("{RENDER}?width=80")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(decoded(&got).width(), 80);
}

#[tokio::test]
async fn concurrent_requests_for_one_variant_share_one_transform() {
    let origin = TestOrigin::start().await;
    // big enough that its transform (a debug build) outlasts the requests' arrival
    origin.route(
        OBJECT,
        Reply::ok(picture(1600, 1200, ImageFormat::Png)).header("content-type", "image/png"),
    );
    let proxy = std::sync::Arc::new(TestProxy::for_origin(&origin, "").await);
    let requests: Vec<_> = (0..8)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get(&format!("{RENDER}?width=100")).await })
        })
        .collect();
    let mut bodies = Vec::new();
    for r in requests {
        let got = r.await.unwrap();
        assert_eq!(got.status, 200, "{}", got.text());
        bodies.push(got.body);
    }
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
    let metrics = proxy.get("/metrics").await.text();
    let count = |outcome: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| {
                l.strip_prefix(&format!(
                    "imgedge_transforms_total{{outcome=\"{outcome}\"}} "
                ))
            })
            .map_or(0, |v| v.trim().parse().unwrap())
    };
    assert_eq!(count("ok"), 1, "{metrics}");
    assert_eq!(count("collapsed"), 7, "{metrics}");
    assert_eq!(origin.hits(OBJECT), 1);
    // once it is done, the rendition is stored: the next request is a hit, not a transform
    let got = proxy.get(&format!("{RENDER}?width=100")).await;
    assert_eq!(got.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(got.body, bodies[0]);
    let metrics = proxy.get("/metrics").await.text();
    assert!(
        metrics.contains("imgedge_transforms_total{outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn image_proxy_takes_w_h_fit_q_and_format() {
    let origin = TestOrigin::start().await;
    origin.route(
        "/cat.png",
        Reply::ok(picture(200, 100, ImageFormat::Png)).header("etag", "\"c1\""),
    );
    origin.route(
        "/dog.png",
        Reply::ok(picture(100, 200, ImageFormat::Png)).header("etag", "\"c1\""),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let encoded = |path: &str| {
        percent_encoding::utf8_percent_encode(&origin.url(path), percent_encoding::NON_ALPHANUMERIC)
            .to_string()
    };
    let cat = encoded("/cat.png");
    for (query, want, ctype) in [
        (format!("w=40&url={cat}"), (40, 20), "image/png"),
        (format!("url={cat}&w=40"), (40, 20), "image/png"),
        (
            format!("w=40&url={}", origin.url("/cat.png")),
            (40, 20),
            "image/png",
        ),
        (
            format!("url={cat}&w=50&h=50&fit=inside"),
            (50, 25),
            "image/png",
        ),
        (
            format!("url={cat}&w=50&h=50&fit=cover"),
            (50, 50),
            "image/png",
        ),
        (
            format!("url={cat}&w=50&h=50&fit=fill"),
            (50, 50),
            "image/png",
        ),
        (
            format!("url={cat}&w=50&h=50&fit=contain"),
            (50, 50),
            "image/png",
        ),
        (
            format!("url={cat}&w=40&format=jpeg&q=70"),
            (40, 20),
            "image/jpeg",
        ),
        (format!("url={cat}&format=auto&h=10"), (20, 10), "image/png"),
    ] {
        let got = proxy.get(&format!("/image-proxy?{query}")).await;
        assert_eq!(got.status, 200, "{query}: {}", got.text());
        assert_eq!(got.header("content-type"), ctype, "{query}");
        let image = decoded(&got);
        assert_eq!((image.width(), image.height()), want, "{query}");
        // /image-proxy's own headers are on transformed responses too
        assert_eq!(
            got.header("content-security-policy"),
            "default-src 'none'; sandbox",
            "{query}"
        );
    }
    // contain pads: the band above and below the fitted image is transparent
    let got = proxy
        .get(&format!("/image-proxy?url={cat}&w=50&h=50&fit=contain"))
        .await;
    let padded = decoded(&got).to_rgba8();
    assert_eq!(padded.get_pixel(25, 2)[3], 0);
    assert_eq!(padded.get_pixel(25, 25)[3], 255);
    // two images with the same ETag and parameters are two variants
    let dog = proxy
        .get(&format!("/image-proxy?url={}&w=40", encoded("/dog.png")))
        .await;
    assert_eq!((decoded(&dog).width(), decoded(&dog).height()), (40, 80));
    let cat40 = proxy.get(&format!("/image-proxy?url={cat}&w=40")).await;
    assert_ne!(dog.header("etag"), cat40.header("etag"));
    // bad parameters are 400 before anything is fetched; no parameters, the original
    let hits = origin.total_hits();
    for query in ["q=5", "w=x", "fit=stretch", "format=gif", "w=1&w=2"] {
        let got = proxy.get(&format!("/image-proxy?{query}&url={cat}")).await;
        assert_eq!(got.status, 400, "{query}");
        assert_eq!(got.error_code(), "bad_parameter", "{query}");
    }
    assert_eq!(origin.total_hits(), hits);
    let original = proxy.get(&format!("/image-proxy?url={cat}")).await;
    assert_eq!(
        original.body.as_ref(),
        picture(200, 100, ImageFormat::Png).as_slice()
    );
}

#[tokio::test]
async fn the_format_follows_accept_and_only_negotiated_responses_vary() {
    let (origin, proxy) = render_proxy().await;
    let with_accept = |query: &str, accept: &'static str| {
        let proxy = &proxy;
        let path = format!("{RENDER}?{query}");
        async move {
            let got = proxy.send(Method::GET, &path, &[("accept", accept)]).await;
            assert_eq!(got.status, 200, "{path} {accept}: {}", got.text());
            got
        }
    };
    let browser = "image/avif,image/webp,image/apng,*/*;q=0.8";
    let webp = with_accept("width=40", browser).await;
    assert_eq!(webp.header("content-type"), "image/webp");
    assert!(webp.body.starts_with(b"RIFF") && &webp.body[8..12] == b"WEBP");
    assert_eq!(decoded(&webp).width(), 40);
    assert_eq!(webp.header("vary"), "Accept");
    let png = with_accept("width=40", "*/*").await;
    assert_eq!(png.header("content-type"), "image/png");
    assert_eq!(png.header("vary"), "Accept");
    assert_ne!(png.header("etag"), webp.header("etag"));
    // no Accept at all: the source's format, the same rendition as for */*
    let plain = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(plain.header("content-type"), "image/png");
    assert_eq!(plain.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(plain.body, png.body);
    // refused with q=0
    let refused = with_accept("width=40", "image/webp;q=0, */*").await;
    assert_eq!(refused.header("content-type"), "image/png");
    // the WebP rendition is stored under the negotiated format, never the raw Accept
    let other_browser = with_accept("width=40", "image/webp,*/*").await;
    assert_eq!(other_browser.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(other_browser.body, webp.body);
    // a format asked for does not vary
    let origin_format = with_accept("width=40&format=origin", browser).await;
    assert_eq!(origin_format.header("content-type"), "image/png");
    assert_eq!(origin_format.header("vary"), "");
    let fixed = with_accept("width=40&format=webp", "*/*").await;
    assert_eq!(fixed.header("content-type"), "image/webp");
    assert_eq!(fixed.header("vary"), "");
    // a 304 for a negotiated rendition says Vary too
    let not_modified = proxy
        .send(
            Method::GET,
            &format!("{RENDER}?width=40"),
            &[("accept", browser), ("if-none-match", &webp.header("etag"))],
        )
        .await;
    assert_eq!(not_modified.status, 304);
    assert_eq!(not_modified.header("vary"), "Accept");
    // no parameters: the original, byte for byte, not varying
    let original = with_accept("", browser).await;
    assert_eq!(original.body, picture(200, 100, ImageFormat::Png));
    assert_eq!(original.header("vary"), "");
    // /image-proxy: format=auto (or none) negotiates, a named format does not
    origin.route(
        "/plain.png",
        Reply::ok(picture(200, 100, ImageFormat::Png)).header("etag", "\"p1\""),
    );
    let cat = percent_encoding::utf8_percent_encode(
        &origin.url("/plain.png"),
        percent_encoding::NON_ALPHANUMERIC,
    )
    .to_string();
    for (query, ctype, vary) in [
        (format!("url={cat}&w=30"), "image/webp", "Accept"),
        (
            format!("url={cat}&w=30&format=auto"),
            "image/webp",
            "Accept",
        ),
        (format!("url={cat}&w=30&format=png"), "image/png", ""),
        (format!("url={cat}&w=30&format=webp"), "image/webp", ""),
    ] {
        let got = proxy
            .send(
                Method::GET,
                &format!("/image-proxy?{query}"),
                &[("accept", browser)],
            )
            .await;
        assert_eq!(got.status, 200, "{query}: {}", got.text());
        assert_eq!(got.header("content-type"), ctype, "{query}");
        assert_eq!(got.header("vary"), vary, "{query}");
        assert_eq!(decoded(&got).width(), 30, "{query}");
    }
    // each source once for each of its 2 renditions (WebP, PNG: sources are not kept in
    // memory, transform.sources_in_memory), and the original once
    assert_eq!(origin.hits(OBJECT), 3);
    assert_eq!(origin.hits("/plain.png"), 2);
}

/// The value of one `/metrics` sample (`name{labels}`), 0 when it is not there yet.
async fn metric(proxy: &TestProxy, sample: &str) -> f64 {
    let metrics = proxy.get("/metrics").await.text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The transforms counter's `ok` value.
async fn transforms(proxy: &TestProxy) -> u64 {
    metric(proxy, "imgedge_transforms_total{outcome=\"ok\"}").await as u64
}

#[tokio::test]
async fn renditions_are_stored_purged_with_their_source_and_dropped_when_it_changes() {
    let origin = TestOrigin::start().await;
    let token = "purge-token-0123456789";
    // fresh for three seconds, then revalidated. Not one: Date has a resolution of a second, so
    // a response's age starts anywhere up to a second (RFC 9111 §4.2.3's apparent age), and a
    // one-second lifetime could end before the next request on a busy machine
    origin.route(
        OBJECT,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("etag", "\"v1\"")
            .header("cache-control", "public, max-age=3"),
    );
    let proxy = TestProxy::for_origin(&origin, &format!("[admin]\ntoken = \"{token}\"")).await;
    let first = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(
        first.cache_status(),
        "imgedge; fwd=uri-miss; stored; detail=transform"
    );
    let again = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(again.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(
        (again.body.clone(), again.header("etag")),
        (first.body.clone(), first.header("etag"))
    );
    assert_eq!(transforms(&proxy).await, 1);
    assert_eq!(origin.hits(OBJECT), 1);

    // purging the source (by its object path) purges its renditions: the source fetched again
    // (here a second later: a fill is told apart by its Date) starts a new generation
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let purged = proxy.purge_path(token, OBJECT).await;
    assert_eq!(purged.json()["purged"], 1, "{}", purged.text());
    let after_purge = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(
        after_purge.cache_status(),
        "imgedge; fwd=uri-miss; stored; detail=transform"
    );
    assert_eq!(
        after_purge.header("etag"),
        first.header("etag"),
        "the same version"
    );
    assert_eq!(transforms(&proxy).await, 2);
    assert_eq!(origin.hits(OBJECT), 2);

    // the source changes: once it is stale, the revalidation brings the new version, and the
    // old rendition is not served again
    origin.route(
        OBJECT,
        Reply::ok(picture(100, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("etag", "\"v2\"")
            .header("cache-control", "public, max-age=60"),
    );
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let changed = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(changed.status, 200, "{}", changed.text());
    assert_eq!(
        (decoded(&changed).width(), decoded(&changed).height()),
        (40, 40)
    );
    assert_ne!(changed.header("etag"), first.header("etag"));
    assert_eq!(transforms(&proxy).await, 3);
    // a client holding the old rendition's ETag gets the new one, not 304
    let old = proxy
        .send(
            Method::GET,
            &format!("{RENDER}?width=40"),
            &[("if-none-match", &first.header("etag"))],
        )
        .await;
    assert_eq!(old.status, 200);
    assert_eq!(old.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(old.body, changed.body);

    // the object route storing a new version (here: forced by the client) drops the record
    origin.route(
        OBJECT,
        Reply::ok(picture(50, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("etag", "\"v3\"")
            .header("cache-control", "public, max-age=60"),
    );
    let reloaded = proxy
        .send(Method::GET, OBJECT, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(reloaded.header("etag"), "\"v3\"");
    let newest = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(
        (decoded(&newest).width(), decoded(&newest).height()),
        (40, 80)
    );
    assert_eq!(transforms(&proxy).await, 4);
}

#[tokio::test]
async fn an_authenticated_render_is_made_from_the_object_fetched_with_the_client_s_credentials() {
    let origin = TestOrigin::start().await;
    let object = "/storage/v1/object/authenticated/photos/a.png";
    let render = "/storage/v1/render/image/authenticated/photos/a.png?width=40&resize=contain";
    // as Storage answers an authenticated object: fresh, but not marked for sharing
    origin.route(
        object,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("cache-control", "max-age=3600"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    for round in 1..=2 {
        let got = proxy
            .send(
                Method::GET,
                render,
                &[("authorization", "Bearer user-jwt"), ("apikey", "anon")],
            )
            .await;
        assert_eq!(got.status, 200, "{}", got.text());
        let image = decoded(&got);
        assert_eq!((image.width(), image.height()), (40, 20));
        let sent = origin.last_request(object);
        for (name, value) in [("authorization", "Bearer user-jwt"), ("apikey", "anon")] {
            assert!(
                sent.iter().any(|(k, v)| k == name && v == value),
                "{name} not forwarded: {sent:?}"
            );
        }
        // RFC 9111 §3.5: an answer to credentials without public, s-maxage or must-revalidate
        // is not stored, so every render asks Storage again (which checks the user's rights)
        assert_eq!(origin.hits(object), round, "round {round}");
        assert!(
            !got.cache_status().contains("stored"),
            "{}",
            got.cache_status()
        );
    }
    assert_eq!(transforms(&proxy).await, 2);
}

/// A JWT-shaped token (its signature is Storage's to check) with `claims` as its payload.
fn token(claims: &str) -> String {
    use base64::Engine;
    let b = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!("{}.{}.sig", b(r#"{"alg":"HS256","typ":"JWT"}"#), b(claims))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_signed_render_takes_its_transformations_from_the_token_and_is_kept_no_longer_than_it() {
    let origin = TestOrigin::start().await;
    let exp = unix_now() + 2;
    let token = token(&format!(
        r#"{{"url":"photos/a.png","transformations":"height:20,width:40,resize:cover,format:undefined,gravity:fp:0:1","exp":{exp}}}"#
    ));
    // Storage verifies the token on its signed object route; this origin answers only it
    let object = format!("/storage/v1/object/sign/photos/a.png?token={token}");
    origin.route(
        &object,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("content-type", "image/png")
            .header("etag", "\"v1\"")
            .header("cache-control", "public, max-age=3600"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    // the query's own parameters are not the token's and are ignored, as Storage ignores them
    let render = format!("/storage/v1/render/image/sign/photos/a.png?width=120&token={token}");
    let got = proxy.get(&render).await;
    assert_eq!(got.status, 200, "{}", got.text());
    let image = decoded(&got);
    assert_eq!((image.width(), image.height()), (40, 20));
    // what was applied, as Storage lists it
    assert_eq!(
        got.header("x-transformations"),
        "height:20,width:40,resizing_type:fill,gravity:fp:0:1"
    );
    assert!(
        got.cache_status().contains("stored"),
        "{}",
        got.cache_status()
    );
    let again = proxy.get(&render).await;
    assert_eq!(again.cache_status(), "imgedge; hit; detail=memory");
    assert_eq!(origin.hits(&object), 1);
    // past the token's expiry nothing made from it is served without asking Storage again,
    // however long the origin said the object stays fresh
    let wait = Duration::from_secs(exp + 1 - unix_now()) + Duration::from_millis(200);
    tokio::time::sleep(wait).await;
    let late = proxy.get(&render).await;
    assert_eq!(origin.hits(&object), 2, "{}", late.cache_status());

    // a token that is not a JWT is refused before anything is fetched
    let bad = proxy
        .get("/storage/v1/render/image/sign/photos/a.png?token=garbage")
        .await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(
        origin.hits("/storage/v1/object/sign/photos/a.png?token=garbage"),
        0
    );
}

#[tokio::test]
async fn renditions_made_at_once_from_a_cold_source_are_all_kept() {
    // each reads the source itself when it is not kept (memory only, the default); they share
    // it when it is kept in memory
    for (config, source_fetches) in [("", 10), ("[transform]\nsources_in_memory = true", 1)] {
        renditions_made_at_once_from_a_cold_source(config, source_fetches).await;
    }
}

async fn renditions_made_at_once_from_a_cold_source(config: &str, source_fetches: usize) {
    let origin = render_origin().await;
    let proxy = std::sync::Arc::new(TestProxy::for_origin(&origin, config).await);
    let widths: Vec<u32> = (0..10).map(|i| 20 + i * 7).collect();
    let cold: Vec<_> = widths
        .iter()
        .map(|w| {
            let proxy = proxy.clone();
            let w = *w;
            tokio::spawn(async move { proxy.get(&format!("{RENDER}?width={w}")).await })
        })
        .collect();
    for r in cold {
        assert_eq!(r.await.unwrap().status, 200);
    }
    // every one of them is found again: they agreed on the source record's generation
    for w in &widths {
        let got = proxy.get(&format!("{RENDER}?width={w}")).await;
        assert_eq!(
            got.cache_status(),
            "imgedge; hit; detail=memory",
            "width={w}"
        );
        assert_eq!(decoded(&got).width(), *w);
    }
    assert_eq!(transforms(&proxy).await, 10);
    assert_eq!(origin.hits(OBJECT), source_fetches, "{config}");
}

#[tokio::test]
async fn renditions_made_from_fetches_a_second_apart_are_all_kept() {
    // In a memory-only deployment each new rendition fetches the source. Two made at once whose
    // fetches carry different Dates (a second's turn between them) must still agree on the
    // source record's generation, or the first one made is never found again: with one
    // transform at a time the second waits for its turn and builds on the record the first
    // stored; with two, they are made side by side.
    for max_concurrent in [1, 2] {
        let origin = TestOrigin::start().await;
        let dated = |at: std::time::SystemTime, delay_ms| {
            Reply::ok(picture(200, 100, ImageFormat::Png))
                .header("content-type", "image/png")
                .header("etag", "\"v1\"")
                .header("cache-control", "public, max-age=60")
                // ahead of the clock, so that the age it gives stays 0
                .header("date", &httpdate::fmt_http_date(at))
                .head_delay(Duration::from_millis(delay_ms))
        };
        let now = std::time::SystemTime::now();
        origin.route(OBJECT, dated(now + Duration::from_secs(5), 400));
        let config = format!("[transform]\nmax_concurrent = {max_concurrent}");
        let proxy = std::sync::Arc::new(TestProxy::for_origin(&origin, &config).await);
        let render = |w: u32| {
            let proxy = proxy.clone();
            tokio::spawn(async move { proxy.get(&format!("{RENDER}?width={w}")).await })
        };
        let first = render(40);
        tokio::time::sleep(Duration::from_millis(100)).await;
        origin.route(OBJECT, dated(now + Duration::from_secs(6), 400));
        let second = render(50);
        for made in [first.await.unwrap(), second.await.unwrap()] {
            assert_eq!(made.status, 200, "{}", made.text());
        }
        assert_eq!(origin.hits(OBJECT), 2, "max_concurrent = {max_concurrent}");
        for w in [40, 50] {
            let got = proxy.get(&format!("{RENDER}?width={w}")).await;
            assert_eq!(
                got.cache_status(),
                "imgedge; hit; detail=memory",
                "width={w}, max_concurrent = {max_concurrent}"
            );
            assert_eq!(decoded(&got).width(), w);
        }
        assert_eq!(transforms(&proxy).await, 2);
    }
}

#[tokio::test]
async fn the_memory_tier_keeps_renditions_and_a_lower_tier_their_sources() {
    // memory only (the default): a source read for a transform is stored nowhere, its record
    // and rendition are; one a client fetched itself serves the next rendition from memory
    let (origin, proxy) = render_proxy().await;
    let first = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(
        proxy
            .get(&format!("{RENDER}?width=40"))
            .await
            .cache_status(),
        "imgedge; hit; detail=memory"
    );
    let object = proxy.get(OBJECT).await;
    assert_eq!(object.cache_status(), "imgedge; fwd=uri-miss; stored");
    assert_eq!(origin.hits(OBJECT), 2);
    let second = proxy.get(&format!("{RENDER}?width=50")).await;
    assert_eq!(second.status, 200, "{}", second.text());
    assert_eq!(decoded(&second).width(), 50);
    assert_eq!(
        origin.hits(OBJECT),
        2,
        "the stored original made the rendition"
    );

    // with a disk tier: the source goes there only, and makes the next rendition from there
    let origin = render_origin().await;
    let dir = std::env::temp_dir().join(format!("imgedge-sources-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let disk = format!(
        "[cache]\ndisk_dir = \"{}\"\ndisk_capacity_bytes = 67108864",
        dir.display()
    );
    let proxy = TestProxy::for_origin(&origin, &disk).await;
    assert_eq!(proxy.get(&format!("{RENDER}?width=40")).await.status, 200);
    // the disk tier's write lands in the background: the next rendition reads it from there
    let on_disk = "imgedge_cache_requests_total{tier=\"disk\",result=\"hit\"}";
    let mut widths = 41..80;
    loop {
        let w = widths
            .next()
            .expect("the source reached the disk tier within 40 renditions");
        let got = proxy.get(&format!("{RENDER}?width={w}")).await;
        assert_eq!(got.status, 200, "{}", got.text());
        if metric(&proxy, on_disk).await >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let renditions = origin.hits(OBJECT);
    // memory never held it: a client's GET finds it on disk (and now keeps it in memory)
    assert_eq!(
        proxy.get(OBJECT).await.cache_status(),
        "imgedge; hit; detail=disk"
    );
    assert_eq!(
        proxy.get(OBJECT).await.cache_status(),
        "imgedge; hit; detail=memory"
    );
    assert_eq!(origin.hits(OBJECT), renditions);
    assert!(renditions < 40, "{renditions} origin requests");
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);

    // transform.sources_in_memory: the source is stored in memory too
    let origin = render_origin().await;
    let proxy = TestProxy::for_origin(&origin, "[transform]\nsources_in_memory = true").await;
    for w in [40, 50, 60] {
        assert_eq!(proxy.get(&format!("{RENDER}?width={w}")).await.status, 200);
    }
    assert_eq!(origin.hits(OBJECT), 1);
    assert_eq!(
        proxy.get(OBJECT).await.cache_status(),
        "imgedge; hit; detail=memory"
    );
}

/// A two-frame animated GIF, `width` × `height`.
fn animated_gif(width: u32, height: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut out);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .unwrap();
        for (shade, delay_ms) in [(0u8, 100), (200, 250)] {
            let frame = RgbaImage::from_pixel(width, height, image::Rgba([shade, 0, 0, 255]));
            let delay = image::Delay::from_numer_denom_ms(delay_ms, 1);
            encoder
                .encode_frame(image::Frame::from_parts(frame, 0, 0, delay))
                .unwrap();
        }
    }
    out
}

/// The frames of an animated GIF or WebP: (width, height, delay in ms) each.
fn frames_of(bytes: &[u8]) -> Vec<(u32, u32, u32)> {
    use image::AnimationDecoder;
    let frames: Vec<image::Frame> = if bytes.starts_with(b"GIF") {
        image::codecs::gif::GifDecoder::new(Cursor::new(bytes))
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap()
    } else {
        image::codecs::webp::WebPDecoder::new(Cursor::new(bytes))
            .unwrap()
            .into_frames()
            .collect_frames()
            .unwrap()
    };
    frames
        .iter()
        .map(|f| {
            let (n, d) = f.delay().numer_denom_ms();
            (f.buffer().width(), f.buffer().height(), n / d)
        })
        .collect()
}

#[tokio::test]
async fn animations_are_resized_frame_by_frame_with_their_timing() {
    let origin = TestOrigin::start().await;
    let gif = animated_gif(120, 60);
    let object = "/storage/v1/object/public/photos/spin.gif";
    let render = "/storage/v1/render/image/public/photos/spin.gif";
    origin.route(
        object,
        Reply::ok(gif.clone())
            .content_type(Some("image/gif"))
            .header("etag", "\"g1\"")
            .header("cache-control", "public, max-age=60"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let source = frames_of(&gif);
    assert_eq!(source, [(120, 60, 100), (120, 60, 250)]);
    let browser = "image/webp,*/*";
    // (query, Accept, content type): WebP for a client that takes it, else a GIF; a format
    // asked for wins
    for (query, accept, content_type) in [
        ("width=40", browser, "image/webp"),
        ("width=40&quality=50", browser, "image/webp"),
        ("width=40", "*/*", "image/gif"),
        ("width=40&format=origin", browser, "image/gif"),
        ("width=40&format=webp", "*/*", "image/webp"),
    ] {
        let got = proxy
            .send(
                Method::GET,
                &format!("{render}?{query}"),
                &[("accept", accept)],
            )
            .await;
        assert_eq!(got.status, 200, "{query}: {}", got.text());
        assert_eq!(got.header("content-type"), content_type, "{query}");
        assert_eq!(
            frames_of(&got.body),
            [(40, 20, 100), (40, 20, 250)],
            "{query}: every frame resized, each with its delay"
        );
    }
    // /image-proxy asking for a still format: the first frame, of the GIF and of an animated
    // WebP (libwebp's still decoder reads no animation)
    let webp = proxy
        .get(&format!("{render}?width=40&format=webp"))
        .await
        .body;
    let webp_object = "/storage/v1/object/public/photos/spin.webp";
    origin.route(
        webp_object,
        Reply::ok(webp.to_vec()).content_type(Some("image/webp")),
    );
    for (source, query, content_type, size) in [
        (object, "w=40&format=jpeg", "image/jpeg", (40, 20)),
        (webp_object, "w=20&format=jpeg", "image/jpeg", (20, 10)),
        (webp_object, "w=20&format=png", "image/png", (20, 10)),
    ] {
        let got = proxy
            .get(&format!("/image-proxy?{query}&url={}", origin.url(source)))
            .await;
        assert_eq!(got.status, 200, "{source} {query}: {}", got.text());
        assert_eq!(got.header("content-type"), content_type, "{source} {query}");
        let still = decoded(&got);
        assert_eq!((still.width(), still.height()), size, "{source} {query}");
    }
    // what /image-info says of it
    let info = proxy.get(&format!("/image-info{object}")).await;
    assert_eq!(info.status, 200, "{}", info.text());
    let json = info.json();
    assert_eq!(json["format"], "gif");
    assert_eq!(json["frames"], 2);
    assert_eq!(json["animated"], true);
    assert_eq!(json["duration_ms"], 350);
    // once for each of the route's 3 renditions (WebP, WebP at q=50, GIF) and once for
    // /image-proxy's (another namespace): sources are not kept in memory
    // (transform.sources_in_memory); /image-info answered from the source record
    assert_eq!(origin.hits(object), 4);
}

#[tokio::test]
async fn animations_over_their_limits_are_refused() {
    let origin = TestOrigin::start().await;
    let object = "/storage/v1/object/public/photos/spin.gif";
    let render = "/storage/v1/render/image/public/photos/spin.gif";
    origin.route(
        object,
        Reply::ok(animated_gif(120, 60)).header("content-type", "image/gif"),
    );
    for limit in ["max_animation_frames = 1", "max_animation_pixels = 10000"] {
        let proxy = TestProxy::for_origin(&origin, &format!("[transform]\n{limit}\n")).await;
        let got = proxy.get(&format!("{render}?width=40&format=webp")).await;
        assert_eq!(got.status, 422, "{limit}: {}", got.text());
        assert_eq!(got.error_code(), "image_too_large", "{limit}");
    }
}

/// AVIF output, in a build with the `avif` feature: `cargo test --features avif --test integration render::`.
#[cfg(feature = "avif")]
#[tokio::test]
async fn avif_is_served_when_asked_for() {
    let (_origin, proxy) = render_proxy().await;
    let got = proxy.get(&format!("{RENDER}?width=40&format=avif")).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("content-type"), "image/avif");
    assert_eq!(&got.body[4..12], b"ftypavif");
    assert_eq!(got.header("vary"), "");
}

#[tokio::test]
async fn purging_a_render_path_purges_its_source_and_every_rendition() {
    let origin = TestOrigin::start().await;
    origin.route(
        OBJECT,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("etag", "\"v1\"")
            .header("cache-control", "public, max-age=600"),
    );
    let token = "purge-token-0123456789";
    let proxy = TestProxy::for_origin(&origin, &format!("[admin]\ntoken = \"{token}\"")).await;
    for w in [40, 50] {
        proxy.get(&format!("{RENDER}?width={w}")).await;
    }
    let bearer = format!("Bearer {token}");
    let purged = proxy
        .send(
            Method::from_bytes(b"PURGE").unwrap(),
            &format!("{RENDER}?width=40"),
            &[("authorization", bearer.as_str())],
        )
        .await;
    assert_eq!(purged.json()["purged"], 1, "{}", purged.text());
    // a second later: the refetched source is a fill of its own (told apart by its Date)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for w in [40, 50] {
        let got = proxy.get(&format!("{RENDER}?width={w}")).await;
        assert_eq!(
            got.cache_status(),
            "imgedge; fwd=uri-miss; stored; detail=transform",
            "width={w}"
        );
    }
    // twice for each width: the source is not kept in memory (transform.sources_in_memory)
    assert_eq!(origin.hits(OBJECT), 4);
    // the bulk endpoint takes render paths too
    let purged = proxy.purge_path(token, &format!("{RENDER}?width=50")).await;
    assert_eq!(purged.json()["purged"], 1, "{}", purged.text());
}

#[tokio::test]
async fn a_rendition_of_a_revalidated_source_is_served_as_fresh_as_the_source() {
    let origin = TestOrigin::start().await;
    origin.route(
        OBJECT,
        Reply::ok(picture(200, 100, ImageFormat::Png))
            .header("etag", "\"v1\"")
            // three seconds, not one: an age starts anywhere up to a second (Date's resolution)
            .header("cache-control", "public, max-age=3"),
    );
    let proxy = TestProxy::for_origin(&origin, "").await;
    let first = proxy.get(&format!("{RENDER}?width=40")).await;
    assert_eq!(first.header("age"), "0");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    // the source is revalidated (the same version): the rendition is not made again, and is
    // not served older than the source's lifetime
    for _ in 0..2 {
        let got = proxy.get(&format!("{RENDER}?width=40")).await;
        assert_eq!(got.cache_status(), "imgedge; hit; detail=memory");
        assert_eq!(got.body, first.body);
        let age: u64 = got.header("age").parse().unwrap();
        assert!(age < 3, "Age {age} not below max-age=3");
    }
    assert_eq!(transforms(&proxy).await, 1);
    assert_eq!(origin.hits(OBJECT), 2, "one revalidation");
}
