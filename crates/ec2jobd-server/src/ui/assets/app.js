// ec2jobd dashboard: the job page's live part. The Content-Security-Policy allows no inline script,
// so this file does what the page needs: it listens to the job's event stream and asks htmx to
// re-fetch the live part whenever the job changes, and stops once the job is final.
(function () {
  "use strict";
  function follow() {
    var live = document.getElementById("live");
    if (!live || !window.EventSource || !window.htmx) return;
    if (live.querySelector("[data-final]")) return;
    var src = new EventSource(live.getAttribute("data-stream"));
    src.onmessage = function (e) {
      window.htmx.trigger(live, "refresh");
      if (e.data === "final") src.close();
    };
    document.body.addEventListener("htmx:afterSwap", function () {
      if (live.querySelector("[data-final]")) src.close();
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", follow);
  } else {
    follow();
  }
})();
