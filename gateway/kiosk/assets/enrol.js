// First-time enrolment with a one-time code (#enrol), and the administrators' invitation
// form. Plain DOM, no build step; uses `$`, `api` and `problem` from app.js (loaded first).
"use strict";

let enrolCode = null; // kept in memory between the two steps only

function showEnrol(on) {
  $("enrol-view").hidden = !on;
  if (on) {
    $("login-view").hidden = true;
  } else if ($("who").hidden) {
    $("login-view").hidden = false;
  }
}

function resetEnrol() {
  enrolCode = null;
  $("enrol-form").hidden = false;
  $("enrol-totp").hidden = true;
  $("enrol-qr").replaceChildren();
  $("enrol-secret").textContent = "";
  $("enrol-uri").textContent = "";
  $("enrol-error").hidden = true;
}

function enrolError(text) {
  $("enrol-error").textContent = text;
  $("enrol-error").hidden = false;
}

function onHash() {
  const on = location.hash === "#enrol";
  if (on) {
    resetEnrol();
    $("enrol-done").hidden = true;
  }
  showEnrol(on);
}
window.addEventListener("hashchange", onHash);
onHash();

$("enrol-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if ($("enrol-password").value !== $("enrol-password2").value) {
    enrolError("パスワードが一致しません / The passwords differ");
    return;
  }
  const code = $("enrol-code").value.trim();
  const r = await api("POST", "/api/enrol", { code, password: $("enrol-password").value });
  $("enrol-password").value = "";
  $("enrol-password2").value = "";
  if (r.status !== 200) {
    enrolError(problem(r.data));
    return;
  }
  enrolCode = code;
  $("enrol-code").value = "";
  $("enrol-error").hidden = true;
  // The QR code is an SVG document made by the gateway: parsed as SVG, never as HTML.
  const svg = new DOMParser().parseFromString(r.data.qr_svg, "image/svg+xml").documentElement;
  $("enrol-qr").replaceChildren(document.importNode(svg, true));
  $("enrol-name").textContent = r.data.name;
  $("enrol-secret").textContent = r.data.secret;
  $("enrol-uri").textContent = r.data.otpauth_uri;
  $("enrol-form").hidden = true;
  $("enrol-totp").hidden = false;
});

$("enrol-confirm-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await api("POST", "/api/enrol/confirm", { code: enrolCode || "", totp: $("enrol-totp-code").value });
  $("enrol-totp-code").value = "";
  if (r.status !== 200) {
    enrolError(problem(r.data));
    return;
  }
  const name = r.data.name;
  resetEnrol();
  $("enrol-done").hidden = false;
  location.hash = "";
  $("login-name").value = name;
  $("enrol-done").hidden = false;
  $("login-view").prepend($("enrol-done"));
});

$("enrol-back").addEventListener("click", () => { resetEnrol(); });

// Administrators see the invitation form once logged in.
async function refreshInvite() {
  if ($("who").hidden) {
    $("invite-view").hidden = true;
    return;
  }
  const r = await api("GET", "/api/me");
  $("invite-view").hidden = !(r.status === 200 && r.data.role === "admin");
}
new MutationObserver(refreshInvite).observe($("who"), { attributes: true, attributeFilter: ["hidden"] });

$("invite-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await api("POST", "/api/accounts/invite", { name: $("invite-name").value, role: $("invite-role").value });
  if (r.status === 201) {
    $("invite-error").hidden = true;
    $("invite-code").textContent = r.data.code;
    const until = new Date(r.data.expires_at * 1000).toLocaleString();
    $("invite-expires").textContent = `(${until} まで有効 / valid until ${until})`;
    $("invite-result").hidden = false;
    $("invite-name").value = "";
  } else {
    $("invite-result").hidden = true;
    $("invite-error").textContent = problem(r.data);
    $("invite-error").hidden = false;
  }
});
