#!/usr/bin/env python3
"""Run a wasm32-wasip1 test binary under wasmtime (PyPI package; it has no CLI).

Cargo and nextest use it as the target runner:
  CARGO_TARGET_WASM32_WASIP1_RUNNER="python scripts/wasm-runner.py"
Compiled modules are cached next to the binary, so nextest's one-process-per-test costs
one compile per binary, not one per test. Exit status is the module's; a trap exits 101.
"""
import hashlib
import os
import sys

import wasmtime


def _trap(module: str, name: str):
    def stub(*_args):
        raise wasmtime.WasmtimeError(f"host function {module}::{name} is not available in tests")

    return stub


def main() -> int:
    if len(sys.argv) < 2:
        print("usage: wasm-runner.py MODULE.wasm [ARGS...]", file=sys.stderr)
        return 2
    path = sys.argv[1]
    engine = wasmtime.Engine()
    with open(path, "rb") as f:
        code = f.read()
    digest = hashlib.sha256(code).hexdigest()[:16]
    cache = f"{path}.{digest}.cwasm"
    module = None
    if os.path.exists(cache):
        try:
            module = wasmtime.Module.deserialize_file(engine, cache)
        except Exception:  # stale or foreign cache: rebuild it
            module = None
    if module is None:
        module = wasmtime.Module(engine, code)
        tmp = f"{cache}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(module.serialize())
        os.replace(tmp, cache)

    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    # Test binaries of crates that depend on proxy-wasm import its host functions (the SDK
    # exports proxy_on_* entry points that reference them). Tests never reach them; define
    # each as a stub that traps if it is ever called.
    for imp in module.imports:
        if imp.module != "wasi_snapshot_preview1" and isinstance(imp.type, wasmtime.FuncType):
            linker.define_func(imp.module, imp.name, imp.type, _trap(imp.module, imp.name))
    store = wasmtime.Store(engine)
    wasi = wasmtime.WasiConfig()
    wasi.argv = [os.path.basename(path)] + sys.argv[2:]
    wasi.inherit_stdout()
    wasi.inherit_stderr()
    wasi.env = [(k, v) for k, v in os.environ.items() if k.startswith(("RUST_", "NEXTEST", "CARGO"))]
    store.set_wasi(wasi)
    instance = linker.instantiate(store, module)
    start = instance.exports(store)["_start"]
    try:
        start(store)
    except wasmtime.ExitTrap as e:
        return e.code
    except wasmtime.Trap as e:
        print(f"wasm trap: {e}", file=sys.stderr)
        return 101
    return 0


if __name__ == "__main__":
    sys.exit(main())
