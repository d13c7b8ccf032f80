// Swagger UI for /docs, started from a static file so that the page needs no inline script.
(function () {
  "use strict";
  var root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.getAttribute("data-openapi-url"),
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // The public validator is another host: never called.
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
})();
