# Sourced (with PY set) by the device scripts (gpu_check.sh, gpu_discovery.sh): where nerfstudio, diffusers and tyro
# do not import (the H200 image), install the wheels carried in .whl/ from disk only (`python
# benchmarks/gpu_check.py --wheels` prepares them) into /tmp/device_site and put that on PYTHONPATH.
if compgen -G ".whl/*.whl" > /dev/null && ! "$PY" -c "import nerfstudio, diffusers, tyro" 2> /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/device_site .whl/*.whl
  export PYTHONPATH="/tmp/device_site${PYTHONPATH:+:$PYTHONPATH}"
fi
