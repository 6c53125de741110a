//! The render parameters: Supabase's render route (`width`, `height`, `resize`, `quality`,
//! `format`, `gravity`, `download`) and `/image-proxy`'s (`w`, `h`, `fit`, `q`, `format`), parsed
//! and validated into one [`Params`] before anything is fetched, and the output size they give.

use percent_encoding::percent_decode_str;

use super::TransformError;

/// Supabase's default `quality`.
pub(crate) const DEFAULT_QUALITY: u8 = 80;

/// How the image is fitted to a `width` × `height` box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Fill the box, keeping the aspect ratio, cropping what overflows (centred).
    Cover,
    /// Fit inside the box, keeping the aspect ratio: the output may be smaller on one side
    /// (Supabase's `contain`, `/image-proxy`'s `inside`).
    Inside,
    /// Exactly the box, stretched.
    Fill,
    /// Exactly the box: the image fitted inside it, centred, on a transparent background (black
    /// when the image has no alpha channel; `/image-proxy`'s `contain`, as sharp's).
    Pad,
}

impl Fit {
    fn as_str(self) -> &'static str {
        match self {
            Fit::Cover => "cover",
            Fit::Inside => "inside",
            Fit::Fill => "fill",
            Fit::Pad => "pad",
        }
    }
}

/// An output format: asked for explicitly (`format=`), or negotiated from `Accept`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Webp,
    /// Only in a build with the `avif` cargo feature.
    #[cfg(feature = "avif")]
    Avif,
}

impl Format {
    /// Its name in parameters and canonical keys: `jpeg`, `png`, `webp`, `avif`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jpeg => "jpeg",
            Format::Png => "png",
            Format::Webp => "webp",
            #[cfg(feature = "avif")]
            Format::Avif => "avif",
        }
    }
}

/// The parameters of one render request, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Target width in pixels, 1–`max_dimension`.
    pub width: Option<u32>,
    /// Target height in pixels, 1–`max_dimension`.
    pub height: Option<u32>,
    pub fit: Fit,
    /// JPEG and WebP quality, 20–100; `None` when not given (then [`DEFAULT_QUALITY`]).
    pub quality: Option<u8>,
    /// `download`: serve as an attachment, with this file name when one was given.
    pub download: Option<String>,
    /// The output format; `None` keeps the source's.
    pub format: Option<Format>,
    /// No format was fixed by the request (Supabase's render route without `format`,
    /// `/image-proxy`'s `format=auto` or none): the server picks one from `Accept` and the
    /// response varies by it.
    pub negotiate: bool,
    /// Where a `cover` crop keeps the image: the centre unless asked otherwise.
    pub gravity: Gravity,
}

/// Which part of the image a `cover` crop keeps (Supabase's and imgproxy's `gravity`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Gravity {
    /// `ce`, the default; also `sm` (imgproxy's smart crop, done here as the centre).
    Centre,
    /// `no`, `so`, `ea`, `we`, `noea`, `nowe`, `soea`, `sowe`: the crop window's position, each
    /// coordinate 0 (left, top), 0.5 or 1 (right, bottom).
    Edge(f32, f32),
    /// `fp` with `x_offset` and `y_offset`, each 0–1: the point kept at the crop's centre as
    /// far as the image allows.
    FocalPoint(f32, f32),
}

impl Eq for Gravity {}

impl Gravity {
    /// The crop window's centre, as fractions of the image (fast_image_resize's centering).
    pub fn centering(self) -> (f64, f64) {
        match self {
            Gravity::Centre => (0.5, 0.5),
            Gravity::Edge(x, y) | Gravity::FocalPoint(x, y) => (f64::from(x), f64::from(y)),
        }
    }

    /// Its spelling in canonical keys and `X-Transformations`: empty for the centre.
    fn canonical(self) -> String {
        match self {
            Gravity::Centre => String::new(),
            Gravity::Edge(x, y) => format!(";g={x}:{y}"),
            Gravity::FocalPoint(x, y) => format!(";g=fp:{x}:{y}"),
        }
    }

    /// Its name as Supabase's `gravity` spells it, with `fp`'s offsets (`fp:0:1`); `None` for
    /// the centre.
    pub fn storage_name(self) -> Option<String> {
        Some(match self {
            Gravity::Centre => return None,
            Gravity::FocalPoint(x, y) => format!("fp:{x}:{y}"),
            Gravity::Edge(x, y) => {
                let name = |v: f32, low, high| match v {
                    0.0 => low,
                    1.0 => high,
                    _ => "",
                };
                format!("{}{}", name(y, "no", "so"), name(x, "we", "ea"))
            }
        })
    }

