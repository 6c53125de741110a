// Shared pieces of the k6 scenarios in this folder (imported, not run).
//
// Env read here, by every scenario:
//   BASE_URL    the target: imgedge, or a peer cache answering the same two routes (required)
//   ORIGIN_URL  the origin every target fronts, loadtest/origin.py (required: /image-proxy's url=
//               points at it, and /__hits is its request counter)
//   MANIFEST    the corpus's MANIFEST.tsv, `name<TAB>bytes<TAB>content_type<TAB>sha256` per line
//               (default /tmp/imgproxy-corpus/MANIFEST.tsv, where loadtest/corpus.sh builds it)
//   BUCKET      the bucket name in Supabase-style paths (default wallpapers; origin.py serves any)
//
// Routes: `proxy` is /image-proxy?url=<ORIGIN_URL>/<name> (the url raw, as the peers' configs
// match it), `storage` is /storage/v1/object/public/<BUCKET>/<name>.
import http from 'k6/http';
import { check } from 'k6';

export const BASE_URL = (__ENV.BASE_URL || __ENV.BASE || '').replace(/\/+$/, '');
export const ORIGIN_URL = (__ENV.ORIGIN_URL || __ENV.ORIGIN || '').replace(/\/+$/, '');
if (!BASE_URL || !ORIGIN_URL) {
  throw new Error('set BASE_URL (the target) and ORIGIN_URL (loadtest/origin.py); loadtest/run.sh does both');
}
export const MANIFEST = __ENV.MANIFEST || '/tmp/imgproxy-corpus/MANIFEST.tsv';
export const BUCKET = __ENV.BUCKET || 'wallpapers';
/** imgedge's default max_cacheable_bytes: larger bodies stream through and are never stored. */
export const MAX_CACHEABLE_BYTES = 5242880;

/** Every image of the manifest, in its order: `{ name, bytes, type, sha256 }`. */
export function loadCorpus() {
  const images = open(MANIFEST)
    .split('\n')
    .map((line) => line.replace(/\r$/, '').split('\t'))
    .filter((c) => c.length >= 4 && c[0] && /^[0-9]+$/.test(c[1]))
    .map(([name, bytes, type, sha256]) => ({ name, bytes: parseInt(bytes, 10), type, sha256 }));
  if (images.length === 0) throw new Error(`no images in ${MANIFEST}`);
  return images;
}

/** An integer from the environment, or `def`; anything else is an error, not a silent default. */
export function envInt(name, def, min = 1) {
  const raw = __ENV[name];
  if (raw === undefined || raw === '') return def;
  if (!/^[0-9]+$/.test(raw) || parseInt(raw, 10) < min) {
    throw new Error(`${name}=${raw}: want an integer >= ${min}`);
  }
  return parseInt(raw, 10);
}

export function proxyUrl(img) {
  return `${BASE_URL}/image-proxy?url=${ORIGIN_URL}/${img.name}`;
}

export function storageUrl(img) {
  return `${BASE_URL}/storage/v1/object/public/${BUCKET}/${img.name}`;
}

export function routeUrl(route, img) {
  return route === 'proxy' ? proxyUrl(img) : storageUrl(img);
}

/** Case-insensitive response header lookup. */
export function header(res, name) {
  const want = name.toLowerCase();
  for (const k of Object.keys(res.headers || {})) {
    if (k.toLowerCase() === want) return String(res.headers[k]).trim();
  }
  return undefined;
}

/**
 * GETs `img` through `route` and checks what every scenario checks: status 200, the manifest's
 * content type, the manifest's byte length (the body is received whole, as bytes). Requests are
 * tagged `kind=load` (what the thresholds and reports count), `route`, and one `name` per route
 * so that metrics are not split per URL. Returns the response.
 */
export function getImage(route, img, timeout = '60s') {
  const res = http.get(routeUrl(route, img), {
    responseType: 'binary',
    timeout,
    tags: { kind: 'load', route, name: route },
  });
  const size = res.body ? res.body.byteLength : -1;
  const ok = check(res, {
    'status is 200': (r) => r.status === 200,
    'content type is the manifest\'s': (r) => header(r, 'Content-Type') === img.type,
    'byte length is the manifest\'s': () => size === img.bytes,
  }, { kind: 'load', route });
  if (!ok && __ENV.VERBOSE) {
    console.warn(`${route} ${img.name}: status ${res.status} ${res.error || ''} type ${header(res, 'Content-Type')} bytes ${size}/${img.bytes}`);
  }
  return res;
}

/** A request that is not load (warm-up, counters): tagged `kind=control`, not in thresholds. */
export function control(url, params = {}) {
  return http.get(url, Object.assign({ timeout: '60s' }, params, {
    tags: Object.assign({ kind: 'control', name: 'control' }, params.tags || {}),
  }));
}

/** The origin's request count for `path` (origin.py's /__hits), or null when unreadable. */
export function originHits(path) {
  const res = control(`${ORIGIN_URL}/__hits`, { timeout: '10s' });
  if (res.status !== 200) return null;
  try {
    return JSON.parse(res.body)[path] || 0;
  } catch (e) {
    return null;
  }
}

/** Sum of the origin's request counts over every path, or null when unreadable. */
export function originTotal() {
  const res = control(`${ORIGIN_URL}/__hits`, { timeout: '10s' });
  if (res.status !== 200) return null;
  try {
    return Object.values(JSON.parse(res.body)).reduce((a, b) => a + b, 0);
  } catch (e) {
    return null;
  }
}

/**
 * Fetches every image once through each route, so that a scenario about hits starts warm.
 * Prints one progress line; returns the number of failed fetches.
 */
export function warm(images, routes) {
  let failed = 0;
  const reqs = [];
  for (const img of images) for (const route of routes) reqs.push(['GET', routeUrl(route, img), null, { responseType: 'none', timeout: '60s', tags: { kind: 'control', name: 'warm' } }]);
  for (let i = 0; i < reqs.length; i += 8) {
    for (const r of http.batch(reqs.slice(i, i + 8))) if (r.status !== 200) failed += 1;
  }
  console.log(`warm: ${reqs.length} fetches (${images.length} images x ${routes.length} routes), ${failed} failed`);
  return failed;
}

/**
 * A Zipf(s) sampler over `n` ranks: returns a function giving a rank in [0, n), rank 0 the most
 * popular, P(k) proportional to 1 / (k + 1)^s.
 */
export function zipf(n, s) {
  const cdf = new Array(n);
  let sum = 0;
  for (let k = 0; k < n; k++) {
    sum += 1 / Math.pow(k + 1, s);
    cdf[k] = sum;
  }
  return () => {
    const u = Math.random() * sum;
    let lo = 0;
    let hi = n - 1;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (cdf[mid] < u) lo = mid + 1; else hi = mid;
    }
    return lo;
  };
}

/** A deterministic shuffle (mulberry32, seed 1): which image is most popular is fixed per corpus. */
export function shuffled(items, seed = 1) {
  const out = items.slice();
  let a = seed >>> 0;
  const rand = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [out[i], out[j]] = [out[j], out[i]];
  }
  return out;
}

/** The thresholds every scenario shares, on load requests only; p95/p99 in milliseconds. */
export function thresholds(p95, p99) {
  return {
    'http_req_failed{kind:load}': ['rate==0'],
    'http_req_duration{kind:load}': [`p(95)<${p95}`, `p(99)<${p99}`],
    'checks{kind:load}': ['rate==1'],
  };
}
