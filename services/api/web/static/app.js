// The workspace's only script: moments in the browser's time zone, and the charts, drawn
// with Chart.js from the JSON data block the page carries (no inline script: see the CSP).
(function () {
  "use strict";

  var dateFormat = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric" });
  var dateTimeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit",
  });
  var monthFormat = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", timeZone: "UTC" });

  function localTimes() {
    document.querySelectorAll("time[data-local]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (isNaN(when)) { return; }
      var style = el.getAttribute("data-local");
      el.title = el.textContent;
      el.textContent = (style === "date" ? dateFormat : dateTimeFormat).format(when);
    });
  }

  function money(currency) {
    var format = new Intl.NumberFormat(undefined, { style: "currency", currency: currency, maximumFractionDigits: 0 });
    return function (value) { return format.format(value); };
  }
  function percent(value) { return Math.round(value) + "%"; }
  function shortDate(iso) { return dateFormat.format(new Date(iso)); }
  function month(iso) { return monthFormat.format(new Date(iso + "T00:00:00Z")); }

  var colours = { blue: "#1f5fbf", orange: "#c25e00", green: "#2e7d32", red: "#b3261e", grey: "#5b6573", purple: "#6a3fb5" };

  function builders(data) {
    var cur = money(data.currency || "EUR");
    return {
      tiers: function () {
        var d = data.tiers;
        return {
          type: "bar",
          data: {
            labels: d.labels,
            datasets: [{ label: "Accounts", data: d.accounts, backgroundColor: colours.blue }],
          },
          options: { plugins: { legend: { display: true } }, scales: { y: { beginAtZero: true, title: { display: true, text: "accounts" } } } },
        };
      },
      pareto: function () {
        var d = data.pareto;
        var datasets = [{
          label: "Share of gross profit", data: d.points.map(function (p) { return { x: 100 * p[0], y: 100 * p[1] }; }),
          borderColor: colours.blue, backgroundColor: colours.blue, pointRadius: 0, showLine: true, fill: false,
        }];
        if (d.core_share !== null) {
          datasets.push({
            label: "Profit core (80% of gross profit)", data: [{ x: 100 * d.core_share, y: 0 }, { x: 100 * d.core_share, y: 80 }, { x: 0, y: 80 }],
            borderColor: colours.red, backgroundColor: colours.red, borderDash: [6, 4], pointRadius: 3, pointStyle: "rectRot", showLine: true,
          });
        }
        return {
          type: "scatter",
          data: { datasets: datasets },
          options: {
            scales: {
              x: { min: 0, max: 100, title: { display: true, text: "share of accounts, largest first" }, ticks: { callback: percent } },
              y: { min: 0, title: { display: true, text: "cumulative share of gross profit" }, ticks: { callback: percent } },
            },
          },
        };
      },
      trend: function () {
        var d = data.trend;
        return {
          type: "line",
          data: {
            labels: d.months.map(function (m, i) { return month(m) + (d.to_date[i] ? " (so far)" : ""); }),
            datasets: [
              { label: "Revenue", data: d.revenue, borderColor: colours.blue, backgroundColor: colours.blue, yAxisID: "y", pointStyle: "circle" },
              { label: "Gross profit", data: d.gross_profit, borderColor: colours.green, backgroundColor: colours.green, borderDash: [6, 4], yAxisID: "y", pointStyle: "rect" },
              { label: "Key accounts at risk", data: d.at_risk_key_accounts, borderColor: colours.red, backgroundColor: colours.red, borderDash: [2, 3], yAxisID: "y2", pointStyle: "triangle", spanGaps: true },
            ],
          },
          options: {
            scales: {
              y: { beginAtZero: true, ticks: { callback: cur }, title: { display: true, text: data.currency } },
              y2: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "accounts" } },
            },
          },
        };
      },
      score: function () {
        var d = data.history;
        return {
          type: "line",
          data: {
            labels: d.at.map(shortDate),
            datasets: [
              { label: "Value score (0-100)", data: d.value_score, borderColor: colours.blue, backgroundColor: colours.blue, pointStyle: "circle" },
              { label: "Risk %", data: d.risk, borderColor: colours.red, backgroundColor: colours.red, borderDash: [6, 4], pointStyle: "triangle" },
            ],
          },
          options: { scales: { y: { min: 0, max: 100 } } },
        };
      },
      revenue: function () {
        var d = data.history;
        return {
          type: "line",
          data: {
            labels: d.at.map(shortDate),
            datasets: [{ label: "Revenue of the 12 months before", data: d.revenue_12m, borderColor: colours.green, backgroundColor: colours.green }],
          },
          options: { scales: { y: { beginAtZero: true, ticks: { callback: cur } } } },
        };
      },
      orders: function () {
        var d = data.orders;
        return {
          type: "bar",
          data: {
            labels: d.months.map(month),
            datasets: [
              { label: "Orders", data: d.orders, backgroundColor: colours.blue, yAxisID: "y" },
              { label: "Revenue", data: d.revenue, type: "line", borderColor: colours.orange, backgroundColor: colours.orange, pointStyle: "rect", yAxisID: "y2" },
            ],
          },
          options: {
            scales: {
              y: { beginAtZero: true, title: { display: true, text: "orders" } },
              y2: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false }, ticks: { callback: cur } },
            },
          },
        };
      },
      timeline: function () {
        var d = data.timeline;
        return {
          type: "scatter",
          data: {
            datasets: [
              { label: "Survey answer (1-5)", data: d.surveys.map(function (s) { return { x: Date.parse(s[0]), y: s[1] }; }),
                borderColor: colours.blue, backgroundColor: colours.blue, pointStyle: "circle", pointRadius: 5 },
              { label: "Complaint", data: d.complaints.map(function (c) { return { x: Date.parse(c[0]), y: 0.5, text: c[1] }; }),
                borderColor: colours.red, backgroundColor: colours.red, pointStyle: "triangle", pointRadius: 7 },
            ],
          },
          options: {
            scales: {
              x: { ticks: { callback: function (v) { return dateFormat.format(new Date(v)); }, maxTicksLimit: 6 } },
              y: { min: 0, max: 5.5, ticks: { stepSize: 1 }, title: { display: true, text: "1 very dissatisfied … 5 very satisfied" } },
            },
            plugins: { tooltip: { callbacks: { label: function (item) {
              var p = item.raw; return dateFormat.format(new Date(p.x)) + ": " + (p.text !== undefined ? "complaint " + p.text : "answer " + p.y);
            } } } },
          },
        };
      },
    };
  }

  function charts() {
    if (typeof Chart === "undefined") { return; }
    window.kamCharts = {};
    var cache = {};
    document.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var source = canvas.getAttribute("data-source");
      if (!cache[source]) { cache[source] = JSON.parse(document.getElementById(source).textContent); }
      var build = builders(cache[source])[canvas.getAttribute("data-chart")];
      if (!build) { return; }
      var config = build();
      config.options = config.options || {};
      config.options.responsive = true;
      config.options.maintainAspectRatio = false;
      config.options.animation = false;
      var chart = new Chart(canvas, config);
      window.kamCharts[canvas.id] = chart;
      canvas.setAttribute("data-points", String(config.data.datasets.reduce(function (n, ds) {
        return n + ds.data.filter(function (v) { return v !== null && v !== undefined; }).length;
      }, 0)));
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes();
    charts();
  });
})();
