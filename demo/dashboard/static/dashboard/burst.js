// "Run a burst" is a plain form (POST, then back to the page, which draws the result);
// this only says that something is happening during the few seconds it takes.
(function () {
  "use strict";
  var form = document.getElementById("burst-form");
  if (!form) {
    return;
  }
  form.addEventListener("submit", function () {
    form.querySelector("button").disabled = true;
    document.getElementById("burst-status").textContent =
      "running: threads are queueing for this worker's connections…";
  });
})();
