//! What Supabase Storage's API paths mean, as far as imgedge needs to know: its path
//! prefixes; which stored objects a successful write changes ([`Writes`], in `writes.rs`); how
//! Storage writes an error ([`ErrorBody`], in `errors.rs`), so that imgedge's own errors on its
//! routes read as Storage's to its clients; and its render routes' contract ([`RenderKind`],
//! [`render_params`], [`x_transformations`], in `render.rs`). Pure: no I/O, no cache; `http.rs`
//! acts on what it returns.

mod errors;
mod render;
mod writes;

pub(crate) use errors::ErrorBody;
pub(crate) use render::{
    RenderKind, TokenClaims, X_TRANSFORMATIONS, render_params, x_transformations,
};
pub(crate) use writes::{BODY_PREFIX_BYTES, Writes};

/// Prefix of Supabase Storage's public object route.
pub(crate) const SUPABASE_PUBLIC_PREFIX: &str = "/storage/v1/object/public/";

/// Prefix of Supabase Storage's signed object route (`?token=`).
pub(crate) const SUPABASE_SIGNED_PREFIX: &str = "/storage/v1/object/sign/";

/// Prefix of Supabase Storage's public render route (image transforms), served by
/// [`crate::render`] from the public object route's cache.
pub(crate) const SUPABASE_RENDER_PREFIX: &str = "/storage/v1/render/image/public/";
