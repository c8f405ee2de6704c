# Sourced by the GPU scripts: puts the wheels in ./.whl (pure-Python or cp312 wheels the GPU machine lacks:
# pydicom, highdicom, grad-cam, ttach, pydantic, ...; `bash benchmarks/gpu_wheels.sh` fetches them) on
# PYTHONPATH, and prints what the machine is.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import os, torch; print('torch', torch.__version__, 'cpus', os.cpu_count())"