    /// `gravity=`'s value (without the offsets of `fp`).
    fn parse(value: &str) -> Option<Gravity> {
        Some(match value {
            "ce" | "sm" => Gravity::Centre,
            "no" => Gravity::Edge(0.5, 0.0),
            "so" => Gravity::Edge(0.5, 1.0),
            "ea" => Gravity::Edge(1.0, 0.5),
            "we" => Gravity::Edge(0.0, 0.5),
            "noea" => Gravity::Edge(1.0, 0.0),
            "nowe" => Gravity::Edge(0.0, 0.0),
            "soea" => Gravity::Edge(1.0, 1.0),
            "sowe" => Gravity::Edge(0.0, 1.0),
            "fp" => Gravity::FocalPoint(0.5, 0.5),
            _ => return None,
        })
    }
}

impl Default for Params {
    /// No size, `cover`, the default quality, the source's format, inline.
    fn default() -> Self {
        Params {
            width: None,
            height: None,
            fit: Fit::Cover,
            quality: None,
            download: None,
            format: None,
            negotiate: false,
            gravity: Gravity::Centre,
        }
    }
}

impl Params {
    /// Reads Supabase's render parameters from a query string, as Storage validates them
    /// (its `transformationOptionsSchema`): `width`, `height` (integers of at least 0; 0 means
    /// "from the other side", as imgproxy reads it; clamped to `max_dimension`), `resize`
    /// (`cover`, `contain`, `fill`), `quality` (20–100), `format` (`origin`, `webp`, and `avif`
    /// in a build with the `avif` feature; absent: negotiated from `Accept`), `gravity` (`ce`,
    /// `no`, `so`, `ea`, `we`, `noea`, `nowe`, `soea`, `sowe`, `sm` (done as the centre), and
    /// `fp`, which needs `x_offset` and `y_offset` between 0 and 1; offsets given with another
    /// gravity are checked as numbers and otherwise ignored) and `download` (present:
    /// attachment; a value other than `true` is the file name). Unknown parameters are
    /// ignored, as Supabase does.
    ///
    /// # Errors
    /// [`TransformError::BadParameter`] naming the parameter, for a value that is not an
    /// integer or is negative, a quality out of range, an unknown `resize`, `format` or
    /// `gravity`, a focal point without both offsets in 0–1, or a parameter given twice.
    pub fn from_query(query: Option<&str>, max_dimension: u32) -> Result<Params, TransformError> {
        let mut params = Params {
            negotiate: true,
            ..Params::default()
        };
        let mut seen: Vec<String> = Vec::new();
        let mut offsets: (Option<f64>, Option<f64>) = (None, None);
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let name = percent_decode_str(name).decode_utf8_lossy().into_owned();
            let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
            let known = matches!(
                name.as_str(),
                "width"
                    | "height"
                    | "resize"
                    | "quality"
                    | "format"
                    | "download"
                    | "gravity"
                    | "x_offset"
                    | "y_offset"
            );
            if known {
                first_time(&mut seen, &name)?;
            }
            let bad = |why: &str| TransformError::BadParameter(format!("{name}={value:?}: {why}"));
            match name.as_str() {
                "width" | "height" => {
                    let n = dimension(&value, max_dimension).map_err(&bad)?;
                    if name == "width" {
                        params.width = n;
                    } else {
                        params.height = n;
                    }
                }
                "gravity" => {
                    params.gravity = Gravity::parse(&value).ok_or_else(|| {
                        bad("want ce, no, so, ea, we, noea, nowe, soea, sowe, sm or fp")
                    })?;
                }
                "x_offset" | "y_offset" => {
                    let n = value
                        .parse::<f64>()
                        .ok()
                        .filter(|n| n.is_finite())
                        .ok_or_else(|| bad("want a number"))?;
                    if name == "x_offset" {
                        offsets.0 = Some(n);
                    } else {
                        offsets.1 = Some(n);
                    }
                }
                "resize" => {
                    params.fit = match value.as_str() {
                        "cover" => Fit::Cover,
                        "contain" => Fit::Inside,
                        "fill" => Fit::Fill,
                        _ => return Err(bad("want cover, contain or fill")),
                    }
                }
                "quality" => {
                    params.quality =
                        Some(quality(&value).ok_or_else(|| bad("want an integer, 20-100"))?);
                }
                "format" => {
                    params.negotiate = false;
                    params.format = match value.as_str() {
                        "origin" => None,
                        "webp" => Some(Format::Webp),
                        #[cfg(feature = "avif")]
                        "avif" => Some(Format::Avif),
                        #[cfg(feature = "avif")]
                        _ => return Err(bad("want origin, webp or avif")),
                        #[cfg(not(feature = "avif"))]
                        _ => return Err(bad("want origin or webp (avif: not in this build)")),
                    };
                }
                "download" => {
                    params.download = Some(if value.is_empty() || value == "true" {
                        String::new()
                    } else {
                        value.clone()
                    });
                }
                _ => {}
            }
        }
        if let Gravity::FocalPoint(..) = params.gravity {
            match offsets {
                (Some(x), Some(y)) if (0.0..=1.0).contains(&x) && (0.0..=1.0).contains(&y) => {
                    params.gravity = Gravity::FocalPoint(x as f32, y as f32);
                }
                _ => {
                    return Err(TransformError::BadParameter(
                        "gravity=fp: want x_offset and y_offset, each between 0 and 1".into(),
                    ));
                }
            }
        }
        Ok(params)
    }

    /// Reads the transformations a Storage signed render URL's token carries
    /// (`height:1,width:1,resize:cover,quality:80,format:webp,gravity:fp:0:1`, as Storage's
    /// `getSignedURL` writes them), with `download` from the request's own `query`: the same
    /// rules as [`Params::from_query`] (an `undefined` value, which Storage writes for an unset
    /// `resize`, is absent).
    ///
    /// # Errors
    /// As [`Params::from_query`].
    pub fn from_transformations(
        transformations: &str,
        query: Option<&str>,
        max_dimension: u32,
    ) -> Result<Params, TransformError> {
        let mut pairs: Vec<String> = Vec::new();
        for segment in transformations.split(',').filter(|s| !s.is_empty()) {
            let mut parts = segment.splitn(4, ':');
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            if value.is_empty() || value == "undefined" {
                continue;
            }
            let encode = |v: &str| {
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            };
            match name {
                "height" | "width" | "resize" | "quality" | "format" => {
                    pairs.push(format!("{name}={}", encode(value)));
                }
                "gravity" => {
                    pairs.push(format!("gravity={}", encode(value)));
                    if let Some(x) = parts.next() {
                        pairs.push(format!("x_offset={}", encode(x)));
                    }
                    if let Some(y) = parts.next() {
                        pairs.push(format!("y_offset={}", encode(y)));
                    }
                }
                _ => {}
            }
        }
        let download = query
            .unwrap_or("")
            .split('&')
            .find(|p| *p == "download" || p.starts_with("download="));
        pairs.extend(download.map(str::to_owned));
        Params::from_query(Some(&pairs.join("&")), max_dimension)
    }

    /// Reads `/image-proxy`'s transform parameters: `w`, `h` (integers, clamped to
    /// 1–`max_dimension`), `fit` (`cover`, `contain`: padded to the box, `fill`, `inside`), `q`
    /// (20–100) and `format` (`auto` or absent: negotiated from `Accept`; `jpeg`, `png`,
    /// `webp`, and `avif` in a build with the `avif` feature). They may come before `url=`, or
    /// after an encoded one (a raw URL takes the rest of the query). `None` when there are
    /// none: the original is served.
    ///
    /// # Errors
    /// [`TransformError::BadParameter`] as [`Params::from_query`].
    pub fn from_image_proxy_query(
        query: Option<&str>,
        max_dimension: u32,
    ) -> Result<Option<Params>, TransformError> {
        let mut params = Params {
            negotiate: true,
            ..Params::default()
        };
        let mut any = false;
        let mut seen: Vec<String> = Vec::new();
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            if name == "url" {
                if crate::target::looks_raw(value) {
                    break;
                }
                continue;
            }
            if !matches!(name, "w" | "h" | "fit" | "q" | "format") {
                continue;
            }
            first_time(&mut seen, name)?;
            any = true;
            let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
            let bad = |why: &str| TransformError::BadParameter(format!("{name}={value:?}: {why}"));
            match name {
                "w" | "h" => {
                    let n = dimension(&value, max_dimension).map_err(&bad)?;
                    if name == "w" {
                        params.width = n;
                    } else {
                        params.height = n;
                    }
                }
                "fit" => {
                    params.fit = match value.as_str() {
                        "cover" => Fit::Cover,
                        "contain" => Fit::Pad,
                        "fill" => Fit::Fill,
                        "inside" => Fit::Inside,
                        _ => return Err(bad("want cover, contain, fill or inside")),
                    }
                }
                "q" => {
                    params.quality =
                        Some(quality(&value).ok_or_else(|| bad("want an integer, 20-100"))?);
                }
                _ => {
                    (params.format, params.negotiate) = match value.as_str() {
                        "auto" => (None, true),
                        "jpeg" | "jpg" => (Some(Format::Jpeg), false),
                        "png" => (Some(Format::Png), false),
                        "webp" => (Some(Format::Webp), false),
                        #[cfg(feature = "avif")]
                        "avif" => (Some(Format::Avif), false),
                        #[cfg(feature = "avif")]
                        _ => return Err(bad("want auto, jpeg, png, webp or avif")),
                        #[cfg(not(feature = "avif"))]
                        _ => {
                            return Err(bad(
                                "want auto, jpeg, png or webp (avif: not in this build)",
                            ));
                        }
                    }
                }
            }
        }
        Ok(any.then_some(params))
    }

    /// Whether the output is the original, byte for byte: no size, quality or format asked for.
    pub fn is_original(&self) -> bool {
        self.width.is_none()
            && self.height.is_none()
            && self.quality.is_none()
            && self.format.is_none()
    }

    /// The parameters that shape the output, in one canonical spelling (for validators).
    pub fn canonical(&self) -> String {
        format!(
            "w={};h={};fit={};q={};f={}{}",
            self.width.map_or(0, |w| w),
            self.height.map_or(0, |h| h),
            self.fit.as_str(),
            self.quality.unwrap_or(DEFAULT_QUALITY),
            self.format.map_or("source", Format::as_str),
            self.gravity.canonical(),
        )
    }
}

