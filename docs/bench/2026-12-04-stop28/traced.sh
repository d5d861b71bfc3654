#!/usr/bin/env bash
# The same binary with tracing on at the default 1 % sample, exporting OTLP to a local stub
# collector on port 28318 (any server that answers POST with 202); exec keeps the pid.
export SWITCHBOARD_TRACE_EXPORTER=otlp
export SWITCHBOARD_TRACE_ENDPOINT=http://127.0.0.1:${COLLECTOR_PORT:-28318}/v1/traces
export SWITCHBOARD_TRACE_SAMPLE_RATIO=${TRACE_RATIO:-0.01}
exec "${BIN:-target/release/switchboard}" "$@"
