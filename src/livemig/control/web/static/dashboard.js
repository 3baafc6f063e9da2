// livemig dashboard: refresh the page's live parts by short polling its `data-live` URL.
// The reply names fragments by element id ({html: {id: markup}}) and charts by <img> id
// ({charts: {id: url}}); a chart is swapped only once the new picture has loaded, so it never
// blinks. Polling stops when the reply says the page is final (the migration has ended).
(function () {
  "use strict";
  const live = document.body.dataset.live;
  if (!live) return;
  const every = Number(document.body.dataset.every || 1000);
  const status = document.getElementById("live-status");
  const shown = {};

  function swapChart(id, url) {
    const img = document.getElementById(id);
    if (!img || img.dataset.src === url || img.dataset.loading === url) return;
    img.dataset.loading = url;
    const next = new Image();
    next.onload = function () {
      img.src = url;
      img.dataset.src = url;
      delete img.dataset.loading;
    };
    next.onerror = function () { delete img.dataset.loading; };
    next.src = url;
  }

  async function tick() {
    let final = false;
    try {
      const reply = await fetch(live, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!reply.ok) throw new Error("the LMO answered " + reply.status);
      const data = await reply.json();
      for (const [id, html] of Object.entries(data.html || {})) {
        const element = document.getElementById(id);
        if (element && shown[id] !== html) {
          element.innerHTML = html;
          shown[id] = html;
        }
      }
      for (const [id, url] of Object.entries(data.charts || {})) swapChart(id, url);
      final = Boolean(data.final);
      status.textContent = final ? "final" : "live";
      status.className = "live-status" + (final ? " final" : "");
      status.title = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      status.textContent = "not updating: " + error.message;
      status.className = "live-status stale";
    }
    if (!final) setTimeout(tick, every);
  }
  setTimeout(tick, every);
})();
