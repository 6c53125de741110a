// flash-crowd.js: VUS (200) clients arriving at once at a cold cache, over the whole corpus.
//
// All virtual users start together; each makes ITERATIONS requests (default 5) one after the
// other, VU v's i-th one for image (v + i * VUS) mod N of a fixed shuffle of the whole corpus, large
// images included (the six over 5 MiB stream through imgedge unstored), through /image-proxy when
// v + i is even, else the storage route. So the first wave asks for every image at once (200
// requests over 118 images), and the crowd keeps coming for the next four: what the memory of a
// cache does when a page of photos goes viral. Every response is checked for status 200, the
// manifest's content type and byte length.
//
// Env: BASE_URL, ORIGIN_URL, MANIFEST, BUCKET (see lib.js); VUS (default 200), ITERATIONS
// (default 5).
// Thresholds (load requests only): no failed request, every check passes, p95 < 15 s, p99 < 30 s.
// Run: bash loadtest/run.sh flash-crowd [--peers]
import { loadCorpus, getImage, shuffled, thresholds, envInt } from './lib.js';

const images = shuffled(loadCorpus());
const VUS = envInt('VUS', 200);
const ITERATIONS = envInt('ITERATIONS', 5);

export const options = {
  scenarios: {
    'flash-crowd': { executor: 'per-vu-iterations', vus: VUS, iterations: ITERATIONS, maxDuration: '5m' },
  },
  thresholds: thresholds(15000, 30000),
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export default function () {
  const v = __VU - 1; // __VU is 1-based
  const img = images[(v + __ITER * VUS) % images.length];
  getImage((v + __ITER) % 2 ? 'storage' : 'proxy', img, '120s');
}
