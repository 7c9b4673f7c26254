#!/usr/bin/env bash
# Set up everything on a fresh Debian machine with Python 3.11: the Debian packages the
# project needs (when run as root), a virtual environment in .venv, and the project itself.
#   bash scripts/setup.sh            # the pipeline
#   bash scripts/setup.sh --ffcv     # the pipeline plus the optional FFCV storage format
#   bash scripts/setup.sh --remote   # the pipeline plus reading/writing shards in S3, GCS or over HTTPS
#   bash scripts/setup.sh --trackers # the pipeline plus MLflow, Weights & Biases and Aim (train.log_with)
#   bash scripts/setup.sh --dali     # the pipeline plus the DALI loader (data.loader=dali: decoding on the GPU)
#   bash scripts/setup.sh --k8s      # the pipeline plus Kubernetes submission (Kubeflow Trainer)
#   bash scripts/setup.sh --test     # the pipeline, every extra, and what the tests need (SLURM, Chromium)
set -euo pipefail
cd "$(dirname "$0")/.."

extras=()
for arg in "$@"; do
  case "$arg" in
    --test) extras+=(test ffcv remote trackers dali k8s) ;;
    --dali) extras+=(dali) ;;
    --k8s) extras+=(k8s) ;;
    --ffcv) extras+=(ffcv) ;;
    --remote) extras+=(remote) ;;
    --trackers) extras+=(trackers) ;;
    *) echo "setup.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
want() { [[ " ${extras[*]-} " == *" $1 "* ]]; }

apt_install() {
  # Install only what is missing; needs root (or sudo) and Debian's apt.
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: apt-get install ${missing[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

python=$(command -v python3.11 || command -v python3)
if ! "$python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
  echo "setup: Python 3.11 or newer is required ($python is $("$python" --version 2>&1))" >&2
  exit 1
fi
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi

# The loader's region JPEG decoder is a small C library over libjpeg-turbo (built below).
if command -v apt-get >/dev/null 2>&1; then
  apt_install gcc libjpeg62-turbo-dev || echo "setup: could not install gcc and libjpeg62-turbo-dev" >&2
fi
if want ffcv; then
  # FFCV 1.0.2 is built from source against OpenCV and libjpeg-turbo.
  if command -v apt-get >/dev/null 2>&1; then
    apt_install pkg-config libopencv-dev libturbojpeg0-dev
  else
    echo "setup: FFCV needs pkg-config, OpenCV and libturbojpeg development files; install them first" >&2
  fi
fi
if want test; then
  # The SLURM tests start a real two-node cluster on this host: Debian's slurm-wlm and munge.
  if command -v apt-get >/dev/null 2>&1; then
    apt_install slurm-wlm munge || echo "setup: could not install slurm-wlm and munge; the SLURM tests will be skipped" >&2
    # TensorBoard is checked in a real browser: Debian's Chromium, driven by Playwright.
    apt_install chromium || echo "setup: could not install chromium; the browser tests will be skipped" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
spec="."
if [ ${#extras[@]} -gt 0 ]; then
  spec=".[$(IFS=,; echo "${extras[*]}")]"
fi
.venv/bin/python -m pip install -q -e "$spec"
.venv/bin/python -m imaging.jpeg_region build \
  || echo "setup: region JPEG decoder not built; the loader decodes with Pillow (whole image)" >&2
echo "setup: done (.venv)" >&2
