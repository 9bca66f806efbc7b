# spindle for CPUs (x86-64 with AVX2/AVX-512 is where it is fast).
#
#   docker build -t spindle:cpu .
#   docker run -p 8000:8000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#       spindle:cpu --model HuggingFaceTB/SmolLM2-135M-Instruct
#
# Used by deploy/overlays/cpu. Not built in this repository's CI (no Docker there).

ARG RUST_VERSION=1.95.0

# ---- build ------------------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY kernels kernels
COPY models/configs models/configs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p spindle --bin spindle \
    && install -D -m 0755 target/release/spindle /out/spindle \
    && strip /out/spindle

# ---- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/spindle /usr/local/bin/spindle
COPY models/configs /opt/spindle/configs
EXPOSE 8000 5557 5558
ENTRYPOINT ["/usr/local/bin/spindle", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--help"]
