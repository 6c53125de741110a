// hits.js: cache hits under a Zipf popularity, through both routes.
//
// Every image of the corpus that a cache may store (<= 5 MiB, imgedge's default
// max_cacheable_bytes: 112 of the 118) is fetched once through each route in setup(), so the
// caches start warm; then VUS virtual users loop for DURATION, each request picking an image by a
// Zipf(ZIPF_S) distribution over a fixed shuffle of them (rank 1 about a fifth of the requests at
// s = 1) and /image-proxy or the storage route with equal odds. Every response is checked for
// status 200, the manifest's content type and byte length.
//
// Env: BASE_URL, ORIGIN_URL, MANIFEST, BUCKET (see lib.js); VUS (default 32), DURATION (default
// 30s), ZIPF_S (default 1.0).
// Thresholds (load requests only): no failed request, every check passes, p95 < 250 ms, p99 < 1 s.
// Run: bash loadtest/run.sh hits [--peers] [--duration D]
import { loadCorpus, getImage, warm, zipf, shuffled, thresholds, envInt, MAX_CACHEABLE_BYTES } from './lib.js';

const images = shuffled(loadCorpus().filter((img) => img.bytes <= MAX_CACHEABLE_BYTES));
const S = parseFloat(__ENV.ZIPF_S || '1.0');
if (!(S > 0 && S < 10)) throw new Error(`ZIPF_S=${__ENV.ZIPF_S}: want a number in (0, 10)`);
const pick = zipf(images.length, S);

export const options = {
  scenarios: {
    hits: { executor: 'constant-vus', vus: envInt('VUS', 32), duration: __ENV.DURATION || '30s' },
  },
  setupTimeout: '10m',
  thresholds: thresholds(250, 1000),
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  if (warm(images, ['proxy', 'storage']) > 0) throw new Error('warm-up fetches failed');
}

export default function () {
  getImage(Math.random() < 0.5 ? 'proxy' : 'storage', images[pick()]);
}
