// workerpool dashboard: polls the JSON API and redraws the summary and the tables.
// No framework and no build step; text goes in with textContent only (no HTML injection).
"use strict";

(function () {
  const body = document.body;
  const POLL_MS = Number(body.dataset.pollMs) || 2000;
  const TASK_ROWS = Number(body.dataset.taskRows) || 50;

  const $ = (id) => document.getElementById(id);
  const short = (hex) => (hex ? hex.slice(0, 14) + "…" : "");
  const dash = (v) => (v === null || v === undefined ? "–" : String(v));

  function el(tag, opts, children) {
    const node = document.createElement(tag);
    if (opts) {
      if (opts.cls) node.className = opts.cls;
      if (opts.text !== undefined) node.textContent = opts.text;
      if (opts.href) node.href = opts.href;
      if (opts.data) for (const [k, v] of Object.entries(opts.data)) node.dataset[k] = v;
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }
  const td = (text, cls) => el("td", { text: text, cls: cls });
  const badge = (prefix, status) =>
    el("td", { cls: "status" }, [el("span", { cls: "badge " + prefix + status, text: status })]);
  const link = (href, text, cls) => el("td", { cls: cls }, [el("a", { href: href, text: text })]);

  function fillTable(id, rows, emptyText, columns) {
    const tbody = document.querySelector("#" + id + " tbody");
    const fresh = rows.length
      ? rows
      : [el("tr", { cls: "empty" }, [Object.assign(td(emptyText), { colSpan: columns })])];
    tbody.replaceChildren(...fresh);
  }

  function drawSummary(s) {
    $("pool-address").textContent = s.address || "no POOL_ADDRESS";
    $("chain-id").textContent = dash(s.chainId);
    $("head-block").textContent = dash(s.chain && s.chain.headBlock);
    $("listener-lag").textContent = dash(s.listener && s.listener.lag);
    $("owner").textContent = dash(s.owner);
    $("workers-alive").textContent = dash(s.workers.alive);
    $("workers-lost").textContent = dash(s.workers.lost);
    $("slots").textContent = s.slots.used + " / " + s.slots.total;
    $("deals-total").textContent = dash(s.deals.total);
    $("tasks-total").textContent = dash(s.tasks.total);
    const queues = [];
    for (const [name, depth] of Object.entries(s.queues || {})) {
      queues.push(el("dt", { text: name }), el("dd", { text: depth === null ? "?" : String(depth) }));
    }
    $("queues").replaceChildren(...queues);
    $("tasks-by-status").replaceChildren(
      ...Object.entries(s.tasks.byStatus || {}).map(([status, n]) =>
        el("span", { cls: "badge status-" + status, text: status + " " + n }))
    );
    $("updated").textContent = s.generatedAt;
  }

  function drawTasks(page) {
    fillTable("tasks", page.items.map((t) => el("tr", { data: { taskid: t.chainTaskId } }, [
      link("/api/v1/tasks/" + t.chainTaskId, short(t.chainTaskId), "mono"),
      link("/api/v1/deals/" + t.chainDealId, short(t.chainDealId), "mono"),
      td(dash(t.index)),
      badge("status-", t.status),
      td((t.replicatesGranted ?? "") + "/" + (t.replicatesNeeded ?? "")),
      td(t.updatedAt || ""),
    ])), "no task yet", 6);
  }

  function drawWorkers(page) {
    fillTable("workers", page.items.map((w) => el("tr", { data: { address: w.address } }, [
      td(w.name || ""),
      td(w.address, "mono"),
      badge("worker-", w.status),
      td(w.heartbeatAge === null ? "–" : w.heartbeatAge.toFixed(1) + " s", "age"),
      td((w.busySlots || 0) + " / " + (w.slots || 0)),
      td((w.capabilities || []).join(", ")),
      td(w.version || ""),
    ])), "no worker has sent a heartbeat", 7);
  }

  function drawOrders(page) {
    fillTable("orders", page.items.map((o) => el("tr", { data: { orderhash: o.orderHash } }, [
      td(short(o.orderHash), "mono"),
      badge("order-", o.status),
      td(dash(o.remaining) + " / " + dash(o.volume), "remaining"),
      td(dash(o.price)),
      td(dash(o.category)),
      td(o.tagLabel || ""),
      td(dash(o.trust)),
      td(o.publicationTimestamp || ""),
    ])), "no order published", 8);
  }

  async function getJson(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" } });
    const data = await response.json();
    if (!response.ok) {
      throw new Error((data.error && data.error.message) || response.status + " on " + path);
    }
    return data;
  }

  async function poll() {
    const live = $("live");
    try {
      const [summary, tasks, workers, orders] = await Promise.all([
        getJson("/api/v1/pool"),
        getJson("/api/v1/tasks?per_page=" + TASK_ROWS),
        getJson("/api/v1/workers?per_page=200"),
        getJson("/api/v1/orders?per_page=50"),
      ]);
      drawSummary(summary);
      drawTasks(tasks);
      drawWorkers(workers);
      drawOrders(orders);
      $("error").hidden = true;
      live.textContent = "live";
      live.className = "live ok";
    } catch (err) {
      $("error").textContent = "API unavailable: " + err.message + " (retrying)";
      $("error").hidden = false;
      live.textContent = "disconnected";
      live.className = "live down";
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  poll();
})();
