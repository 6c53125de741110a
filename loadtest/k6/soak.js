// soak.js: a steady mixed load for DURATION (default 10m), to show that memory, file descriptors
// and latency stay flat.
//
// RATE requests per second (default 100, an open model: constant-arrival-rate, so a slow target
// gets more concurrent requests, not fewer), each one: with odds 1/LARGE_EVERY (default 50) one of
// the images over 5 MiB (streamed through imgedge, never stored), else an image <= 5 MiB by a
// Zipf(1) popularity, through /image-proxy or the storage route with equal odds. setup() first
// fetches every image <= 5 MiB once through each route, so the whole run is the steady state (a
// cache still filling would grow for reasons other than a leak). Each response is checked for
// status 200, the manifest's content type and byte length. loadtest/run.sh samples RSS and open file descriptors each second
// and reports their least-squares slope over the last 8 minutes, and p99 of the last minute
// against the second.
//
// Env: BASE_URL, ORIGIN_URL, MANIFEST, BUCKET (see lib.js); RATE, DURATION, LARGE_EVERY.
// Thresholds (load requests only): no failed request, every check passes, p95 < 500 ms, p99 < 2 s.
// Run: bash loadtest/run.sh soak [--peers] [--duration D]
import { loadCorpus, getImage, warm, zipf, shuffled, thresholds, envInt, MAX_CACHEABLE_BYTES } from './lib.js';

const corpus = loadCorpus();
const small = shuffled(corpus.filter((img) => img.bytes <= MAX_CACHEABLE_BYTES));
const large = corpus.filter((img) => img.bytes > MAX_CACHEABLE_BYTES);
const pick = zipf(small.length, 1.0);
const LARGE_EVERY = envInt('LARGE_EVERY', 50);
const RATE = envInt('RATE', 100);

export const options = {
  scenarios: {
    soak: {
      executor: 'constant-arrival-rate',
      rate: RATE,
      timeUnit: '1s',
      duration: __ENV.DURATION || '10m',
      preAllocatedVUs: Math.min(200, Math.max(10, RATE / 5)),
      maxVUs: Math.max(100, RATE * 2),
    },
  },
  setupTimeout: '10m',
  thresholds: thresholds(500, 2000),
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  if (warm(small, ['proxy', 'storage']) > 0) throw new Error('warm-up fetches failed');
}

export default function () {
  const route = Math.random() < 0.5 ? 'proxy' : 'storage';
  if (large.length && Math.random() < 1 / LARGE_EVERY) {
    getImage(route, large[Math.floor(Math.random() * large.length)], '120s');
  } else {
    getImage(route, small[pick()]);
  }
}
