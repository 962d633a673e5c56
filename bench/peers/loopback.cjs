// Preloaded into the Portkey gateway by bench/bench.py (`node --require bench/peers/loopback.cjs`):
// its server calls listen(port) with no host, which would bind every interface; this makes a
// listen() without a host bind 127.0.0.1 only, as everything in the benchmark must.
"use strict";
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" || (typeof args[0] === "string" && /^\d+$/.test(args[0]))) {
    if (typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1");
  } else if (args[0] && typeof args[0] === "object" && !("path" in args[0]) && !args[0].host) {
    args[0] = { ...args[0], host: "127.0.0.1" };
  }
  return listen.apply(this, args);
};
