//! The integration tests, in one binary: each file of this folder is a module (a test binary
//! per file cost about 4 s of build and link each). Through real sockets on loopback: a
//! scriptable misbehaving origin and the in-process proxy in `support/`, the real binary in
//! `binary.rs`, a real Redis in `redis.rs`. `cargo test --test integration MODULE::` runs one
//! file's tests. `tests/decode_bounds.rs` stays a binary of its own: it replaces the allocator.

mod support;

mod binary;
mod collapse;
mod connections;
mod docs;
mod hardening;
mod hostile;
mod info;
mod layers;
mod lifecycle;
mod pressure;
mod properties;
mod proxy;
mod redis;
mod render;
mod rfc9111;
mod routes;
mod shared;
mod supabase;
mod targeted;
