// smoke.js: every manifest image through both imgedge routes, twice each, checked byte-exact
// (status, content type, byte length, sha256, nosniff), with imgedge's expected Cache-Status
// (stored on the first fetch, a memory hit with Age on the second; over 5 MiB streamed twice) and
// the origin's request counts (one per stored image and route, two for the large ones). The same
// checks as loadtest/smoke.sh (curl). imgedge only: the Cache-Status checks are its own.
//
// Env: BASE_URL (imgedge), ORIGIN_URL (loadtest/origin.py, fresh: its counts are checked),
// MANIFEST (the corpus's MANIFEST.tsv). BASE and ORIGIN are accepted as older names.
// Thresholds: every check passes, no failed request, all 236 image x route pairs pass, p95 < 2 s
// and p99 < 5 s (large images through a debug build included).
// Run: bash loadtest/run.sh smoke
import http from 'k6/http';
import crypto from 'k6/crypto';
import { check } from 'k6';
import { Counter } from 'k6/metrics';

const BASE = (__ENV.BASE_URL || __ENV.BASE || '').replace(/\/+$/, '');
const ORIGIN = (__ENV.ORIGIN_URL || __ENV.ORIGIN || '').replace(/\/+$/, '');
if (!BASE || !ORIGIN || !__ENV.MANIFEST) {
  throw new Error('set BASE_URL, ORIGIN_URL and MANIFEST; loadtest/run.sh smoke does');
}

const LIMIT = 5242880; // bodies above this are streamed through, never stored
const BUCKET = 'wallpapers';
const CS_MISS = 'imgedge; fwd=uri-miss; stored';
const CS_HIT = 'imgedge; hit; detail=memory';
const CS_LARGE = 'imgedge; fwd=uri-miss; detail=too-large';

const images = open(__ENV.MANIFEST)
  .split('\n')
  .map((line) => line.replace(/\r$/, '').split('\t'))
  .filter((c) => c.length >= 4 && c[0] && c[3])
  .map(([name, bytes, type, sha256]) => ({ name, bytes: parseInt(bytes, 10), type, sha256 }));
if (images.length === 0) {
  throw new Error(`no images in ${__ENV.MANIFEST}`);
}
const TOTAL = images.length * 2; // image x route

const routesPassed = new Counter('smoke_routes_passed');
const routesFailed = new Counter('smoke_routes_failed');

export const options = {
  vus: 1,
  iterations: 1,
  // With vus + iterations, `duration` is the run's upper bound (maxDuration, default 10m).
  // One run moves ~4x the corpus through a possibly debug build: give it room, but bounded.
  duration: '20m',
  thresholds: {
    checks: ['rate==1.0'],
    'http_req_failed{kind:load}': ['rate==0'],
    'http_req_duration{kind:load}': ['p(95)<2000', 'p(99)<5000'],
    smoke_routes_failed: ['count==0'],
    smoke_routes_passed: [`count==${TOTAL}`],
  },
};

// Case-insensitive header lookup (k6 canonicalises names, but don't depend on it).
function header(res, name) {
  const want = name.toLowerCase();
  for (const k of Object.keys(res.headers || {})) {
    if (k.toLowerCase() === want) return String(res.headers[k]).trim();
  }
  return undefined;
}

// Runs named conditions through check(); returns the names that failed.
function checks(res, conds, tags) {
  const failed = [];
  for (const [name, fn] of Object.entries(conds)) {
    let ok = false;
    try {
      ok = fn(res);
    } catch (e) {
      ok = false;
    }
    check(res, { [name]: () => ok }, tags);
    if (!ok) failed.push(name);
  }
  return failed;
}

function fetchAndCheck(tag, url, img, wantCs, wantAge, tags) {
  const res = http.get(url, { responseType: 'binary', timeout: '60s', tags });
  const body = res.body;
  const size = body ? body.byteLength : -1;
  const conds = {
    'status is 200': (r) => r.status === 200,
    'content-type matches manifest': (r) => header(r, 'Content-Type') === img.type,
    'size matches manifest': () => size === img.bytes,
    'sha256 matches manifest': () => size >= 0 && crypto.sha256(body, 'hex') === img.sha256,
    'x-content-type-options is nosniff': (r) => header(r, 'X-Content-Type-Options') === 'nosniff',
    [`cache-status is "${wantCs}"`]: (r) => header(r, 'Cache-Status') === wantCs,
  };
  if (wantAge) conds['cache hit has Age'] = (r) => header(r, 'Age') !== undefined;
  const failed = checks(res, conds, tags);
  if (failed.length === 0) return [];
  if (res.status !== 200) {
    const text = size > 0 ? String.fromCharCode(...new Uint8Array(body.slice(0, 200))) : '';
    const snippet = text.replace(/[^\x20-\x7e]/g, ' ');
    return [`${tag}: ${res.error ? `error ${res.error}` : `status ${res.status}`},` +
      ` cache-status '${header(res, 'Cache-Status') || ''}', body '${snippet}'`];
  }
  return [`${tag}: failed ${failed.join(', ')} (content-type '${header(res, 'Content-Type') || ''}',` +
    ` size ${size}, cache-status '${header(res, 'Cache-Status') || ''}')`];
}

