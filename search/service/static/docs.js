// /docs: Swagger UI from the vendored bundle. The schema is fetched with the token (asked once,
// shared with the dashboard), and every "Try it out" request carries it as a header.
"use strict";
(async function () {
  const r = await mbpAuth.fetch("/openapi.json");
  const spec = await r.json();
  window.ui = SwaggerUIBundle({
    spec: spec,
    dom_id: "#swagger-ui",
    validatorUrl: null,
    deepLinking: true,
    requestInterceptor: (req) => {
      const t = mbpAuth.token();
      if (t && !req.headers["Authorization"]) req.headers["Authorization"] = "Bearer " + t;
      return req;
    },
  });
})();
