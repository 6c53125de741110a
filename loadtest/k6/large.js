// large.js: concurrent streams of the corpus's large images, 7-16 MB.
//
// VUS virtual users (default 16) loop for DURATION (default 30s), each request one of the images
// between MIN_BYTES (7 000 000) and MAX_BYTES (17 000 000) bytes in turn (five in the corpus:
// 7.6-16.4 MB, JPEG, PNG and WebP) through /image-proxy or the storage route in turn. Above
// imgedge's max_cacheable_bytes (5 MiB) every one streams from the origin, never stored:
// the scenario measures stream-through memory and CPU, not the cache. Each response is checked
// for status 200, the manifest's content type and byte length.
//
// Env: BASE_URL, ORIGIN_URL, MANIFEST, BUCKET (see lib.js); VUS, DURATION, MIN_BYTES, MAX_BYTES.
// Thresholds (load requests only): no failed request, every check passes, p95 < 5 s, p99 < 10 s.
// Run: bash loadtest/run.sh large [--peers] [--duration D]
import { loadCorpus, getImage, thresholds, envInt } from './lib.js';

const MIN = envInt('MIN_BYTES', 7000000, 0);
const MAX = envInt('MAX_BYTES', 17000000, 0);
const images = loadCorpus().filter((img) => img.bytes >= MIN && img.bytes <= MAX);
if (images.length === 0) throw new Error(`no image of ${MIN}-${MAX} bytes in the manifest`);

export const options = {
  scenarios: {
    large: { executor: 'constant-vus', vus: envInt('VUS', 16), duration: __ENV.DURATION || '30s' },
  },
  thresholds: thresholds(5000, 10000),
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const n = (__VU - 1) + __ITER;
  getImage(n % 2 ? 'storage' : 'proxy', images[n % images.length], '120s');
}
