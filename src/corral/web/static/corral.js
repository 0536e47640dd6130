/* Corral's console: CSRF on every change, dialogs, power buttons, uploads, job progress,
 * moving machines (migrate, evacuate, rebalance).
 * Every change goes to the JSON API with the session cookie and the X-CSRF-Token header. */
(function () {
  "use strict";
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";

  document.addEventListener("htmx:configRequest", (e) => {
    e.detail.headers["X-CSRF-Token"] = csrf();
  });
  document.addEventListener("htmx:responseError", (e) => {
    problemOf(e.detail.xhr.responseText, e.detail.xhr.status).then((m) => toast(m, "error"));
  });

  async function problemOf(body, status) {
    try {
      const p = typeof body === "string" ? JSON.parse(body) : await body.json();
      return p.detail || p.title || `Error ${status}`;
    } catch (_) {
      return `The server answered ${status}.`;
    }
  }

  async function api(method, url, body) {
    const init = { method, headers: { "X-CSRF-Token": csrf() }, credentials: "same-origin" };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const r = await fetch(url, init);
    if (r.status === 401) {
      location.href = "/ui/login?next=" + encodeURIComponent(location.pathname);
      throw new Error("Your session ended; log in again.");
    }
    if (!r.ok) {
      const text = await r.text();
      const err = new Error(await problemOf(text, r.status));
      try { err.problem = JSON.parse(text); } catch (_) { err.problem = null; }
      throw err;
    }
    return r.status === 204 ? null : r.json();
  }

  function changed() {
    document.body.dispatchEvent(new Event("corral:changed"));
  }

  function toast(message, kind) {
    const box = document.getElementById("toasts");
    if (!box) return null;
    const t = document.createElement("div");
    t.className = "toast " + (kind || "info");
    t.textContent = message;
    box.appendChild(t);
    if (kind !== "sticky") setTimeout(() => t.remove(), kind === "error" ? 8000 : 4000);
    return t;
  }

  /* Follow jobs over Server-Sent Events (/jobs/{id}/stream), with a bar each. */
  function followJobs(jobs, title) {
    const box = document.getElementById("toasts");
    if (!box || !jobs.length) return;
    const t = document.createElement("div");
    t.className = "toast jobs-toast";
    const h = document.createElement("div");
    h.className = "toast-title";
    h.textContent = title;
    t.appendChild(h);
    box.appendChild(t);
    let open = jobs.length;
    for (const job of jobs) {
      const row = document.createElement("div");
      row.className = "job";
      row.innerHTML = '<div class="job-head"><span class="job-what"></span><span class="job-state muted"></span></div>' +
        '<div class="bar job-bar running" role="progressbar"><span style="width:0%"></span></div>';
      row.querySelector(".job-what").textContent = `${job.kind} ${job.target}`;
      t.appendChild(row);
      const show = (j) => {
        row.querySelector(".job-state").textContent = j.state;
        const bar = row.querySelector(".job-bar");
        bar.className = "bar job-bar " + j.state;
        bar.setAttribute("aria-valuenow", Math.round(j.progress * 100));
        const done = j.state === "succeeded" ? 1 : j.progress;
        bar.firstElementChild.style.width = (done * 100).toFixed(0) + "%";
        if (j.error) row.title = j.error;
      };
      show(job);
      // A live move spends most of its time in one step: its "% sent" comes as events.
      const sent = job.kind === "migrate-live" ? followSent(row, job.target) : null;
      const es = new EventSource(`/jobs/${job.id}/stream`);
      es.addEventListener("job", (ev) => {
        const j = JSON.parse(ev.data);
        show(j);
        changed();
        if (j.state !== "pending" && j.state !== "running") {
          es.close();
          if (sent) sent.close();
          if (j.state !== "succeeded") toast(`${j.kind} ${j.target}: ${j.error || j.state}`, "error");
          if (--open === 0) setTimeout(() => t.remove(), 3000);
        }
      });
      es.onerror = () => {
        es.close();
        if (sent) sent.close();
        if (--open === 0) setTimeout(() => t.remove(), 3000);
      };
    }
  }

  /* The machine.migrating events of one machine, shown under its job's bar. */
  function followSent(row, machine) {
    const line = document.createElement("div");
    line.className = "job-foot muted job-sent";
    row.appendChild(line);
    const es = new EventSource("/events/stream?seconds=3600");
    es.addEventListener("machine.migrating", (ev) => {
      const e = JSON.parse(ev.data);
      if (e.target === machine) line.textContent = e.message;
    });
    return es;
  }

  /* A confirmation dialog; resolves true when the person confirms. */
  function confirmDialog(title, text, ok) {
    const d = document.getElementById("confirm-dialog");
    if (!d) return Promise.resolve(window.confirm(text));
    d.querySelector("#confirm-title").textContent = title;
    d.querySelector("#confirm-text").textContent = text;
    d.querySelector("#confirm-ok").textContent = ok || "Delete";
    d.returnValue = "";
    d.showModal();
    return new Promise((resolve) => {
      d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true });
    });
  }

  document.addEventListener("click", async (e) => {
    const el = e.target.closest("button, a");
    if (!el) return;
    if (el.id === "logout") {
      try { await api("DELETE", "/auth/session"); } catch (_) { /* gone already */ }
      location.href = "/ui/login";
    } else if (el.dataset.power) {
      const { power, name } = el.dataset;
      el.disabled = true;
      try {
        await api("POST", `/machines/${encodeURIComponent(name)}/${power}`);
        toast(`${name}: ${power} sent`, "ok");
      } catch (err) { toast(err.message, "error"); }
      changed();
    } else if (el.dataset.deleteMachine) {
      const name = el.dataset.deleteMachine;
      const yes = await confirmDialog(`Delete ${name}?`,
        `The machine ${name} is powered off if running, and its disks are removed. This cannot be undone.`);
      if (!yes) return;
      try {
        const acc = await api("DELETE", `/machines/${encodeURIComponent(name)}?force=true`);
        followJobs(acc.jobs, `Deleting ${name}`);
        if (el.dataset.after) setTimeout(() => { location.href = el.dataset.after; }, 600);
      } catch (err) { toast(err.message, "error"); }
      changed();
    } else if (el.dataset.deleteImage) {
      const name = el.dataset.deleteImage;
      if (!(await confirmDialog(`Delete image ${name}?`, `The image ${name} is removed. Machines must no longer use it.`))) return;
      try {
        await api("DELETE", `/images/${encodeURIComponent(name)}`);
        toast(`Image ${name} deleted`, "ok");
      } catch (err) { toast(err.message, "error"); }
      changed();
    } else if (el.dataset.maintenance) {
      const { maintenance, host } = el.dataset;
      el.disabled = true;
      try {
        await api("PUT", `/hosts/${encodeURIComponent(host)}/maintenance`, { on: maintenance === "on" });
        toast(`${host}: maintenance ${maintenance}`, "ok");
        setTimeout(() => location.reload(), 300);
      } catch (err) { toast(err.message, "error"); el.disabled = false; }
    } else if (el.hasAttribute("data-check-hosts")) {
      el.disabled = true;
      try {
        const report = await api("POST", "/hosts/check");
        const changed = report.changes.map((c) => `${c.host} is ${c.after}`).join(", ");
        toast(changed ? `Health: ${changed}` : "Every host is as it was.", "ok");
        setTimeout(() => location.reload(), 300);
      } catch (err) { toast(err.message, "error"); el.disabled = false; }
    } else if (el.dataset.migrate) {
      openMigrate(el.dataset.migrate, el);
    } else if (el.dataset.evacuate) {
      evacuate(el);
    } else if (el.id === "rebalance-pool") {
      rebalance(el);
    } else if (el.id === "create-preview-button") {
      previewCreate(el.closest("form"));
    } else if (el.id === "open-create") {
      openCreate();
    } else if (el.hasAttribute("data-close")) {
      el.closest("dialog").close();
    }
  });

  function openCreate() {
    const d = document.getElementById("create-dialog");
    if (!d) return;
    d.querySelector("#create-error").hidden = true;
    d.querySelector("#create-preview").hidden = true;
    d.showModal();
    d.querySelector('input[name="name"]').focus();
  }

  /* Moving machines: power states that move live (as the server decides). */
  const LIVE = new Set(["running", "paused", "blocked"]);
  const enc = encodeURIComponent;

  function size(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = bytes, i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return `${i ? v.toFixed(1) : v} ${units[i]}`;
  }

  function plural(n, one, many) { return `${n} ${n === 1 ? one : (many || one + "s")}`; }

  /* The Migrate dialog, filled when it opens: the machine's power decides live or cold
   * (fixed: a running machine only moves live, a stopped one only cold), and the targets
   * are the hosts up now, other than its own. */
  async function openMigrate(name, button) {
    const d = document.getElementById("migrate-dialog");
    if (!d) return;
    button.disabled = true;
    let m, hosts;
    try {
      [m, hosts] = await Promise.all([api("GET", `/machines/${enc(name)}`), api("GET", "/hosts")]);
    } catch (err) {
      toast(err.message, "error");
      return;
    } finally {
      button.disabled = false;
    }
    d.querySelector("#migrate-source").textContent = m.host;
    const select = d.querySelector("#migrate-to");
    const choices = hosts.filter((h) => h.up && h.name !== m.host).map((h) => {
      const free = h.capacity.memory_bytes * h.memory_ratio - h.claimed.memory_bytes;
      return new Option(`${h.name} (${plural(h.claimed.machines, "machine")}, ${size(free)} memory free)`, h.name);
    });
    select.replaceChildren(new Option("Scheduler's choice", ""), ...choices);
    const live = LIVE.has(m.power);
    const box = d.querySelector("#migrate-live");
    box.checked = live;
    box.disabled = true;
    d.querySelector("#migrate-note").textContent = live
      ? "It runs, so it moves live: its memory and its own disk blocks travel while it keeps running."
      : "It is stopped, so it moves cold: its own disk bytes are copied and checked, then it is removed here.";
    d.querySelector("#migrate-submit").disabled = false;
    d.showModal();
    select.focus();
  }

  async function submitMigrate(form) {
    const name = form.dataset.machine;
    const to = form.querySelector("#migrate-to").value || null;
    const body = { to, live: form.querySelector("#migrate-live").checked };
    const submit = form.querySelector("#migrate-submit");
    submit.disabled = true;
    try {
      const acc = await api("POST", `/machines/${enc(name)}/migrate`, body);
      followJobs(acc.jobs, `Moving ${name}${to ? " to " + to : ""}${body.live ? " live" : ""}`);
      changed();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      form.closest("dialog").close();
      submit.disabled = false;
    }
  }

  async function evacuate(el) {
    const host = el.dataset.evacuate;
    const n = parseInt(el.dataset.machines, 10) || 0;
    const what = n === 0 ? "it holds no machines."
      : `then ${n === 1 ? "its machine moves" : `each of its ${n} machines moves`} to the host the scheduler picks: running machines live, stopped ones cold.`;
    if (!(await confirmDialog(`Evacuate ${host}?`, `${host} goes into maintenance (nothing new goes there); ${what}`, "Evacuate"))) return;
    el.disabled = true;
    try {
      const acc = await api("POST", `/hosts/${enc(host)}/evacuate`);
      const moving = acc.machines.map((m) => `${m.machine} (${m.live ? "live" : "cold"})`);
      toast(moving.length
        ? `Evacuating ${host}: ${moving.join(", ")} will move.`
        : `${host} is in maintenance; it holds no machines.`, "ok");
      changed();
    } catch (err) {
      toast(err.message, "error");
      el.disabled = false;
    }
  }

  async function rebalance(el) {
    el.disabled = true;
    try {
      const plan = await api("GET", "/pool/rebalance");
      const n = plan.moves.length;
      if (!n) {
        toast("The load is as even as the placement rules allow; nothing to move.", "ok");
        return;
      }
      const lines = plan.moves.slice(0, 8).map((m) => `${m.machine} from ${m.source} to ${m.target}`);
      if (n > 8) lines.push(`and ${n - 8} more`);
      if (!(await confirmDialog(`Rebalance the pool: ${plural(n, "move")}?`,
        `${lines.join("; ")}. Running machines move live, stopped ones cold.`, "Rebalance"))) return;
      const acc = await api("POST", "/pool/rebalance", { max_moves: n });
      toast(acc.moves.length
        ? `Rebalancing: ${acc.moves.map((m) => `${m.machine} to ${m.target}`).join(", ")}.`
        : "Nothing to move any more: the load is as even as the rules allow.", "ok");
      changed();
    } catch (err) {
      toast(err.message, "error");
    } finally {
      el.disabled = false;
    }
  }

  document.addEventListener("submit", async (e) => {
    const form = e.target;
    if (form.id === "migrate-form") {
      e.preventDefault();
      submitMigrate(form);
    } else if (form.id === "create-form") {
      e.preventDefault();
      const body = createBody(form);
      showCreateError(form, null);
      form.querySelector("#create-preview").hidden = true;
      const submit = form.querySelector("#create-submit");
      submit.disabled = true;
      try {
        const acc = await api("POST", "/machines", body);
        form.closest("dialog").close();
        form.reset();
        followJobs(acc.jobs, `Creating ${body.count > 1 ? body.count + " machines" : body.name}`);
        changed();
      } catch (x) {
        showCreateError(form, x);
      } finally {
        submit.disabled = false;
      }
    } else if (form.id === "login-form") {
      e.preventDefault();
      const err = form.querySelector("#login-error");
      err.hidden = true;
      const f = new FormData(form);
      const r = await fetch("/auth/session", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name: f.get("name"), password: f.get("password") }),
        credentials: "same-origin",
      });
      if (r.ok) {
        const next = new URL(form.dataset.next || "/ui/", location.origin);
        location.href = next.origin === location.origin ? next.href : "/ui/";
        return;
      }
      err.textContent = r.status === 401
        ? "Wrong user name or password."
        : await problemOf(r, r.status);
      err.hidden = false;
      form.querySelector("#login-password").select();
    } else if (form.id === "upload-form") {
      e.preventDefault();
      upload(form);
    }
  });

  /* The create dialog's request body, placement hints included. */
  function createBody(form) {
    const f = new FormData(form);
    const body = {
      name: f.get("name").trim(),
      image: f.get("image"),
      cpus: parseInt(f.get("cpus"), 10),
      memory_bytes: parseInt(f.get("memory"), 10) * 1024 * 1024,
      count: parseInt(f.get("count"), 10),
      ssh_keys: f.get("ssh_keys").split("\n").map((s) => s.trim()).filter(Boolean),
    };
    if (f.get("disk_gib")) body.disk_bytes = parseInt(f.get("disk_gib"), 10) * 1024 ** 3;
    if (f.get("host")) body.host = f.get("host");
    const tags = (f.get("tags") || "").split(/[\s,]+/).map((s) => s.trim()).filter(Boolean);
    if (tags.length) body.tags = tags;
    if ((f.get("group") || "").trim()) body.group = f.get("group").trim();
    if (f.get("policy")) body.policy = f.get("policy");
    if (f.get("soft")) body.soft = true;
    if (f.get("fast")) body.fast = true;
    return body;
  }

  /* A refused create: the problem's sentence and, when no host could take a machine,
   * the scheduler's per-host breakdown. */
  function showCreateError(form, x) {
    const box = form.querySelector("#create-error");
    const pre = form.querySelector("#create-explain");
    if (!x) { box.hidden = true; return; }
    form.querySelector("#create-error-text").textContent = x.message;
    const ex = x.problem && x.problem.explanation;
    if (ex && ex.lines) {
      pre.textContent = ex.lines.join("\n") + (ex.hint ? "\n\n" + ex.hint : "");
      pre.hidden = false;
    } else {
      pre.hidden = true;
    }
    box.hidden = false;
    box.scrollIntoView({ block: "nearest" });
  }

  /* Preview placement: a dry run of the create, one row per machine. */
  async function previewCreate(form) {
    if (!form.reportValidity()) return;
    const box = form.querySelector("#create-preview");
    const rows = form.querySelector("#create-preview-rows");
    showCreateError(form, null);
    box.hidden = true;
    try {
      const plan = await api("POST", "/machines", { ...createBody(form), dry_run: true });
      rows.replaceChildren(...plan.placements.map((p) => {
        const tr = document.createElement("tr");
        for (const [text, cls] of [[p.machine, "strong"], [p.host, "preview-host"], [p.score.toFixed(2), "num"]]) {
          const td = document.createElement("td");
          td.className = cls;
          td.textContent = text;
          tr.appendChild(td);
        }
        tr.title = Object.entries(p.scores).map(([k, v]) => `${k} ${v.toFixed(2)}`).join(", ");
        return tr;
      }));
      box.hidden = false;
      box.scrollIntoView({ block: "nearest" });
    } catch (x) {
      showCreateError(form, x);
    }
  }

  function upload(form) {
    const file = form.querySelector("#upload-file").files[0];
    const name = form.querySelector("#upload-name").value.trim();
    const format = form.querySelector("#upload-format").value;
    const err = document.getElementById("upload-error");
    const box = document.getElementById("upload-progress");
    const bar = document.getElementById("upload-bar");
    const pct = document.getElementById("upload-pct");
    const label = document.getElementById("upload-label");
    const submit = form.querySelector("#upload-submit");
    err.hidden = true;
    box.hidden = false;
    submit.disabled = true;
    label.textContent = `Uploading ${file.name}…`;
    const q = new URLSearchParams({ name });
    if (format) q.set("format", format);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/images?" + q.toString());
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("X-CSRF-Token", csrf());
    xhr.upload.onprogress = (ev) => {
      if (!ev.lengthComputable) return;
      const p = (100 * ev.loaded) / ev.total;
      bar.style.width = p.toFixed(1) + "%";
      pct.textContent = `${p.toFixed(0)} %`;
    };
    xhr.onload = async () => {
      submit.disabled = false;
      if (xhr.status === 202) {
        bar.style.width = "100%";
        label.textContent = "Uploaded; vetting and importing…";
        const acc = JSON.parse(xhr.responseText);
        followJobs(acc.jobs, `Importing ${name}`);
        form.reset();
        setTimeout(() => { box.hidden = true; }, 1500);
      } else {
        box.hidden = true;
        err.textContent = await problemOf(xhr.responseText, xhr.status);
        err.hidden = false;
      }
    };
    xhr.onerror = () => {
      submit.disabled = false;
      box.hidden = true;
      err.textContent = "The upload failed: the connection was lost.";
      err.hidden = false;
    };
    xhr.send(file);
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (location.hash === "#create") openCreate();
  });

  window.corral = { api, toast, followJobs };
})();
