// 名寄せ / Identity (administrators and physicians): the review queue with both records side by
// side, a patient search (PDQm $match) with linked ids (PIXm) and unlink, and consents
// (公開同意). Plain DOM, no build step; uses `$`, `api`, `problem` and `localTime` from app.js
// (loaded first). Patient data is only ever set as text (textContent), never as markup.
"use strict";

const IDENTITY_FIELDS = [
  ["hospital_id", "病院 / Hospital"],
  ["patient_id", "患者ID / Patient ID"],
  ["family_name", "姓 / Family name"],
  ["given_name", "名 / Given name"],
  ["family_kana", "姓 (カナ) / Family (kana)"],
  ["given_kana", "名 (カナ) / Given (kana)"],
  ["sex", "性別 / Sex"],
  ["birth_date", "生年月日 / Birth date"],
  ["address", "住所 / Address"],
  ["postal_code", "郵便番号 / Postal code"],
  ["phone", "電話 / Phone"],
  ["insurer_number", "保険者番号 / Insurer number"],
  ["insurance_symbol", "記号 / Symbol"],
  ["insurance_number", "番号 / Number"],
  ["insurance_branch", "枝番 / Branch"],
];
const KIND_LABELS = {
  identity: "本人確認情報 / Identity", results: "検査結果 / Results",
  reactions: "アレルギー・副作用 / Allergies and reactions", dose: "被ばく線量 / Dose", images: "画像 / Images",
};
const GRADE_LABELS = { certain: "確実 / certain", probable: "要確認 / probable", possible: "可能性 / possible" };
const HOSPITAL_SYSTEM = "urn:gateway:hospital:";
const REPRESENTATION = "http://hl7.org/fhir/StructureDefinition/iso21090-EN-representation";

function cell(tag, text, className) {
  const el = document.createElement(tag);
  el.textContent = text == null ? "" : String(text);
  if (className) el.className = className;
  return el;
}

