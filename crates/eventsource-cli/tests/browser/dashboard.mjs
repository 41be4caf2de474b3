// Drives the dashboard in headless Chromium as an operator would: open the link the dashboard
// printed (it carries the run's token), find the dead letters by their reason, replay one and
// purge another (accepting each confirmation), see each reported. Between the two, the same
// browser visits a page of another site that tries to purge a letter behind the operator's
// back (a cross-site fetch and a form post): the letter must still be there.
// usage: node dashboard.mjs LINK REASON SCREENSHOT.png
import { chromium } from "playwright-core";
import http from "node:http";

const [link, reason, screenshot] = process.argv.slice(2);
const dashboard = new URL(link);
const prefix = decodeURIComponent(dashboard.pathname.split("/")[2]);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
// Another site: its page posts to the dashboard as soon as it loads.
let target = "";
const evil = http.createServer((req, res) => {
  res.writeHead(200, { "content-type": "text/html" });
  res.end(`<!doctype html><body><form id="f" method="POST" action="${target}" enctype="text/plain">
    <input name="x" value="y"></form><script>
    fetch(${JSON.stringify(target)}, { method: "POST", mode: "no-cors", body: "x",
      headers: { "Content-Type": "text/plain" } }).finally(() => { document.title = "sent"; document.getElementById("f").submit(); });
    </script></body>`);
});
await new Promise((resolve) => evil.listen(0, "127.0.0.1", resolve));
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 1100 } });
  const page = await context.newPage();
  page.on("pageerror", (e) => { console.error(`page error: ${e.message}`); process.exitCode = 1; });
  await page.goto(link);
  if (page.url().includes("token=")) { console.error(`the token stayed in the address: ${page.url()}`); process.exitCode = 1; }
  const rows = page.locator("#dlq tbody tr", { hasText: reason });
  await rows.first().waitFor({ timeout: 20000 });
  // The overview has rendered its groups and at least two throughput samples.
  await page.locator(".group").first().waitFor({ timeout: 20000 });
  await page.waitForFunction(() => document.querySelector("#legend span") !== null, null, { timeout: 20000 });
  await page.waitForTimeout(8000);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
  const ids = await rows.evaluateAll((trs) => trs.map((tr) => tr.dataset.id));
  if (ids.length < 2) throw new Error(`expected two dead letters, found ${ids.length}`);
  const [replayed, purged] = ids;
  console.log(`dead letters ${ids.join(", ")} shown with their reason`);

  // The other site tries to purge the first letter in this browser.
  target = `${dashboard.origin}/api/p/${encodeURIComponent(prefix)}/dlq/${replayed}/purge`;
  const other = await context.newPage();
  await other.goto(`http://127.0.0.1:${evil.address().port}/`);
  await other.waitForFunction(() => document.title === "sent", null, { timeout: 20000 }).catch(() => {});
  await other.waitForTimeout(1000);
  await other.close();
  await page.reload();
  await page.locator(`#dlq tbody tr[data-id="${replayed}"]`).waitFor({ timeout: 20000 });
  console.log(`the other site's purge of ${replayed} was refused`);

  page.once("dialog", (d) => {
    if (!d.message().startsWith(`Replay dead letter ${replayed}`)) { console.error(`unexpected question: ${d.message()}`); process.exitCode = 1; }
    d.accept();
  });
  await page.locator(`#dlq tbody tr[data-id="${replayed}"] button.replay`).click();
  await page.locator("#dlq-message", { hasText: `replayed ${replayed}` }).waitFor({ timeout: 20000 });
  await page.locator(`#dlq tbody tr[data-id="${replayed}"]`).waitFor({ state: "detached", timeout: 20000 });
  console.log(`replayed ${replayed} from the page`);

  page.once("dialog", (d) => {
    if (!d.message().startsWith(`Delete dead letter ${purged}`)) { console.error(`unexpected question: ${d.message()}`); process.exitCode = 1; }
    d.accept();
  });
  await page.locator(`#dlq tbody tr[data-id="${purged}"] button.purge`).click();
  await page.locator("#dlq-message", { hasText: `purged ${purged}` }).waitFor({ timeout: 20000 });
  await page.locator(`#dlq tbody tr[data-id="${purged}"]`).waitFor({ state: "detached", timeout: 20000 });
  console.log(`purged ${purged} from the page`);
} finally {
  await browser.close();
  evil.close();
}
