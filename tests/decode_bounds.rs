//! Decoders bounded by what they reserved, whatever the bytes claim: mutated real images and
//! crafted headers (GIF frames larger than their screen, an iCCP chunk that inflates to 48 MiB,
//! animations, APNG, progressive JPEG, lossless and animated WebP, large ancillary chunks) go
//! through the whole transform (plan, reservation, decode, resize, encode), and every byte
//! allocated while each runs is counted: the peak must stay within what its plan reserved
//! (which includes `SLACK_BYTES`).
//!
//! Counting: this test binary defines `malloc`, `free` and the rest itself, forwarding to
//! glibc's (`__libc_malloc`, ...) and counting each allocation's usable size on the thread that
//! makes it. The executable's definitions take precedence over libc's, so the C codecs' own
//! allocations (MozJPEG, libwebp) are counted along with Rust's (whose `System` allocator is
//! `malloc`): a Rust `#[global_allocator]` alone would miss the C half. Only the test's own
//! thread counts, and only while a transform runs; memory allocated before (the source) and
//! freed during it lowers the count, which is why the sources are made before counting starts
//! and dropped after it ends.
//!
//! Bounded: a fixed set of inputs and a fixed number of mutations each (deterministic), each
//! transform under its own deadline. `DECODE_BOUNDS_MUTATIONS` raises the count for a longer
//! search.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::c_void;
use std::io::Cursor;
use std::time::Duration;

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, RgbaImage};
use imgedge::transform::{self, Limits, Params, TransformError};

// ---- counting allocator -------------------------------------------------------------------

unsafe extern "C" {
    fn __libc_malloc(size: usize) -> *mut c_void;
    fn __libc_calloc(n: usize, size: usize) -> *mut c_void;
    fn __libc_realloc(ptr: *mut c_void, size: usize) -> *mut c_void;
    fn __libc_free(ptr: *mut c_void);
    fn __libc_memalign(align: usize, size: usize) -> *mut c_void;
    fn malloc_usable_size(ptr: *mut c_void) -> usize;
}

thread_local! {
    /// Whether this thread counts.
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    /// Bytes allocated and not freed since counting started, and the most there were.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn account(bytes: i64) {
    // `try_with`: a thread being torn down has no locals left, and counts nothing
    let _ = COUNTING.try_with(|counting| {
        if counting.get() {
            let live = LIVE.with(|l| {
                let v = l.get() + bytes;
                l.set(v);
                v
            });
            PEAK.with(|p| p.set(p.get().max(live)));
        }
    });
}

fn usable(ptr: *mut c_void) -> i64 {
    if ptr.is_null() {
        0
    } else {
        // SAFETY: `ptr` came from glibc's allocator and is live.
        unsafe { malloc_usable_size(ptr) as i64 }
    }
}

/// # Safety
/// As C's `malloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn malloc(size: usize) -> *mut c_void {
    // SAFETY: forwarded as it was called.
    let p = unsafe { __libc_malloc(size) };
    account(usable(p));
    p
}

/// # Safety
/// As C's `calloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn calloc(n: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarded as it was called.
    let p = unsafe { __libc_calloc(n, size) };
    account(usable(p));
    p
}

/// # Safety
/// As C's `realloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn realloc(ptr: *mut c_void, size: usize) -> *mut c_void {
    let before = usable(ptr);
    // SAFETY: forwarded as it was called.
    let p = unsafe { __libc_realloc(ptr, size) };
    if !p.is_null() || size == 0 {
        account(usable(p) - before);
    }
    p
}

/// # Safety
/// As C's `free`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn free(ptr: *mut c_void) {
    account(-usable(ptr));
    // SAFETY: forwarded as it was called.
    unsafe { __libc_free(ptr) }
}

/// # Safety
/// As C's `memalign`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memalign(align: usize, size: usize) -> *mut c_void {
    // SAFETY: forwarded as it was called.
    let p = unsafe { __libc_memalign(align, size) };
    account(usable(p));
    p
}

/// # Safety
/// As C's `aligned_alloc`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn aligned_alloc(align: usize, size: usize) -> *mut c_void {
    // SAFETY: as memalign.
    unsafe { memalign(align, size) }
}

/// # Safety
/// As C's `posix_memalign`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> i32 {
    // SAFETY: as memalign; `out` is the caller's, writable.
    unsafe {
        let p = memalign(align, size);
        if p.is_null() {
            return 12; // ENOMEM
        }
        *out = p;
    }
    0
}

