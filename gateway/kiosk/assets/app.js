// The kiosk page: plain DOM, no build step. Talks to the same-origin API only.
"use strict";

const $ = (id) => document.getElementById(id);
let selectedSlot = null;
let slotSearch = 0; // the latest search; answers to earlier ones are dropped
let myRole = null; // the logged-in staff member's role: a physician may open reports
let reportRequest = 0; // the latest report opened; answers to earlier ones are dropped

async function api(method, path, body) {
  const init = { method, credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/fhir+json";
    init.body = JSON.stringify(body);
  }
  const r = await fetch(path, init);
  let data = null;
  try { data = await r.json(); } catch (_) { data = null; }
  return { status: r.status, data, retryAfter: Number(r.headers.get("Retry-After")) || 0 };
}

// Every time shown to staff is in the browser's own locale and time zone, never raw.
const dateTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });
const timeOnly = new Intl.DateTimeFormat(undefined, { timeStyle: "short" });

// An RFC 3339 instant, or a Date, as local date and time.
function localTime(value) {
  const d = value instanceof Date ? value : new Date(value);
  return Number.isNaN(d.getTime()) ? String(value) : dateTime.format(d);
}

function problem(data) {
  return (data && data.issue && data.issue[0] && data.issue[0].diagnostics) || "エラー / error";
}

function show(loggedIn, me) {
  // The enrolment view (#enrol, enrol.js) keeps the login form hidden: an answer to /api/me
  // arriving after it was shown must not push the enrolment form down under a person's click.
  $("login-view").hidden = loggedIn || location.hash === "#enrol";
  $("booking-view").hidden = !loggedIn;
  $("who").hidden = !loggedIn;
  $("who-name").textContent = loggedIn ? `${me.name} (${me.role})` : "";
  myRole = loggedIn ? me.role : null;
  if (!loggedIn) closeReport();
  const admin = loggedIn && me.role === "admin";
  $("accounts-view").hidden = !admin;
  // The identity section (identity.js) shows itself to administrators and physicians of a
  // gateway that keeps the identity registry (the core with [identity]).
  const identity = loggedIn && me.identity === true;
  if (loggedIn) document.body.dataset.role = me.role; else delete document.body.dataset.role;
  if (identity) document.body.dataset.identity = "1"; else delete document.body.dataset.identity;
  document.dispatchEvent(new CustomEvent("kiosk-session", { detail: { role: myRole, identity } }));
  // Logged in: offer every scanner (whether or not the day shown has a free slot) and list
  // the day's free slots at once.
  if (loggedIn) {
    listScanners();
    searchSlots();
  }
  if (admin) listAccounts();
}

// Administrators: the staff accounts, with when each lock ends (local time).
async function listAccounts() {
  const r = await api("GET", "/api/accounts");
  const body = $("accounts-table").querySelector("tbody");
  body.replaceChildren();
  for (const a of (r.status === 200 && r.data) || []) {
    const state = a.disabled ? "無効 / Disabled" : a.locked ? "ロック中 / Locked" : "有効 / Active";
    const until = a.locked && a.locked_until_unix ? localTime(new Date(a.locked_until_unix * 1000)) : "";
    const tr = document.createElement("tr");
    tr.dataset.account = a.name;
    for (const text of [a.name, a.role, state, until]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  }
}

async function refreshMe() {
  const r = await api("GET", "/api/me");
  show(r.status === 200, r.data);
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await api("POST", "/api/login", {
    name: $("login-name").value, password: $("login-password").value, code: $("login-code").value,
  });
  $("login-password").value = "";
  $("login-code").value = "";
  if (r.status === 200) {
    $("login-error").hidden = true;
    show(true, r.data);
  } else if (r.status === 429) {
    const when = localTime(new Date(Date.now() + Math.max(r.retryAfter, 1) * 1000));
    $("login-error").textContent = `ログインの失敗が多すぎます。${when} 以降にもう一度お試しください / ` +
      `Too many failed logins from this device; try again after ${when}`;
    $("login-error").hidden = false;
  } else {
    $("login-error").textContent = problem(r.data);
    $("login-error").hidden = false;
  }
});

