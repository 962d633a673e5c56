// Starts the Portkey gateway (npm @portkey-ai/gateway, installed into bench/peers/node_modules by
// bench/peers/install.sh) for the benchmark, as bench/bench.py runs it:
//   node bench/peers/portkey.cjs --port=N [--workers=2]
// The gateway's own server is one node process (one core) and has no worker option, so node's
// cluster module runs `--workers` copies of it sharing one port (what `pm2 -i N` would do): the
// primary accepts connections and hands them to the workers. Every listen() binds 127.0.0.1
// (loopback.cjs). When a worker dies the primary stops the others and exits non-zero (the bench
// reports the row as failed rather than measuring a respawned gateway); on SIGTERM/SIGINT it
// stops its workers and exits.
"use strict";
const cluster = require("node:cluster");
const path = require("node:path");
const { pathToFileURL } = require("node:url");
require("./loopback.cjs");

const arg = (name, dflt) => {
  const a = process.argv.find((x) => x.startsWith(`--${name}=`));
  return a ? a.slice(name.length + 3) : dflt;
};
const port = arg("port");
const workers = parseInt(arg("workers", "2"), 10);
if (!port || !/^\d+$/.test(port) || !(workers >= 1)) {
  console.error("usage: node bench/peers/portkey.cjs --port=N [--workers=2]");
  process.exit(2);
}

if (cluster.isPrimary) {
  let stopping = false;
  let listening = 0;
  const stopAll = (code) => {
    if (!stopping) {
      stopping = true;
      for (const w of Object.values(cluster.workers)) w.process.kill("SIGTERM");
    }
    process.exitCode = code;
    setTimeout(() => process.exit(code), 3000).unref();
  };
  cluster.on("listening", () => {
    listening += 1;
    if (listening === workers) console.log(`PORTKEY READY 127.0.0.1:${port} workers=${workers}`);
  });
  cluster.on("exit", (w, code, signal) => {
    if (!stopping) {
      console.error(`portkey worker ${w.process.pid} exited (${signal || code}); stopping the others`);
      stopAll(1);
    } else if (Object.keys(cluster.workers).length === 0) {
      process.exit(process.exitCode || 0);
    }
  });
  process.on("SIGTERM", () => stopAll(0));
  process.on("SIGINT", () => stopAll(0));
  for (let i = 0; i < workers; i++) cluster.fork();
} else {
  const main = path.join(__dirname, "node_modules", "@portkey-ai", "gateway", "build", "start-server.js");
  // start-server.js reads its port from argv; --headless leaves out the UI banner
  process.argv = [process.argv[0], main, `--port=${port}`, "--headless"];
  import(pathToFileURL(main).href).catch((e) => {
    console.error(`portkey worker: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  });
}