/// Runs `work` counting what this thread allocates; its result and the peak of live bytes.
fn counted<T>(work: impl FnOnce() -> T) -> (T, i64) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    COUNTING.with(|c| c.set(true));
    let out = work();
    COUNTING.with(|c| c.set(false));
    (out, PEAK.with(Cell::get))
}

// ---- inputs ---------------------------------------------------------------------------------

fn photo(width: u32, height: u32) -> RgbaImage {
    RgbaImage::from_fn(width, height, |x, y| {
        let v = ((x * 7 + y * 13) ^ (x * y)) as u8;
        image::Rgba([
            v,
            (x % 251) as u8,
            (y % 241) as u8,
            if x % 17 == 0 { 128 } else { 255 },
        ])
    })
}

fn encoded(image: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn jpeg(width: u32, height: u32, progressive: bool) -> Vec<u8> {
    let rgb = DynamicImage::ImageRgba8(photo(width, height)).to_rgb8();
    let mut compress = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
    compress.set_size(width as usize, height as usize);
    compress.set_quality(85.0);
    if progressive {
        compress.set_progressive_mode();
    }
    let mut started = compress.start_compress(Vec::new()).unwrap();
    started.write_scanlines(rgb.as_raw()).unwrap();
    started.finish().unwrap()
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
}

/// A PNG with ancillary chunks inserted after IHDR.
fn png_with(image: DynamicImage, chunks: &[(&[u8; 4], Vec<u8>)]) -> Vec<u8> {
    let png = encoded(image, ImageFormat::Png);
    let mut out = png[..33].to_vec();
    for (kind, data) in chunks {
        png_chunk(&mut out, kind, data);
    }
    out.extend_from_slice(&png[33..]);
    out
}

/// An `iCCP` chunk's data whose profile inflates to `len` bytes (of zeros: a few kilobytes
/// compressed), as the `image` crate's PNG encoder writes it.
fn iccp(len: usize) -> Vec<u8> {
    let rgb = image::RgbImage::new(1, 1);
    let mut png = Vec::new();
    let mut encoder = image::codecs::png::PngEncoder::new(&mut png);
    image::ImageEncoder::set_icc_profile(&mut encoder, vec![0; len]).unwrap();
    image::ImageEncoder::write_image(encoder, rgb.as_raw(), 1, 1, image::ExtendedColorType::Rgb8)
        .unwrap();
    let at = png.windows(4).position(|w| w == b"iCCP").unwrap();
    let n = u32::from_be_bytes(png[at - 4..at].try_into().unwrap()) as usize;
    png[at + 4..at + 4 + n].to_vec()
}

/// A GIF whose logical screen is `screen` but whose only frame is `frame` (the attack the
/// issue found: the screen passed the checks, the frame took 480 MiB).
fn gif_with_frame(screen: (u16, u16), frame: (u16, u16)) -> Vec<u8> {
    let mut out = b"GIF89a".to_vec();
    out.extend_from_slice(&screen.0.to_le_bytes());
    out.extend_from_slice(&screen.1.to_le_bytes());
    out.extend_from_slice(&[0x80, 0, 0]); // global colour table of 2
    out.extend_from_slice(&[0, 0, 0, 255, 255, 255]);
    out.push(0x2C);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&frame.0.to_le_bytes());
    out.extend_from_slice(&frame.1.to_le_bytes());
    out.push(0);
    // LZW: minimum code size 2, then a clear code and the end code, over and over: a few bytes
    // that decode to nothing much, as a bomb's would
    out.push(2);
    for _ in 0..64 {
        out.extend_from_slice(&[2, 0x4C, 0x01]);
    }
    out.push(0);
    out.push(0x3B);
    out
}

fn animated_gif(width: u32, height: u32, frames: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new_with_speed(&mut out, 30);
        for i in 0..frames {
            let frame = RgbaImage::from_fn(width, height, |x, y| {
                image::Rgba([(x as usize * i % 256) as u8, y as u8, 90, 255])
            });
            let delay = image::Delay::from_numer_denom_ms(40, 1);
            encoder
                .encode_frame(image::Frame::from_parts(frame, 0, 0, delay))
                .unwrap();
        }
    }
    out
}

fn apng(width: u32, height: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(frames, 0).unwrap();
        let mut writer = encoder.write_header().unwrap();
        for _ in 0..frames {
            writer
                .write_image_data(photo(width, height).as_raw())
                .unwrap();
        }
    }
    out
}

fn lossy_webp(width: u32, height: u32) -> Vec<u8> {
    let rgba = photo(width, height);
    webp::Encoder::from_rgba(rgba.as_raw(), width, height)
        .encode(75.0)
        .to_vec()
}

