// Live updates without a framework: every 2 s, fetch this page's ?fragment=1
// version and swap it into #live (the parts marked data-live). A failed fetch
// (the broker restarting) is shown and tried again.
(function () {
  var live = document.getElementById("live");
  if (!live) { return; }
  function url() {
    var u = new URL(window.location.href);
    u.searchParams.set("fragment", "1");
    u.searchParams.delete("notice");
    return u.toString();
  }
  function refresh() {
    fetch(url(), { headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok) { throw new Error(r.status + " " + r.statusText); } return r.text(); })
      .then(function (html) {
        live.innerHTML = html;
        live.dataset.updated = String(Date.now() / 1000);
        live.classList.remove("stale");
      })
      .catch(function () { live.classList.add("stale"); })
      .finally(function () { window.setTimeout(refresh, 2000); });
  }
  window.setTimeout(refresh, 2000);
})();
