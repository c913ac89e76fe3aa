#!/bin/sh
# segcore on several hosts with the standard dask and prefect CLIs: the same commands, flags and
# environment tests/multihost.py runs on its test hosts (network namespaces on one machine).
#
#   deployments/hosts.sh storage|db|prefect|scheduler|gpu-worker|client
#
# Run one role per host (a GPU host: one `gpu-worker` per GPU, each with its own
# CUDA_VISIBLE_DEVICES). Every host needs this checkout installed (`make install`) or the same
# segcore/torch environment; nothing else is shared: inputs, checkpoints and results travel as
# s3:// URIs. Set the addresses below (or export them) for your network.
set -eu

SCHEDULER=${SCHEDULER:-tcp://10.77.0.4:8786}        # the `scheduler` host
PREFECT_API_URL=${PREFECT_API_URL:-http://10.77.0.3:4200/api}
PG_URL=${PG_URL:-postgresql+asyncpg://postgres@10.77.0.3:5432/prefect}
HOST_IP=${HOST_IP:-$(hostname -I 2>/dev/null | cut -d' ' -f1)}
export PREFECT_SERVER_ANALYTICS_ENABLED=false
# s3: your object store (omit SEGCORE_S3_ENDPOINT_URL for AWS itself; credentials as usual:
# environment, AWS_PROFILE or an instance role)
export SEGCORE_S3_ENDPOINT_URL=${SEGCORE_S3_ENDPOINT_URL:-http://10.77.0.2:5000}

case "${1:-}" in
storage)  # test/dev only: an S3-protocol server (moto); production uses S3, MinIO, Ceph...
    exec python -m moto.server -H "$HOST_IP" -p 5000 ;;
db)  # PostgreSQL for Prefect (normally your distribution's service); a fresh cluster in $PGDATA:
    #   initdb -D "$PGDATA" -A trust -U postgres   (use scram-sha-256 and a password off a lab)
    #   echo "host all all 10.77.0.0/24 trust" >> "$PGDATA/pg_hba.conf"; createdb prefect
    exec postgres -D "${PGDATA:?set PGDATA}" -p 5432 -c "listen_addresses=$HOST_IP" ;;
prefect)  # the Prefect server on that PostgreSQL (pip install asyncpg)
    PREFECT_API_DATABASE_CONNECTION_URL=$PG_URL exec prefect server start --host "$HOST_IP" --port 4200 ;;
scheduler)
    # a worker that stops answering (host or link down) is dropped after 15 s instead of Dask's
    # default 5 minutes, and its tasks rerun elsewhere
    DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL=${DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL:-15s} \
        exec dask scheduler --host "$HOST_IP" --port 8786 ;;
gpu-worker)  # one per GPU: CUDA_VISIBLE_DEVICES=0 deployments/hosts.sh gpu-worker
    # a thread per lane: shard tasks hold GPU=1/lanes (ClusterConfig.gpu_lanes: 4 with an
    # address), so 4 run side by side sharing the worker's model; its lock queues the forwards
    export DASK_CONFIG=${DASK_CONFIG:-$(dirname "$0")/dask}  # worker.yaml: the malloc fix
    exec dask worker "$SCHEDULER" --resources GPU=1 --nworkers 1 --nthreads 4 \
        --name "${WORKER_NAME:-$(hostname)-gpu${CUDA_VISIBLE_DEVICES:-0}}" ;;
client)  # where flows run (or a Prefect process worker: prefect worker start --pool segcore-process)
    export PREFECT_API_URL
    echo "PREFECT_API_URL=$PREFECT_API_URL; in Python:"
    echo "  segment_batch(prefix, out, model, cluster=ClusterConfig(mode='address',"
    echo "                address='$SCHEDULER', gpu_resources=True))" ;;
*)
    echo "usage: $0 storage|db|prefect|scheduler|gpu-worker|client" >&2; exit 2 ;;
esac
