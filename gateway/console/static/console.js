/* Tether console: confirmations for destructive actions and live regions. No dependencies. */
(function () {
  "use strict";

  // <form data-confirm="..."> asks first; the server asks again when JavaScript is off.
  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (!question) return;
    if (!window.confirm(question)) {
      ev.preventDefault();
      return;
    }
    var confirmed = form.querySelector("input[name=confirmed]");
    if (confirmed) confirmed.value = "1";
  });

  // Someone is typing in the region: do not replace it under their hands.
  function busy(el) {
    var active = document.activeElement;
    if (active && el.contains(active) && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName)) {
      return true;
    }
    var fields = el.querySelectorAll("input[type=text], textarea");
    for (var i = 0; i < fields.length; i++) if (fields[i].value) return true;
    return false;
  }

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 60;
  }

  function replace(el, html) {
    var open = {};
    el.querySelectorAll("details[id]").forEach(function (d) { open[d.id] = d.open; });
    var stick = el.getAttribute("data-scroll") === "bottom" && nearBottom(el);
    el.innerHTML = html;
    el.querySelectorAll("details[id]").forEach(function (d) {
      if (d.id in open) d.open = open[d.id];
    });
    if (stick) el.scrollTop = el.scrollHeight;
  }

  // <div data-poll="URL" data-every="ms">: refetch its content until the server says done.
  function poll(el) {
    var url = el.getAttribute("data-poll");
    var every = parseInt(el.getAttribute("data-every") || "2000", 10);
    var last = null;
    function again(delay) { window.setTimeout(tick, delay); }
    function tick() {
      if (document.hidden) { again(every); return; }
      fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { "X-Console-Page": window.location.pathname + window.location.search }
      }).then(function (r) {
        if (r.redirected || r.status === 401) { window.location.reload(); return; }
        if (!r.ok) { again(every * 2); return; }
        var done = r.headers.get("X-Console-Done") === "1";
        return r.text().then(function (html) {
          if (html !== last && !busy(el)) {
            last = html;
            replace(el, html);
            el.setAttribute("data-updated", String(Date.now()));
          }
          if (!done) again(every);
        });
      }).catch(function () { again(every * 2); });
    }
    again(every);
  }

  function start() {
    document.querySelectorAll("[data-poll]").forEach(poll);
    document.querySelectorAll("[data-scroll=bottom]").forEach(function (el) {
      el.scrollTop = el.scrollHeight;
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