$("logout").addEventListener("click", async () => {
  await api("POST", "/api/logout");
  show(false);
});

function localDayBounds(day) {
  // The day in Japan Standard Time (the regional schedules' zone).
  return [`${day}T00:00:00+09:00`, `${day}T23:59:59+09:00`];
}

// The scanners that can be booked fill the list (kept: "All" and any scanner already there).
async function listScanners() {
  const r = await api("GET", "/fhir/Schedule");
  if (r.status !== 200) return;
  const select = $("slot-schedule");
  for (const entry of (r.data && r.data.entry) || []) {
    const id = entry.resource && entry.resource.id;
    if (id && ![...select.options].some((o) => o.value === id)) select.add(new Option(id, id));
  }
}

// Searches the free slots of the chosen day (and scanner).
async function searchSlots() {
  const day = $("slot-day").value;
  if (!day) return;
  const [from, to] = localDayBounds(day);
  const params = new URLSearchParams();
  const scanner = $("slot-schedule").value;
  if (scanner) params.set("schedule", scanner);
  params.set("status", "free");
  params.append("start", "ge" + from);
  params.append("start", "lt" + to);
  const mine = ++slotSearch;
  const r = await api("GET", "/fhir/Slot?" + params.toString());
  if (mine !== slotSearch) return;
  const list = $("slot-list");
  list.replaceChildren();
  // A new list: the slot chosen from the old one is no longer on show.
  selectedSlot = null;
  $("book-slot").textContent = "—";
  $("book-submit").disabled = true;
  if (r.status !== 200) {
    $("slot-summary").textContent = "";
    delete $("slot-summary").dataset.day;
    $("book-result").textContent = problem(r.data);
    $("book-result").hidden = false;
    return;
  }
  const stale = (r.data.meta && r.data.meta.tag || []).some((t) => t.code === "stale");
  $("slot-stale").hidden = !stale;
  const entries = r.data.entry || [];
  $("slot-summary").textContent = `${day} ${scanner || "すべて / All"}: ` +
    `空き枠 ${entries.length} 件 / ${entries.length} free slots`;
  $("slot-summary").dataset.day = day;
  $("slot-summary").dataset.schedule = scanner;
  for (const entry of entries) {
    const s = entry.resource;
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.slot = s.id;
    b.textContent = `${timeOnly.format(new Date(s.start))} ${s.schedule.reference.replace("Schedule/", "")}`;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => {
      for (const other of list.querySelectorAll("button")) other.setAttribute("aria-pressed", "false");
      b.setAttribute("aria-pressed", "true");
      selectedSlot = s.id;
      $("book-slot").textContent = `${s.id} (${localTime(s.start)})`;
      $("book-submit").disabled = false;
    });
    li.append(b);
    list.append(li);
  }
}

$("slot-form").addEventListener("submit", (e) => {
  e.preventDefault();
  searchSlots();
});

function personName() {
  const groups = [$("book-name-alpha").value, $("book-name-kanji").value, $("book-name-kana").value];
  while (groups.length > 1 && !groups[groups.length - 1]) groups.pop();
  return groups.join("=");
}

// ---- Safety warnings at booking (contrast reactions, cumulative CT dose) ----

const WARNING_SYSTEM = "urn:gatewayd:safety-warning";
const ACKNOWLEDGED_WARNING = "urn:gatewayd:acknowledged-warning";
const DOSE_EVENT = "urn:gatewayd:dose-event";
const SEVERITY = { SV: "重度 / severe", MO: "中等度 / moderate", MI: "軽度 / mild", U: "不明 / unknown" };
let pendingBooking = null; // the request a 409 asked to acknowledge: { body, ids }

// A sub-extension's value (valueString, valueCode or valueQuantity.value).
function sub(ext, url) {
  return ((ext && ext.extension) || []).filter((x) => x.url === url)
    .map((x) => x.valueString ?? x.valueCode ?? (x.valueQuantity && x.valueQuantity.value));
}