// The inputs: real encodings of each kind, and crafted ones, in three groups that run as three
// tests, side by side.

/// JPEG (baseline, progressive) and still WebP (lossy, lossless).
fn jpeg_and_webp_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("jpeg", jpeg(640, 480, false)),
        ("progressive jpeg", jpeg(640, 480, true)),
        // 4:2:0: its coefficients, which dominate, are planned at that sampling
        ("large progressive jpeg", jpeg(1600, 1200, true)),
        ("lossy webp", lossy_webp(500, 300)),
        (
            "lossless webp",
            encoded(DynamicImage::ImageRgba8(photo(300, 200)), ImageFormat::WebP),
        ),
    ]
}

/// PNG: grey, 16-bit, with large ancillary chunks, and APNG.
fn png_inputs() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "grey png",
            encoded(
                DynamicImage::ImageLuma8(DynamicImage::ImageRgba8(photo(300, 200)).to_luma8()),
                ImageFormat::Png,
            ),
        ),
        (
            "png",
            encoded(DynamicImage::ImageRgba8(photo(640, 480)), ImageFormat::Png),
        ),
        (
            "16-bit png",
            encoded(
                DynamicImage::ImageRgba16(DynamicImage::ImageRgba8(photo(200, 150)).to_rgba16()),
                ImageFormat::Png,
            ),
        ),
        (
            "png with a 48 MiB iCCP",
            png_with(
                DynamicImage::ImageRgba8(photo(2, 2)),
                &[(b"iCCP", iccp(48 << 20))],
            ),
        ),
        (
            "png with large text and eXIf",
            png_with(
                DynamicImage::ImageRgba8(photo(64, 64)),
                &[
                    (b"tEXt", [b"k\0".as_slice(), &vec![b'x'; 3 << 20]].concat()),
                    (b"eXIf", vec![0; 1 << 20]),
                ],
            ),
        ),
        ("apng", apng(120, 80, 4)),
    ]
}

/// GIF (still, animated, frames larger than the screen) and animated WebP.
fn gif_and_animation_inputs() -> Vec<(&'static str, Vec<u8>)> {
    let animated_webp = transform::transform(
        Bytes::from(animated_gif(96, 64, 6)),
        &Params::from_query(Some("format=webp&width=96"), 2500).unwrap(),
        &limits(),
        |_| Some(()),
    )
    .unwrap()
    .bytes;
    vec![
        ("gif", animated_gif(160, 120, 1)),
        ("animated gif", animated_gif(160, 120, 8)),
        (
            "gif with a frame larger than its screen",
            gif_with_frame((1, 1), (10_000, 10_000)),
        ),
        (
            "gif with a frame just under the pixel limit",
            gif_with_frame((1, 1), (2_000, 1_000)),
        ),
        ("animated webp", animated_webp),
    ]
}

fn limits() -> Limits {
    Limits {
        max_source_pixels: 4_000_000,
        max_dimension: 2500,
        max_animation_frames: 50,
        max_animation_pixels: 20_000_000,
        timeout: Duration::from_secs(20),
    }
}

/// A deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `source` mutated: bytes flipped, a run overwritten with 0xFF or 0x00 (sizes in headers
/// become huge or zero), or cut short.
fn mutate(source: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = source.to_vec();
    match rng.below(4) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(out.len());
                out[i] ^= 1 << rng.below(8);
            }
        }
        1 => {
            // early bytes are header: sizes, counts, lengths
            let i = rng.below(out.len().min(200));
            let fill = if rng.below(2) == 0 { 0xFF } else { 0x00 };
            for b in out.iter_mut().skip(i).take(1 + rng.below(4)) {
                *b = fill;
            }
        }
        2 => out.truncate(rng.below(out.len())),
        _ => {
            let i = rng.below(out.len());
            let j = rng.below(out.len());
            out.swap(i, j);
        }
    }
    out
}

/// Runs one transform counting what it allocates; the reservation and the peak, when a plan
/// was made.
fn check(name: &str, source: Vec<u8>, query: &str) -> Option<(u64, i64)> {
    let limits = limits();
    let params = if query.starts_with("w=") {
        Params::from_image_proxy_query(Some(query), 2500)
            .unwrap()
            .unwrap()
    } else {
        Params::from_query(Some(query), 2500).unwrap()
    };
    let source = Bytes::from(source);
    let mut reserved = 0u64;
    let (result, peak) = counted(|| {
        transform::transform(source.clone(), &params, &limits, |n| {
            reserved = n;
            Some(())
        })
        .map(|o| o.bytes.len())
    });
    drop(source);
    if reserved == 0 {
        // refused from its header: nothing decoded
        assert!(result.is_err(), "{name} {query}: no plan, yet an output");
        return None;
    }
    assert!(
        peak <= reserved as i64,
        "{name} ({query}): {peak} bytes allocated at once, {reserved} reserved ({result:?})"
    );
    Some((reserved, peak))
}

