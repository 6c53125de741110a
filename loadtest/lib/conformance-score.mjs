#!/usr/bin/env node
// Scores a results file of the HTTP caching test suite (npm `http-cache-tests`, the suite behind
// cache-tests.fyi) the way its own results page does (lib/display.mjs, determineTestResult):
//
//   - the tests are the package's tests/index.mjs plus tests/surrogate-control.mjs (cli.mjs adds
//     those too), less `browser_only` ones, which the command-line client never runs;
//   - a test is required when its `kind` is absent or "required" (others: "optimal", "check");
//   - a test passes when its result is `true` and every test in its `depends_on` passes, by the
//     same rule, transitively (a dependency of kind "check" counts when its answer is "yes", which
//     is also a result of `true`); a test with no result (not run) does not pass.
//
// Scored this way, the published results shipped in the package's results/ folder give Squid 122,
// Apache httpd 119, Traffic Server 119, Varnish 107 and nginx 94 of 165 required tests.
//
// Usage: node loadtest/lib/conformance-score.mjs --suite DIR [--min N] RESULTS.json
//   DIR   the installed package (node_modules/http-cache-tests)
//   N     exit 3 when fewer than N required tests pass
// Prints the failing required tests grouped by test suite, the optional/check counts, and as the
// last line: `conformance: N of M required tests pass`. Exit 2 on unusable input.

import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

function usage (msg) {
  if (msg) console.error(`conformance-score: ${msg}`)
  console.error('usage: node conformance-score.mjs --suite DIR [--min N] RESULTS.json')
  process.exit(2)
}

let suiteDir = null
let min = null
let resultsFile = null
const argv = process.argv.slice(2)
for (let i = 0; i < argv.length; i++) {
  const a = argv[i]
  if (a === '--suite') suiteDir = argv[++i]
  else if (a === '--min') min = argv[++i]
  else if (a.startsWith('--')) usage(`unknown option ${a}`)
  else if (resultsFile === null) resultsFile = a
  else usage('more than one results file')
}
if (!suiteDir || !resultsFile) usage()
if (min !== null && !/^\d+$/.test(min)) usage(`--min wants a whole number, not "${min}"`)

const load = async rel => {
  const file = path.resolve(suiteDir, rel)
  if (!fs.existsSync(file)) usage(`no ${file}: is --suite the installed http-cache-tests package?`)
  return (await import(pathToFileURL(file).href)).default
}
const suites = [...(await load('tests/index.mjs')), await load('tests/surrogate-control.mjs')]

let results
try {
  results = JSON.parse(fs.readFileSync(resultsFile, 'utf8'))
} catch (e) {
  usage(`cannot read results ${resultsFile}: ${e.message}`)
}
if (results === null || typeof results !== 'object' || Array.isArray(results) ||
    Object.keys(results).length === 0) {
  usage(`${resultsFile} holds no test results`)
}

const byId = new Map()
const tests = []
for (const suite of suites) {
  for (const test of suite.tests) {
    if (test.browser_only === true) continue
    if (byId.has(test.id)) usage(`duplicate test id ${test.id} in the suite`)
    const t = { ...test, suiteName: suite.name }
    byId.set(test.id, t)
    tests.push(t)
  }
}

const memo = new Map()
// true, or the reason it does not pass: a string.
function verdict (id, stack = new Set()) {
  if (memo.has(id)) return memo.get(id)
  const t = byId.get(id)
  let v
  if (t === undefined) {
    v = 'unknown test'
  } else if (stack.has(id)) {
    v = 'dependency cycle'
  } else {
    const r = results[id]
    if (r === undefined) v = 'not run'
    else if (r !== true) v = Array.isArray(r) ? `${r[0]}: ${r[1]}` : `result ${JSON.stringify(r)}`
    else v = true
    if (v === true) {
      stack.add(id)
      for (const dep of t.depends_on || []) {
        if (verdict(dep, stack) !== true) {
          v = `depends on ${dep}, which does not pass`
          break
        }
      }
      stack.delete(id)
    }
  }
  memo.set(id, v)
  return v
}

const kindOf = t => (t.kind === undefined || t.kind === 'required') ? 'required' : t.kind
const counts = { required: [0, 0], optimal: [0, 0], check: [0, 0] }
const failing = new Map() // suite name -> [[id, name, reason]]
for (const t of tests) {
  const kind = kindOf(t)
  if (!(kind in counts)) usage(`test ${t.id} has unknown kind ${t.kind}`)
  const v = verdict(t.id)
  counts[kind][1]++
  if (v === true) counts[kind][0]++
  else if (kind === 'required') {
    if (!failing.has(t.suiteName)) failing.set(t.suiteName, [])
    failing.get(t.suiteName).push([t.id, t.name, v])
  }
}
const unknown = Object.keys(results).filter(id => !byId.has(id))

const oneLine = s => String(s).replace(/\s+/g, ' ').trim()
if (failing.size > 0) {
  console.log('failing required tests:')
  for (const [suiteName, list] of failing) {
    console.log(`\n## ${suiteName} (${list.length})`)
    for (const [id, name, reason] of list) {
      console.log(`  - ${id}: ${oneLine(name)}`)
      console.log(`      ${oneLine(reason)}`)
    }
  }
  console.log('')
}
if (unknown.length > 0) {
  console.log(`results for ${unknown.length} test(s) not in this suite version, ignored: ${unknown.join(', ')}`)
}
console.log(`optimal: ${counts.optimal[0]} of ${counts.optimal[1]} pass (not conformance problems)`)
console.log(`check: ${counts.check[0]} of ${counts.check[1]} answer yes (information only)`)
console.log(`conformance: ${counts.required[0]} of ${counts.required[1]} required tests pass`)
if (min !== null && counts.required[0] < Number(min)) {
  console.error(`conformance-score: ${counts.required[0]} is below the minimum of ${min}`)
  process.exit(3)
}
