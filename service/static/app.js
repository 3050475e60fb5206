// clcalib's web page: the submit form, a job's live progress, cancel and delete.
// Requests go to the JSON API; the sign-in cookie authenticates them, with the page's CSRF token.
// Data from the server is shown with textContent only, never as HTML.
"use strict";

// the session's CSRF token (the server checks it, and the request's Origin, on every change)
function csrfHeaders() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return {"X-CSRF-Token": meta ? meta.content : ""};
}

function numbers(text) {
  return text.split(/[ ,]+/).filter(Boolean).map(Number);
}

async function submitJob(form) {
  const status = document.getElementById("submit-status");
  const f = new FormData(form);
  const intOrNull = (name) => (f.get(name) === "" ? null : Number(f.get(name)));
  const config = {
    method: f.get("method"),
    w_bits: Number(f.get("w_bits")),
    a_bits: Number(f.get("a_bits")),
    iters: Number(f.get("iters")),
    calib_size: Number(f.get("calib_size")),
    preprocess: {resize: intOrNull("resize"), crop: intOrNull("crop"),
                 mean: numbers(f.get("mean")), std: numbers(f.get("std"))},
  };
  if (!f.get("arch")) {  // a .pt2 program: resize/crop left at the form's defaults come from its input size
    for (const name of ["resize", "crop"]) {
      const input = form.elements[name];
      if (input && input.value === input.defaultValue) delete config.preprocess[name];
    }
  }
  const draw = intOrNull("calib_seed");  // the server checks the range
  if (draw !== null) config.calib_seed = draw;
  if (f.get("weight_mb")) config.budget = {weight_mb: Number(f.get("weight_mb"))};
  if (f.get("max_top1_drop")) config.target = {max_top1_drop: Number(f.get("max_top1_drop"))};
  if (f.get("cl_calib")) config.cl_calib = {enabled: true};
  if (f.get("onnx")) { config.export = ["onnx"]; config.export_target = f.get("export_target"); }
  const body = new FormData();
  body.append("model", f.get("model"));
  body.append("calibration", f.get("calibration"));
  const evaluation = f.get("evaluation");
  if (evaluation && evaluation.size) body.append("evaluation", evaluation);
  const labels = f.get("labels");
  if (labels && labels.size) body.append("labels", labels);
  if (f.get("arch")) body.append("arch", f.get("arch"));
  if (f.get("num_classes")) body.append("num_classes", f.get("num_classes"));
  body.append("config", JSON.stringify(config));
  status.textContent = "uploading and checking…";
  const r = await fetch("/v1/jobs", {method: "POST", body, headers: csrfHeaders()});
  const j = await r.json();
  if (!r.ok) {
    status.textContent = `${r.status}: ${j.detail}`;
    status.className = "error";
    return;
  }
  window.location = `/jobs/${j.id}`;
}

function showJob(root, j) {
  root.dataset.state = j.state;
  const state = document.getElementById("state");
  state.textContent = j.state;
  state.className = `state ${j.state}`;
  const p = j.progress || {};
  const bar = document.getElementById("bar");
  const where = document.getElementById("where");
  if (j.state === "running" && p.num_units) {
    const unit = Math.min(p.unit, p.num_units - 1);
    bar.hidden = false;
    bar.max = p.num_units * Math.max(p.iters, 1);
    bar.value = unit * Math.max(p.iters, 1) + (p.iteration || 0);
    where.textContent = (p.message ? `${p.message} · ` : "") +
      `${p.stage} · ${p.stage === "sensitivity" ? "site" : "unit"} ${unit + 1}/${p.num_units} ${p.unit_name || ""}` +
      (p.iters ? ` · iteration ${p.iteration}/${p.iters}` : "") +
      (p.eta_s != null ? ` · about ${Math.ceil(p.eta_s)} s left` : "");
  } else {
    bar.hidden = true;
    where.textContent = "";
  }
  const error = document.getElementById("error");
  error.hidden = !j.error;
  error.textContent = j.error || "";
  document.getElementById("cancel").hidden = !["queued", "running"].includes(j.state);
  if (j.state === "succeeded") {
    document.getElementById("result").hidden = false;
    const list = document.getElementById("downloads");
    list.replaceChildren(...j.artifacts.map((name) => {
      const li = document.createElement("li");
      const a = document.createElement("a");
      a.href = `/v1/jobs/${j.id}/artifacts/${name}`;
      a.download = name;
      a.textContent = name;
      li.append(a);
      return li;
    }));
    const frame = document.getElementById("report");
    if (j.artifacts.includes("report.html") && !frame.getAttribute("src")) {
      frame.src = `/v1/jobs/${j.id}/artifacts/report.html`;
    }
  }
}

function followJob(root) {
  const id = root.dataset.id;
  const events = new EventSource(`/v1/jobs/${id}/events`);
  events.addEventListener("status", (e) => showJob(root, JSON.parse(e.data)));
  events.addEventListener("end", () => events.close());
  events.addEventListener("deleted", () => { events.close(); window.location = "/"; });
  document.getElementById("cancel").addEventListener("click", async () => {
    await fetch(`/v1/jobs/${id}/cancel`, {method: "POST", headers: csrfHeaders()});
  });
  document.getElementById("delete").addEventListener("click", async () => {
    if (!window.confirm("Delete this job and its files?")) return;
    const r = await fetch(`/v1/jobs/${id}`, {method: "DELETE", headers: csrfHeaders()});
    if (r.ok) window.location = "/";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("submit");
  if (form) form.addEventListener("submit", (e) => { e.preventDefault(); submitJob(form); });
  const job = document.getElementById("job");
  if (job) followJob(job);
});
