// Compares two vitest JSON reports of Storage's acceptance suite, one run against the gateway
// alone and one through imgedge: prints the summary line, each test whose outcome differs (with
// the start of its failure), and exits 1 when a test that passes against the gateway does not
// pass through imgedge.
//
// Usage: node compare.mjs GATEWAY.json IMGEDGE.json
import { readFileSync } from 'node:fs'

const [gatewayFile, edgeFile] = process.argv.slice(2)
if (!gatewayFile || !edgeFile) {
  console.error('usage: node compare.mjs GATEWAY.json IMGEDGE.json')
  process.exit(2)
}

/** Test full name -> { status: passed | failed | skipped, message }. */
function outcomes(file) {
  const report = JSON.parse(readFileSync(file, 'utf8'))
  const tests = new Map()
  for (const suite of report.testResults ?? []) {
    const path = (suite.name ?? '').replace(/^.*\/acceptance\//, '')
    for (const test of suite.assertionResults ?? []) {
      const status = test.status === 'passed' || test.status === 'failed' ? test.status : 'skipped'
      tests.set(`${path} > ${test.fullName}`, { status, message: (test.failureMessages ?? []).join('\n') })
    }
    // A file that failed to load has no tests: count it as one failure.
    if ((suite.assertionResults ?? []).length === 0 && suite.status === 'failed') {
      tests.set(`${path} (file)`, { status: 'failed', message: suite.message ?? '' })
    }
  }
  return tests
}

function counts(tests) {
  const c = { passed: 0, failed: 0, skipped: 0 }
  for (const { status } of tests.values()) c[status]++
  return `${c.passed} passed, ${c.failed} failed, ${c.skipped} skipped`
}

/** The first lines of a failure, without the stack. */
function excerpt(message) {
  const lines = message.split('\n').filter((l) => l.trim() && !/^\s+at /.test(l))
  return lines
    .slice(0, 8)
    .map((l) => `        ${l.length > 300 ? `${l.slice(0, 300)}...` : l}`)
    .join('\n')
}

const gateway = outcomes(gatewayFile)
const edge = outcomes(edgeFile)
console.log(`supabase acceptance: gateway ${counts(gateway)} / imgedge ${counts(edge)}`)

const names = [...new Set([...gateway.keys(), ...edge.keys()])].sort()
let regressions = 0
let differences = 0
for (const name of names) {
  const g = gateway.get(name)?.status ?? 'absent'
  const e = edge.get(name)?.status ?? 'absent'
  if (g === e) continue
  differences++
  const regression = g === 'passed'
  if (regression) regressions++
  console.log(`  ${regression ? 'REGRESSION' : 'differs'}: ${name}: gateway ${g}, imgedge ${e}`)
  const message = edge.get(name)?.message
  if (e === 'failed' && message) console.log(excerpt(message))
}
if (differences === 0) console.log('  no test differs')
console.log(
  `supabase acceptance: ${regressions} test(s) pass against the gateway and fail through imgedge`
)
process.exit(regressions ? 1 : 0)
