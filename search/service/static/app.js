// Routing (#/, #/search/<id>, #/compare/<id>,<id>) and live updates: the current view is refreshed
// every POLL_MS without reloading the page; a new view stops the previous one's polling.
"use strict";
const POLL_MS = 2000;
let generation = 0;

function route() {
  const h = location.hash.replace(/^#\/?/, "");
  const [kind, arg] = h.split("/");
  if (kind === "search" && arg) return searchView(arg);
  if (kind === "compare") return compareView((arg || "").split(",").filter(Boolean));
  return listView();
}

async function show() {
  const mine = ++generation;
  const root = document.getElementById("view");
  const view = route();
  view.render(root);
  let polls = 0;
  while (mine === generation) {
    try {
      await view.refresh(root);
      polls += 1;
      root.dataset.polls = String(polls);
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("updated").textContent = "update failed: " + e.message;
    }
    await new Promise((r) => setTimeout(r, POLL_MS));
  }
}

window.addEventListener("hashchange", show);
show();