// `YYYYMMDD[HHMM...]` as sent: its date, written YYYY-MM-DD.
function hl7Date(v) {
  return v && /^[0-9]{8}/.test(v) ? `${v.slice(0, 4)}-${v.slice(4, 6)}-${v.slice(6, 8)}` : (v || "");
}

function closeSafety() {
  pendingBooking = null;
  $("safety-view").hidden = true;
  $("safety-warnings").replaceChildren();
  $("safety-dose").hidden = true;
  $("safety-dose-events").querySelector("tbody").replaceChildren();
  $("safety-physician-only").hidden = true;
  $("safety-acknowledge").hidden = true;
}

// The dose Observation (contained in a 409 or in a booked CT appointment), if any.
function showDose(resource) {
  const dose = (resource.contained || []).find((c) => c.resourceType === "Observation" && c.id === "cumulative-dose");
  if (!dose) return false;
  const days = ((dose.extension || []).find((x) => x.url === "urn:gatewayd:dose-window-days") || {}).valueUnsignedInt;
  const total = dose.valueQuantity ? dose.valueQuantity.value : 0;
  const high = dose.referenceRange && dose.referenceRange[0] && dose.referenceRange[0].high;
  const over = high ? ` (閾値 / threshold ${high.value} mGy·cm)` : "";
  $("safety-dose-total").textContent =
    `過去${days}日間の累積DLP / Cumulative DLP of the last ${days} days: ${total} mGy·cm${over}`;
  $("safety-dose").dataset.total = String(total);
  const tbody = $("safety-dose-events").querySelector("tbody");
  tbody.replaceChildren();
  for (const c of dose.component || []) {
    const ext = (c.extension || []).find((x) => x.url === DOSE_EVENT);
    const tr = document.createElement("tr");
    const cells = [hl7Date(sub(ext, "when")[0]), sub(ext, "hospital")[0] || "",
      (c.code && c.code.text) || "", sub(ext, "ctdivol")[0] ?? "", c.valueQuantity ? c.valueQuantity.value : ""];
    for (const text of cells) {
      const td = document.createElement("td");
      td.textContent = String(text);
      tr.append(td);
    }
    tbody.append(tr);
  }
  $("safety-dose").hidden = false;
  return true;
}

// A 409 with safety warnings: each in Japanese and English, and the dose; a physician may
// acknowledge them and book, others are told that a physician must.
function showWarnings(body, outcome) {
  const ids = [];
  const list = $("safety-warnings");
  list.replaceChildren();
  for (const issue of outcome.issue || []) {
    const coding = issue.details && (issue.details.coding || []).find((c) => c.system === WARNING_SYSTEM);
    if (!coding) continue;
    ids.push(coding.code);
    const ext = (issue.extension || []).find((x) => x.url === WARNING_SYSTEM);
    const li = document.createElement("li");
    li.dataset.warning = coding.code;
    li.append(line(issue.details.text || "", "ja"));
    li.append(line(issue.diagnostics || ""));
    const facts = [];
    const agent = sub(ext, "agent")[0];
    if (agent) facts.push(`薬剤 / Agent: ${agent}`);
    const severity = sub(ext, "severity")[0];
    if (severity) facts.push(`重症度 / Severity: ${SEVERITY[severity] || severity}`);
    const reactions = sub(ext, "reaction");
    if (reactions.length) facts.push(`反応 / Reaction: ${reactions.join(", ")}`);
    const when = sub(ext, "when")[0];
    if (when) facts.push(`時期 / When: ${hl7Date(when)}`);
    const hospital = sub(ext, "hospital")[0];
    if (hospital) facts.push(`病院 / Hospital: ${hospital}`);
    if (facts.length) li.append(line(facts.join(" · "), "note"));
    list.append(li);
  }
  if (!ids.length) return false;
  showDose(outcome);
  pendingBooking = { body, ids };
  $("safety-title").textContent = "安全確認 / Safety warnings";
  const physician = myRole === "physician";
  $("safety-acknowledge").hidden = !physician;
  $("safety-physician-only").hidden = physician;
  $("safety-view").hidden = false;
  return true;
}

