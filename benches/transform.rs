//! The transform pipeline per stage — decode (reduced while decoding for an 800-px output:
//! JPEG DCT scaling, PNG row shrinking, WebP scaled decoding), resize (Lanczos3 to 800 px
//! wide), encode (the source's format at q80) — and the whole of it, for the largest JPEG, PNG
//! and WebP of the corpus.
//!
//! `CORPUS` names the corpus directory (default `/tmp/imgproxy-corpus`, made by
//! `loadtest/corpus.sh`). Run: `cargo bench --bench transform`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use imgedge::transform::{self, Limits, Params, SourceReader};

/// The output width asked for, as the benchmark does.
const WIDTH: &str = "width=800";

/// The largest file in `dir` whose name ends with one of `extensions`.
fn largest(dir: &Path, extensions: &[&str]) -> PathBuf {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| {
        panic!(
            "cannot read the corpus at {} ({e}): build it with loadtest/corpus.sh or set CORPUS",
            dir.display()
        )
    });
    entries
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e.to_ascii_lowercase().as_str()))
        })
        .max_by_key(|path| std::fs::metadata(path).map_or(0, |m| m.len()))
        .unwrap_or_else(|| {
            panic!(
                "no {extensions:?} file in the corpus at {}: build it with loadtest/corpus.sh or set CORPUS",
                dir.display()
            )
        })
}

fn stages(c: &mut Criterion) {
    let corpus =
        PathBuf::from(std::env::var_os("CORPUS").unwrap_or_else(|| "/tmp/imgproxy-corpus".into()));
    let params = Params::from_query(Some(WIDTH), 2500).expect("width=800 parses");
    let limits = Limits {
        max_source_pixels: 50_000_000,
        max_dimension: 2500,
        max_animation_frames: 500,
        max_animation_pixels: 500_000_000,
        timeout: Duration::from_secs(600),
    };
    for (label, path) in [
        ("jpeg", largest(&corpus, &["jpg", "jpeg"])),
        ("png", largest(&corpus, &["png"])),
        ("webp", largest(&corpus, &["webp"])),
    ] {
        let source = Bytes::from(std::fs::read(&path).expect("the corpus file is readable"));
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let plan = transform::plan(&source, Some(source.len() as u64), &params, &limits)
            .expect("the corpus file is an image");
        let decode = || {
            let deadline = Instant::now() + limits.timeout;
            let still = transform::decode_still(
                SourceReader::whole(source.clone(), deadline),
                &plan,
                &limits,
                deadline,
            )
            .expect("the corpus file decodes");
            let mut image = still.pixels.into_image().expect("pixels");
            image.apply_orientation(plan.orientation);
            image
        };
        let decoded = decode();
        let resized = transform::resize_decoded(decoded.clone(), plan.source_size, &params, 2500)
            .expect("the corpus file resizes");
        eprintln!(
            "{label}: {name}, {}x{} decoded to {}x{}, resized to {}x{}, {} bytes reserved",
            plan.source_size.0,
            plan.source_size.1,
            decoded.width(),
            decoded.height(),
            resized.width(),
            resized.height(),
            plan.reserve_bytes,
        );

        let mut group = c.benchmark_group(label);
        // a decode of the largest files takes a good part of a second
        group.sample_size(10);
        group.bench_function("decode", |b| b.iter(decode));
        group.bench_function("resize", |b| {
            b.iter_batched(
                || decoded.clone(),
                |d| transform::resize_decoded(d, plan.source_size, &params, 2500).expect("resizes"),
                BatchSize::LargeInput,
            )
        });
        group.bench_function("pipeline", |b| {
            b.iter(|| {
                transform::transform(source.clone(), &params, &limits, |_| Some(()))
                    .expect("transforms")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
