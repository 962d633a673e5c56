# One sluice filter as a Wasm plugin image Istio's WasmPlugin (and Envoy Gateway, and any
# OCI-aware loader) can pull: `FROM scratch` plus exactly one layer holding `plugin.wasm`,
# the "compat" variant of the Wasm image spec (https://github.com/solo-io/wasm spec-compat.md)
# that Istio's image fetcher reads. One COPY = one layer: do not add instructions that
# create layers (RUN, ADD, another COPY).
#
# Build context: the repository root, after `cargo wasm` (scripts/build.sh). Built for every
# filter by scripts/oci-build.sh, e.g.:
#   docker build -f packaging/filter.Dockerfile --build-arg FILTER=auth -t sluice/auth:0.1.0 .
# When the image is pushed in OCI format, oci-build.sh also sets the manifest annotation
# `module.wasm.image/variant=compat` the spec asks for (Docker-format images need none).
FROM scratch
# Filter directory name under filters/ (auth, token-ratelimit, prompt-guard,
# prompt-enrichment, model-failover, usage-metrics).
ARG FILTER
ARG VERSION=dev
LABEL org.opencontainers.image.title="sluice-${FILTER}" \
      org.opencontainers.image.description="sluice ${FILTER} proxy-wasm filter for Envoy / Istio (plugin.wasm)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      module.wasm.image/variant="compat"
# The .wasm file name is the crate's lib name: sluice_<filter with _ for ->.wasm; the
# build script passes it as WASM so this file stays free of shell logic. The default names no
# file, so a build without it fails instead of copying the whole directory.
ARG WASM=set-the-WASM-build-arg
COPY target/wasm32-wasip1/release/${WASM} /plugin.wasm
