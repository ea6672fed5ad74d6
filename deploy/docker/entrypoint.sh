#!/bin/sh
# Container entrypoint: make sure an engine for this device exists, then become the server.
#
# Engines are tied to the GPU and the TensorRT version, so they are built on the device itself,
# into a volume (ANEMIA_ENGINE_DIR), on first start. `python -m service prepare` builds the engine
# for ANEMIA_PRECISION / ANEMIA_BACKEND unless engines/manifest.json already lists one for the same
# model sha256, precision, backend, device and tool version; a restart therefore starts in seconds.
#
#   (no arguments) | serve   prepare, then exec the server (python -m service)
#   prepare                  build the engine only, then exit
#   init                     make the API key, metrics token and TLS certificate in
#                            ANEMIA_CREDENTIALS_DIR if missing (the server also does it at start)
#   anything else            exec it (e.g. `sh`, `python build_engines.py --precision all`)
set -eu

: "${ANEMIA_ENGINE_DIR:=/var/lib/anemia/engines}"
export ANEMIA_ENGINE_DIR

ensure_engine_dir() {
    mkdir -p "$ANEMIA_ENGINE_DIR" 2>/dev/null || true
    if [ ! -w "$ANEMIA_ENGINE_DIR" ]; then
        echo "error: ANEMIA_ENGINE_DIR=$ANEMIA_ENGINE_DIR is not writable by uid $(id -u);" \
             "mount a volume there or chown the host directory to $(id -u):$(id -g)" >&2
        exit 2
    fi
}

command="${1:-serve}"
case "$command" in
    serve)
        ensure_engine_dir
        echo "entrypoint: checking the ${ANEMIA_PRECISION:-fp32} engine in $ANEMIA_ENGINE_DIR (a first build on a Jetson takes minutes)"
        python -m service prepare
        exec python -m service
        ;;
    prepare)
        ensure_engine_dir
        exec python -m service prepare
        ;;
    init)
        exec python -m service init
        ;;
    *)
        exec "$@"
        ;;
esac
