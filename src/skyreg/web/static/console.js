// skyreg console: small enhancements over pages that work without JavaScript.
"use strict";

// Copy buttons: copy the text of the input they name.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button.copy-button");
  if (!button) return;
  const input = document.getElementById(button.dataset.copy);
  if (!input) return;
  input.select();
  const done = () => { button.textContent = "Copied"; setTimeout(() => { button.textContent = "Copy"; }, 1500); };
  if (navigator.clipboard && window.isSecureContext) {
    navigator.clipboard.writeText(input.value).then(done, () => { document.execCommand("copy"); done(); });
  } else {
    document.execCommand("copy");
    done();
  }
});

// Forms that undo something ask first (data-confirm holds the question); without JavaScript
// they submit directly.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset ? event.target.dataset.confirm : undefined;
  if (question && !window.confirm(question)) event.preventDefault();
});

// Live regions: an element with data-live-url is refreshed from that URL (an HTML fragment,
// same origin) every data-live-every seconds while the page is visible.
function follow(element) {
  const every = Math.max(1, Number(element.dataset.liveEvery || "3")) * 1000;
  const tick = async () => {
    const selection = window.getSelection();
    const reading = selection && !selection.isCollapsed && element.contains(selection.anchorNode);
    if (!document.hidden && !reading) {  // never replace text the reader is selecting
      try {
        const response = await fetch(element.dataset.liveUrl, { credentials: "same-origin", headers: { "Accept": "text/html" } });
        if (response.ok) {
          const text = await response.text();
          const fresh = new DOMParser().parseFromString(text, "text/html").body;
          element.replaceChildren(...fresh.childNodes);
          element.dataset.liveUpdated = String(Date.now());
        }
      } catch (e) { /* the next tick tries again */ }
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}
document.querySelectorAll("[data-live-url]").forEach(follow);
