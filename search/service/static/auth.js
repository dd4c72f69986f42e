// The token, shared by the dashboard and /docs: asked once, kept in this tab's sessionStorage,
// sent only as an Authorization header (never in a URL).
"use strict";
const MBP_TOKEN_KEY = "mbp-search-token";

const mbpAuth = {
  token() { return sessionStorage.getItem(MBP_TOKEN_KEY) || ""; },
  headers(extra) {
    const h = Object.assign({}, extra || {});
    const t = mbpAuth.token();
    if (t) h["Authorization"] = "Bearer " + t;
    return h;
  },
  // Show the token form and resolve once the user submitted one.
  ask(message) {
    return new Promise((resolve) => {
      const form = document.getElementById("token-form");
      const input = document.getElementById("token-input");
      document.getElementById("token-message").textContent = message;
      form.hidden = false;
      input.value = "";
      input.focus();
      form.onsubmit = (ev) => {
        ev.preventDefault();
        sessionStorage.setItem(MBP_TOKEN_KEY, input.value.trim());
        form.hidden = true;
        resolve();
      };
    });
  },
  // fetch() with the token; on 401, ask for the token (once per wrong token) and retry.
  async fetch(path, opts) {
    for (;;) {
      const o = Object.assign({}, opts || {});
      o.headers = mbpAuth.headers(o.headers);
      if (!o.cache) o.cache = "no-store";  // the page decides (ETag / If-None-Match), not the HTTP cache
      const r = await fetch(path, o);
      if (r.status !== 401) return r;
      await mbpAuth.ask(mbpAuth.token() ? "That token was refused; enter the service's token:"
                                        : "This service needs its token (search serve --token):");
    }
  },
};
