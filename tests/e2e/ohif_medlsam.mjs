// OHIF v3 (served by MONAI Label at /ohif/) driven in Debian's headless Chromium by playwright-core:
// open a study in MONAI Label mode, connect the MONAI Label panel to the server, run `medlsam` from
// Auto-Segmentation, then press Next Sample (Active Learning) and open the study it proposes; keep
// what a person would see (screenshots) plus what the server returned.
//
//   node ohif_medlsam.mjs --server http://127.0.0.1:8000 --study <StudyInstanceUID> --out <dir>
//
// Writes to <dir>: before.png / after.png (the viewport), page-before.png / page-after.png (whole
// page), infer.nrrd (the label OHIF received), next-sample.png (the Next Sample dialog),
// next-study.png (the proposed study, opened), result.json (what happened, for the Python test).
// Exits 0 when Run returned a label and Next Sample opened a study; 1 otherwise (result.json says why).
import { chromium } from 'playwright-core';
import fs from 'node:fs';
import path from 'node:path';

function args() {
  const out = { server: '', study: '', out: 'build/artifacts/ohif', model: 'medlsam', timeout: 240,
                chromium: process.env.CHROMIUM || '/usr/bin/chromium' };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) out[argv[i].replace(/^--/, '')] = argv[i + 1];
  if (!out.server || !out.study) throw new Error('usage: --server URL --study StudyInstanceUID [--out DIR]');
  out.server = out.server.replace(/\/$/, '');
  out.timeout = Number(out.timeout) * 1000;
  return out;
}

const opts = args();
fs.mkdirSync(opts.out, { recursive: true });
const result = { ok: false, steps: [], console_errors: [], requests: [] };
const t0 = Date.now();
const step = (name, extra = {}) => {
  result.steps.push({ name, t: (Date.now() - t0) / 1000, ...extra });
  console.log(`[${((Date.now() - t0) / 1000).toFixed(1)} s] ${name}`, Object.keys(extra).length ? JSON.stringify(extra) : '');
};
const save = () => fs.writeFileSync(path.join(opts.out, 'result.json'), JSON.stringify(result, null, 2));

// the viewport shows the series once a canvas has non-black pixels
async function waitForSeries(page) {
  await page.locator('.cornerstone-viewport-element').first().waitFor({ state: 'visible' });
  await page.waitForFunction(() => {
    const c = document.querySelector('.cornerstone-viewport-element canvas');
    if (!c || !c.width) return false;
    const probe = document.createElement('canvas');
    probe.width = c.width; probe.height = c.height;
    const ctx = probe.getContext('2d');
    ctx.drawImage(c, 0, 0);
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let bright = 0;
    for (let i = 0; i < d.length; i += 16) if (d[i] > 40) bright++;
    return bright > 200;
  }, null, { polling: 500 });
}

