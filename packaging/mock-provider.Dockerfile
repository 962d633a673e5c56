# The OpenAI-compatible mock provider (tests/mock-provider) as a container, for the Docker
# Compose demo (examples/docker-compose). Build context: the repository root.
#   docker build -f packaging/mock-provider.Dockerfile -t sluice/mock-provider .
# Runs as `sluice-mock-provider --host 0.0.0.0 --port 18001 --name openai ...` (see its README).
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The workspace manifest lists filters/* and tests/*, so they are all copied; only the mock
# is compiled. rust-toolchain.toml pins the toolchain rustup installs here.
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY filters filters
COPY tests/mock-provider tests/mock-provider
COPY tests/config-check tests/config-check
COPY tests/host-probe tests/host-probe
RUN cargo build --release --locked -p sluice-mock-provider \
 && cp target/release/sluice-mock-provider /usr/local/bin/

FROM debian:bookworm-slim
COPY --from=build /usr/local/bin/sluice-mock-provider /usr/local/bin/sluice-mock-provider
USER 65532:65532
EXPOSE 18001
ENTRYPOINT ["/usr/local/bin/sluice-mock-provider", "--host", "0.0.0.0"]
CMD ["--port", "18001", "--name", "openai", "--model", "gpt-4o-mini"]
