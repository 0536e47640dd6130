/* The serial console of a machine in xterm.js, over a WebSocket (same origin, cookie). */
(function () {
  "use strict";
  const el = document.getElementById("terminal");
  if (!el) return;
  const status = document.getElementById("console-status");
  const button = document.getElementById("console-connect");
  const name = el.dataset.machine;
  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    fontFamily: 'ui-monospace, "DejaVu Sans Mono", "Liberation Mono", Menlo, monospace',
    fontSize: 14,
    scrollback: 5000,
    theme: { background: "#0d1117", foreground: "#d6deeb", cursor: "#7fdbca" },
  });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(el);
  fit.fit();
  window.addEventListener("resize", () => fit.fit());
  window.corralTerminal = term;

  let ws = null;
  const encoder = new TextEncoder();

  function setStatus(text, cls) {
    status.textContent = text;
    status.className = "console-status " + (cls || "");
  }

  function connect() {
    if (ws && ws.readyState <= 1) return;
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${scheme}//${location.host}/machines/${encodeURIComponent(name)}/console`);
    ws.binaryType = "arraybuffer";
    setStatus("connecting…", "busy");
    button.textContent = "Disconnect";
    ws.onopen = () => {
      setStatus("connected", "ok");
      term.focus();
      ws.send(encoder.encode("\r"));  // wake the prompt
    };
    ws.onmessage = (ev) => {
      term.write(typeof ev.data === "string" ? ev.data : new Uint8Array(ev.data));
    };
    ws.onclose = (ev) => {
      const why = ev.reason || (ev.code === 1000 ? "console closed" : "connection lost");
      setStatus("disconnected: " + why, ev.code === 1000 ? "" : "error");
      term.write(`\r\n\x1b[2m[${why}]\x1b[0m\r\n`);
      button.textContent = "Connect";
    };
  }

  term.onData((data) => {
    if (ws && ws.readyState === 1) ws.send(encoder.encode(data));
  });
  button.addEventListener("click", () => {
    if (ws && ws.readyState <= 1) ws.close(1000, "detached");
    else connect();
  });
  connect();
})();
