#!/usr/bin/env bash
# Cross-check cbam-deploy's OpenVINO latency against OpenVINO's own benchmark_app on the same IR,
# same device, latency hint, f32 inference precision, synchronous API, batch 1. Threads are left to
# OpenVINO on both sides (benchmark_app refuses -nthreads together with a hint). Usage:
#   benchmarks/openvino_crosscheck.sh BUNDLE [ARTIFACT=openvino-fp32] [SECONDS=15]
set -euo pipefail
bundle=${1:?bundle folder}; artifact=${2:-openvino-fp32}; seconds=${3:-15}
bin=$(dirname "$(command -v cbam-deploy || echo .venv/bin/cbam-deploy)")
xml=$("$bin/python" -c "import json,sys; m=json.load(open('$bundle/manifest.json')); print(next(a['path'] for a in m['artifacts'] if a['name']=='$artifact'))")
side=$("$bin/python" -c "import json; print(json.load(open('$bundle/manifest.json'))['input']['preprocess']['center_crop'])")
echo "== benchmark_app (OpenVINO's own), $artifact, batch 1, latency hint, f32, sync API"
"$bin/benchmark_app" -m "$bundle/$xml" -d CPU -hint latency -infer_precision f32 -api sync \
    -shape "[1,3,$side,$side]" -t "$seconds" 2>&1 | grep -E "Median|Average|Min|Max|Throughput|Count"
echo "== cbam-deploy bench, same IR and settings"
"$bin/cbam-deploy" bench "$bundle" --artifact "$artifact" --batch 1 --min-seconds "$seconds"
