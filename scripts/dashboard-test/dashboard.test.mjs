// Drives the hub's dashboard in headless Chromium against a short real run: a scored hub with
// an operator and allocations, two contributors and a validator, then an epoch closed into the
// ledger; the run is steered by its holders, one of whom changes H by vote before round 1 (the
// contributors switch mid-run) while a second proposal is rejected. Checks that pages load
// without console errors, the charts show the run's points, the leaderboard order is the API's,
// the governance page shows both proposals with the API's tallies and what changed when, and
// the ledger explorer's in-browser proof check passes for a real entry and fails for a tampered
// copy. Screenshots go to $SCREENSHOTS.
//
//   TESSERA_BIN=target/debug/tessera SCREENSHOTS=target/dashboard node scripts/dashboard-test/dashboard.test.mjs

import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const BIN = process.env.TESSERA_BIN ?? "target/debug/tessera";
const SHOTS = process.env.SCREENSHOTS ?? "target/dashboard-screenshots";
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const tmp = mkdtempSync(join(tmpdir(), "tessera-dashboard-"));
mkdirSync(SHOTS, { recursive: true });
const procs = [];

function fail(message) {
  console.error(`dashboard test FAILED: ${message}`);
  for (const p of procs) p.kill("SIGKILL");
  process.exit(1);
}

function check(cond, message) {
  if (!cond) fail(message);
}

