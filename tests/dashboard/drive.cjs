// Drives Tally's dashboard in headless Chromium and prints what it shows, as JSON, for
// tests/dashboard.rs to check:
//
//   node tests/dashboard/drive.cjs BASE_URL CUSTOMER SCREENSHOT_DIR
//
// playwright-core is found through NODE_PATH; Chromium at $TALLY_TEST_CHROMIUM
// (default /usr/bin/chromium). tests/run.sh installs both.
"use strict";
const { chromium } = require("playwright-core");

const [base, customer, shots, key] = process.argv.slice(2);

async function rows(page, selector, read) {
  return page.$$eval(selector, (trs, read) => trs.map((tr) => {
    const out = {};
    for (const [key, sel, attr] of read) {
      const node = sel ? tr.querySelector(sel) : tr;
      out[key] = node == null ? null : attr ? node.getAttribute(attr) : node.textContent.trim();
    }
    return out;
  }), read);
}

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.TALLY_TEST_CHROMIUM || "/usr/bin/chromium",
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  const consoleErrors = [];
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  const seen = {};

  await page.goto(`${base}/`);
  seen.title = await page.title();
  seen.path = new URL(page.url()).pathname;

  // The API requires a key: the page says so until one is entered, then shows the customer.
  await page.fill("#customer", customer);
  await page.click("#load");
  await page.waitForSelector("#customer-error:not([hidden])");
  seen.keylessError = await page.textContent("#customer-error");
  await page.fill("#api-key", key);
  await page.click("#key-form button");
  await page.waitForSelector("#meters tbody tr");
  seen.keyPlaceholder = await page.getAttribute("#api-key", "placeholder");

  // An invalid customer id: an error, no table.
  await page.fill("#customer", "not a valid id!");
  await page.click("#load");
  await page.waitForSelector("#customer-error:not([hidden])");
  seen.invalidCustomerError = await page.textContent("#customer-error");

  // Pick the customer (script errors counted from here: the 400 above is expected).
  consoleErrors.length = 0;
  await page.fill("#customer", customer);
  await page.click("#load");
  await page.waitForSelector("#meters tbody tr");
  await page.waitForSelector("#chart svg");
  seen.planLine = await page.textContent("#plan-line");
  seen.errorHidden = await page.$eval("#customer-error", (e) => e.hidden);
  seen.url = page.url();
  seen.meters = await rows(page, "#meters tbody tr", [
    ["meter", "td.meter"], ["usage", "td.usage"], ["limit", "td.limit"],
    ["percent", ".pct"], ["state", ".badge"], ["stateClass", ".badge", "class"],
    ["grace", ".grace"], ["fill", ".fill", "style"],
  ]);
  seen.marks = await page.$$eval("#meters tbody tr", (trs) => trs.map((tr) =>
    [...tr.querySelectorAll(".mark")].map((m) => m.getAttribute("data-percent"))));
  seen.chart = await page.$$eval("#chart rect.bar-day", (rs) =>
    rs.map((r) => ({ day: r.getAttribute("data-day"), value: Number(r.getAttribute("data-value")) })));
  // Another meter in the chart.
  await page.selectOption("#chart-meter", "build_minutes");
  await page.waitForFunction(() => document.querySelector("#chart svg")
    ?.getAttribute("aria-label") === "build_minutes per day");
  seen.chartBuild = await page.$$eval("#chart rect.bar-day", (rs) =>
    rs.map((r) => Number(r.getAttribute("data-value"))));
  await page.screenshot({ path: `${shots}/customer.png`, fullPage: true });

  // The operator view.
  await page.click("#tab-operator");
  await page.waitForSelector("#top tbody tr");
  await page.waitForSelector("#stats dd");
  seen.customerViewHidden = await page.$eval("#customer-view", (e) => e.hidden);
  seen.top = await rows(page, "#top tbody tr", [["customer", "a"], ["usage", "td:nth-child(3)"]]);
  seen.totals = await rows(page, "#totals tbody tr", [["meter", "td:nth-child(1)"],
    ["usage", "td:nth-child(2)"], ["customers", "td:nth-child(3)"]]);
  seen.stats = Object.fromEntries(await page.$$eval("#stats dd", (dds) =>
    dds.map((d) => [d.getAttribute("data-stat"), d.textContent])));
  await page.selectOption("#top-meter", "bandwidth_bytes");
  await page.waitForFunction(() => document.querySelector("#top tbody tr a")?.textContent === "dash-b");
  seen.topBandwidth = await rows(page, "#top tbody tr", [["customer", "a"]]);
  await page.screenshot({ path: `${shots}/operator.png`, fullPage: true });

  // A top customer's link opens its view.
  await page.click("#top tbody tr a");
  await page.waitForSelector("#meters tbody tr");
  seen.followedLink = await page.$eval("#customer", (e) => e.value);

  seen.consoleErrors = consoleErrors;
  await browser.close();
  process.stdout.write(JSON.stringify(seen));
})().catch((e) => {
  console.error(e);
  process.exit(1);
});
