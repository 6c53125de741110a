//! The transform pipeline per stage — decode (header check, JPEG shrink-on-load, orientation),
//! resize (Lanczos3 to 800 px wide), encode (JPEG q80, or PNG) — and the whole of it, for the
//! largest JPEG and the largest PNG of the corpus.
//!
//! `CORPUS` names the corpus directory (default `/tmp/imgproxy-corpus`, made by
//! `loadtest/corpus.sh`). Run: `cargo bench --bench transform`.

use std::path::{Path, PathBuf};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use imgedge::transform::{self, Params};

/// The output width asked for, as the benchmark does.
const WIDTH: &str = "width=800";
const MAX_SOURCE_PIXELS: u64 = 50_000_000;
const MAX_DIMENSION: u32 = 2500;

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
    let params = Params::from_query(Some(WIDTH), MAX_DIMENSION).expect("width=800 parses");
    for (label, path) in [
        ("jpeg", largest(&corpus, &["jpg", "jpeg"])),
        ("png", largest(&corpus, &["png"])),
    ] {
        let source = std::fs::read(&path).expect("the corpus file is readable");
        let name = path
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let decode = || {
            transform::decode(&source, &params, MAX_SOURCE_PIXELS, MAX_DIMENSION, |_| {
                Some(())
            })
            .expect("the corpus file decodes")
            .0
        };
        let decoded = decode();
        let format = transform::output_format(decoded.format, &params);
        let resized = transform::resize_decoded(decoded.clone(), &params, MAX_DIMENSION)
            .expect("the corpus file resizes");
        eprintln!(
            "{label}: {name}, {}x{} decoded at 1/{} ({}x{}), resized to {}x{}",
            decoded.source_width,
            decoded.source_height,
            decoded.shrink,
            decoded.image.width(),
            decoded.image.height(),
            resized.width(),
            resized.height()
        );

        let mut group = c.benchmark_group(label);
        // a decode of the largest files takes a good part of a second
        group.sample_size(10);
        group.bench_function("decode", |b| b.iter(decode));
        group.bench_function("resize", |b| {
            b.iter_batched(
                || decoded.clone(),
                |d| transform::resize_decoded(d, &params, MAX_DIMENSION).expect("resizes"),
                BatchSize::LargeInput,
            )
        });
        group.bench_function("encode", |b| {
            b.iter_batched(
                || (resized.clone(), decoded.icc_profile.clone()),
                |(image, icc)| transform::encode(image, format, &params, icc).expect("encodes"),
                BatchSize::LargeInput,
            )
        });
        group.bench_function("pipeline", |b| {
            b.iter(|| {
                transform::transform(&source, &params, MAX_SOURCE_PIXELS, MAX_DIMENSION, |_| {
                    Some(())
                })
                .expect("transforms")
            })
        });
        group.finish();
    }
}

criterion_group!(benches, stages);
criterion_main!(benches);
