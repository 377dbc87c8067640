# Sourced by gpu_parts.sh (benchmarks/gpu_session35.sh and later), or by hand, once $W (a log directory) exists: layerwise
# from this checkout, blake3 from the wheel carried in .wheels/ (the device image has none), and the
# machine (GPUs, topology, cores, Python, the CPU model and the load) written to $W/gpus.txt.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
if ! python3 -c "import blake3" 2> /dev/null; then
    pip install -q --no-index --target /tmp/pyextra .wheels/blake3-*.whl > /dev/null 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/pyextra
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
nvidia-smi topo -m >> "$W/gpus.txt" 2>&1; nproc >> "$W/gpus.txt"; python3 -VV >> "$W/gpus.txt"
{ lscpu | grep -E "^Model name|^CPU max MHz|^Thread"; uptime; } >> "$W/gpus.txt" 2>&1
