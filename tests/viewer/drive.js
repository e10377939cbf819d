// Drive Debian's Chromium (headless) to one OHIF view and report what it shows.
// usage: node drive.js <url> <screenshot.png> <sr|pdf> [text that must appear ...]
// Prints one JSON object: {text, pdf: {found, bytes, magic}, errors}.
'use strict';
const puppeteer = require('puppeteer-core');

async function main() {
  const [url, shot, mode, ...expected] = process.argv.slice(2);
  const browser = await puppeteer.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--enable-unsafe-swiftshader', '--use-angle=swiftshader', '--disable-gpu',
           '--disable-dev-shm-usage', '--window-size=1440,900', '--lang=en-US'],
  });
  const errors = [];
  try {
    const page = await browser.newPage();
    page.on('pageerror', e => errors.push(String(e).slice(0, 300)));
    await page.setViewport({ width: 1440, height: 900 });
    await page.goto(url, { waitUntil: 'networkidle2', timeout: 90000 });
    // The first-visit onboarding tour would cover the viewport.
    await page.addStyleTag({ content: '.shepherd-element, .shepherd-modal-overlay-container { display: none !important; }' });
    // The "investigational use" banner: confirm it, as a user does once.
    await page.evaluate(() => {
      const b = [...document.querySelectorAll('button')].find(x => /Confirm and hide/i.test(x.innerText));
      if (b) b.click();
    });
    let pdf = { found: false, bytes: 0, magic: '' };
    if (mode === 'sr') {
      await page.waitForFunction(
        texts => texts.every(t => document.body.innerText.includes(t)), { timeout: 90000, polling: 500 }, expected);
      // Show the last expected text (the Arabic) in the middle of the screenshot.
      await page.evaluate(t => {
        const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
        for (let n = walker.nextNode(); n; n = walker.nextNode()) {
          if (n.textContent.includes(t)) { n.parentElement.scrollIntoView({ block: 'center' }); return; }
        }
      }, expected[expected.length - 1]);
      await new Promise(r => setTimeout(r, 500));
    } else {
      await page.waitForSelector('object[type="application/pdf"]', { timeout: 90000 });
      await page.waitForNetworkIdle({ idleTime: 1500, timeout: 60000 }).catch(() => {});
      pdf = await page.evaluate(async () => {
        const el = document.querySelector('object[type="application/pdf"]');
        const src = el && (el.data || el.src);
        if (!src) return { found: !!el, bytes: 0, magic: '' };
        const buf = new Uint8Array(await (await fetch(src)).arrayBuffer());
        return { found: true, bytes: buf.length, magic: String.fromCharCode(...buf.slice(0, 5)) };
      });
      await new Promise(r => setTimeout(r, 2500)); // let the PDF plugin paint before the screenshot
    }
    await page.screenshot({ path: shot });
    const text = await page.evaluate(() => document.body.innerText);
    process.stdout.write(JSON.stringify({ text, pdf, errors }));
  } finally {
    await browser.close();
  }
}

main().catch(err => {
  process.stderr.write(String(err && err.stack || err));
  process.exit(1);
});
