// Drives the dashboard in headless Chromium as an operator would: open the page, find the
// dead letter by its reason, replay it (accepting the confirmation), see it reported.
// usage: node dashboard.mjs URL REASON SCREENSHOT.png
import { chromium } from "playwright-core";

const [url, reason, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
  page.on("pageerror", (e) => { console.error(`page error: ${e.message}`); process.exitCode = 1; });
  await page.goto(url);
  const row = page.locator("#dlq tbody tr", { hasText: reason }).first();
  await row.waitFor({ timeout: 20000 });
  // The overview has rendered its groups and at least two throughput samples.
  await page.locator(".group").first().waitFor({ timeout: 20000 });
  await page.waitForFunction(() => document.querySelector("#legend span") !== null, null, { timeout: 20000 });
  await page.waitForTimeout(8000);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  const id = await row.getAttribute("data-id");
  console.log(`dead letter ${id} shown with its reason`);
  page.once("dialog", (d) => {
    if (!d.message().startsWith(`Replay dead letter ${id}`)) { console.error(`unexpected question: ${d.message()}`); process.exitCode = 1; }
    d.accept();
  });
  await row.locator("button.replay").click();
  await page.locator("#dlq-message", { hasText: `replayed ${id}` }).waitFor({ timeout: 20000 });
  await page.locator(`#dlq tbody tr[data-id="${id}"]`).waitFor({ state: "detached", timeout: 20000 });
  console.log(`replayed ${id} from the page`);
} finally {
  await browser.close();
}
