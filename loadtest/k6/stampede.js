// stampede.js: VUS (200) clients asking for one cold object at the same moment; the origin must be
// asked once (collapsed forwarding).
//
// setup() reads the origin's request count for the object (origin.py's /__hits); then every
// virtual user makes one request at once; teardown() reads the count again and fails the run
// (threshold origin_requests count<=1) when the origin was asked more than once. The object is
// OBJECT (a manifest name), by default the largest image a cache may store (<= 5 MiB: its fill
// takes longest, so the most requests arrive during it), through ROUTE (storage, default, or
// proxy). loadtest/run.sh resets the origin's counters and starts each target cold.
// http_req_waiting is the time to first byte: how long followers waited for the fill to begin.
//
// Env: BASE_URL, ORIGIN_URL, MANIFEST, BUCKET (see lib.js); VUS (default 200), OBJECT, ROUTE.
// Thresholds: origin asked at most once; no failed request, every check passes, p95 < 5 s,
// p99 < 10 s.
// Run: bash loadtest/run.sh stampede [--peers]
import { check } from 'k6';
import { Counter } from 'k6/metrics';
import { loadCorpus, getImage, originHits, thresholds, envInt, BUCKET, MAX_CACHEABLE_BYTES } from './lib.js';

const corpus = loadCorpus();
const ROUTE = __ENV.ROUTE || 'storage';
if (ROUTE !== 'storage' && ROUTE !== 'proxy') throw new Error(`ROUTE=${ROUTE}: want storage or proxy`);
const image = __ENV.OBJECT
  ? corpus.find((img) => img.name === __ENV.OBJECT)
  : corpus.filter((img) => img.bytes <= MAX_CACHEABLE_BYTES).sort((a, b) => b.bytes - a.bytes)[0];
if (!image) throw new Error(`OBJECT=${__ENV.OBJECT}: not in the manifest`);
// the path origin.py counts it under: /image-proxy's url= points at /NAME
const originPath = ROUTE === 'proxy' ? `/${image.name}` : `/storage/v1/object/public/${BUCKET}/${image.name}`;

const originRequests = new Counter('origin_requests');

export const options = {
  scenarios: {
    stampede: { executor: 'per-vu-iterations', vus: envInt('VUS', 200), iterations: 1, maxDuration: '2m' },
  },
  thresholds: Object.assign(thresholds(5000, 10000), {
    origin_requests: ['count<=1'],
    'checks{kind:origin}': ['rate==1'],
  }),
  summaryTrendStats: ['avg', 'med', 'p(95)', 'p(99)', 'max'],
};

export function setup() {
  const before = originHits(originPath);
  if (before === null) throw new Error(`cannot read the origin's counter at ${__ENV.ORIGIN_URL}/__hits`);
  console.log(`stampede: ${image.name} (${image.bytes} bytes) via ${ROUTE}; origin count before: ${before}`);
  return { before };
}

export default function () {
  getImage(ROUTE, image, '60s');
}

export function teardown(data) {
  const after = originHits(originPath);
  const asked = after === null ? Infinity : after - data.before;
  originRequests.add(after === null ? 1e9 : asked);
  check(asked, { 'origin asked at most once': (n) => n <= 1 }, { kind: 'origin' });
  console.log(`stampede: origin asked ${asked} time(s)${asked === 0 ? ' (the object was already cached: not a cold stampede)' : ''}`);
}