export default function () {
  routesPassed.add(0);
  routesFailed.add(0);
  const problems = {}; // "i route" -> [reasons]
  const note = (i, route, reasons) => {
    const k = `${i} ${route}`;
    problems[k] = (problems[k] || []).concat(reasons);
  };

  images.forEach((img, i) => {
    const upstream = `${ORIGIN}/${img.name}`;
    // Half the images send the upstream URL raw, the other half percent-encoded.
    const urlA = `${BASE}/image-proxy?url=${i % 2 ? upstream : encodeURIComponent(upstream)}`;
    const urlB = `${BASE}/storage/v1/object/public/${BUCKET}/${img.name}`;
    for (const [route, url] of [['A', urlA], ['B', urlB]]) {
      const tags = { kind: 'load', route, name: `route ${route}` }; // one URL group per route
      if (img.bytes <= LIMIT) {
        note(i, route, fetchAndCheck(`${route}#1`, url, img, CS_MISS, false, tags));
        note(i, route, fetchAndCheck(`${route}#2`, url, img, CS_HIT, true, tags));
      } else {
        note(i, route, fetchAndCheck(`${route}#1`, url, img, CS_LARGE, false, tags));
        note(i, route, fetchAndCheck(`${route}#2`, url, img, CS_LARGE, false, tags));
      }
    }
    const bad = ['A', 'B'].flatMap((r) => problems[`${i} ${r}`] || []);
    console.log(`[${i + 1}/${images.length}] ${img.name} ${img.bytes} ${bad.length ? 'FAIL: ' + bad.join('; ') : 'ok'}`);
  });

  // Origin hit counts: one fetch per stored object and route, two for too-large ones.
  const hitsRes = http.get(`${ORIGIN}/__hits`, { timeout: '10s', tags: { kind: 'control', name: 'origin hits' } });
  let hits = null;
  try {
    hits = hitsRes.status === 200 ? JSON.parse(hitsRes.body) : null;
  } catch (e) {
    hits = null;
  }
  check(hitsRes, { 'origin /__hits readable': () => hits !== null });
  images.forEach((img, i) => {
    const want = img.bytes <= LIMIT ? 1 : 2;
    const paths = { A: `/${img.name}`, B: `/storage/v1/object/public/${BUCKET}/${img.name}` };
    for (const route of ['A', 'B']) {
      const got = hits ? hits[paths[route]] || 0 : 'unknown';
      const ok = check(got, { [`origin hit count (1 stored, 2 too-large)`]: (g) => g === want });
      if (!ok) {
        note(i, route, [`origin hits ${got}, want ${want}`]);
        console.log(`hits: ${img.name} route ${route}: origin saw ${got} requests, want ${want}`);
      }
    }
  });

  let failed = 0;
  images.forEach((img, i) => {
    for (const route of ['A', 'B']) {
      const p = problems[`${i} ${route}`] || [];
      if (p.length) {
        failed += 1;
        console.log(`  FAILED ${img.name} route ${route}: ${p.join('; ')}`);
      }
    }
  });
  routesFailed.add(failed);
  routesPassed.add(TOTAL - failed);
}

export function handleSummary(data) {
  const m = data.metrics;
  const passed = m.smoke_routes_passed ? m.smoke_routes_passed.values.count : 0;
  const failed = m.smoke_routes_failed ? m.smoke_routes_failed.values.count : 0;
  const c = m.checks ? m.checks.values : { passes: 0, fails: 0 };
  const secs = (data.state.testRunDurationMs / 1000).toFixed(1);
  // Anything not counted (an aborted iteration) is a failure too.
  const missing = Math.max(0, TOTAL - passed - failed);
  return {
    stdout:
      `k6 smoke: ${images.length} images x 2 routes, ${c.passes} checks passed, ${c.fails} failed, ${secs} s\n` +
      `smoke: ${passed} passed, ${failed + missing} failed\n`,
  };
}
