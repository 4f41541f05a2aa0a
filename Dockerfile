# The contributor's GPU image, built from the CUDA bundle (`scripts/package cuda`): the bundle
# carries the binary, libtorch and the CUDA libraries it opens; the NVIDIA driver comes from
# the host (NVIDIA Container Toolkit). Nothing else is installed.
#
#   scripts/package cuda            # → target/package/tessera-VERSION-linux-x86_64-cuda.tar.zst
#   docker build --build-arg BUNDLE=target/package/tessera-0.1.0-linux-x86_64-cuda.tar.zst -t tessera .
#   docker run --gpus all tessera doctor --hub https://hub.example.org
#   docker run --gpus all -v tessera:/state tessera contribute --hub https://hub.example.org \
#       --device cuda --state-dir /state
FROM nvidia/cuda:13.0.1-base-ubuntu24.04
ARG BUNDLE
RUN apt-get update && apt-get install -y --no-install-recommends zstd ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY ${BUNDLE} /tmp/tessera.tar.zst
RUN mkdir -p /opt/tessera \
    && zstd -dc /tmp/tessera.tar.zst | tar -xf - -C /opt/tessera --strip-components=1 \
    && rm /tmp/tessera.tar.zst
ENV PATH=/opt/tessera:$PATH
VOLUME /state
WORKDIR /state
ENTRYPOINT ["tessera"]
CMD ["doctor", "--device", "cuda"]