function button(text, className, onClick) {
  const b = cell("button", text, className);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

function identityMessage(text, isError) {
  const out = $("identity-message");
  out.textContent = text;
  out.className = isError ? "error" : "";
  out.hidden = !text;
}

function keyToken(hospital, patient) {
  return `${HOSPITAL_SYSTEM}${hospital}|${patient}`;
}

// ---- Review queue ----

async function loadReviewQueue() {
  const r = await api("GET", "/api/identity/review");
  const list = $("review-list");
  list.replaceChildren();
  if (r.status !== 200) {
    $("review-summary").textContent = problem(r.data);
    return;
  }
  const items = r.data.items || [];
  $("review-summary").textContent = `確認待ち ${items.length} 件 / ${items.length} pairs to review`;
  $("review-summary").dataset.count = String(items.length);
  for (const item of items) list.append(reviewItem(item));
}

function reviewItem(item) {
  const article = document.createElement("article");
  article.className = "review-item";
  article.dataset.review = item.id;
  const pct = Math.round((item.probability || 0) * 1000) / 10;
  article.append(cell("p", `一致度 ${pct}% (重み ${item.score}) / Match ${pct}% (weight ${item.score}), ` +
    `${localTime(item.queued)}`));
  const table = document.createElement("table");
  table.className = "review-pair";
  const head = document.createElement("tr");
  head.append(cell("th", "項目 / Field"), cell("th", "A"), cell("th", "B"));
  table.append(head);
  for (const [field, label] of IDENTITY_FIELDS) {
    const a = (item.a.record || {})[field];
    const b = (item.b.record || {})[field];
    const tr = document.createElement("tr");
    tr.dataset.field = field;
    // Differences stand out: a value on one side only, or two values that are not the same
    // (the records' own keys always differ: they are not highlighted).
    const key = field === "hospital_id" || field === "patient_id";
    if (!key && (a || "") !== (b || "")) tr.className = "diff";
    tr.append(cell("th", label), cell("td", a), cell("td", b));
    table.append(tr);
  }
  article.append(table);
  const decide = async (verdict) => {
    const r = await api("POST", `/api/identity/review/${encodeURIComponent(item.id)}`, { verdict });
    if (r.status === 200) {
      identityMessage(verdict === "same" ? "同一人物として連携しました / Linked as the same person"
        : "別人として記録しました / Recorded as not the same person", false);
      loadReviewQueue();
    } else {
      identityMessage(problem(r.data), true);
    }
  };
  article.append(
    button("同一人物 / Same person", "review-same", () => decide("same")),
    button("別人 / Not the same", "review-not-same", () => decide("not_same")));
  return article;
}

// ---- Patient search (PDQm $match) and linked ids (PIXm) ----

function humanName(family, given, code) {
  if (!family && !given) return null;
  const n = { extension: [{ url: REPRESENTATION, valueCode: code }] };
  if (family) n.family = family;
  if (given) n.given = [given];
  return n;
}

function searchPatient() {
  const v = (id) => $(id).value.trim();
  const p = { resourceType: "Patient" };
  const names = [humanName(v("pdq-family"), v("pdq-given"), "IDE"),
    humanName(v("pdq-family-kana"), v("pdq-given-kana"), "SYL")].filter(Boolean);
  if (names.length) p.name = names;
  if (v("pdq-birth")) p.birthDate = v("pdq-birth");
  if (v("pdq-sex")) p.gender = v("pdq-sex");
  if (v("pdq-phone")) p.telecom = [{ system: "phone", value: v("pdq-phone") }];
  if (v("pdq-address") || v("pdq-postal")) {
    p.address = [{}];
    if (v("pdq-address")) p.address[0].text = v("pdq-address");
    if (v("pdq-postal")) p.address[0].postalCode = v("pdq-postal");
  }
  if (v("pdq-hospital") && v("pdq-patient")) {
    p.identifier = [{ system: HOSPITAL_SYSTEM + v("pdq-hospital"), value: v("pdq-patient") }];
  }
  return p;
}

function patientKey(patient) {
  const id = (patient.identifier || []).find((i) => (i.system || "").startsWith(HOSPITAL_SYSTEM));
  return id ? { hospital_id: id.system.slice(HOSPITAL_SYSTEM.length), patient_id: id.value } : null;
}

function nameOf(patient, code) {
  const n = (patient.name || []).find((x) => (x.extension || []).some((e) => e.valueCode === code));
  return n ? [n.family, ...(n.given || [])].filter(Boolean).join(" ") : "";
}

$("pdq-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = { resourceType: "Parameters", parameter: [{ name: "resource", resource: searchPatient() }] };
  const r = await api("POST", "/fhir/Patient/$match", body);
  const tbody = $("pdq-table").querySelector("tbody");
  tbody.replaceChildren();
  $("pix-view").hidden = true;
  if (r.status !== 200) {
    identityMessage(problem(r.data), true);
    return;
  }
  identityMessage("", false);
  const entries = r.data.entry || [];
  $("pdq-summary").textContent = `${entries.length} 件 / ${entries.length} found`;
  for (const entry of entries) {
    const p = entry.resource;
    const key = patientKey(p);
    if (!key) continue;
    const grade = ((entry.search.extension || []).find((x) => x.url.endsWith("match-grade")) || {}).valueCode;
    const tr = document.createElement("tr");
    tr.dataset.patient = keyToken(key.hospital_id, key.patient_id);
    tr.append(cell("td", `${key.hospital_id} / ${key.patient_id}`), cell("td", nameOf(p, "IDE")),
      cell("td", nameOf(p, "SYL")), cell("td", p.birthDate || ""),
      cell("td", GRADE_LABELS[grade] || grade || ""), cell("td", entry.search.score));
    const actions = document.createElement("td");
    actions.append(
      button("連携ID / Linked ids", "show-linked", () => showLinked(key)),
      button("同意 / Consent", "show-consent", () => {
        $("consent-hospital").value = key.hospital_id;
        $("consent-patient").value = key.patient_id;
        listConsents();
      }));
    tr.append(actions);
    tbody.append(tr);
  }
});

async function showLinked(key) {
  const r = await api("GET", "/fhir/Patient/$ihe-pix?sourceIdentifier=" +
    encodeURIComponent(keyToken(key.hospital_id, key.patient_id)));
  const list = $("pix-list");
  list.replaceChildren();
  $("pix-view").hidden = false;
  if (r.status !== 200) {
    identityMessage(problem(r.data), true);
    return;
  }
  for (const p of r.data.parameter || []) {
    if (p.name === "person") {
      $("pix-person").textContent = p.valueIdentifier.value;
      continue;
    }
    if (p.name !== "targetIdentifier") continue;
    const id = p.valueIdentifier;
    const target = { hospital_id: id.system.slice(HOSPITAL_SYSTEM.length), patient_id: id.value };
    const li = document.createElement("li");
    li.dataset.patient = keyToken(target.hospital_id, target.patient_id);
    li.append(cell("span", `${target.hospital_id} / ${target.patient_id} `));
    li.append(button("連携解除 / Unlink", "unlink", async () => {
      const u = await api("POST", "/api/identity/unlink", target);
      if (u.status === 204) {
        identityMessage("連携を解除しました / Unlinked", false);
        showLinked(key);
      } else {
        identityMessage(problem(u.data), true);
      }
    }));
    list.append(li);
  }
}

// ---- Link by hand ----