const QUERIES: [&str; 5] = [
    "width=100",
    "width=300&height=300&format=webp",
    "width=50&format=origin",
    "quality=60",
    // /image-proxy's: a still asked of an animation is its first frame
    "w=120&format=jpeg",
];

/// Every input, and mutations of it, through each of `QUERIES`: no transform allocates more at
/// once than it reserved.
fn every_transform_allocates_at_most_what_it_reserved(inputs: &[(&str, Vec<u8>)]) {
    let mutations: usize = std::env::var("DECODE_BOUNDS_MUTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut checked = 0;
    let mut worst = 0.0f64;
    for (name, source) in inputs {
        for query in QUERIES {
            if let Some((reserved, peak)) = check(name, source.clone(), query) {
                checked += 1;
                worst = worst.max(peak as f64 / reserved as f64);
            }
            for _ in 0..mutations / QUERIES.len() {
                let mutated = mutate(source, &mut rng);
                if check(name, mutated, query).is_some() {
                    checked += 1;
                }
            }
        }
    }
    eprintln!(
        "decode bounds: {checked} transforms counted, the largest used {:.0}% of its reservation",
        worst * 100.0
    );
    assert!(checked > inputs.len(), "too few transforms ran: {checked}");
}

#[test]
fn jpeg_and_webp_transforms_allocate_at_most_what_they_reserved() {
    every_transform_allocates_at_most_what_it_reserved(&jpeg_and_webp_inputs());
}

#[test]
fn png_transforms_allocate_at_most_what_they_reserved() {
    every_transform_allocates_at_most_what_it_reserved(&png_inputs());
}

#[test]
fn gif_and_animation_transforms_allocate_at_most_what_they_reserved() {
    every_transform_allocates_at_most_what_it_reserved(&gif_and_animation_inputs());
}

#[test]
fn the_issue_s_bombs_are_refused_before_they_allocate() {
    let limits = Limits {
        max_source_pixels: 50_000_000,
        ..limits()
    };
    let params = Params::from_query(Some("width=100"), 2500).unwrap();
    // a 1 x 1 screen with a 10 000 x 10 000 frame: 422, from the header
    let gif = Bytes::from(gif_with_frame((1, 1), (10_000, 10_000)));
    let (got, peak) = counted(|| transform::transform(gif.clone(), &params, &limits, |_| Some(())));
    assert!(
        matches!(
            got,
            Err(TransformError::TooManyPixels {
                width: 10_000,
                height: 10_000,
                ..
            })
        ),
        "{got:?}"
    );
    assert!(peak < 1 << 20, "{peak} bytes for a refusal");
    // a 4-pixel PNG whose iCCP inflates to 48 MiB: a small output, and a small peak
    let png = Bytes::from(png_with(
        DynamicImage::ImageRgba8(photo(2, 2)),
        &[(b"iCCP", iccp(48 << 20))],
    ));
    let webp = Params::from_query(Some("format=webp"), 2500).unwrap();
    let (got, peak) = counted(|| transform::transform(png.clone(), &webp, &limits, |_| Some(())));
    let out = got.unwrap();
    assert!(out.bytes.len() < 4096, "{} bytes out", out.bytes.len());
    assert!(peak < 16 << 20, "{peak} bytes at once");
}

/// The counter sees what Rust allocates and what the C codecs allocate themselves.
#[test]
fn the_counter_sees_rust_and_c_allocations() {
    let ((), peak) = counted(|| {
        let v = vec![1u8; 10 << 20];
        std::hint::black_box(&v);
    });
    assert!(peak >= 10 << 20, "{peak}");
    let rgba = photo(512, 512);
    // libwebp's encoder allocates its own buffers with malloc: several times the picture
    let (out, peak) = counted(|| {
        webp::Encoder::from_rgba(rgba.as_raw(), 512, 512)
            .encode(75.0)
            .to_vec()
    });
    assert!(!out.is_empty());
    assert!(
        peak > 512 * 512 * 3 / 2,
        "{peak}: libwebp's allocations were not seen"
    );
}