async function sendBooking(body) {
  const r = await api("POST", "/fhir/Appointment/$book", body);
  const out = $("book-result");
  out.hidden = false;
  if (r.status === 201 || r.status === 200) {
    closeSafety();
    const acc = (r.data.identifier || []).find((i) => i.system === "urn:gatewayd:accession");
    out.className = "";
    out.textContent = `予約しました / Booked: ${r.data.status} ${acc ? acc.value : ""}`;
    out.dataset.status = r.data.status;
    // A CT booking shows the cumulative dose it was booked with.
    if (showDose(r.data)) {
      $("safety-title").textContent = "累積線量 / Cumulative dose";
      $("safety-view").hidden = false;
    }
    // That slot is taken now: another press would only be refused.
    selectedSlot = null;
    $("book-submit").disabled = true;
  } else if (r.status === 409 && r.data && showWarnings(body, r.data)) {
    out.className = "warning";
    out.textContent = "安全確認が必要です。予約はまだされていません。 / Safety warnings: nothing is booked yet.";
    out.dataset.status = "warnings";
  } else {
    closeSafety();
    out.className = "error";
    out.textContent = problem(r.data);
    out.dataset.status = "refused";
  }
}

$("safety-acknowledge").addEventListener("click", () => {
  if (!pendingBooking) return;
  // The same request (same id) again, with every warning shown acknowledged.
  const body = { ...pendingBooking.body,
    extension: pendingBooking.ids.map((id) => ({ url: ACKNOWLEDGED_WARNING, valueString: id })) };
  sendBooking(body);
});

$("book-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!selectedSlot) return;
  closeSafety();
  const requestId = "req-" + crypto.randomUUID();
  const body = {
    resourceType: "Appointment",
    identifier: [{ system: "urn:gatewayd:request", value: requestId }],
    slot: [{ reference: "Slot/" + selectedSlot }],
    serviceType: [{ text: $("book-procedure").value }],
    contained: [{
      resourceType: "Patient", id: "patient",
      identifier: [{ value: $("book-patient-id").value }],
      name: [{ text: personName() }],
      birthDate: $("book-birth").value,
      gender: $("book-sex").value,
    }],
    participant: [{ actor: { reference: "#patient" }, status: "needs-action" }],
  };
  await sendBooking(body);
});

$("list-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await api("GET", "/fhir/Appointment?patient=" + encodeURIComponent($("list-patient-id").value));
  const body = $("list-table").querySelector("tbody");
  body.replaceChildren();
  closeReport();
  for (const entry of (r.status === 200 && r.data.entry) || []) {
    const a = entry.resource;
    const acc = (a.identifier || []).find((i) => i.system === "urn:gatewayd:accession");
    const tr = document.createElement("tr");
    tr.dataset.appointment = a.id;
    for (const text of [a.slot[0].reference.replace("Slot/", ""), localTime(a.start), a.status, acc ? acc.value : ""]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    const results = document.createElement("td");
    results.className = "results";
    tr.append(results);
    body.append(tr);
    showResults(a.id, results);
  }
});

// ---- Results of a booked exam: ImagingStudy (any staff), DiagnosticReport (physicians) ----

const EXT = "urn:gatewayd:results:";
const REPORT_STATUS = {
  preliminary: "仮報告 / preliminary", final: "確定 / final",
  corrected: "訂正 / corrected", amended: "追記 / amended",
};

function extension(resource, name) {
  return (resource.extension || []).find((x) => x.url === EXT + name);
}

function line(text, className) {
  const div = document.createElement("div");
  div.textContent = text;
  if (className) div.className = className;
  return div;
}

