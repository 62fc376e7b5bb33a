(function () {
  "use strict";
  var here = new URL(location.href);
  var csrf = document.querySelector('meta[name="csrf-token"]');
  // the session cookie authenticates; state-changing requests echo the session's CSRF token
  var headers = csrf ? { "X-CSRF-Token": csrf.content } : {};
  var every = Math.max(1, Number(document.body.dataset.refresh || 5)) * 1000;
  var overview = document.getElementById("overview");
  var study = document.getElementById("study");
  var selected = here.searchParams.get("study");

  function toast(text) {
    var t = document.getElementById("toast");
    t.textContent = text; t.classList.add("show");
    setTimeout(function () { t.classList.remove("show"); }, 4000);
  }
  function fetchText(path, opts) {
    opts = opts || {};
    opts.headers = Object.assign({}, headers, opts.headers || {});
    return fetch(path, opts).then(function (r) {
      if (r.status === 401) { location.replace("/login?next=" + encodeURIComponent(location.pathname + location.search)); throw new Error("unauthorized"); }
      return r.text().then(function (body) { return { ok: r.ok, status: r.status, body: body }; });
    });
  }
  function stamp(ok) {
    document.getElementById("live-dot").className = ok ? "dot" : "dot stale";
    document.getElementById("updated").textContent = (ok ? "updated " : "stale since ") + new Date().toISOString().substr(11, 8) + " UTC";
  }
  function markSelected() {
    document.querySelectorAll("#recent tr[data-study]").forEach(function (tr) {
      tr.classList.toggle("selected", tr.dataset.study === selected);
    });
  }
  function refreshOverview() {
    return fetchText("/dashboard/fragments/overview").then(function (r) {
      if (r.ok) { overview.innerHTML = r.body; markSelected(); }
      stamp(r.ok);
    }).catch(function () { stamp(false); });
  }
  function showStudy(uid) {
    selected = uid;
    var u = new URL(location.href); u.searchParams.set("study", uid); history.replaceState(null, "", u.toString());
    markSelected();
    return fetchText("/dashboard/fragments/study/" + encodeURIComponent(uid)).then(function (r) {
      study.innerHTML = r.body; study.hidden = false;
    });
  }
  function closeStudy() {
    selected = null; study.hidden = true; study.innerHTML = "";
    var u = new URL(location.href); u.searchParams.delete("study"); history.replaceState(null, "", u.toString());
    markSelected();
  }
  function act(action, uid) {
    return fetchText("/api/studies/" + encodeURIComponent(uid) + "/" + action, { method: "POST" }).then(function (r) {
      var msg; try { var j = JSON.parse(r.body); msg = j.message || j.detail; } catch (e) { msg = r.body; }
      toast((r.ok ? "" : "Refused: ") + msg);
      refreshOverview(); if (selected) { showStudy(selected); }
    });
  }
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("button[data-action]");
    if (btn) { ev.stopPropagation(); act(btn.dataset.action, btn.dataset.uid); return; }
    if (ev.target.closest("button[data-close]")) { closeStudy(); return; }
    var row = ev.target.closest("tr[data-study]");
    if (row) { showStudy(row.dataset.study).then(function () { study.scrollIntoView({ behavior: "smooth" }); }); }
  });
  setInterval(function () {
    refreshOverview();
    var st = document.getElementById("study-state");  // finished studies do not change by themselves
    if (selected && !study.hidden && !(st && (st.textContent === "done" || st.textContent === "dead"))) {
      showStudy(selected);
    }
  }, every);
})();