$("link-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const v = (id) => $(id).value.trim();
  const body = {
    a: { hospital_id: v("link-a-hospital"), patient_id: v("link-a-patient") },
    b: { hospital_id: v("link-b-hospital"), patient_id: v("link-b-patient") },
  };
  const r = await api("POST", "/api/identity/link", body);
  if (r.status === 200) {
    identityMessage(`連携しました (人物 ${r.data.person}) / Linked (person ${r.data.person})`, false);
  } else {
    identityMessage(problem(r.data), true);
  }
});

// ---- Consent (公開同意) ----

function consentPatient() {
  return { hospital: $("consent-hospital").value.trim(), patient: $("consent-patient").value.trim() };
}

$("consent-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const { hospital, patient } = consentPatient();
  const region = $("consent-grantee-region").checked;
  const grantee = region
    ? { system: "urn:gateway:region", value: "region" }
    : { system: "urn:gateway:hospital", value: $("consent-grantee-hospital").value.trim() };
  const kinds = [...document.querySelectorAll("#consent-kinds input:checked")].map((i) => i.value);
  const body = {
    resourceType: "Consent",
    status: "active",
    scope: { coding: [{ system: "http://terminology.hl7.org/CodeSystem/consentscope", code: "patient-privacy" }] },
    patient: { identifier: { system: HOSPITAL_SYSTEM + hospital, value: patient } },
    provision: {
      type: "deny",
      provision: [{
        type: "permit",
        actor: [{ reference: { type: "Organization", identifier: grantee } }],
        class: kinds.map((code) => ({ system: "urn:gateway:data-kind", code })),
      }],
    },
  };
  const r = await api("POST", "/fhir/Consent", body);
  if (r.status === 201) {
    identityMessage("同意を記録しました / Consent recorded", false);
    listConsents();
  } else {
    identityMessage(problem(r.data), true);
  }
});

$("consent-list").addEventListener("click", listConsents);

function granteeText(actor) {
  const id = actor && actor.reference && actor.reference.identifier;
  if (!id) return "";
  return id.system === "urn:gateway:region" ? "地域全体 / Whole region" : `病院 / Hospital ${id.value}`;
}

async function listConsents() {
  const { hospital, patient } = consentPatient();
  const tbody = $("consent-table").querySelector("tbody");
  tbody.replaceChildren();
  if (!hospital || !patient) return;
  const r = await api("GET", "/fhir/Consent?patient=" + encodeURIComponent(keyToken(hospital, patient)));
  if (r.status !== 200) {
    identityMessage(problem(r.data), true);
    return;
  }
  for (const entry of r.data.entry || []) {
    const c = entry.resource;
    const permits = (c.provision && c.provision.provision) || [];
    const grants = permits.map((p) => `${(p.actor || []).map(granteeText).join(", ")}: ` +
      (p.class || []).map((k) => KIND_LABELS[k.code] || k.code).join(", ")).join(" / ");
    const tr = document.createElement("tr");
    tr.dataset.consent = c.id;
    tr.dataset.status = c.status;
    const state = c.status === "active" ? "有効 / Active" : "撤回 / Revoked";
    const by = (c.performer && c.performer[0] && c.performer[0].display) || "";
    tr.append(cell("td", state), cell("td", grants), cell("td", `${by} ${localTime(c.dateTime)}`));
    const actions = document.createElement("td");
    if (c.status === "active") {
      actions.append(button("撤回 / Revoke", "revoke", async () => {
        const x = await api("POST", `/fhir/Consent/${encodeURIComponent(c.id)}/$revoke`);
        if (x.status === 200) {
          identityMessage("同意を撤回しました / Consent revoked", false);
          listConsents();
        } else {
          identityMessage(problem(x.data), true);
        }
      }));
    }
    tr.append(actions);
    tbody.append(tr);
  }
}

// ---- Shown to administrators and physicians once logged in ----

$("review-refresh").addEventListener("click", loadReviewQueue);

function identityShown(role, identity) {
  // Only where the gateway keeps the registry: elsewhere its routes answer 404.
  const on = identity === true && (role === "admin" || role === "physician");
  $("identity-view").hidden = !on;
  if (on) {
    loadReviewQueue();
  } else {
    $("review-list").replaceChildren();
    $("pdq-table").querySelector("tbody").replaceChildren();
    $("consent-table").querySelector("tbody").replaceChildren();
    $("pix-view").hidden = true;
    identityMessage("", false);
  }
}

document.addEventListener("kiosk-session",
  (e) => identityShown(e.detail && e.detail.role, e.detail && e.detail.identity));
// A login answered before this script ran is on the body already.
if (document.body.dataset.role) {
  identityShown(document.body.dataset.role, document.body.dataset.identity === "1");
}