// Fills an appointment's results cell: images received/delivered, the report's state and,
// for a physician, a button that opens the report.
async function showResults(appointmentId, cell) {
  const r = await api("GET", "/fhir/ImagingStudy?based-on=" + encodeURIComponent("Appointment/" + appointmentId));
  cell.replaceChildren();
  if (r.status !== 200) {
    cell.dataset.state = "unavailable";
    cell.append(line("結果を取得できません / Results unavailable", "failed"));
    return;
  }
  const study = r.data.entry && r.data.entry[0] && r.data.entry[0].resource;
  if (!study) {
    cell.dataset.state = "none";
    cell.append(line("結果未着 / No results yet"));
    return;
  }
  const count = (name) => { const x = extension(study, name); return x ? x.valueUnsignedInt : 0; };
  const announced = study.numberOfInstances || 0;
  const received = count("images-received");
  const delivered = count("images-delivered");
  const failed = count("images-failed");
  const complete = (extension(study, "complete") || {}).valueBoolean === true;
  cell.dataset.state = "results";
  cell.dataset.imagesReceived = String(received);
  cell.dataset.imagesDelivered = String(delivered);
  cell.append(line(`画像 ${announced}枚中 ${received}枚受信・${delivered}枚送信済${complete ? " (検査完了)" : ""} / ` +
    `Images: ${received} of ${announced} received, ${delivered} delivered${complete ? " (complete)" : ""}`));
  if (failed > 0) cell.append(line(`${failed}枚 送信失敗 / ${failed} failed to deliver`, "failed"));
  const report = extension(study, "report");
  if (!report) {
    cell.dataset.report = "none";
    cell.append(line("レポート 未着 / Report: not yet"));
    return;
  }
  const part = (name) => (report.extension || []).find((x) => x.url === name) || {};
  const status = part("status").valueCode;
  const reportReceived = part("received").valueBoolean === true;
  const reportDelivered = part("delivered").valueBoolean === true;
  cell.dataset.report = reportDelivered ? "delivered" : reportReceived ? "received" : "announced";
  const label = REPORT_STATUS[status] || String(status || "");
  cell.append(line(
    `レポート (${label}) ${reportReceived ? "受信済" : "未着"}${reportDelivered ? "・電子カルテ送信済" : ""} / ` +
    `Report: ${reportReceived ? "received" : "not yet"}${reportDelivered ? ", delivered to the EMR" : ""}`));
  if (myRole === "physician" && reportReceived) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "open-report";
    b.textContent = "レポートを読む / Read report";
    b.addEventListener("click", () => openReport(appointmentId));
    cell.append(b);
  }
}

function closeReport() {
  reportRequest++;
  $("report-view").hidden = true;
  $("report-lines").replaceChildren();
  $("report-meta").textContent = "";
  $("report-error").hidden = true;
  delete $("report-view").dataset.appointment;
}

// The report's text, line by line, as text (never as markup).
async function openReport(appointmentId) {
  closeReport();
  $("report-view").hidden = false;
  const mine = ++reportRequest;
  const r = await api("GET", "/fhir/DiagnosticReport?based-on=" + encodeURIComponent("Appointment/" + appointmentId));
  if (mine !== reportRequest || $("report-view").hidden) return;
  const report = r.status === 200 && r.data.entry && r.data.entry[0] && r.data.entry[0].resource;
  if (!report) {
    $("report-error").textContent = r.status === 200 ? "レポートはまだありません / No report yet" : problem(r.data);
    $("report-error").hidden = false;
    return;
  }
  $("report-view").dataset.appointment = appointmentId;
  const issued = report.issued ? ` ${localTime(report.issued)}` : "";
  $("report-meta").textContent = `${REPORT_STATUS[report.status] || report.status}${issued}`;
  const dl = $("report-lines");
  for (const o of report.contained || []) {
    if (o.resourceType !== "Observation") continue;
    const title = o.code && o.code.text;
    if (title) {
      const dt = document.createElement("dt");
      dt.textContent = title;
      dl.append(dt);
    }
    const dd = document.createElement("dd");
    dd.textContent = o.valueString || "";
    dl.append(dd);
  }
}

$("report-close").addEventListener("click", closeReport);

$("slot-day").value = new Date(Date.now() + 9 * 3600 * 1000).toISOString().slice(0, 10);
refreshMe();