// Offline: OHIF asks for web fonts on the internet; every host but 127.0.0.1 resolves to nothing.
// Playwright gives the browser a new empty profile of its own.
const browser = await chromium.launch({
  executablePath: opts.chromium,
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--proxy-server=http://127.0.0.1:9',
         '--proxy-bypass-list=127.0.0.1', '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1'],
});
let exitCode = 1;
try {
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  page.setDefaultTimeout(opts.timeout);
  // font requests to the internet fail by design (offline); anything else is worth reading
  page.on('console', (msg) => {
    if (msg.type() === 'error' && !msg.text().includes('ERR_PROXY_CONNECTION_FAILED')) {
      result.console_errors.push(msg.text().slice(0, 300));
    }
  });
  page.on('pageerror', (err) => result.console_errors.push(`page error: ${String(err).slice(0, 300)}`));
  page.on('response', (r) => {
    const u = r.url();
    if (u.includes('/infer/') || u.includes('/info/') || u.includes('/activelearning/')) {
      result.requests.push({ url: u, status: r.status() });
    }
  });

  const url = `${opts.server}/ohif/monai-label?StudyInstanceUIDs=${opts.study}`;
  await page.goto(url, { waitUntil: 'domcontentloaded' });
  step('opened', { url });

  // the viewport shows the series once a canvas has non-black pixels
  const viewport = page.locator('.cornerstone-viewport-element').first();
  await waitForSeries(page);
  step('series rendered');

  // MONAI Label panel: point it at this server (it defaults to port 8000) and refresh
  const urlInput = page.locator('#monailabelServerURL');
  if (!(await urlInput.isVisible())) {
    const opener = page.locator('[data-cy="monai-label"], [data-cy*="MONAI"], [title*="MONAI"]').first();
    if (await opener.count()) await opener.click();
  }
  await urlInput.waitFor({ state: 'visible' });
  await urlInput.fill(`${opts.server}/`);
  await urlInput.blur();
  await page.locator('.settingsTable button.actionButton').first().click();
  step('panel refreshed');

  // the Auto-Segmentation tab lists segmentation models; select ours and wait for Run
  const select = page.locator('.modelSelector select.selectBox').first();
  await select.waitFor({ state: 'visible' });
  const models = await select.locator('option').allTextContents();
  result.models = models.map((m) => m.trim());
  step('models listed', { models: result.models });
  if (!result.models.includes(opts.model)) throw new Error(`model ${opts.model} not in the panel: ${result.models}`);
  await select.selectOption(opts.model);

  // the panel creates an (empty) labelmap segmentation; let the viewport settle before "before"
  await page.waitForTimeout(2500);
  const stableShot = async (file) => {
    let last = null;
    for (let i = 0; i < 20; i++) {
      const shot = await viewport.screenshot();
      if (last && Buffer.compare(last, shot) === 0) { fs.writeFileSync(file, shot); return shot; }
      last = shot;
      await page.waitForTimeout(700);
    }
    fs.writeFileSync(file, last);
    return last;
  };
  await stableShot(path.join(opts.out, 'before.png'));
  await page.screenshot({ path: path.join(opts.out, 'page-before.png') });
  result.segments_before = (await page.locator('body').innerText()).length;
  step('before screenshot');

  const inferResponse = page.waitForResponse((r) => r.url().includes(`/infer/${opts.model}`) && r.request().method() === 'POST');
  await page.locator('.modelSelector button.actionButton').first().click();
  step('run clicked');
  const response = await inferResponse;
  const body = await response.body();
  fs.writeFileSync(path.join(opts.out, 'infer.nrrd'), body);
  result.infer = { status: response.status(), bytes: body.length, url: response.url(),
                   content_type: response.headers()['content-type'] || '' };
  step('infer answered', result.infer);
  if (response.status() !== 200) throw new Error(`infer failed: HTTP ${response.status()} ${body.toString().slice(0, 300)}`);

  await page.getByText('Running Segmentation - Successful').first().waitFor({ state: 'visible', timeout: 30000 })
    .catch(() => step('no success notification seen'));
  await page.waitForTimeout(1500);
  const after = await stableShot(path.join(opts.out, 'after.png'));
  await page.screenshot({ path: path.join(opts.out, 'page-after.png') });
  step('after screenshot', { bytes: after.length });

  // the segmentation panel lists the segments by name
  result.page_text = await page.locator('body').innerText();

  // Active Learning > Next Sample: OHIF asks for strategy `random` and shows the proposed series
  await page.getByText('Active Learning', { exact: true }).first().click();
  const nextResponse = page.waitForResponse((r) => r.url().includes('/activelearning/') && r.request().method() === 'POST');
  await page.getByRole('button', { name: 'Next Sample' }).first().click();
  const next = await nextResponse;
  result.next_sample = { status: next.status(), url: next.url(), body: await next.json().catch(() => null) };
  step('next sample answered', { status: next.status() });
  if (next.status() !== 200 || !result.next_sample.body || !result.next_sample.body.StudyInstanceUID) {
    throw new Error(`Next Sample failed: HTTP ${next.status()} ${JSON.stringify(result.next_sample.body)}`);
  }
  const form = page.locator('.nextSampleForm').first();
  await form.waitFor({ state: 'visible' });
  result.next_sample.form_text = await form.innerText();
  await page.screenshot({ path: path.join(opts.out, 'next-sample.png') });
  step('next sample dialog');
  // OK reloads OHIF on the proposed study (after a confirm dialog)
  page.once('dialog', (dialog) => dialog.accept());
  await form.getByRole('button', { name: 'OK' }).click();
  await page.waitForURL((u) => u.toString().includes(result.next_sample.body.StudyInstanceUID));
  await waitForSeries(page);
  await page.waitForTimeout(1500);
  await page.screenshot({ path: path.join(opts.out, 'next-study.png') });
  result.next_sample.opened_url = page.url();
  step('next study opened', { url: page.url() });
  result.ok = true;
  exitCode = 0;
} catch (err) {
  result.error = String(err && err.stack ? err.stack : err).slice(0, 2000);
  console.error(result.error);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages.length) await pages[0].screenshot({ path: path.join(opts.out, 'page-error.png') });
  } catch (_) { /* best effort */ }
} finally {
  result.seconds = (Date.now() - t0) / 1000;
  save();
  await browser.close();
}
process.exit(exitCode);