function start(args, name) {
  const p = spawn(BIN, args, { stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  p.stderr.on("data", (d) => { log += d; });
  p.log = () => log;
  p.name = name;
  procs.push(p);
  return p;
}

function exited(p, seconds) {
  return new Promise((resolve) => {
    const timer = setTimeout(() => fail(`${p.name} still running after ${seconds} s:\n${p.log()}`), seconds * 1000);
    p.on("exit", (code) => { clearTimeout(timer); code === 0 ? resolve() : fail(`${p.name} exited ${code}:\n${p.log()}`); });
  });
}

async function waitFile(path, p) {
  for (let i = 0; i < 600; i++) {
    if (existsSync(path) && readFileSync(path, "utf8").trim()) return readFileSync(path, "utf8").trim();
    if (p.exitCode !== null) fail(`${p.name} exited early:\n${p.log()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  fail(`${p.name} did not start`);
}

const get = async (url) => (await fetch(url)).json();

// A short real run.
const op = join(tmp, "operator.pem");
const operator = execFileSync(BIN, ["keygen", "--out", op], { encoding: "utf8" }).trim().split("\n")[0];
const holderKey = join(tmp, "holder.pem");
const holder = execFileSync(BIN, ["keygen", "--out", holderKey], { encoding: "utf8" }).trim().split("\n")[0];
writeFileSync(join(tmp, "allocations.toml"), `backers = 7000\n${holder} = 3000\n`);
writeFileSync(join(tmp, "rules.toml"), "voting_rounds = 1\nquorum_ppm = 200000\nthreshold_ppm = 500001\n\n[bounds]\ninner_steps = [2, 10]\nreleases = true\n");
const hub = start(["hub", "--model", "tiny", "--synthetic-chars", "20000", "--batch-size", "4", "--warmup-steps", "2",
  "--inner-steps", "5", "--rounds", "3", "--quorum", "2", "--scored", "--validator-token", "tok",
  "--operator", operator, "--allocations", join(tmp, "allocations.toml"), "--governance", join(tmp, "rules.toml"),
  "--database", `sqlite://${join(tmp, "hub.db")}`, "--store", join(tmp, "store"), "--listen", "127.0.0.1:0",
  "--addr-file", join(tmp, "hub.addr"), "--key", join(tmp, "hub.pem")], "hub");
const url = `http://${await waitFile(join(tmp, "hub.addr"), hub)}`;
// Before round 0 closes: the holder (30% of the power) changes H from 5 to 4 and votes down a release.
const tessera = (args) => execFileSync(BIN, args, { encoding: "utf8" });
const idOf = (out) => out.split("\n")[0].replace("proposal ", "").trim();
const hChange = idOf(tessera(["propose", "--hub", url, "--key", holderKey, "--title", "shorter rounds", "--inner-steps", "4"]));
const release = idOf(tessera(["propose", "--hub", url, "--key", holderKey, "--title", "an early release", "--release", "v0"]));
tessera(["vote", "--hub", url, "--key", holderKey, "--proposal", hChange, "yes"]);
tessera(["vote", "--hub", url, "--key", holderKey, "--proposal", release, "no"]);
const workers = ["ada", "bo"].map((n) => start(["contribute", "--hub", url, "--state-dir", join(tmp, n), "--name", n, "--threads", "1"], n));
// A testing adversary whose NaN submissions the hub refuses: its page must show why.
workers.push(start(["contribute", "--hub", url, "--state-dir", join(tmp, "eve"), "--name", "eve", "--threads", "1", "--adversary", "nan"], "eve"));
const validator = start(["validator", "--hub", url, "--token", "tok", "--threads", "1", "--insecure-dev-tee"], "validator");
await Promise.all([...workers, validator].map((p) => exited(p, 240)));
execFileSync(BIN, ["economy", "close", "--db", join(tmp, "serve.sqlite"), "--hub", url, "--key", op], { encoding: "utf8" });

const status = await get(`${url}/v1/status`);
const board = await get(`${url}/v1/leaderboard`);
check(status.finished && board.rows.length >= 2, `the run did not finish with rated contributors: ${JSON.stringify(board)}`);
const eve = status.contributors.find((c) => c.name === "eve");
check(eve && eve.rejected > 0, `the NaN adversary was not refused: ${JSON.stringify(status.contributors)}`);
check(!board.rows.find((r) => r.id === eve.id).qualified, "a contributor that earned nothing qualified for the next phase");

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
page.on("pageerror", (e) => errors.push(String(e)));

async function open(hash) {
  await page.goto(`${url}/${hash}`);
  await page.waitForSelector('body[data-ready="1"]', { timeout: 30000 });
}

try {
  // The run: charts carry every round's point, the leaderboard is the API's order.
  await open("");
  const points = Number(await page.getAttribute("#loss-chart", "data-points"));
  const losses = status.history.filter((h) => h.mean_inner_loss != null).length;
  check(points === losses && losses === 3, `the loss chart has ${points} points; the run has ${losses} rounds with a loss`);
  check(await page.locator("#loss-chart canvas").count() > 0, "the loss chart drew no canvas");
  const run = await get(`${url}/v1/run`);
  const floor = Number(await page.getAttribute("#loss-chart", "data-floor"));
  check(run.spec.data.loss_floor > 0 && floor === run.spec.data.loss_floor, `the loss chart's entropy floor ${floor} is not the run's ${run.spec.data.loss_floor}`);
  check((await page.textContent("#loss-chart")).includes("entropy floor"), "the loss chart has no entropy floor series");
  check(Number(await page.getAttribute("#bytes-chart", "data-points")) === status.history.length, "the bytes chart misses rounds");
  const closedRounds = status.history.filter((h) => h.closed_ms && h.closed_ms > h.opened_ms).length;
  check(closedRounds === 3 && Number(await page.getAttribute("#throughput-chart", "data-points")) === closedRounds, "the throughput chart misses rounds");
  const order = await page.locator("#leaderboard tbody tr").evaluateAll((rows) => rows.map((r) => Number(r.dataset.id)));
  check(JSON.stringify(order) === JSON.stringify(board.rows.map((r) => r.id)), `leaderboard order ${order} is not the API's`);
  check((await page.textContent("main")).includes("epoch"), "the serving section is missing");
  await page.screenshot({ path: join(SHOTS, "run.png"), fullPage: true });

  // A contributor's page.
  await open(`#/contributor/${board.rows[0].id}`);
  check((await page.textContent("#submitted-rounds")).includes("0"), "the contributor page lists no rounds");
  const history = await get(`${url}/v1/contributors/${board.rows[0].id}/history`);
  check(history.ratings.length === 3 && Number(await page.getAttribute("#rating-chart", "data-points")) === 3, `the rating chart does not show the 3 rated rounds: ${JSON.stringify(history.ratings)}`);
  check(await page.locator("#scores tbody tr").count() === history.scores.length && history.scores.length === 3, "the scored submissions table misses rows");
  // How each reward was computed: one row per scored submission, each reproduced from its round's rows.
  const rewards = await get(`${url}/v1/contributors/${board.rows[0].id}/rewards?last=50`);
  check(rewards.length === 3 && rewards.every((e) => e.reproduced), `the hub does not reproduce every reward: ${JSON.stringify(rewards)}`);
  check(await page.locator("#rewards tbody tr").count() === 3 && (await page.textContent("#rewards")).includes("(score "), "the rewards table does not show the rule with its numbers");
  check(await page.locator("#rewards td.fail").count() === 0, "the rewards table shows a reward it could not reproduce");
  await page.screenshot({ path: join(SHOTS, "contributor.png"), fullPage: true });
  await open(`#/contributor/${eve.id}`);
  const refused = await page.locator("#rejections tbody tr").count();
  check(refused === eve.rejected && (await page.textContent("#rejections")).includes("malformed"), `eve's page shows ${refused} refusals, the hub counts ${eve.rejected}`);
  await page.screenshot({ path: join(SHOTS, "refused.png"), fullPage: true });

  // The ledger explorer: a real entry's proof verifies in the browser; a tampered copy does not.
  await open("#/ledger");
  const row = page.locator('#ledger tr[data-seq="1"]');
  await row.locator("button.check").click();
  await row.locator(".verdict.ok, .verdict.fail").waitFor({ timeout: 30000 });
  const good = await row.locator(".verdict").textContent();
  check(good.startsWith("✓ valid"), `the proof of entry 1 did not verify: ${good}`);
  await row.locator("button.tamper").click();
  await page.waitForFunction(() => document.querySelector('#ledger tr[data-seq="1"] .verdict')?.textContent.startsWith("✗"), null, { timeout: 30000 });
  const bad = await row.locator(".verdict").textContent();
  check(bad.startsWith("✗ invalid"), `a tampered entry was not refused: ${bad}`);
  await page.screenshot({ path: join(SHOTS, "ledger.png"), fullPage: true });

  // Governance: both proposals closed with the API's tallies; H changed at round 1.
  const gov = await get(`${url}/v1/governance/proposals`);
  const applied = gov.proposals.find((p) => p.id === hChange);
  const rejected = gov.proposals.find((p) => p.id === release);
  check(applied?.state === "applied" && rejected?.state === "rejected", `proposals did not close as voted: ${JSON.stringify(gov)}`);
  check((await get(`${url}/v1/run`)).spec.inner_steps === 4, "the voted H is not the one the hub serves");
  await open("#/governance");
  const rows = await page.locator("#closed-proposals tbody tr").evaluateAll((rs) => rs.map((r) => [r.dataset.id, r.dataset.state, r.querySelector(".votes").textContent]));
  check(rows.length === 2, `the governance page shows ${rows.length} closed proposals`);
  for (const p of [applied, rejected]) {
    const r = rows.find((x) => x[0] === p.id);
    check(r && r[1] === p.state && r[2].includes(`yes ${p.tally.yes} · no ${p.tally.no}`) && r[2].includes(`of ${p.tally.power}`), `proposal ${p.id}: the page shows ${JSON.stringify(r)}, the API ${JSON.stringify(p)}`);
  }
  const changed = await page.locator("#changes li[data-round]").allTextContents();
  check(changed.length === 1 && changed[0].includes("round 1") && changed[0].includes("→ 4"), `what changed when: ${changed}`);
  await page.screenshot({ path: join(SHOTS, "governance.png"), fullPage: true });
  await open("#/ledger");
  const kinds = await page.locator("#ledger tbody tr td:nth-child(2)").allTextContents();
  for (const k of ["spec", "proposal", "vote", "outcome", "applied change"]) check(kinds.some((x) => x.startsWith(k)), `the ledger explorer shows no ${k} entry: ${kinds}`);

  // A sealed run whose validator attests with the INSECURE development stand-in: said plainly.
  const sealed = start(["hub", "--model", "tiny", "--synthetic-chars", "20000", "--rounds", "1", "--quorum", "1",
    "--scored", "--sealed", "--insecure-dev-tee", "--validator-token", "tok",
    "--database", `sqlite://${join(tmp, "sealed.db")}`, "--store", join(tmp, "sealed-store"), "--listen", "127.0.0.1:0",
    "--addr-file", join(tmp, "sealed.addr"), "--key", join(tmp, "sealed.pem")], "sealed hub");
  const sealedUrl = `http://${await waitFile(join(tmp, "sealed.addr"), sealed)}`;
  start(["validator", "--hub", sealedUrl, "--token", "tok", "--threads", "1", "--insecure-dev-tee"], "sealed validator");
  for (let i = 0; (await fetch(`${sealedUrl}/v1/validator`)).status !== 200; i++) {
    check(i < 600, "the sealed run's validator never registered");
    await new Promise((r) => setTimeout(r, 100));
  }
  await page.goto(`${sealedUrl}/`);
  await page.waitForSelector('body[data-ready="1"]', { timeout: 30000 });
  const banner = await page.textContent("#validator-status");
  check(banner.includes("INSECURE") && (await page.getAttribute("#validator-status", "class")) === "insecure", `no INSECURE banner: ${banner}`);
  await page.screenshot({ path: join(SHOTS, "insecure-validator.png"), fullPage: true });

  check(errors.length === 0, `console errors: ${errors.join("\n")}`);
  console.log(`dashboard: run, contributor, refusals, ledger, governance and INSECURE-validator pages in Chromium OK (${points} loss points, leaderboard ${order}, proof ✓ and tamper ✗); screenshots in ${SHOTS}`);
} catch (e) {
  fail(String(e.stack ?? e));
} finally {
  await browser.close();
  for (const p of procs) p.kill("SIGKILL");
}