/// A `width` or `height` value: a whole number of pixels, at least 0 (Supabase's schema), 0
/// meaning none (the side follows from the other, as imgproxy reads it), clamped to
/// `max_dimension`.
fn dimension(value: &str, max_dimension: u32) -> Result<Option<u32>, &'static str> {
    let n: i64 = value.parse().map_err(|_| "want a whole number of pixels")?;
    match n {
        ..0 => Err("must be >= 0"),
        0 => Ok(None),
        n => Ok(Some(n.min(i64::from(max_dimension.max(1))) as u32)),
    }
}

/// A quality value: an integer, 20–100.
fn quality(value: &str) -> Option<u8> {
    value.parse::<u8>().ok().filter(|q| (20..=100).contains(q))
}

/// Notes `name` as given, or refuses it as given twice.
fn first_time(seen: &mut Vec<String>, name: &str) -> Result<(), TransformError> {
    if seen.iter().any(|n| n == name) {
        return Err(TransformError::BadParameter(format!(
            "{name} is given more than once"
        )));
    }
    seen.push(name.to_owned());
    Ok(())
}

/// The output size for a `source_w` × `source_h` image: both given → by `fit`; one → the other
/// from the aspect ratio; none → the source's. A side computed from the aspect ratio is held to
/// 1–`max_dimension` too (a 1×5000 source at `width=2500` would otherwise be 2500×12 500 000).
pub(crate) fn target_size(
    source_w: u32,
    source_h: u32,
    params: &Params,
    max_dimension: u32,
) -> (u32, u32) {
    let (sw, sh) = (f64::from(source_w.max(1)), f64::from(source_h.max(1)));
    let scaled = |v: f64| (v.round().min(f64::from(max_dimension.max(1))) as u32).max(1);
    match (params.width, params.height) {
        (None, None) => (source_w, source_h),
        (Some(w), None) => (w, scaled(f64::from(w) * sh / sw)),
        (None, Some(h)) => (scaled(f64::from(h) * sw / sh), h),
        (Some(w), Some(h)) => match params.fit {
            Fit::Cover | Fit::Fill | Fit::Pad => (w, h),
            Fit::Inside => {
                let ratio = (f64::from(w) / sw).min(f64::from(h) / sh);
                (
                    scaled(sw * ratio).min(w).max(1),
                    scaled(sh * ratio).min(h).max(1),
                )
            }
        },
    }
}

