# Sourced on the GPU machine before bench/vllm_gpu.py: vLLM 0.26.0 (unpacked to /root/vl/site by the
# carry recipe in ../shared/device/VLLM.md) and the Unsloth stack (.gx/gpu-site.tar.xz, built by
# ../shared/device/build-gpu-site.sh without the packages the vLLM folder already has), then this checkout.
if [ -f .gx/gpu-site.tar.xz ] && [ ! -d /root/gs ]; then
  python3 -c "import lzma, tarfile; tarfile.open('.gx/gpu-site.tar.xz').extractall('/root', filter='tar')"
fi
source .vd/run/env.sh
export PYTHONPATH=/root/vl/site:/root/gs:$PWD
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