/// The size, in pixels and unrounded, that the whole `width` × `height` source (orientation
/// applied) is scaled to before any crop or padding: for `cover` with both sides given, the
/// source covering the box; for the padded `contain`, the source inside it; otherwise the exact
/// [`target_size`] (held to `max_dimension` as it is).
pub(crate) fn scaled_source_size(
    width: u32,
    height: u32,
    params: &Params,
    max_dimension: u32,
) -> (f64, f64) {
    let (sw, sh) = (f64::from(width.max(1)), f64::from(height.max(1)));
    let max = f64::from(max_dimension.max(1));
    let (w, h) = (params.width.map(f64::from), params.height.map(f64::from));
    match (w, h, params.fit) {
        (None, None, _) => (sw, sh),
        (Some(w), None, _) => (w, (sh * w / sw).min(max)),
        (None, Some(h), _) => ((sw * h / sh).min(max), h),
        (Some(w), Some(h), Fit::Fill) => (w, h),
        (Some(w), Some(h), Fit::Cover) => {
            let scale = (w / sw).max(h / sh);
            (sw * scale, sh * scale)
        }
        (Some(w), Some(h), Fit::Inside | Fit::Pad) => {
            let scale = (w / sw).min(h / sh);
            (sw * scale, sh * scale)
        }
    }
}
